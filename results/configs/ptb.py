"""RESULTS.md experiment 2: the small LSTM on 50,000 PTB tokens, embedding dropout vs MaxUp.

  --config results/configs/ptb.py:M    M = 1 (embedding dropout) | 2 (MaxUp, the paper's m)

`configs/ptb_small_lstm.py` (2 x 200 LSTM, tied 200-d embeddings, 32 streams, ~35
token segments, light dropout) trained for 6 epochs on the first 50,000
training tokens, so that it overfits and regularisation matters. Validation
every epoch and the final test use the full PTB validation and test sets
(test at batch size 10 rather than 1, for time; both methods alike). No
dynamic evaluation. Seeds by `--config.seed`; the same-wall-clock baseline is
M=1 with `--config.num_epochs` raised (see RESULTS.md).
"""

from configs import image_base, ptb_small_lstm

NUM_COPIES = (1, 2)


def get_config(arg: str = "2"):
  num_copies = image_base.parse_num_copies(arg, NUM_COPIES, "embedding dropout only")
  config = ptb_small_lstm.get_config()
  config.num_train_tokens = 50_000
  config.num_epochs = 6
  config.test_batch_size = 10
  config.dynamic_eval.enabled = False
  config.maxup.num_copies = num_copies
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 1
  config.seed = 0
  return config
