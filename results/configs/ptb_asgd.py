"""RESULTS.md experiment 9: PTB trained past the point where validation stops improving.

  --config results/configs/ptb_asgd.py:DROPOUT,M   DROPOUT in [0, 1), M = 1 (embedding dropout) | 2 (MaxUp)

Experiment 2 stopped long before its baseline overfitted; here the baseline
runs AWD-LSTM's whole recipe on a corpus it can overfit: SGD until NT-ASGD's
non-monotone criterion fires (no improvement on the best validation loss
from before the last 5 epochs), then ASGD to the end of 40 epochs, then one
fine-tuning restart of ASGD from the best averaged weights (ending when the
criterion fires again, at most 10 epochs), and the best weights scored on
the full validation and test sets at batch size 1 and with dynamic
evaluation. The model is `configs/ptb_small_lstm.py`'s 2 x 200 LSTM (tied 200-d
embeddings, 32 streams of ~35-token segments, lr 20) on the first 100,000
PTB training tokens (~90 steps an epoch).

DROPOUT is the locked (input, between-layer, output) and weight dropout,
chosen for the baseline by a grid (`results/run.sh ptb_asgd`: 0.1, 0.3,
0.5 at seed 0; the lowest validation perplexity among the runs NT-ASGD
switched to ASGD) and then used for every run;
the embedding dropout, MaxUp's perturbation, stays at AWD-LSTM's 0.1. The
two methods differ only in M. Seeds by `--config.seed`; the same-time
baseline is M=1 with `--config.num_epochs` from `results/equal_time.py`.
"""

from configs import image_base, ptb_small_lstm

NUM_COPIES = (1, 2)


def get_config(arg: str = "0.3,2"):
  dropout_arg, _, copies = arg.rpartition(",")
  try:
    dropout = float(dropout_arg)
  except ValueError:
    dropout = -1.0
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"DROPOUT={dropout_arg!r} in {arg!r}; must be a number in [0, 1) "
                     "(expected DROPOUT,M, e.g. 0.3,2)")
  num_copies = image_base.parse_num_copies(copies, NUM_COPIES, "embedding dropout only")
  config = ptb_small_lstm.get_config()
  config.num_train_tokens = 100_000
  for name in ("input_dropout", "hidden_dropout", "output_dropout", "weight_dropout"):
    config.model[name] = dropout
  config.num_epochs = 40
  config.finetune.num_restarts = 1
  config.finetune.num_epochs = 10
  config.test_batch_size = 1
  config.maxup.num_copies = num_copies
  config.log_every_steps = 45
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 1
  config.seed = 0
  return config
