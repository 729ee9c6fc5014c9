"""RESULTS.md's tables are what results/make_results.py computes from the logs in results/logs."""

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from conftest import REPO, flat_config, needs_cifar10, records, shrink

FIGURES = ("cifar10_curves.png", "cifar10_scratch_curves.png", "cifar10_m_ablation.png",
           "cifar10_finetune_curves.png", "ptb_valid_perplexity.png", "mnist_certified_accuracy.png",
           "mnist_input_gradient_norm.png", "cifar10_certified_accuracy.png",
           "ptb_asgd_valid_perplexity.png")


def test_tables_and_figures_regenerate_from_the_logs(tmp_path):
  results_md = tmp_path / "RESULTS.md"
  shutil.copy(REPO / "RESULTS.md", results_md)
  subprocess.run([sys.executable, "-m", "results.make_results", "--results_md", str(results_md),
                  "--figures", str(tmp_path / "figures")], cwd=REPO, check=True,
                 capture_output=True)
  assert results_md.read_text() == (REPO / "RESULTS.md").read_text()
  for name in FIGURES:
    assert (tmp_path / "figures" / name).stat().st_size > 10_000
    assert (REPO / "results" / "figures" / name).is_file()


# Experiments whose seeds are still landing (RESULTS.md says they are running).
RUNNING: set[str] = set()


def test_every_table_averages_at_least_three_seeds():
  text = (REPO / "RESULTS.md").read_text()
  blocks = re.findall(r"<!-- table:(\w+) -->\n(.*?)<!-- /table:\1 -->", text, re.S)
  assert {name for name, _ in blocks} == {"what_held", "cifar10", "cifar10_m", "cifar10_scratch",
                                          "cifar10_finetune", "ptb", "mnist_certified",
                                          "mnist_gradient", "cifar10_certified",
                                          "ptb_asgd_dropout", "ptb_asgd",
                                          "cifar10_finetune_paper", "cifar10_certified_sigma05"} | RUNNING
  for name, block in blocks:
    # A grid at seed 0 that picks the setting the compared runs use; the summary;
    # experiments still running.
    if name in {"ptb_asgd_dropout", "what_held"} | RUNNING:
      continue
    first_table = block.split("\n\n")[0]  # The methods; the comparisons follow it.
    rows = [line for line in first_table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) >= 3, name  # A header and at least two compared methods.
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    seeds_column = next(i for i, cell in enumerate(header) if cell.endswith("seeds"))
    for row in rows[1:]:
      cells = [cell.strip() for cell in row.strip("|").split("|")]
      assert int(cells[seeds_column]) >= 3, (name, row)


def test_run_sh_on_a_fresh_checkout_skips_the_collected_runs(tmp_path):
  # A copy of results/ with no runs/ beside it: every run of experiment 2 is in
  # results/logs, so nothing trains (there is no train.py here to run).
  shutil.copytree(REPO / "results", tmp_path / "results")
  completed = subprocess.run(["bash", "results/run.sh", "ptb"], cwd=tmp_path, capture_output=True,
                             text=True, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
  assert completed.returncode == 0, completed.stderr
  lines = completed.stdout.splitlines()
  collected = sorted(p.name for p in (REPO / "results/logs/ptb").iterdir() if p.is_dir())
  assert sorted(line.removeprefix("done: runs/results/ptb/") for line in lines) == collected
  for run in collected:
    for name in ("config.json", "metrics.jsonl"):
      restored = tmp_path / "runs/results/ptb" / run / name
      assert restored.read_bytes() == (REPO / "results/logs/ptb" / run / name).read_bytes()


def test_collect_leaves_out_runs_whose_certification_is_unfinished(tmp_path, monkeypatch):
  mr = _make_results()
  monkeypatch.setattr(mr, "LOGS", tmp_path / "logs")
  experiment = tmp_path / "runs" / "cifar10_gauss_sigma0.5"
  for name, certified in (("m1_seed0", True), ("m5_seed0", False)):
    run = experiment / name
    (run / "certify").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"split": "summary", "step": 8}\n')
    (run / "config.json").write_text("{}")
    (run / "certify.log").write_text("certifying\n")
    (run / "certify" / "predictions.tsv").write_text("idx\tlabel\n")
    if certified:
      (run / "certify" / "certified_accuracy_sigma0.5.tsv").write_text("radius\taccuracy\n")
  mr.collect(tmp_path / "runs")
  collected = tmp_path / "logs" / "cifar10_gauss_sigma0.5"
  assert [p.name for p in collected.iterdir()] == ["m1_seed0"]
  assert (collected / "m1_seed0" / "certify" / "certified_accuracy_sigma0.5.tsv").is_file()


# ---------------------------------------------------------------------------
# The statistical rule (make_results.paired_test, verdict, Comparison).


def _make_results():
  from results import make_results
  return make_results


def _make_results_on_a_copy_of_the_logs(tmp_path, monkeypatch):
  """(make_results reading tmp_path/logs, that folder): a copy of results/logs to add stand-in
  runs to."""
  mr = _make_results()
  logs = tmp_path / "logs"
  shutil.copytree(REPO / "results" / "logs", logs)
  monkeypatch.setattr(mr, "LOGS", logs)
  return mr, logs


def test_paired_test_matches_scipy():
  mr = _make_results()
  a = {0: 70.61, 1: 70.31, 2: 69.56, 3: 69.15, 4: 69.19}
  b = {0: 70.43, 1: 70.88, 2: 71.30, 3: 70.35, 4: 70.75, 5: 99.0}  # Seed 5: B only, left out.
  test = mr.paired_test(a, b)
  xa, xb = [a[s] for s in range(5)], [b[s] for s in range(5)]
  paired, welch = stats.ttest_rel(xa, xb), stats.ttest_ind(xa, xb, equal_var=False)
  assert test.seeds == (0, 1, 2, 3, 4)
  np.testing.assert_allclose(test.differences, np.subtract(xa, xb))
  np.testing.assert_allclose([test.t, test.p], [paired.statistic, paired.pvalue], rtol=1e-6)
  np.testing.assert_allclose([test.welch_t, test.welch_p], [welch.statistic, welch.pvalue], rtol=1e-6)
  # Known values: experiment 6's five seeds, t = -2.78 at df 4, p just under 0.05.
  assert round(test.t, 2) == -2.78 and 0.049 < test.p < 0.05


def test_verdict_has_three_outcomes_and_follows_the_paired_test():
  mr = _make_results()
  base = {0: 10.0, 1: 12.0, 2: 14.0}
  higher = mr.paired_test({0: 11.0, 1: 13.1, 2: 14.9}, base)   # +1 each seed: paired p small
  lower = mr.paired_test({0: 9.0, 1: 10.9, 2: 13.1}, base)
  mixed = mr.paired_test({0: 11.0, 1: 11.0, 2: 14.5}, base)
  assert mr.verdict(higher, "MaxUp") == "MaxUp better at p < 0.05 (3 seeds)"
  assert mr.verdict(lower, "MaxUp") == "MaxUp worse at p < 0.05 (3 seeds)"
  assert mr.verdict(mixed, "MaxUp") == "no difference at p < 0.05 (3 seeds)"
  # Lower is better (perplexity), and neutral words (a gradient norm).
  assert mr.verdict(lower, "MaxUp", lower_is_better=True) == "MaxUp better at p < 0.05 (3 seeds)"
  assert (mr.verdict(lower, "MaxUp", lower_is_better=True, words=("lower", "higher"))
          == "MaxUp lower at p < 0.05 (3 seeds)")
  # The paired test decides, not the unpaired one: a shift far smaller than the seeds' spread.
  assert higher.welch_p > 0.05 and higher.p < 0.05
  # Identical methods (the same weights) are no difference, not a NaN.
  same = mr.paired_test(base, dict(base))
  assert (same.t, same.p) == (0.0, 1.0)
  assert mr.verdict(same, "MaxUp") == "no difference at p < 0.05 (3 seeds)"


def test_seeds_added_after_looking_are_tested_on_the_first_seeds_too():
  mr = _make_results()
  a = {s: 1.0 + 0.1 * s for s in range(5)}
  b = {s: 0.0 for s in range(5)}
  comparison = mr.Comparison("MaxUp", "base", "x", a, b, added_after_looking=(3, 4))
  (first, first_test), (all_seeds, all_test) = comparison.tests()
  assert first == "0-2" and first_test.seeds == (0, 1, 2)
  assert all_seeds == "0-4 (3, 4 added after looking at 0-2)" and all_test.seeds == (0, 1, 2, 3, 4)
  # Without the added seeds (a method that has seeds 0-2 only), one test.
  assert len(mr.Comparison("MaxUp", "base", "x", a, {s: 0.0 for s in range(3)},
                           added_after_looking=(3, 4)).tests()) == 1


def test_what_held_says_held_exactly_where_the_verdict_is_the_papers_direction():
  text = (REPO / "RESULTS.md").read_text()
  what_held = re.search(r"<!-- table:what_held -->\n(.*?)<!-- /table:", text, re.S).group(1)
  rows = [[cell.strip() for cell in line.strip("|").split(" | ")]
          for line in what_held.splitlines()[2:]]
  numbers = [row[0].split(".")[0] for row in rows]  # Experiment 8 has a row per sigma.
  assert list(dict.fromkeys(numbers)) == [str(i) for i in range(1, 11)] and len(numbers) <= 11
  for row in rows:
    verdicts, held = row[4].split("; "), row[5].split("; ")
    assert len(verdicts) == len(held), row[0]
    for v, h in zip(verdicts, held):
      assert h.endswith("yes") == ("MaxUp better at p < 0.05" in v or "MaxUp lower at p < 0.05" in v), (v, h)
  # The paired verdicts of the scratch block (experiment 6) are those of its row.
  scratch = re.search(r"<!-- table:cifar10_scratch -->\n(.*?)<!-- /table:", text, re.S).group(1)
  first, five = [line for line in scratch.splitlines() if line.startswith("| MaxUp+Cutout m=4 − Cutout |")]
  row6 = next(row for row in rows if row[0].startswith("6."))
  assert "no difference at p < 0.05 (3 seeds)" in first and "first 3 seeds: no difference" in row6[4]
  assert "worse at p < 0.05 (5 seeds)" in five and "MaxUp worse at p < 0.05 (5 seeds)" in row6[4]
  # Experiment 10's row: per setting, the verdicts of its block against CutMix for the
  # same epochs (verdict column) and for MaxUp's time (last column).
  paper = re.search(r"<!-- table:cifar10_finetune_paper -->\n(.*?)<!-- /table:", text, re.S).group(1)
  block_verdicts = {}
  for line in paper.splitlines():
    if line.startswith("| MaxUp+CutMix m=4 − "):
      cells = [cell.strip() for cell in line.strip("|").split(" | ")]
      baseline, setting = cells[0].split(" − ")[1], cells[1].removeprefix("test top-1 %, ")
      block_verdicts[baseline, setting] = cells[-1].replace("MaxUp+CutMix m=4 ", "MaxUp ")
  row10 = next(row for row in rows if row[0].startswith("10."))
  for column, baseline in ((4, "CutMix"), (6, "CutMix, MaxUp's time")):
    settings = [cell.split(": ", 1) for cell in row10[column].split("; ")]
    assert len(settings) == 4
    assert all(block_verdicts[baseline, setting] == v for setting, v in settings), row10[column]


def test_experiment_9_tables_with_five_seeds(tmp_path, monkeypatch):
  # Seeds 3 and 4 of m1 and m2 are being added; stand-ins (copies of seeds 0
  # and 1) for those not collected yet check that the tables then show the
  # 3-seed test beside the 5-seed one.
  mr, logs = _make_results_on_a_copy_of_the_logs(tmp_path, monkeypatch)
  for prefix in ("m1", "m2"):
    for seed, source in ((3, 0), (4, 1)):
      target = logs / "ptb_asgd" / f"{prefix}_seed{seed}"
      if not target.exists():
        shutil.copytree(logs / "ptb_asgd" / f"{prefix}_seed{source}", target)
  table = mr.ptb_asgd_table()
  assert "| Embedding dropout (m=1) | 5 |" in table and "| MaxUp, m=2 | 5 |" in table
  assert "| 0-2 |" in table and "| 0-4 (3, 4 added after looking at 0-2) |" in table
  assert "for SEED in 0 1 2 3 4; do" in table and "for SEED in 0 1 2; do" in table
  row = next(line for line in mr.what_held_table().splitlines() if line.startswith("| 9."))
  assert "first 3 seeds" in row and "5 seeds (2 added after looking)" in row


def test_sigma_05_joins_what_held_at_two_seeds(tmp_path, monkeypatch):
  # Stand-ins (copies of seed 0) for seed 1 of experiment 8 at sigma 0.5, where not collected.
  mr, logs = _make_results_on_a_copy_of_the_logs(tmp_path, monkeypatch)
  for prefix in ("m1", "m5"):
    target = logs / "cifar10_gauss_sigma0.5" / f"{prefix}_seed1"
    if not target.exists():
      shutil.copytree(logs / "cifar10_gauss_sigma0.5" / f"{prefix}_seed0", target)
  rows = [line for line in mr.what_held_table().splitlines() if line.startswith("| 8.")]
  assert len(rows) == 2 and "σ=0.25" in rows[0] and "σ=0.5" in rows[1]
  verdicts = rows[1].split(" | ")[4].split("; ")
  assert [v.split(":")[0] for v in verdicts] == [f"r={r:g}" for r in (0.25, 0.5, 0.75, 1, 1.25, 1.5)]


def test_scratch_ablation_joins_experiment_6(tmp_path, monkeypatch):
  # m=2 and m=10 in experiment 6's regime (results/run.sh scratch_ablation) are to run;
  # stand-ins (copies of the m=4 runs, their copies renamed) check where they land.
  mr, logs = _make_results_on_a_copy_of_the_logs(tmp_path, monkeypatch)
  for m in (2, 10):
    for seed in (0, 1, 2):
      target = logs / "cifar10_scratch" / f"m{m}_seed{seed}"
      if not target.exists():
        shutil.copytree(logs / "cifar10_scratch" / f"m4_seed{seed}", target)
        config = json.loads((target / "config.json").read_text())
        config["maxup"]["num_copies"] = m
        (target / "config.json").write_text(json.dumps(config))
  table = mr.scratch_table()
  assert "| MaxUp+Cutout, m=2 | 3 | 80 | 2 fwd + 1 fwd+bwd |" in table
  assert "| MaxUp+Cutout, m=10 | 3 | 80 | 10 fwd + 1 fwd+bwd |" in table
  for m in (2, 10):
    assert f"| MaxUp+Cutout m={m} − Cutout | test top-1 % | 0-2 |" in table
    assert f"results/configs/cifar10_scratch.py:{m} --config.seed=$SEED" in table
  row = next(line for line in mr.what_held_table().splitlines() if line.startswith("| 6."))
  verdicts = row.split(" | ")[4].split("; ")
  assert [v.split(":")[0] for v in verdicts] == ["m=4", "m=4", "m=2", "m=10"]


# ---------------------------------------------------------------------------
# Experiment 10's config (results/configs/cifar10_finetune_cutmix.py) and run.sh target.


def test_cutmix_finetune_config_builds_the_papers_recipe():
  from results.configs import cifar10_finetune_cutmix as ft, cifar10_scratch

  pretrain = flat_config(ft.get_config("pretrain"))
  scratch = flat_config(cifar10_scratch.get_config("1"))
  # Experiment 6's baseline with CutMix in place of Cutout, nothing else.
  assert {k for k in scratch if pretrain[k] != scratch[k]} == {"augment.cutout_length",
                                                               "augment.cutmix_alpha"}
  assert pretrain["augment.cutmix_alpha"] == 1.0 and pretrain["augment.cutout_length"] == 0
  for lr in ft.LEARNING_RATES:
    maxup, standard = ft.get_config(f"{lr},4"), ft.get_config(f"{lr},1")
    assert maxup.learning_rate == float(lr) and maxup.lr_schedule == "constant"
    assert maxup.num_epochs == 20 and not maxup.freeze_batch_norm
    assert maxup.maxup.warmup_epochs == 0 and maxup.init_checkpoint == ft.PRETRAINED
    assert maxup.augment.cutmix_alpha == 1.0 and maxup.augment.cutout_length == 0
    # The methods differ only in the number of copies.
    baseline = flat_config(standard)
    assert {k for k, v in flat_config(maxup).items() if baseline[k] != v} == {"maxup.num_copies"}
  frozen = ft.get_config("1e-4,4,frozen")
  assert frozen.freeze_batch_norm and frozen.num_epochs == 5 and frozen.learning_rate == 1e-4
  for bad in ("1e-2,4", "1e-5,2", "1e-5", "1e-5,4,thawed", "cutmix,4"):
    with pytest.raises(ValueError):
      ft.get_config(bad)


def test_run_sh_has_the_cutmix_finetune_target():
  text = (REPO / "results" / "run.sh").read_text()
  assert "finetune_cutmix()" in text and "cifar10_certify_sigma05()" in text
  usage = subprocess.run(["bash", "results/run.sh", "no_such_target"], cwd=REPO, capture_output=True,
                         text=True)
  assert usage.returncode == 2 and "finetune_cutmix" in usage.stderr


@needs_cifar10
def test_cutmix_finetune_runs_a_few_steps(tmp_path):
  # The pretrain config for 4 steps, then MaxUp+CutMix fine-tuning from it,
  # on 256 images (scored on 200, without the clean-training-set score that
  # the tiny runs of test_train_image check): what the real runs do, in seconds.
  from results.configs import cifar10_finetune_cutmix as ft
  from trainer import checkpointing, image

  def tiny(config, **overrides):
    return shrink(config, num_devices=1, train_eval_examples=0, num_epochs=1,
                  log_every_steps=2, checkpoint_every_steps=4, **overrides)

  image.train_and_evaluate(tiny(ft.get_config("pretrain")), str(tmp_path / "pretrain"))
  config = tiny(ft.get_config("1e-3,4"), init_checkpoint=str(tmp_path / "pretrain"))
  image.train_and_evaluate(config, str(tmp_path / "finetune"))
  assert [r["num_copies"] for r in records(tmp_path / "finetune", "train")] == [4, 4]
  assert int(checkpointing.load_arrays(str(tmp_path / "finetune"))["step"]) == 4
  assert records(tmp_path / "finetune", "summary")[-1]["steps"] == 4


def test_run_sh_finetune_cutmix_runs_the_grid_in_order(tmp_path):
  # run.sh with a stand-in python that records each command and writes a
  # finished run: the order, the workdirs and each fine-tune's starting point.
  # Without the collected logs, which would mark the experiment's finished runs done.
  shutil.copytree(REPO / "results", tmp_path / "results", ignore=shutil.ignore_patterns("logs"))
  (tmp_path / "results" / "logs").mkdir()
  fake = tmp_path / "fake_python"
  fake.write_text("""#!/bin/bash
echo "$*" >> commands.txt
if [[ $1 == -m && $2 == results.equal_time ]]; then echo 40; exit 0; fi
while [[ $# -gt 0 ]]; do [[ $1 == --workdir ]] && workdir=$2; shift; done
mkdir -p "$workdir/checkpoints"
echo '{"split": "summary", "preempted": false}' > "$workdir/metrics.jsonl"
echo "summary: done"
""")
  fake.chmod(0o755)
  completed = subprocess.run(["bash", "results/run.sh", "finetune_cutmix"], cwd=tmp_path,
                             capture_output=True, text=True,
                             env={"PATH": "/usr/bin:/bin", "PYTHON": str(fake), "SEEDS": "0 1"})
  assert completed.returncode == 0, completed.stderr
  commands = (tmp_path / "commands.txt").read_text().splitlines()
  workdirs = [c.split("--workdir ")[1].split()[0] for c in commands if "--workdir" in c]
  config = "results/configs/cifar10_finetune_cutmix.py"
  assert workdirs[:2] == ["runs/results/cifar10_cutmix_scratch/m1_seed0",
                          "runs/results/cifar10_cutmix_scratch/m1_seed1"]
  grid = [w.removeprefix("runs/results/cifar10_finetune_paper/") for w in workdirs[2:20]]
  assert grid == [f"lr{lr}_{m}_seed{s}" for lr in ("1e-5", "1e-4", "1e-3") for s in (0, 1)
                  for m in ("m4", "m1", "m1_equal_time")]
  assert [w.rsplit("/", 1)[1] for w in workdirs[20:]] == [
      f"lr1e-4_{m}_seed{s}" for s in (0, 1) for m in ("m4", "m1", "m1_equal_time")]
  assert all("cifar10_finetune_paper_frozen/" in w for w in workdirs[20:])
  for command in commands:
    if "--workdir runs/results/cifar10_finetune_paper" in command:  # Seed S starts from seed S.
      seed = command.split("--config.seed=")[1].split()[0]
      assert f"--config.init_checkpoint=runs/results/cifar10_cutmix_scratch/m1_seed{seed}" in command
      assert f"--config {config}:1e-" in command
    if "equal_time_seed" in command:
      assert "--config.num_epochs=40" in command
  assert sum(c.startswith("-m results.equal_time ") for c in commands) == 2
