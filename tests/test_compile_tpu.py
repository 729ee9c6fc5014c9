"""`train.py --compile_only`: the steps compiled for a TPU slice on a machine without a TPU.

Needs the libtpu package (`pip install "maxup-jax[tpu]"`, which CI installs);
without it these tests are skipped, saying so. A two-convolution network on
MNIST keeps every compilation to seconds.
"""

import importlib.util
import math

import pytest

from configs import hardware
from trainer import compile_report, image, image_data

HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(
    not HAVE_LIBTPU, reason='libtpu is not installed: pip install "maxup-jax[tpu]"')

NUM_COPIES = 3


def small_config(preset="tpu_v5e_4", **overrides):
  config = hardware.get_config(f"{preset}:mnist_gauss")
  config.batch_size = 64
  config.maxup.num_copies = NUM_COPIES
  for key, value in overrides.items():
    node, _, leaf = key.rpartition(".")
    (config[node] if node else config)[leaf] = value
  return config


@pytest.fixture(scope="module")
def report():
  """The report of a small config on 4 v5e chips, training steps only."""
  return compile_report.compile_config(small_config(), "tpu_v5e_4:mnist_gauss",
                                       try_fit_options=False, include_eval=False)


def one_chip_maxup_step(**overrides):
  config = small_config("tpu_v5e_1", **overrides)
  mesh = compile_report.topology_mesh("v5e:1x1")
  steps = image.build_steps(config, mesh, image_data.published_dataset_facts(config.dataset))
  args = (steps.abstract_state, steps.abstract_batch(config.batch_size), steps.abstract_key())
  return compile_report.compile_program("train_maxup", steps.train_steps[NUM_COPIES], args,
                                        compile_report.CHIPS["v5e"], 1)


@pytest.fixture(scope="module")
def one_chip():
  """The same MaxUp step on one chip."""
  return one_chip_maxup_step()


def test_without_libtpu_the_message_names_the_package(monkeypatch):
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *args: None if name == "libtpu" else find_spec(name, *args))
  with pytest.raises(compile_report.LibtpuMissing, match=r'pip install "maxup-jax\[tpu\]"'):
    compile_report.topology_devices("v5e:2x2")


def test_compile_only_needs_a_tpu_preset():
  config = hardware.get_config("gpu8:mnist_gauss")
  with pytest.raises(ValueError, match="tpu_v4_32"):
    compile_report.compile_config(config)


@needs_libtpu
def test_every_tpu_preset_names_a_slice_of_its_device_count():
  for name, preset in hardware.PRESETS.items():
    if preset.topology:
      devices = compile_report.topology_devices(preset.topology, preset.megacore)
      assert len(devices) == preset.devices, name
      assert compile_report.chip_of(preset.topology).name.split()[-1].lower() in (
          devices[0].device_kind.lower().replace(" lite", "e"))


@needs_libtpu
def test_report_fields_are_there_and_consistent(report):
  assert (report.chips, report.chip, report.num_copies) == (4, "TPU v5e", NUM_COPIES)
  assert set(report.programs) == {"train_maxup", "train_standard"}
  assert report.fits
  for name, p in report.programs.items():
    assert p.fits and not p.error and p.compile_seconds > 0
    assert p.peak_bytes == p.argument_bytes + p.output_bytes - p.alias_bytes + p.temp_bytes
    assert 0 < p.state_bytes <= p.argument_bytes and p.peak_bytes <= report.hbm_bytes
    assert p.flops == pytest.approx(p.compiled_flops + p.loop_flops_added)
    assert p.roofline_seconds == pytest.approx(max(
        p.flops / 197e12, p.hbm_bytes / 819e9))
    # The gradient is summed over the 4 chips.
    assert p.collectives["all-reduce"]["count"] >= 1
    assert p.collectives["all-reduce"]["bytes"] > 0
  maxup, standard = report.programs["train_maxup"], report.programs["train_standard"]
  assert standard.loop_flops_added == 0 < maxup.loop_flops_added
  assert report.flops_ratio == pytest.approx(maxup.flops / standard.flops)
  assert report.ideal_ratio == pytest.approx(1 + NUM_COPIES / 3)
  assert 0.7 * report.ideal_ratio < report.flops_ratio < 1.3 * report.ideal_ratio
  assert report.step_seconds == maxup.roofline_seconds
  assert report.units_per_second == pytest.approx(64 / maxup.roofline_seconds)
  assert report.recipe_chip_hours == pytest.approx(report.recipe_seconds * 4 / 3600)
  steps_per_epoch = 60_000 // 64
  assert report.recipe_seconds == pytest.approx(steps_per_epoch * (
      standard.roofline_seconds + maxup.roofline_seconds))  # 2 epochs, the first standard
  text = report.format()
  for expected in ("fits: yes", "TFLOP", "all-reduce", "chip-hours", "estimates", "two-pass ideal"):
    assert expected in text


@needs_libtpu
def test_maxup_step_splits_over_four_chips(report, one_chip):
  one, four = one_chip, report.programs["train_maxup"]
  assert four.flops <= 1.05 * one.flops / 4, (four.flops, one.flops)


@needs_libtpu
def test_loop_correction_matches_all_copies_in_one_pass(one_chip):
  """At copies_per_pass=m there is no loop: the compiler counts every copy itself."""
  vmapped = one_chip_maxup_step(**{"maxup.copies_per_pass": NUM_COPIES})
  assert vmapped.loop_flops_added == 0
  looped = one_chip
  assert looped.compiled_flops < 0.8 * vmapped.flops  # What the loop hides.
  assert looped.flops == pytest.approx(vmapped.flops, rel=0.05)


@needs_libtpu
def test_a_step_too_big_for_the_chip_is_reported_as_not_fitting():
  # 8192 ImageNet-size images a step: gigabytes of activations per convolution.
  config = small_config("tpu_v5e_1", dataset="imagenet2012", batch_size=8192)
  mesh = compile_report.topology_mesh("v5e:1x1")
  steps = image.build_steps(config, mesh, image_data.published_dataset_facts(config.dataset))
  args = (steps.abstract_state, steps.abstract_batch(config.batch_size), steps.abstract_key())
  chip = compile_report.CHIPS["v5e"]
  program = compile_report.compile_program("big", steps.train_steps[1], args, chip, 1)
  assert not program.fits and "RESOURCE_EXHAUSTED" in program.error
  assert program.peak_bytes > chip.hbm_bytes  # What the compiler says it needed.
  lines = "\n".join(compile_report._program_lines(program, chip.hbm_bytes))
  assert "does NOT fit" in lines and "needs" in lines


def test_language_presets_keep_the_streams():
  config = hardware.get_config("tpu_v5e_4:ptb_awd_lstm_maxup")
  assert (config.batch_size, config.num_devices, config.expected_device_count) == (20, 4, 4)
  assert config.maxup.num_copies == 2 and "dtype" not in config
  with pytest.raises(ValueError, match="keep their streams"):
    hardware.get_config("tpu_v4_32:ptb_awd_lstm")
  assert math.prod(int(d) for d in hardware.PRESETS["tpu_v5e_64"].topology[4:].split("x")) == 64
