"""Image classification with MaxUp: pure train/eval steps and the data-parallel training loop.

`train_step` and `eval_step` are pure functions of (state, batch, key); the loop
jits them over a one-axis `Mesh('data')` holding every device of every
process. The global batch is sharded along 'data' and parameters are
replicated, so XLA computes BatchNorm statistics over the global batch
(synchronised BatchNorm): the loss trajectory does not depend on the number
of devices.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from maxup_jax import augment as augment_lib
from maxup_jax import losses
from maxup_jax import models
from maxup_jax.maxup import MODES, maxup_loss
from trainer import checkpointing, input_pipeline
from trainer import mesh as mesh_lib
from trainer import metrics as metrics_lib
from trainer import preemption, progress

# Per-channel mean and std of the training images in [0, 1] pixel scale.
DATASET_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SCHEDULES = ("piecewise", "cosine", "constant")
EVAL_SPLITS = {"imagenet2012": "validation"}
NONFINITE_POLICIES = ("stop", "skip")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


# ---------------------------------------------------------------------------
# Configuration checks: every mistake is reported before any data is read.


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises ValueError naming the bad field and what would be valid."""
  errors = []

  def check(ok, message):
    if not ok:
      errors.append(message)

  check(config.dataset in input_pipeline.DATASETS,
        f"dataset={config.dataset!r}; valid: {sorted(input_pipeline.DATASETS)}")
  try:
    models.create_model(config.model, num_classes=10)
  except ValueError as e:
    errors.append(f"model={config.model!r}: {e}")
  check(config.dtype in DTYPES, f"dtype={config.dtype!r}; valid: {sorted(DTYPES)}")
  check(isinstance(config.batch_size, int) and config.batch_size > 0,
        f"batch_size={config.batch_size!r}; must be a positive int")
  if isinstance(config.batch_size, int) and config.batch_size > 0:
    check(config.batch_size % num_devices == 0,
          f"batch_size={config.batch_size} is not divisible by the {num_devices} devices; "
          f"use a multiple of {num_devices}")
  check(config.num_epochs > 0, f"num_epochs={config.num_epochs}; must be > 0")
  check(config.learning_rate >= 0, f"learning_rate={config.learning_rate}; must be >= 0")
  check(config.lr_schedule in SCHEDULES,
        f"lr_schedule={config.lr_schedule!r}; valid: {list(SCHEDULES)}")
  check(config.weight_decay >= 0, f"weight_decay={config.weight_decay}; must be >= 0")
  maxup = config.maxup
  check(isinstance(maxup.num_copies, int) and not isinstance(maxup.num_copies, bool)
        and maxup.num_copies >= 1,
        f"maxup.num_copies={maxup.num_copies!r}; must be an int >= 1 (1 = no MaxUp)")
  check(maxup.mode in MODES, f"maxup.mode={maxup.mode!r}; valid: {list(MODES)}")
  check(maxup.warmup_epochs >= 0, f"maxup.warmup_epochs={maxup.warmup_epochs}; must be >= 0")
  check(isinstance(maxup.copies_per_pass, int) and maxup.copies_per_pass >= 0,
        f"maxup.copies_per_pass={maxup.copies_per_pass!r}; must be an int >= 0 (0 = all copies "
        "in one selection pass)")
  check(maxup.selection_dtype in ("",) + tuple(DTYPES),
        f"maxup.selection_dtype={maxup.selection_dtype!r}; valid: '' (= dtype) or {sorted(DTYPES)}")
  check(config.nonfinite in NONFINITE_POLICIES,
        f"nonfinite={config.nonfinite!r}; valid: {list(NONFINITE_POLICIES)}")
  check(config.profile_steps >= 0, f"profile_steps={config.profile_steps}; must be >= 0")
  if config.expected_device_count:
    check(config.expected_device_count == num_devices,
          f"expected_device_count={config.expected_device_count} but the run has {num_devices} "
          f"devices; the preset's global batch {config.batch_size} assumes "
          f"{config.batch_size // config.expected_device_count} per device")
  aug = config.augment
  check(aug.gaussian_sigma >= 0, f"augment.gaussian_sigma={aug.gaussian_sigma}; must be >= 0")
  check(aug.cutout_length >= 0, f"augment.cutout_length={aug.cutout_length}; must be >= 0 (0 = off)")
  check(aug.crop_padding >= 0, f"augment.crop_padding={aug.crop_padding}; must be >= 0 (0 = off)")
  check(aug.flip or not aug.crop_padding,
        f"augment.crop_padding={aug.crop_padding} needs augment.flip=True (crop and flip "
        "come together, as in the CIFAR pipeline)")
  check(aug.cutmix_alpha >= 0, f"augment.cutmix_alpha={aug.cutmix_alpha}; must be >= 0 (0 = off)")
  check(aug.mixup_alpha >= 0, f"augment.mixup_alpha={aug.mixup_alpha}; must be >= 0 (0 = off)")
  check(not (aug.cutmix_alpha > 0 and aug.mixup_alpha > 0),
        "augment.cutmix_alpha and augment.mixup_alpha are both set; choose one")
  check(config.checkpoint_every_steps > 0,
        f"checkpoint_every_steps={config.checkpoint_every_steps}; must be > 0")
  check(config.num_train_examples >= 0,
        f"num_train_examples={config.num_train_examples}; must be >= 0 (0 = all)")
  if config.num_train_examples:
    check(config.num_train_examples >= config.batch_size,
          f"num_train_examples={config.num_train_examples} is smaller than one batch "
          f"({config.batch_size})")
  check(config.train_eval_examples >= 0,
        f"train_eval_examples={config.train_eval_examples}; must be >= 0 (0 = off)")
  if config.num_train_examples:
    check(config.train_eval_examples <= config.num_train_examples,
          f"train_eval_examples={config.train_eval_examples} exceeds the "
          f"num_train_examples={config.num_train_examples} the run trains on")
  check(config.num_eval_examples >= 0,
        f"num_eval_examples={config.num_eval_examples}; must be >= 0 (0 = all)")
  check(isinstance(config.eval_batch_size, int) and config.eval_batch_size > 0
        and config.eval_batch_size % num_devices == 0,
        f"eval_batch_size={config.eval_batch_size!r}; must be a positive multiple of the "
        f"{num_devices} devices")
  if errors:
    raise ValueError("invalid config:\n  " + "\n  ".join(errors))


# ---------------------------------------------------------------------------
# Pieces built from the config.


def make_augmentation(config, num_classes: int) -> augment_lib.Augmentation:
  """The per-copy perturbation P(.|x), applied on device to [0, 1] float images.

  CutMix / Mixup come first, so that a copy's partner is a clean example and
  copy i depends on keys[i] alone (the gradient pass swaps every other
  example's key for its winner). Then, as in the papers' pipelines: crop and
  flip on pixels, Gaussian noise in [0, 1] pixel space (where randomized
  smoothing certifies), normalisation, and Cutout, whose zeros are thus the
  dataset mean.
  """
  aug = config.augment
  mean, std = DATASET_STATS[config.dataset]
  steps = []
  if aug.cutmix_alpha:
    steps.append(augment_lib.cutmix(aug.cutmix_alpha, num_classes=num_classes))
  if aug.mixup_alpha:
    steps.append(augment_lib.mixup(aug.mixup_alpha, num_classes=num_classes))
  if aug.flip:
    steps.append(augment_lib.random_crop_flip(aug.crop_padding))
  if aug.gaussian_sigma:
    steps.append(augment_lib.gaussian_noise(aug.gaussian_sigma))
  steps.append(lambda keys, images, labels: (augment_lib.normalize(images, mean, std), labels))
  if aug.cutout_length:
    steps.append(augment_lib.cutout(aug.cutout_length))
  return augment_lib.chain(*steps)


def make_schedule(config, steps_per_epoch: int) -> optax.Schedule:
  total = int(config.num_epochs * steps_per_epoch)
  if config.lr_schedule == "piecewise":
    schedule = optax.piecewise_constant_schedule(
        config.learning_rate,
        {int(e * steps_per_epoch): config.lr_decay_factor for e in config.lr_decay_epochs})
  elif config.lr_schedule == "cosine":
    schedule = optax.cosine_decay_schedule(config.learning_rate, total)
  else:
    schedule = optax.constant_schedule(config.learning_rate)
  if config.lr_warmup_epochs:
    warmup_steps = int(config.lr_warmup_epochs * steps_per_epoch)
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, config.learning_rate, warmup_steps), schedule], [warmup_steps])
  return schedule


def make_optimizer(config, schedule, variables) -> optax.GradientTransformation:
  """SGD with momentum and coupled weight decay, as torch.optim.SGD applies it.

  `variables` (abstract is enough) tells which parameters belong to BatchNorm
  layers: those whose module also owns 'batch_stats'.
  """
  tx = optax.chain(
      optax.add_decayed_weights(config.weight_decay),
      optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov),
  )
  if config.freeze_batch_norm:
    # The EfficientNet fine-tuning recipe: BatchNorm scale and bias stay fixed.
    frozen = batch_norm_modules(variables)
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if _module_path(path) in frozen else "trained",
        variables["params"])
    tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
  return tx


def batch_norm_modules(variables) -> set[tuple[str, ...]]:
  """Module paths of the layers that keep 'batch_stats' (the BatchNorm layers)."""
  paths = jax.tree_util.tree_flatten_with_path(variables.get("batch_stats", {}))[0]
  return {_module_path(path) for path, _ in paths}


def _module_path(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", k)) for k in path[:-1])


def to_unit_float(images: jax.Array) -> jax.Array:
  """uint8 pixels -> float32 in [0, 1]."""
  return images.astype(jnp.float32) / 255.0


# ---------------------------------------------------------------------------
# Pure steps.


def train_step(state: TrainState, batch, key, *, model, tx, augmentation, num_copies: int,
               mode: str, freeze_batch_norm: bool = False, selection_model=None,
               skip_nonfinite: bool = False, copies_per_pass: int | None = None):
  """One SGD step on the MaxUp loss; `num_copies=1` is standard augmentation.

  Args:
    state: the replicated `TrainState`.
    batch: {'image': uint8 [B,H,W,C], 'label': int32 [B]}, sharded on the batch.
    key: this step's PRNG key (the same on every process).
    selection_model: the model that ranks the copies in two-pass MaxUp, e.g.
      `model` computing in bfloat16; default `model`.
    skip_nonfinite: a step whose loss or gradient is NaN/inf leaves the state
      unchanged (but for the step counter) instead of applying the update.
    copies_per_pass: two-pass only: copies per selection pass (`maxup_loss`);
      None ranks all of them in one pass.

  Returns:
    (new_state, metrics) with scalar metrics: `loss` (mean worst-copy loss),
    `mean_copy_loss` (mean over all copies, i.e. what plain augmentation
    would report), `accuracy` (on the trained copies), `grad_norm` and
    `nonfinite` (1.0 if this step's loss or gradient was NaN/inf).
  """
  images = to_unit_float(batch["image"])

  def make_loss_fn(model):
    def loss_fn(params, batch, keys):
      augmented, labels = augmentation(keys, images, batch["label"])
      variables = {"params": params, "batch_stats": state.batch_stats}
      if freeze_batch_norm:
        logits = model.apply(variables, augmented, train=False)
        new_stats = state.batch_stats
      else:
        logits, updates = model.apply(variables, augmented, train=True, mutable=["batch_stats"])
        new_stats = updates["batch_stats"]
      per_example = losses.softmax_cross_entropy(logits, labels)
      correct = losses.topk_correct(logits, labels, 1)
      return per_example, (new_stats, correct)
    return loss_fn

  select = None
  if selection_model is not None and mode == "two_pass":
    select = make_loss_fn(selection_model)

  def objective(params):
    return maxup_loss(make_loss_fn(model), params, batch, key, num_copies, has_aux=True,
                      mode=mode, selection_loss_fn=select,
                      copies_per_pass=copies_per_pass if mode == "two_pass" else None)

  (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  new_stats, correct = aux.loss_aux
  if mode == "single_pass":
    # One set of statistics per copy: average the copies' running averages.
    new_stats = jax.tree.map(lambda s: s.mean(axis=0), new_stats)
    correct = jnp.take_along_axis(correct, aux.selected_copy[None], axis=0)[0]
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_stats,
                            opt_state=opt_state)
  if skip_nonfinite:
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                             new_state, state.replace(step=state.step + 1))
  metrics = {
      "loss": loss,
      "mean_copy_loss": aux.copy_losses.mean(),
      "accuracy": correct.astype(jnp.float32).mean(),
      "grad_norm": grad_norm,
      "nonfinite": 1.0 - finite.astype(jnp.float32),
  }
  return new_state, metrics


def eval_step(state: TrainState, batch, *, model, mean, std, input_gradient: bool = False):
  """Sums of loss and top-1/top-5 hits over the real (masked-in) examples of a batch.

  With `input_gradient`, also `input_grad_norm`: the sum over examples of
  ||d loss(f(x), y) / dx||_2 with x in [0, 1] pixel space, the quantity whose
  sigma-multiple MaxUp with Gaussian noise adds to the loss (theorem 1 of the
  paper). In eval mode every example's loss depends on its own image only, so
  the gradient of the summed loss holds the per-example gradients.
  """
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  mask = batch["mask"].astype(jnp.float32)
  labels = batch["label"]

  def summed_loss(pixels):
    logits = model.apply(variables, augment_lib.normalize(pixels, mean, std), train=False)
    per_example = losses.softmax_cross_entropy(logits, labels)
    return jnp.sum(per_example * mask), (per_example, logits)

  pixels = to_unit_float(batch["image"])
  sums = {}
  if input_gradient:
    (_, (per_example, logits)), grads = jax.value_and_grad(summed_loss, has_aux=True)(pixels)
    per_example_norm = jnp.sqrt(jnp.sum(jnp.square(grads), axis=tuple(range(1, grads.ndim))))
    sums["input_grad_norm"] = jnp.sum(per_example_norm * mask)
  else:
    _, (per_example, logits) = summed_loss(pixels)
  return {
      **sums,
      "loss": jnp.sum(per_example * mask),
      "top1": jnp.sum(losses.topk_correct(logits, labels, 1) * mask),
      "top5": jnp.sum(losses.topk_correct(logits, labels, min(5, logits.shape[-1])) * mask),
      "count": jnp.sum(mask),
  }


# ---------------------------------------------------------------------------
# The loop.


def initial_state(model, tx, image_shape, key, replicated) -> TrainState:
  """Freshly initialised parameters, statistics and optimizer state, placed as `replicated`."""

  def init():
    variables = model.init(key, jnp.zeros((1,) + tuple(image_shape), jnp.float32), train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))

  return jax.jit(init, out_shardings=replicated)()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains and evaluates as `config` says; everything written goes under `workdir`.

  Restarting with the same config and workdir resumes from the newest
  checkpoint with the same data order and random stream. A SIGTERM makes
  every process checkpoint the same step and return early (`preempted`).

  Returns:
    A summary dict (final and best test top-1, wall time, images/s).

  Raises:
    FloatingPointError: the loss or gradient became NaN/inf (unless
      `config.nonfinite == "skip"`); the message names the step and the
      newest checkpoint, which predates it.
  """
  mesh = mesh_lib.create_mesh(config.num_devices)
  validate_config(config, mesh.size)
  data_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  data_dir = config.data_dir or None
  train_data = input_pipeline.load_dataset(
      config.dataset, "train", data_dir, num_examples=config.num_train_examples or None)
  test_data = input_pipeline.load_dataset(
      config.dataset, EVAL_SPLITS.get(config.dataset, "test"), data_dir,
      num_examples=config.num_eval_examples or None)
  # The same first examples every time, un-augmented: how well the run fits
  # what it trains on, and how steep its loss is there.
  train_eval_data = None
  if config.train_eval_examples:
    train_eval_data = input_pipeline.load_dataset(
        config.dataset, "train", data_dir, num_examples=config.train_eval_examples)
  steps_per_epoch = input_pipeline.steps_per_epoch(train_data.num_examples, config.batch_size)
  total_steps = int(config.num_epochs * steps_per_epoch)
  warmup_steps = int(config.maxup.warmup_epochs * steps_per_epoch)
  num_classes = train_data.num_classes

  def build_model(dtype):
    return models.create_model(config.model, num_classes=num_classes, dtype=DTYPES[dtype],
                               remat=config.remat)

  model = build_model(config.dtype)
  selection_model = None
  if config.maxup.selection_dtype and config.maxup.selection_dtype != config.dtype:
    selection_model = build_model(config.maxup.selection_dtype)
  schedule = make_schedule(config, steps_per_epoch)
  init_key, train_key = jax.random.split(jax.random.key(config.seed))

  abstract_variables = jax.eval_shape(
      lambda: model.init(init_key, jnp.zeros((1,) + train_data.image_shape), train=False))
  tx = make_optimizer(config, schedule, abstract_variables)
  state = initial_state(model, tx, train_data.image_shape, init_key, replicated)
  if config.init_checkpoint:
    state = _load_pretrained(state, config.init_checkpoint, replicated)

  manager = checkpointing.create_manager(workdir, max_to_keep=config.keep_checkpoints)
  state = checkpointing.restore_latest(manager, state)
  start_step = int(state.step)
  writer = metrics_lib.MetricWriter(workdir)
  if start_step == 0:
    _write_config(config, workdir)
  else:
    logging.info("Resuming from step %d.", start_step)

  step_kwargs = dict(
      model=model, tx=tx, augmentation=make_augmentation(config, num_classes),
      mode=config.maxup.mode, freeze_batch_norm=config.freeze_batch_norm,
      copies_per_pass=config.maxup.copies_per_pass or None,
      selection_model=selection_model, skip_nonfinite=config.nonfinite == "skip")
  # Two compiled steps: standard augmentation during the MaxUp warm-up, then MaxUp.
  step_fns = {
      m: jax.jit(functools.partial(train_step, num_copies=m, **step_kwargs), donate_argnums=0)
      for m in {1, config.maxup.num_copies}
  }
  mean, std = DATASET_STATS[config.dataset]
  eval_fns = {
      gradient: jax.jit(functools.partial(eval_step, model=model, mean=mean, std=std,
                                          input_gradient=gradient))
      for gradient in (False, True)
  }

  def evaluate(state, data, input_gradient=False):
    sums = None
    for batch in input_pipeline.eval_batches(data, config.eval_batch_size):
      out = eval_fns[input_gradient](state, input_pipeline.to_global_array(batch, data_sharding))
      sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    sums = jax.device_get(sums)
    count = sums.pop("count")
    return {name: total / count for name, total in sums.items()}

  def check_finite(window):
    bad_step = window.first_nonfinite_step()
    if bad_step is not None and config.nonfinite == "stop":
      manager.wait_until_finished()
      raise FloatingPointError(
          f"the loss or gradient became NaN/inf at step {bad_step}; the newest checkpoint, "
          f"step {manager.latest_step()} in {manager.directory}, predates it. Lower the "
          "learning rate, or set nonfinite='skip' to skip such updates.")

  train_batches = input_pipeline.prefetch(input_pipeline.train_batches(
      train_data, config.batch_size, seed=config.seed, start_step=start_step))
  best_top1 = _best_so_far(workdir) if start_step else 0.0
  final, done, steady_start = {}, start_step, None
  started = time.time()
  window = _MetricWindow()
  eval_every = max(1, int(config.eval_every_epochs * steps_per_epoch))
  profiler = _Profiler(workdir, first_step=start_step + 1, num_steps=config.profile_steps)
  with train_batches, preemption.PreemptionWatcher() as watcher, profiler, \
      progress.bar(total=total_steps, initial=start_step, desc="train") as bar:
    for step in range(start_step, total_steps):
      profiler.at(step)
      batch = input_pipeline.to_global_array(next(train_batches), data_sharding)
      num_copies = 1 if step < warmup_steps else config.maxup.num_copies
      state, metrics = step_fns[num_copies](state, batch, jax.random.fold_in(train_key, step))
      if steady_start is None:
        # Throughput is measured from here on, after the first compilation.
        jax.block_until_ready(metrics)
        steady_start = time.time()
      done = step + 1
      window.add(done, metrics)
      bar.update(1)
      preempted = watcher.should_stop(done)

      if done % config.log_every_steps == 0 or done == total_steps or preempted:
        check_finite(window)
        means = window.read()
        means.update(learning_rate=float(schedule(step)), num_copies=num_copies,
                     epoch=done / steps_per_epoch,
                     images_per_second=means.pop("steps") * config.batch_size / means.pop("seconds"))
        writer.write(done, "train", means)
        bar.set_postfix(loss=f"{means['loss']:.3f}", acc=f"{means['accuracy']:.3f}")

      if done % eval_every == 0 or done == total_steps:
        final = evaluate(state, test_data)
        best_top1 = max(best_top1, final["top1"])
        writer.write(done, "test", {**final, "epoch": done / steps_per_epoch})
        if train_eval_data is not None:
          writer.write(done, "train_clean", {
              **evaluate(state, train_eval_data, input_gradient=True),
              "epoch": done / steps_per_epoch})
        bar.write(f"step {done} epoch {done / steps_per_epoch:.2f}: test top-1 "
                  f"{final['top1']:.4f} top-5 {final['top5']:.4f} loss {final['loss']:.4f}")
      if done % config.checkpoint_every_steps == 0 or done == total_steps or preempted:
        check_finite(window)  # Never checkpoint a state that went NaN.
        checkpointing.save(manager, done, state)
      if preempted:
        bar.write(f"preempted: saved step {done} in {manager.directory}; run again to resume.")
        break

  if not final:  # Resumed a finished run, or preempted before any evaluation.
    final = evaluate(state, test_data)
    best_top1 = max(best_top1, final["top1"])
  manager.wait_until_finished()
  manager.close()
  steps_run = done - start_step
  summary = {
      "final_top1": final["top1"],
      "best_top1": best_top1,
      "steps": done,
      "steps_this_run": steps_run,
      "seconds": time.time() - started,
      # Over all steps after the first, evaluation and checkpointing included.
      "images_per_second": ((steps_run - 1) * config.batch_size / (time.time() - steady_start)
                            if steps_run > 1 else None),
      "preempted": done < total_steps,
  }
  writer.write(done, "summary", {k: v for k, v in summary.items() if v is not None})
  writer.close()
  return summary


class _MetricWindow:
  """Step metrics since the last read, summed on device so that steps never wait on the host."""

  _NONE = np.iinfo(np.int32).max

  def __init__(self):
    self._reset()

  def _reset(self):
    self._sums, self._steps, self._start = None, 0, time.time()
    self._first_nonfinite = None

  def add(self, step: int, metrics) -> None:
    bad = jnp.where(metrics["nonfinite"] > 0, step, self._NONE)
    if self._sums is None:
      self._sums, self._first_nonfinite = metrics, bad
    else:
      self._sums = jax.tree.map(jnp.add, self._sums, metrics)
      self._first_nonfinite = jnp.minimum(self._first_nonfinite, bad)
    self._steps += 1

  def first_nonfinite_step(self) -> int | None:
    """Reads (and so waits for) the first step with a NaN/inf since the last read."""
    if self._first_nonfinite is None:
      return None
    step = int(self._first_nonfinite)
    return None if step == self._NONE else step

  def read(self) -> dict:
    """Means over the window, plus `steps` and `seconds`; starts a new window."""
    means = {k: float(v) / self._steps for k, v in jax.device_get(self._sums).items()}
    means.update(steps=self._steps, seconds=time.time() - self._start)
    self._reset()
    return means


class _Profiler:
  """Traces `num_steps` steps from `first_step` on into `workdir/profile` (TensorBoard, Perfetto)."""

  def __init__(self, workdir: str, first_step: int, num_steps: int):
    self._dir = os.path.join(workdir, "profile")
    self._first, self._last = first_step, first_step + num_steps
    self._active = False
    self._enabled = num_steps > 0

  def at(self, step: int) -> None:
    if not self._enabled:
      return
    if step == self._first and not self._active:
      jax.profiler.start_trace(self._dir)
      self._active = True
    elif step == self._last and self._active:
      self.stop()

  def stop(self) -> None:
    if self._active:
      jax.profiler.stop_trace()
      self._active = False

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.stop()


def _best_so_far(workdir: str) -> float:
  """The best test top-1 that earlier runs in this workdir recorded."""
  try:
    records = metrics_lib.read_metrics(workdir)
  except FileNotFoundError:
    return 0.0
  return max((r["top1"] for r in records if r.get("split") == "test"), default=0.0)


def _load_pretrained(state: TrainState, directory: str, replicated) -> TrainState:
  """Takes parameters and BatchNorm statistics from another run's newest checkpoint."""
  restored = checkpointing.load_arrays(directory)
  loaded = {"params": restored["params"], "batch_stats": restored.get("batch_stats", {})}
  expected = {"params": state.params, "batch_stats": state.batch_stats}
  shapes = lambda tree: jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), tree)
  if shapes(loaded) != shapes(expected):
    raise ValueError(
        f"init_checkpoint={directory!r} holds parameters of another model than "
        "config.model; they do not match in structure or shapes.")
  loaded = jax.device_put(loaded, replicated)
  return state.replace(params=loaded["params"], batch_stats=loaded["batch_stats"])


def _write_config(config, workdir):
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
