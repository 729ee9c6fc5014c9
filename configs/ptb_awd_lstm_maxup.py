"""MaxUp on AWD-LSTM, Penn Treebank: the paper's section 4.3 setting.

AWD-LSTM's PTB recipe (configs/ptb_awd_lstm.py) with MaxUp over word-embedding
dropout: every stream is run m=2 times with its own embedding-dropout masks
and trained on the worse copy, in both the SGD/ASGD stage and fine-tuning,
which restarts ASGD twice as in the paper. The paper reports validation /
test perplexity 56.25 / 54.27, and 50.83 / 50.29 with dynamic evaluation, on
top of adversarial training (ADV-AWD-LSTM), which this repository does not add.
"""

from configs import ptb_awd_lstm


def get_config():
  config = ptb_awd_lstm.get_config()
  config.maxup.num_copies = 2
  config.finetune.num_restarts = 2
  return config
