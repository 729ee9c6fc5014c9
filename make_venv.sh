#!/usr/bin/env bash
# Creates .venv with a Python that gets the newest JAX (>= 3.12; Python 3.11
# only gets JAX 0.10, which is much slower on CPUs) and installs the project
# into it with the `dev` extra: the training programs' stack (the `train`
# extra), the documentation's tools (`docs`) and the test tools.
#
#   ./make_venv.sh                       # the first suitable python found
#   PYTHON=/path/to/python3 ./make_venv.sh
#
# Looks at $PYTHON, then python3.12, python3.13, python3 on the PATH, then
# pyenv's installed versions (3.12 first); stops with a message if none is >= 3.12.
set -euo pipefail
cd "$(dirname "$0")"

suitable() {  # A Python that runs and is 3.12 or newer.
  "$1" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 12))' >/dev/null 2>&1
}

candidates=(${PYTHON:+"$PYTHON"} python3.12 python3.13 python3)
if command -v pyenv >/dev/null 2>&1; then
  # pyenv's shims only run the versions it has activated; its other installs
  # are still usable by their full path. 3.12 (the tested one) first.
  versions=$(pyenv versions --bare 2>/dev/null | sort -rV)
  for version in $(grep '^3\.12\.' <<<"$versions") $(grep -v '^3\.12\.' <<<"$versions"); do
    candidates+=("$(pyenv root)/versions/$version/bin/python3")
  done
fi

python=""
for candidate in "${candidates[@]}"; do
  if suitable "$candidate"; then python=$candidate; break; fi
done
if [[ -z $python ]]; then
  echo "make_venv.sh: no Python >= 3.12 found (tried: ${candidates[*]})." >&2
  echo "Install one (e.g. 'pyenv install 3.12' or your distribution's python3.12) and" >&2
  echo "rerun, or name it: PYTHON=/path/to/python3.12 ./make_venv.sh" >&2
  exit 1
fi

echo "make_venv.sh: $("$python" --version) ($python)"
rm -rf .venv
"$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'
