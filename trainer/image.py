"""Image classification with MaxUp: pure train/eval steps and the task `loop.run` drives.

`train_step` and `eval_step` are pure functions of (state, batch, key); the task
jits them over a one-axis `Mesh('data')` holding every device of every
process. The global batch is sharded along 'data' and parameters are
replicated, so XLA computes BatchNorm statistics over the global batch
(synchronised BatchNorm): the loss trajectory does not depend on the number
of devices.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from maxup_jax import augment as augment_lib
from maxup_jax import losses
from maxup_jax import models
from maxup_jax.maxup import MODES, maxup_loss
from trainer import checkpointing, core, image_batches, image_data, loop
from trainer import metrics as metrics_lib
from trainer.image_data import DatasetFacts

SCHEDULES = ("piecewise", "cosine", "constant")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


# ---------------------------------------------------------------------------
# Configuration checks: every mistake is reported before any data is read.


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises ValueError naming every bad field and what would be valid."""
  errors = core.ConfigErrors()
  errors.one_of("dataset", config.dataset, sorted(image_data.DATASETS))
  try:
    models.create_model(config.model, num_classes=10)
  except ValueError as e:
    errors.check(False, f"model={config.model!r}: {e}")
  errors.one_of("dtype", config.dtype, sorted(core.DTYPES))
  errors.int_at_least("batch_size", config.batch_size, 1)
  errors.divisible_batch("batch_size", config.batch_size, num_devices)
  errors.check(config.num_epochs > 0, f"num_epochs={config.num_epochs}; must be > 0")
  errors.at_least("learning_rate", config.learning_rate, 0)
  errors.one_of("lr_schedule", config.lr_schedule, SCHEDULES)
  errors.at_least("weight_decay", config.weight_decay, 0)
  maxup = config.maxup
  errors.int_at_least("maxup.num_copies", maxup.num_copies, 1, "1 = no MaxUp")
  errors.one_of("maxup.mode", maxup.mode, MODES)
  errors.at_least("maxup.warmup_epochs", maxup.warmup_epochs, 0)
  errors.int_at_least("maxup.copies_per_pass", maxup.copies_per_pass, 1,
                      "num_copies or more = all copies in one vmapped pass")
  errors.check(maxup.copies_per_pass == 1 or num_devices == 1,
               f"maxup.copies_per_pass={maxup.copies_per_pass} vmaps copies together, which XLA "
               f"does not split over the {num_devices} devices; use 1 on several devices")
  errors.one_of("maxup.selection_dtype", maxup.selection_dtype, ("",) + tuple(core.DTYPES))
  aug = config.augment
  errors.at_least("augment.gaussian_sigma", aug.gaussian_sigma, 0)
  errors.at_least("augment.cutout_length", aug.cutout_length, 0, "0 = off")
  errors.at_least("augment.crop_padding", aug.crop_padding, 0, "0 = off")
  errors.check(aug.flip or not aug.crop_padding,
               f"augment.crop_padding={aug.crop_padding} needs augment.flip=True (crop and flip "
               "come together, as in the CIFAR pipeline)")
  errors.at_least("augment.cutmix_alpha", aug.cutmix_alpha, 0, "0 = off")
  errors.at_least("augment.mixup_alpha", aug.mixup_alpha, 0, "0 = off")
  errors.check(not (aug.cutmix_alpha > 0 and aug.mixup_alpha > 0),
               "augment.cutmix_alpha and augment.mixup_alpha are both set; choose one")
  errors.at_least("num_train_examples", config.num_train_examples, 0, "0 = all")
  if config.num_train_examples:
    errors.check(config.num_train_examples >= config.batch_size,
                 f"num_train_examples={config.num_train_examples} is smaller than one batch "
                 f"({config.batch_size})")
  errors.at_least("train_eval_examples", config.train_eval_examples, 0, "0 = off")
  if config.num_train_examples:
    errors.check(config.train_eval_examples <= config.num_train_examples,
                 f"train_eval_examples={config.train_eval_examples} exceeds the "
                 f"num_train_examples={config.num_train_examples} the run trains on")
  errors.at_least("num_eval_examples", config.num_eval_examples, 0, "0 = all")
  if errors.int_at_least("eval_batch_size", config.eval_batch_size, 1):
    errors.divisible_batch("eval_batch_size", config.eval_batch_size, num_devices)
  errors.int_at_least("input_workers", config.input_workers, 0, "0 = in this process")
  loop.check_config(errors, config, num_devices)
  errors.raise_if_any()


# ---------------------------------------------------------------------------
# Pieces built from the config.


def make_augmentation(augment: ml_collections.ConfigDict, dataset: str,
                      num_classes: int) -> augment_lib.Augmentation:
  """The per-copy perturbation P(.|x) of a config's `augment` section, applied on device to
  uint8 images of `dataset` (whose statistics normalise them); returns float32 images.

  CutMix / Mixup come first, so that a copy's partner is a clean example and
  copy i depends on keys[i] alone (the gradient pass swaps every other
  example's key for its winner). Then, as in the papers' pipelines: crop and
  flip on pixels, Gaussian noise in [0, 1] pixel space (where randomized
  smoothing certifies), normalisation, and Cutout, whose zeros are thus the
  dataset mean.

  CutMix only copies whole pixels, so it runs on the uint8 pixels, before
  they become [0, 1] floats: on several devices a partner held by another
  device crosses the interconnect at a quarter of float32's bytes, and the
  result is the same to the bit. Everything else runs on the floats.
  """
  mean, std = image_data.DATASET_STATS[dataset]
  to_unit_float = lambda images, labels: (image_data.to_unit_float(images), labels)
  steps = []
  if augment.cutmix_alpha:
    cutmix = augment_lib.cutmix(augment.cutmix_alpha, num_classes=num_classes)
    steps.append(lambda keys, images, labels: to_unit_float(*cutmix(keys, images, labels)))
  if augment.mixup_alpha:
    steps.append(augment_lib.mixup(augment.mixup_alpha, num_classes=num_classes))
  if augment.flip:
    steps.append(augment_lib.random_crop_flip(augment.crop_padding))
  if augment.gaussian_sigma:
    steps.append(augment_lib.gaussian_noise(augment.gaussian_sigma))
  steps.append(lambda keys, images, labels: (augment_lib.normalize(images, mean, std), labels))
  if augment.cutout_length:
    steps.append(augment_lib.cutout(augment.cutout_length))
  chained = augment_lib.chain(*steps)
  if augment.cutmix_alpha:
    return chained
  return lambda keys, images, labels: chained(keys, *to_unit_float(images, labels))


def make_schedule(*, learning_rate: float, kind: str, num_epochs: float,
                  decay_epochs=(), decay_factor: float = 1.0, warmup_epochs: float = 0.0,
                  steps_per_epoch: int) -> optax.Schedule:
  """The learning rate per step: `kind` in `SCHEDULES` over `num_epochs` epochs.

  "piecewise" multiplies by `decay_factor` at each of `decay_epochs`;
  "cosine" decays to 0 at the end; a linear warm-up from 0 over
  `warmup_epochs` comes first where that is > 0.
  """
  total = int(num_epochs * steps_per_epoch)
  if kind == "piecewise":
    schedule = optax.piecewise_constant_schedule(
        learning_rate, {int(e * steps_per_epoch): decay_factor for e in decay_epochs})
  elif kind == "cosine":
    schedule = optax.cosine_decay_schedule(learning_rate, total)
  else:
    schedule = optax.constant_schedule(learning_rate)
  if warmup_epochs:
    warmup_steps = int(warmup_epochs * steps_per_epoch)
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, learning_rate, warmup_steps), schedule], [warmup_steps])
  return schedule


def make_optimizer(schedule: optax.Schedule, variables, *, weight_decay: float, momentum: float,
                   nesterov: bool, freeze_batch_norm: bool) -> optax.GradientTransformation:
  """SGD with momentum and coupled weight decay, as torch.optim.SGD applies it.

  `variables` (abstract is enough) tells which parameters belong to BatchNorm
  layers: those whose module also owns 'batch_stats'; `freeze_batch_norm`
  keeps their scale and bias fixed (the EfficientNet fine-tuning recipe).
  """
  tx = optax.chain(
      optax.add_decayed_weights(weight_decay),
      optax.sgd(schedule, momentum=momentum, nesterov=nesterov),
  )
  if freeze_batch_norm:
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



# ---------------------------------------------------------------------------
# Pure steps.


def copy_loss_fn(model, augmentation, batch_stats, *, freeze_batch_norm: bool = False):
  """The loss of one augmented copy of a batch, as `maxup_loss` calls it.

  Returns `loss_fn(params, batch, keys) -> (per_example, (new_batch_stats, correct))`
  for a batch {'image': uint8 [B,H,W,C], 'label': int32 [B]} and one
  key per example: the cross-entropy `[B]` of the augmented copy in train mode
  (BatchNorm on the batch's statistics, or with `freeze_batch_norm` on the
  running ones, left unchanged), the updated statistics and top-1 hits `[B]`.
  """

  def loss_fn(params, batch, keys):
    augmented, labels = augmentation(keys, batch["image"], batch["label"])
    variables = {"params": params, "batch_stats": batch_stats}
    if freeze_batch_norm:
      logits = model.apply(variables, augmented, train=False)
      new_stats = batch_stats
    else:
      logits, updates = model.apply(variables, augmented, train=True, mutable=["batch_stats"])
      new_stats = updates["batch_stats"]
    per_example = losses.softmax_cross_entropy(logits, labels)
    return per_example, (new_stats, losses.topk_correct(logits, labels, 1))

  return loss_fn


def train_step(state: TrainState, batch, key, *, model, tx, augmentation, num_copies: int,
               mode: str, freeze_batch_norm: bool = False, selection_model=None,
               skip_nonfinite: bool = False, copies_per_pass: int = 1):
  """One SGD step on the MaxUp loss; `num_copies=1` is standard augmentation.

  Args:
    state: the replicated `TrainState`.
    batch: {'image': uint8 [B,H,W,C], 'label': int32 [B]}, sharded on the batch.
    key: this step's PRNG key (the same on every process).
    selection_model: the model that ranks the copies in two-pass MaxUp, e.g.
      `model` computing in bfloat16; default `model`.
    skip_nonfinite: a step whose loss, gradient or updated weights hold a
      NaN/inf leaves the state unchanged (but for the step counter) instead
      of applying the update.
    copies_per_pass: copies one pass evaluates (`maxup_loss`): 1 partitions
      over the sharded batch; k > 1 vmaps k copies per pass.

  Returns:
    (new_state, metrics) with scalar metrics: `loss` (mean worst-copy loss),
    `mean_copy_loss` (mean over all copies, i.e. what plain augmentation
    would report), `accuracy` (on the trained copies), `grad_norm` and
    `nonfinite` (1.0 if this step's loss, gradient or updated weights hold
    a NaN/inf).
  """
  make_loss_fn = lambda model: copy_loss_fn(model, augmentation, state.batch_stats,
                                            freeze_batch_norm=freeze_batch_norm)
  select = None
  if selection_model is not None and mode == "two_pass":
    select = make_loss_fn(selection_model)

  def objective(params):
    return maxup_loss(make_loss_fn(model), params, batch, key, num_copies, has_aux=True,
                      mode=mode, selection_loss_fn=select,
                      copies_per_pass=copies_per_pass)

  (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  new_stats, correct = aux.loss_aux
  if mode == "single_pass":
    # One set of statistics per copy: average the copies' running averages.
    new_stats = jax.tree.map(lambda s: s.mean(axis=0), new_stats)
    correct = jnp.take_along_axis(correct, aux.selected_copy[None], axis=0)[0]
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(grads)
  new_state, nonfinite = core.guard_nonfinite(
      state, state.replace(step=state.step + 1, params=params, batch_stats=new_stats,
                           opt_state=opt_state),
      loss, grad_norm, skip_nonfinite)
  metrics = {
      "loss": loss,
      "mean_copy_loss": aux.copy_losses.mean(),
      "accuracy": correct.astype(jnp.float32).mean(),
      "grad_norm": grad_norm,
      "nonfinite": nonfinite,
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

  pixels = image_data.to_unit_float(batch["image"])
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


@dataclasses.dataclass(frozen=True)
class Steps(core.Steps):
  """`core.Steps` of an image classifier.

  Attributes:
    model: the model in `config.dtype`.
    selection_model: the model ranking MaxUp's copies (`maxup.selection_dtype`), or None.
    tx: the optimizer.
    schedule: the learning-rate schedule.
    facts: the dataset facts the steps were built for.
    steps_per_epoch: full global batches per epoch.
    eval_steps: input_gradient (False / True) -> jitted `eval_step(state, batch)`.

  `train_steps[m]` is `train_step(state, batch, key)`.
  """

  model: Any
  selection_model: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  facts: DatasetFacts
  steps_per_epoch: int
  eval_steps: dict

  def abstract_batch(self, batch_size: int, eval: bool = False) -> dict:
    """A training (or, with `eval`, an evaluation) batch as sharded `ShapeDtypeStruct`s."""
    shape = (batch_size,) + tuple(self.facts.image_shape)
    batch = {"image": jax.ShapeDtypeStruct(shape, jnp.uint8),
             "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}
    if eval:
      batch["mask"] = jax.ShapeDtypeStruct((batch_size,), jnp.bool_)
    return core.abstract(batch, self.data_sharding)


def build_model(config, num_classes: int, dtype: str | None = None):
  """`config.model` for `num_classes`, computing in `dtype` (default `config.dtype`)."""
  return models.create_model(config.model, num_classes=num_classes,
                             dtype=core.DTYPES[dtype or config.dtype], remat=config.remat)


def build_steps(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                facts: DatasetFacts) -> Steps:
  """The model, optimizer, abstract state and jitted steps `config` trains with on `mesh`.

  Pure: reads no data and computes nothing on device (the weights come from
  `Steps.init_state`). The state is replicated and batches are split along
  the mesh's 'data' axis.
  """
  steps_per_epoch = image_batches.steps_per_epoch(facts.num_train_examples, config.batch_size)
  model = build_model(config, facts.num_classes)
  selection_model = None
  if config.maxup.selection_dtype and config.maxup.selection_dtype != config.dtype:
    selection_model = build_model(config, facts.num_classes, config.maxup.selection_dtype)
  schedule = make_schedule(
      learning_rate=config.learning_rate, kind=config.lr_schedule, num_epochs=config.num_epochs,
      decay_epochs=config.lr_decay_epochs, decay_factor=config.lr_decay_factor,
      warmup_epochs=config.lr_warmup_epochs, steps_per_epoch=steps_per_epoch)
  init_key, train_key = core.split_seed(config.seed)
  image_shape = tuple(facts.image_shape)
  init_variables = lambda: model.init(init_key, jnp.zeros((1,) + image_shape, jnp.float32),
                                      train=False)
  tx = make_optimizer(schedule, jax.eval_shape(init_variables), weight_decay=config.weight_decay,
                      momentum=config.momentum, nesterov=config.nesterov,
                      freeze_batch_norm=config.freeze_batch_norm)

  def init_fn() -> TrainState:
    variables = init_variables()
    return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                      batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(variables["params"]))

  step_kwargs = dict(
      model=model, tx=tx,
      augmentation=make_augmentation(config.augment, config.dataset, facts.num_classes),
      mode=config.maxup.mode, freeze_batch_norm=config.freeze_batch_norm,
      copies_per_pass=config.maxup.copies_per_pass,
      selection_model=selection_model, skip_nonfinite=config.nonfinite == "skip")
  train_steps = {
      m: jax.jit(functools.partial(train_step, num_copies=m, **step_kwargs), donate_argnums=0)
      for m in {1, config.maxup.num_copies}
  }
  mean, std = image_data.DATASET_STATS[config.dataset]
  eval_steps = {
      gradient: jax.jit(functools.partial(eval_step, model=model, mean=mean, std=std,
                                          input_gradient=gradient))
      for gradient in (False, True)
  }
  return Steps(
      init_fn=init_fn, abstract_state=core.abstract(jax.eval_shape(init_fn), core.replicated(mesh)),
      data_sharding=core.data_sharding(mesh), init_key=init_key, train_key=train_key,
      train_steps=train_steps, model=model, selection_model=selection_model, tx=tx,
      schedule=schedule, facts=facts, steps_per_epoch=steps_per_epoch, eval_steps=eval_steps)


class ImageTask(loop.Task):
  """Image classification as `loop.run` drives it: the recipe of `config`."""

  unit = "images"

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    mesh = loop.create_mesh(config)
    validate_config(config, mesh.size)
    self.config, self.workdir = config, workdir

    data_dir = config.data_dir or None
    self.train_data = image_data.load_dataset(
        config.dataset, "train", data_dir, num_examples=config.num_train_examples or None)
    self.test_data = image_data.load_dataset(
        config.dataset, image_data.eval_split(config.dataset), data_dir,
        num_examples=config.num_eval_examples or None)
    # The same first examples every time, un-augmented: how well the run fits
    # what it trains on, and how steep its loss is there.
    self.train_eval_data = None
    if config.train_eval_examples:
      self.train_eval_data = image_data.load_dataset(
          config.dataset, "train", data_dir, num_examples=config.train_eval_examples)
    steps = build_steps(config, mesh, DatasetFacts(
        num_classes=self.train_data.num_classes, image_shape=tuple(self.train_data.image_shape),
        num_train_examples=self.train_data.num_examples,
        num_eval_examples=self.test_data.num_examples))
    self.data_sharding = steps.data_sharding
    self.steps_per_epoch = steps.steps_per_epoch
    self.total_steps = int(config.num_epochs * self.steps_per_epoch)
    self.warmup_steps = int(config.maxup.warmup_epochs * self.steps_per_epoch)
    self.eval_every = max(1, int(config.eval_every_epochs * self.steps_per_epoch))
    self.schedule, self.train_key = steps.schedule, steps.train_key
    self.state = steps.init_state()
    if config.init_checkpoint:
      self.state = _load_pretrained(self.state, config.init_checkpoint, steps.replicated)
    # Two compiled steps: standard augmentation during the MaxUp warm-up, then MaxUp.
    self.step_fns = steps.train_steps
    self.eval_fns = steps.eval_steps
    # Saved with every checkpoint and repositioned by the restore.
    self.data_iterator = image_batches.train_iterator(
        self.train_data, config.batch_size, seed=config.seed, num_workers=config.input_workers)
    self.final, self.best_top1 = {}, 0.0

  def checkpoint_tree(self) -> TrainState:
    return self.state

  def restore(self, tree: TrainState) -> int:
    self.state = tree
    start_step = int(tree.step)
    if start_step:
      logging.info("Resuming from step %d.", start_step)
      self.best_top1 = _best_so_far(self.workdir)
    return start_step

  def finished(self, step: int) -> bool:
    return step >= self.total_steps

  def num_copies(self, step: int) -> int:
    return 1 if step < self.warmup_steps else self.config.maxup.num_copies

  def train_step(self, step: int):
    batch = image_batches.to_global_array(next(self.data_iterator), self.data_sharding)
    self.state, metrics = self.step_fns[self.num_copies(step)](
        self.state, batch, jax.random.fold_in(self.train_key, step))
    return metrics, {"images": self.config.batch_size}

  def train_record(self, means: dict, step: int) -> dict:
    return {**means, "learning_rate": float(self.schedule(step - 1)),
            "num_copies": self.num_copies(step - 1), "epoch": step / self.steps_per_epoch}

  def evaluate(self, data, input_gradient: bool = False) -> dict:
    sums = None
    for batch in image_batches.eval_batches(data, self.config.eval_batch_size):
      out = self.eval_fns[input_gradient](
          self.state, image_batches.to_global_array(batch, self.data_sharding))
      sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    sums = jax.device_get(sums)
    count = sums.pop("count")
    return {name: total / count for name, total in sums.items()}

  def after_step(self, step: int, out: loop.Output) -> bool:
    if step % self.eval_every == 0 or step == self.total_steps:
      epoch = step / self.steps_per_epoch
      self.final = self.evaluate(self.test_data)
      self.best_top1 = max(self.best_top1, self.final["top1"])
      out.write(step, "test", {**self.final, "epoch": epoch})
      if self.train_eval_data is not None:
        out.write(step, "train_clean",
                  {**self.evaluate(self.train_eval_data, input_gradient=True), "epoch": epoch})
      out.echo(f"step {step} epoch {epoch:.2f}: test top-1 {self.final['top1']:.4f} "
               f"top-5 {self.final['top5']:.4f} loss {self.final['loss']:.4f}")
    return False

  def summary(self, out: loop.Output, preempted: bool) -> dict:
    if not self.final:  # Resumed a finished run, or preempted before any evaluation.
      self.final = self.evaluate(self.test_data)
      self.best_top1 = max(self.best_top1, self.final["top1"])
    return {"final_top1": self.final["top1"], "best_top1": self.best_top1}

  def close(self) -> None:
    self.data_iterator.close()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains and evaluates as `config` says; everything written goes under `workdir`.

  Restarting with the same config and workdir resumes from the newest
  checkpoint with the same data order and random stream. A SIGTERM makes
  every process checkpoint the same step and return early (`preempted`).

  Returns:
    A summary dict: final and best test top-1, steps, wall time, images/s.

  Raises:
    FloatingPointError: the loss or gradient became NaN/inf (unless
      `config.nonfinite == "skip"`); the message names the step and the
      newest checkpoint, which predates it.
  """
  return loop.run(ImageTask(config, workdir), config, workdir)


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
