"""A small LSTM on Penn Treebank with MaxUp (m=2), sized for a 2-core CPU.

AWD-LSTM's recipe (configs/ptb_awd_lstm.py) scaled down to one epoch: a
2-layer LSTM with 200 units and tied 200-d embeddings (2.65M parameters),
32 streams of ~35-token segments, light dropout, MaxUp over word-embedding
dropout with m=2, then test perplexity at batch size 1 and dynamic
evaluation with gradient statistics from 200 training segments.
"""

from configs import ptb_awd_lstm


def get_config():
  config = ptb_awd_lstm.get_config()
  config.model.embed_dim = 200
  config.model.hidden_dim = 200
  config.model.num_layers = 2
  config.model.embed_dropout = 0.1
  config.model.input_dropout = 0.1
  config.model.hidden_dropout = 0.1
  config.model.output_dropout = 0.1
  config.model.weight_dropout = 0.1
  config.batch_size = 32
  config.bptt = 35
  config.seq_len_bucket = 16  # Three compiled step shapes: 16, 32 and 48 tokens.
  config.learning_rate = 20.0
  config.num_epochs = 1
  config.finetune.num_restarts = 0
  config.maxup.num_copies = 2
  config.dynamic_eval.stats_max_segments = 200
  config.log_every_steps = 50
  config.checkpoint_every_steps = 200
  return config
