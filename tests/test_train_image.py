"""End-to-end tests of image training on the real CIFAR-10 in ../shared/tfds."""

import functools
import re
import signal

import chex
import flax
import jax
import numpy as np
import pytest

from configs import cifar10_resnet20
from conftest import command_line, needs_cifar10, records, tiny_cifar_config, train_losses
from maxup_jax import losses, models
import train_py
from trainer import checkpointing, image, metrics
from train_py import first_step_logged, saved_steps, wait_until

pytestmark = needs_cifar10
CIFAR_CONFIG = "configs/cifar10_resnet20.py"


def final_params(workdir):
  """(params, step) of a run's newest checkpoint."""
  restored = checkpointing.load_arrays(str(workdir))
  return restored["params"], int(restored["step"])


def run_train_py(workdir, config_overrides, extra_args=()):
  return train_py.run(CIFAR_CONFIG, workdir, config_overrides, extra_args=extra_args)


def tiny_cifar_overrides(**extra):
  """tiny_cifar_config(**extra) as train.py's command line."""
  return command_line(tiny_cifar_config(**extra), cifar10_resnet20.get_config())


@pytest.fixture(scope="module")
def cifar_reference_run(tmp_path_factory):
  """(workdir, summary) of one uninterrupted 1-device run that other tests compare against."""
  workdir = tmp_path_factory.mktemp("reference")
  summary = image.train_and_evaluate(
      tiny_cifar_config(num_devices=1, train_eval_examples=128), str(workdir))
  return workdir, summary


def test_training_writes_metrics_checkpoints_and_summary(cifar_reference_run):
  workdir, summary = cifar_reference_run
  assert summary["steps"] == 8 and summary["steps_this_run"] == 8
  assert 0.0 <= summary["final_top1"] <= 1.0
  train = records(workdir, "train")
  assert [r["step"] for r in train] == list(range(1, 9))
  assert [r["num_copies"] for r in train] == [4] * 8
  for r in train:
    assert r["loss"] >= r["mean_copy_loss"] - 1e-6  # The worst copy is no better than the mean.
  assert [r["step"] for r in records(workdir, "test")] == [4, 8]
  train_clean = records(workdir, "train_clean")
  assert [r["step"] for r in train_clean] == [4, 8]
  for r in train_clean:
    assert 0.0 <= r["top1"] <= 1.0 and r["loss"] > 0.0 and r["input_grad_norm"] > 0.0
  assert (workdir / "config.json").is_file()
  assert list((workdir / "tensorboard").iterdir())
  assert final_params(workdir)[1] == 8


@pytest.mark.parametrize("jit", [False, True])
def test_eval_step_input_gradient_norm_is_per_example(jit):
  model = models.create_model("small_cnn", num_classes=10)
  images = jax.random.randint(jax.random.key(0), (6, 28, 28, 1), 0, 256).astype(np.uint8)
  labels = np.arange(6, dtype=np.int32) % 10
  mask = np.array([True] * 4 + [False] * 2)  # The last two are eval padding.
  params = model.init(jax.random.key(1), np.zeros((1, 28, 28, 1), np.float32),
                      train=False)["params"]
  state = image.TrainState(step=0, params=params, batch_stats={}, opt_state=None)
  step = functools.partial(image.eval_step, model=model, mean=(0.13,), std=(0.31,),
                           input_gradient=True)
  step = jax.jit(step) if jit else step
  sums = step(state, {"image": images, "label": labels, "mask": mask})

  def one_loss(pixels, label):
    logits = model.apply({"params": params}, (pixels[None] - 0.13) / 0.31, train=False)
    return losses.softmax_cross_entropy(logits, label[None])[0]

  pixels = images.astype(np.float32) / 255.0
  grads = jax.vmap(jax.grad(one_loss))(pixels, labels)
  norms = np.sqrt(np.sum(np.square(np.asarray(grads)), axis=(1, 2, 3)))
  np.testing.assert_allclose(sums["input_grad_norm"], norms[:4].sum(), rtol=1e-4)
  assert sums["count"] == 4
  without = jax.jit(functools.partial(image.eval_step, model=model, mean=(0.13,), std=(0.31,)))(
      state, {"image": images, "label": labels, "mask": mask})
  assert "input_grad_norm" not in without
  np.testing.assert_allclose(without["loss"], sums["loss"], rtol=1e-5)


def test_sigkill_then_restart_resumes_exactly(cifar_reference_run, tmp_path):
  overrides = tiny_cifar_overrides()
  proc = run_train_py(tmp_path, overrides)
  wait_until(lambda: (tmp_path / "checkpoints" / "2").is_dir(), [proc])
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  saved = saved_steps(tmp_path)
  assert saved and saved[-1] < 8, f"the run finished before the kill: {saved}"
  last_saved = saved[-1]

  restart = run_train_py(tmp_path, overrides)
  out, _ = restart.communicate(timeout=300)
  assert restart.returncode == 0, out
  assert "summary: final_top1=" in out
  train_steps = [r["step"] for r in records(tmp_path, "train")]
  # The restart began right after the newest checkpoint: nothing before it was lost.
  restart_begins = len(train_steps) - (8 - last_saved)
  assert train_steps[restart_begins:] == list(range(last_saved + 1, 9))
  assert train_steps[:restart_begins][-1] >= last_saved

  # The same computation as the uninterrupted reference run, on one device.
  resumed_params, step = final_params(tmp_path)
  assert step == 8
  chex.assert_trees_all_close(resumed_params, final_params(cifar_reference_run[0])[0],
                              rtol=1e-5, atol=1e-6)
  # Each part of the run says which machine it ran on.
  hosts = records(tmp_path, "host")
  assert [r["step"] for r in hosts] == [0, last_saved]
  assert all(r["cpu"] and r["platform"] == "cpu" for r in hosts)


def test_fine_tune_from_checkpoint_with_frozen_batch_norm(cifar_reference_run, tmp_path):
  pretrained = checkpointing.load_arrays(str(cifar_reference_run[0]))
  image.train_and_evaluate(
      tiny_cifar_config(num_devices=1, num_epochs=1, init_checkpoint=str(cifar_reference_run[0]),
                        freeze_batch_norm=True),
      str(tmp_path))
  tuned = checkpointing.load_arrays(str(tmp_path))
  assert int(tuned["step"]) == 4  # A fresh run: steps count from 0, not from the pretrained 8.
  flat_pre = flax.traverse_util.flatten_dict(pretrained["params"])
  flat_tuned = flax.traverse_util.flatten_dict(tuned["params"])
  bn_layers = set(flax.traverse_util.flatten_dict(pretrained["batch_stats"]))
  frozen = [k for k in flat_pre if k[:-1] + ("mean",) in bn_layers]
  assert len(frozen) == len(bn_layers) > 0  # scale and bias; mean and var.
  for name in frozen:  # Loaded from the checkpoint and kept fixed.
    np.testing.assert_array_equal(flat_tuned[name], flat_pre[name])
  chex.assert_trees_all_equal(tuned["batch_stats"], pretrained["batch_stats"])
  trained = [k for k in flat_pre if k not in frozen]
  assert all(not np.array_equal(flat_tuned[k], flat_pre[k]) for k in trained)


@pytest.mark.parametrize("overrides, message", [
    ({"model": "resnet7"}, "model='resnet7'"),
    ({"dataset": "svhn"}, "dataset='svhn'"),
    ({"augment.gaussian_sigma": -0.1}, "gaussian_sigma=-0.1"),
    ({"maxup.num_copies": 0}, "maxup.num_copies=0"),
    ({"maxup.copies_per_pass": -1}, "maxup.copies_per_pass=-1"),
    ({"batch_size": 66}, "not divisible by the 4 devices"),
    ({"maxup.mode": "triple"}, "maxup.mode='triple'"),
    ({"train_eval_examples": 512}, "train_eval_examples=512 exceeds the num_train_examples=256"),
])
def test_bad_configs_fail_before_training(tmp_path, overrides, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    image.train_and_evaluate(tiny_cifar_config(**overrides), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_missing_dataset_says_how_to_prepare_it(tmp_path):
  with pytest.raises(FileNotFoundError, match="tfds build cifar10"):
    image.train_and_evaluate(tiny_cifar_config(data_dir=str(tmp_path)), str(tmp_path / "run"))


# The learning rate jumps to 1e30 after the first epoch (step 4).
EXPLODING_LR = {"lr_schedule": "piecewise", "lr_decay_epochs": (1,), "lr_decay_factor": 1e30}


def test_nonfinite_updates_can_be_skipped(tmp_path):
  summary = image.train_and_evaluate(
      tiny_cifar_config(num_devices=1, nonfinite="skip", **EXPLODING_LR), str(tmp_path))
  assert summary["steps"] == 8
  train = records(tmp_path, "train")
  assert sum(r["nonfinite"] for r in train) >= 2
  chex.assert_tree_all_finite(checkpointing.load_arrays(str(tmp_path))["params"])


def test_bfloat16_training_keeps_float32_state(tmp_path):
  summary = image.train_and_evaluate(
      tiny_cifar_config(num_devices=1, num_epochs=1, dtype="bfloat16",
                        **{"maxup.warmup_epochs": 1}), str(tmp_path))
  assert np.isfinite(summary["final_top1"])
  restored = checkpointing.load_arrays(str(tmp_path))
  state = (restored["params"], restored["batch_stats"], restored["opt_state"])
  float_leaves = [x for x in jax.tree.leaves(state) if np.issubdtype(x.dtype, np.floating)]
  assert float_leaves and all(x.dtype == np.float32 for x in float_leaves)
  assert all(np.isfinite(r["loss"]) for r in metrics.read_metrics(tmp_path) if "loss" in r)


def test_bfloat16_selection_with_float32_gradient_pass(tmp_path):
  summary = image.train_and_evaluate(
      tiny_cifar_config(num_devices=1, num_epochs=1, profile_steps=2,
                        **{"maxup.selection_dtype": "bfloat16"}),
      str(tmp_path))
  assert np.isfinite(summary["final_top1"])
  assert list((tmp_path / "profile").rglob("*.xplane.pb")), "no profiler trace written"


def test_preset_device_count_is_checked(tmp_path):
  with pytest.raises(ValueError, match="expected_device_count=8 but the run has 4 devices"):
    image.train_and_evaluate(tiny_cifar_config(expected_device_count=8), str(tmp_path))


# ---------------------------------------------------------------------------
# Two train.py processes on loopback, each with two CPU devices.


def test_sigterm_to_one_of_two_processes_stops_both_then_they_match_one_process(
    cifar_reference_run, tmp_path):
  overrides = tiny_cifar_overrides(checkpoint_every_steps=100)
  procs = train_py.run_two_processes(CIFAR_CONFIG, tmp_path, overrides)
  wait_until(first_step_logged(tmp_path), procs, timeout=300)
  procs[1].send_signal(signal.SIGTERM)
  outputs = [p.communicate(timeout=200)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outputs
  saved = saved_steps(tmp_path)
  assert len(saved) == 1 and saved[0] < 8, (saved, outputs)
  assert "preempted: saved step" in outputs[0]

  # The restart finishes the run; together the two parts, on 2 x 2 devices,
  # train as one process on one device does.
  procs = train_py.run_two_processes(CIFAR_CONFIG, tmp_path, overrides)
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outputs
  assert "summary:" in outputs[0] and "summary:" not in outputs[1]  # Only process 0 reports.
  params, step = final_params(tmp_path)
  assert step == 8, outputs
  two, one = train_losses(tmp_path), train_losses(cifar_reference_run[0])
  assert sorted(two) == sorted(one) == list(range(1, 9))
  # Reductions split over devices round differently: the losses drift apart by
  # 1e-4-2e-4 (relative) within 8 steps, depending on the data order; after 8
  # steps that shows up around 1e-4 in the parameters (of scale 0.1).
  np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)],
                             rtol=2e-4)
  chex.assert_trees_all_close(params, final_params(cifar_reference_run[0])[0], rtol=1e-2, atol=1e-3)


def test_nonfinite_loss_stops_both_of_two_processes_naming_the_step_and_the_good_checkpoint(
    tmp_path):
  procs = train_py.run_two_processes(CIFAR_CONFIG, tmp_path, tiny_cifar_overrides(**EXPLODING_LR))
  outputs = [p.communicate(timeout=400)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode != 0, out
    assert re.search(r"FloatingPointError: .* NaN/inf at step (5|6); the newest checkpoint, "
                     r"step 4 in", out), out
  restored = checkpointing.load_arrays(str(tmp_path))
  assert int(restored["step"]) == 4
  chex.assert_tree_all_finite(restored["params"])
