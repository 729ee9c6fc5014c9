"""Certify a test set with randomized smoothing; write, resume and report logs.

`certify_dataset` runs CERTIFY (`maxup_jax.smoothing.certify`) on every
`skip`-th test image and appends one row per image to

    {out_dir}/certify_sigma{sigma}.tsv      idx label predict radius correct time

in the format of Cohen et al.'s `certify.py` (tab separated, header line;
`predict` is -1 on abstention, `time` is seconds). Every row is flushed as soon
as it is written, so an interrupted run loses at most the image in flight, and
a rerun with the same settings continues where it stopped. The noise of image
`idx` is drawn from `fold_in(key, idx)`, so a resumed log is identical to an
uninterrupted one (apart from the time column).

`CertifySettings` holds every setting of a certification (CERTIFY's n0, n,
alpha, the noise level and seed, which images, where the outputs go), checked
when it is made; `certify_dataset` and `certify_workdir` take it whole.

`certify_workdir` does this for a training run of `trainer.image`: it builds
the base classifier from the run's config and newest checkpoint
(`classifier_from_workdir`) and certifies the run's test split; `certify.py`
at the repository root is its command line.

When the run ends, the certified accuracy at the paper's radii is printed and
written to `certified_accuracy_sigma{sigma}.tsv`, and the certified-accuracy
curve to `certified_accuracy_sigma{sigma}.png`. `read_log`, `accuracy_table`,
`plot_certified_accuracy` and `write_comparison` regenerate tables and plots
from logs alone, e.g. to compare two models:

    certification.write_comparison(
        {"Gauss": "runs/gauss/certify/certify_sigma0.5.tsv",
         "MaxUp+Gauss": "runs/maxup/certify/certify_sigma0.5.tsv"},
        "runs/compare_sigma0.5")
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence, Union

import flax
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding

from maxup_jax import augment as augment_lib
from maxup_jax import smoothing
from trainer import checkpointing, core, image, image_data, loop

COLUMNS = ("idx", "label", "predict", "radius", "correct", "time")
HEADER = "\t".join(COLUMNS)
TABLE_RADII = (0.0,) + smoothing.PAPER_RADII
"""Radii of the saved tables: 0 (the smoothed classifier's accuracy) and the paper's."""


class CertificationLog(NamedTuple):
  """The columns of a certification TSV, one entry per certified image.

  Attributes:
    idx: `[N]` int64 test-set index.
    label: `[N]` int64 true class.
    predict: `[N]` int64 certified class, -1 on abstention.
    radius: `[N]` float64 certified l2 radius (0 on abstention).
    correct: `[N]` bool, predict == label.
    time: `[N]` float64 seconds spent on the image.
  """

  idx: np.ndarray
  label: np.ndarray
  predict: np.ndarray
  radius: np.ndarray
  correct: np.ndarray
  time: np.ndarray


class CertificationRun(NamedTuple):
  """What `certify_dataset` wrote and computed."""

  log_path: Path
  table_path: Path
  plot_path: Path
  radii: tuple[float, ...]
  accuracies: np.ndarray  # [len(radii)] certified accuracy over the whole log
  num_images: int  # rows in the log
  num_new: int  # rows certified by this call


LogLike = Union[str, os.PathLike, CertificationLog]


# ----------------------------------------------------------------------------
# Settings.


@dataclasses.dataclass(frozen=True)
class CertifySettings:
  """Every setting of a certification, checked when made.

  `certify.py` builds one from its flags (a flag per field, with these
  defaults); `certify_workdir` fills in the fields left None from the training
  run and hands the result to `certify_dataset`. The log's config JSON records
  sigma, n0, n, alpha, batch_size, skip, split and seed, and a log made with
  other values of them is not resumed; max_images, data_dir and out_dir may
  change between calls.

  Attributes:
    sigma: smoothing noise level (in [0, 1] pixel units for image runs), a
      finite number > 0. None: the run's `augment.gaussian_sigma`
      (`certify_workdir`); `certify_dataset` needs a number.
    n0: noise samples that select the top class, >= 1.
    n: noise samples that estimate its probability, >= 1.
    alpha: failure probability of each certificate, in (0, 1).
    batch_size: noise samples per classifier call, >= 1 (`certify_workdir`:
      a multiple of the devices the batch is split over).
    skip: certify every skip-th image (Cohen et al. use 20 on CIFAR-10), >= 1.
    max_images: stop after this many selected images, >= 0; None: all. A later
      call with a larger value (or None) continues the same log.
    split: the dataset split the images are from. None: the run's evaluation
      split (`certify_workdir`); `certify_dataset` records it when given.
    data_dir: tfds data dir the split is read from (`certify_workdir`). None:
      the run's `data_dir`, else $TFDS_DATA_DIR.
    out_dir: directory of the log, config, table and plot (created if
      needed). None: `{workdir}/certify` (`certify_workdir`); `certify_dataset`
      needs one.
    seed: seed of the noise, any integer; image i uses
      `fold_in(key(seed), i)`.
  """

  sigma: float | None = None
  n0: int = 100
  n: int = 100_000
  alpha: float = 0.001
  batch_size: int = 1000
  skip: int = 1
  max_images: int | None = None
  split: str | None = None
  data_dir: str | os.PathLike | None = None
  out_dir: str | os.PathLike | None = None
  seed: int = 0

  def __post_init__(self):
    # Normalised in place (numpy scalars to Python numbers) so that the settings
    # compare and serialise to JSON the same however they were given.
    set_field = lambda name, value: object.__setattr__(self, name, value)
    if self.sigma is not None:
      set_field("sigma", _float_setting(
          "sigma", self.sigma, lambda v: v > 0,
          "a finite number > 0 (or None: the run's training sigma)"))
    for name in ("n0", "n", "batch_size", "skip"):
      set_field(name, core.require_int(name, getattr(self, name), 1))
    if self.max_images is not None:
      set_field("max_images", core.require_int("max_images", self.max_images, 0))
    set_field("alpha", _float_setting("alpha", self.alpha, lambda v: 0 < v < 1, "in (0, 1)"))
    if self.split is not None and not (isinstance(self.split, str) and self.split):
      raise ValueError(f"split must be a split name such as 'test' (or None: the run's "
                       f"evaluation split), got {self.split!r}")
    for name in ("data_dir", "out_dir"):
      value = getattr(self, name)
      if value is not None and not (isinstance(value, (str, os.PathLike)) and os.fspath(value)):
        raise ValueError(f"{name} must be a directory path (or None), got {value!r}")
    if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
      raise ValueError(f"seed must be an integer, got {self.seed!r}")
    set_field("seed", int(self.seed))


def _float_setting(name: str, value: Any, is_valid: Callable[[float], bool], valid: str) -> float:
  """`value` as a float, if it is a finite real number (a bool is not one) that `is_valid`.

  Raises:
    ValueError: naming `name`, `value` and what is `valid`.
  """
  real = (not isinstance(value, bool)
          and isinstance(value, (int, float, np.integer, np.floating))
          and math.isfinite(value))
  if not (real and is_valid(float(value))):
    raise ValueError(f"{name} must be {valid}, got {value!r}")
  return float(value)


# ----------------------------------------------------------------------------
# File names.


def _sigma_tag(sigma: float) -> str:
  return format(float(sigma), "g")


def log_path(out_dir: str | os.PathLike, sigma: float) -> Path:
  """`{out_dir}/certify_sigma{sigma}.tsv`."""
  return Path(out_dir) / f"certify_sigma{_sigma_tag(sigma)}.tsv"


def config_path(out_dir: str | os.PathLike, sigma: float) -> Path:
  """`{out_dir}/certify_sigma{sigma}.json`: the settings a log was made with."""
  return Path(out_dir) / f"certify_sigma{_sigma_tag(sigma)}.json"


def table_path(out_dir: str | os.PathLike, sigma: float) -> Path:
  """`{out_dir}/certified_accuracy_sigma{sigma}.tsv`."""
  return Path(out_dir) / f"certified_accuracy_sigma{_sigma_tag(sigma)}.tsv"


def plot_path(out_dir: str | os.PathLike, sigma: float) -> Path:
  """`{out_dir}/certified_accuracy_sigma{sigma}.png`."""
  return Path(out_dir) / f"certified_accuracy_sigma{_sigma_tag(sigma)}.png"


# ----------------------------------------------------------------------------
# Reading logs and tables.


def _repair_log(path: Path) -> None:
  """Drops a trailing line cut short by a crash (no final newline)."""
  with open(path, "rb+") as f:
    data = f.read()
    if data and not data.endswith(b"\n"):
      f.truncate(data.rfind(b"\n") + 1)


def read_log(path: str | os.PathLike) -> CertificationLog:
  """Reads a certification TSV written by `certify_dataset` (or Cohen et al.).

  The time column may be seconds or `H:MM:SS.ffffff`. A last line without a
  newline (a write cut short) is ignored.

  Args:
    path: the TSV file.

  Returns:
    A `CertificationLog` with one entry per row, in file order.
  """
  path = Path(path)
  text = path.read_text()
  lines = text.split("\n")
  if not lines or lines[0].strip() != HEADER:
    raise ValueError(f"{path} is not a certification log: header must be {HEADER!r}")
  # Only newline-terminated lines are complete: split leaves the (possibly
  # partial) remainder after the last newline as the final element.
  rows = [r for r in lines[1:-1] if r.strip()]
  columns: list[list[Any]] = [[] for _ in COLUMNS]
  for line_no, row in enumerate(rows, start=2):
    fields = row.split("\t")
    if len(fields) != len(COLUMNS):
      raise ValueError(
          f"{path}:{line_no}: expected {len(COLUMNS)} tab-separated fields, got {len(fields)}")
    for column, field in zip(columns, fields):
      column.append(field)
  idx = np.asarray(columns[0], dtype=np.int64)
  if len(np.unique(idx)) != len(idx):
    raise ValueError(f"{path} lists some image index more than once")
  return CertificationLog(
      idx=idx,
      label=np.asarray(columns[1], dtype=np.int64),
      predict=np.asarray(columns[2], dtype=np.int64),
      radius=np.asarray(columns[3], dtype=np.float64),
      correct=np.asarray(columns[4], dtype=np.int64).astype(bool),
      time=np.asarray([_parse_seconds(t) for t in columns[5]], dtype=np.float64),
  )


def _parse_seconds(field: str) -> float:
  if ":" not in field:
    return float(field)
  hours, minutes, seconds = field.split(":")
  return 3600 * float(hours) + 60 * float(minutes) + float(seconds)


def _as_log(log: LogLike) -> CertificationLog:
  return log if isinstance(log, CertificationLog) else read_log(log)


def accuracy_table(log: LogLike, radii: Sequence[float] = TABLE_RADII) -> np.ndarray:
  """Certified accuracy of a log at each radius.

  Args:
    log: a `CertificationLog` or the path of a certification TSV.
    radii: `[T]` radii.

  Returns:
    `[T]` fraction of logged images with correct prediction and radius >= r.
  """
  log = _as_log(log)
  return smoothing.certified_accuracy(log.radius, log.correct, radii)


def format_accuracy_table(
    radii: Sequence[float],
    accuracies: Mapping[str, np.ndarray],
    title: str = "",
) -> str:
  """A fixed-width text table: one column per radius, one row per model.

  Args:
    radii: `[T]` radii.
    accuracies: row label -> `[T]` certified accuracies in [0, 1]; printed
      in percent.
    title: optional first line.

  Returns:
    The table as a string (no trailing newline).
  """
  label_width = max([len("radius")] + [len(k) for k in accuracies])
  lines = [title] if title else []
  lines.append("radius".ljust(label_width) + "".join(f"{r:>7.2f}" for r in radii))
  for label, acc in accuracies.items():
    lines.append(label.ljust(label_width) + "".join(f"{100 * a:>6.1f}%" for a in acc))
  return "\n".join(lines)


def write_accuracy_table(
    path: str | os.PathLike,
    radii: Sequence[float],
    accuracies: Mapping[str, np.ndarray],
) -> Path:
  """Writes `radius<TAB>label1<TAB>...` with one row per radius (fractions)."""
  path = Path(path)
  labels = list(accuracies)
  with open(path, "w") as f:
    f.write("\t".join(["radius"] + labels) + "\n")
    for i, r in enumerate(radii):
      f.write("\t".join([f"{r:.2f}"] + [f"{accuracies[k][i]:.6f}" for k in labels]) + "\n")
  return path


# ----------------------------------------------------------------------------
# Plots.


def _certified_accuracy_curve(log: CertificationLog) -> tuple[np.ndarray, np.ndarray]:
  """Exact breakpoints of r -> acc(r), for a post-step plot.

  acc(r) = #{i : correct_i and radius_i >= r} / N is piecewise constant and
  drops by 1/N at each certified-correct radius. Returns xs = [0, r_(1), ...,
  r_(m)] (sorted certified-correct radii) and ys = [m, m-1, ..., 0] / N, so
  acc = ys[j] just right of xs[j].
  """
  num_images = len(log.radius)
  if num_images == 0:
    raise ValueError("cannot plot an empty certification log")
  radii = np.sort(log.radius[log.correct])
  xs = np.concatenate([[0.0], radii])
  ys = np.arange(len(radii), -1, -1) / num_images
  return xs, ys


def plot_certified_accuracy(
    logs: Mapping[str, LogLike],
    out_path: str | os.PathLike,
    title: str,
    max_radius: float | None = None,
) -> Path:
  """Plots certified accuracy vs l2 radius for one or more logs on one figure.

  Each curve is the exact step function acc(r); dotted verticals mark the
  paper's radii. Uses matplotlib's Agg canvas directly (no display, no global
  pyplot state).

  Args:
    logs: legend label -> `CertificationLog` or TSV path.
    out_path: where to write the PNG.
    title: figure title (e.g. with sigma and n).
    max_radius: right end of the x axis; default covers the paper's radii and
      every certified radius.

  Returns:
    `out_path` as a Path.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  if not logs:
    raise ValueError("plot_certified_accuracy needs at least one log")
  curves = {label: _certified_accuracy_curve(_as_log(log)) for label, log in logs.items()}
  if max_radius is None:
    largest = max(float(xs[-1]) for xs, _ in curves.values())
    max_radius = max(smoothing.PAPER_RADII[-1] + 0.25, 1.05 * largest)
  fig = Figure(figsize=(6.4, 4.8))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for label, (xs, ys) in curves.items():
    # Extend the last level to the right edge so every curve spans the axis.
    ax.step(np.append(xs, max_radius), np.append(ys, ys[-1]), where="post", label=label)
  for r in smoothing.PAPER_RADII:
    ax.axvline(r, color="0.85", linestyle=":", linewidth=0.8, zorder=0)
  ax.set_xlim(0.0, max_radius)
  ax.set_ylim(0.0, 1.0)
  ax.set_xlabel(r"$\ell_2$ radius")
  ax.set_ylabel("certified accuracy")
  ax.set_title(title)
  ax.legend(loc="upper right")
  fig.tight_layout()
  out_path = Path(out_path)
  fig.savefig(out_path, dpi=150)
  return out_path


def write_comparison(
    logs: Mapping[str, LogLike],
    out_prefix: str | os.PathLike,
    title: str = "Certified accuracy",
    radii: Sequence[float] = TABLE_RADII,
) -> dict[str, np.ndarray]:
  """Table and plot comparing several logs: `{out_prefix}.tsv` and `.png`.

  Args:
    logs: label -> `CertificationLog` or TSV path.
    out_prefix: output path without extension.
    title: figure and table title.
    radii: radii of the table.

  Returns:
    label -> `[len(radii)]` certified accuracies (also printed).
  """
  logs = {label: _as_log(log) for label, log in logs.items()}
  accuracies = {label: accuracy_table(log, radii) for label, log in logs.items()}
  print(format_accuracy_table(radii, accuracies, title))
  write_accuracy_table(f"{out_prefix}.tsv", radii, accuracies)
  plot_certified_accuracy(logs, f"{out_prefix}.png", title)
  return accuracies


# ----------------------------------------------------------------------------
# Certification run.


# The names a log's config JSON may not take from `extra_settings`.
_RESERVED_SETTINGS = frozenset(f.name for f in dataclasses.fields(CertifySettings)) | {"key"}


def _recorded_settings(settings: CertifySettings, key: jax.Array | None,
                       extra_settings: Mapping[str, Any] | None) -> dict[str, Any]:
  """The settings a log depends on, in the order of its config JSON.

  The order and the values are those of every log written so far, so that a
  log's JSON is rewritten byte for byte when it is resumed.
  """
  config = {"sigma": settings.sigma, "n0": settings.n0, "n": settings.n,
            "alpha": settings.alpha, "batch_size": settings.batch_size, "skip": settings.skip}
  if settings.split is not None:
    config["split"] = settings.split
  config.update(extra_settings or {})
  if key is None:
    config["seed"] = settings.seed
  else:
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    data = jax.random.key_data(key) if typed else key
    config["key"] = np.asarray(data).ravel().tolist()
  return config


def _check_or_write_config(path: Path, config: dict[str, Any], resuming: bool) -> None:
  """Refuses to resume a log made with other settings; records the settings."""
  if resuming and path.exists():
    previous = json.loads(path.read_text())
    differing = {k: (previous.get(k), v) for k, v in config.items() if previous.get(k) != v}
    if differing:
      details = ", ".join(f"{k}: log has {old!r}, now {new!r}"
                          for k, (old, new) in differing.items())
      raise ValueError(
          f"{path.with_suffix('.tsv')} was made with other settings ({details}); "
          "use a new out_dir or the same settings")
  path.write_text(json.dumps(config, indent=2) + "\n")


def certify_dataset(
    classify_fn: smoothing.ClassifyFn,
    images: Any,
    labels: Any,
    settings: CertifySettings,
    *,
    key: jax.Array | None = None,
    num_classes: int | None = None,
    sharding: Mesh | NamedSharding | None = None,
    extra_settings: Mapping[str, Any] | None = None,
    log_fn: Callable[[str], None] | None = print,
) -> CertificationRun:
  """Certifies every `skip`-th image, resuming an existing log; writes a report.

  Images `0, skip, 2 * skip, ...` (the first `settings.max_images` of them) are
  certified with `smoothing.certify` using key `fold_in(key, idx)`; images
  already in the log are skipped. Then the certified accuracy of the whole log
  at `TABLE_RADII` is printed and saved with its plot.

  Args:
    classify_fn: `[b, *image_shape] -> [b, num_classes]` logits on raw inputs
      (noise is added before any normalisation the classifier does).
    images: `[N, *image_shape]` floating point test inputs: an array, or any
      sequence that yields one image per index (only certified ones are read).
    labels: `[N]` int labels, an array or sequence.
    settings: sigma, n0, n, alpha, batch_size, skip, max_images, seed, and the
      out_dir the log, config, table and plot go to; sigma and out_dir must be
      given. `split`, when given, is recorded with the others; `data_dir` is
      not used (the images are already here).
    key: optional base PRNG key; overrides `settings.seed`.
    num_classes: K; inferred from classify_fn's output shape if None.
    sharding: optional `Mesh`/`NamedSharding` with a 'data' axis.
    extra_settings: further JSON-serialisable settings the log depends on
      (e.g. the checkpoint step); recorded with the others, and a log made
      with different values is not resumed.
    log_fn: receives one progress line per image and the final table; None
      for silence.

  Returns:
    A `CertificationRun` with the output paths and accuracies.
  """
  if not isinstance(settings, CertifySettings):
    raise TypeError(f"settings must be a CertifySettings, got {type(settings).__name__}")
  if settings.sigma is None or settings.out_dir is None:
    raise ValueError(
        f"certify_dataset needs settings.sigma and settings.out_dir, got sigma="
        f"{settings.sigma!r} and out_dir={settings.out_dir!r} (only certify_workdir fills them "
        "in from a training run)")
  clashing = sorted(_RESERVED_SETTINGS.intersection(extra_settings or {}))
  if clashing:
    raise ValueError(f"extra_settings may not set {clashing}; they are settings of their own")
  if len(images) != len(labels):
    raise ValueError(f"images and labels must have the same length, got {len(images)} and "
                     f"{len(labels)}")
  sigma, n, alpha, max_images = settings.sigma, settings.n, settings.alpha, settings.max_images
  say = log_fn or (lambda _: None)
  base_key = jax.random.key(settings.seed) if key is None else key
  if num_classes is None:
    sample = np.asarray(images[0])
    logits = jax.eval_shape(classify_fn, jax.ShapeDtypeStruct((1,) + sample.shape, sample.dtype))
    num_classes = int(logits.shape[-1])

  out_dir = Path(settings.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  path = log_path(out_dir, sigma)
  resuming = path.exists() and path.stat().st_size > 0
  _check_or_write_config(config_path(out_dir, sigma),
                         _recorded_settings(settings, key, extra_settings), resuming)
  if resuming:
    _repair_log(path)
    done = set(read_log(path).idx.tolist())
  else:
    path.write_text(HEADER + "\n")
    done = set()

  selected = range(0, len(images), settings.skip)
  if max_images is not None:
    selected = selected[:max_images]
  todo = [i for i in selected if i not in done]
  if done:
    say(f"resuming {path}: {len(done)} images logged, {len(todo)} to go")

  with open(path, "a") as f:
    for count, idx in enumerate(todo, start=1):
      start = time.perf_counter()
      result = smoothing.certify(
          classify_fn, images[idx], jax.random.fold_in(base_key, idx), sigma, num_classes,
          n0=settings.n0, n=n, alpha=alpha, batch_size=settings.batch_size, sharding=sharding)
      elapsed = time.perf_counter() - start
      label = int(labels[idx])
      correct = int(result.prediction == label)
      # repr keeps every digit, so radius >= r compares exactly as in memory.
      f.write(f"{idx}\t{label}\t{result.prediction}\t{result.radius!r}\t{correct}\t{elapsed:.3f}\n")
      f.flush()
      os.fsync(f.fileno())
      say(f"[{count}/{len(todo)}] idx={idx} label={label} predict={result.prediction} "
          f"radius={result.radius:.3f} correct={correct} time={elapsed:.2f}s")

  log = read_log(path)
  if len(log.idx) == 0:
    raise ValueError(f"no images were certified (len(images)={len(images)}, "
                     f"max_images={max_images})")
  accuracies = accuracy_table(log, TABLE_RADII)
  title = f"sigma={sigma:g}, n={n}, alpha={alpha:g}, {len(log.idx)} images"
  say(format_accuracy_table(TABLE_RADII, {"certified acc": accuracies},
                            f"Certified accuracy ({title})"))
  table = write_accuracy_table(table_path(out_dir, sigma), TABLE_RADII,
                               {"certified_accuracy": accuracies})
  plot = plot_certified_accuracy({f"$\\sigma$ = {sigma:g}": log}, plot_path(out_dir, sigma),
                                 f"Certified accuracy, $\\sigma$ = {sigma:g}, n = {n}")
  return CertificationRun(path, table, plot, TABLE_RADII, accuracies, len(log.idx), len(todo))


# ----------------------------------------------------------------------------
# Certifying a training run.


class TrainedClassifier(NamedTuple):
  """A training run's base classifier f, ready for `certify_dataset`.

  Attributes:
    classify_fn: `[b, H, W, C]` float images in [0, 1] -> `[b, num_classes]`
      float32 logits. Normalises with the dataset's mean and std itself, so
      randomized-smoothing noise is added in raw [0, 1] pixel space, exactly
      where the trainer added its Gaussian noise; BatchNorm uses the running
      statistics (eval mode).
    config: the run's config (its `config.json`).
    num_classes: K, the number of classes.
    step: the training step of the checkpoint the weights come from.
  """

  classify_fn: smoothing.ClassifyFn
  config: ml_collections.ConfigDict
  num_classes: int
  step: int


def read_run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The config an image training run wrote to `{workdir}/config.json` when it started."""
  path = Path(workdir) / loop.CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(
        f"{path} not found: {workdir} is not a training run's workdir (train.py writes "
        f"{loop.CONFIG_FILE} there when it starts)")
  config = ml_collections.ConfigDict(json.loads(path.read_text()))
  task = config.get("task", "image")
  if task != "image":
    raise ValueError(f"{workdir} is a {task!r} run; only 'image' runs can be certified")
  return config


def _data_dir(config: ml_collections.ConfigDict,
              data_dir: str | os.PathLike | None) -> str | os.PathLike | None:
  """`data_dir`, else the run's, else None ($TFDS_DATA_DIR or tfds's default)."""
  return data_dir or config.get("data_dir") or None


def classifier_from_workdir(
    workdir: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    step: int | None = None,
    mesh: Mesh | None = None,
) -> TrainedClassifier:
  """The base classifier of an image training run, from its config and a checkpoint.

  Reads `{workdir}/config.json` and the newest checkpoint (or `step`),
  rebuilds the model (`trainer.image.build_model`), and returns

      classify_fn(x) = model(normalize(x, mean, std); params, batch_stats),

  the network the trainer evaluates, on raw [0, 1] pixels. The dataset's
  metadata (number of classes, image shape) is read from its tfds folder;
  no image is decoded.

  Args:
    workdir: the training run's directory.
    data_dir: tfds data dir; default the run's `data_dir`, else
      $TFDS_DATA_DIR.
    step: which checkpoint; default the newest.
    mesh: the mesh the noise batches will be split over; the weights are
      replicated on its devices. None: the first local device.

  Returns:
    A `TrainedClassifier`.
  """
  config = read_run_config(workdir)
  dataset = image_data.load_dataset(
      config.dataset, image_data.eval_split(config.dataset), _data_dir(config, data_dir),
      cache=False)
  tree = checkpointing.load_arrays(os.fspath(workdir), step=step)
  model = image.build_model(config, dataset.num_classes)
  variables = {"params": tree["params"]}
  if tree.get("batch_stats"):
    variables["batch_stats"] = tree["batch_stats"]
  if mesh is not None:
    variables = jax.device_put(variables, core.replicated(mesh))
  mean, std = image_data.DATASET_STATS[config.dataset]

  def classify_fn(images: jax.Array) -> jax.Array:
    return model.apply(variables, augment_lib.normalize(images, mean, std), train=False)

  # Fail here, not inside the first certification, if the checkpoint does not fit the model.
  probe = jax.ShapeDtypeStruct((1,) + tuple(dataset.image_shape), np.float32)
  try:
    logits = jax.eval_shape(classify_fn, probe)
  except (ValueError, TypeError, flax.errors.FlaxError) as e:
    raise ValueError(
        f"the checkpoint in {workdir} does not fit model={config.model!r} with "
        f"{dataset.num_classes} classes on {dataset.image_shape} images: {e}") from e
  if logits.shape != (1, dataset.num_classes):
    raise ValueError(f"model={config.model!r} returns logits of shape {logits.shape} for one "
                     f"image; expected (1, {dataset.num_classes})")
  return TrainedClassifier(classify_fn, config, dataset.num_classes, int(tree["step"]))


class _DecodedColumn:
  """One field of a dataset split as a read-only sequence, decoding an example when indexed.

  Certifying an image takes seconds, so decoding on demand costs nothing and
  reads only the images that are certified (every skip-th, not yet logged).
  """

  def __init__(self, dataset: image_data.ImageDataset, field: str,
               convert: Callable[[np.ndarray], Any]):
    self._dataset = dataset
    self._field = field
    self._convert = convert

  def __len__(self) -> int:
    return len(self._dataset)

  def __getitem__(self, index: int) -> Any:
    return self._convert(self._dataset.get_batch(np.array([index]))[self._field][0])


def certify_workdir(
    workdir: str | os.PathLike,
    settings: CertifySettings = CertifySettings(),
    *,
    mesh: Mesh | None = None,
    log_fn: Callable[[str], None] | None = print,
) -> CertificationRun:
  """Certifies the smoothed classifier of an image training run on its test split.

  The base classifier is `classifier_from_workdir(workdir)`; every `skip`-th
  image of the split is certified with `certify_dataset`, each noise batch
  split over `mesh`. Calling again with the same settings resumes the log; a
  log made from another checkpoint or split is refused.

  Args:
    workdir: the training run's directory.
    settings: what to certify and how; the fields left None are the run's:
      sigma its `augment.gaussian_sigma`, split its evaluation split ('test';
      'validation' for ImageNet), data_dir its `data_dir` (else
      $TFDS_DATA_DIR), and out_dir is `{workdir}/certify`.
    mesh: the mesh each noise batch is split over along its 'data' axis;
      default `core.create_mesh()`, all devices. `settings.batch_size` must
      be a multiple of its size.
    log_fn: progress and the final table; None for silence.

  Returns:
    The `CertificationRun` of `certify_dataset`.
  """
  config = read_run_config(workdir)
  if settings.sigma is None and not config.augment.get("gaussian_sigma", 0.0):
    raise ValueError(
        f"{workdir} was trained without Gaussian noise (augment.gaussian_sigma=0); "
        "give the smoothing sigma explicitly")
  settings = dataclasses.replace(
      settings,
      sigma=config.augment.gaussian_sigma if settings.sigma is None else settings.sigma,
      split=settings.split or image_data.eval_split(config.dataset),
      data_dir=_data_dir(config, settings.data_dir),
      out_dir=Path(workdir) / "certify" if settings.out_dir is None else settings.out_dir)
  mesh = core.create_mesh() if mesh is None else mesh
  if settings.batch_size % mesh.size:
    raise ValueError(f"batch_size={settings.batch_size}; must be a multiple of the "
                     f"{mesh.size} devices the noise batch is split over")
  dataset = image_data.load_dataset(config.dataset, settings.split, settings.data_dir,
                                    cache=False)
  classifier = classifier_from_workdir(workdir, data_dir=settings.data_dir, mesh=mesh)
  if log_fn is not None:
    log_fn(f"certifying {config.model} from {workdir} (step {classifier.step}) on "
           f"{config.dataset}/{settings.split}: sigma={settings.sigma:g} n0={settings.n0} "
           f"n={settings.n} alpha={settings.alpha:g} skip={settings.skip}, "
           f"{mesh.size} device(s)")
  # On a host uint8 array `to_unit_float` divides in numpy: the float32 quotients x / 255
  # every log was made with. XLA may divide by multiplying with 1/255 instead, which
  # differs in the last bit for some pixels.
  return certify_dataset(
      classifier.classify_fn,
      _DecodedColumn(dataset, "image", image_data.to_unit_float),
      _DecodedColumn(dataset, "label", int),
      settings,
      num_classes=classifier.num_classes,
      sharding=mesh,
      extra_settings={"checkpoint_step": classifier.step},
      log_fn=log_fn,
  )
