"""Language-model training on the real PTB in ../shared/text/ptb: NT-ASGD, resume, scores."""

import json
import signal

import chex
import numpy as np
import pytest

import train_py
import trainer
from configs import (ptb_awd_lstm, ptb_awd_lstm_maxup, ptb_small_lstm, shakespeare_char_lstm,
                     wikitext2_awd_lstm, wikitext2_awd_lstm_maxup)
from conftest import PTB_DIR, command_line, needs_ptb, records
from trainer import checkpointing, language, text_data

TRAIN_TOKENS, EVAL_TOKENS = 80_000, 5_000


def quick_config(**overrides):
  """The small PTB config shrunk to seconds: a 1-layer 64-unit LSTM on the first 80k tokens.

  Fixed 20-token segments keep it to one compiled step; everything else
  (MaxUp m=2, dropout, AR/TAR, NT-ASGD, dynamic evaluation) is as configured.
  """
  config = ptb_small_lstm.get_config()
  config.data_dir = str(PTB_DIR)
  config.model.embed_dim = config.model.hidden_dim = 64
  config.model.num_layers = 1
  config.num_train_tokens = TRAIN_TOKENS
  config.num_eval_tokens = EVAL_TOKENS
  config.batch_size = 8
  config.bptt = 20
  config.bptt_std = 0.0
  config.bptt_full_probability = 1.0
  config.seq_len_bucket = 20
  config.log_every_steps = 50
  config.checkpoint_every_steps = 250
  config.dynamic_eval.stats_max_segments = 50
  config.update_from_flattened_dict(overrides)
  return config


# ---------------------------------------------------------------------------
# NT-ASGD bookkeeping.


def test_nt_asgd_triggers_when_worse_than_the_best_before_the_last_nonmono():
  history = (5.0, 4.0, 4.5, 4.6)
  assert not language.nt_asgd_triggered(history[:2], 4.7, nonmono=2)  # Too few evaluations.
  assert language.nt_asgd_triggered(history, 4.1, nonmono=2)  # 4.1 > min(5.0, 4.0).
  assert not language.nt_asgd_triggered(history, 3.9, nonmono=2)


def test_end_of_epoch_switches_to_asgd_then_restarts_then_stops():
  kwargs = dict(num_epochs=5, finetune_epochs=10, num_restarts=1, nonmono=1)
  nt_asgd = language.NTASGDState()
  nt_asgd, t = language.end_of_epoch(nt_asgd, 5.0, averaging=False, **kwargs)
  assert t == language.Transition(improved=True, start_averaging=False, restart=False)
  for loss in (4.0, 4.5):  # 4.5 is better than 5.0, the best before the last evaluation.
    nt_asgd, t = language.end_of_epoch(nt_asgd, loss, averaging=False, **kwargs)
    assert not t.start_averaging
  nt_asgd, t = language.end_of_epoch(nt_asgd, 4.3, averaging=False, **kwargs)
  assert t == language.Transition(improved=False, start_averaging=True, restart=False)
  assert nt_asgd.history == (5.0, 4.0, 4.5, 4.3) and nt_asgd.best_val_loss == 4.0
  # During ASGD the history no longer grows; the phase ends after num_epochs.
  nt_asgd, t = language.end_of_epoch(nt_asgd, 3.0, averaging=True, **kwargs)
  assert t == language.Transition(improved=True, start_averaging=False, restart=True)
  assert (nt_asgd.phase, nt_asgd.phase_epochs, nt_asgd.history, nt_asgd.epoch) == (1, 0, (), 5)
  # Fine-tuning ends on the non-monotone criterion; the best loss carries over.
  for loss in (3.5, 3.2, 3.4):
    nt_asgd, t = language.end_of_epoch(nt_asgd, loss, averaging=True, **kwargs)
    assert not nt_asgd.finished
  nt_asgd, t = language.end_of_epoch(nt_asgd, 3.6, averaging=True, **kwargs)
  assert nt_asgd.finished and not t.restart and nt_asgd.best_val_loss == 3.0


# ---------------------------------------------------------------------------
# Configs.


@pytest.mark.parametrize("module, copies, restarts", [
    (ptb_awd_lstm, 1, 1), (ptb_awd_lstm_maxup, 2, 2), (wikitext2_awd_lstm, 1, 1),
    (wikitext2_awd_lstm_maxup, 2, 2), (ptb_small_lstm, 2, 0), (shakespeare_char_lstm, 2, 0),
])
def test_configs_are_valid(module, copies, restarts):
  config = module.get_config()
  language.validate_config(config, num_devices=1)
  assert config.task == "language"
  assert (config.maxup.num_copies, config.finetune.num_restarts) == (copies, restarts)


@pytest.mark.parametrize("overrides, message", [
    ({"dataset": "ptb3"}, "dataset='ptb3'"),
    ({"maxup.num_copies": 0}, "maxup.num_copies=0"),
    ({"maxup.mode": "both"}, "maxup.mode='both'"),
    ({"model.embed_dropout": 1.0}, "embed_dropout=1.0"),
    ({"bptt_full_probability": 0.0}, "bptt_full_probability=0.0"),
    ({"batch_size": 7, "num_devices": 2}, "not divisible by the 2 devices"),
    ({"dynamic_eval.decay": 0.0}, "dynamic_eval.decay=0.0"),
])
def test_bad_configs_fail_before_anything_is_written(tmp_path, overrides, message):
  with pytest.raises(ValueError, match=message):
    trainer.run(quick_config(**overrides), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_missing_corpus_fails_clearly(tmp_path):
  with pytest.raises(FileNotFoundError, match="train.txt"):
    trainer.run(quick_config(data_dir=str(tmp_path / "ptb")), str(tmp_path / "run"))


# ---------------------------------------------------------------------------
# Real runs.


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("ptb_quick")
  return workdir, trainer.run(quick_config(), str(workdir))


@needs_ptb
def test_short_run_beats_unigram_and_dynamic_eval_improves_it(short_run):
  workdir, summary = short_run
  # 500 steps of one pass over 80k tokens. The baseline is the unigram model
  # of the whole training set (724 on these 5,000 validation tokens).
  corpus = text_data.load_corpus("ptb", str(PTB_DIR))
  unigram = text_data.unigram_perplexity(corpus.train, corpus.valid[:EVAL_TOKENS],
                                         corpus.vocab_size)
  assert summary["steps"] == 500
  assert summary["valid_perplexity"] < 0.75 * unigram, (summary, unigram)
  assert summary["dynamic_valid_perplexity"] < summary["valid_perplexity"]
  assert summary["dynamic_test_perplexity"] < summary["test_perplexity"]

  train = records(workdir, "train")
  assert [r["step"] for r in train] == list(range(50, summary["steps"] + 1, 50))
  assert all(r["num_copies"] == 2 and r["loss"] >= r["mean_copy_loss"] for r in train)
  assert train[-1]["perplexity"] < train[0]["perplexity"]
  (valid,) = records(workdir, "valid")
  assert valid["perplexity"] == pytest.approx(summary["valid_perplexity"], rel=1e-5)
  assert records(workdir, "summary")[0]["test_perplexity"] == summary["test_perplexity"]
  assert json.loads((workdir / "config.json").read_text())["task"] == "language"
  assert list((workdir / "tensorboard").iterdir())
  assert int(checkpointing.load_arrays(str(workdir))["state"]["step"]) == summary["steps"]


class Crash(Exception):
  pass


@needs_ptb
def test_crash_and_resume_continues_exactly_through_asgd_and_fine_tuning(tmp_path, monkeypatch):
  # 13 segments per epoch; 3 epochs of SGD / ASGD, then 2 of fine-tuning. Saves
  # every 20 steps and after every epoch: 13, 20, 26, 39, 40, 52, 60, 65.
  config = quick_config(num_train_tokens=2_000, num_epochs=3, nonmono=1,
                        checkpoint_every_steps=20, **{"finetune.num_restarts": 1,
                                                     "finetune.num_epochs": 2,
                                                     "dynamic_eval.enabled": False})
  reference = trainer.run(config, str(tmp_path / "reference"))
  assert reference["epochs"] == 5 and reference["steps"] == 65

  real_save, saves = checkpointing.save, []

  def save_then_crash(manager, step, tree, **kwargs):
    real_save(manager, step, tree, **kwargs)
    saves.append(step)
    if len(saves) == 7:  # Step 60, mid-way through the second epoch of fine-tuning.
      manager.wait_until_finished()
      raise Crash(step)

  monkeypatch.setattr(checkpointing, "save", save_then_crash)
  workdir = tmp_path / "crashed"
  with pytest.raises(Crash):
    trainer.run(config, str(workdir))
  monkeypatch.setattr(checkpointing, "save", real_save)
  resumed = trainer.run(config, str(workdir))
  assert resumed["steps_this_run"] == 65 - saves[-1]
  for key in ("valid_perplexity", "test_perplexity", "steps", "epochs"):
    assert resumed[key] == pytest.approx(reference[key], rel=1e-6), key
  restored = checkpointing.load_arrays(str(workdir))
  expected = checkpointing.load_arrays(str(tmp_path / "reference"))
  chex.assert_trees_all_close(restored["state"], expected["state"], rtol=1e-6, atol=1e-7)
  valid = records(workdir, "valid")
  assert [r["phase"] for r in valid[-5:]] == [0, 0, 0, 1, 1]
  assert valid[3]["averaged"]  # Fine-tuning evaluates the averaged weights.


# ---------------------------------------------------------------------------
# Reliability, as for image training: SIGTERM, NaN/inf, several processes.


def resume_config(**overrides):
  """Slow enough per step (a 2x256 LSTM, 32 streams) that a SIGTERM lands mid-run; 2 epochs."""
  return quick_config(**{"num_train_tokens": 10_000, "num_epochs": 2, "batch_size": 32,
                         "log_every_steps": 5, "checkpoint_every_steps": 1000,
                         "model.hidden_dim": 256, "model.num_layers": 2,
                         "dynamic_eval.enabled": False, **overrides})


def resume_overrides(**overrides):
  """resume_config(**overrides) as train.py's command line for configs/ptb_small_lstm.py."""
  return command_line(resume_config(**overrides), ptb_small_lstm.get_config())


def final_state(workdir):
  return checkpointing.load_arrays(str(workdir))["state"]


@pytest.fixture(scope="module")
def resume_reference(tmp_path_factory):
  """The uninterrupted train.py run the reliability tests compare against.

  A 1-device train.py process like the interrupted one, not this 4-device test
  process: on some CPUs (seen on an AVX2 AMD EPYC) the same run rounds
  differently in the two, and at lr 20 that grows to 0.4% of the validation
  perplexity in 126 steps.
  """
  workdir = tmp_path_factory.mktemp("ptb_reference")
  proc = train_py.run("configs/ptb_small_lstm.py", workdir, resume_overrides())
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  (summary,) = records(workdir, "summary")
  return workdir, summary


@needs_ptb
def test_sigterm_checkpoints_and_exits_then_resumes(resume_reference, tmp_path):
  reference_dir, reference = resume_reference
  overrides = resume_overrides()
  proc = train_py.run("configs/ptb_small_lstm.py", tmp_path, overrides)
  train_py.wait_until(train_py.first_step_logged(tmp_path), [proc])
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  assert "preempted: saved step" in out
  (saved,) = train_py.saved_steps(tmp_path)
  assert 5 <= saved < reference["steps"], out
  assert records(tmp_path, "summary")[-1]["preempted"]

  restart = train_py.run("configs/ptb_small_lstm.py", tmp_path, overrides)
  out, _ = restart.communicate(timeout=300)
  assert restart.returncode == 0, out
  (summary,) = records(tmp_path, "summary")[1:]
  assert summary["steps"] == reference["steps"] and not summary["preempted"]
  assert summary["steps_this_run"] == reference["steps"] - saved
  for key in ("valid_perplexity", "test_perplexity"):
    assert summary[key] == pytest.approx(reference[key], rel=1e-5), key
  chex.assert_trees_all_close(final_state(tmp_path), final_state(reference_dir),
                              rtol=1e-5, atol=1e-6)


@needs_ptb
def test_two_processes_on_loopback_match_one_process(tmp_path):
  # 13 steps: at learning rate 20 the device-split sums' rounding (1e-7)
  # grows to ~1e-4 of the loss within ~50 steps, so longer runs only agree
  # statistically.
  short = {"num_train_tokens": 2_000, "num_epochs": 1, "log_every_steps": 1,
           "dynamic_eval.enabled": False}
  reference = trainer.run(quick_config(**short), str(tmp_path / "one"))
  overrides = command_line(quick_config(num_devices=0, **short), ptb_small_lstm.get_config())
  procs = train_py.run_two_processes("configs/ptb_small_lstm.py", tmp_path / "two", overrides)
  outputs = [p.communicate(timeout=400)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out
  assert "summary:" in outputs[0] and "summary:" not in outputs[1]  # Only process 0 reports.
  two = [r["loss"] for r in records(tmp_path / "two", "train")]
  one = [r["loss"] for r in records(tmp_path / "one", "train")]
  assert len(one) == reference["steps"] == 13
  np.testing.assert_allclose(two, one, rtol=2e-4)
  (summary,) = records(tmp_path / "two", "summary")
  assert summary["test_perplexity"] == pytest.approx(reference["test_perplexity"], rel=1e-4)
  chex.assert_trees_all_close(final_state(tmp_path / "two"), final_state(tmp_path / "one"),
                              rtol=1e-3, atol=1e-5)


@needs_ptb
def test_nonfinite_loss_stops_naming_the_step_and_the_good_checkpoint(tmp_path):
  # A learning rate of 1e30 leaves the first step's loss finite and the weights
  # huge, so the next steps' losses overflow.
  config = quick_config(learning_rate=1e30, log_every_steps=1, checkpoint_every_steps=1)
  with pytest.raises(FloatingPointError, match=r"NaN/inf at step (2|3); the newest checkpoint, "
                     r"step 1 in"):
    trainer.run(config, str(tmp_path))
  restored = checkpointing.load_arrays(str(tmp_path))
  assert int(restored["state"]["step"]) == 1
  chex.assert_tree_all_finite(restored["state"]["params"])


@needs_ptb
def test_nonfinite_updates_can_be_skipped(tmp_path):
  config = quick_config(learning_rate=1e30, nonfinite="skip", num_train_tokens=2_000,
                        **{"dynamic_eval.enabled": False})
  summary = trainer.run(config, str(tmp_path))
  assert summary["steps"] == 13
  assert sum(r["nonfinite"] for r in records(tmp_path, "train")) > 0
  chex.assert_tree_all_finite(final_state(tmp_path)["params"])


def test_preset_device_count_is_checked(tmp_path):
  with pytest.raises(ValueError, match="expected_device_count=8 but the run has 1 devices"):
    trainer.run(quick_config(expected_device_count=8), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


@needs_ptb
def test_profile_trace_is_written(tmp_path):
  config = quick_config(num_train_tokens=2_000, profile_steps=2,
                        **{"dynamic_eval.enabled": False})
  trainer.run(config, str(tmp_path))
  assert list((tmp_path / "profile").rglob("*.xplane.pb")), "no profiler trace written"
