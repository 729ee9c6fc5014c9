"""Runs train.py in subprocesses, as a user or a cluster would: one process, or two on loopback."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO, TEST_XLA_FLAGS


def run(config_file, workdir, overrides, *, num_devices=1, extra_args=()):
  """Starts `train.py --config CONFIG_FILE --workdir WORKDIR --config.K=V ...` on `num_devices` CPUs.

  The process inherits the session's compilation cache (conftest.py): a run
  restarted after a kill or a SIGTERM loads the steps it compiled before.
  """
  args = [sys.executable, "train.py", "--config", config_file, "--workdir", str(workdir)]
  args += [f"--config.{k}={v}" for k, v in overrides.items()]
  env = {**os.environ,
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={num_devices} {TEST_XLA_FLAGS}"}
  return subprocess.Popen(args + list(extra_args), cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_two_processes(config_file, workdir, overrides):
  """train.py as two processes on loopback, each with two CPU devices."""
  port = free_port()
  return [
      run(config_file, workdir, overrides, num_devices=2,
          extra_args=["--coordinator_address", f"localhost:{port}", "--num_processes", "2",
                      "--process_id", str(pid)])
      for pid in range(2)
  ]


def wait_until(condition, procs, timeout=240):
  """Polls `condition()` while every process in `procs` is still running."""
  deadline = time.time() + timeout
  while not condition():
    for proc in procs:
      assert proc.poll() is None, proc.stdout.read()
    assert time.time() < deadline, "timed out"
    time.sleep(0.02)


def first_step_logged(workdir):
  """True once a run has logged its first (compiled) training step."""
  path = Path(workdir) / "metrics.jsonl"
  return lambda: path.is_file() and '"split": "train"' in path.read_text()


def saved_steps(workdir):
  return sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]
