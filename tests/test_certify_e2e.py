"""Train MaxUp+Gauss, then certify the run: configs, the trained classifier, certify.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from configs import cifar10_gauss_paper, cifar10_gauss_small, mnist_gauss
from maxup_jax import augment, models
from trainer import certification, checkpointing, image, image_data

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO.parent / "shared" / "tfds"
needs_mnist = pytest.mark.skipif(
    not (DATA_DIR / "mnist").is_dir(), reason=f"real MNIST not found in {DATA_DIR}")

NUM_EVAL = 200
# 20 test images, every 10th, with few noise samples: seconds on a CPU.
CERTIFY = dict(n0=50, n=500, alpha=0.001, batch_size=100, skip=10, max_images=20, seed=1)


# ----------------------------------------------------------------------------
# Configs.


@pytest.mark.parametrize("sigma", cifar10_gauss_paper.SIGMAS)
@pytest.mark.parametrize("num_copies", cifar10_gauss_paper.NUM_COPIES)
def test_paper_config_grid(sigma, num_copies):
  config = cifar10_gauss_paper.get_config(f"{sigma},{num_copies}")
  image.validate_config(config, num_devices=1)
  assert (config.dataset, config.model, config.batch_size) == ("cifar10", "resnet110", 256)
  assert (config.num_epochs, config.learning_rate) == (150, 0.1)
  assert (config.lr_schedule, tuple(config.lr_decay_epochs)) == ("piecewise", (50, 100))
  assert config.lr_decay_factor == 0.1
  assert config.augment.gaussian_sigma == sigma
  assert config.maxup.num_copies == num_copies
  assert config.augment.flip and config.augment.crop_padding == 4
  assert config.augment.cutout_length == 0
  assert config.augment.cutmix_alpha == config.augment.mixup_alpha == 0
  assert config.maxup.warmup_epochs == 5


@pytest.mark.parametrize("arg, message", [
    ("0.3,5", "SIGMA='0.3' in '0.3,5'; valid: [0.12, 0.25, 0.5, 1.0]"),
    ("big,5", "SIGMA='big'"),
    ("0.25,4", "M='4' in '0.25,4'; valid: [1, 5, 25, 50, 100, 150]"),
    ("0.25,2.5", "M='2.5'"),
    ("0.25", "expected SIGMA,M"),
])
def test_paper_config_rejects_values_off_the_grid(arg, message):
  with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
    cifar10_gauss_paper.get_config(arg)


@pytest.mark.parametrize("module", [mnist_gauss, cifar10_gauss_small])
def test_small_configs_train_with_gaussian_noise_and_no_cutout(module):
  config = module.get_config()
  image.validate_config(config, num_devices=1)
  assert config.augment.gaussian_sigma == 0.25 and config.augment.cutout_length == 0
  assert config.maxup.num_copies > 1


# ----------------------------------------------------------------------------
# The classifier of a run.


def _write_fake_run(workdir, config, variables, step):
  workdir.mkdir()
  (workdir / "config.json").write_text(config.to_json_best_effort())
  manager = checkpointing.create_manager(str(workdir))
  checkpointing.save(manager, step, {"step": jnp.asarray(step, jnp.int32), **variables})
  manager.wait_until_finished()
  manager.close()


@needs_mnist
def test_classifier_normalises_raw_pixels_and_uses_running_batch_norm_statistics(tmp_path):
  config = mnist_gauss.get_config()
  config.data_dir = str(DATA_DIR)
  config.model = "resnet8"
  model = models.create_model("resnet8", num_classes=10)
  # Weights drawn on the host: compiling flax's initializers takes seconds on a CPU.
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False))

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":  # He et al. scaling keeps activations O(1) through the net.
      values = rng.normal(0.0, np.sqrt(2.0 / np.prod(leaf.shape[:-1])), leaf.shape)
    elif name == "scale":
      values = rng.uniform(0.5, 1.5, leaf.shape)
    elif name == "mean":  # Running statistics away from their initial (0, 1).
      values = rng.normal(0.0, 0.2, leaf.shape)
    elif name == "var":
      values = rng.uniform(0.25, 4.0, leaf.shape)
    else:  # biases
      values = rng.normal(0.0, 0.1, leaf.shape)
    return jnp.asarray(values.astype(leaf.dtype))

  variables = jax.tree_util.tree_map_with_path(draw, shapes)
  _write_fake_run(tmp_path / "run", config, variables, step=7)

  classifier = certification.classifier_from_workdir(tmp_path / "run")
  assert (classifier.num_classes, classifier.step, classifier.config.model) == (10, 7, "resnet8")
  pixels = jnp.asarray(rng.uniform(size=(4, 28, 28, 1)), jnp.float32)
  mean, std = image_data.DATASET_STATS["mnist"]
  apply = jax.jit(lambda v, x: model.apply(v, augment.normalize(x, mean, std), train=False))
  expected = apply(variables, pixels)
  np.testing.assert_allclose(jax.jit(classifier.classify_fn)(pixels), expected,
                             rtol=1e-5, atol=1e-5)
  # The running statistics matter: with the initial ones (mean 0, var 1) the logits differ.
  initial_stats = jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.full(s.shape, float(path[-1].key == "var"), s.dtype),
      variables["batch_stats"])
  with_initial_stats = apply({**variables, "batch_stats": initial_stats}, pixels)
  assert not np.allclose(expected, with_initial_stats, atol=1e-3)


def test_reading_a_directory_that_is_not_a_run_fails_clearly(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a training run's workdir"):
    certification.classifier_from_workdir(tmp_path)


def test_run_without_noise_needs_an_explicit_sigma(tmp_path):
  config = mnist_gauss.get_config()
  config.augment.gaussian_sigma = 0.0
  (tmp_path / "config.json").write_text(config.to_json_best_effort())
  with pytest.raises(ValueError, match=r"augment.gaussian_sigma=0\); give the smoothing sigma"):
    certification.certify_workdir(tmp_path)


def test_command_line_names_a_bad_setting_before_reading_the_run(tmp_path):
  result = subprocess.run(
      [sys.executable, "certify.py", "--workdir", str(tmp_path / "missing"), "--skip=0"],
      cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "skip must be a positive integer, got 0." in result.stderr, result.stderr


# ----------------------------------------------------------------------------
# End to end: train on real MNIST, certify, certify again.


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """The MNIST MaxUp+Gauss config shrunk to 24 steps: 8 with one noisy copy, 16 with m=5."""
  workdir = tmp_path_factory.mktemp("mnist_gauss")
  config = mnist_gauss.get_config()
  config.data_dir = str(DATA_DIR)
  config.num_train_examples = 512
  config.num_eval_examples = NUM_EVAL
  config.batch_size = 64
  config.eval_batch_size = 100
  config.num_epochs = 3
  config.checkpoint_every_steps = 8
  summary = image.train_and_evaluate(config, str(workdir))
  return workdir, summary


@needs_mnist
def test_trained_classifier_scores_what_the_trainer_scored(trained_run):
  workdir, summary = trained_run
  classifier = certification.classifier_from_workdir(workdir)
  assert classifier.step == summary["steps"] == 24
  test = image_data.load_dataset("mnist", "test", DATA_DIR, num_examples=NUM_EVAL)
  logits = classifier.classify_fn(image_data.to_unit_float(jnp.asarray(test.images)))
  accuracy = float(np.mean(np.argmax(logits, -1) == test.labels))
  assert accuracy == pytest.approx(summary["final_top1"], abs=1e-6)


@needs_mnist
def test_certify_trained_run_then_rerun_does_no_work(trained_run):
  workdir, summary = trained_run
  run = certification.certify_workdir(workdir, certification.CertifySettings(**CERTIFY),
                                      log_fn=None)
  out_dir = workdir / "certify"
  assert run.log_path == out_dir / "certify_sigma0.25.tsv"
  assert run.num_images == run.num_new == 20

  lines = run.log_path.read_text().splitlines()
  assert lines[0].split("\t") == ["idx", "label", "predict", "radius", "correct", "time"]
  rows = [line.split("\t") for line in lines[1:]]
  assert [int(r[0]) for r in rows] == list(range(0, 200, 10))
  test = image_data.load_dataset("mnist", "test", DATA_DIR, num_examples=NUM_EVAL)
  assert [int(r[1]) for r in rows] == test.labels[::10].tolist()
  predict, radius, correct = (np.array([float(r[i]) for r in rows]) for i in (2, 3, 4))
  np.testing.assert_array_equal(correct, predict == np.array([float(r[1]) for r in rows]))
  assert np.all(radius[predict == -1] == 0) and np.all(radius >= 0)
  # The largest radius n samples can certify: sigma * Phi^-1(alpha^(1/n)).
  assert np.all(radius <= 0.25 * stats.norm.ppf(CERTIFY["alpha"] ** (1 / CERTIFY["n"])) + 1e-9)
  assert correct.mean() >= 0.5, "24 steps on MNIST get most digits right"

  table = run.table_path.read_text().splitlines()
  assert table[0] == "radius\tcertified_accuracy"
  assert [float(line.split("\t")[0]) for line in table[1:]] == list(certification.TABLE_RADII)
  assert float(table[1].split("\t")[1]) == pytest.approx(correct.mean())
  assert run.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  settings = json.loads((out_dir / "certify_sigma0.25.json").read_text())
  assert (settings["checkpoint_step"], settings["split"], settings["n"]) == (24, "test", 500)

  # The command line, run again with the same settings, finds nothing left to do.
  log_before = run.log_path.read_bytes()
  args = [sys.executable, "certify.py", "--workdir", str(workdir)]
  args += [f"--{k}={v}" for k, v in CERTIFY.items()]
  result = subprocess.run(args, cwd=REPO, env=dict(os.environ), capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "20 images logged, 0 to go" in result.stdout
  assert "certified acc" in result.stdout and f"table: {run.table_path}" in result.stdout
  assert run.log_path.read_bytes() == log_before
