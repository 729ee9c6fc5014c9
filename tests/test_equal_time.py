"""results/equal_time.py: the equal-time epoch count, and step timing for image and language configs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from results import equal_time
from results.configs import cifar10_scratch, ptb
from trainer import timing

REPO = Path(__file__).resolve().parents[1]


def test_epochs_charge_the_warm_up_at_the_baseline_cost_and_round_to_the_unit():
  config = cifar10_scratch.get_config("4")  # 80 epochs, MaxUp after 2.
  assert equal_time.equal_time_epochs(config, 2.02, 1) == 160  # 2 + 78 * 2.02 = 159.6
  assert equal_time.equal_time_epochs(config, 1.0, 1) == 80
  assert equal_time.equal_time_epochs(config, 2.02, 0.5) == 159.5
  config.maxup.warmup_epochs = 100  # Longer than the run: the whole run is warm-up.
  assert equal_time.equal_time_epochs(config, 3.0, 1) == 80


def test_language_configs_have_no_warm_up():
  config = ptb.get_config("2")  # 6 epochs.
  assert "warmup_epochs" not in config.maxup
  assert equal_time.equal_time_epochs(config, 1.5, 1) == 9


def _tiny_language_config():
  config = ptb.get_config("2")
  config.model.embed_dim = config.model.hidden_dim = 16
  config.batch_size, config.bptt, config.seq_len_bucket = 4, 8, 8
  return config


def test_image_configs_time_the_trainers_image_step():
  config = cifar10_scratch.get_config("4")
  runners = equal_time.step_runners(config)
  # Built, not run: compiling two image steps would take a minute on a small CPU.
  assert set(runners) == {1, 4}
  assert all(isinstance(r, timing.StepRunner) for r in runners.values())
  assert runners[1].step_fn is not runners[4].step_fn
  (batch,) = runners[4].inputs
  assert batch["image"].shape == (config.batch_size, 32, 32, 3)
  assert runners[1].state is not runners[4].state  # Each donates a state of its own.


def test_language_configs_time_the_language_step():
  config = ptb.get_config("2")
  config.model.embed_dim = config.model.hidden_dim = 16
  config.batch_size, config.bptt, config.seq_len_bucket = 4, 8, 8
  runners = equal_time.step_runners(config)
  assert set(runners) == {1, 2}
  runners[2]()  # A step runs and advances its own count only.
  assert runners[2].count == 1 and runners[1].count == 0
  measured = equal_time.measure(config, repeats=2)
  assert measured["num_copies"] == 2 and measured["repeats"] == 2
  assert measured["baseline_step_s"] > 0 and measured["maxup_step_s"] > 0
  assert measured["ratio"] == pytest.approx(measured["maxup_step_s"] / measured["baseline_step_s"])


def test_a_saved_measurement_is_reused(tmp_path, monkeypatch, capsys):
  out = tmp_path / "equal_time.json"
  out.write_text(json.dumps({"ratio": 1.5}))

  def fail(*args):
    raise AssertionError("measured again although the file exists")

  monkeypatch.setattr(equal_time, "measure", fail)
  equal_time.main(["--config", "results/configs/ptb.py:2", "--out", str(out)])
  assert capsys.readouterr().out.strip() == "9"


def test_a_baseline_config_is_refused():
  with pytest.raises(SystemExit, match="num_copies=1; give the MaxUp config"):
    equal_time.main(["--config", "results/configs/ptb.py:1"])


def test_runs_as_a_module_from_the_repository_root(tmp_path):
  out = tmp_path / "equal_time.json"
  out.write_text(json.dumps({"ratio": 2.0}))
  result = subprocess.run(
      [sys.executable, "-m", "results.equal_time", "--config", "results/configs/ptb.py:2",
       "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip() == "12"  # 6 epochs, no warm-up, twice the step time.
