"""Our language-model training step against a faithful PyTorch reference, timed in the same process.

The PyTorch side is the same algorithm written the way a PyTorch user would:
the same LSTM stack (`torch.nn.LSTM` per layer, the hidden-to-hidden weights
DropConnect-masked once per step and shared by every copy, as AWD-LSTM's
WeightDrop does), tied embeddings, embedding dropout that drops whole word
types per stream (one mask over the vocabulary per stream, gathered at the
stream's tokens), locked dropout with one mask per stream, AR and TAR, and
for MaxUp m forward passes under `torch.no_grad()`, the per-stream argmax of
the copies' losses and one forward/backward on the winners' masks; then SGD
with gradient clipping and weight decay, the learning rate scaled by
length / bptt. The hidden state is carried from step to step, as in training.

Our side is the train step of `trainer.language.build_steps`, what `train.py`
runs, on a segment padded to the config's `seq_len_bucket` as the training
loop pads it.
Both frameworks use the same number of threads (all cores by default) and
are called in turn in every round. `JAX sys/user` is the system / user CPU
time of the process during the timed JAX calls (`os.times()`).

  python -m benchmarks.vs_pytorch_lm                       # both shapes, m=2
  python -m benchmarks.vs_pytorch_lm --shapes wikitext2 --repeats 5
  python -m benchmarks.vs_pytorch_lm --shapes none --eval  # evaluation of a WikiText-2-size text

Needs PyTorch (the `bench` extra): pip install torch.
"""

from __future__ import annotations

import argparse
import os
import sys

SHAPES = {
    # configs/ptb_small_lstm.py as it is: 2 x 200 LSTM, vocabulary 10k, 32 streams.
    "ptb_small": dict(vocab_size=10_000, embed_dim=200, hidden_dim=200, num_layers=2,
                      batch_size=32),
    # The same recipe with WikiText-2's 33,278-word vocabulary and a 1 x 64 LSTM, 16 streams.
    "wikitext2": dict(vocab_size=33_278, embed_dim=64, hidden_dim=64, num_layers=1,
                      batch_size=16),
}
WIKITEXT2_VALID_TOKENS = 217_646


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--shapes", default="ptb_small,wikitext2",
                      help=f"comma-separated, of {sorted(SHAPES)} (or 'none')")
  parser.add_argument("--num_copies", type=int, default=2, help="m of the MaxUp step")
  parser.add_argument("--bptt", type=int, default=35, help="segment length (real tokens)")
  parser.add_argument("--seq_len_bucket", type=int, default=0,
                      help="pad segments to a multiple of this (0 = the config's)")
  parser.add_argument("--vocab_chunk_size", type=int, default=-1,
                      help="our loss's vocabulary chunk (-1 = the config's, "
                           "0 = full logits)")
  parser.add_argument("--jax_variants", default="",
                      help="more JAX steps to time beside the default one, ';'-separated, each "
                           "a ','-separated list of chunk=N (vocab_chunk_size, 0 = full "
                           "logits) and bucket=N (seq_len_bucket), e.g. 'chunk=0;bucket=8'")
  parser.add_argument("--repeats", type=int, default=7, help="timed rounds (medians are reported)")
  parser.add_argument("--threads", type=int, default=os.cpu_count(),
                      help="intra-op threads of both frameworks")
  parser.add_argument("--xla_flags", default="", help="extra XLA_FLAGS for this run")
  parser.add_argument("--eval", action="store_true",
                      help="also time evaluation of a WikiText-2-size validation text "
                           f"({WIKITEXT2_VALID_TOKENS} synthetic tokens) with the full-logits "
                           "and the chunked loss")
  parser.add_argument("--eval_repeats", type=int, default=3)
  return parser.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.xla_flags:
  # XLA reads its flags once, when the backend starts: set them before importing jax.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + ARGS.xla_flags).strip()

from benchmarks import common  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from configs import ptb_small_lstm  # noqa: E402
from trainer import core, language, text_data, timing  # noqa: E402


def shape_config(shape: str, args, variant: str = ""):
  """configs/ptb_small_lstm.py with the model and batch of `shape` and a `--jax_variants` entry."""
  config = ptb_small_lstm.get_config()
  fields = SHAPES[shape]
  for name in ("embed_dim", "hidden_dim", "num_layers"):
    config.model[name] = fields[name]
  config.batch_size = fields["batch_size"]
  config.bptt = args.bptt
  if args.seq_len_bucket:
    config.seq_len_bucket = args.seq_len_bucket
  if args.vocab_chunk_size >= 0:
    config.vocab_chunk_size = args.vocab_chunk_size
  for override in filter(None, variant.split(",")):
    name, value = override.split("=")
    field = {"chunk": "vocab_chunk_size", "bucket": "seq_len_bucket"}[name]
    config[field] = int(value)
  return config


# ---------------------------------------------------------------------------
# The PyTorch reference.


class TorchAWDLSTM(nn.Module):
  """AWD-LSTM with tied weights and per-stream dropout masks passed in."""

  def __init__(self, vocab_size, embed_dim, hidden_dim, num_layers):
    super().__init__()
    self.embedding = nn.Embedding(vocab_size, embed_dim)
    nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
    sizes = [hidden_dim] * (num_layers - 1) + [embed_dim]
    inputs = [embed_dim] + sizes[:-1]
    self.lstms = nn.ModuleList(nn.LSTM(i, o) for i, o in zip(inputs, sizes))
    self.decoder_bias = nn.Parameter(torch.zeros(vocab_size))
    self.sizes = sizes

  def initial_hidden(self, batch_size):
    return [(torch.zeros(1, batch_size, n), torch.zeros(1, batch_size, n)) for n in self.sizes]

  def forward(self, tokens, hidden, masks, weight_masks):
    """tokens [T, B]; masks: per-stream embedding scale [T, B] and locked masks [B, F];
    weight_masks: one DropConnect mask per layer. Returns (logits, hidden, raw, dropped)."""
    x = self.embedding(tokens) * masks["embed"][..., None]
    x = x * masks["locked"][0][None]
    new_hidden = []
    for layer, lstm in enumerate(self.lstms):
      weights = {"weight_hh_l0": lstm.weight_hh_l0 * weight_masks[layer]}
      x, h = torch.func.functional_call(lstm, weights, (x, hidden[layer]))
      new_hidden.append(h)
      raw = x
      x = x * masks["locked"][layer + 1][None]
    logits = F.linear(x, self.embedding.weight, self.decoder_bias)  # AWD-LSTM's nn.Linear.
    return logits, new_hidden, raw, x


class TorchTrainer:
  """Standard and MaxUp (A)SGD steps of AWD-LSTM in PyTorch, as its users would write them."""

  def __init__(self, config, vocab_size, inputs, targets, length, seed=0):
    torch.manual_seed(seed)
    m = config.model
    self.model = TorchAWDLSTM(vocab_size, m.embed_dim, m.hidden_dim, m.num_layers).train()
    self.config = config
    self.vocab_size = vocab_size
    self.lr = config.learning_rate * length / config.bptt
    self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.lr,
                                     weight_decay=config.weight_decay)
    self.inputs = torch.from_numpy(np.ascontiguousarray(inputs[:, :length].T)).long()
    self.targets = torch.from_numpy(np.ascontiguousarray(targets[:, :length].T)).long()
    self.batch_size = inputs.shape[0]
    self.hidden = self.model.initial_hidden(self.batch_size)
    self.generator = torch.Generator().manual_seed(seed)

  def _bernoulli_scale(self, shape, rate):
    keep = torch.rand(shape, generator=self.generator) >= rate
    return keep.float() / (1.0 - rate)

  def _draw_masks(self):
    """One copy's masks: word types dropped per stream, locked masks per stream."""
    m = self.config.model
    type_scale = self._bernoulli_scale((self.batch_size, self.vocab_size), m.embed_dropout)
    embed = type_scale.gather(1, self.inputs.t()).t()  # [T, B]
    sizes = self.model.sizes
    locked = [self._bernoulli_scale((self.batch_size, m.embed_dim), m.input_dropout)]
    locked += [self._bernoulli_scale((self.batch_size, n), m.hidden_dropout) for n in sizes[:-1]]
    locked.append(self._bernoulli_scale((self.batch_size, sizes[-1]), m.output_dropout))
    return {"embed": embed, "locked": locked}

  def _weight_masks(self):
    rate = self.config.model.weight_dropout
    return [self._bernoulli_scale(lstm.weight_hh_l0.shape, rate) for lstm in self.model.lstms]

  def _stream_losses(self, masks, weight_masks):
    """Per-stream AWD-LSTM loss [B]: mean token NLL + AR + TAR."""
    logits, hidden, raw, dropped = self.model(self.inputs, self.hidden, masks, weight_masks)
    nll = F.cross_entropy(logits.reshape(-1, self.vocab_size), self.targets.reshape(-1),
                          reduction="none").view(self.targets.shape).mean(0)
    ar = dropped.pow(2).mean(-1).mean(0)
    tar = (raw[1:] - raw[:-1]).pow(2).mean(-1).mean(0)
    loss = nll + self.config.activation_reg * ar + self.config.temporal_activation_reg * tar
    return loss, hidden

  def _update(self, masks, weight_masks):
    self.optimizer.zero_grad(set_to_none=True)
    losses, hidden = self._stream_losses(masks, weight_masks)
    loss = losses.mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip_grad_norm)
    self.optimizer.step()
    self.hidden = [(h.detach(), c.detach()) for h, c in hidden]
    return loss.item()

  def standard_step(self):
    return self._update(self._draw_masks(), self._weight_masks())

  def maxup_step(self, num_copies):
    weight_masks = self._weight_masks()  # Shared by the copies.
    copies, copy_losses = [], []
    with torch.no_grad():
      for _ in range(num_copies):
        masks = self._draw_masks()
        copies.append(masks)
        copy_losses.append(self._stream_losses(masks, weight_masks)[0])
    worst = torch.stack(copy_losses).argmax(dim=0)  # [B]
    streams = torch.arange(self.batch_size)
    embed = torch.stack([c["embed"] for c in copies])  # [m, T, B]
    winners = {
        "embed": embed[worst, :, streams].t(),
        "locked": [torch.stack([c["locked"][i] for c in copies])[worst, streams]
                   for i in range(len(copies[0]["locked"]))],
    }
    return self._update(winners, weight_masks)


# ---------------------------------------------------------------------------
# Our side.


class TimedCPU:
  """Wraps a callable to record its process CPU times per call."""

  def __init__(self, fn):
    self.fn = fn
    self.cpu_times = []

  def __call__(self):
    before = os.times()
    self.fn()
    after = os.times()
    self.cpu_times.append((after.user - before.user, after.system - before.system))


def sys_over_user(cpu_times, repeats):
  timed = cpu_times[-repeats:]
  user = sum(u for u, _ in timed)
  system = sum(s for _, s in timed)
  return system / user if user else float("nan")


def compare_step(shape: str, args) -> list[list]:
  config = shape_config(shape, args)
  vocab_size = SHAPES[shape]["vocab_size"]
  rng = np.random.default_rng(0)
  streams = rng.integers(0, vocab_size, (config.batch_size, args.bptt + 1), dtype=np.int32)
  kinds = {"standard": 1, f"maxup m={args.num_copies}": args.num_copies}
  variants = [""] + [v for v in args.jax_variants.split(";") if v]
  runners = {}
  torch_trainers = {}
  for kind, copies in kinds.items():
    for variant in variants:
      variant_config = shape_config(shape, args, variant)
      padded = text_data.padded_length(args.bptt, variant_config.seq_len_bucket)
      batch = text_data.segment(streams, 0, args.bptt, padded)
      runners[f"jax {kind} {variant}"] = common.language_runner(
          variant_config, vocab_size, batch, args.bptt, copies)
    torch_trainers[kind] = TorchTrainer(config, vocab_size, batch["inputs"], batch["targets"],
                                        args.bptt)
  runners["torch standard"] = TimedCPU(torch_trainers["standard"].standard_step)
  maxup_kind = f"maxup m={args.num_copies}"
  runners[f"torch {maxup_kind}"] = TimedCPU(
      lambda: torch_trainers[maxup_kind].maxup_step(args.num_copies))

  times = timing.interleaved_medians(runners, args.repeats, warmup=2)
  medians = {name: timing.median(t) for name, t in times.items()}
  best = {name: min(t) for name, t in times.items()}
  tokens = args.bptt * config.batch_size
  rows = []
  for kind in kinds:
    for variant in variants:
      ours, theirs = f"jax {kind} {variant}", f"torch {kind}"
      label = f"{shape} {kind}" + (f" ({variant})" if variant else "")
      rows.append([label, tokens / medians[ours], tokens / medians[theirs],
                   medians[theirs] / medians[ours], best[theirs] / best[ours],
                   sys_over_user(runners[ours].cpu_times, args.repeats),
                   sys_over_user(runners[theirs].cpu_times, args.repeats)])
  print(f"# {shape}: vocab {vocab_size}, {config.model.num_layers} x {config.model.hidden_dim} "
        f"LSTM (embedding {config.model.embed_dim}), batch {config.batch_size}, bptt "
        f"{args.bptt} (ours padded to {text_data.padded_length(args.bptt, config.seq_len_bucket)}"
        f" unless a variant says otherwise), vocab_chunk_size "
        f"{config.vocab_chunk_size}; loadavg after: "
        f"{'%.2f %.2f %.2f' % os.getloadavg()}")
  sys.stdout.flush()
  return rows


# ---------------------------------------------------------------------------
# Evaluation of a WikiText-2-size validation text.


def time_evaluation(args) -> list[list]:
  config = shape_config("wikitext2", args)
  vocab_size = SHAPES["wikitext2"]["vocab_size"]
  tokens = np.random.default_rng(0).integers(0, vocab_size, WIKITEXT2_VALID_TOKENS,
                                             dtype=np.int32)
  segments = jax.device_put(text_data.stacked_segments(
      text_data.batchify(tokens, config.eval_batch_size), config.bptt))
  rows, results = [], {}
  variants = {"full logits": 0,
              "chunked (default)": ptb_small_lstm.get_config().vocab_chunk_size}
  for name, chunk in variants.items():
    config.vocab_chunk_size = chunk
    # The same seed, so the same weights for both losses.
    steps = language.build_steps(config, core.create_mesh(1), vocab_size)
    params = steps.init_state().params
    evaluate = lambda: jax.block_until_ready(
        steps.eval_step(params, segments, config.eval_batch_size))
    evaluate()  # Compilation.
    seconds, cpu = [], []
    for _ in range(args.eval_repeats):
      before = os.times()
      seconds.append(timing.timed(evaluate))
      after = os.times()
      cpu.append((after.user - before.user, after.system - before.system))
    total, count = evaluate()
    results[name] = float(total / count)
    rows.append([name, timing.median(seconds), WIKITEXT2_VALID_TOKENS / timing.median(seconds),
                 sys_over_user(cpu, args.eval_repeats), f"{results[name]:.7f}"])
  print(f"# evaluation: {WIKITEXT2_VALID_TOKENS} synthetic tokens, vocab {vocab_size}, "
        f"1 x 64 LSTM, eval batch {config.eval_batch_size}, segments of {config.bptt}; "
        f"median of {args.eval_repeats}; loadavg after: {'%.2f %.2f %.2f' % os.getloadavg()}")
  return rows


def main(args):
  torch.set_num_threads(args.threads)
  shapes = [] if args.shapes == "none" else args.shapes.split(",")
  for shape in shapes:
    if shape not in SHAPES:
      raise SystemExit(f"unknown shape {shape!r}; valid: {sorted(SHAPES)}")
  timing.print_environment(torch=torch.__version__, threads=args.threads,
                           torch_threads=torch.get_num_threads(), repeats=args.repeats,
                           num_copies=args.num_copies)
  rows = []
  for shape in shapes:
    rows += compare_step(shape, args)
  if rows:
    header = ["step", "JAX tokens/s", "PyTorch tokens/s", "JAX / PyTorch",
              "JAX / PyTorch (best rounds)", "JAX sys/user", "PyTorch sys/user"]
    print(f"# medians and best of {args.repeats} interleaved rounds; XLA_FLAGS="
          f"{os.environ.get('XLA_FLAGS', '')!r}")
    common.print_table(header, rows)
  if args.eval:
    header = ["loss", "seconds", "tokens/s", "sys/user", "mean NLL"]
    common.print_table(header, time_evaluation(args))


if __name__ == "__main__":
  main(ARGS)
