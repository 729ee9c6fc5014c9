"""AWD-LSTM on Penn Treebank, the recipe of Merity, Keskar & Socher (2018); no MaxUp.

The base of every language-modelling config. Hyper-parameters are AWD-LSTM's
PTB command (`main.py --batch_size 20 --dropouti 0.4 --dropouth 0.25 --seed
141 --epoch 500`, then `finetune.py` with the same arguments): a 3-layer LSTM,
embedding 400, hidden 1150, tied weights (24.2M parameters), SGD at lr 30
with the learning rate scaled by the segment length, clipping 0.25, NT-ASGD
(nonmono 5), one fine-tuning restart. Test perplexity at batch size 1, and
dynamic evaluation with Krause et al.'s AWD-LSTM settings.

Each epoch of PTB is ~660 steps; the full recipe is up to 1000 epochs, so run it
on an accelerator.
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.task = "language"

  # ptb | wikitext2 | tiny_shakespeare check the published token counts;
  # 'words' / 'chars' load any corpus of that level.
  config.dataset = "ptb"
  config.data_dir = "../shared/text/ptb"  # Holds train.txt, valid.txt, test.txt.
  config.num_train_tokens = 0  # > 0: train on the first N tokens only.
  config.num_eval_tokens = 0  # > 0: validate and test on the first N tokens only.

  config.model = ml_collections.ConfigDict()
  config.model.embed_dim = 400
  config.model.hidden_dim = 1150
  config.model.num_layers = 3
  config.model.tie_weights = True
  config.model.embed_dropout = 0.1  # dropoute: whole word types; MaxUp's perturbation.
  config.model.input_dropout = 0.4  # dropouti (locked).
  config.model.hidden_dropout = 0.25  # dropouth (locked, between layers).
  config.model.output_dropout = 0.4  # dropout (locked, last layer).
  config.model.weight_dropout = 0.5  # wdrop (DropConnect on hidden-to-hidden weights).

  config.num_devices = 1  # Streams are split over devices; 0 = every device.
  config.expected_device_count = 0  # > 0: fail unless the run sees exactly this many devices.
  config.batch_size = 20  # Parallel streams.
  config.eval_batch_size = 10
  config.test_batch_size = 1
  # Segment length: bptt with probability bptt_full_probability, else bptt / 2,
  # plus N(0, bptt_std) jitter, at least min_seq_len. Segments are padded to a
  # multiple of seq_len_bucket tokens: one compiled step per bucket.
  config.bptt = 70
  config.bptt_full_probability = 0.95
  config.bptt_std = 5.0
  config.min_seq_len = 5
  config.seq_len_bucket = 8
  # The output layer's loss over this many words at a time, never holding the
  # [B, T, V] logits; 0 computes the full logits (same values).
  config.vocab_chunk_size = 1024

  config.learning_rate = 30.0  # Scaled by segment length / bptt at every step.
  config.clip_grad_norm = 0.25
  config.weight_decay = 1.2e-6
  config.activation_reg = 2.0  # alpha (AR).
  config.temporal_activation_reg = 1.0  # beta (TAR).
  config.num_epochs = 500  # SGD, then ASGD once NT-ASGD triggers.
  config.nonmono = 5

  # Fine-tuning: restart ASGD from the best averaged weights, each restart
  # ending when the non-monotone criterion fires or after num_epochs.
  config.finetune = ml_collections.ConfigDict()
  config.finetune.num_restarts = 1
  config.finetune.num_epochs = 500

  config.maxup = ml_collections.ConfigDict()
  config.maxup.num_copies = 1  # 1 = plain AWD-LSTM; the paper uses 2.
  config.maxup.mode = "two_pass"  # two_pass | single_pass
  # Copies one pass evaluates, the passes in sequence: 1 partitions over the
  # streams' devices like the standard step; k > 1 vmaps k copies per pass.
  config.maxup.copies_per_pass = 1

  # Krause et al. (2018): eta=0.002, lambda=0.02, epsilon=0.001 for AWD-LSTM in
  # their original code's scaling, which is eta / sqrt(#stat segments),
  # lambda / #parameter tensors, epsilon / sqrt(#stat segments) in the
  # paper's equations used here (1859 segments of 100 x 5 tokens on PTB).
  config.dynamic_eval = ml_collections.ConfigDict()
  config.dynamic_eval.enabled = True
  config.dynamic_eval.learning_rate = 5e-5
  config.dynamic_eval.decay = 2e-3
  config.dynamic_eval.epsilon = 2e-5
  config.dynamic_eval.seq_len = 5
  config.dynamic_eval.stats_batch_size = 100
  config.dynamic_eval.stats_max_segments = 0  # 0 = the whole training set.

  config.seed = 141
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3
  config.nonfinite = "stop"  # A NaN/inf loss: "stop" (naming the step) or "skip" the update.
  config.profile_steps = 0  # > 0: jax.profiler trace of that many steps in workdir/profile.
  return config
