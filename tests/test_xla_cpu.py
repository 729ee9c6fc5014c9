"""The default XLA:CPU flags: added only where the jaxlib knows them, never over the user's."""

import os
import subprocess
import sys

import pytest

from conftest import REPO
from trainer import xla_cpu


def _library(tmp_path, name, content: bytes):
  path = tmp_path / name
  path.write_bytes(content)
  return str(path)


@pytest.fixture
def knowing_library(tmp_path):
  return _library(tmp_path, "libknows.so",
                  b"\0junk xla_cpu_experimental_ynn_fusion_type\0 LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION\0")


def test_adds_the_flag_where_the_library_names_flag_and_value(knowing_library):
  environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  added = xla_cpu.apply_defaults(environ, [knowing_library])
  assert added == [xla_cpu.EIGEN_CONVOLUTIONS]
  assert environ["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=4 "
                                  + xla_cpu.EIGEN_CONVOLUTIONS)


def test_adds_the_flag_to_an_empty_environment(knowing_library):
  environ = {}
  xla_cpu.apply_defaults(environ, [knowing_library])
  assert environ == {"XLA_FLAGS": xla_cpu.EIGEN_CONVOLUTIONS}


@pytest.mark.parametrize("content", [
    b"nothing here",
    b"xla_cpu_experimental_ynn_fusion_type only",  # a jaxlib whose enum lacks the value
    b"",  # empty files cannot be mapped; they are skipped
])
def test_leaves_the_environment_alone_when_the_library_lacks_a_name(tmp_path, content):
  library = _library(tmp_path, "libother.so", content)
  environ = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
  assert xla_cpu.apply_defaults(environ, [library, str(tmp_path / "missing.so")]) == []
  assert environ == {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}


def test_names_may_be_split_over_libraries(tmp_path):
  first = _library(tmp_path, "liba.so", b"xla_cpu_experimental_ynn_fusion_type")
  second = _library(tmp_path, "libb.so", b"LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION")
  assert xla_cpu.libraries_define([b"xla_cpu_experimental_ynn_fusion_type",
                                   b"LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"],
                                  [first, second])


def test_opt_out(knowing_library):
  environ = {"MAXUP_JAX_XLA_DEFAULTS": "0"}
  assert xla_cpu.apply_defaults(environ, [knowing_library]) == []
  assert "XLA_FLAGS" not in environ


@pytest.mark.parametrize("user_setting", [
    "--xla_cpu_experimental_ynn_fusion_type=",
    "--xla_cpu_experimental_ynn_fusion_type=+eltwise",
])
def test_the_users_own_setting_wins(knowing_library, user_setting):
  environ = {"XLA_FLAGS": user_setting}
  assert xla_cpu.apply_defaults(environ, [knowing_library]) == []
  assert environ == {"XLA_FLAGS": user_setting}


def test_installed_jaxlib_runs_with_the_defaults():
  """Whatever the installed jaxlib knows, a process with the defaults computes."""
  code = (
      "import os; from trainer import xla_cpu; added = xla_cpu.apply_defaults(); "
      "import jax, jax.numpy as jnp; "
      "x = jnp.ones((1, 8, 8, 3)); w = jnp.ones((3, 3, 3, 4)); "
      "y = jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', "
      "dimension_numbers=('NHWC', 'HWIO', 'NHWC')); "
      "print(added, float(y[0, 4, 4, 0]), os.environ.get('XLA_FLAGS', ''))")
  environ = {k: v for k, v in os.environ.items()
             if k not in ("XLA_FLAGS", xla_cpu.OPT_OUT)}
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=environ,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  added, value, flags = result.stdout.split(" ", 2)
  assert float(value) == 27.0
  if xla_cpu.libraries_define(xla_cpu._REQUIRED_NAMES, xla_cpu.jaxlib_libraries()):
    assert xla_cpu.EIGEN_CONVOLUTIONS in added and xla_cpu.EIGEN_CONVOLUTIONS in flags
  else:
    assert added == "[]"
