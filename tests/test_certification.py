"""Tests of the certification runner: logs, resumption, tables and plots."""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxup_jax import smoothing
from trainer import certification, image_data

NUM_IMAGES, NUM_CLASSES, SIGMA = 6, 3, 0.25
SETTINGS = certification.CertifySettings(sigma=SIGMA, seed=3, n0=32, n=400, alpha=0.001,
                                         batch_size=128)
_WEIGHTS = np.random.default_rng(0).normal(size=(2 * 2 * 1, NUM_CLASSES)).astype(np.float32)


def classify(images):
  """A linear classifier on flattened [b, 2, 2, 1] images."""
  return images.reshape(images.shape[0], -1) @ jnp.asarray(_WEIGHTS)


def _data():
  images = np.random.default_rng(1).uniform(size=(NUM_IMAGES, 2, 2, 1)).astype(np.float32)
  labels = np.array(jnp.argmax(classify(jnp.asarray(images)), -1))
  labels[1] = (labels[1] + 1) % NUM_CLASSES  # one image the classifier gets wrong
  return images, labels


def _certify(out_dir, **changes):
  """`certify_dataset` on `_data()` with SETTINGS, `changes` applied, writing to `out_dir`."""
  images, labels = _data()
  key = changes.pop("key", None)
  settings = dataclasses.replace(SETTINGS, out_dir=out_dir, **changes)
  return certification.certify_dataset(classify, images, labels, settings, key=key, log_fn=None)


def _rows(path):
  """Log rows without the time column."""
  lines = path.read_text().splitlines()
  return [line.split("\t")[:-1] for line in lines]


def test_writes_log_table_and_plot(tmp_path):
  images, labels = _data()
  run = _certify(tmp_path)

  assert run.log_path == tmp_path / "certify_sigma0.25.tsv"
  lines = run.log_path.read_text().splitlines()
  assert lines[0].split("\t") == ["idx", "label", "predict", "radius", "correct", "time"]
  assert len(lines) == 1 + NUM_IMAGES
  log = certification.read_log(run.log_path)
  np.testing.assert_array_equal(log.idx, np.arange(NUM_IMAGES))
  np.testing.assert_array_equal(log.label, labels)
  np.testing.assert_array_equal(log.correct, log.predict == log.label)
  assert np.all(log.radius[log.predict == -1] == 0.0)
  assert np.all(log.time >= 0)
  assert not log.correct[1]
  assert run.num_images == run.num_new == NUM_IMAGES

  table = run.table_path.read_text().splitlines()
  assert table[0] == "radius\tcertified_accuracy"
  assert [float(line.split("\t")[0]) for line in table[1:]] == list(certification.TABLE_RADII)
  expected = smoothing.certified_accuracy(log.radius, log.correct, certification.TABLE_RADII)
  np.testing.assert_allclose([float(line.split("\t")[1]) for line in table[1:]], expected,
                             atol=1e-6)
  np.testing.assert_allclose(run.accuracies, expected)
  assert run.accuracies[0] > 0  # some images are certified

  assert run.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # The settings JSON keeps the layout of the logs already written (results/logs), byte for byte.
  assert (tmp_path / "certify_sigma0.25.json").read_text() == (
      '{\n  "sigma": 0.25,\n  "n0": 32,\n  "n": 400,\n  "alpha": 0.001,\n  "batch_size": 128,\n'
      '  "skip": 1,\n  "seed": 3\n}\n')


def test_settings_json_with_split_and_extra_settings_keeps_its_layout(tmp_path):
  images, labels = _data()
  settings = dataclasses.replace(SETTINGS, split="test", out_dir=tmp_path, max_images=1)
  certification.certify_dataset(classify, images, labels, settings,
                                extra_settings={"checkpoint_step": 24}, log_fn=None)
  text = (tmp_path / "certify_sigma0.25.json").read_text()
  assert list(json.loads(text)) == ["sigma", "n0", "n", "alpha", "batch_size", "skip", "split",
                                    "checkpoint_step", "seed"]
  assert text == json.dumps({"sigma": 0.25, "n0": 32, "n": 400, "alpha": 0.001, "batch_size": 128,
                             "skip": 1, "split": "test", "checkpoint_step": 24, "seed": 3},
                            indent=2) + "\n"


def test_resumed_log_equals_uninterrupted_log(tmp_path):
  whole = _certify(tmp_path / "whole")

  first = _certify(tmp_path / "parts", max_images=3)
  assert first.num_images == 3
  # A crash in the middle of writing row 3 leaves a partial line behind.
  with open(first.log_path, "a") as f:
    f.write("3\t1\t2\t0.1")
  second = _certify(tmp_path / "parts")
  assert second.num_new == NUM_IMAGES - 3
  assert _rows(second.log_path) == _rows(whole.log_path)
  np.testing.assert_array_equal(second.accuracies, whole.accuracies)

  # Nothing left to do: a third call only rewrites the report.
  third = _certify(tmp_path / "parts")
  assert third.num_new == 0
  assert _rows(third.log_path) == _rows(whole.log_path)


def test_skip_certifies_every_kth_image(tmp_path):
  run = _certify(tmp_path, skip=2)
  np.testing.assert_array_equal(certification.read_log(run.log_path).idx, [0, 2, 4])


def test_resume_refuses_other_settings(tmp_path):
  _certify(tmp_path, max_images=1)
  with pytest.raises(ValueError, match="n: log has 400, now 800"):
    _certify(tmp_path, n=800)


def test_explicit_key_gives_per_image_fold_in_noise(tmp_path):
  images, _ = _data()
  key = jax.random.key(42)
  run = _certify(tmp_path, key=key, max_images=2)
  log = certification.read_log(run.log_path)
  for i in range(2):
    result = smoothing.certify(classify, images[i], jax.random.fold_in(key, i), SIGMA,
                               NUM_CLASSES, n0=32, n=400, alpha=0.001, batch_size=128)
    assert (log.predict[i], log.radius[i]) == (result.prediction, result.radius)


def test_certify_dataset_needs_sigma_and_out_dir_and_its_own_names(tmp_path):
  images, labels = _data()
  for settings in (dataclasses.replace(SETTINGS, sigma=None, out_dir=tmp_path), SETTINGS):
    with pytest.raises(ValueError, match="needs settings.sigma and settings.out_dir"):
      certification.certify_dataset(classify, images, labels, settings, log_fn=None)
  with pytest.raises(ValueError, match=r"extra_settings may not set \['n', 'split'\]"):
    certification.certify_dataset(classify, images, labels,
                                  dataclasses.replace(SETTINGS, out_dir=tmp_path),
                                  extra_settings={"split": "test", "n": 5}, log_fn=None)


def test_settings_defaults_are_cohen_et_al_s():
  settings = certification.CertifySettings()
  assert (settings.n0, settings.n, settings.alpha, settings.batch_size) == (100, 100_000, 0.001,
                                                                            1000)
  assert (settings.sigma, settings.skip, settings.max_images, settings.seed) == (None, 1, None, 0)
  assert settings.split is settings.data_dir is settings.out_dir is None


@pytest.mark.parametrize("field, value, message", [
    ("sigma", 0.0, "sigma must be a finite number > 0 (or None: the run's training sigma), "
                   "got 0.0"),
    ("sigma", float("nan"), "sigma must be a finite number > 0"),
    ("sigma", "0.25", "sigma must be a finite number > 0"),
    ("n0", 0, "n0 must be a positive integer, got 0."),
    ("n", 2.5, "n must be a positive integer, got 2.5."),
    ("batch_size", True, "batch_size must be a positive integer, got True."),
    ("skip", -1, "skip must be a positive integer, got -1."),
    ("max_images", -1, "max_images must be a non-negative integer, got -1."),
    ("alpha", 1.0, "alpha must be in (0, 1), got 1.0"),
    ("split", "", "split must be a split name such as 'test'"),
    ("out_dir", 3, "out_dir must be a directory path (or None), got 3"),
    ("seed", 1.5, "seed must be an integer, got 1.5"),
])
def test_settings_name_the_bad_value_and_what_is_valid(field, value, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    certification.CertifySettings(**{field: value})


def test_settings_hold_python_numbers():
  settings = certification.CertifySettings(sigma=np.float32(0.5), n=np.int64(400), max_images=0,
                                           seed=np.int32(-2))
  assert (type(settings.sigma), type(settings.n), type(settings.seed)) == (float, int, int)
  assert (settings.sigma, settings.n, settings.max_images, settings.seed) == (0.5, 400, 0, -2)
  with pytest.raises(dataclasses.FrozenInstanceError):
    settings.n = 5


def test_unit_float_of_host_pixels_is_numpy_division_by_255():
  """`certify_workdir` certifies `to_unit_float` of decoded uint8 pixels; on a numpy array it
  must stay the exact float32 quotient x / 255 the logs so far were made with."""
  pixels = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
  unit = image_data.to_unit_float(pixels)
  assert isinstance(unit, np.ndarray) and unit.dtype == np.float32
  np.testing.assert_array_equal(unit, pixels.astype(np.float32) / np.float32(255.0))


def test_read_log_accepts_cohen_et_al_format(tmp_path):
  path = tmp_path / "sigma_0.50"
  path.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
                  "0\t3\t3\t0.812\t1\t0:00:05.123456\n"
                  "20\t8\t-1\t0.0\t0\t0:00:05.2\n"
                  "40\t8\t1\t1.9\t0\t0:01:00\n"
                  "60\t0\t0\t0.25\t1\t0:00:04.9\n")
  log = certification.read_log(path)
  np.testing.assert_array_equal(log.idx, [0, 20, 40, 60])
  np.testing.assert_allclose(log.time, [5.123456, 5.2, 60.0, 4.9])
  np.testing.assert_allclose(certification.accuracy_table(path, [0.0, 0.25, 0.5, 1.0]),
                             [0.5, 0.5, 0.25, 0.0])


def test_write_comparison(tmp_path, capsys):
  a = _certify(tmp_path / "a")
  b = _certify(tmp_path / "b", sigma=0.5)
  accuracies = certification.write_comparison({"A": a.log_path, "B": b.log_path},
                                              tmp_path / "compare")
  np.testing.assert_allclose(accuracies["A"], a.accuracies)
  np.testing.assert_allclose(accuracies["B"], b.accuracies)
  assert "radius" in capsys.readouterr().out
  header = (tmp_path / "compare.tsv").read_text().splitlines()[0]
  assert header == "radius\tA\tB"
  assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_format_accuracy_table():
  text = certification.format_accuracy_table([0.25, 0.5], {"model": np.array([0.74, 0.5])},
                                             "title")
  assert text.splitlines() == ["title", "radius   0.25   0.50", "model   74.0%  50.0%"]
