"""AWD-LSTM, its dropout masks, MaxUp over embedding dropout, and dynamic evaluation."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxup_jax import dynamic_eval
from maxup_jax.maxup import maxup_loss
from maxup_jax.models import awd_lstm
from trainer import language, text_data

VOCAB, BATCH, STEPS = 50, 4, 6


def tiny_model(**overrides):
  fields = dict(vocab_size=VOCAB, embed_dim=8, hidden_dim=12, num_layers=2, embed_dropout=0.3,
                input_dropout=0.2, hidden_dropout=0.2, output_dropout=0.2, weight_dropout=0.3)
  fields.update(overrides)
  return awd_lstm.AWDLSTM(**fields)


def init(model, seed=0):
  tokens = jnp.zeros((1, 1), jnp.int32)
  return model.init(jax.random.key(seed), tokens, model.initial_carry(1))["params"]


def random_batch(seed=1, batch=BATCH, steps=STEPS):
  tokens = jax.random.randint(jax.random.key(seed), (batch, steps + 1), 0, VOCAB)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


@pytest.mark.parametrize("vocab_size, expected", [(10_000, 24_210_800), (33_278, 33_545_278)])
def test_parameter_counts_match_awd_lstm(vocab_size, expected):
  # PTB ~24M and WikiText-2 ~33M as published; PyTorch counts 10,800 more
  # because each of its LSTM layers has two (redundant) bias vectors.
  model = awd_lstm.AWDLSTM(vocab_size=vocab_size)
  assert awd_lstm.num_params(jax.eval_shape(lambda: init(model))) == expected


def test_embedding_dropout_drops_whole_word_types_and_keeps_the_expectation():
  rate = 0.3
  tokens = jnp.array([3, 7, 3, 3, 9, 7, 1, 9] * 4)
  scale = jax.vmap(awd_lstm.embedding_dropout_scale, in_axes=(0, None, None))(
      jax.random.split(jax.random.key(0), 4000), tokens, rate)
  values = np.unique(np.asarray(scale))
  np.testing.assert_allclose(values, [0.0, 1.0 / (1.0 - rate)], rtol=1e-6)
  # Every occurrence of a word type gets the same decision.
  for word in (1, 3, 7, 9):
    occurrences = np.asarray(scale[:, tokens == word])
    assert (occurrences == occurrences[:, :1]).all()
  # E[scale] = 1 and the drop rate is p (4000 draws per type, 4 types).
  assert abs(float(scale.mean()) - 1.0) < 0.02
  assert abs(float((scale == 0).mean()) - rate) < 0.015
  # The same key gives the same mask; another key another one.
  key = jax.random.key(5)
  np.testing.assert_array_equal(awd_lstm.embedding_dropout_scale(key, tokens, rate),
                                awd_lstm.embedding_dropout_scale(key, tokens, rate))
  assert not np.array_equal(awd_lstm.embedding_dropout_scale(key, tokens, rate),
                            awd_lstm.embedding_dropout_scale(jax.random.key(6), tokens, rate))


def test_embedding_dropout_is_a_mask_over_the_embedding_matrix():
  # AWD-LSTM's formulation: the model with embedding dropout equals the model
  # without it whose embedding matrix has the dropped rows zeroed, the others
  # scaled by 1 / (1 - p); the tied decoder keeps the unmasked matrix.
  rate = 0.5
  model = tiny_model(num_layers=1, input_dropout=0.0, output_dropout=0.0, weight_dropout=0.0,
                     embed_dropout=rate)
  params = init(model)
  tokens = random_batch(batch=1, steps=12)["inputs"]
  key = jax.random.key(3)
  scale = awd_lstm.embedding_dropout_scale(jax.random.split(key, 3)[0], tokens[0], rate)
  rows = jnp.ones((VOCAB,)).at[tokens[0]].set(scale)
  assert 0 < int(jnp.sum(rows == 0)) < len(set(np.asarray(tokens[0]).tolist()))
  masked = {**params, "embedding": params["embedding"] * rows[:, None]}

  @jax.jit
  def hidden_states(params, masked):
    carry = model.initial_carry(1)
    dropped = model.apply({"params": params}, tokens, carry, dropout_keys=key[None])
    by_matrix = model.apply({"params": masked}, tokens, carry)
    return dropped.hidden, by_matrix.hidden

  dropped, by_matrix = hidden_states(params, masked)
  np.testing.assert_allclose(dropped, by_matrix, rtol=1e-6, atol=1e-7)


def test_locked_dropout_mask_is_per_sequence_and_reproducible():
  mask = awd_lstm.locked_dropout_mask(jax.random.key(0), 1000, 0.25)
  np.testing.assert_allclose(np.unique(mask), [0.0, 4.0 / 3.0], rtol=1e-6)
  assert abs(float(mask.mean()) - 1.0) < 0.1
  np.testing.assert_array_equal(mask, awd_lstm.locked_dropout_mask(jax.random.key(0), 1000, 0.25))


def test_a_sequence_depends_only_on_its_own_key():
  model = tiny_model()
  params = init(model)
  batch = random_batch()
  keys = jax.random.split(jax.random.key(3), BATCH)
  other = keys.at[1].set(jax.random.key(99))
  run = jax.jit(lambda keys: model.apply(
      {"params": params}, batch["inputs"], model.initial_carry(BATCH), dropout_keys=keys,
      weight_dropout_key=jax.random.key(4)).logits)
  a, b = run(keys), run(other)
  others = np.array([0, 2, 3])
  np.testing.assert_array_equal(a[others], b[others])
  assert not np.allclose(a[1], b[1])
  np.testing.assert_array_equal(a, run(keys))


def test_lstm_layer_matches_a_reference_implementation():
  layer = awd_lstm.LSTMLayer(5)
  x = jax.random.normal(jax.random.key(0), (2, 4, 3))
  carry = (jnp.ones((2, 5)) * 0.1, jnp.ones((2, 5)) * -0.2)
  params = layer.init(jax.random.key(1), x, carry, 4)["params"]
  (h, c), outputs = layer.apply({"params": params}, x, carry, 4)

  sigmoid = lambda z: 1 / (1 + np.exp(-z))
  w_x, w_h, b = (np.asarray(params[name], np.float64)
                 for name in ("input_kernel", "hidden_kernel", "bias"))
  h_ref, c_ref = (np.asarray(v, np.float64) for v in carry)
  for t in range(4):
    z = np.asarray(x[:, t], np.float64) @ w_x + h_ref @ w_h + b
    i, f, g, o = np.split(z, 4, axis=-1)  # PyTorch's gate order.
    c_ref = sigmoid(f) * c_ref + sigmoid(i) * np.tanh(g)
    h_ref = sigmoid(o) * np.tanh(c_ref)
    np.testing.assert_allclose(outputs[:, t], h_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(h, h_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(c, c_ref, rtol=1e-5, atol=1e-6)


def test_padding_and_carrying_the_state_change_nothing():
  model = tiny_model(num_layers=1)
  params = init(model)
  tokens = random_batch(steps=10)["inputs"]
  apply = jax.jit(lambda tokens, carry, length=None: model.apply(
      {"params": params}, tokens, carry, length=length))
  whole = apply(tokens, model.initial_carry(BATCH))
  first = apply(tokens[:, :4], model.initial_carry(BATCH))
  second = apply(tokens[:, 4:], first.carry)
  np.testing.assert_allclose(second.logits, whole.logits[:, 4:], rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(second.carry, whole.carry, rtol=1e-5, atol=1e-6)
  padded = apply(jnp.pad(tokens[:, :4], ((0, 0), (0, 3))), model.initial_carry(BATCH), length=4)
  np.testing.assert_allclose(padded.logits[:, :4], first.logits, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(padded.carry, first.carry, rtol=1e-6, atol=1e-7)


def test_sequence_loss_averages_to_awd_lstm_loss():
  model = tiny_model(num_layers=1)
  params = init(model)
  batch = random_batch()
  out = jax.jit(lambda params: model.apply(
      {"params": params}, batch["inputs"], model.initial_carry(BATCH),
      dropout_keys=jax.random.split(jax.random.key(0), BATCH),
      weight_dropout_key=jax.random.key(1)))(params)
  losses, nll = awd_lstm.sequence_loss(out, batch["targets"], STEPS, activation_reg=2.0,
                                       temporal_activation_reg=1.0)
  log_probs = jax.nn.log_softmax(out.logits)
  cross_entropy = -jnp.mean(jnp.take_along_axis(log_probs, batch["targets"][..., None], -1))
  awd_loss = (cross_entropy + 2.0 * jnp.mean(out.dropped_hidden**2)
              + 1.0 * jnp.mean((out.hidden[:, 1:] - out.hidden[:, :-1])**2))
  np.testing.assert_allclose(losses.mean(), awd_loss, rtol=1e-5)
  np.testing.assert_allclose(nll.mean(), cross_entropy, rtol=1e-5)


def test_decoder_params_give_the_models_logits():
  for tie_weights in (True, False):
    model = tiny_model(num_layers=1, tie_weights=tie_weights)
    params = init(model)
    output = jax.jit(model.apply)({"params": params}, random_batch()["inputs"],
                                  model.initial_carry(BATCH))
    weight, bias = model.decoder_params(params)
    chex.assert_shape(weight, (VOCAB, output.dropped_hidden.shape[-1]))
    np.testing.assert_allclose(output.dropped_hidden @ weight.T + bias, output.logits,
                               rtol=1e-5, atol=1e-6)


def test_chunked_loss_equals_the_full_logits_loss():
  # VOCAB=50 in chunks of 7: 8 chunks, 6 padded words; 2 of the 6 steps are padding.
  model = tiny_model(num_layers=1)
  params = init(model)
  batch = random_batch()
  length = STEPS - 2
  hyper = dict(activation_reg=2.0, temporal_activation_reg=1.0)

  def apply(params, compute_logits=True):
    return model.apply({"params": params}, batch["inputs"], model.initial_carry(BATCH),
                       length=length, dropout_keys=jax.random.split(jax.random.key(0), BATCH),
                       weight_dropout_key=jax.random.key(1), compute_logits=compute_logits)

  def full(params):
    losses, nll = awd_lstm.sequence_loss(apply(params), batch["targets"], length, **hyper)
    return losses.mean(), (losses, nll)

  def chunked(params):
    output = apply(params, compute_logits=False)
    assert output.logits is None
    losses, nll = awd_lstm.sequence_loss_chunked(
        output, model.decoder_params(params), batch["targets"], length, vocab_chunk_size=7,
        **hyper)
    return losses.mean(), (losses, nll)

  grad = lambda f: jax.jit(jax.value_and_grad(f, has_aux=True))
  (_, (losses, nll)), grads = grad(chunked)(params)
  (_, expected), expected_grads = grad(full)(params)
  chex.assert_trees_all_close((losses, nll), expected, rtol=1e-5)
  chex.assert_trees_all_close(grads, expected_grads, rtol=1e-4, atol=1e-6)
  # Un-jitted, on the same model output.
  output = jax.jit(apply)(params)
  chex.assert_trees_all_close(
      awd_lstm.sequence_loss_chunked(output, model.decoder_params(params), batch["targets"],
                                     length, vocab_chunk_size=7, **hyper),
      awd_lstm.sequence_loss(output, batch["targets"], length, **hyper), rtol=1e-5)


def test_train_step_with_the_chunked_loss_equals_the_full_logits_step():
  model = tiny_model(num_layers=1)
  state = language.initial_train_state(model, BATCH, jax.random.key(0))
  batch = random_batch()
  hyper = dict(model=model, num_copies=2, mode="two_pass", learning_rate=1.0, bptt=STEPS,
               clip_grad_norm=0.25, weight_decay=1e-6, activation_reg=2.0,
               temporal_activation_reg=1.0)

  @jax.jit
  def run(state):
    return {chunk: language.train_step(state, batch, STEPS - 1, jax.random.key(5),
                                       vocab_chunk_size=chunk, **hyper) for chunk in (0, 16)}

  steps = run(state)
  chex.assert_trees_all_close(steps[16], steps[0], rtol=1e-5, atol=1e-6)


def test_evaluation_with_the_chunked_loss_equals_the_full_logits():
  model = tiny_model(num_layers=1)
  params = init(model)
  tokens = np.asarray(jax.random.randint(jax.random.key(2), (203,), 0, VOCAB), np.int32)
  segments = text_data.stacked_segments(text_data.batchify(tokens, BATCH), 8)
  assert segments["length"][-1] < 8  # The last segment is padded.
  evaluate = jax.jit(language.evaluate_segments,
                     static_argnames=("model", "batch_size", "vocab_chunk_size"))
  results = [evaluate(params, segments, model=model, batch_size=BATCH, vocab_chunk_size=chunk)
             for chunk in (0, 16)]
  chex.assert_trees_all_close(results[1], results[0], rtol=1e-5)


# ---------------------------------------------------------------------------
# MaxUp over the dropout masks.


def lm_loss_fn(model, weight_key):
  """The per-stream loss the trainer gives maxup_loss (carry in the batch)."""

  def loss_fn(params, batch, keys):
    out = model.apply({"params": params}, batch["inputs"], batch["carry"], dropout_keys=keys,
                      weight_dropout_key=weight_key)
    losses, _ = awd_lstm.sequence_loss(out, batch["targets"], STEPS, activation_reg=2.0,
                                       temporal_activation_reg=1.0)
    return losses, out.carry

  return loss_fn


def test_maxup_gradient_is_the_gradient_of_each_streams_worst_copy():
  model = tiny_model(num_layers=1)
  params = init(model)
  num_copies = 3
  batch = {**random_batch(), "carry": model.initial_carry(BATCH)}
  loss_fn = lm_loss_fn(model, jax.random.key(7))
  key = jax.random.key(11)
  keys = jax.random.split(key, num_copies * BATCH).reshape(num_copies, BATCH)

  @jax.jit
  def run(params):
    maxup = jax.value_and_grad(
        lambda p: maxup_loss(loss_fn, p, batch, key, num_copies, has_aux=True),
        has_aux=True)(params)
    # By hand: every copy of every stream from its key, the worst one per stream.
    copy_losses = jax.vmap(lambda k: loss_fn(params, batch, k)[0])(keys)
    winning_keys = keys[jnp.argmax(copy_losses, axis=0), jnp.arange(BATCH)]
    winners = jax.value_and_grad(lambda p: loss_fn(p, batch, winning_keys)[0].mean())(params)
    return maxup, copy_losses, winners, loss_fn(params, batch, winning_keys)[1]

  ((loss, aux), grads), copy_losses, (winners_loss, winners_grads), winners_carry = run(params)
  np.testing.assert_allclose(aux.copy_losses, copy_losses, rtol=1e-6)
  np.testing.assert_array_equal(aux.selected_copy, jnp.argmax(copy_losses, axis=0))
  assert len(set(np.asarray(aux.selected_copy).tolist())) > 1  # Winners from different copies.
  np.testing.assert_allclose(loss, copy_losses.max(axis=0).mean(), rtol=1e-6)
  np.testing.assert_allclose(loss, winners_loss, rtol=1e-6)
  chex.assert_trees_all_close(grads, winners_grads, rtol=1e-5, atol=1e-7)
  # The state carried on is that of the winning copies.
  chex.assert_trees_all_close(aux.loss_aux, winners_carry, rtol=1e-6)


def test_one_copy_is_plain_embedding_dropout():
  model = tiny_model(num_layers=1)
  params = init(model)
  batch = {**random_batch(), "carry": model.initial_carry(BATCH)}
  loss_fn = lm_loss_fn(model, jax.random.key(7))
  key = jax.random.key(11)

  @jax.jit
  def run(params):
    maxup = jax.value_and_grad(lambda p: maxup_loss(loss_fn, p, batch, key, 1, has_aux=True)[0])
    plain = jax.value_and_grad(lambda p: loss_fn(p, batch, jax.random.split(key, BATCH))[0].mean())
    return maxup(params), plain(params)

  (loss, grads), (plain_loss, plain_grads) = run(params)
  np.testing.assert_allclose(loss, plain_loss, rtol=1e-6)
  chex.assert_trees_all_close(grads, plain_grads, rtol=1e-6, atol=1e-8)


def test_train_step_carries_the_winners_state_and_scales_the_step():
  model = tiny_model(num_layers=1)
  params = init(model)
  batch = random_batch()
  state = language.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, avg_params=params,
      avg_count=jnp.zeros((), jnp.int32), averaging=jnp.ones((), bool), best_params=params,
      carry=model.initial_carry(BATCH))
  # The configs' chunked loss (1024 words at a time; this vocabulary is one chunk).
  hyper = dict(model=model, num_copies=2, learning_rate=1.0, bptt=STEPS, clip_grad_norm=0.0,
               weight_decay=0.0, activation_reg=2.0, temporal_activation_reg=1.0,
               vocab_chunk_size=1024)
  key = jax.random.key(5)
  maxup_key, weight_key = jax.random.split(key)
  loss_fn = functools.partial(_length_loss, model, weight_key, STEPS // 2)

  @jax.jit
  def run(state):
    steps = {mode: language.train_step(state, batch, STEPS // 2, key, mode=mode, **hyper)
             for mode in ("two_pass", "single_pass")}
    reference = jax.value_and_grad(
        lambda p: maxup_loss(loss_fn, p, {**batch, "carry": state.carry}, maxup_key, 2,
                             has_aux=True), has_aux=True)(state.params)
    return steps, reference

  steps, ((_, aux), grads) = run(state)
  # lr * length / bptt = 0.5; the first averaged iterate is the new iterate.
  expected = jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)
  for new, metrics in steps.values():
    chex.assert_trees_all_close(new.carry, aux.loss_aux, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(new.params, expected, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(new.avg_params, new.params)
    assert int(new.avg_count) == 1
    assert float(metrics["loss"]) >= float(metrics["mean_copy_loss"])


def _length_loss(model, weight_key, length, params, batch, keys):
  out = model.apply({"params": params}, batch["inputs"], batch["carry"], length=length,
                    dropout_keys=keys, weight_dropout_key=weight_key)
  losses, _ = awd_lstm.sequence_loss(out, batch["targets"], length, activation_reg=2.0,
                                     temporal_activation_reg=1.0)
  return losses, out.carry


def test_bad_model_settings_fail_clearly():
  with pytest.raises(ValueError, match="embed_dropout=1.0"):
    awd_lstm.AWDLSTM(vocab_size=10, embed_dropout=1.0)
  with pytest.raises(ValueError, match="num_layers=0"):
    awd_lstm.AWDLSTM(vocab_size=10, num_layers=0)
  model = tiny_model()
  with pytest.raises(ValueError, match=r"one key per sequence, shape \(4,\)"):
    model.apply({"params": init(model)}, random_batch()["inputs"], model.initial_carry(BATCH),
                dropout_keys=jax.random.split(jax.random.key(0), 3))


# ---------------------------------------------------------------------------
# Dynamic evaluation.


def test_dynamic_eval_update_is_rms_normalised_sgd_with_decay_to_the_trained_weights():
  params = {"w": jnp.array([1.0, 2.0]), "b": jnp.array([0.5])}
  trained = {"w": jnp.array([0.0, 0.0]), "b": jnp.array([0.0])}
  grads = {"w": jnp.array([0.2, -0.4]), "b": jnp.array([1.0])}
  stats = dynamic_eval.gradient_stats({"w": jnp.array([0.04, 0.16]), "b": jnp.array([4.0])},
                                      num_segments=1, decay=0.1)
  # rms = |g|; the global mean is mean(mean(0.2, 0.4), 2.0) = 1.15; rates capped at 1/decay.
  np.testing.assert_allclose(stats.decay_rate["w"], [0.2 / 1.15, 0.4 / 1.15], rtol=1e-6)
  new = dynamic_eval.update(params, grads, trained, stats, learning_rate=0.01, decay=0.1,
                            epsilon=0.0)
  np.testing.assert_allclose(
      new["w"], [1.0 - 0.01 - 0.1 * 0.2 / 1.15 * 1.0, 2.0 + 0.01 - 0.1 * 0.4 / 1.15 * 2.0],
      rtol=1e-6)
  capped = dynamic_eval.gradient_stats({"w": jnp.array([1e-6, 100.0])}, 1, decay=0.6)
  np.testing.assert_allclose(capped.decay_rate["w"][1], 1 / 0.6, rtol=1e-6)


def test_dynamic_eval_scores_before_adapting_and_adapts_to_the_text():
  # A unigram model p = softmax(theta) reading a text of one repeated word.
  def segment_loss(params, carry, segment):
    log_probs = jax.nn.log_softmax(params["logits"])
    nll_sum = -jnp.sum(log_probs[segment])
    return nll_sum / segment.size, (carry, nll_sum, jnp.float32(segment.size))

  params = {"logits": jnp.zeros(5)}
  segments = jnp.full((20, 3), 2)
  stats = dynamic_eval.collect_gradient_stats(segment_loss, params, (), segments[:2], decay=0.01)
  result = dynamic_eval.evaluate(segment_loss, params, (), segments, stats, learning_rate=0.1,
                                 decay=0.01, epsilon=1e-3)
  static_nll = float(jnp.log(5.0)) * 60
  assert float(result.num_tokens) == 60
  assert float(result.nll_sum) < 0.7 * static_nll
  first = dynamic_eval.evaluate(segment_loss, params, (), segments[:1], stats, learning_rate=0.1,
                                decay=0.01, epsilon=1e-3)
  np.testing.assert_allclose(first.nll_sum, jnp.log(5.0) * 3, rtol=1e-6)  # Scored, then adapted.
  assert int(jnp.argmax(result.params["logits"])) == 2
