"""The GPU benchmark script runs end to end on CPU (its --dry_run), and its budget logic."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import gpu
from conftest import TEST_XLA_FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dry_run_prints_the_table_and_saves_it_as_it_goes(tmp_path):
  out = tmp_path / "results" / "gpu.jsonl"
  # m=2 runs; m=3 must be skipped: the budget is spent by the first unit.
  args = [sys.executable, "-m", "benchmarks.gpu", "--dry_run", "--copies", "2,3",
          "--time_budget_s", "1", "--grace_s", "120", "--out", str(out)]
  env = dict(os.environ, XLA_FLAGS=TEST_XLA_FLAGS)  # One device, compiled as every test compiles.
  result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=150)
  assert result.returncode == 0, result.stdout + result.stderr

  lines = result.stdout.splitlines()
  header = "| " + " | ".join(gpu.TABLE_HEADER) + " |"
  assert header in lines
  rows = [line for line in lines if line.startswith("| small_cnn | float32 | 2 |")]
  assert len(rows) == 2  # once as measured, once in the final table
  assert any(line.startswith("# skipped: small_cnn float32 m=3") for line in lines)

  records = [json.loads(line) for line in out.read_text().splitlines()]
  kinds = [r["kind"] for r in records]
  assert kinds[0] == "environment" and kinds[-1] == "done"
  (row,) = [r for r in records if r["kind"] == "row"]
  assert row["m"] == 2 and row["standard images/s"] > 0 and row["(b)/(a)"] > 0
  assert [r["unit"] for r in records if r["kind"] == "skipped"] == ["small_cnn float32 m=3"]
  assert rows[0] in (tmp_path / "results" / "gpu.md").read_text().splitlines()


def test_units_run_smallest_m_first_then_dtype_then_model():
  units = gpu.work_units(["resnet110", "wrn28_10"], ["float32", "bfloat16"], [4, 10])
  assert [u.label for u in units[:3]] == [
      "resnet110 float32 m=4", "wrn28_10 float32 m=4", "resnet110 bfloat16 m=4"]
  assert all(u.m == 4 for u in units[:4]) and all(u.m == 10 for u in units[4:])


def test_estimate_counts_only_missing_compilations():
  measured = gpu.Measured(
      compile_s={("resnet110", "float32", "a"): 30.0, ("resnet110", "float32", "d4"): 20.0,
                 ("resnet110", "float32", "b4"): 40.0},
      step_s={("resnet110", "float32", "a"): 0.03})
  compiled = {("resnet110", "float32", v) for v in ("a", "d4", "b4")}
  m10 = gpu.Unit("resnet110", "float32", 10)
  bf16 = gpu.Unit("resnet110", "bfloat16", 4)
  one_thread = dict(warmup=1, repeats=7, compile_threads=1)
  # m=10 needs d10 and b10 (like d4 and b4); a is compiled already.
  run = 9 * 0.03 * (1 + 10 / 3 + 1 + 10 / 3)
  assert gpu.estimate_unit_s(measured, m10, compiled, **one_thread) == pytest.approx(60 + run)
  # Another dtype needs all three; with three threads the slowest bounds the wall time.
  three = dict(one_thread, compile_threads=3)
  assert gpu.estimate_unit_s(measured, bf16, compiled, **three) == pytest.approx(
      40 + 9 * 0.03 * (1 + 4 / 3 + 1 + 4 / 3))


def test_dry_run_defaults_leave_explicit_options_alone():
  args = gpu.parse_args(["--dry_run", "--copies", "2,3"])
  assert (args.models, args.batch_size, args.copies) == ("small_cnn", 8, "2,3")
  args = gpu.parse_args([])
  assert (args.models, args.time_budget_s) == ("resnet110,wrn28_10", 420.0)
