"""AWD-LSTM on WikiText-2, the recipe of Merity, Keskar & Socher (2018); no MaxUp.

AWD-LSTM's WikiText-2 command (`main.py --epochs 750 --dropouth 0.2 --seed
1882`, then `finetune.py` with the same arguments): batch 80, dropouti 0.65,
dropouth 0.2, otherwise as on PTB; 33.5M parameters with the 33,278-word
vocabulary. Point data_dir at the WikiText-2 folder (train.txt, valid.txt,
test.txt, or the wiki.*.tokens files of the original zip).
"""

from configs import ptb_awd_lstm


def get_config():
  config = ptb_awd_lstm.get_config()
  config.dataset = "wikitext2"
  config.data_dir = "../shared/text/wikitext-2"
  config.batch_size = 80
  config.model.input_dropout = 0.65
  config.model.hidden_dropout = 0.2
  config.num_epochs = 750
  config.finetune.num_epochs = 750
  # Krause et al.'s values rescaled by WikiText-2's 4177 statistics segments.
  config.dynamic_eval.learning_rate = 3e-5
  config.dynamic_eval.epsilon = 1.5e-5
  config.seed = 1882
  return config
