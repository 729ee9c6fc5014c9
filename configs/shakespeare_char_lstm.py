"""A character-level AWD-LSTM on Tiny Shakespeare with MaxUp (m=2).

Every character is a token (65 of them); the text is split 90/5/5 like the
tfds tiny_shakespeare dataset. MaxUp's perturbation is embedding dropout
over character types, lighter than for words since every dropped type
removes a whole letter from the segment. Perplexity is per character;
metrics also report bits per character (`bits_per_token`).
"""

from configs import ptb_awd_lstm


def get_config():
  config = ptb_awd_lstm.get_config()
  config.dataset = "tiny_shakespeare"
  config.data_dir = "../shared/text/tiny_shakespeare.txt"
  config.model.embed_dim = 128
  config.model.hidden_dim = 512
  config.model.num_layers = 3
  config.model.embed_dropout = 0.05
  config.model.input_dropout = 0.1
  config.model.hidden_dropout = 0.2
  config.model.output_dropout = 0.2
  config.model.weight_dropout = 0.3
  config.batch_size = 64
  config.eval_batch_size = 16
  config.bptt = 150
  config.seq_len_bucket = 16
  config.learning_rate = 20.0
  config.num_epochs = 50
  config.finetune.num_restarts = 0
  config.maxup.num_copies = 2
  config.dynamic_eval.seq_len = 20
  config.dynamic_eval.stats_max_segments = 500
  config.seed = 0
  return config
