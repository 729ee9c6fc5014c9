"""BENCHMARKS.md's TPU table: every paper config compiled for its natural TPU preset.

    python -m benchmarks.tpu_compile_table            # compile what is missing, print the table
    python -m benchmarks.tpu_compile_table --write    # ... and put it into BENCHMARKS.md
    python -m benchmarks.tpu_compile_table --table    # only print the table from what is stored

Each config runs `train.py --config configs/hardware.py:PRESET:BASE:ARG
--compile_only --json_out benchmarks/tpu_compile/NAME.json` in its own
process (needs libtpu: pip install "maxup-jax[tpu]"); a config whose JSON is
there is skipped, so the command resumes where it stopped and can run in the
background (the big models take minutes per program on a small CPU); a
second run with --reverse shares the work (each claims a config with a
`.running` file). Rows not yet compiled are listed as such.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "tpu_compile")
BENCHMARKS_MD = os.path.join(REPO, "BENCHMARKS.md")
BEGIN, END = "<!-- tpu-compile-table:begin -->", "<!-- tpu-compile-table:end -->"

# (group, preset, base config, its argument), most telling first.
CIFAR = [(d, mo, me) for mo in ("wrn28_10", "resnet110", "preact_resnet110")
         for me in ("maxup", "cutout") for d in ("cifar100", "cifar10")]
CONFIGS = (
    [("CIFAR (tables 3-5)", "tpu_v4_32", "cifar_paper", f"{d},{mo},{me}") for d, mo, me in CIFAR]
    + [("ImageNet fine-tune (tables 1-2)", "tpu_v5e_64", "imagenet_cutmix", f"{mo},{me}")
       for mo in ("resnet50", "resnet101") for me in ("maxup", "cutmix")]
    + [("AWD-LSTM (section 4.3)", "tpu_v5e_1", base, "")
       for base in ("ptb_awd_lstm_maxup", "ptb_awd_lstm")]
    + [("AWD-LSTM (section 4.3)", "tpu_v5e_4", base, "")
       for base in ("wikitext2_awd_lstm_maxup", "wikitext2_awd_lstm")]
    + [("Certified robustness (table 8), CIFAR-10", "tpu_v4_32", "cifar10_gauss_paper", f"0.25,{m}")
       for m in (5, 1, 25, 50, 100, 150)]
)
# Bring the most telling rows of every group first when compiling.
ORDER = [0, 12, 16, 20, 4, 13, 1, 17, 21, 18, 19, 14, 15, 22, 23, 24, 25, 2, 3, 5, 6, 7, 8, 9,
         10, 11]


def config_arg(preset, base, arg):
  return f"configs/hardware.py:{preset}:{base}" + (f":{arg}" if arg else "")


def result_path(preset, base, arg):
  name = re.sub(r"[^\w.]+", "_", f"{preset}_{base}_{arg}").strip("_")
  return os.path.join(RESULTS, name + ".json")


def environment() -> dict:
  import jax
  from importlib import metadata
  from trainer.metrics import cpu_name
  try:
    libtpu = metadata.version("libtpu")
  except metadata.PackageNotFoundError:
    libtpu = "not installed"
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      "cpu": cpu_name(), "nproc": os.cpu_count(), "python": platform.python_version(),
      "jax": jax.__version__, "libtpu": libtpu, "loadavg": "%.2f %.2f %.2f" % os.getloadavg(),
  }


def compile_one(preset, base, arg, timeout):
  path = result_path(preset, base, arg)
  os.makedirs(RESULTS, exist_ok=True)
  try:  # Another run of this script compiling the same config: leave it.
    claim = os.open(path + ".running", os.O_CREAT | os.O_EXCL)
  except FileExistsError:
    return
  os.close(claim)
  try:
    _compile_one(path, preset, base, arg, timeout)
  finally:
    os.remove(path + ".running")


def _compile_one(path, preset, base, arg, timeout):
  command = [sys.executable, "train.py", "--config", config_arg(preset, base, arg),
             "--compile_only", "--json_out", path + ".tmp"]
  print("$ " + " ".join(command[1:]), flush=True)
  env = environment()
  started = time.time()
  try:
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    print(f"  timed out after {timeout} s; not stored", flush=True)
    return
  if run.returncode != 0:
    print(run.stdout[-2000:] + run.stderr[-3000:], flush=True)
    return
  print(run.stdout, flush=True)
  with open(path + ".tmp") as f:
    report = json.load(f)
  report["environment"] = env | {"wall_seconds": round(time.time() - started, 1)}
  with open(path, "w") as f:
    json.dump(report, f, indent=1)
  os.remove(path + ".tmp")


def _fmt_seconds(x):
  if not x:
    return "-"
  return f"{x * 1e3:.3g} ms" if x < 1 else f"{x:.3g} s"


def table_lines() -> list[str]:
  header = ("| config | preset (chips) | fits? | peak GiB / HBM | TFLOP per step per chip "
            "(MaxUp; standard) | MaxUp / standard FLOPs (ideal) | est. step | est. chip-hours "
            "of the recipe | compile s |")
  lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
  group = None
  missing = 0
  for g, preset, base, arg in CONFIGS:
    if g != group:
      lines.append(f"| **{g}** | | | | | | | | |")
      group = g
    name = f"`{base}{':' + arg if arg else ''}`"
    path = result_path(preset, base, arg)
    if not os.path.exists(path):
      missing += 1
      lines.append(f"| {name} | {preset} | not yet compiled | | | | | | |")
      continue
    with open(path) as f:
      r = json.load(f)
    programs = r["programs"]
    biggest = programs.get("train_maxup", programs["train_standard"])
    peak = max(p["peak_bytes"] for p in programs.values())
    fits = "yes" if r["fits"] else "**no**"
    if not r["fits"]:
      tried = ", ".join(f"{d}: {'fits' if p['fits'] else 'no'}" for d, p in r["fit_options"]
                        if p is not None)
      fits += f" ({tried})" if tried else ""
    peak_text = f"{peak / 2**30:.2f} / {r['hbm_bytes'] / 2**30:.0f}" if peak else "?"
    if not biggest["fits"] and biggest["error"]:
      peak_text = f">{r['hbm_bytes'] / 2**30:.0f} (compile-time OOM" + (
          f", {peak / 2**30:.1f}" if peak else "") + f") / {r['hbm_bytes'] / 2**30:.0f}"
    std = programs["train_standard"]
    at_least = ">= " if biggest.get("while_loop_flops", 0) else ""
    flops = (f"{at_least}{biggest['flops'] / 1e12:.3g}; {at_least}{std['flops'] / 1e12:.3g}"
             if "train_maxup" in programs else f"{at_least}{std['flops'] / 1e12:.3g} (m=1)")
    ratio = (f"{r['flops_ratio']:.2f} ({r['ideal_ratio']:.2f})" if r["flops_ratio"] else "-")
    hours = f"{r['recipe_chip_hours']:,.3g}" if r["recipe_chip_hours"] else "-"
    if r.get("certification_chip_hours"):
      hours += f" + certification {r['certification_chip_hours']:,.3g}"
    compile_s = sum(p["compile_seconds"] for p in programs.values())
    lines.append(f"| {name} | {preset} ({r['chips']}) | {fits} | {peak_text} | {flops} | "
                 f"{ratio} | {_fmt_seconds(r['step_seconds'])} | {hours} | {compile_s:.0f} |")
  envs = [json.load(open(result_path(*c[1:])))["environment"] for c in CONFIGS
          if os.path.exists(result_path(*c[1:]))]
  if envs:
    dates = sorted(e["date"] for e in envs)
    e = envs[0]
    lines += ["", f"Compiled {dates[0]} to {dates[-1]} on `{e['cpu']}` ({e['nproc']} cores, "
              f"shared; load average {min(float(x['loadavg'].split()[0]) for x in envs)} to "
              f"{max(float(x['loadavg'].split()[0]) for x in envs)}), Python {e['python']}, JAX "
              f"{e['jax']}, libtpu {e['libtpu']}. {missing} of {len(CONFIGS)} configs not yet "
              "compiled."]
  return lines


def write_benchmarks(lines):
  with open(BENCHMARKS_MD) as f:
    text = f.read()
  block = BEGIN + "\n" + "\n".join(lines) + "\n" + END
  if BEGIN not in text:
    raise SystemExit(f"BENCHMARKS.md has no {BEGIN} marker")
  start, end = text.index(BEGIN), text.index(END) + len(END)
  with open(BENCHMARKS_MD, "w") as f:
    f.write(text[:start] + block + text[end:])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--table", action="store_true", help="Only print the stored rows.")
  parser.add_argument("--write", action="store_true", help="Also write the table into BENCHMARKS.md.")
  parser.add_argument("--only", default="", help="Compile only configs whose name contains this.")
  parser.add_argument("--timeout", type=int, default=3600, help="Seconds per config.")
  parser.add_argument("--reverse", action="store_true",
                      help="Least telling configs first (a second run beside a first).")
  args = parser.parse_args()
  # A SIGTERM ends the current compilation and releases its claim.
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
  if not args.table:
    for i in ORDER[::-1] if args.reverse else ORDER:
      _, preset, base, arg = CONFIGS[i]
      if args.only and args.only not in config_arg(preset, base, arg):
        continue
      if not os.path.exists(result_path(preset, base, arg)):
        compile_one(preset, base, arg, args.timeout)
  lines = table_lines()
  print("\n".join(lines))
  if args.write:
    write_benchmarks(lines)


if __name__ == "__main__":
  main()
