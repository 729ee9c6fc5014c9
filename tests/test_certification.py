"""Tests of the certification runner: logs, resumption, tables and plots."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxup_jax import smoothing
from trainer import certification

NUM_IMAGES, NUM_CLASSES, SIGMA = 6, 3, 0.25
SETTINGS = dict(sigma=SIGMA, seed=3, n0=32, n=400, alpha=0.001, batch_size=128, log_fn=None)
_WEIGHTS = np.random.default_rng(0).normal(size=(2 * 2 * 1, NUM_CLASSES)).astype(np.float32)


def classify(images):
  """A linear classifier on flattened [b, 2, 2, 1] images."""
  return images.reshape(images.shape[0], -1) @ jnp.asarray(_WEIGHTS)


def _data():
  images = np.random.default_rng(1).uniform(size=(NUM_IMAGES, 2, 2, 1)).astype(np.float32)
  labels = np.array(jnp.argmax(classify(jnp.asarray(images)), -1))
  labels[1] = (labels[1] + 1) % NUM_CLASSES  # one image the classifier gets wrong
  return images, labels


def _rows(path):
  """Log rows without the time column."""
  lines = path.read_text().splitlines()
  return [line.split("\t")[:-1] for line in lines]


def test_writes_log_table_and_plot(tmp_path):
  images, labels = _data()
  run = certification.certify_dataset(classify, images, labels, tmp_path, **SETTINGS)

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
  config = json.loads((tmp_path / "certify_sigma0.25.json").read_text())
  assert config["n"] == SETTINGS["n"] and config["seed"] == SETTINGS["seed"]


def test_resumed_log_equals_uninterrupted_log(tmp_path):
  images, labels = _data()
  whole = certification.certify_dataset(classify, images, labels, tmp_path / "whole", **SETTINGS)

  first = certification.certify_dataset(classify, images, labels, tmp_path / "parts",
                                        max_images=3, **SETTINGS)
  assert first.num_images == 3
  # A crash in the middle of writing row 3 leaves a partial line behind.
  with open(first.log_path, "a") as f:
    f.write("3\t1\t2\t0.1")
  second = certification.certify_dataset(classify, images, labels, tmp_path / "parts",
                                         **SETTINGS)
  assert second.num_new == NUM_IMAGES - 3
  assert _rows(second.log_path) == _rows(whole.log_path)
  np.testing.assert_array_equal(second.accuracies, whole.accuracies)

  # Nothing left to do: a third call only rewrites the report.
  third = certification.certify_dataset(classify, images, labels, tmp_path / "parts", **SETTINGS)
  assert third.num_new == 0
  assert _rows(third.log_path) == _rows(whole.log_path)


def test_skip_certifies_every_kth_image(tmp_path):
  images, labels = _data()
  run = certification.certify_dataset(classify, images, labels, tmp_path, skip=2, **SETTINGS)
  np.testing.assert_array_equal(certification.read_log(run.log_path).idx, [0, 2, 4])


def test_resume_refuses_other_settings(tmp_path):
  images, labels = _data()
  certification.certify_dataset(classify, images, labels, tmp_path, max_images=1, **SETTINGS)
  with pytest.raises(ValueError, match="n: log has 400, now 800"):
    certification.certify_dataset(classify, images, labels, tmp_path,
                                  **{**SETTINGS, "n": 800})


def test_explicit_key_gives_per_image_fold_in_noise(tmp_path):
  images, labels = _data()
  key = jax.random.key(42)
  run = certification.certify_dataset(classify, images, labels, tmp_path, key=key, max_images=2,
                                      **SETTINGS)
  log = certification.read_log(run.log_path)
  for i in range(2):
    result = smoothing.certify(classify, images[i], jax.random.fold_in(key, i), SIGMA,
                               NUM_CLASSES, n0=32, n=400, alpha=0.001, batch_size=128)
    assert (log.predict[i], log.radius[i]) == (result.prediction, result.radius)


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


def test_write_comparison_and_command_line(tmp_path, capsys):
  images, labels = _data()
  a = certification.certify_dataset(classify, images, labels, tmp_path / "a", **SETTINGS)
  b = certification.certify_dataset(classify, images, labels, tmp_path / "b",
                                    **{**SETTINGS, "sigma": 0.5})
  accuracies = certification.write_comparison({"A": a.log_path, "B": b.log_path},
                                              tmp_path / "compare")
  np.testing.assert_allclose(accuracies["A"], a.accuracies)
  np.testing.assert_allclose(accuracies["B"], b.accuracies)
  header = (tmp_path / "compare.tsv").read_text().splitlines()[0]
  assert header == "radius\tA\tB"
  assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"

  certification.main([str(a.log_path), str(b.log_path), "--labels", "gauss", "maxup",
                      "--out", str(tmp_path / "cli")])
  assert "maxup" in capsys.readouterr().out
  assert (tmp_path / "cli.png").exists() and (tmp_path / "cli.tsv").exists()


def test_format_accuracy_table():
  text = certification.format_accuracy_table([0.25, 0.5], {"model": np.array([0.74, 0.5])},
                                             "title")
  assert text.splitlines() == ["title", "radius   0.25   0.50", "model   74.0%  50.0%"]
