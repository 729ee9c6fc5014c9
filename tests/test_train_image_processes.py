"""End-to-end tests of image training as two train.py processes on loopback (real CIFAR-10).

Apart from test_train_image.py so that the two test files, each minutes long,
run side by side on two test workers.
"""

import re
import signal

import chex
import numpy as np

from conftest import final_params, needs_cifar10, tiny_cifar_overrides, train_losses
import train_py
from trainer import checkpointing
from train_py import first_step_logged, saved_steps, wait_until

pytestmark = needs_cifar10
CIFAR_CONFIG = "configs/cifar10_resnet20.py"


def test_two_processes_on_loopback_match_one_process(cifar_reference_run, tmp_path):
  procs = train_py.run_two_processes(CIFAR_CONFIG, tmp_path, tiny_cifar_overrides())
  outputs = [p.communicate(timeout=400)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out
  assert "summary:" in outputs[0] and "summary:" not in outputs[1]  # Only process 0 reports.
  two, one = train_losses(tmp_path), train_losses(cifar_reference_run[0])
  np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)],
                             rtol=2e-4)
  chex.assert_trees_all_close(final_params(tmp_path)[0], final_params(cifar_reference_run[0])[0],
                              rtol=1e-2, atol=1e-3)


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(cifar_reference_run, tmp_path):
  overrides = tiny_cifar_overrides(checkpoint_every_steps=100)
  procs = train_py.run_two_processes(CIFAR_CONFIG, tmp_path, overrides)
  wait_until(first_step_logged(tmp_path), procs, timeout=300)
  procs[1].send_signal(signal.SIGTERM)
  outputs = [p.communicate(timeout=200)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outputs
  saved = saved_steps(tmp_path)
  assert len(saved) == 1 and saved[0] < 8, (saved, outputs)
  assert "preempted: saved step" in outputs[0]

  outputs = [p.communicate(timeout=300)[0] for p in train_py.run_two_processes(CIFAR_CONFIG, tmp_path, overrides)]
  params, step = final_params(tmp_path)
  assert step == 8, outputs
  chex.assert_trees_all_close(params, final_params(cifar_reference_run[0])[0], rtol=1e-2, atol=1e-3)


def test_nonfinite_loss_stops_both_of_two_processes(tmp_path):
  exploding = tiny_cifar_overrides(lr_schedule="piecewise", lr_decay_epochs=(1,),
                             lr_decay_factor=1e30)
  procs = train_py.run_two_processes(CIFAR_CONFIG, tmp_path, exploding)
  outputs = [p.communicate(timeout=400)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode != 0, out
    assert re.search(r"NaN/inf at step (5|6); the newest checkpoint, step 4 in", out), out
  restored = checkpointing.load_arrays(str(tmp_path))
  assert int(restored["step"]) == 4
  chex.assert_tree_all_finite(restored["params"])
