"""MaxUp on AWD-LSTM, WikiText-2: the paper's section 4.3 setting.

configs/wikitext2_awd_lstm.py with MaxUp over word-embedding dropout (m=2) and
two fine-tuning restarts. The paper reports validation / test perplexity
62.48 / 60.19, and 41.29 / 39.61 with dynamic evaluation, on top of
adversarial training (ADV-AWD-LSTM), which this repository does not add.
"""

from configs import wikitext2_awd_lstm


def get_config():
  config = wikitext2_awd_lstm.get_config()
  config.maxup.num_copies = 2
  config.finetune.num_restarts = 2
  return config
