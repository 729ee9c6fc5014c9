"""Word- and character-level language modelling with MaxUp: AWD-LSTM and NT-ASGD.

The recipe is AWD-LSTM's (Merity, Keskar & Socher, 2018) and the MaxUp
experiment of section 4.3 of the paper:

* The training text is cut into B parallel streams, walked in segments of
  random length (base `bptt`, halved with probability 1 - p, Gaussian
  jitter); the learning rate of a step is scaled by its length / bptt and
  the hidden state is carried from segment to segment within an epoch.
* A stream is MaxUp's "example": `maxup_loss` gives each stream one key per
  copy, the model draws that stream's embedding-dropout and locked-dropout
  masks from it, and the stream is trained on its worst copy. The hidden
  state carried on is the one of the gradient pass, i.e. of the winning
  copies. DropConnect masks come from the step's key, shared by all copies.
* Optimisation is SGD with gradient clipping and weight decay, switching to
  averaged SGD when the validation loss has not improved on the best one
  from before the last `nonmono` evaluations (NT-ASGD); then fine-tuning
  restarts ASGD from the best averaged weights, `finetune.num_restarts`
  times, each restart ending on the same non-monotone criterion. The
  average and the NT-ASGD bookkeeping are part of the checkpoint, so a
  resumed run continues exactly.
* Validation and test perplexity use the weights of the best validation
  loss (the averaged ones once averaging started), test at batch size 1;
  dynamic evaluation (Krause et al., 2018) can follow.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time
from typing import Any, NamedTuple, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from maxup_jax import dynamic_eval
from maxup_jax.maxup import MODES, maxup_loss
from maxup_jax.models import awd_lstm
from trainer import checkpointing, text_data
from trainer import mesh as mesh_lib
from trainer import metrics as metrics_lib
from trainer import progress as progress_lib

# Words per chunk of the chunked output-layer loss (awd_lstm.sequence_loss_chunked); 0 computes
# the full [B, T, V] logits instead (awd_lstm.sequence_loss). Set by config.vocab_chunk_size.
DEFAULT_VOCAB_CHUNK_SIZE = 1024

MODEL_FIELDS = ("embed_dim", "hidden_dim", "num_layers", "tie_weights", "embed_dropout",
                "input_dropout", "hidden_dropout", "output_dropout", "weight_dropout")


@flax.struct.dataclass
class TrainState:
  """Everything on device that a resumed run needs.

  Attributes:
    step: optimiser steps taken, over all phases.
    params: the SGD iterate.
    avg_params: the running mean of the iterates since averaging began;
      equal to `params` before. Evaluation always uses these.
    avg_count: iterates in the average (0 before averaging).
    averaging: whether ASGD is on.
    best_params: the evaluated weights with the best validation loss so far.
    carry: the hidden state carried to the next training segment, `[B, ...]`.
  """

  step: jax.Array
  params: Any
  avg_params: Any
  avg_count: jax.Array
  averaging: jax.Array
  best_params: Any
  carry: Any


@dataclasses.dataclass(frozen=True)
class Progress:
  """Where the run is in its phases and epochs, and what NT-ASGD has seen.

  Attributes:
    phase: 0 for SGD / ASGD, k >= 1 for the k-th fine-tuning restart.
    epoch: global epoch index over all phases; it seeds the epoch's segment lengths.
    phase_epochs: epochs finished in this phase.
    segment: the next training segment of the current epoch.
    history: the validation losses NT-ASGD compares against, this phase.
    best_val_loss: the best validation loss of the run.
    finished: training is over (the final evaluation may still be due).
  """

  phase: int = 0
  epoch: int = 0
  phase_epochs: int = 0
  segment: int = 0
  history: tuple[float, ...] = ()
  best_val_loss: float = math.inf
  finished: bool = False


class Transition(NamedTuple):
  """What the end of an epoch does to the train state."""

  improved: bool  # The evaluated weights become best_params.
  start_averaging: bool  # SGD -> ASGD.
  restart: bool  # Next fine-tuning phase: ASGD afresh from best_params.


# ---------------------------------------------------------------------------
# Configuration checks: every mistake is reported before any data is read.


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises ValueError naming every bad field and what would be valid."""
  errors = []

  def check(ok, message):
    if not ok:
      errors.append(message)

  def positive_int(value):
    return isinstance(value, int) and not isinstance(value, bool) and value > 0

  check(config.dataset in text_data.DATASETS,
        f"dataset={config.dataset!r}; valid: {sorted(text_data.DATASETS)}")
  check(bool(config.data_dir), "data_dir is empty; give the corpus directory (or file)")
  unknown = set(config.model.keys()) - set(MODEL_FIELDS)
  check(not unknown, f"model has unknown fields {sorted(unknown)}; valid: {list(MODEL_FIELDS)}")
  if not unknown:
    try:
      awd_lstm.AWDLSTM(vocab_size=2, **config.model)
    except (TypeError, ValueError) as e:
      errors.append(f"model: {e}")
  for name in ("batch_size", "eval_batch_size", "test_batch_size", "bptt", "min_seq_len",
               "seq_len_bucket", "num_epochs", "nonmono", "log_every_steps",
               "checkpoint_every_steps"):
    check(positive_int(config[name]), f"{name}={config[name]!r}; must be a positive int")
  if positive_int(config.batch_size):
    check(config.batch_size % num_devices == 0,
          f"batch_size={config.batch_size} is not divisible by the {num_devices} devices; "
          f"use a multiple of {num_devices}")
  check(config.bptt_std >= 0, f"bptt_std={config.bptt_std}; must be >= 0")
  check(0 < config.bptt_full_probability <= 1,
        f"bptt_full_probability={config.bptt_full_probability}; must be in (0, 1]")
  check(config.learning_rate > 0, f"learning_rate={config.learning_rate}; must be > 0")
  check(config.clip_grad_norm >= 0,
        f"clip_grad_norm={config.clip_grad_norm}; must be >= 0 (0 = no clipping)")
  check(config.weight_decay >= 0, f"weight_decay={config.weight_decay}; must be >= 0")
  check(config.activation_reg >= 0, f"activation_reg={config.activation_reg}; must be >= 0")
  check(config.temporal_activation_reg >= 0,
        f"temporal_activation_reg={config.temporal_activation_reg}; must be >= 0")
  check(isinstance(config.finetune.num_restarts, int) and config.finetune.num_restarts >= 0,
        f"finetune.num_restarts={config.finetune.num_restarts!r}; must be an int >= 0")
  check(positive_int(config.finetune.num_epochs),
        f"finetune.num_epochs={config.finetune.num_epochs!r}; must be a positive int")
  maxup = config.maxup
  check(positive_int(maxup.num_copies),
        f"maxup.num_copies={maxup.num_copies!r}; must be an int >= 1 (1 = no MaxUp)")
  check(maxup.mode in MODES, f"maxup.mode={maxup.mode!r}; valid: {list(MODES)}")
  dyn = config.dynamic_eval
  if dyn.enabled:
    for name in ("learning_rate", "decay", "epsilon"):
      check(dyn[name] > 0, f"dynamic_eval.{name}={dyn[name]}; must be > 0")
    for name in ("seq_len", "stats_batch_size"):
      check(positive_int(dyn[name]), f"dynamic_eval.{name}={dyn[name]!r}; must be a positive int")
    check(dyn.stats_max_segments >= 0,
          f"dynamic_eval.stats_max_segments={dyn.stats_max_segments}; must be >= 0 (0 = all)")
  chunk = config.get("vocab_chunk_size", DEFAULT_VOCAB_CHUNK_SIZE)
  check(isinstance(chunk, int) and not isinstance(chunk, bool) and chunk >= 0,
        f"vocab_chunk_size={chunk!r}; must be an int >= 0 (0 = full logits)")
  check(config.num_train_tokens >= 0,
        f"num_train_tokens={config.num_train_tokens}; must be >= 0 (0 = all)")
  check(config.num_eval_tokens >= 0,
        f"num_eval_tokens={config.num_eval_tokens}; must be >= 0 (0 = all)")
  if errors:
    raise ValueError("invalid config:\n  " + "\n  ".join(errors))


def create_model(config, vocab_size: int) -> awd_lstm.AWDLSTM:
  return awd_lstm.AWDLSTM(vocab_size=vocab_size, **config.model)


# ---------------------------------------------------------------------------
# NT-ASGD: pure bookkeeping on the host.


def nt_asgd_triggered(history: Sequence[float], val_loss: float, nonmono: int) -> bool:
  """AWD-LSTM's non-monotone criterion.

  True when `val_loss` is worse than the best of the losses evaluated before
  the last `nonmono` ones: `len(history) > nonmono and val_loss >
  min(history[:-nonmono])`.
  """
  return len(history) > nonmono and val_loss > min(history[:-nonmono])


def end_of_epoch(progress: Progress, val_loss: float, *, averaging: bool, num_epochs: int,
                 finetune_epochs: int, num_restarts: int,
                 nonmono: int) -> tuple[Progress, Transition]:
  """The NT-ASGD decisions after an epoch's validation loss.

  Phase 0 (AWD-LSTM's main.py): SGD until the non-monotone criterion fires,
  then ASGD until `num_epochs` epochs; the history only grows during SGD.
  Fine-tuning phases (finetune.py): ASGD from the best weights, ending when
  the criterion fires or after `finetune_epochs` epochs. The best
  validation loss carries across phases, as the saved model does in AWD-LSTM.
  """
  phase_epochs = progress.phase_epochs + 1
  history = progress.history
  start_averaging = False
  if progress.phase == 0:
    if not averaging:
      start_averaging = nt_asgd_triggered(history, val_loss, nonmono)
      history = history + (val_loss,)
    phase_over = phase_epochs >= num_epochs
  else:
    phase_over = nt_asgd_triggered(history, val_loss, nonmono) or phase_epochs >= finetune_epochs
    history = history + (val_loss,)
  restart = phase_over and progress.phase < num_restarts
  transition = Transition(improved=val_loss < progress.best_val_loss,
                          start_averaging=start_averaging and not restart, restart=restart)
  new = Progress(
      phase=progress.phase + int(restart),
      epoch=progress.epoch + 1,
      phase_epochs=0 if restart else phase_epochs,
      segment=0,
      history=() if restart else history,
      best_val_loss=min(progress.best_val_loss, val_loss),
      finished=phase_over and not restart,
  )
  return new, transition


def apply_transition(state: TrainState, improved, start_averaging, restart,
                     initial_carry) -> TrainState:
  """The state after an epoch: new best weights, ASGD switch, fine-tuning restart.

  Every parameter tree of the result is computed afresh (`jnp.where`), never
  forwarded from another field, so no two fields share a buffer and the state
  can be donated to the next step.
  """
  pick = lambda flag, a, b: jax.tree.map(lambda x, y: jnp.where(flag, x, y), a, b)
  best = pick(improved, state.avg_params, state.best_params)
  params = pick(restart, best, state.params)
  averaging = state.averaging | start_averaging | restart
  fresh_average = start_averaging | restart
  return state.replace(
      params=params,
      avg_params=pick(fresh_average, params, state.avg_params),
      avg_count=jnp.where(fresh_average, 0, state.avg_count),
      averaging=averaging,
      best_params=best,
      carry=jax.tree.map(jnp.zeros_like, initial_carry),
  )


# ---------------------------------------------------------------------------
# Pure steps.


def initial_train_state(model, batch_size: int, init_key) -> TrainState:
  """Fresh weights from `init_key`, no average yet, zero hidden state of `batch_size` streams."""
  carry = model.initial_carry(batch_size)
  params = model.init(init_key, jnp.zeros((1, 1), jnp.int32), model.initial_carry(1))["params"]
  # Separate buffers for every parameter tree, so the state can be donated.
  copy = lambda tree: jax.tree.map(lambda x: x + 0, tree)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, avg_params=copy(params),
                    avg_count=jnp.zeros((), jnp.int32), averaging=jnp.zeros((), bool),
                    best_params=copy(params), carry=carry)


def train_step(state: TrainState, batch, length, key, *, model, num_copies: int, mode: str,
               learning_rate: float, bptt: int, clip_grad_norm: float, weight_decay: float,
               activation_reg: float, temporal_activation_reg: float,
               vocab_chunk_size: int = DEFAULT_VOCAB_CHUNK_SIZE):
  """One (A)SGD step on the MaxUp loss of a segment; `num_copies=1` is plain AWD-LSTM.

  Args:
    state: the `TrainState`.
    batch: {'inputs', 'targets': int32 [B, T]}, the segment zero-padded to T.
    length: the segment's real length (scalar); the learning rate is
      `learning_rate * length / bptt`, as AWD-LSTM scales it.
    key: this step's PRNG key.
    vocab_chunk_size: > 0: the loss never holds the `[B, T, V]` logits
      (`awd_lstm.sequence_loss_chunked`, this many words at a time, in the
      selection and the gradient passes); 0: `awd_lstm.sequence_loss` on the
      full logits. Same values up to float rounding.

  Returns:
    (new_state, metrics): summed-friendly scalars `loss` (mean worst-copy
    loss, AR/TAR included), `nll` (token NLL of the trained copies),
    `mean_copy_loss`, `grad_norm` (before clipping).
  """
  maxup_key, weight_key = jax.random.split(key)

  def loss_fn(params, batch, keys):
    output = model.apply({"params": params}, batch["inputs"], batch["carry"], length=length,
                         dropout_keys=keys, weight_dropout_key=weight_key,
                         compute_logits=not vocab_chunk_size)
    regularisers = dict(activation_reg=activation_reg,
                        temporal_activation_reg=temporal_activation_reg)
    if vocab_chunk_size:
      losses, nll = awd_lstm.sequence_loss_chunked(
          output, model.decoder_params(params), batch["targets"], length,
          vocab_chunk_size=vocab_chunk_size, **regularisers)
    else:
      losses, nll = awd_lstm.sequence_loss(output, batch["targets"], length, **regularisers)
    return losses, (output.carry, nll)

  def objective(params):
    return maxup_loss(loss_fn, params, {**batch, "carry": state.carry}, maxup_key, num_copies,
                      has_aux=True, mode=mode)

  (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  carry, nll = aux.loss_aux
  if mode == "single_pass":
    # Every copy carried gradient; keep each stream's winning copy.
    streams = jnp.arange(nll.shape[-1])
    carry = jax.tree.map(lambda x: x[aux.selected_copy, streams], carry)
    nll = nll[aux.selected_copy, streams]

  # The loss gradient is clipped to norm <= clip_grad_norm first, and torch.optim.SGD's
  # coupled weight decay added after, as in AWD-LSTM: d = clip(g) + weight_decay * theta.
  grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
  clip_scale = jnp.minimum(1.0, clip_grad_norm / grad_norm) if clip_grad_norm else 1.0
  step_size = learning_rate * length / bptt
  params = jax.tree.map(lambda p, g: p - step_size * (clip_scale * g + weight_decay * p),
                        state.params, grads)

  # ASGD with AWD-LSTM's t0=0, lambd=0: plain SGD plus a uniform average of the iterates.
  avg_count = state.avg_count + state.averaging.astype(jnp.int32)
  weight = 1.0 / jnp.maximum(avg_count, 1).astype(jnp.float32)
  avg_params = jax.tree.map(
      lambda a, p: jnp.where(state.averaging, a + (p - a) * weight, p), state.avg_params, params)

  metrics = {
      "loss": loss,
      "nll": jnp.mean(nll),
      "mean_copy_loss": aux.copy_losses.mean(),
      "grad_norm": grad_norm,
  }
  new_state = state.replace(step=state.step + 1, params=params, avg_params=avg_params,
                            avg_count=avg_count, carry=jax.lax.stop_gradient(carry))
  return new_state, metrics


def segment_nll(model, params, carry, segment, vocab_chunk_size: int = DEFAULT_VOCAB_CHUNK_SIZE):
  """(nll_sum, num_tokens, carry) of one segment {'inputs', 'targets', 'length'}, no dropout.

  `vocab_chunk_size` as in `train_step`: > 0 never holds the `[B, T, V]` logits.
  """
  output = model.apply({"params": params}, segment["inputs"], carry, length=segment["length"],
                       compute_logits=not vocab_chunk_size)
  if vocab_chunk_size:
    nll = awd_lstm.token_nll_chunked(output.dropped_hidden, model.decoder_params(params),
                                     segment["targets"], vocab_chunk_size, segment["length"])
  else:
    nll = awd_lstm.token_nll(output.logits, segment["targets"])
  nll_sum, count = awd_lstm.masked_nll_sum(nll, segment["length"])
  return nll_sum, count, output.carry


def evaluate_segments(params, segments, *, model, batch_size: int,
                      vocab_chunk_size: int = DEFAULT_VOCAB_CHUNK_SIZE):
  """Summed NLL and token count over stacked segments `[N, B, T]`, state carried through."""

  def step(acc, segment):
    carry, total, count = acc
    nll_sum, n, carry = segment_nll(model, params, carry, segment, vocab_chunk_size)
    return (carry, total + nll_sum, count + n), None

  init = (model.initial_carry(batch_size), jnp.zeros(()), jnp.zeros(()))
  (_, total, count), _ = jax.lax.scan(step, init, segments)
  return total, count


def dynamic_segment_loss(model, params, carry, segment):
  """The `segment_loss` of `maxup_jax.dynamic_eval` (after binding `model`): mean token NLL."""
  nll_sum, count, carry = segment_nll(model, params, carry, segment)
  return nll_sum / count, (carry, nll_sum, count)


def dynamic_gradient_stats(params, carry, segments, *, model, decay: float):
  return dynamic_eval.collect_gradient_stats(
      functools.partial(dynamic_segment_loss, model), params, carry, segments, decay)


def dynamic_evaluate(params, carry, segments, stats, *, model, learning_rate: float,
                     decay: float, epsilon: float):
  return dynamic_eval.evaluate(
      functools.partial(dynamic_segment_loss, model), params, carry, segments, stats,
      learning_rate=learning_rate, decay=decay, epsilon=epsilon)


# Compiled once per process for each model and hyper-parameters (static
# arguments), so runs that share them, e.g. a resumed run, reuse the compilation.
_TRAIN_STEP_STATICS = ("model", "num_copies", "mode", "learning_rate", "bptt", "clip_grad_norm",
                       "weight_decay", "activation_reg", "temporal_activation_reg",
                       "vocab_chunk_size")
_train_step = jax.jit(train_step, static_argnames=_TRAIN_STEP_STATICS, donate_argnums=0)
_apply_transition = jax.jit(apply_transition, donate_argnums=0)
_evaluate_segments = jax.jit(evaluate_segments,
                             static_argnames=("model", "batch_size", "vocab_chunk_size"))
_dynamic_gradient_stats = jax.jit(dynamic_gradient_stats, static_argnames=("model", "decay"))
_dynamic_evaluate = jax.jit(dynamic_evaluate,
                            static_argnames=("model", "learning_rate", "decay", "epsilon"))


def make_train_step(config, model, num_copies: int | None = None):
  """The jitted `train_step` with `config`'s hyper-parameters, as `train_and_evaluate` runs it.

  Call it as `step_fn(state, batch, length, key)`; the state is donated.
  `num_copies` overrides `config.maxup.num_copies` (1 gives the plain step).
  """
  return functools.partial(
      _train_step, model=model,
      num_copies=config.maxup.num_copies if num_copies is None else num_copies,
      mode=config.maxup.mode, learning_rate=float(config.learning_rate), bptt=config.bptt,
      clip_grad_norm=float(config.clip_grad_norm), weight_decay=float(config.weight_decay),
      activation_reg=float(config.activation_reg),
      temporal_activation_reg=float(config.temporal_activation_reg),
      vocab_chunk_size=configured_vocab_chunk_size(config))


def configured_vocab_chunk_size(config) -> int:
  """`config.vocab_chunk_size` if set, else `DEFAULT_VOCAB_CHUNK_SIZE`."""
  return int(config.get("vocab_chunk_size", DEFAULT_VOCAB_CHUNK_SIZE))


# ---------------------------------------------------------------------------
# The loop.


def _global_array(host: np.ndarray, sharding) -> jax.Array:
  # Every process holds the whole (small) corpus and fills its own shards.
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _progress_tree(progress: Progress, history_size: int, replicated) -> dict:
  history = np.full((history_size,), np.inf, np.float32)
  history[:len(progress.history)] = progress.history
  host = {
      "phase": np.int32(progress.phase), "epoch": np.int32(progress.epoch),
      "phase_epochs": np.int32(progress.phase_epochs), "segment": np.int32(progress.segment),
      "history": history, "num_evals": np.int32(len(progress.history)),
      "best_val_loss": np.float32(progress.best_val_loss),
      "finished": np.int32(progress.finished),
  }
  return {k: _global_array(np.asarray(v), replicated) for k, v in host.items()}


def _progress_from_tree(tree: dict) -> Progress:
  tree = jax.device_get(tree)
  return Progress(
      phase=int(tree["phase"]), epoch=int(tree["epoch"]), phase_epochs=int(tree["phase_epochs"]),
      segment=int(tree["segment"]),
      history=tuple(float(x) for x in tree["history"][:int(tree["num_evals"])]),
      best_val_loss=float(tree["best_val_loss"]), finished=bool(tree["finished"]))


def epoch_segments(config, stream_length: int, epoch: int) -> np.ndarray:
  """The `[N, 2]` (start, length) segments of global epoch `epoch`, a function of (seed, epoch)."""
  rng = np.random.default_rng([config.seed, epoch])
  return text_data.bptt_segments(
      stream_length, rng, bptt=config.bptt, full_probability=config.bptt_full_probability,
      std=config.bptt_std, min_length=config.min_seq_len)


def load_corpus(config) -> text_data.Corpus:
  corpus = text_data.load_corpus(config.dataset, config.data_dir)
  if config.num_train_tokens or config.num_eval_tokens:
    cut = lambda x, n: x[:n] if n else x
    corpus = dataclasses.replace(
        corpus, train=cut(corpus.train, config.num_train_tokens),
        valid=cut(corpus.valid, config.num_eval_tokens),
        test=cut(corpus.test, config.num_eval_tokens))
  return corpus


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains and evaluates as `config` says; everything written goes under `workdir`.

  Restarting with the same config and workdir resumes from the newest
  checkpoint: the segment lengths and every step's key are functions of
  (seed, epoch, step), and the carried hidden state, the average and the
  NT-ASGD history are in the checkpoint.

  Returns:
    A summary dict: validation and test perplexity of the best weights (and
    after dynamic evaluation if enabled), steps, epochs, time, tokens/s.
  """
  mesh = mesh_lib.create_mesh(config.num_devices)
  validate_config(config, mesh.size)
  data_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  corpus = load_corpus(config)
  train_streams = text_data.batchify(corpus.train, config.batch_size)
  stream_length = train_streams.shape[1]
  model = create_model(config, corpus.vocab_size)
  root_key = jax.random.key(config.seed)
  init_key, train_key = jax.random.split(root_key)

  def init():
    return initial_train_state(model, config.batch_size, init_key)

  abstract = jax.eval_shape(init)
  state_shardings = abstract.replace(
      step=replicated, params=jax.tree.map(lambda _: replicated, abstract.params),
      avg_params=jax.tree.map(lambda _: replicated, abstract.params), avg_count=replicated,
      averaging=replicated, best_params=jax.tree.map(lambda _: replicated, abstract.params),
      carry=jax.tree.map(lambda _: data_sharding, abstract.carry))
  state = jax.jit(init, out_shardings=state_shardings)()
  param_count = awd_lstm.num_params(state.params)

  max_epochs = config.num_epochs + config.finetune.num_restarts * config.finetune.num_epochs
  history_size = max(config.num_epochs, config.finetune.num_epochs) + 1
  manager = checkpointing.create_manager(workdir, max_to_keep=config.keep_checkpoints)
  restored = checkpointing.restore_latest(
      manager, {"state": state, "progress": _progress_tree(Progress(), history_size, replicated)})
  state = restored["state"]
  progress = _progress_from_tree(restored["progress"])
  start_step = int(state.step)
  writer = metrics_lib.MetricWriter(workdir)
  if start_step == 0:
    _write_config(config, workdir)
    writer.write(0, "model", {"num_params": param_count, "vocab_size": corpus.vocab_size,
                              "train_tokens": len(corpus.train)})
  else:
    logging.info("Resuming from step %d (epoch %d, phase %d).", start_step, progress.epoch,
                 progress.phase)

  step_fn = make_train_step(config, model)
  initial_carry = jax.jit(lambda: model.initial_carry(config.batch_size),
                          out_shardings=state_shardings.carry)()

  eval_sets = {
      "valid": _stacked(corpus.valid, config.eval_batch_size, config.bptt, replicated),
      "test": _stacked(corpus.test, config.test_batch_size, config.bptt, replicated),
  }
  eval_batch_sizes = {"valid": config.eval_batch_size, "test": config.test_batch_size}

  def evaluate(params, split):
    total, count = jax.device_get(_evaluate_segments(
        params, eval_sets[split], model=model, batch_size=eval_batch_sizes[split],
        vocab_chunk_size=configured_vocab_chunk_size(config)))
    loss = float(total / count)
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_token": loss / math.log(2)}

  def save(step, state, progress):
    tree = {"state": state, "progress": _progress_tree(progress, history_size, replicated)}
    checkpointing.save(manager, step, tree)

  total_steps = sum(len(epoch_segments(config, stream_length, e)) for e in range(max_epochs))
  started = time.time()
  steady_start = tokens_since_steady = None
  window = _Window()
  step = start_step  # Counted on the host: reading state.step would wait for every step.
  with progress_lib.bar(total=total_steps, initial=start_step, desc="train") as bar:
    while not progress.finished:
      segments = epoch_segments(config, stream_length, progress.epoch)
      for index in range(progress.segment, len(segments)):
        start, length = (int(x) for x in segments[index])
        padded = text_data.padded_length(length, config.seq_len_bucket)
        batch = {k: _global_array(v, data_sharding)
                 for k, v in text_data.segment(train_streams, start, length, padded).items()}
        state, metrics = step_fn(state, batch, jnp.int32(length),
                                 jax.random.fold_in(train_key, step))
        step += 1
        if steady_start is None:
          # Throughput is measured from here on, after the first compilation.
          jax.block_until_ready(metrics)
          steady_start, tokens_since_steady = time.time(), 0
        else:
          tokens_since_steady += length * config.batch_size
        window.add(metrics, length, config.learning_rate * length / config.bptt,
                   config.batch_size)
        done = step
        progress = dataclasses.replace(progress, segment=index + 1)
        bar.update(1)

        if done % config.log_every_steps == 0:
          record = window.flush()
          record.update(epoch=progress.epoch + (index + 1) / len(segments), phase=progress.phase,
                        num_copies=config.maxup.num_copies)
          writer.write(done, "train", record)
          bar.set_postfix(ppl=f"{record['perplexity']:.1f}", phase=progress.phase)
        # The last step of an epoch is saved after its validation, below.
        if done % config.checkpoint_every_steps == 0 and index + 1 < len(segments):
          save(step, state, progress)

      # End of epoch: validate the weights NT-ASGD would keep, then decide.
      averaging = bool(state.averaging)
      result = evaluate(state.avg_params, "valid")
      progress, transition = end_of_epoch(
          progress, result["loss"], averaging=averaging, num_epochs=config.num_epochs,
          finetune_epochs=config.finetune.num_epochs,
          num_restarts=config.finetune.num_restarts, nonmono=config.nonmono)
      state = _apply_transition(state, transition.improved, transition.start_averaging,
                            transition.restart, initial_carry)
      writer.write(step, "valid", {
          **result, "epoch": progress.epoch, "phase": progress.phase - int(transition.restart),
          "averaged": averaging, "best_perplexity": math.exp(progress.best_val_loss),
          "switched_to_asgd": transition.start_averaging, "restarted": transition.restart})
      bar.write(f"epoch {progress.epoch} step {step}: valid ppl "
                f"{result['perplexity']:.2f} ({'averaged' if averaging else 'SGD'} weights)"
                + (" -> ASGD" if transition.start_averaging else "")
                + (f" -> fine-tuning {progress.phase}" if transition.restart else ""))
      save(step, state, progress)
    if window.steps:
      writer.write(step, "train", {**window.flush(), "epoch": progress.epoch,
                                   "phase": progress.phase,
                                   "num_copies": config.maxup.num_copies})
    bar.total = step  # Fine-tuning may have stopped early.
    bar.refresh()
  training_seconds = time.time() - steady_start if steady_start is not None else None

  # Final scores of the best weights, as AWD-LSTM reloads its saved model.
  summary = {"num_params": param_count}
  final_valid = evaluate(state.best_params, "valid")
  final_test = evaluate(state.best_params, "test")
  writer.write(step, "test", {**{f"valid_{k}": v for k, v in final_valid.items()},
                                         **final_test})
  summary.update(valid_perplexity=final_valid["perplexity"],
                 test_perplexity=final_test["perplexity"])
  if config.dynamic_eval.enabled:
    dynamic = run_dynamic_eval(config, model, state.best_params, corpus, replicated)
    writer.write(step, "dynamic_eval", dynamic)
    summary.update(dynamic_valid_perplexity=dynamic["valid_perplexity"],
                   dynamic_test_perplexity=dynamic["test_perplexity"])
  manager.wait_until_finished()
  manager.close()
  steps_run = step - start_step
  summary.update(
      steps=step, steps_this_run=steps_run, epochs=progress.epoch,
      seconds=time.time() - started,
      # Training steps after the first, epoch-end validation and checkpoints included.
      tokens_per_second=(tokens_since_steady / training_seconds if steps_run > 1 else None))
  writer.write(step, "summary", {k: v for k, v in summary.items() if v is not None})
  writer.close()
  return summary


def run_dynamic_eval(config, model, params, corpus: text_data.Corpus, sharding) -> dict:
  """Gradient statistics on the training text, then dynamic evaluation of valid and test.

  As in Krause et al.'s code: statistics from segments of
  `dynamic_eval.seq_len` tokens at batch `stats_batch_size` without
  dropout, evaluation at batch size 1.
  """
  dyn = config.dynamic_eval
  stats_segments = text_data.stacked_segments(
      text_data.batchify(corpus.train, dyn.stats_batch_size), dyn.seq_len)
  if dyn.stats_max_segments:
    stats_segments = {k: v[:dyn.stats_max_segments] for k, v in stats_segments.items()}
  stats = _dynamic_gradient_stats(
      params, model.initial_carry(dyn.stats_batch_size),
      jax.tree.map(lambda x: _global_array(x, sharding), stats_segments), model=model,
      decay=float(dyn.decay))
  result = {}
  for split in ("valid", "test"):
    segments = _stacked(corpus.split(split), 1, dyn.seq_len, sharding)
    out = _dynamic_evaluate(params, model.initial_carry(1), segments, stats, model=model,
                            learning_rate=float(dyn.learning_rate), decay=float(dyn.decay),
                            epsilon=float(dyn.epsilon))
    nll = float(out.nll_sum / out.num_tokens)
    result[f"{split}_loss"] = nll
    result[f"{split}_perplexity"] = math.exp(nll)
  return result


def _stacked(tokens: np.ndarray, batch_size: int, seq_len: int, sharding) -> dict:
  streams = text_data.batchify(tokens, batch_size)
  return {k: _global_array(v, sharding)
          for k, v in text_data.stacked_segments(streams, seq_len).items()}


class _Window:
  """Training metrics of the steps since the last log: summed on device, read back when logged."""

  def __init__(self):
    self._reset()

  def _reset(self):
    self.sums, self.steps, self.tokens, self.lengths, self.lr = None, 0, 0, 0, 0.0
    self.started = time.time()

  def add(self, metrics, length: int, learning_rate: float, batch_size: int):
    self.sums = metrics if self.sums is None else jax.tree.map(jnp.add, self.sums, metrics)
    self.steps += 1
    self.lengths += length
    self.tokens += length * batch_size
    self.lr += learning_rate

  def flush(self) -> dict:
    means = {k: float(v) / self.steps for k, v in jax.device_get(self.sums).items()}
    means.update(perplexity=math.exp(means["nll"]), learning_rate=self.lr / self.steps,
                 seq_len=self.lengths / self.steps,
                 tokens_per_second=self.tokens / (time.time() - self.started))
    self._reset()
    return means


def _write_config(config, workdir):
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
