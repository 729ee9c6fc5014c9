"""Builds RESULTS.md's tables and figures from the experiment logs in results/logs.

Run from the repository's root:

  python -m results.make_results                          # tables and figures from results/logs
  python -m results.make_results --collect runs/results   # first copy in the finished runs' logs
  python -m results.make_results --results_md /tmp/R.md --figures /tmp/fig   # elsewhere

`results/run.sh` writes one directory per run under runs/results/EXPERIMENT/.
`--collect` copies what the tables need from each finished run (metrics.jsonl,
config.json, the training log without its progress bar, certification TSVs)
to results/logs/EXPERIMENT/RUN, and each experiment's equal_time.json;
checkpoints stay behind. The tables replace
the text between `<!-- table:NAME -->` and `<!-- /table:NAME -->` in
RESULTS.md; the figures go to results/figures. Every number is a mean +- the
sample standard deviation over the seeds found.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from trainer import certification  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

LOGS = REPO / "results" / "logs"
FIGURES = REPO / "results" / "figures"
RESULTS_MD = REPO / "RESULTS.md"
# Certification: experiment -> (sigma, the radii of its table). At sigma 0.25
# no radius above ~0.8 is certifiable with n=10,000 samples.
CERTIFICATION = {"mnist_gauss": (0.5, (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)),
                 "cifar10_gauss": (0.25, (0.0, 0.25, 0.5, 0.75, 1.0)),
                 "cifar10_gauss_sigma0.5": (0.5, (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5))}

# (run-name prefix, label, config argument) per experiment, in table order.
CIFAR_RUNS = (("m1", "Cutout (m=1)", "1"), ("m2", "MaxUp+Cutout, m=2", "2"),
              ("m4", "MaxUp+Cutout, m=4", "4"), ("m10", "MaxUp+Cutout, m=10", "10"),
              ("m1_equal_time", "Cutout, MaxUp m=4's wall-clock time", "1"))
MNIST_RUNS = (("m1", "Gaussian augmentation (m=1)", "1"), ("m5", "MaxUp+Gauss, m=5", "5"),
              ("m1_equal_time", "Gaussian aug., MaxUp's wall-clock time", "1"))
CIFAR_GAUSS_RUNS = (("m1", "Gaussian augmentation (m=1)", "1"), ("m5", "MaxUp+Gauss, m=5", "5"))
PTB_RUNS = (("m1", "Embedding dropout (m=1)", "1"), ("m2", "MaxUp, m=2", "2"),
            ("m1_equal_time", "Embedding dropout, MaxUp's wall-clock time", "1"))
SCRATCH_RUNS = (("m1", "Cutout (m=1)", "1"), ("m4", "MaxUp+Cutout, m=4", "4"),
                ("m1_equal_time", "Cutout, MaxUp m=4's wall-clock time", "1"))
# The m ablation in experiment 6's regime (paper table 5), seeds 0-2, against SCRATCH_RUNS' m=1.
SCRATCH_ABLATION = (("m2", "MaxUp+Cutout, m=2", "2"), ("m10", "MaxUp+Cutout, m=10", "10"))
FINETUNE_AUGMENTATIONS = {"cutout": "Cutout", "cutmix": "CutMix"}  # config argument -> name
# Experiment -> its config file in results/configs, which for most shares its name.
CONFIG_FILES = {**{name: f"results/configs/{name}.py" for name in
                   ("cifar10", "mnist_gauss", "ptb", "cifar10_gauss", "cifar10_scratch", "ptb_asgd")},
                **{f"cifar10_finetune_{aug}": "results/configs/cifar10_finetune.py"
                   for aug in FINETUNE_AUGMENTATIONS},
                "cifar10_gauss_sigma0.5": "results/configs/cifar10_gauss.py",
                **{name: "results/configs/cifar10_finetune_cutmix.py" for name in
                   ("cifar10_cutmix_scratch", "cifar10_finetune_paper",
                    "cifar10_finetune_paper_frozen")}}
# Experiment -> the overrides (beyond seed and epochs) run.sh gives each of its runs.
CONFIG_OVERRIDES = {"cifar10_gauss_sigma0.5": {"augment.gaussian_sigma": 0.5}}
# Experiment 10: fine-tuning seed S starts from the CutMix-trained model of seed S.
PAPER_PRETRAINED = "cifar10_cutmix_scratch"
PAPER_SETTINGS = (("cifar10_finetune_paper", "1e-5", "lr 1e-5 (the paper's ResNets)"),
                  ("cifar10_finetune_paper", "1e-4", "lr 1e-4"),
                  ("cifar10_finetune_paper", "1e-3", "lr 1e-3"),
                  ("cifar10_finetune_paper_frozen", "1e-4",
                   "lr 1e-4, BatchNorm frozen (the paper's EfficientNets)"))
PAPER_METHODS = (("m4", "MaxUp+CutMix m=4", "4"), ("m1", "CutMix", "1"),
                 ("m1_equal_time", "CutMix, MaxUp's time", "1"))


# ---------------------------------------------------------------------------
# Logs.


def collect(runs_dir: Path) -> None:
  """Copies the logs of every finished run under runs_dir into results/logs."""
  for metrics_path in sorted(runs_dir.glob("*/*/metrics.jsonl")):
    run = metrics_path.parent
    summaries = [r for r in read_records(run) if r.get("split") == "summary"]
    if not summaries or summaries[-1].get("preempted", False):
      print(f"skipped (unfinished): {run}")
      continue
    if (run / "certify.log").is_file() and not list((run / "certify").glob("certified_accuracy_*.tsv")):
      # Its certification needs the checkpoints, which stay behind: collected
      # logs would mark the run done and leave certify.py nothing to load.
      print(f"skipped (certification unfinished): {run}")
      continue
    target = LOGS / run.parent.name / run.name
    target.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.jsonl", "config.json"):
      shutil.copy(run / name, target / name)
    if (run / "train.log").is_file():
      # A progress bar rewrites its line with carriage returns: keep each line's final state.
      lines = (line.split("\r")[-1] for line in (run / "train.log").read_text().splitlines())
      (target / "train.log").write_text("\n".join(line for line in lines if line.strip()) + "\n")
    for log in sorted((run / "certify").glob("*.tsv")) + sorted((run / "certify").glob("*.json")):
      (target / "certify").mkdir(exist_ok=True)
      shutil.copy(log, target / "certify" / log.name)
    print(f"collected: {run} -> {target}")
  # The measured step-time ratio behind an experiment's equal-time baseline.
  for measurement in sorted(runs_dir.glob("*/equal_time.json")):
    target = LOGS / measurement.parent.name / measurement.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(measurement, target)


def read_records(run: Path) -> list[dict]:
  return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]


def seed_runs(experiment: str, prefix: str) -> list[Path]:
  """The runs PREFIX_seedN of an experiment, by seed."""
  pattern = re.compile(rf"{re.escape(prefix)}_seed(\d+)")
  runs = [p for p in (LOGS / experiment).glob(f"{prefix}_seed*") if pattern.fullmatch(p.name)]
  return sorted(runs, key=lambda p: int(pattern.fullmatch(p.name).group(1)))


def seed_of(run: Path) -> int:
  return int(run.name.rsplit("seed", 1)[1])


def summary(run: Path) -> dict:
  return [r for r in read_records(run) if r["split"] == "summary"][-1]


def untimed_steps(run: Path) -> int:
  """Steps of a run that no summary timed: a part stopped before it wrote its summary."""
  summaries = [r for r in read_records(run) if r["split"] == "summary"]
  return summaries[-1]["steps"] - sum(r.get("steps_this_run", r["steps"]) for r in summaries)


def wall_seconds(run: Path) -> float:
  """The run's wall time, summed over the parts of a run that was stopped and resumed.

  A part that wrote a summary counts with its measured seconds. A part
  stopped before its summary (`untimed_steps`) counts with the time of its
  training steps, from the throughput its train records logged over each
  logging interval; its evaluations and start-up are not in it, so such a
  run's time is marked (`minutes`).
  """
  records = read_records(run)
  summaries = [r for r in records if r["split"] == "summary"]
  seconds = sum(r["seconds"] for r in summaries)
  if untimed_steps(run) <= 0:
    return seconds
  timed = [(r["step"] - r.get("steps_this_run", r["steps"]), r["step"]) for r in summaries]
  batch_size = config_of(run)["batch_size"]
  train = {}
  for record in records:  # The first record of a step, the stopped part's.
    if record["split"] == "train":
      train.setdefault(record["step"], record)
  previous = 0
  for step in sorted(train):
    record = train[step]
    if not any(start < step <= end for start, end in timed):
      if "images_per_second" in record:
        seconds += (step - previous) * batch_size / record["images_per_second"]
      else:  # Language runs: streams x the segments' mean length in tokens.
        seconds += (step - previous) * batch_size * record["seq_len"] / record["tokens_per_second"]
    previous = step
  return seconds


def config_of(run: Path) -> dict:
  return json.loads((run / "config.json").read_text())


def series(run: Path, split: str, key: str, x: str = "epoch") -> tuple[np.ndarray, np.ndarray]:
  records = [r for r in read_records(run) if r["split"] == split and key in r]
  return np.array([r[x] for r in records], float), np.array([r[key] for r in records], float)


# ---------------------------------------------------------------------------
# Formatting.


def mean_std(values, scale: float = 1.0, digits: int = 2) -> str:
  values = np.asarray(values, float) * scale
  if len(values) == 0:
    return "-"
  if len(values) == 1:
    return f"{values[0]:.{digits}f}"
  return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines)


def command(experiment: str, prefix: str, arg: str, run: Path) -> str:
  config = config_of(run)
  extra = ""
  for name, value in CONFIG_OVERRIDES.get(experiment, {}).items():
    section, key = name.split(".")
    if config[section][key] != value:
      raise ValueError(f"{run}: {name}={config[section][key]}, but {experiment} runs with {value}")
    extra += f" --config.{name}={value:g}"
  if prefix.endswith("equal_time"):
    extra += f" --config.num_epochs={config['num_epochs']:g}"
  if experiment in {e for e, _, _ in PAPER_SETTINGS}:
    init = Path(config["init_checkpoint"])
    if init.name != f"m1_seed{seed_of(run)}":
      raise ValueError(f"{run}: fine-tuned from {init}, not its own seed's pretrained model")
    extra += f" --config.init_checkpoint={init.parent}/m1_seed$SEED"
  return (f"python train.py --config {CONFIG_FILES[experiment]}:{arg} --config.seed=$SEED{extra} "
          f"--workdir runs/results/{experiment}/{prefix}_seed$SEED")


def commands_block(experiment: str, specs) -> str:
  """The commands of an experiment's runs, one shell loop per set of seeds."""
  loops: dict[tuple[int, ...], list[str]] = {}
  for prefix, _, arg in specs:
    runs = seed_runs(experiment, prefix)
    if runs:
      seeds = tuple(sorted(seed_of(r) for r in runs))
      loops.setdefault(seeds, []).append("  " + command(experiment, prefix, arg, runs[0]))
  lines = []
  for seeds, commands in loops.items():
    lines += [f"for SEED in {' '.join(str(s) for s in seeds)}; do", *commands, "done"]
  return "```bash\n" + "\n".join(lines) + "\n```"


def cpus(run: Path) -> str:
  """The CPUs a run's parts ran on, from its host records (written at every start and resume)."""
  names = dict.fromkeys(r["cpu"] for r in read_records(run) if r["split"] == "host")
  return " + ".join(names) or "not recorded"


def cpu_note(runs) -> str:
  """Which CPU each run's wall time is from, for experiments whose runs span machines."""
  by_cpu: dict[str, list[str]] = {}
  for run in runs:
    by_cpu.setdefault(cpus(run), []).append(run.name)
  return "Wall times by CPU: " + "; ".join(f"{cpu}: {', '.join(names)}"
                                           for cpu, names in by_cpu.items()) + "."


PARTIAL = "*"  # Marks a wall time with steps that no summary timed (`wall_seconds`).


def minutes(runs) -> str:
  mark = PARTIAL if any(untimed_steps(r) > 0 for r in runs) else ""
  return mean_std([wall_seconds(r) / 60 for r in runs], digits=1) + mark


def partial_note(runs) -> str:
  """The footnote of a table whose wall times include steps that no summary timed."""
  partial = [r for r in runs if untimed_steps(r) > 0]
  if not partial:
    return ""
  parts = ", ".join(f"`{r.name}` ({untimed_steps(r):,} of {summary(r)['steps']:,} steps)"
                    for r in partial)
  return (f"{PARTIAL} Includes a run part that was stopped before it logged its wall time: "
          f"{parts}. Those steps' time is added from the throughput their training log "
          "records, without that part's evaluations and start-up.")


def per_seed(values, scale: float = 1.0, digits: int = 2) -> str:
  return " / ".join(f"{v * scale:.{digits}f}" for v in values)


def forward_passes(num_copies: int) -> str:
  # Two-pass MaxUp: m forward passes without gradient to rank the copies, one with.
  return "1 fwd+bwd" if num_copies == 1 else f"{num_copies} fwd + 1 fwd+bwd"


# ---------------------------------------------------------------------------
# The statistical rule: every comparison of two methods is paired by seed.

ALPHA = 0.05
# Seeds run after the first seeds' result was seen (because it was within
# noise): their comparisons are tested on the first seeds alone too.
ADDED_AFTER_LOOKING = {"cifar10_scratch": (3, 4), "ptb_asgd": (3, 4)}


@dataclasses.dataclass(frozen=True)
class Paired:
  """A - B per seed over the seeds both have, with a paired and an unpaired t-test.

  `t`, `p`: the paired t-test (scipy.stats.ttest_rel), which decides the
  verdict; `welch_t`, `welch_p`: Welch's unpaired t-test
  (scipy.stats.ttest_ind, equal_var=False) on the same seeds, beside it.
  """
  seeds: tuple[int, ...]
  a: np.ndarray
  b: np.ndarray
  t: float
  p: float
  welch_t: float
  welch_p: float

  @property
  def differences(self) -> np.ndarray:
    return self.a - self.b


def _t_test(test, *samples) -> tuple[float, float]:
  """(t, two-sided p); samples with no spread give t = 0, p = 1 if equal, else t = +-inf, p = 0."""
  spread = sum(np.var(sample) for sample in samples)
  if spread == 0:
    gap = np.mean(samples[0]) - (np.mean(samples[1]) if len(samples) > 1 else 0.0)
    return (0.0, 1.0) if gap == 0 else (float(np.copysign(np.inf, gap)), 0.0)
  with warnings.catch_warnings():
    # A sample of equal values (e.g. 96.8 in every seed) has a variance of float noise.
    warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
    result = test(*samples)
  return float(result.statistic), float(result.pvalue)


def paired_test(a: dict[int, float], b: dict[int, float], seeds=None) -> Paired:
  """Compares method A with method B by seed (values keyed by seed), on `seeds` or all shared ones."""
  seeds = tuple(sorted(set(a) & set(b) if seeds is None else seeds))
  if len(seeds) < 2:
    raise ValueError(f"a paired test needs two seeds both methods ran, got {seeds}")
  # Rounded to 9 decimals: float noise (96.8 stored as 96.80000000000001) is no difference.
  xa = np.round(np.array([a[s] for s in seeds], float), 9)
  xb = np.round(np.array([b[s] for s in seeds], float), 9)
  t, p = _t_test(lambda d: stats.ttest_1samp(d, 0.0), np.round(xa - xb, 9))
  welch_t, welch_p = _t_test(lambda x, y: stats.ttest_ind(x, y, equal_var=False), xa, xb)
  return Paired(seeds, xa, xb, t, p, welch_t, welch_p)


def verdict(test: Paired, name: str, lower_is_better: bool = False,
            words: tuple[str, str] = ("better", "worse")) -> str:
  """'NAME better / worse at p < 0.05' by the paired test's sign and p, else 'no difference'."""
  seeds = f"({len(test.seeds)} seeds)"
  if not test.p < ALPHA:
    return f"no difference at p < {ALPHA:g} {seeds}"
  a_higher = test.differences.mean() > 0
  return f"{name} {words[0] if a_higher != lower_is_better else words[1]} at p < {ALPHA:g} {seeds}"


@dataclasses.dataclass(frozen=True)
class Comparison:
  """Method A against method B on one metric: `a` and `b` map seed -> value."""
  a_name: str
  b_name: str
  metric: str
  a: dict
  b: dict
  lower_is_better: bool = False
  digits: int = 2
  words: tuple[str, str] = ("better", "worse")
  added_after_looking: tuple[int, ...] = ()

  def tests(self) -> list[tuple[str, Paired]]:
    """(seeds' description, test): all shared seeds, and before that the first seeds alone
    when some seeds were added after looking at them."""
    shared = sorted(set(self.a) & set(self.b))
    added = [s for s in shared if s in self.added_after_looking]
    if not added:
      return [(_seed_list(shared), paired_test(self.a, self.b, shared))]
    first = [s for s in shared if s not in added]
    return [(_seed_list(first), paired_test(self.a, self.b, first)),
            (f"{_seed_list(shared)} ({_seed_list(added)} added after looking at "
             f"{_seed_list(first)})", paired_test(self.a, self.b, shared))]

  @property
  def testable(self) -> bool:
    """Whether the methods share the two seeds a paired test needs (a partly run experiment
    may not yet)."""
    return len(set(self.a) & set(self.b)) >= 2

  def verdicts(self) -> list[str]:
    return [verdict(test, self.a_name, self.lower_is_better, self.words) for _, test in self.tests()]


def _seed_list(seeds) -> str:
  seeds = sorted(seeds)
  if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
    return f"{seeds[0]}-{seeds[-1]}"
  return ", ".join(str(s) for s in seeds)


def _p(p: float) -> str:
  return f"{p:.3g}" if p >= 0.001 else "< 0.001"


def comparison_table(comparisons: list[Comparison]) -> str:
  """One row per comparison (and per set of seeds it was tested on): the rule of RESULTS.md."""
  rows = []
  for c in comparisons:
    if not c.testable:
      continue
    for seeds, test in c.tests():
      d = c.digits
      rows.append([f"{c.a_name} − {c.b_name}", c.metric, seeds,
                   per_seed(test.differences, digits=d), mean_std(test.differences, digits=d),
                   f"{test.t:.2f} ({len(test.seeds) - 1}), {_p(test.p)}",
                   f"{test.welch_t:.2f}, {_p(test.welch_p)}",
                   verdict(test, c.a_name, c.lower_is_better, c.words)])
  header = ["comparison (A − B)", "metric", "seeds", "A − B by seed", "A − B, mean ± sd",
            "paired t (df), p", "Welch t, p", "verdict (paired t-test)"]
  return markdown_table(header, rows) if rows else ""


def by_seed(runs, value) -> dict[int, float]:
  return {seed_of(r): value(r) for r in runs}


# ---------------------------------------------------------------------------
# Tables.


def block(*parts: str) -> str:
  """A table block: its parts (tables, notes, commands) that are not empty, a blank line apart."""
  return "\n\n".join(part for part in parts if part)


def image_table(experiment: str, specs, comparisons: list[Comparison]) -> str:
  """Test and clean-train top-1 of each method of an image experiment, over seeds."""
  rows = []
  for prefix, label, _ in specs:
    runs = seed_runs(experiment, prefix)
    if not runs:
      continue
    config = config_of(runs[0])
    final_train = [series(r, "train_clean", "top1")[1][-1] for r in runs]
    final_test = [summary(r)["final_top1"] for r in runs]
    rows.append([
        label, str(len(runs)), f"{config['num_epochs']:g}",
        forward_passes(config["maxup"]["num_copies"]), mean_std(final_test, 100),
        per_seed(final_test, 100), mean_std([summary(r)["best_top1"] for r in runs], 100),
        mean_std(final_train, 100), mean_std(np.subtract(final_train, final_test), 100),
        minutes(runs)])
  header = ["method", "seeds", "epochs", "passes per example and step (after warm-up)",
            "test top-1 % (final)", "by seed (0 / 1 / ...)", "test top-1 % (best of the evals)",
            "train top-1 % (clean, final)", "train - test gap (points)", "wall time (min)"]
  runs = [run for prefix, _, _ in specs for run in seed_runs(experiment, prefix)]
  return block(markdown_table(header, rows), partial_note(runs), comparison_table(comparisons),
               commands_block(experiment, specs))


def cifar_table() -> str:
  return image_table("cifar10", CIFAR_RUNS, cifar_comparisons())


def cifar_ablation_table() -> str:
  rows = []
  for prefix, label, arg in CIFAR_RUNS[:4]:
    runs = seed_runs("cifar10", prefix)
    if not runs:
      continue
    rows.append([arg, str(len(runs)), mean_std([summary(r)["final_top1"] for r in runs], 100),
                 mean_std([series(r, "train_clean", "top1")[1][-1] for r in runs], 100),
                 mean_std([series(r, "train", "loss", x="step")[1][-1] for r in runs], digits=3),
                 mean_std([summary(r)["images_per_second"] for r in runs], digits=0),
                 minutes(runs)])
  header = ["m", "seeds", "test top-1 %", "train top-1 % (clean)",
            "training loss (worst copy, last 16 steps)", "images/s", "wall time (min)"]
  return block(markdown_table(header, rows), comparison_table(cifar_ablation_comparisons()))


def scratch_table() -> str:
  """Experiment 6: CIFAR-10 from scratch, a baseline that fits its training images."""
  return image_table("cifar10_scratch", SCRATCH_RUNS + SCRATCH_ABLATION,
                     scratch_comparisons() + scratch_ablation_comparisons())


def finetune_table() -> str:
  """Experiment 7: fine-tuning experiment 6's seed-0 baseline, as the paper does on ImageNet."""
  rows, blocks, all_runs, comparisons = [], [], [], []
  for aug in FINETUNE_AUGMENTATIONS:
    experiment = f"cifar10_finetune_{aug}"
    specs = [(prefix, label.replace("Cutout", FINETUNE_AUGMENTATIONS[aug]), f"{aug},{arg}")
             for prefix, label, arg in SCRATCH_RUNS]
    for prefix, label, _ in specs:
      runs = seed_runs(experiment, prefix)
      if not runs:
        continue
      all_runs += runs
      config = config_of(runs[0])
      before = summary(LOGS / "cifar10_scratch" / Path(config["init_checkpoint"]).name)
      after = [summary(r)["final_top1"] for r in runs]
      rows.append([
          label, str(len(runs)), f"{config['num_epochs']:g}",
          f"{before['final_top1'] * 100:.2f}", mean_std(after, 100), per_seed(after, 100),
          mean_std(np.subtract(after, before["final_top1"]), 100),
          mean_std([series(r, "train_clean", "top1")[1][-1] for r in runs], 100),
          minutes(runs)])
    if any(seed_runs(experiment, prefix) for prefix, _, _ in specs):
      blocks.append(commands_block(experiment, specs))
      comparisons += finetune_comparisons(aug)
  header = ["method", "fine-tuning seeds", "epochs", "test top-1 % before",
            "test top-1 % after (final)", "after, by seed (0 / 1 / ...)", "change (points)",
            "train top-1 % (clean, after)", "wall time (min)"]
  return block(markdown_table(header, rows), partial_note(all_runs), comparison_table(comparisons),
               *blocks)


def paper_specs(experiment: str, lr: str):
  """(prefix, label, config argument) of experiment 10's methods at one setting."""
  frozen = ",frozen" if experiment.endswith("frozen") else ""
  return [(f"lr{lr}_{prefix}", label, f"{lr},{m}{frozen}") for prefix, label, m in PAPER_METHODS]


def pretrained_top1(run: Path) -> float:
  """Test top-1 % of the CutMix-trained model a fine-tune of experiment 10 started from."""
  return top1(LOGS / PAPER_PRETRAINED / Path(config_of(run)["init_checkpoint"]).name)


def clean_train_top1(run: Path) -> float:
  """Top-1 % on the un-augmented training images at a run's last evaluation."""
  return series(run, "train_clean", "top1")[1][-1] * 100


def finetune_paper_table() -> str:
  """Experiment 10: the paper's fine-tuning recipe, a grid of learning rates, paired by seed."""
  pretrained = seed_runs(PAPER_PRETRAINED, "m1")
  rows, blocks, all_runs = [], [], list(pretrained)
  if pretrained:
    final = [top1(r) for r in pretrained]
    rows.append(["CutMix from scratch (the starting models)", "-", str(len(pretrained)),
                 f"{config_of(pretrained[0])['num_epochs']:g}", "-", mean_std(final),
                 per_seed(final), "-", mean_std([clean_train_top1(r) for r in pretrained]),
                 minutes(pretrained)])
    blocks.append(commands_block(PAPER_PRETRAINED, [("m1", "", "pretrain")]))
  for experiment, lr, setting in PAPER_SETTINGS:
    for prefix, label, _ in paper_specs(experiment, lr):
      runs = seed_runs(experiment, prefix)
      if not runs:
        continue
      all_runs += runs
      before = [pretrained_top1(r) for r in runs]
      after = [top1(r) for r in runs]
      rows.append([label, setting, str(len(runs)), f"{config_of(runs[0])['num_epochs']:g}",
                   mean_std(before), mean_std(after), per_seed(after),
                   mean_std(np.subtract(after, before)),
                   mean_std([clean_train_top1(r) for r in runs]), minutes(runs)])
  for experiment in dict.fromkeys(e for e, _, _ in PAPER_SETTINGS):
    specs = [spec for e, lr, _ in PAPER_SETTINGS if e == experiment
             for spec in paper_specs(experiment, lr)]
    if any(seed_runs(experiment, prefix) for prefix, _, _ in specs):
      blocks.append(commands_block(experiment, specs))
  header = ["method", "setting", "seeds", "epochs", "test top-1 % before",
            "test top-1 % after (final)", "after, by seed (0 / 1 / ...)",
            "change from its starting model (points)", "train top-1 % (clean, after)", "wall time (min)"]
  return block(markdown_table(header, rows), partial_note(all_runs),
               comparison_table(finetune_paper_comparisons()), *blocks)


def ptb_table() -> str:
  rows = []
  for prefix, label, _ in PTB_RUNS:
    runs = seed_runs("ptb", prefix)
    if not runs:
      continue
    config = config_of(runs[0])
    best_valid = [min(series(r, "valid", "perplexity")[1]) for r in runs]
    rows.append([
        label, str(len(runs)), f"{config['num_epochs']:g}",
        forward_passes(config["maxup"]["num_copies"]),
        mean_std([summary(r)["valid_perplexity"] for r in runs], digits=1),
        mean_std([summary(r)["test_perplexity"] for r in runs], digits=1),
        mean_std(best_valid, digits=1),
        mean_std([series(r, "train", "perplexity", x="step")[1][-1] for r in runs], digits=1),
        mean_std([mean_copy_loss(r) for r in runs], digits=3),
        minutes(runs)])
  header = ["method", "seeds", "epochs", "passes per stream and step",
            "valid ppl (best weights)", "test ppl (best weights)", "best epoch's valid ppl",
            TRAINED_COPY_PPL, MEAN_COPY_LOSS, "wall time (min)"]
  return block(markdown_table(header, rows), comparison_table(ptb_comparisons()),
               commands_block("ptb", PTB_RUNS))


# The language runs' training fit. `perplexity` in a train record is that of
# the copies the step trained on, the worse of m for MaxUp, so it is not like
# with like; `mean_copy_loss` averages every copy (AR/TAR included), which is
# what the baseline's single copy gives too.
TRAINED_COPY_PPL = "train ppl of the trained copy (MaxUp: the worse of m; dropout on, last log)"
MEAN_COPY_LOSS = "train loss, mean over copies (dropout on, AR/TAR included, last 10 logs)"


def mean_copy_loss(run: Path, logs: int = 10) -> float:
  return float(np.mean(series(run, "train", "mean_copy_loss", x="step")[1][-logs:]))


def switch_epoch(run: Path) -> str:
  """The epoch after which NT-ASGD switched a run from SGD to ASGD ("-" if it never did)."""
  epochs = [r["epoch"] for r in read_records(run) if r["split"] == "valid" and r["switched_to_asgd"]]
  return str(epochs[0]) if epochs else "-"


def ptb_dropout_table() -> str:
  """Experiment 9's dropout grid: the baseline at seed 0, phase 0 of the recipe only."""
  rows, runs = [], sorted((LOGS / "ptb_asgd_dropout").glob("dropout*_seed0"),
                          key=lambda r: config_of(r)["model"]["input_dropout"])
  for run in runs:
    sgd = [r["perplexity"] for r in read_records(run) if r["split"] == "valid" and not r["averaged"]]
    rows.append([f"{config_of(run)['model']['input_dropout']:g}", switch_epoch(run),
                 f"{min(sgd):.1f}", f"{summary(run)['valid_perplexity']:.1f}",
                 f"{summary(run)['test_perplexity']:.1f}",
                 f"{series(run, 'train', 'perplexity', x='step')[1][-1]:.1f}",
                 f"{wall_seconds(run) / 60:.1f}"])
  header = ["dropout (locked and weight)", "switch to ASGD after epoch",
            "best valid ppl under SGD", "valid ppl (best weights)", "test ppl (best weights)",
            "train ppl (with dropout, last log)", "wall time (min)"]
  if not runs:
    return markdown_table(header, rows)
  dropouts = " ".join(row[0] for row in rows)
  commands = ("```bash\n"
              f"for DROPOUT in {dropouts}; do\n"
              f"  python train.py --config {CONFIG_FILES['ptb_asgd']}:$DROPOUT,1 --config.seed=0 "
              "--config.finetune.num_restarts=0 --config.dynamic_eval.enabled=False "
              "--workdir runs/results/ptb_asgd_dropout/dropout${DROPOUT}_seed0\n"
              "done\n```")
  return markdown_table(header, rows) + "\n\n" + commands


def ptb_asgd_specs():
  """PTB_RUNS with the dropout the grid chose (that of the seed-0 baseline) in the config argument."""
  baselines = seed_runs("ptb_asgd", "m1")
  dropout = config_of(baselines[0])["model"]["input_dropout"] if baselines else 0.0
  return [(prefix, label, f"{dropout:g},{arg}") for prefix, label, arg in PTB_RUNS]


def ptb_asgd_table() -> str:
  """Experiment 9: the whole AWD-LSTM recipe (NT-ASGD, a fine-tuning restart, dynamic evaluation)."""
  rows = []
  specs = ptb_asgd_specs()
  for prefix, label, _ in specs:
    runs = seed_runs("ptb_asgd", prefix)
    if not runs:
      continue
    config = config_of(runs[0])
    test = [summary(r)["test_perplexity"] for r in runs]
    dynamic_test = [summary(r)["dynamic_test_perplexity"] for r in runs]
    rows.append([
        label, str(len(runs)), f"{config['num_epochs']:g}",
        " / ".join(switch_epoch(r) for r in runs),
        " / ".join(str(summary(r)["epochs"]) for r in runs),
        mean_std([summary(r)["valid_perplexity"] for r in runs], digits=1),
        mean_std(test, digits=1), per_seed(test, digits=1),
        mean_std([summary(r)["dynamic_valid_perplexity"] for r in runs], digits=1),
        mean_std(dynamic_test, digits=1), per_seed(dynamic_test, digits=1),
        mean_std([series(r, "train", "perplexity", x="step")[1][-1] for r in runs], digits=1),
        mean_std([mean_copy_loss(r) for r in runs], digits=3),
        " / ".join(f"{wall_seconds(r) / 60:.1f}" + (PARTIAL if untimed_steps(r) > 0 else "")
                   for r in runs)])
  header = ["method", "seeds", "epochs before fine-tuning", "switch to ASGD after epoch (by seed)",
            "epochs in all (by seed)", "valid ppl (best weights)", "test ppl (best weights)",
            "test ppl by seed (0 / 1 / ...)", "valid ppl, dynamic eval", "test ppl, dynamic eval",
            "test ppl, dynamic eval, by seed", TRAINED_COPY_PPL, MEAN_COPY_LOSS,
            "wall time (min, by seed)"]
  # The runs spanned sessions on different machines, so their times are by seed and by CPU.
  runs = [run for prefix, _, _ in specs for run in seed_runs("ptb_asgd", prefix)]
  return block(markdown_table(header, rows), cpu_note(runs), partial_note(runs),
               comparison_table(ptb_asgd_comparisons()), commands_block("ptb_asgd", specs))


def certification_logs(experiment: str, prefix: str) -> list[tuple[Path, certification.CertificationLog]]:
  """(run, log) of each seed whose certification finished (it writes the accuracy table last)."""
  sigma, _ = CERTIFICATION[experiment]
  logs = []
  for run in seed_runs(experiment, prefix):
    if (run / "certify" / f"certified_accuracy_sigma{sigma}.tsv").is_file():
      logs.append((run, certification.read_log(run / "certify" / f"certify_sigma{sigma}.tsv")))
  return logs


def certified_table(experiment: str, specs) -> str:
  """Certified accuracy at the experiment's radii, with the base and smoothed classifiers' costs."""
  _, radii = CERTIFICATION[experiment]
  rows = []
  for prefix, label, _ in specs:
    logs = certification_logs(experiment, prefix)
    if not logs:
      continue
    runs = [run for run, _ in logs]
    accuracy = np.array([certification.accuracy_table(log, radii) for _, log in logs])
    rows.append([label, str(len(logs)), str(len(logs[0][1].idx)),
                 mean_std([summary(r)["final_top1"] for r in runs], 100)]
                + [mean_std(accuracy[:, i], 100, digits=1) for i in range(len(radii))]
                + [mean_std([np.mean(log.predict < 0) for _, log in logs], 100, digits=1),
                   minutes(runs), mean_std([np.mean(log.time) for _, log in logs], digits=1)])
  header = (["method", "seeds", "images", "clean test top-1 % (base classifier)"]
            + [f"r={r:g}" + (" (smoothed classifier's accuracy)" if r == 0 else "") for r in radii]
            + ["abstained %", "training time (min)", "certification time (s per image)"])
  return markdown_table(header, rows)


def mnist_certified_table() -> str:
  return block(certified_table("mnist_gauss", MNIST_RUNS[:2]),
               comparison_table(certified_comparisons("mnist_gauss", "m5")))


def certify_commands(experiment: str, specs) -> str:
  """The certify.py command of each method's runs, its options from the certification's config."""
  sigma, _ = CERTIFICATION[experiment]
  lines, seeds = [], set()
  for prefix, _, _ in specs:
    logs = certification_logs(experiment, prefix)
    if logs:
      seeds.update(seed_of(run) for run, _ in logs)
      options = json.loads((logs[0][0] / "certify" / f"certify_sigma{sigma}.json").read_text())
      lines.append(f"  python certify.py --workdir runs/results/{experiment}/{prefix}_seed$SEED "
                   + " ".join(f"--{name} {options[name]}" for name in ("n0", "n", "alpha", "skip")))
  header = f"for SEED in {' '.join(str(s) for s in sorted(seeds))}; do"
  return "```bash\n" + "\n".join([header] + lines + ["done"]) + "\n```"


def cifar_certified_table(experiment: str = "cifar10_gauss") -> str:
  if not any(certification_logs(experiment, prefix) for prefix, _, _ in CIFAR_GAUSS_RUNS):
    return "No run has finished its certification yet."
  runs = [run for prefix, _, _ in CIFAR_GAUSS_RUNS for run in seed_runs(experiment, prefix)]
  return block(certified_table(experiment, CIFAR_GAUSS_RUNS), partial_note(runs),
               comparison_table(certified_comparisons(experiment, "m5")),
               commands_block(experiment, CIFAR_GAUSS_RUNS),
               certify_commands(experiment, CIFAR_GAUSS_RUNS))


def mnist_training_table() -> str:
  baseline_final = {seed_of(r): grad_norm_at(r, config_of(r)["num_epochs"])
                    for r in seed_runs("mnist_gauss", "m1")}
  rows = []
  for prefix, label, _ in MNIST_RUNS:
    runs = seed_runs("mnist_gauss", prefix)
    if not runs:
      continue
    config = config_of(runs[0])
    final = [grad_norm_at(r, config_of(r)["num_epochs"]) for r in runs]
    rows.append([
        label, str(len(runs)), f"{config['num_epochs']:g}",
        forward_passes(config["maxup"]["num_copies"]),
        mean_std([grad_norm_at(r, config["maxup"]["warmup_epochs"]) for r in runs], digits=3),
        mean_std(final, digits=3),
        mean_std([f / baseline_final[seed_of(r)] for f, r in zip(final, runs)], digits=3),
        mean_std([series(r, "train_clean", "loss")[1][-1] for r in runs], digits=4),
        mean_std([summary(r)["final_top1"] for r in runs], 100), minutes(runs)])
  header = ["method", "seeds", "epochs", "passes per example and step",
            "input-gradient norm, epoch 1 (MaxUp starts)", "input-gradient norm, final",
            "final norm / same seed's m=1 run", "clean train loss, final", "clean test top-1 %",
            "wall time (min)"]
  return block(markdown_table(header, rows), comparison_table(mnist_gradient_comparisons()),
               commands_block("mnist_gauss", MNIST_RUNS))


# ---------------------------------------------------------------------------
# The comparisons of each experiment (tested by the rule above).


def top1(run: Path) -> float:
  return summary(run)["final_top1"] * 100


def image_comparisons(experiment: str, maxup: str, maxup_name: str, base_name: str) -> list[Comparison]:
  """MaxUp vs the baseline, vs the baseline given its time, and that baseline vs the baseline."""
  added = ADDED_AFTER_LOOKING.get(experiment, ())
  maxup_top1 = by_seed(seed_runs(experiment, maxup), top1)
  base = by_seed(seed_runs(experiment, "m1"), top1)
  same_time = by_seed(seed_runs(experiment, "m1_equal_time"), top1)
  same_time_name = f"{base_name}, MaxUp's time"
  comparisons = [Comparison(maxup_name, base_name, "test top-1 %", maxup_top1, base,
                            added_after_looking=added)]
  if same_time:
    comparisons += [Comparison(maxup_name, same_time_name, "test top-1 %", maxup_top1, same_time),
                    Comparison(same_time_name, base_name, "test top-1 %", same_time, base)]
  return comparisons


def cifar_comparisons() -> list[Comparison]:
  return image_comparisons("cifar10", "m4", "MaxUp+Cutout m=4", "Cutout")


def cifar_ablation_comparisons() -> list[Comparison]:
  base = by_seed(seed_runs("cifar10", "m1"), top1)
  return [Comparison(f"MaxUp+Cutout m={m}", "Cutout", "test top-1 %", by_seed(seed_runs("cifar10", f"m{m}"), top1),
                     base) for m in (2, 10)]


def scratch_comparisons() -> list[Comparison]:
  return image_comparisons("cifar10_scratch", "m4", "MaxUp+Cutout m=4", "Cutout")


def scratch_ablation_comparisons() -> list[Comparison]:
  """Each m of the ablation in experiment 6's regime against the Cutout baseline (m=1)."""
  base = by_seed(seed_runs("cifar10_scratch", "m1"), top1)
  return [Comparison(f"MaxUp+Cutout m={arg}", "Cutout", "test top-1 %",
                     by_seed(seed_runs("cifar10_scratch", prefix), top1), base)
          for prefix, _, arg in SCRATCH_ABLATION]


def finetune_comparisons(aug: str) -> list[Comparison]:
  name = FINETUNE_AUGMENTATIONS[aug]
  return image_comparisons(f"cifar10_finetune_{aug}", "m4", f"MaxUp+{name} m=4", name)


def finetune_paper_comparisons() -> list[Comparison]:
  """Experiment 10, per setting: MaxUp+CutMix against CutMix for the same epochs, then
  against CutMix for MaxUp's time (test top-1 %)."""
  comparisons = []
  for experiment, lr, setting in PAPER_SETTINGS:
    specs = paper_specs(experiment, lr)
    maxup = by_seed(seed_runs(experiment, specs[0][0]), top1)
    for prefix, label, _ in specs[1:]:
      comparisons.append(Comparison("MaxUp+CutMix m=4", label,
                                    f"test top-1 %, {setting.split(' (')[0]}", maxup,
                                    by_seed(seed_runs(experiment, prefix), top1)))
  return comparisons


def ptb_comparisons(experiment: str = "ptb", key: str = "test_perplexity",
                    metric: str = "test ppl (best weights)") -> list[Comparison]:
  """MaxUp (m=2) vs embedding dropout, vs embedding dropout given its time, and that vs m=1."""
  def value(run):
    return summary(run)[key]
  added = ADDED_AFTER_LOOKING.get(experiment, ())
  maxup = by_seed(seed_runs(experiment, "m2"), value)
  base = by_seed(seed_runs(experiment, "m1"), value)
  same_time = by_seed(seed_runs(experiment, "m1_equal_time"), value)
  kw = dict(lower_is_better=True, digits=1, added_after_looking=added)
  return [Comparison("MaxUp m=2", "dropout", metric, maxup, base, **kw),
          Comparison("MaxUp m=2", "dropout, MaxUp's time", metric, maxup, same_time, **kw),
          Comparison("dropout, MaxUp's time", "dropout", metric, same_time, base, **kw)]


def ptb_asgd_comparisons() -> list[Comparison]:
  return (ptb_comparisons("ptb_asgd")
          + ptb_comparisons("ptb_asgd", "dynamic_test_perplexity", "test ppl, dynamic eval"))


def certified_comparisons(experiment: str, maxup: str) -> list[Comparison]:
  """MaxUp+Gauss vs Gaussian augmentation: the base classifier's clean top-1, then the
  certified accuracy at each radius some model reaches (all-zero radii are left out)."""
  _, radii = CERTIFICATION[experiment]
  logs = {prefix: {seed_of(run): log for run, log in certification_logs(experiment, prefix)}
          for prefix in ("m1", maxup)}
  accuracy = {prefix: {seed: certification.accuracy_table(log, radii) * 100
                       for seed, log in by.items()} for prefix, by in logs.items()}
  name = f"MaxUp+Gauss m={maxup[1:]}"
  comparisons = [Comparison(name, "Gauss", "clean test top-1 % (base classifier)",
                            by_seed(seed_runs(experiment, maxup), top1),
                            by_seed(seed_runs(experiment, "m1"), top1))]
  for i, radius in enumerate(radii):
    a = {seed: acc[i] for seed, acc in accuracy[maxup].items()}
    b = {seed: acc[i] for seed, acc in accuracy["m1"].items()}
    if any(a.values()) or any(b.values()):
      comparisons.append(Comparison(name, "Gauss", f"certified accuracy % at r={radius:g}", a, b,
                                    digits=1))
  return comparisons


def grad_norm_at(run: Path, epoch: float) -> float:
  epochs, norms = series(run, "train_clean", "input_grad_norm")
  return norms[np.flatnonzero(np.isclose(epochs, epoch))[0]]


def mnist_gradient_comparisons() -> list[Comparison]:
  def final_norm(run):
    return grad_norm_at(run, config_of(run)["num_epochs"])
  maxup = by_seed(seed_runs("mnist_gauss", "m5"), final_norm)
  kw = dict(lower_is_better=True, digits=4, words=("lower", "higher"))
  return [Comparison("MaxUp+Gauss m=5", "Gauss", "input-gradient norm, final", maxup,
                     by_seed(seed_runs("mnist_gauss", "m1"), final_norm), **kw),
          Comparison("MaxUp+Gauss m=5", "Gauss, MaxUp's time", "input-gradient norm, final", maxup,
                     by_seed(seed_runs("mnist_gauss", "m1_equal_time"), final_norm), **kw)]


def what_held_table() -> str:
  """The summary table: each experiment's key comparisons, their verdicts by the rule and
  whether the paper's claim held (MaxUp better, or for the gradient norm lower, at p < 0.05)."""
  def pick(comparisons, metric):
    return next(c for c in comparisons if c.metric == metric)

  def radii(experiment):
    return [(c.metric.rsplit(" at ", 1)[1] + ": ", c) for c in certified_comparisons(experiment, "m5")[1:]
            if not c.metric.endswith("r=0")]

  cifar, ptb, scratch = cifar_comparisons(), ptb_comparisons(), scratch_comparisons()
  ablation = cifar_ablation_comparisons()
  # Experiment 6's m ablation joins its row once two seeds of an m are in.
  scratch_ablation = [("m=" + c.a_name.rsplit("=", 1)[1] + ": ", c)
                      for c in scratch_ablation_comparisons() if c.testable]
  cutout, cutmix = finetune_comparisons("cutout"), finetune_comparisons("cutmix")
  ptb_asgd = ptb_asgd_comparisons()
  # Alternately against CutMix for the same epochs and for MaxUp's time, one pair per setting.
  paper = [(c.metric.split(", ", 1)[1] + ": ", c) for c in finetune_paper_comparisons()]
  rows = [
      ("1. CIFAR-10, Cutout vs MaxUp+Cutout (m=4)", "+0.57 points (ResNet-110, 200 epochs)",
       "ResNet-8, 2,048 images, 30 epochs; test top-1", [("", cifar[0])], [("", cifar[1])]),
      ("2. PTB, embedding dropout vs MaxUp (m=2)", "−0.74 test perplexity (AWD-LSTM, full training)",
       "2x200 LSTM, 50k tokens, 6 epochs; test perplexity", [("", ptb[0])], [("", ptb[1])]),
      ("3. Certified accuracy, Gauss vs MaxUp+Gauss (MNIST, σ=0.5, m=5)",
       "higher at every radius, most at large radii (CIFAR-10, table 8)",
       "small CNN, 2 epochs, 500 test images; certified accuracy points",
       radii("mnist_gauss"), []),
      ("4. Input-gradient norm (theorem 1)", "MaxUp+Gauss penalises ‖∇ₓL‖",
       "experiment 3's runs; clean input-gradient norm, final",
       [("", mnist_gradient_comparisons()[0])], [("", mnist_gradient_comparisons()[1])]),
      ("5. m ablation", "every m > 1 beats m = 1; m = 4-10 best (table 5)",
       "experiment 1's setup; test top-1",
       [("m=2: ", ablation[0]), ("m=4: ", cifar[0]), ("m=10: ", ablation[1])], []),
      ("6. CIFAR-10 from scratch, a baseline that fits its data (98% clean train top-1)",
       "+0.57 / +0.50 points (ResNet-110 / PreAct-ResNet-110, 200 epochs, table 3)",
       "295k-parameter airbench net, 2,500 images, 80 epochs; test top-1",
       [("m=4: " if scratch_ablation else "", scratch[0])] + scratch_ablation,
       [("", scratch[1])]),
      ("7. Fine-tuning experiment 6's Cutout-trained baseline with MaxUp (m=4), 10 epochs at lr 0.01",
       "ImageNet fine-tunes of CutMix-trained models with MaxUp+CutMix at lr 1e-5 / 1e-4: +0.2 to "
       "+0.5 points (table 2)",
       "the Cutout-trained variant: one model (experiment 6, seed 0), 3 fine-tuning seeds; test top-1",
       [("Cutout: ", cutout[0]), ("CutMix: ", cutmix[0])],
       [("Cutout: ", cutout[1]), ("CutMix: ", cutmix[1])]),
      ("8. Certified accuracy on CIFAR-10, Gauss vs MaxUp+Gauss (σ=0.25, m=5)",
       "+14 / +14 / +15 points at r=0.25 / 0.5 / 0.75 (ResNet-110, table 8)",
       "airbench net, 10,000 images, 20 epochs, 200 test images; certified accuracy points",
       radii("cifar10_gauss"), []),
  ]
  # Experiment 8 at sigma 0.5 joins once two seeds of both methods are certified.
  sigma05 = radii("cifar10_gauss_sigma0.5")
  if sigma05 and all(c.testable for _, c in sigma05):
    rows.append(
      ("8. The same at σ=0.5", "+14 / +14 / +15 / +17 / +18 / +17 points at r=0.25 / 0.5 / 0.75 / "
       "1 / 1.25 / 1.5 (best over σ, table 8)",
       "experiment 8's setup, trained and certified at σ=0.5; certified accuracy points",
       sigma05, []))
  rows += [
      ("9. PTB past NT-ASGD's switch, embedding dropout vs MaxUp (m=2)",
       "−0.74 test perplexity (55.01 → 54.27), −0.81 with dynamic evaluation (table 6)",
       "2x200 LSTM, 100k tokens, NT-ASGD, one restart; test perplexity",
       [("", pick(ptb_asgd, "test ppl (best weights)")),
        ("dynamic eval: ", pick(ptb_asgd, "test ppl, dynamic eval"))],
       [("", ptb_asgd[1]), ("dynamic eval: ", ptb_asgd[4])]),
      ("10. Fine-tuning a CutMix-trained model with MaxUp+CutMix (m=4), the paper's recipe",
       "+0.23 to +0.46 points over CutMix (ImageNet, ResNet-101 and ProxylessNets; EfficientNets "
       "5 epochs at lr 1e-4, BatchNorm frozen; table 2)",
       "airbench net, 2,500 images, CutMix-trained 80 epochs, fine-tuned 20 epochs at lr 1e-5 / "
       "1e-4 / 1e-3, or 5 epochs BatchNorm frozen; test top-1",
       paper[0::2], paper[1::2]),
  ]

  def cells(labelled):
    differences, verdicts, held = [], [], []
    for label, c in labelled:
      tests = c.tests()
      for i, (_, test) in enumerate(tests):
        seeds_label = ""
        if len(tests) > 1:
          added = len(test.seeds) - len(tests[0][1].seeds)
          seeds_label = (f"{len(test.seeds)} seeds ({added} added after looking): " if i
                         else f"first {len(test.seeds)} seeds: ")
        d = test.differences
        differences.append(f"{label}{seeds_label}{d.mean():+.{c.digits}f} ± {d.std(ddof=1):.{c.digits}f}")
        text = verdict(test, c.a_name, c.lower_is_better, c.words)
        verdicts.append(f"{label}{seeds_label}{text.replace(c.a_name + ' ', 'MaxUp ')}")
        held.append(f"{label}{seeds_label}{'yes' if text.startswith(c.a_name + ' ' + c.words[0]) else 'no'}")
    return "; ".join(differences), "; ".join(verdicts), "; ".join(held)

  table_rows = []
  for experiment, paper, setup, main, same_time in rows:
    differences, verdicts, held = cells(main)
    table_rows.append([experiment, paper, setup, differences, verdicts, held,
                       cells(same_time)[1] if same_time else "-"])
  header = ["experiment", "the paper", "here (3 seeds unless said)",
            "MaxUp − baseline, paired by seed (mean ± sd)", "verdict (paired t-test, p < 0.05)",
            "held?", "MaxUp vs the baseline given MaxUp's time (verdict)"]
  return markdown_table(header, table_rows)


# ---------------------------------------------------------------------------
# Figures.


def _band(ax, runs, split, key, label, scale=1.0, x="epoch"):
  curves = [series(r, split, key, x) for r in runs]
  length = min(len(c[0]) for c in curves)
  xs = curves[0][0][:length]
  ys = np.array([c[1][:length] for c in curves]) * scale
  line, = ax.plot(xs, ys.mean(0), label=f"{label} ({len(runs)} seeds)")
  if len(runs) > 1:
    ax.fill_between(xs, ys.mean(0) - ys.std(0, ddof=1), ys.mean(0) + ys.std(0, ddof=1),
                    color=line.get_color(), alpha=0.2)


def learning_curves(experiment: str, specs, num_train: str, path: Path) -> Path:
  """Test and clean-train top-1 against epochs, one band (mean ± std over seeds) per method."""
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for prefix, label, _ in specs:
    runs = seed_runs(experiment, prefix)
    if runs:
      _band(axes[0], runs, "test", "top1", label, 100)
      _band(axes[1], runs, "train_clean", "top1", label, 100)
  axes[0].set(xlabel="epoch", ylabel="test top-1 % (10,000 images)", title="CIFAR-10 test")
  axes[1].set(xlabel="epoch", ylabel=f"train top-1 % ({num_train} images, un-augmented)",
              title="CIFAR-10 training set, clean")
  for ax in axes:
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  return _save(fig, path)


def cifar_figures(out: Path) -> list[Path]:
  curves = learning_curves("cifar10", CIFAR_RUNS, "2,048", out / "cifar10_curves.png")
  scratch = learning_curves("cifar10_scratch", SCRATCH_RUNS, "2,500",
                            out / "cifar10_scratch_curves.png")

  fig, ax = plt.subplots(figsize=(5, 4))
  ms, means, stds = [], [], []
  for prefix, _, arg in CIFAR_RUNS[:4]:
    runs = seed_runs("cifar10", prefix)
    if runs:
      top1 = np.array([summary(r)["final_top1"] for r in runs]) * 100
      ms.append(int(arg)), means.append(top1.mean())
      stds.append(top1.std(ddof=1) if len(top1) > 1 else 0.0)
  ax.errorbar(ms, means, yerr=stds, marker="o", capsize=4)
  ax.set(xscale="log", xticks=ms, xticklabels=[str(m) for m in ms], xlabel="m (copies)",
         ylabel="test top-1 %", title="CIFAR-10, ResNet-8: m ablation")
  ax.grid(alpha=0.3)
  return [curves, scratch, _save(fig, out / "cifar10_m_ablation.png")]


def finetune_figure(out: Path) -> Path:
  """Experiment 7: test top-1 during fine-tuning, one panel per augmentation."""
  fig, axes = plt.subplots(1, len(FINETUNE_AUGMENTATIONS), figsize=(11, 4), sharey=True)
  for ax, (aug, name) in zip(axes, FINETUNE_AUGMENTATIONS.items()):
    experiment = f"cifar10_finetune_{aug}"
    before = None
    for prefix, label, _ in SCRATCH_RUNS:
      runs = seed_runs(experiment, prefix)
      if runs:
        _band(ax, runs, "test", "top1", label.replace("Cutout", name), 100)
        before = summary(LOGS / "cifar10_scratch" / Path(config_of(runs[0])["init_checkpoint"]).name)
    if before is not None:
      ax.axhline(before["final_top1"] * 100, color="gray", linestyle="--",
                 label="before fine-tuning")
    ax.set(xlabel="fine-tuning epoch", title=f"fine-tuning with {name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  axes[0].set(ylabel="CIFAR-10 test top-1 % (10,000 images)")
  return _save(fig, out / "cifar10_finetune_curves.png")


def finetune_paper_figure(out: Path) -> Path:
  """Experiment 10: each fine-tune's change in test top-1 from its starting model, by setting."""
  fig, ax = plt.subplots(figsize=(9, 4))
  width = 0.8 / len(PAPER_METHODS)
  for j, (prefix, label, _) in enumerate(PAPER_METHODS):
    for i, (experiment, lr, _) in enumerate(PAPER_SETTINGS):
      runs = seed_runs(experiment, f"lr{lr}_{prefix}")
      if not runs:
        continue
      change = np.array([top1(r) - pretrained_top1(r) for r in runs])
      x = i + (j - (len(PAPER_METHODS) - 1) / 2) * width
      color = f"C{j}"
      ax.bar(x, change.mean(), width, color=color, alpha=0.5,
             label=label if i == 0 else None)
      ax.plot(np.full(len(change), x), change, "o", color=color, markersize=4)
  ax.axhline(0, color="gray", linewidth=0.8)
  ax.set_xticks(range(len(PAPER_SETTINGS)),
                [setting.split(" (")[0].replace(", ", ",\n") for _, _, setting in PAPER_SETTINGS])
  ax.set(ylabel="test top-1 change (points)",
         title="Fine-tuning a CutMix-trained model (bars: mean over seeds; dots: seeds)")
  ax.grid(alpha=0.3, axis="y")
  ax.legend(fontsize=8)
  return _save(fig, out / "cifar10_finetune_paper.png")


def ptb_figure(out: Path) -> Path:
  fig, ax = plt.subplots(figsize=(6, 4))
  for prefix, label, _ in PTB_RUNS:
    runs = seed_runs("ptb", prefix)
    if runs:
      _band(ax, runs, "valid", "perplexity", label)
  ax.set(xlabel="epoch", ylabel="validation perplexity", title="PTB, 2x200 LSTM, 50k training tokens")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, out / "ptb_valid_perplexity.png")


def ptb_asgd_figure(out: Path) -> Path:
  """Experiment 9: validation perplexity of every run, with NT-ASGD's switch and the restart marked.

  The right panel zooms into the regime the experiment is about, from epoch
  `zoom_from_epoch` on, where the whole-run panel's curves overlap.
  """
  zoom_from_epoch = 20
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for (prefix, label, _), color in zip(ptb_asgd_specs(), colors):
    runs = seed_runs("ptb_asgd", prefix)
    for i, run in enumerate(runs):
      valid = [r for r in read_records(run) if r["split"] == "valid"]
      for ax, shown in ((axes[0], valid), (axes[1], [r for r in valid if r["epoch"] >= zoom_from_epoch])):
        ax.plot([r["epoch"] for r in shown], [r["perplexity"] for r in shown], color=color, lw=1,
                label=f"{label} ({len(runs)} seeds)" if i == 0 else None)
        for key, marker in (("switched_to_asgd", "v"), ("restarted", "o")):
          marked = [r for r in shown if r[key]]
          ax.plot([r["epoch"] for r in marked], [r["perplexity"] for r in marked], marker,
                  color=color, ms=6)
  for ax in axes:
    ax.plot([], [], "kv", label="NT-ASGD switch")
    ax.plot([], [], "ko", label="fine-tuning restart")
    ax.grid(alpha=0.3, which="both")
  axes[0].set(xlabel="epoch", ylabel="validation perplexity (full set)", yscale="log",
              title="PTB, 2x200 LSTM, 100k training tokens, AWD-LSTM recipe")
  axes[1].set(xlabel="epoch", ylabel="validation perplexity (full set)",
              title=f"the same runs from epoch {zoom_from_epoch} on")
  axes[1].legend(fontsize=8)
  return _save(fig, out / "ptb_asgd_valid_perplexity.png")


def certified_figure(experiment: str, specs, title: str, path: Path) -> Path:
  """Certified accuracy against radius, one band (mean ± std over seeds) per method."""
  sigma, table_radii = CERTIFICATION[experiment]
  fig, ax = plt.subplots(figsize=(6, 4))
  radii = np.linspace(0, table_radii[-1], 201)
  for prefix, label, _ in specs:
    logs = certification_logs(experiment, prefix)
    if not logs:
      continue
    curves = np.array([certification.accuracy_table(log, radii) for _, log in logs]) * 100
    line, = ax.plot(radii, curves.mean(0), label=f"{label} ({len(logs)} seeds)")
    if len(logs) > 1:
      std = curves.std(0, ddof=1)
      ax.fill_between(radii, curves.mean(0) - std, curves.mean(0) + std, color=line.get_color(),
                      alpha=0.2)
  ax.set(xlabel="radius (L2, [0, 1] pixels)", ylabel="certified accuracy %",
         title=f"{title}, sigma={sigma}")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, path)


def mnist_figures(out: Path) -> list[Path]:
  certified = certified_figure("mnist_gauss", MNIST_RUNS[:2], "MNIST, n=10,000, 500 test images",
                               out / "mnist_certified_accuracy.png")

  fig, axes = plt.subplots(1, 3, figsize=(16, 4))
  for prefix, label, _ in MNIST_RUNS:
    runs = seed_runs("mnist_gauss", prefix)
    if runs:
      _band(axes[0], runs, "train_clean", "input_grad_norm", label)
      _band(axes[1], runs, "train_clean", "loss", label)
  # Seeds share their trajectory until MaxUp starts, so the paired ratio
  # isolates what MaxUp changed.
  baselines = {seed_of(r): r for r in seed_runs("mnist_gauss", "m1")}
  for run in seed_runs("mnist_gauss", "m5"):
    if seed_of(run) in baselines:
      epochs, maxup = series(run, "train_clean", "input_grad_norm")
      _, baseline = series(baselines[seed_of(run)], "train_clean", "input_grad_norm")
      axes[2].plot(epochs, maxup / baseline, marker="o", label=f"seed {seed_of(run)}")
  axes[2].axhline(1.0, color="gray", lw=0.8)
  axes[0].set(xlabel="epoch", ylabel="mean ||d loss / d x||_2", yscale="log",
              title="input-gradient norm, 2,048 clean training images")
  axes[1].set(xlabel="epoch", ylabel="cross-entropy", yscale="log",
              title="loss, same clean training images")
  axes[2].set(xlabel="epoch", ylabel="MaxUp+Gauss / Gaussian aug.",
              title="input-gradient norm ratio, paired by seed")
  for ax in axes:
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  axes[2].legend(fontsize=8)
  return [certified, _save(fig, out / "mnist_input_gradient_norm.png")]


def _save(fig, path: Path) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


# ---------------------------------------------------------------------------


TABLES = {
    "what_held": what_held_table,
    "cifar10": cifar_table,
    "cifar10_m": cifar_ablation_table,
    "cifar10_scratch": scratch_table,
    "cifar10_finetune": finetune_table,
    "cifar10_finetune_paper": finetune_paper_table,
    "ptb": ptb_table,
    "ptb_asgd_dropout": ptb_dropout_table,
    "ptb_asgd": ptb_asgd_table,
    "mnist_certified": mnist_certified_table,
    "cifar10_certified": cifar_certified_table,
    "cifar10_certified_sigma05": lambda: cifar_certified_table("cifar10_gauss_sigma0.5"),
    "mnist_gradient": mnist_training_table,
}


def fill_tables(markdown: str, tables: dict[str, str]) -> str:
  for name, table in tables.items():
    pattern = re.compile(rf"(<!-- table:{name} -->\n).*?(<!-- /table:{name} -->)", re.S)
    if not pattern.search(markdown):
      raise ValueError(f"the markdown file has no <!-- table:{name} --> ... <!-- /table:{name} --> block")
    markdown = pattern.sub(lambda m: m.group(1) + table + "\n" + m.group(2), markdown)
  return markdown


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--collect", type=Path, help="copy finished runs' logs from this directory")
  parser.add_argument("--results_md", type=Path, default=RESULTS_MD,
                      help="the markdown file whose table blocks are rewritten")
  parser.add_argument("--figures", type=Path, default=FIGURES, help="where the PNGs go")
  args = parser.parse_args()
  if args.collect:
    collect(args.collect)
  tables = {name: make() for name, make in TABLES.items()}
  args.results_md.write_text(fill_tables(args.results_md.read_text(), tables))
  print(f"tables written into {args.results_md}")
  figures = cifar_figures(args.figures) + [
      finetune_figure(args.figures), finetune_paper_figure(args.figures), ptb_figure(args.figures),
      ptb_asgd_figure(args.figures),
      certified_figure("cifar10_gauss", CIFAR_GAUSS_RUNS, "CIFAR-10, n=10,000, 200 test images",
                       args.figures / "cifar10_certified_accuracy.png")]
  for path in figures + mnist_figures(args.figures):
    print(f"figure: {path}")


if __name__ == "__main__":
  main()
