"""The README's example runs as written."""

import re

import numpy as np

from conftest import REPO

README = REPO / "README.md"


def test_readme_example_runs():
  text = README.read_text()
  section = text[text.index("## MaxUp in 15 lines"):]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  assert len(code.strip().splitlines()) <= 25
  namespace = {}
  exec(compile(code, str(README), "exec"), namespace)
  assert np.isfinite(float(namespace["loss"]))


def test_readme_starts_with_setup_and_test_commands():
  lines = README.read_text().splitlines()
  block = lines[lines.index("```bash") + 1:]
  assert block[0].startswith("./make_venv.sh && ") and "train.py" in block[0]
  assert block[1] == ".venv/bin/python -m pytest -q -n auto --dist loadfile"
  assert "pip install -q -e '.[dev]'" in (README.parent / "make_venv.sh").read_text()
  ci = (README.parent / ".ci" / "run").read_text()
  assert "./make_venv.sh" in ci and block[1] in ci
