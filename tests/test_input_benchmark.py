"""`python -m benchmarks.grain_input --quick`, its smoke run, runs end to end and prints a table."""

from pathlib import Path
import subprocess
import sys

import pytest

REPO = Path(__file__).resolve().parents[1]
TFDS_DIR = REPO.parent / 'shared' / 'tfds'


@pytest.mark.skipif(not (TFDS_DIR / 'cifar10').is_dir(),
                    reason=f'prepared cifar10 not found under {TFDS_DIR}')
def test_grain_input_benchmark_quick_run():
  result = subprocess.run(
      [sys.executable, '-m', 'benchmarks.grain_input', '--quick', '--data_dir', str(TFDS_DIR)],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [line for line in result.stdout.splitlines() if line.startswith('| ')]
  assert rows[0].startswith('| input | batch | workers | images/s |')
  names = [row.split(' | ')[0] for row in rows[1:]]
  assert any('hand-written' in name for name in names)
  assert any('grain train_iterator' in name for name in names)
  assert sum('jpeg' in name for name in names) == 3  # 0, 1 and 2 workers.
  for row in rows[1:]:
    assert float(row.split(' | ')[3]) > 0  # images/s
