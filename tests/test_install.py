"""What `pip install maxup-jax` brings, and what the training programs need beyond it.

The library's requirements are exactly the packages it imports; the training
programs' stack is the `train` extra, and `train.py` / `certify.py` started
without it stop with a message naming the extra.

`test_wheel_installs_alone` builds the wheel, installs it into a fresh virtual
environment (from the package index, a minute or two) and runs the README's
example there. It runs when MAXUP_JAX_TEST_WHEEL=1 (`.ci/run` sets it) and is
skipped otherwise.
"""

import ast
import configparser
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest

import maxup_jax
from conftest import REPO

TRAINING_PROGRAMS = ("train.py", "certify.py")


def _requirement_names(lines: str) -> set[str]:
  """Distribution names of requirement lines, normalised (`Foo_bar[x]>=1` -> `foo-bar`)."""
  names = set()
  for line in lines.strip().splitlines():
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line)
    if match and not line.strip().startswith("#"):
      names.add(re.sub(r"[-_.]+", "-", match.group(1)).lower())
  return names


def _setup_cfg() -> configparser.ConfigParser:
  config = configparser.ConfigParser()
  config.read(REPO / "setup.cfg")
  return config


def _imported_modules(paths) -> set[str]:
  """Top-level names of the absolute imports in `paths`, without the standard library."""
  names = set()
  for path in paths:
    for node in ast.walk(ast.parse(Path(path).read_text(), str(path))):
      if isinstance(node, ast.Import):
        names.update(alias.name.split(".")[0] for alias in node.names)
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names.add(node.module.split(".")[0])
  return names - set(sys.stdlib_module_names) - {"__future__"}


def _distributions(modules: set[str]) -> set[str]:
  """The installed distributions that provide `modules`, normalised."""
  provided = importlib.metadata.packages_distributions()
  missing = sorted(m for m in modules if m not in provided)
  assert not missing, f"imported but not installed: {missing}"
  return {re.sub(r"[-_.]+", "-", provided[m][0]).lower() for m in modules}


def test_install_requires_are_the_library_imports():
  imports = _imported_modules((REPO / "maxup_jax").rglob("*.py")) - {"maxup_jax"}
  required = _requirement_names(_setup_cfg()["options"]["install_requires"])
  assert _distributions(imports) == required


def test_train_extra_covers_the_training_programs():
  local = {"maxup_jax", "trainer", "configs"}
  paths = [*(REPO / "trainer").rglob("*.py"), *(REPO / "configs").glob("*.py"),
           *(REPO / name for name in TRAINING_PROGRAMS)]
  imports = _imported_modules(paths) - local
  extras = _setup_cfg()["options.extras_require"]
  available = (_requirement_names(_setup_cfg()["options"]["install_requires"])
               | _requirement_names(extras["train"]))
  assert _distributions(imports) <= available


@pytest.mark.parametrize("program", TRAINING_PROGRAMS)
def test_training_program_checks_the_whole_train_extra(program):
  # The modules train.py and certify.py look for before importing anything.
  from trainer import stack
  assert f'require_training_stack("{program}")' in (REPO / program).read_text()
  checked = set(stack.TRAINING_STACK)
  train_extra = _requirement_names(_setup_cfg()["options.extras_require"]["train"])
  assert _distributions(checked) == train_extra


@pytest.mark.parametrize("program", TRAINING_PROGRAMS)
def test_training_program_without_the_stack_names_the_extra(program):
  # -S: no site-packages, as with the library alone; the check comes before any import.
  run = subprocess.run([sys.executable, "-S", str(REPO / program), "--help"],
                       capture_output=True, text=True, timeout=60)
  assert run.returncode == 1
  assert 'pip install "maxup-jax[train]"' in run.stderr and "./make_venv.sh" in run.stderr
  assert "ml_collections" in run.stderr and "tensorflow_datasets" in run.stderr


def test_version_has_one_place():
  assert _setup_cfg()["metadata"]["version"] == "attr: maxup_jax.__version__"
  assert re.fullmatch(r"\d+\.\d+\.\d+(\.dev\d+)?", maxup_jax.__version__)
  assert f"## {maxup_jax.__version__}" in (REPO / "CHANGELOG.md").read_text()


def test_license_is_apache_2():
  text = (REPO / "LICENSE").read_text()
  assert "Apache License" in text and "Version 2.0, January 2004" in text
  assert _setup_cfg()["metadata"]["license"] == "Apache-2.0"


def _readme_example() -> str:
  text = (REPO / "README.md").read_text()
  section = text[text.index("## MaxUp in 15 lines"):]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.skipif(os.environ.get("MAXUP_JAX_TEST_WHEEL") != "1",
                    reason="builds a virtual environment from the package index; "
                    "MAXUP_JAX_TEST_WHEEL=1 runs it (.ci/run does)")
def test_wheel_installs_alone(tmp_path):
  # Build from a copy holding only what the wheel is made of.
  source = tmp_path / "source"
  source.mkdir()
  for name in ("pyproject.toml", "setup.cfg", "README.md", "LICENSE"):
    shutil.copy(REPO / name, source / name)
  shutil.copytree(REPO / "maxup_jax", source / "maxup_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                  str(tmp_path / "dist"), str(source)], check=True, timeout=300)
  (wheel,) = (tmp_path / "dist").glob("maxup_jax-*.whl")
  assert wheel.name.startswith(f"maxup_jax-{maxup_jax.__version__}-")

  venv.create(tmp_path / "venv", with_pip=True)
  python = str(tmp_path / "venv" / "bin" / "python")
  subprocess.run([python, "-m", "pip", "install", "-q", str(wheel)], check=True, timeout=900)

  installed = subprocess.run([python, "-m", "pip", "list", "--format=freeze"], check=True,
                             capture_output=True, text=True).stdout
  installed = _requirement_names(installed.replace("==", ">="))
  train_only = {"tensorflow-datasets", "array-record", "grain", "ml-collections", "tensorboardx",
                "matplotlib"}
  assert not installed & train_only, f"the training stack came with the library: {installed & train_only}"
  assert {"jax", "flax", "optax", "chex", "numpy", "scipy", "maxup-jax"} <= installed

  # The README's example, run outside the checkout so that the installed package is used.
  script = tmp_path / "readme_example.py"
  script.write_text(_readme_example()
                    + "\nimport maxup_jax\nprint(maxup_jax.__file__)\nprint(float(loss))\n")
  run = subprocess.run([python, str(script)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 0, run.stderr
  location, loss = run.stdout.split()[-2:]
  assert Path(location).is_relative_to(tmp_path / "venv")
  assert np.isfinite(float(loss))

  # The training programs say what is missing.
  run = subprocess.run([python, str(REPO / "train.py"), "--help"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
  assert run.returncode == 1 and 'pip install "maxup-jax[train]"' in run.stderr, run.stderr
