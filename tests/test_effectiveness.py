"""bench/effectiveness.py: the search and the export scored on held-out people over seeds."""

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "effectiveness.py"
LAST_LINE = re.compile(
    r"effectiveness over (\d+) seeds: shipped - random ([+-]\d\.\d{3}|nan) \[(\S+), (\S+)\]; "
    r"top-k - single ([+-]\d\.\d{3}|nan) \[(\S+), (\S+)\]; "
    r"shipped - baseline ([+-]\d\.\d{3}|nan) \[(\S+), (\S+)\]$"
)


def load_bench():
    spec = importlib.util.spec_from_file_location("effectiveness", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_interval_is_a_t_interval_over_seeds_of_the_paired_differences():
    bench = load_bench()
    mean, lo, hi = bench.interval([0.1, 0.2, 0.3])
    # sd 0.1 over 3 seeds, t(0.975, 2 df) = 4.303: half-width 0.2484
    assert mean == pytest.approx(0.2) and hi - mean == pytest.approx(0.2484, abs=1e-4)
    assert mean - lo == pytest.approx(hi - mean)
    assert math.isnan(bench.interval([0.5])[1])  # one seed says nothing about the spread
    table = {1: {"a": 0.4, "b": 0.3}, 2: {"a": 0.5, "b": None}, 3: {"a": 0.2, "b": 0.3}}
    assert bench.paired(table, "a", "b")[0] == pytest.approx(0.0) and bench.paired(table, "a", "b")[3] == 2


def test_the_report_pairs_every_arm_by_seed_and_ends_on_the_summary_line():
    bench = load_bench()
    arms = bench.arms(["shipped", "random"])
    table = {
        s: {arm: 0.1 * s + 0.01 * i for i, arm in enumerate(arms)} | {"shipped top-5": None}
        for s in (1, 2, 3)
    }
    epochs = {s: {"shipped": 30 + s, "random": 60} for s in (1, 2, 3)}
    lines = bench.report(table, epochs, ["shipped", "random"], 3, 61.0)
    assert lines[0] == "| arm | seed 1 | seed 2 | seed 3 | mean |"
    assert "| shipped top-5 | - | - | - | - |" in lines and "| shipped | 32 |" in lines
    found = LAST_LINE.match(lines[-1])
    assert found, lines[-1]

    def apart(a, b):  # every arm differs from another by the same amount in every seed
        return f"{0.01 * (arms.index(a) - arms.index(b)):+.3f}"

    mode = "" if bench.shipped_top_k() == 1 else f" top-{bench.shipped_top_k()}"
    assert found.group(2) == found.group(3) == found.group(4) == apart(f"shipped{mode}", f"random{mode}")
    assert found.group(5) == apart("shipped top-3", "shipped")
    assert found.group(8) == apart(f"shipped{mode}", "baseline")
    assert "61 min" in "\n".join(lines)


def test_a_folder_continues_only_the_run_it_holds(tmp_path, capsys):
    bench = load_bench()
    settings = tmp_path / "settings.json"
    bench.check_settings(settings, {"people": 300, "trials": 12})
    bench.check_settings(settings, {"people": 300, "trials": 12})  # the same run, continued
    with pytest.raises(SystemExit) as stop:
        bench.check_settings(settings, {"people": 300, "trials": 24})
    assert stop.value.code == 2
    assert "holds a run with other settings (--trials 12 there, 24 now)" in capsys.readouterr().err


@pytest.mark.slow
def test_a_small_run_scores_every_arm_resumes_and_agrees_with_export_best(tmp_path, monkeypatch, capsys):
    out = tmp_path / "eff"
    command = [sys.executable, str(BENCH), "--seeds", "1", "--people", "40", "--heldout", "20"]
    command += ["--trials", "4", "--out", str(out)]
    first = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    last = LAST_LINE.match(first.stdout.strip().splitlines()[-1])
    assert last and last.group(1) == "1", first.stdout[-2000:]
    saved = json.loads((out / "seed-1" / "results.json").read_text())
    arms = saved["arms"]
    assert set(arms) == set(load_bench().arms(["shipped", "random"])) and saved["seconds"] > 0
    assert all(v is None or 0 <= v <= 1 for v in arms.values()) and arms["shipped"] is not None
    assert (out / "effectiveness.md").read_text().splitlines()[-1] == last.group(0)

    # A run killed before its last arm: the next run trains that arm alone.
    del arms["shipped holdout"]
    (out / "seed-1" / "results.json").write_text(json.dumps(saved))
    next(out.glob("seed-1/probs/shipped-trial*-holdout.npy")).unlink()
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    trained = [line for line in again.stdout.splitlines() if " trained " in line]
    assert len(trained) == 1 and trained[0].endswith(tuple(f"{n} s" for n in range(999))), again.stdout
    assert "-holdout in" in trained[0]

    # The bench's single-best score is what `export-best --trial BEST` measures on the same people.
    import optuna

    from hpo import export_best

    seed = out / "seed-1"
    monkeypatch.chdir(seed)
    url = f"sqlite:///{seed / 'shipped.db'}"
    best = str(optuna.load_study(study_name="shipped", storage=url).best_trial.number)
    argv = ["--study", str(seed / "shipped.yaml"), "--storage", url, "--trial", best, "--out", "x"]
    assert export_best.main(argv) == 0
    printed = re.search(r"eval macro-F1 (\d\.\d{4})", capsys.readouterr().out)
    assert printed and float(printed.group(1)) == pytest.approx(arms["shipped"], abs=5e-5)
