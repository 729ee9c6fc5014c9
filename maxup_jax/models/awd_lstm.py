"""AWD-LSTM (Merity, Keskar & Socher, 2018) with one dropout key per sequence.

The model is a stack of LSTMs over word embeddings whose output layer shares
the embedding matrix (weight tying), regularised by

* embedding dropout: whole word types are dropped (their embedding is zero
  wherever they occur) and the survivors are scaled by 1 / (1 - p);
* locked (variational) dropout: one mask per sequence and feature, shared
  over time, on the embeddings, between layers and on the last layer;
* DropConnect on each layer's hidden-to-hidden weights;
* activation regularisation (AR) and temporal activation regularisation (TAR)
  in the loss (`sequence_loss`).

For MaxUp every sequence (a stream of the batch) draws its embedding-dropout
and locked-dropout masks from its own key, so re-running a sequence with the
same key reproduces the same masks. The embedding-dropout mask is drawn per
token occurrence from `fold_in(key, token_id)`: every occurrence of a word
type gets the same keep/drop decision without drawing a mask over the whole
vocabulary, so its cost is O(T) per sequence, not O(V). The DropConnect mask
is one `[H, 4H]` matrix per layer and step, shared by the whole batch as in
AWD-LSTM; it comes from a separate key so that all of MaxUp's copies of a
batch see the same weights.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from maxup_jax import _sharding, losses

Array = jax.Array
# One (h, c) pair per layer, each [B, hidden_l].
Carry = tuple[tuple[Array, Array], ...]


class LMOutput(NamedTuple):
  """What `AWDLSTM.__call__` returns.

  Attributes:
    logits: float32 `[B, T, V]` next-token logits (None if not computed).
    carry: the hidden state after the last valid step, to carry to the next segment.
    hidden: `[B, T, H_last]` last layer's output before output dropout (TAR's input).
    dropped_hidden: `[B, T, H_last]` the same after output dropout (AR's input).
  """

  logits: Array
  carry: Carry
  hidden: Array
  dropped_hidden: Array


# ---------------------------------------------------------------------------
# Dropout masks, one key per sequence.


def embedding_dropout_scale(key: Array, tokens: Array, rate: float) -> Array:
  """Per-occurrence scale of a sequence's embeddings under word-type dropout.

  scale_t = keep(w_t) / (1 - rate), keep(w) ~ Bernoulli(1 - rate) drawn from
  `fold_in(key, w)`: a function of the word type, so all occurrences of a
  word are kept or dropped together, and E[scale_t] = 1.

  Args:
    key: one PRNG key (this sequence's).
    tokens: int `[T]` token ids.
    rate: drop probability p in [0, 1).

  Returns:
    float32 `[T]`.
  """
  if rate == 0.0:
    return jnp.ones(tokens.shape, jnp.float32)
  type_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, tokens)
  keep = jax.vmap(lambda k: jax.random.bernoulli(k, 1.0 - rate))(type_keys)
  return keep.astype(jnp.float32) / (1.0 - rate)


def locked_dropout_mask(key: Array, features: int, rate: float) -> Array:
  """One sequence's variational dropout mask, float32 `[features]`, scaled by 1 / (1 - rate)."""
  if rate == 0.0:
    return jnp.ones((features,), jnp.float32)
  keep = jax.random.bernoulli(key, 1.0 - rate, (features,))
  return keep.astype(jnp.float32) / (1.0 - rate)


def dropconnect_mask(key: Array, shape: Sequence[int], rate: float) -> Array:
  """Element-wise dropout mask of a weight matrix, scaled by 1 / (1 - rate)."""
  keep = jax.random.bernoulli(key, 1.0 - rate, tuple(shape))
  return keep.astype(jnp.float32) / (1.0 - rate)


# ---------------------------------------------------------------------------
# Modules.


def _pytorch_lstm_init(hidden: int):
  # torch.nn.LSTM's default: U(-1/sqrt(H), 1/sqrt(H)) for every weight and bias.
  bound = 1.0 / hidden**0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class LSTMLayer(nn.Module):
  """One LSTM layer over a whole segment, gates in PyTorch's order (i, f, g, o).

  h_t, c_t = LSTM(x_t, h_{t-1}, c_{t-1}) with pre-activations
  x_t W_x + h_{t-1} (W_h * M) + b, where M is the DropConnect mask. Steps at
  or past `length` are skipped: they leave the state unchanged and output
  the last real step's h, so a zero-padded segment carries out the state of
  its last real step.
  """

  features: int

  @nn.compact
  def __call__(self, inputs: Array, carry: tuple[Array, Array], length: Array | int,
               hidden_mask: Array | None = None) -> tuple[tuple[Array, Array], Array]:
    """Args: inputs `[B, T, D]`; carry (h, c) `[B, H]`; length: real steps (scalar);
    hidden_mask: `[H, 4H]` DropConnect mask or None. Returns (carry, outputs `[B, T, H]`)."""
    init = _pytorch_lstm_init(self.features)
    input_kernel = self.param("input_kernel", init, (inputs.shape[-1], 4 * self.features))
    hidden_kernel = self.param("hidden_kernel", init, (self.features, 4 * self.features))
    bias = self.param("bias", init, (4 * self.features,))
    if hidden_mask is not None:
      hidden_kernel = hidden_kernel * hidden_mask
    # The input projection of all steps at once: one big matmul instead of T small ones.
    projected = jnp.einsum("btd,dg->tbg", inputs, input_kernel) + bias
    valid = jnp.arange(inputs.shape[1]) < length

    def advance(carry, x_t):
      h, c = carry
      i, f, g, o = jnp.split(x_t + h @ hidden_kernel, 4, axis=-1)
      new_c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
      new_h = jax.nn.sigmoid(o) * jnp.tanh(new_c)
      return (new_h, new_c), new_h

    def hold(carry, x_t):
      return carry, carry[0]

    def step(carry, xs):
      x_t, valid_t = xs
      # A branch, not a select: padding steps cost nothing, forward or backward.
      return jax.lax.cond(valid_t, advance, hold, carry, x_t)

    carry, outputs = jax.lax.scan(step, carry, (projected, valid))
    return carry, jnp.swapaxes(outputs, 0, 1)


class AWDLSTM(nn.Module):
  """The AWD-LSTM language model.

  Attributes:
    vocab_size: vocabulary size V.
    embed_dim: embedding size (400 in AWD-LSTM).
    hidden_dim: hidden size of every layer but the last (1150).
    num_layers: LSTM layers (3).
    tie_weights: share the embedding matrix with the output layer; the last
      layer then has `embed_dim` units.
    embed_dropout: word-type dropout rate on the embedding (AWD-LSTM's dropoute).
    input_dropout: locked dropout on the embeddings (dropouti).
    hidden_dropout: locked dropout between LSTM layers (dropouth).
    output_dropout: locked dropout on the last layer's output (dropout).
    weight_dropout: DropConnect rate on the hidden-to-hidden weights (wdrop).
  """

  vocab_size: int
  embed_dim: int = 400
  hidden_dim: int = 1150
  num_layers: int = 3
  tie_weights: bool = True
  embed_dropout: float = 0.1
  input_dropout: float = 0.65
  hidden_dropout: float = 0.3
  output_dropout: float = 0.4
  weight_dropout: float = 0.5

  def __post_init__(self):
    for name in ("vocab_size", "embed_dim", "hidden_dim", "num_layers"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}; must be a positive int")
    for name in ("embed_dropout", "input_dropout", "hidden_dropout", "output_dropout",
                 "weight_dropout"):
      value = getattr(self, name)
      if not 0.0 <= value < 1.0:
        raise ValueError(f"{name}={value!r}; must be in [0, 1)")
    super().__post_init__()

  @nn.nowrap
  def layer_sizes(self) -> tuple[int, ...]:
    last = self.embed_dim if self.tie_weights else self.hidden_dim
    return (self.hidden_dim,) * (self.num_layers - 1) + (last,)

  @nn.nowrap
  def initial_carry(self, batch_size: int) -> Carry:
    """Zero hidden state `((h, c),) * num_layers`, each `[batch_size, hidden_l]`."""
    return tuple((jnp.zeros((batch_size, n), jnp.float32), jnp.zeros((batch_size, n), jnp.float32))
                 for n in self.layer_sizes())

  @nn.nowrap
  def decoder_params(self, params: Any) -> tuple[Array, Array]:
    """The output layer in `params`: (weight `[V, D]`, one row per word; bias `[V]`).

    logits = dropped_hidden @ weight.T + bias. With tied weights the weight
    is the embedding matrix itself.
    """
    if self.tie_weights:
      return params["embedding"], params["decoder_bias"]
    return params["decoder"]["kernel"].T, params["decoder"]["bias"]

  @nn.compact
  def __call__(self, tokens: Array, carry: Carry, *, length: Array | int | None = None,
               dropout_keys: Array | None = None,
               weight_dropout_key: Array | None = None,
               compute_logits: bool = True) -> LMOutput:
    """Runs a segment.

    Args:
      tokens: int `[B, T]`.
      carry: the state from `initial_carry` or the previous segment.
      length: number of real steps (the rest is padding); default T.
      dropout_keys: `[B]` PRNG keys, one per sequence, for embedding and
        locked dropout; None turns them off (evaluation).
      weight_dropout_key: one key for the DropConnect masks; None turns
        DropConnect off.
      compute_logits: False leaves `logits` None, for losses that take the
        output layer from `decoder_params` and never hold the `[B, T, V]`
        logits (`sequence_loss_chunked`).

    Returns:
      An `LMOutput`.
    """
    batch, steps = tokens.shape
    if length is None:
      length = steps
    sizes = self.layer_sizes()
    # AWD-LSTM's init: U(-0.1, 0.1) embedding (and untied decoder), zero decoder bias.
    embedding = self.param("embedding", _uniform(0.1), (self.vocab_size, self.embed_dim))
    x = _sharding.take_rows(embedding, tokens)

    train = dropout_keys is not None
    if train:
      if dropout_keys.shape != (batch,):
        raise ValueError(
            f"dropout_keys must hold one key per sequence, shape ({batch},); got "
            f"{dropout_keys.shape}.")
      # Per sequence: embedding, input, one per hidden boundary, output.
      keys = jax.vmap(lambda k: jax.random.split(k, self.num_layers + 2))(dropout_keys)
      scale = jax.vmap(embedding_dropout_scale, in_axes=(0, 0, None))(
          keys[:, 0], tokens, self.embed_dropout)
      x = x * scale[..., None]
      x = x * self._locked_masks(keys[:, 1], self.embed_dim, self.input_dropout)

    new_carry = []
    raw = x
    for layer, features in enumerate(sizes):
      hidden_mask = None
      if weight_dropout_key is not None and self.weight_dropout > 0:
        hidden_mask = dropconnect_mask(jax.random.fold_in(weight_dropout_key, layer),
                                       (features, 4 * features), self.weight_dropout)
      layer_carry, raw = LSTMLayer(features, name=f"lstm_{layer}")(
          x, carry[layer], length, hidden_mask)
      new_carry.append(layer_carry)
      x = raw
      if train and layer < self.num_layers - 1:
        x = x * self._locked_masks(keys[:, 2 + layer], features, self.hidden_dropout)
    if train:
      x = x * self._locked_masks(keys[:, -1], sizes[-1], self.output_dropout)

    if self.tie_weights:
      bias = self.param("decoder_bias", nn.initializers.zeros, (self.vocab_size,))
      logits = x @ embedding.T + bias if compute_logits else None
    else:
      decoder = nn.Dense(self.vocab_size, kernel_init=_uniform(0.1), name="decoder")
      if compute_logits or self.is_initializing():
        logits = decoder(x)
      else:
        logits = None
    if logits is not None:
      logits = logits.astype(jnp.float32)
    return LMOutput(logits=logits, carry=tuple(new_carry), hidden=raw, dropped_hidden=x)

  @staticmethod
  def _locked_masks(keys: Array, features: int, rate: float) -> Array:
    # [B, 1, F]: one mask per sequence, broadcast over time.
    return jax.vmap(locked_dropout_mask, in_axes=(0, None, None))(keys, features, rate)[:, None]


def _uniform(bound: float):
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


# ---------------------------------------------------------------------------
# The per-sequence training loss.


def sequence_loss(output: LMOutput, targets: Array, length: Array | int, *,
                  activation_reg: float = 0.0,
                  temporal_activation_reg: float = 0.0) -> tuple[Array, Array]:
  r"""AWD-LSTM's loss of every sequence of the batch.

  .. math::
    L_b = \frac{1}{T} \sum_{t<T} -\log p(y_{b,t})
        + \alpha \, \mathrm{mean}_{t,j} (\tilde h_{b,t,j})^2
        + \beta \, \mathrm{mean}_{t,j} (h_{b,t,j} - h_{b,t-1,j})^2

  over the `length` real steps, with h the last layer's output and \tilde h
  the same after output dropout. The batch mean of L_b is AWD-LSTM's loss
  (its AR and TAR terms are means over batch, time and features).

  Args:
    output: the model's `LMOutput` for a `[B, T]` segment.
    targets: int `[B, T]` next tokens.
    length: real steps (scalar).
    activation_reg: alpha (AR).
    temporal_activation_reg: beta (TAR).

  Returns:
    (loss `[B]`, mean negative log-likelihood per token `[B]`).
  """
  return regularised_loss(token_nll(output.logits, targets), output, length,
                          activation_reg=activation_reg,
                          temporal_activation_reg=temporal_activation_reg)


def sequence_loss_chunked(output: LMOutput, decoder: tuple[Array, Array], targets: Array,
                          length: Array | int, *, activation_reg: float = 0.0,
                          temporal_activation_reg: float = 0.0,
                          vocab_chunk_size: int = 1024) -> tuple[Array, Array]:
  """`sequence_loss` without the `[B, T, V]` logits.

  The same L_b (up to float rounding), with the token NLL computed from
  `output.dropped_hidden` and the output layer by `token_nll_chunked`:
  `vocab_chunk_size` words at a time, so the `[B, T, V]` logits are never
  held, and the output layer is not run on the padding past `length`.
  `output.logits` is not read, so the model can be run with
  `compute_logits=False`.

  Args:
    output: the model's `LMOutput` for a `[B, T]` segment.
    decoder: (weight `[V, D]`, bias `[V]`), from `AWDLSTM.decoder_params`.
    targets: int `[B, T]` next tokens.
    length: real steps (scalar).
    activation_reg, temporal_activation_reg: as in `sequence_loss`.
    vocab_chunk_size: the most words per chunk.

  Returns:
    (loss `[B]`, mean negative log-likelihood per token `[B]`).
  """
  nll = token_nll_chunked(output.dropped_hidden, decoder, targets, vocab_chunk_size, length)
  return regularised_loss(nll, output, length, activation_reg=activation_reg,
                          temporal_activation_reg=temporal_activation_reg)


def token_nll(logits: Array, targets: Array) -> Array:
  """-log softmax(logits)[target] of every token: logits `[B, T, V]`, targets `[B, T]` -> `[B, T]`."""
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def token_nll_chunked(hidden: Array, decoder: tuple[Array, Array], targets: Array,
                      vocab_chunk_size: int = 1024, length: Array | int | None = None) -> Array:
  """`token_nll(hidden @ weight.T + bias, targets)` chunked over the vocabulary, `[B, T]`.

  Args:
    hidden: `[B, T, D]` (the model's `dropped_hidden`).
    decoder: (weight `[V, D]`, bias `[V]`), from `AWDLSTM.decoder_params`.
    targets: int `[B, T]`.
    vocab_chunk_size: the most words per chunk.
    length: None, or the real steps: the NLL of steps from `length` on is
      then 0 and not computed (the steps are laid out time-major, so the
      real tokens are the first `length * B` rows of
      `losses.linear_softmax_cross_entropy`).

  Returns:
    float32 `[B, T]`.
  """
  weight, bias = decoder
  batch = targets.shape[0]
  num_valid_rows = None if length is None else length * batch
  nll = losses.linear_softmax_cross_entropy(
      jnp.swapaxes(hidden, 0, 1), weight, bias, targets.T, num_valid_rows=num_valid_rows,
      chunk_size=vocab_chunk_size)
  return nll.T


def regularised_loss(nll: Array, output: LMOutput, length: Array | int, *,
                     activation_reg: float = 0.0,
                     temporal_activation_reg: float = 0.0) -> tuple[Array, Array]:
  """`sequence_loss` from the token NLL `[B, T]`: (loss `[B]`, mean token NLL `[B]`).

  Means over the `length` real steps; AR on `output.dropped_hidden`, TAR on
  `output.hidden`, as `sequence_loss` states.
  """
  steps = nll.shape[1]
  valid = (jnp.arange(steps) < length).astype(jnp.float32)
  num_valid = jnp.maximum(jnp.sum(valid), 1.0)
  nll = jnp.sum(nll * valid, axis=1) / num_valid
  loss = nll
  if activation_reg:
    squares = jnp.mean(jnp.square(output.dropped_hidden), axis=-1)
    loss = loss + activation_reg * jnp.sum(squares * valid, axis=1) / num_valid
  if temporal_activation_reg:
    steps_diff = jnp.mean(jnp.square(output.hidden[:, 1:] - output.hidden[:, :-1]), axis=-1)
    pair_valid = valid[1:]  # (t-1, t) is real when t is.
    loss = loss + temporal_activation_reg * (
        jnp.sum(steps_diff * pair_valid, axis=1) / jnp.maximum(jnp.sum(pair_valid), 1.0))
  return loss, nll


def masked_nll_sum(nll: Array, length: Array | int) -> tuple[Array, Array]:
  """(sum of the token NLL `[B, T]` over the first `length` steps, number of those tokens)."""
  valid = (jnp.arange(nll.shape[1]) < length).astype(jnp.float32)
  return jnp.sum(nll * valid[None]), jnp.sum(valid) * nll.shape[0]


def num_params(params: Any) -> int:
  """The number of scalars in a pytree of arrays, e.g. a model's parameters."""
  return sum(x.size for x in jax.tree.leaves(params))
