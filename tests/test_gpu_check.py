"""bench/gpu_check.sh works before anyone spends GPU time on it: the same steps, small, on the CPU."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_check_runs_on_the_cpu_in_under_four_minutes(tmp_path, summary_line):
    start = time.perf_counter()
    done = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--device", "cpu", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "TMPDIR": str(tmp_path)},
    )
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stdout + done.stderr
    table = (tmp_path / "gpu_check.md").read_text()
    assert table in done.stdout
    steps = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(steps) == 6 and all("| ok |" in line for line in steps)
    for step in ("pytest -m cuda", "data path 128x96", "data path 224x224", "study, 6 trials", "export-best"):
        assert step in table
    summary_line(f"bench/gpu_check.sh --device cpu --quick: {seconds:.0f} s")
    assert seconds < 240
