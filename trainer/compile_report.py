"""Plans a TPU run before renting it: compiles a config's steps for a slice on any machine.

With the `libtpu` package installed (`pip install "maxup-jax[tpu]"`),
`jax.experimental.topologies.get_topology_desc` gives the devices of a TPU
slice without a TPU, and `jax.jit(step).lower(abstract arguments sharded
over a mesh of them).compile()` runs the real TPU compiler on the CPU. This
module builds the exact steps a run trains with (`image.build_steps`,
`language.build_steps`: the functions `train.py` uses), compiles them for the
slice of the config's TPU preset (`configs/hardware.py`) with abstract inputs
(no data, no weights), and reports per chip: memory against the chip's HBM
(with the options that would make a step fit), FLOPs, collectives, and an
estimated step time, epoch time and chip-hours for the config's recipe.

Everything it reports about time is an estimate: a roofline over the chip's
published peak bfloat16 FLOP/s and HBM bandwidth, which leaves out
collectives, host input, step dispatch and any operation running below peak.

XLA's cost analysis counts the body of a loop once, not once per iteration.
MaxUp's copies are evaluated in a `lax.map` (a scan of m iterations at
`copies_per_pass=1`) and the AWD-LSTM runs a scan over time, so the
compiler's FLOPs undercount both. The report adds what the loops repeat: the
matmul and convolution FLOPs of every scan body times its trip count less
one, counted on the step's jaxpr (`loop_flops`), divided over the devices
(the loops run on the sharded batch); HBM bytes are scaled by the same
factor. `tests/test_compile_tpu.py` checks the corrected figure against the
same step compiled with all copies in one vmapped pass (no loop).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
import re
import time
from typing import Callable, NamedTuple

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np

from configs import hardware
from maxup_jax import augment as augment_lib
from maxup_jax import smoothing
from trainer import certification, core, image, image_data, language, text_data

GIB = 2**30


class Chip(NamedTuple):
  """A TPU chip's published figures (per chip)."""

  name: str
  hbm_bytes: float
  peak_bf16_flops: float  # FLOP/s
  hbm_bandwidth: float  # bytes/s
  ici_bandwidth: float  # bytes/s, bidirectional, per chip
  source: str


# Google Cloud's TPU pages: v4 "Peak compute per chip 275 teraflops (bf16 or
# int8); HBM2 capacity and bandwidth 32 GiB, 1200 GBps"; v5e "Peak compute per
# chip (bf16) 197 TFLOPs; HBM2 capacity and bandwidth 16 GB, 819 GBps;
# bidirectional ICI bandwidth per chip 400 GBps". The v4 page gives no per-chip
# ICI figure; 6 links x 50 GB/s (TPU v4 paper, Jouppi et al. 2023) is used.
CHIPS = {
    "v4": Chip("TPU v4", 32 * GIB, 275e12, 1200e9, 300e9,
               "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("TPU v5e", 16 * GIB, 197e12, 819e9, 400e9,
                "https://cloud.google.com/tpu/docs/v5e"),
}

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
INSTALL_HINT = ('pip install "maxup-jax[tpu]" (in a checkout: .venv/bin/pip install '
                f'"jax[tpu]=={jax.__version__}"), which brings the libtpu package')


class LibtpuMissing(RuntimeError):
  """Compiling for a TPU needs the libtpu package."""


# ---------------------------------------------------------------------------
# The slice.


def chip_of(topology: str) -> Chip:
  kind = topology.split(":")[0]
  if kind not in CHIPS:
    raise ValueError(f"topology={topology!r}; known chips: {sorted(CHIPS)}")
  return CHIPS[kind]


def _accelerator_type(topology: str, megacore: bool) -> str:
  kind, _, dims = topology.partition(":")
  chips = math.prod(int(d) for d in dims.split("x"))
  return f"v4-{2 * chips}" if kind == "v4" else f"v5litepod-{chips}"


def topology_devices(topology: str, megacore: bool = False) -> list:
  """The devices of a TPU slice, e.g. 'v5e:2x2' (4 chips), without a TPU.

  `megacore` (TPU v4): one device per chip, its two TensorCores as one, as a
  v4 slice runs by default; else one device per TensorCore.

  Raises:
    LibtpuMissing: libtpu is not installed (the message says what to install).
  """
  if importlib.util.find_spec("libtpu") is None:
    raise LibtpuMissing(f"compiling for a TPU slice needs libtpu: {INSTALL_HINT}")
  # No TPU here: tell libtpu what it would otherwise look for (and warn about),
  # and let it load next to other processes that loaded it.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", _accelerator_type(topology, megacore))
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  kwargs = {"chip_config_name": "megacore"} if megacore else {}
  return list(topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                           **kwargs).devices)


def topology_mesh(topology: str, megacore: bool = False) -> jax.sharding.Mesh:
  """A one-axis ('data') mesh over the devices of a TPU slice, as training runs on."""
  return jax.sharding.Mesh(np.array(topology_devices(topology, megacore)), (core.DATA_AXIS,))


# ---------------------------------------------------------------------------
# One compiled program.


def loop_flops(fn: Callable, *args) -> tuple[float, float, float]:
  """FLOPs of `fn(*args)` counting every scan body once, and trip-count times; and the
  FLOPs inside `while` loops (counted once in both: their trip count is known at run time only).

  Only matmuls (`dot_general`) and convolutions, the FLOPs that matter for a
  roofline, counted on the jaxpr; the first two differ by what a loop-blind
  cost analysis misses.
  """
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  once, _ = _jaxpr_flops(jaxpr, False)
  repeated, in_while = _jaxpr_flops(jaxpr, True)
  return once, repeated, in_while


def _jaxpr_flops(jaxpr, repeat_loops: bool, in_while: bool = False) -> tuple[float, float]:
  """(FLOPs, of which inside `while` loops) of a jaxpr."""
  total = inside = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    flops = 0.0
    if name == "dot_general":
      (contracting, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      flops = 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contracting)
    elif name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial)
      per_output = rhs[spec[1]] * math.prod(rhs[d] for d in spec[2:])
      flops = 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_output
    total += flops
    inside += flops if in_while else 0.0
    if name == "cond":
      branches = [_jaxpr_flops(b.jaxpr, repeat_loops, in_while) for b in eqn.params["branches"]]
      best = max(branches)
      total, inside = total + best[0], inside + best[1]
      continue
    times = eqn.params["length"] if name == "scan" and repeat_loops else 1
    for sub in jex_core.jaxprs_in_params(eqn.params):
      sub_total, sub_inside = _jaxpr_flops(sub, repeat_loops, in_while or name == "while")
      total, inside = total + times * sub_total, inside + times * sub_inside
  return total, inside


def _lower(fn, args):
  """`fn.lower(*args)`, also for a `functools.partial` of a jitted function."""
  if isinstance(fn, functools.partial) and hasattr(fn.func, "lower"):
    return fn.func.lower(*fn.args, *args, **fn.keywords)
  return (fn if hasattr(fn, "lower") else jax.jit(fn)).lower(*args)


def _nbytes_per_device(tree) -> int:
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) else leaf.shape
    total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
  return total


_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|f16|bf16|s32|u32|f32|s64|u64|f64)\[([\d,]*)\]")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
             "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(-done)?\(")


def _shape_bytes(text: str) -> int:
  return sum(_ITEMSIZE[dtype] * math.prod(int(d) for d in dims.split(",") if d)
             for dtype, dims in _SHAPE.findall(text))


def collectives(hlo_text: str) -> dict[str, dict[str, float]]:
  """Collectives of a compiled (partitioned) module: op -> {count, bytes} per step and device.

  Bytes are each op's result size (asynchronous ops counted at their `-done`).
  Ops inside a `while` body are multiplied by the loop's trip count, read off
  the integer constant its condition compares against (1 when there is none).
  """
  computations, current = {}, None
  for line in hlo_text.splitlines():
    header = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if header and not line.startswith(" "):
      current = header.group(1)
      computations[current] = []
    elif current is not None:
      computations[current].append(line)
  # Multiplicity of each computation: a while body runs trip-count times its parent.
  trips = {}
  for lines in computations.values():
    for line in lines:
      match = re.search(r"\swhile\(.*condition=%?([\w.\-]+), body=%?([\w.\-]+)", line)
      if match:
        constants = re.findall(r"s32\[\]\S* constant\((\d+)\)",
                               "\n".join(computations.get(match.group(1), [])))
        trips[match.group(2)] = (int(constants[0]) if len(constants) == 1 else 1, None)
  parents = {}
  for name, lines in computations.items():
    for line in lines:
      for callee in re.findall(r"(?:body|to_apply|calls|branch_computations=\{)=?%?([\w.\-]+)", line):
        parents.setdefault(callee, name)

  @functools.cache
  def multiplicity(name, depth=0):
    if depth > 50 or name not in parents:
      return 1
    own = trips[name][0] if name in trips else 1
    return own * multiplicity(parents[name], depth + 1)

  out = {op: {"count": 0, "bytes": 0.0} for op in COLLECTIVES}
  for name, lines in computations.items():
    for line in lines:
      match = _INSTRUCTION.match(line)
      if match:
        times = multiplicity(name)
        out[match.group(2)]["count"] += times
        out[match.group(2)]["bytes"] += times * _shape_bytes(match.group(1))
  return {op: v for op, v in out.items() if v["count"]}


@dataclasses.dataclass
class Program:
  """One program compiled for one chip of the slice; sizes in bytes per chip.

  `flops` and `hbm_bytes` include what loop bodies repeat (`loop_flops`);
  `compiled_flops` is the compiler's own (loop bodies once).
  """

  name: str
  fits: bool
  compile_seconds: float
  error: str = ""
  state_bytes: float = 0.0  # parameters + optimizer state (+ carried state) per chip
  argument_bytes: float = 0.0
  output_bytes: float = 0.0
  alias_bytes: float = 0.0
  temp_bytes: float = 0.0
  code_bytes: float = 0.0
  peak_bytes: float = 0.0
  compiled_flops: float = 0.0
  compiled_hbm_bytes: float = 0.0
  loop_flops_added: float = 0.0
  # FLOPs per chip inside `while` loops whose trip count only the run knows (e.g. the
  # chunked cross-entropy's row blocks), counted once: `flops` undercounts by
  # (trips - 1) x these.
  while_loop_flops: float = 0.0
  flops: float = 0.0
  hbm_bytes: float = 0.0
  compiler_seconds: float = 0.0  # the compiler's own estimate, loop bodies once
  collectives: dict = dataclasses.field(default_factory=dict)
  roofline_seconds: float = 0.0
  bound: str = ""
  batch_size: int = 0  # Set for a fit option that changes the batch.


def compile_program(name: str, fn: Callable, args: tuple, chip: Chip, num_devices: int,
                    state_arg: int | None = 0) -> Program:
  """Compiles `fn(*args)` (abstract, sharded args) and reads its per-chip figures.

  A program that does not fit the chip's HBM at compile time
  (`RESOURCE_EXHAUSTED`, e.g. `CompileTimeHbmOom`) is returned with `fits=False`
  and, where the compiler says it, the memory it needed as `peak_bytes`.
  """
  started = time.time()
  try:
    compiled = _lower(fn, args).compile()
  except Exception as e:  # The TPU compiler raises JaxRuntimeError / XlaRuntimeError.
    message = str(e)
    if "RESOURCE_EXHAUSTED" not in message and "HbmOom" not in message and (
        "out of memory" not in message.lower()):
      raise
    program = Program(name, fits=False, compile_seconds=time.time() - started,
                      error=message.splitlines()[0][:300])
    # "Used 45.68G of 15.75G hbm" or "the total memory required for HLO temporaries
    # (58.77G) exceeds available HBM (15.75G)".
    used = (re.search(r"Used ([\d.]+)([KMGT]) of [\d.]+[KMGT] hbm", message)
            or re.search(r"required for [^(]*\(([\d.]+)([KMGT])\) exceeds available HBM", message))
    if used:
      scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
      program.peak_bytes = float(used.group(1)) * scale[used.group(2)]
    return program
  seconds = time.time() - started
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, list) else cost) or {}
  once, repeated, in_while = loop_flops(fn, *args)
  program = Program(name, fits=True, compile_seconds=seconds)
  program.argument_bytes = memory.argument_size_in_bytes
  program.output_bytes = memory.output_size_in_bytes
  program.alias_bytes = memory.alias_size_in_bytes
  program.temp_bytes = memory.temp_size_in_bytes
  program.code_bytes = memory.generated_code_size_in_bytes
  program.peak_bytes = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                        - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
  program.state_bytes = _nbytes_per_device(args[state_arg]) if state_arg is not None else 0
  program.compiled_flops = float(cost.get("flops", 0.0))
  program.compiled_hbm_bytes = float(cost.get("bytes accessed", 0.0))
  program.loop_flops_added = (repeated - once) / num_devices
  program.while_loop_flops = in_while / num_devices
  program.flops = program.compiled_flops + program.loop_flops_added
  scale = program.flops / program.compiled_flops if program.compiled_flops else 1.0
  program.hbm_bytes = program.compiled_hbm_bytes * scale
  program.compiler_seconds = float(cost.get("optimal_seconds", -1.0))
  program.collectives = collectives(compiled.as_text())
  program.fits = program.peak_bytes <= chip.hbm_bytes
  compute, memory_time = program.flops / chip.peak_bf16_flops, program.hbm_bytes / chip.hbm_bandwidth
  program.roofline_seconds = max(compute, memory_time)
  program.bound = "compute" if compute >= memory_time else "HBM bandwidth"
  return program


# ---------------------------------------------------------------------------
# A config's report.


@dataclasses.dataclass
class Report:
  """What `compile_config` found; `format()` prints it, `asdict()` stores it."""

  config_name: str
  preset: str
  topology: str
  chip: str
  chips: int
  hbm_bytes: float
  task: str
  unit: str  # images | tokens
  batch_size: int
  num_copies: int
  programs: dict = dataclasses.field(default_factory=dict)  # name -> Program
  fit_options: list = dataclasses.field(default_factory=list)  # (description, Program)
  flops_ratio: float = 0.0  # MaxUp / standard step FLOPs
  ideal_ratio: float = 0.0  # 1 + m/3: m forwards on top of a forward+backward (= 3 forwards)
  step_seconds: float = 0.0  # the MaxUp step's estimate
  units_per_second: float = 0.0  # images or tokens per second, the whole slice
  epoch_seconds: float = 0.0
  recipe_epochs: float = 0.0
  recipe_seconds: float = 0.0
  recipe_chip_hours: float = 0.0
  certification_chip_hours: float = 0.0
  notes: list = dataclasses.field(default_factory=list)

  @property
  def fits(self) -> bool:
    return all(p.fits for p in self.programs.values())

  def asdict(self) -> dict:
    return dataclasses.asdict(self) | {"fits": self.fits}

  def format(self) -> str:
    return format_report(self)


def _preset_of(config) -> tuple[str, hardware.Preset]:
  name = config.get("preset", "")
  if name not in hardware.PRESETS or not hardware.PRESETS[name].topology:
    tpu = sorted(p for p, s in hardware.PRESETS.items() if s.topology)
    raise ValueError(
        f"--compile_only compiles for a TPU preset's slice; config.preset={name!r}. Use "
        f"--config configs/hardware.py:PRESET:BASE[:ARG] with PRESET one of {tpu}")
  return name, hardware.PRESETS[name]


def compile_config(config, config_name: str = "", *, try_fit_options: bool = True,
                   include_eval: bool = True, mesh: jax.sharding.Mesh | None = None) -> Report:
  """Compiles the steps `config` trains with for its TPU preset's slice (`config.preset`).

  Args:
    config: a config built by `configs/hardware.py` with a TPU preset.
    config_name: how the report names it (e.g. the --config argument).
    try_fit_options: when the MaxUp step does not fit, also compile it with
      the options that could make it fit and report each.
    include_eval: also compile the evaluation (and, for Gaussian-noise
      training, the certification) programs.
    mesh: the devices to compile for; default the preset's slice.
  """
  preset_name, preset = _preset_of(config)
  chip = chip_of(preset.topology)
  mesh = mesh if mesh is not None else topology_mesh(preset.topology, preset.megacore)
  task = config.task
  report = Report(config_name=config_name, preset=preset_name, topology=preset.topology,
                  chip=chip.name, chips=mesh.size, hbm_bytes=chip.hbm_bytes, task=task,
                  unit="images" if task == "image" else "tokens",
                  batch_size=config.batch_size, num_copies=config.maxup.num_copies)
  if task == "image":
    _image_report(report, config, mesh, chip, try_fit_options, include_eval)
  elif task == "language":
    _language_report(report, config, mesh, chip, include_eval)
  else:
    raise ValueError(f"config.task={task!r}")
  m = config.maxup.num_copies
  maxup, standard = report.programs.get("train_maxup"), report.programs["train_standard"]
  if maxup is not None and maxup.flops and standard.flops:
    report.flops_ratio = maxup.flops / standard.flops
  # Two-pass: m forwards on top of one forward+backward (3 forwards); single-pass: m of those.
  report.ideal_ratio = 1 + m / 3 if config.maxup.mode == "two_pass" else float(m)
  report.notes += [
      "Times are estimates: a roofline max(FLOPs / peak bf16 FLOP/s, HBM bytes / HBM "
      "bandwidth) per chip from the compiler's counts and the chip's published peaks. They "
      "leave out collectives (listed, not timed), host input, step dispatch, checkpoints, "
      "and every operation running below peak; real steps are slower.",
      "FLOPs and HBM bytes add what loop bodies repeat (XLA's cost analysis counts a loop "
      "body once): matmul/convolution FLOPs of each scan body x (trips - 1), from the jaxpr, "
      "over the devices; HBM bytes scaled by the same factor.",
  ]
  return report


def _image_report(report, config, mesh, chip, try_fit_options, include_eval):
  facts = image_data.published_dataset_facts(
      config.dataset, config.num_train_examples, config.num_eval_examples)
  image.validate_config(config, mesh.size)
  steps = image.build_steps(config, mesh, facts)
  m = config.maxup.num_copies

  def train_program(steps, num_copies, name):
    args = (steps.abstract_state, steps.abstract_batch(config.batch_size), steps.abstract_key())
    return compile_program(name, steps.train_steps[num_copies], args, chip, mesh.size)

  if m > 1:
    report.programs["train_maxup"] = train_program(steps, m, "train_maxup")
  report.programs["train_standard"] = train_program(steps, 1, "train_standard")
  if include_eval:
    args = (steps.abstract_state, steps.abstract_batch(config.eval_batch_size, eval=True))
    report.programs["eval"] = compile_program("eval", steps.eval_steps[False], args, chip,
                                              mesh.size)
    if config.augment.gaussian_sigma:
      report.programs["certify_batch"] = _smoothing_program(config, steps, mesh, chip)
  biggest = report.programs.get("train_maxup", report.programs["train_standard"])
  if try_fit_options and not biggest.fits:
    report.fit_options = _try_fit_options(config, mesh, chip, facts, m)

  if "certify_batch" in report.programs:
    images = math.ceil(facts.num_eval_examples / CERTIFY.skip)
    size = certify_batch_size(mesh.size)
    batches = math.ceil(CERTIFY.n0 / size) + math.ceil(CERTIFY.n / size)
    seconds = images * batches * report.programs["certify_batch"].roofline_seconds
    report.certification_chip_hours = seconds * mesh.size / 3600
    report.notes.append(
        f"Certification (certify.py's defaults, the paper's setting): every {CERTIFY.skip}th "
        f"test image ({images}), n0={CERTIFY.n0} + n={CERTIFY.n} noise samples in batches of "
        f"{size} (certify.py's {CERTIFY.batch_size:,}, rounded to a multiple of the devices; "
        f"{batches} "
        "batches per image).")

  # Estimates: the MaxUp warm-up runs standard steps. A step that does not fit is
  # estimated with the first option that makes it fit, if any.
  spe = steps.steps_per_epoch
  t_max = biggest.roofline_seconds
  t_std = report.programs["train_standard"].roofline_seconds
  fitting = [(d, p) for d, p in report.fit_options if p is not None and p.fits]
  if not biggest.fits and fitting:
    option = fitting[0][1]
    # A smaller batch: the config's batch in several such steps.
    t_max = option.roofline_seconds * config.batch_size / (option.batch_size or config.batch_size)
    t_std = t_std or t_max
    report.notes.append(f"Time estimates are those of the step with {fitting[0][0]}.")
  if not t_max or not t_std:
    report.notes.append("No time estimate: a training step does not fit the chip.")
    return
  t_eval = report.programs["eval"].roofline_seconds if "eval" in report.programs else 0.0
  eval_batches = math.ceil(facts.num_eval_examples / config.eval_batch_size)
  evals_per_epoch = 1.0 / config.eval_every_epochs
  report.step_seconds = t_max
  report.units_per_second = config.batch_size / t_max if t_max else 0.0
  report.epoch_seconds = spe * t_max + evals_per_epoch * eval_batches * t_eval
  warmup = min(config.maxup.warmup_epochs, config.num_epochs) if m > 1 else 0.0
  report.recipe_epochs = config.num_epochs
  report.recipe_seconds = (warmup * spe * t_std + (config.num_epochs - warmup) * spe * t_max
                           + config.num_epochs * evals_per_epoch * eval_batches * t_eval)
  report.recipe_chip_hours = report.recipe_seconds * mesh.size / 3600
  report.notes.append(
      f"Recipe: {config.num_epochs:g} epochs of {spe} steps ({facts.num_train_examples} "
      f"images / batch {config.batch_size}), the first {warmup:g} with standard steps, and "
      f"an evaluation of {facts.num_eval_examples} images every {config.eval_every_epochs:g} "
      "epoch(s); not the input pipeline (ImageNet JPEG decoding is CPU work).")


# certify.py's defaults, certifying every 20th test image as Cohen et al. (2019) do on CIFAR-10.
CERTIFY = certification.CertifySettings(skip=20)


def certify_batch_size(num_devices: int) -> int:
  """certify.py's noise samples per batch, rounded up to split evenly over the devices."""
  return -(-CERTIFY.batch_size // num_devices) * num_devices


def _smoothing_program(config, steps, mesh, chip) -> Program:
  """One batch of randomized-smoothing noise samples (`smoothing.NoiseCounter.step`).

  The base classifier is the trained model in eval mode on [0, 1] pixels, as
  `certification.classifier_from_workdir` builds it.
  """
  model, facts = steps.model, steps.facts
  mean, std = image_data.DATASET_STATS[config.dataset]
  replicated = steps.replicated

  def batch(variables, counts, x, key, batch_index, num_samples, sigma):
    classify = lambda images: model.apply(variables, augment_lib.normalize(images, mean, std),
                                          train=False)
    counter = smoothing.NoiseCounter(classify, facts.num_classes,
                                     certify_batch_size(mesh.size), sharding=mesh)
    return counter.step(counts, x, key, batch_index, num_samples, sigma)

  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)
  variables = {"params": steps.abstract_state.params,
               "batch_stats": steps.abstract_state.batch_stats}
  args = (variables, spec((facts.num_classes,), jnp.int32),
          spec(tuple(facts.image_shape), jnp.float32), steps.abstract_key(),
          spec((), jnp.int32), spec((), jnp.int32), spec((), jnp.float32))
  return compile_program("certify_batch", jax.jit(batch), args, chip, mesh.size)


def _try_fit_options(config, mesh, chip, facts, num_copies) -> list:
  """Compiles the largest step again with each option that could make it fit."""
  tries = []
  per_device = config.batch_size // mesh.size
  candidates = []
  if not config.remat:
    candidates.append(("remat=True", {"remat": True}))
  if config.maxup.mode == "two_pass" and config.dtype != "bfloat16" and (
      config.maxup.selection_dtype != "bfloat16"):
    candidates.append(("maxup.selection_dtype=bfloat16", {"maxup.selection_dtype": "bfloat16"}))
  else:
    tries.append(("maxup.selection_dtype=bfloat16: not applicable (the step already computes "
                  "in bfloat16, or selects in one pass)", None))
  if config.maxup.copies_per_pass != 1:
    candidates.append(("maxup.copies_per_pass=1", {"maxup.copies_per_pass": 1}))
  else:
    tries.append(("maxup.copies_per_pass: already 1, the least memory (one copy per pass)",
                  None))
  for divisor in (2, 4):
    if per_device // divisor >= 1:
      candidates.append((f"per-device batch {per_device // divisor} (remat=True)",
                         {"remat": True, "batch_size": mesh.size * (per_device // divisor)}))
  for description, overrides in candidates:
    trial = config.copy_and_resolve_references()
    for key, value in overrides.items():
      node, _, leaf = key.rpartition(".")
      (trial[node] if node else trial)[leaf] = value
    steps = image.build_steps(trial, mesh, facts)
    args = (steps.abstract_state, steps.abstract_batch(trial.batch_size), steps.abstract_key())
    program = compile_program(description, steps.train_steps[num_copies], args, chip, mesh.size)
    program.batch_size = trial.batch_size
    tries.append((description, program))
    if program.fits:
      break
  return tries


def _language_report(report, config, mesh, chip, include_eval):
  language.validate_config(config, mesh.size)
  counts = text_data.PUBLISHED_COUNTS[config.dataset]
  steps = language.build_steps(config, mesh, counts.vocab)
  m = config.maxup.num_copies
  seq_len = text_data.padded_length(config.bptt, config.seq_len_bucket)
  args = (steps.abstract_state, steps.abstract_batch(config.batch_size, seq_len),
          jax.ShapeDtypeStruct((), jnp.int32, sharding=steps.replicated), steps.abstract_key())
  if m > 1:
    report.programs["train_maxup"] = compile_program("train_maxup", steps.train_steps[m], args,
                                                     chip, mesh.size)
  report.programs["train_standard"] = compile_program("train_standard", steps.train_steps[1],
                                                      args, chip, mesh.size)
  valid_segments = math.ceil(counts.valid // config.eval_batch_size / config.bptt)
  if include_eval:
    spec = lambda shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=steps.replicated)
    segments = {"inputs": spec((valid_segments, config.eval_batch_size, config.bptt)),
                "targets": spec((valid_segments, config.eval_batch_size, config.bptt)),
                "length": spec((valid_segments,))}
    eval_fn = jax.jit(lambda params, segments: steps.eval_step(params, segments,
                                                               config.eval_batch_size))
    report.programs["eval"] = compile_program("eval", eval_fn,
                                              (steps.abstract_state.params, segments), chip,
                                              mesh.size)
  # Epoch 0's segments (a function of the seed): each step's time scaled by its padded length.
  segments = steps.epoch_segments(counts.train // config.batch_size, 0)
  padded = np.array([text_data.padded_length(int(n), config.seq_len_bucket)
                     for n in segments[:, 1]])
  t_step = report.programs.get("train_maxup", report.programs["train_standard"]).roofline_seconds
  t_eval = report.programs["eval"].roofline_seconds if "eval" in report.programs else 0.0
  report.step_seconds = t_step
  report.units_per_second = config.batch_size * config.bptt / t_step if t_step else 0.0
  report.epoch_seconds = float(np.sum(padded / seq_len) * t_step) + t_eval
  report.recipe_epochs = config.num_epochs + config.finetune.num_restarts * config.finetune.num_epochs
  report.recipe_seconds = report.recipe_epochs * report.epoch_seconds
  report.recipe_chip_hours = report.recipe_seconds * mesh.size / 3600
  report.notes.append(
      f"Recipe: at most {report.recipe_epochs} epochs ({config.num_epochs} + "
      f"{config.finetune.num_restarts} fine-tuning restarts x {config.finetune.num_epochs}; "
      f"NT-ASGD usually ends phases earlier) of {len(segments)} segments (epoch 0's), each "
      f"step's time scaled from the compiled length {seq_len} by its padded length, and a "
      f"validation pass per epoch; not the final test and dynamic evaluation. The model "
      "computes in float32, whose matmuls run at the bfloat16 peak only at JAX's default "
      "TPU precision (one bfloat16 pass).")


# ---------------------------------------------------------------------------
# Printing.


def _gib(x: float) -> str:
  if abs(x) >= GIB / 10:
    return f"{x / GIB:.2f} GiB"
  return f"{x / 2**20:.1f} MiB"


def _seconds(x: float) -> str:
  if x >= 3600:
    return f"{x / 3600:.2f} h"
  if x >= 1:
    return f"{x:.2f} s"
  return f"{x * 1e3:.3g} ms"


def format_report(report: Report) -> str:
  lines = [
      f"Compile-only report: {report.config_name or '(config)'}",
      f"  preset {report.preset}: {report.chips} x {report.chip} ({report.topology}), "
      f"HBM {_gib(report.hbm_bytes)} per chip; global batch {report.batch_size}, "
      f"m={report.num_copies}",
      f"  fits: {'yes' if report.fits else 'NO'}",
      "",
      "Per chip:",
  ]
  for program in report.programs.values():
    lines += _program_lines(program, report.hbm_bytes)
  if report.fit_options:
    lines.append("Options tried for the step that does not fit:")
    for description, program in report.fit_options:
      if program is None:
        lines.append(f"  {description}")
        continue
      status = (f"fits, peak {_gib(program.peak_bytes)}" if program.fits else
                f"does not fit ({_gib(program.peak_bytes) if program.peak_bytes else '?'})")
      lines.append(f"  {description}: {status}")
  lines.append("")
  if report.flops_ratio:
    lines.append(f"MaxUp / standard step FLOPs: {report.flops_ratio:.2f} "
                 f"(two-pass ideal 1 + m/3 = {report.ideal_ratio:.2f})")
  if not report.step_seconds:
    lines.append("Estimated step: none (a training step does not fit)")
  else:
    lines += [
      f"Estimated step: {_seconds(report.step_seconds)}; {report.units_per_second:,.0f} "
      f"{report.unit}/s on the slice",
      f"Estimated epoch: {_seconds(report.epoch_seconds)}; recipe ({report.recipe_epochs:g} "
      f"epochs): {_seconds(report.recipe_seconds)} = {report.recipe_chip_hours:,.3g} chip-hours",
    ]
  if report.certification_chip_hours:
    lines.append(f"Estimated certification: {report.certification_chip_hours:,.3g} chip-hours")
  lines.append("")
  lines += [f"Note: {note}" for note in report.notes]
  return "\n".join(lines)


def _program_lines(p: Program, hbm: float) -> list[str]:
  if not p.compile_seconds and not p.peak_bytes:
    return [f"  {p.name}: not compiled"]
  head = f"  {p.name} (compiled in {p.compile_seconds:.0f} s):"
  if p.error:
    need = f", needs {_gib(p.peak_bytes)}" if p.peak_bytes else ""
    return [head, f"    does NOT fit: the compiler ran out of HBM{need} of {_gib(hbm)} "
            f"({p.error.split(' exceeds ')[0][:200]})"]
  coll = ", ".join(f"{op} x{v['count']} ({v['bytes'] / 2**20:.1f} MiB)"
                   for op, v in p.collectives.items()) or "none"
  compiler = (f"compiler's estimate {_seconds(p.compiler_seconds)} (loop bodies once)"
              if p.compiler_seconds > 0 else "compiler's estimate unusable (negative)")
  return [
      head,
      f"    memory: parameters + optimizer state {_gib(p.state_bytes)}, other inputs "
      f"{_gib(max(0, p.argument_bytes - p.state_bytes))}, temporaries {_gib(p.temp_bytes)}, outputs "
      f"{_gib(p.output_bytes - p.alias_bytes)} (+{_gib(p.alias_bytes)} in donated inputs); "
      f"peak {_gib(p.peak_bytes)} of {_gib(hbm)}: {'fits' if p.fits else 'does NOT fit'}",
      f"    FLOPs: {p.flops / 1e12:.4g} TFLOP ({p.compiled_flops / 1e12:.4g} counted by the "
      f"compiler + {p.loop_flops_added / 1e12:.4g} repeated by loops); HBM traffic "
      f"{_gib(p.hbm_bytes)}" + (
          f"; a lower bound: {p.while_loop_flops / 1e12:.4g} TFLOP in loops of run-time "
          "length are counted once" if p.while_loop_flops else ""),
      f"    collectives per step: {coll}",
      f"    roofline {_seconds(p.roofline_seconds)} ({p.bound}-bound); {compiler}",
  ]
