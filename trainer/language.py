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
from typing import Any, Callable, NamedTuple, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from maxup_jax import dynamic_eval
from maxup_jax.maxup import MODES, maxup_loss
from maxup_jax.models import awd_lstm
from trainer import core, loop, text_data

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
class NTASGDState:
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
  errors = core.ConfigErrors()
  errors.one_of("dataset", config.dataset, sorted(text_data.DATASETS))
  errors.check(bool(config.data_dir), "data_dir is empty; give the corpus directory (or file)")
  unknown = set(config.model.keys()) - set(MODEL_FIELDS)
  errors.check(not unknown,
               f"model has unknown fields {sorted(unknown)}; valid: {list(MODEL_FIELDS)}")
  if not unknown:
    try:
      awd_lstm.AWDLSTM(vocab_size=2, **config.model)
    except (TypeError, ValueError) as e:
      errors.check(False, f"model: {e}")
  for name in ("batch_size", "eval_batch_size", "test_batch_size", "bptt", "min_seq_len",
               "seq_len_bucket", "num_epochs", "nonmono"):
    errors.int_at_least(name, config[name], 1)
  errors.divisible_batch("batch_size", config.batch_size, num_devices)
  errors.at_least("bptt_std", config.bptt_std, 0)
  errors.check(0 < config.bptt_full_probability <= 1,
               f"bptt_full_probability={config.bptt_full_probability}; must be in (0, 1]")
  errors.check(config.learning_rate > 0, f"learning_rate={config.learning_rate}; must be > 0")
  errors.at_least("clip_grad_norm", config.clip_grad_norm, 0, "0 = no clipping")
  for name in ("weight_decay", "activation_reg", "temporal_activation_reg"):
    errors.at_least(name, config[name], 0)
  errors.int_at_least("finetune.num_restarts", config.finetune.num_restarts, 0)
  errors.int_at_least("finetune.num_epochs", config.finetune.num_epochs, 1)
  maxup = config.maxup
  errors.int_at_least("maxup.num_copies", maxup.num_copies, 1, "1 = no MaxUp")
  errors.one_of("maxup.mode", maxup.mode, MODES)
  errors.int_at_least("maxup.copies_per_pass", maxup.copies_per_pass, 1,
                      "num_copies or more = all copies in one vmapped pass")
  dyn = config.dynamic_eval
  if dyn.enabled:
    for name in ("learning_rate", "decay", "epsilon"):
      errors.check(dyn[name] > 0, f"dynamic_eval.{name}={dyn[name]}; must be > 0")
    for name in ("seq_len", "stats_batch_size"):
      errors.int_at_least(f"dynamic_eval.{name}", dyn[name], 1)
    errors.at_least("dynamic_eval.stats_max_segments", dyn.stats_max_segments, 0, "0 = all")
  errors.int_at_least("vocab_chunk_size", config.vocab_chunk_size, 0, "0 = full logits")
  errors.at_least("num_train_tokens", config.num_train_tokens, 0, "0 = all")
  errors.at_least("num_eval_tokens", config.num_eval_tokens, 0, "0 = all")
  loop.check_config(errors, config, num_devices)
  errors.raise_if_any()


def perplexity(nll: float) -> float:
  """exp(nll); inf where that overflows a float (a diverged run), instead of raising."""
  return math.inf if nll > 709.0 else math.exp(nll)


def create_model(model: ml_collections.ConfigDict, vocab_size: int) -> awd_lstm.AWDLSTM:
  """The AWD-LSTM a config's `model` section describes, for `vocab_size` words."""
  return awd_lstm.AWDLSTM(vocab_size=vocab_size, **model)


# ---------------------------------------------------------------------------
# NT-ASGD: pure bookkeeping on the host.


def nt_asgd_triggered(history: Sequence[float], val_loss: float, nonmono: int) -> bool:
  """AWD-LSTM's non-monotone criterion.

  True when `val_loss` is worse than the best of the losses evaluated before
  the last `nonmono` ones: `len(history) > nonmono and val_loss >
  min(history[:-nonmono])`.
  """
  return len(history) > nonmono and val_loss > min(history[:-nonmono])


def end_of_epoch(nt_asgd: NTASGDState, val_loss: float, *, averaging: bool, num_epochs: int,
                 finetune_epochs: int, num_restarts: int,
                 nonmono: int) -> tuple[NTASGDState, Transition]:
  """The NT-ASGD decisions after an epoch's validation loss.

  Phase 0 (AWD-LSTM's main.py): SGD until the non-monotone criterion fires,
  then ASGD until `num_epochs` epochs; the history only grows during SGD.
  Fine-tuning phases (finetune.py): ASGD from the best weights, ending when
  the criterion fires or after `finetune_epochs` epochs. The best
  validation loss carries across phases, as the saved model does in AWD-LSTM.
  """
  phase_epochs = nt_asgd.phase_epochs + 1
  history = nt_asgd.history
  start_averaging = False
  if nt_asgd.phase == 0:
    if not averaging:
      start_averaging = nt_asgd_triggered(history, val_loss, nonmono)
      history = history + (val_loss,)
    phase_over = phase_epochs >= num_epochs
  else:
    phase_over = nt_asgd_triggered(history, val_loss, nonmono) or phase_epochs >= finetune_epochs
    history = history + (val_loss,)
  restart = phase_over and nt_asgd.phase < num_restarts
  transition = Transition(improved=val_loss < nt_asgd.best_val_loss,
                          start_averaging=start_averaging and not restart, restart=restart)
  new = NTASGDState(
      phase=nt_asgd.phase + int(restart),
      epoch=nt_asgd.epoch + 1,
      phase_epochs=0 if restart else phase_epochs,
      segment=0,
      history=() if restart else history,
      best_val_loss=min(nt_asgd.best_val_loss, val_loss),
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


def train_state_shardings(state: TrainState, mesh: jax.sharding.Mesh) -> TrainState:
  """Where a `TrainState` lives on `mesh`: weights replicated, each stream's hidden state
  with its stream (the batch's 'data' sharding)."""
  return jax.tree.map(lambda _: core.replicated(mesh), state).replace(
      carry=jax.tree.map(lambda _: core.data_sharding(mesh), state.carry))


def train_step(state: TrainState, batch, length, key, *, model, num_copies: int, mode: str,
               learning_rate: float, bptt: int, clip_grad_norm: float, weight_decay: float,
               activation_reg: float, temporal_activation_reg: float,
               vocab_chunk_size: int, skip_nonfinite: bool = False, copies_per_pass: int = 1):
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
    skip_nonfinite: a step whose loss, gradient or updated weights hold a
      NaN/inf leaves the state unchanged (but for the step counter) instead
      of applying the update.
    copies_per_pass: copies one pass evaluates (`maxup_loss`): 1 partitions
      over the sharded streams; k > 1 vmaps k copies per pass.

  Returns:
    (new_state, metrics): summed-friendly scalars `loss` (mean worst-copy
    loss, AR/TAR included), `nll` (token NLL of the trained copies),
    `mean_copy_loss`, `grad_norm` (before clipping) and `nonfinite` (1.0 if
    this step's loss, gradient or updated weights hold a NaN/inf).
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
                      has_aux=True, mode=mode, copies_per_pass=copies_per_pass)

  (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  carry, nll = aux.loss_aux
  if mode == "single_pass":
    # Every copy carried gradient; keep each stream's winning copy.
    def winners(x):  # [m, B, ...] -> [B, ...], a gather local to each stream's device.
      index = aux.selected_copy.reshape((1, -1) + (1,) * (x.ndim - 2))
      return jnp.take_along_axis(x, index, axis=0)[0]
    carry = jax.tree.map(winners, carry)
    nll = winners(nll)

  # The loss gradient is clipped to norm <= clip_grad_norm first, and torch.optim.SGD's
  # coupled weight decay added after, as in AWD-LSTM: d = clip(g) + weight_decay * theta.
  grad_norm = optax.tree.norm(grads)
  clip_scale = jnp.minimum(1.0, clip_grad_norm / grad_norm) if clip_grad_norm else 1.0
  step_size = learning_rate * length / bptt
  params = jax.tree.map(lambda p, g: p - step_size * (clip_scale * g + weight_decay * p),
                        state.params, grads)

  # ASGD with AWD-LSTM's t0=0, lambd=0: plain SGD plus a uniform average of the iterates.
  avg_count = state.avg_count + state.averaging.astype(jnp.int32)
  weight = 1.0 / jnp.maximum(avg_count, 1).astype(jnp.float32)
  avg_params = jax.tree.map(
      lambda a, p: jnp.where(state.averaging, a + (p - a) * weight, p), state.avg_params, params)

  new_state, nonfinite = core.guard_nonfinite(
      state, state.replace(step=state.step + 1, params=params, avg_params=avg_params,
                           avg_count=avg_count, carry=jax.lax.stop_gradient(carry)),
      loss, grad_norm, skip_nonfinite)
  metrics = {
      "loss": loss,
      "nll": jnp.mean(nll),
      "mean_copy_loss": aux.copy_losses.mean(),
      "grad_norm": grad_norm,
      "nonfinite": nonfinite,
  }
  return new_state, metrics


def segment_nll(model, params, carry, segment, vocab_chunk_size: int):
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


def evaluate_segments(params, segments, *, model, batch_size: int, vocab_chunk_size: int):
  """Summed NLL and token count over stacked segments `[N, B, T]`, state carried through."""

  def step(acc, segment):
    carry, total, count = acc
    nll_sum, n, carry = segment_nll(model, params, carry, segment, vocab_chunk_size)
    return (carry, total + nll_sum, count + n), None

  init = (model.initial_carry(batch_size), jnp.zeros(()), jnp.zeros(()))
  (_, total, count), _ = jax.lax.scan(step, init, segments)
  return total, count


def dynamic_segment_loss(model, vocab_chunk_size: int, params, carry, segment):
  """The `segment_loss` of `maxup_jax.dynamic_eval` (after binding `model` and
  `vocab_chunk_size`): mean token NLL."""
  nll_sum, count, carry = segment_nll(model, params, carry, segment, vocab_chunk_size)
  return nll_sum / count, (carry, nll_sum, count)


def dynamic_gradient_stats(params, carry, segments, *, model, vocab_chunk_size: int,
                           decay: float):
  return dynamic_eval.collect_gradient_stats(
      functools.partial(dynamic_segment_loss, model, vocab_chunk_size), params, carry, segments,
      decay)


def dynamic_evaluate(params, carry, segments, stats, *, model, vocab_chunk_size: int,
                     learning_rate: float, decay: float, epsilon: float):
  return dynamic_eval.evaluate(
      functools.partial(dynamic_segment_loss, model, vocab_chunk_size), params, carry, segments,
      stats, learning_rate=learning_rate, decay=decay, epsilon=epsilon)


# Compiled once per process for each model and hyper-parameters (static
# arguments), so runs that share them, e.g. a resumed run, reuse the compilation.
_TRAIN_STEP_STATICS = ("model", "num_copies", "mode", "learning_rate", "bptt", "clip_grad_norm",
                       "weight_decay", "activation_reg", "temporal_activation_reg",
                       "vocab_chunk_size", "skip_nonfinite", "copies_per_pass")
_train_step = jax.jit(train_step, static_argnames=_TRAIN_STEP_STATICS, donate_argnums=0)
_apply_transition = jax.jit(apply_transition, donate_argnums=0)
_evaluate_segments = jax.jit(evaluate_segments,
                             static_argnames=("model", "batch_size", "vocab_chunk_size"))
_dynamic_gradient_stats = jax.jit(dynamic_gradient_stats,
                                  static_argnames=("model", "vocab_chunk_size", "decay"))
_dynamic_evaluate = jax.jit(
    dynamic_evaluate,
    static_argnames=("model", "vocab_chunk_size", "learning_rate", "decay", "epsilon"))


@dataclasses.dataclass(frozen=True)
class Steps(core.Steps):
  """`core.Steps` of an AWD-LSTM language model.

  Attributes:
    model: the AWD-LSTM for the corpus's vocabulary.
    batch_size: the training streams, split along 'data' with their hidden state.
    epoch_segments: (stream_length, epoch) -> the `[N, 2]` (start, length) training
      segments of global epoch `epoch` (`epoch_segments` with the config's lengths).
    eval_step: `(params, segments, batch_size) -> (nll_sum, count)` over stacked
      segments `[N, batch_size, T]`, as validation and test run it.

  `train_steps[m]` is `train_step(state, batch, length, key)`.
  """

  model: awd_lstm.AWDLSTM
  batch_size: int
  epoch_segments: Callable[[int, int], np.ndarray]
  eval_step: Callable

  def abstract_batch(self, batch_size: int, seq_len: int) -> dict:
    """A training segment {'inputs', 'targets'} as sharded `ShapeDtypeStruct`s."""
    spec = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
    return core.abstract({"inputs": spec, "targets": spec}, self.data_sharding)

  def initial_carry(self) -> Any:
    """A zero hidden state of the training streams, placed with them."""
    return jax.jit(lambda: self.model.initial_carry(self.batch_size),
                   out_shardings=core.shardings_of(self.abstract_state.carry))()


def build_steps(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                vocab_size: int) -> Steps:
  """The model, abstract state and steps `config` trains with on `mesh`, for `vocab_size` words.

  Pure: reads no text and computes nothing on device (the weights come from
  `Steps.init_state`). Weights are replicated; streams and their hidden
  state are split along the mesh's 'data' axis.
  """
  model = create_model(config.model, vocab_size)
  init_key, train_key = core.split_seed(config.seed)
  init_fn = lambda: initial_train_state(model, config.batch_size, init_key)
  abstract_state = jax.eval_shape(init_fn)
  abstract_state = core.abstract(abstract_state, train_state_shardings(abstract_state, mesh))
  hyper = dict(
      model=model, mode=config.maxup.mode, learning_rate=float(config.learning_rate),
      bptt=config.bptt, clip_grad_norm=float(config.clip_grad_norm),
      weight_decay=float(config.weight_decay), activation_reg=float(config.activation_reg),
      temporal_activation_reg=float(config.temporal_activation_reg),
      vocab_chunk_size=config.vocab_chunk_size, skip_nonfinite=config.nonfinite == "skip",
      copies_per_pass=config.maxup.copies_per_pass)
  train_steps = {m: functools.partial(_train_step, num_copies=m, **hyper)
                 for m in {1, config.maxup.num_copies}}
  eval_step = lambda params, segments, batch_size: _evaluate_segments(
      params, segments, model=model, batch_size=batch_size,
      vocab_chunk_size=config.vocab_chunk_size)
  return Steps(init_fn=init_fn, abstract_state=abstract_state,
               data_sharding=core.data_sharding(mesh), init_key=init_key, train_key=train_key,
               train_steps=train_steps, model=model, batch_size=config.batch_size,
               epoch_segments=functools.partial(
                   epoch_segments, seed=config.seed, bptt=config.bptt,
                   full_probability=config.bptt_full_probability, std=config.bptt_std,
                   min_length=config.min_seq_len),
               eval_step=eval_step)


# ---------------------------------------------------------------------------
# The loop.


def _global_array(host: np.ndarray, sharding) -> jax.Array:
  # Every process holds the whole (small) corpus and fills its own shards.
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _nt_asgd_tree(nt_asgd: NTASGDState, history_size: int, replicated) -> dict:
  history = np.full((history_size,), np.inf, np.float32)
  history[:len(nt_asgd.history)] = nt_asgd.history
  host = {
      "phase": np.int32(nt_asgd.phase), "epoch": np.int32(nt_asgd.epoch),
      "phase_epochs": np.int32(nt_asgd.phase_epochs), "segment": np.int32(nt_asgd.segment),
      "history": history, "num_evals": np.int32(len(nt_asgd.history)),
      "best_val_loss": np.float32(nt_asgd.best_val_loss),
      "finished": np.int32(nt_asgd.finished),
  }
  return {k: _global_array(np.asarray(v), replicated) for k, v in host.items()}


def _nt_asgd_from_tree(tree: dict) -> NTASGDState:
  tree = jax.device_get(tree)
  return NTASGDState(
      phase=int(tree["phase"]), epoch=int(tree["epoch"]), phase_epochs=int(tree["phase_epochs"]),
      segment=int(tree["segment"]),
      history=tuple(float(x) for x in tree["history"][:int(tree["num_evals"])]),
      best_val_loss=float(tree["best_val_loss"]), finished=bool(tree["finished"]))


def epoch_segments(stream_length: int, epoch: int, *, seed: int, bptt: int,
                   full_probability: float, std: float, min_length: int) -> np.ndarray:
  """The `[N, 2]` (start, length) segments of global epoch `epoch`, a function of (seed, epoch);
  the lengths as `text_data.bptt_segments` draws them."""
  rng = np.random.default_rng([seed, epoch])
  return text_data.bptt_segments(stream_length, rng, bptt=bptt, full_probability=full_probability,
                                 std=std, min_length=min_length)


class LanguageTask(loop.Task):
  """Language modelling as `loop.run` drives it: AWD-LSTM's recipe with NT-ASGD phases.

  The checkpoint holds the train state and the host-side `NTASGDState`; a step
  trains the next segment of the current epoch, and the last segment of an
  epoch is followed by validation and the NT-ASGD decision (then a checkpoint).
  """

  unit = "tokens"

  def __init__(self, config: ml_collections.ConfigDict):
    mesh = loop.create_mesh(config)
    validate_config(config, mesh.size)
    self.config = config
    self.corpus = text_data.load_corpus(config.dataset, config.data_dir, config.num_train_tokens,
                                        config.num_eval_tokens)
    self.train_streams = text_data.batchify(self.corpus.train, config.batch_size)
    steps = build_steps(config, mesh, self.corpus.vocab_size)
    self.data_sharding, self.replicated = steps.data_sharding, steps.replicated
    self.model, self.train_key = steps.model, steps.train_key
    self.epoch_segments = steps.epoch_segments
    self.state = steps.init_state()
    self.initial_carry = steps.initial_carry()
    self.nt_asgd = NTASGDState()
    self.step_fn = steps.train_steps[config.maxup.num_copies]
    self.eval_step = steps.eval_step

    max_epochs = config.num_epochs + config.finetune.num_restarts * config.finetune.num_epochs
    self.history_size = max(config.num_epochs, config.finetune.num_epochs) + 1
    self._segments = (-1, None)
    self.total_steps = sum(len(self.segments(e)) for e in range(max_epochs))
    self.eval_sets = {
        "valid": _stacked(self.corpus.valid, config.eval_batch_size, config.bptt, self.replicated),
        "test": _stacked(self.corpus.test, config.test_batch_size, config.bptt, self.replicated),
    }
    self.eval_batch_sizes = {"valid": config.eval_batch_size, "test": config.test_batch_size}

  def segments(self, epoch: int) -> np.ndarray:
    """The `[N, 2]` (start, length) training segments of global epoch `epoch` (the newest cached)."""
    if self._segments[0] != epoch:
      self._segments = (epoch, self.epoch_segments(self.train_streams.shape[1], epoch))
    return self._segments[1]

  def checkpoint_tree(self) -> dict:
    return {"state": self.state,
            "progress": _nt_asgd_tree(self.nt_asgd, self.history_size, self.replicated)}

  def restore(self, tree: dict) -> int:
    self.state, self.nt_asgd = tree["state"], _nt_asgd_from_tree(tree["progress"])
    start_step = int(self.state.step)
    if start_step:
      logging.info("Resuming from step %d (epoch %d, phase %d).", start_step,
                   self.nt_asgd.epoch, self.nt_asgd.phase)
    return start_step

  def start(self, out: loop.Output) -> None:
    out.write(0, "model", {"num_params": awd_lstm.num_params(self.state.params),
                           "vocab_size": self.corpus.vocab_size,
                           "train_tokens": len(self.corpus.train)})

  def finished(self, step: int) -> bool:
    return self.nt_asgd.finished

  def train_step(self, step: int):
    config = self.config
    start, length = (int(x) for x in self.segments(self.nt_asgd.epoch)[self.nt_asgd.segment])
    padded = text_data.padded_length(length, config.seq_len_bucket)
    batch = {k: _global_array(v, self.data_sharding)
             for k, v in text_data.segment(self.train_streams, start, length, padded).items()}
    self.state, metrics = self.step_fn(self.state, batch, jnp.int32(length),
                                       jax.random.fold_in(self.train_key, step))
    self.nt_asgd = dataclasses.replace(self.nt_asgd, segment=self.nt_asgd.segment + 1)
    return metrics, {"tokens": length * config.batch_size, "seq_len": length,
                     "learning_rate": config.learning_rate * length / config.bptt}

  def train_record(self, means: dict, step: int) -> dict:
    num_segments = len(self.segments(self.nt_asgd.epoch))
    return {**means, "perplexity": perplexity(means["nll"]),
            "epoch": self.nt_asgd.epoch + self.nt_asgd.segment / num_segments,
            "phase": self.nt_asgd.phase, "num_copies": self.config.maxup.num_copies}

  def evaluate(self, params, split: str) -> dict:
    total, count = jax.device_get(
        self.eval_step(params, self.eval_sets[split], self.eval_batch_sizes[split]))
    loss = float(total / count)
    return {"loss": loss, "perplexity": perplexity(loss), "bits_per_token": loss / math.log(2)}

  def after_step(self, step: int, out: loop.Output) -> bool:
    """At the end of an epoch: validate the weights NT-ASGD would keep, then decide."""
    if self.nt_asgd.segment < len(self.segments(self.nt_asgd.epoch)):
      return False
    config = self.config
    averaging = bool(self.state.averaging)
    result = self.evaluate(self.state.avg_params, "valid")
    self.nt_asgd, transition = end_of_epoch(
        self.nt_asgd, result["loss"], averaging=averaging, num_epochs=config.num_epochs,
        finetune_epochs=config.finetune.num_epochs,
        num_restarts=config.finetune.num_restarts, nonmono=config.nonmono)
    self.state = _apply_transition(self.state, transition.improved, transition.start_averaging,
                                   transition.restart, self.initial_carry)
    out.write(step, "valid", {
        **result, "epoch": self.nt_asgd.epoch,
        "phase": self.nt_asgd.phase - int(transition.restart), "averaged": averaging,
        "best_perplexity": perplexity(self.nt_asgd.best_val_loss),
        "switched_to_asgd": transition.start_averaging, "restarted": transition.restart})
    out.echo(f"epoch {self.nt_asgd.epoch} step {step}: valid ppl {result['perplexity']:.2f} "
             f"({'averaged' if averaging else 'SGD'} weights)"
             + (" -> ASGD" if transition.start_averaging else "")
             + (f" -> fine-tuning {self.nt_asgd.phase}" if transition.restart else ""))
    return True

  def summary(self, out: loop.Output, preempted: bool) -> dict:
    """Scores of the best weights, as AWD-LSTM reloads its saved model; none when preempted."""
    summary = {"num_params": awd_lstm.num_params(self.state.params), "epochs": self.nt_asgd.epoch}
    if preempted:
      return summary
    step = int(self.state.step)
    valid = self.evaluate(self.state.best_params, "valid")
    test = self.evaluate(self.state.best_params, "test")
    out.write(step, "test", {**{f"valid_{k}": v for k, v in valid.items()}, **test})
    summary.update(valid_perplexity=valid["perplexity"], test_perplexity=test["perplexity"])
    if self.config.dynamic_eval.enabled:
      dynamic = run_dynamic_eval(self.config.dynamic_eval, self.model, self.state.best_params,
                                 self.corpus, self.replicated, self.config.vocab_chunk_size)
      out.write(step, "dynamic_eval", dynamic)
      summary.update(dynamic_valid_perplexity=dynamic["valid_perplexity"],
                     dynamic_test_perplexity=dynamic["test_perplexity"])
    return summary


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains and evaluates as `config` says; everything written goes under `workdir`.

  Restarting with the same config and workdir resumes from the newest
  checkpoint: the segment lengths and every step's key are functions of
  (seed, epoch, step), and the carried hidden state, the average and the
  NT-ASGD history are in the checkpoint. A SIGTERM makes every process
  checkpoint the same step and return early (`preempted`).

  Returns:
    A summary dict: validation and test perplexity of the best weights (and
    after dynamic evaluation if enabled), steps, epochs, time, tokens/s.

  Raises:
    FloatingPointError: the loss or gradient became NaN/inf (unless
      `config.nonfinite == "skip"`), naming the step and the newest checkpoint.
  """
  return loop.run(LanguageTask(config), config, workdir)


def run_dynamic_eval(dyn: ml_collections.ConfigDict, model, params, corpus: text_data.Corpus,
                     sharding, vocab_chunk_size: int) -> dict:
  """Gradient statistics on the training text, then dynamic evaluation of valid and test.

  `dyn` is a config's `dynamic_eval` section. As in Krause et al.'s code:
  statistics from segments of `dyn.seq_len` tokens at batch
  `dyn.stats_batch_size` without dropout, evaluation at batch size 1.
  """
  stats_segments = text_data.stacked_segments(
      text_data.batchify(corpus.train, dyn.stats_batch_size), dyn.seq_len)
  if dyn.stats_max_segments:
    stats_segments = {k: v[:dyn.stats_max_segments] for k, v in stats_segments.items()}
  stats = _dynamic_gradient_stats(
      params, model.initial_carry(dyn.stats_batch_size),
      jax.tree.map(lambda x: _global_array(x, sharding), stats_segments), model=model,
      vocab_chunk_size=vocab_chunk_size, decay=float(dyn.decay))
  result = {}
  for split in ("valid", "test"):
    segments = _stacked(corpus.split(split), 1, dyn.seq_len, sharding)
    out = _dynamic_evaluate(params, model.initial_carry(1), segments, stats, model=model,
                            vocab_chunk_size=vocab_chunk_size, learning_rate=float(dyn.learning_rate), decay=float(dyn.decay),
                            epsilon=float(dyn.epsilon))
    nll = float(out.nll_sum / out.num_tokens)
    result[f"{split}_loss"] = nll
    result[f"{split}_perplexity"] = perplexity(nll)
  return result


def _stacked(tokens: np.ndarray, batch_size: int, seq_len: int, sharding) -> dict:
  streams = text_data.batchify(tokens, batch_size)
  return {k: _global_array(v, sharding)
          for k, v in text_data.stacked_segments(streams, seq_len).items()}
