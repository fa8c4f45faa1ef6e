"""bench/curves.py records learning curves; bench/search_replay.py replays Optuna against them."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import write_spec

pytestmark = pytest.mark.slow
BENCH = Path(__file__).resolve().parent.parent / "bench"


def bench(script, *args, cwd):
    command = [sys.executable, str(BENCH / script), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=cwd)


def test_curves_record_every_epoch_of_each_configuration_and_continue_where_they_stopped(
    small_root, tmp_path
):
    spec = write_spec(tmp_path, small_root, epochs=[2])
    raw = yaml.safe_load(spec.read_text())
    raw["fixed"]["train.epochs"] = 2
    del raw["space"]["train.epochs"]
    raw["enqueue"] = [{"optim.lr": 3e-3}]
    spec.write_text(yaml.safe_dump(raw))
    table = tmp_path / "curves.csv"
    first = bench("curves.py", "--study", str(spec), "--configs", "2", "--out", str(table), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    rows = pd.read_csv(table)
    assert list(rows["config"]) == [0, 0, 1, 1] and list(rows["epoch"]) == [1, 2, 1, 2]
    assert json.loads(rows["params"][0]) == {"optim.lr": 3e-3}  # the spec's first recipe comes first
    assert rows["val_macro_f1"].between(0, 1).all() and (rows["epoch_s"] > 0).all()
    made = json.loads(table.with_suffix(".json").read_text())
    assert (
        made["configs"] == 2 and made["epochs"] == 2 and made["command"].startswith("python bench/curves.py")
    )

    more = bench("curves.py", "--study", str(spec), "--configs", "3", "--out", str(table), cwd=tmp_path)
    assert more.returncode == 0, more.stderr
    assert [line.split(":")[0] for line in more.stdout.splitlines() if line.startswith("config")] == [
        "config 3/3"
    ]
    again = pd.read_csv(table)
    assert again[again["config"] < 2].equals(rows) and list(again["config"]).count(2) == 2


def test_the_replay_prints_its_table_and_the_shipped_defaults_against_random_search(tmp_path):
    done = bench("search_replay.py", "--seeds", "2", "--only", "random + median", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    names = [
        line.split(" | ")[0].lstrip("| ") for line in lines if line.startswith("| ") and "---" not in line
    ]
    assert names[1:] == [
        "shipped: tpe (n_startup_trials 4, group False) + successive_halving (min_resource 1) "
        "= tpe multivariate + successive halving min 1",
        "random + median",
        "random + none",
    ]
    assert re.fullmatch(
        r"shipped defaults reach random search's best with \d+\.\d\d of its epochs \(median over 2 seeds\)",
        lines[-1],
    )
