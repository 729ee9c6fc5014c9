"""The training step compiles once per num_copies value and never again."""

import jax
import numpy as np
import pytest

from configs import cifar10_resnet20
from conftest import needs_cifar10, records, tiny_cifar_config
from trainer import core, image, image_data

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@pytest.fixture
def backend_compiles():
  """A list that grows by one entry per XLA compilation while the test runs."""
  events = []

  def listener(event, duration, **kwargs):
    if event == COMPILE_EVENT:
      events.append(duration)

  jax.monitoring.register_event_duration_secs_listener(listener)
  yield events
  jax.monitoring.unregister_event_duration_listener(listener)


def random_batch(rng, batch_size, sharding):
  return jax.device_put({
      "image": rng.integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8),
      "label": rng.integers(0, 10, (batch_size,), dtype=np.int32),
  }, sharding)


@pytest.mark.parametrize("mode", image.MODES)
def test_train_step_compiles_once_per_num_copies(mode, backend_compiles, monkeypatch):
  traces = {1: 0, 3: 0}
  original = image.train_step

  def counted_train_step(state, batch, key, **kwargs):
    traces[kwargs["num_copies"]] += 1  # Runs only while tracing.
    return original(state, batch, key, **kwargs)

  monkeypatch.setattr(image, "train_step", counted_train_step)
  config = cifar10_resnet20.get_config()
  config.model, config.batch_size = "small_cnn", 16
  config.maxup.num_copies, config.maxup.mode = 3, mode
  steps = image.build_steps(config, core.create_mesh(1),
                            image_data.published_dataset_facts("cifar10"))
  state = steps.init_state()
  rng = np.random.default_rng(0)
  # The schedule of train_and_evaluate: standard augmentation first, then MaxUp.
  seen = set()
  for step, m in enumerate([1, 1, 1, 3, 3, 3]):
    compiles_before = len(backend_compiles)
    batch = random_batch(rng, config.batch_size, steps.data_sharding)
    state, metrics = steps.train_steps[m](state, batch, jax.random.fold_in(steps.train_key, step))
    jax.block_until_ready(metrics)
    if m in seen:
      assert len(backend_compiles) == compiles_before, f"step {step} (m={m}) recompiled"
    seen.add(m)

  assert traces == {1: 1, 3: 1}
  assert steps.train_steps[1]._cache_size() == 1
  assert steps.train_steps[3]._cache_size() == 1
  assert int(state.step) == 6


@needs_cifar10
def test_train_and_evaluate_traces_each_step_once(tmp_path, monkeypatch):
  """The real loop on real CIFAR-10: one trace of train_step per num_copies value."""
  traced = []
  original = image.train_step

  def counted_train_step(state, batch, key, **kwargs):
    traced.append(kwargs["num_copies"])  # Runs only while tracing.
    return original(state, batch, key, **kwargs)

  monkeypatch.setattr(image, "train_step", counted_train_step)
  # 8 steps: a warm-up epoch of standard augmentation (4 steps), then 4 of MaxUp (m=4).
  config = tiny_cifar_config(model="small_cnn", num_train_examples=128, num_eval_examples=100,
                             batch_size=32, log_every_steps=2, checkpoint_every_steps=100,
                             **{"maxup.warmup_epochs": 1})
  summary = image.train_and_evaluate(config, str(tmp_path))
  assert summary["steps"] == 8
  assert sorted(traced) == [1, config.maxup.num_copies]
  assert [r["num_copies"] for r in records(tmp_path, "train")] == [1, 1, 4, 4]
