"""A spec with two objectives: validation macro-F1 up, CPU latency per image down."""

import json
import subprocess
import sys

import pytest
import yaml
from helpers import dashboard_server, finish, hpo_run, load, write_spec

pytestmark = pytest.mark.slow


def export_best(tmp, spec, storage, *args):
    command = [sys.executable, "-m", "hpo.export-best", "--study", str(spec), "--storage", storage, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp)


@pytest.fixture(scope="module")
def two_objectives(small_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mo")
    spec = write_spec(
        tmp,
        small_root,
        name="mo",
        n_trials=4,
        objectives=["val_macro_f1", "cpu_latency_ms"],
        pruner="none",
        space={
            "optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
            "model.name": {
                "type": "categorical",
                "choices": ["mobilenetv3_small_050", "mobilenetv3_small_100"],
            },
        },
        enqueue=[
            {"optim.lr": 3e-3, "model.name": "mobilenetv3_small_050"},
            {"optim.lr": 3e-3, "model.name": "mobilenetv3_small_100"},
        ],
    )
    raw = yaml.safe_load(spec.read_text())
    raw["fixed"]["train.epochs"] = 1
    spec.write_text(yaml.safe_dump(raw))
    storage = f"sqlite:///{tmp / 'study.db'}"
    code, out, err = finish(
        hpo_run(spec, storage, "--workers", "2", "--artifacts", str(tmp / "artifacts"), cwd=tmp)
    )
    assert code == 0, err
    return tmp, spec, storage, out


def test_a_two_objective_study_records_both_values_and_the_dashboard_lists_two_directions(two_objectives):
    tmp, spec, storage, out = two_objectives
    study = load(storage, "mo")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert study.metric_names == ["val_macro_f1", "cpu_latency_ms"]
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 4
    for t in complete:
        assert t.values[1] == t.user_attrs["cpu_latency_ms"] > 0 and 0 <= t.values[0] <= 1
        assert t.intermediate_values == {}  # Optuna neither records nor prunes them here
    header = next(line for line in out.splitlines() if line.split()[:1] == ["trial"])
    assert "cpu_latency_ms" in header  # the summary's table names both objectives
    assert not any(line.startswith("epochs:") for line in out.splitlines())  # none reported to prune at
    with dashboard_server(spec, storage, tmp / "artifacts", tmp) as (_, studies):
        summary = next(s for s in studies["study_summaries"] if s["study_name"] == "mo")
        assert summary["directions"] == ["maximize", "minimize"]


def test_pick_f1_within_exports_the_fastest_trial_near_the_best_f1(two_objectives):
    tmp, spec, storage, _ = two_objectives
    study = load(storage, "mo")
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    best = max(complete, key=lambda t: t.values[0])
    tolerance = 0.05
    near = [t for t in complete if t.values[0] >= best.values[0] - tolerance]
    fastest = min(near, key=lambda t: t.values[1])
    out = tmp / "export"
    done = export_best(tmp, spec, storage, "--pick", f"f1-within:{tolerance}", "--out", str(out))
    assert done.returncode == 0, done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trial"] == fastest.number
    assert f"trial {fastest.number} has the lowest cpu_latency_ms" in metrics["pick"]
    assert f"Picked by f1-within:{tolerance}" in (out / "report.md").read_text()

    default = export_best(tmp, spec, storage, "--out", str(tmp / "default"))
    assert default.returncode == 0, default.stderr
    assert json.loads((tmp / "default" / "metrics.json").read_text())["trial"] == best.number


def in_process(module, argv, capsys, monkeypatch, cwd):
    """An entry point's main in this process (what it refuses needs no fresh interpreter)."""
    import importlib

    from maskcls.cli import run_main

    monkeypatch.chdir(cwd)
    with pytest.raises(SystemExit) as end:
        run_main(importlib.import_module(module).main, argv)
    return end.value.code, capsys.readouterr().err


def test_bad_objectives_and_picks_are_one_line_exit_2(
    two_objectives, finished_study, tmp_path, capsys, monkeypatch
):
    tmp, spec, storage, _ = two_objectives
    raw = yaml.safe_load(spec.read_text())
    bad_specs = [
        ({"objectives": ["val_macro_f1", "latency"]}, "unknown objective 'latency'; valid: val_macro_f1"),
        ({"objectives": ["cpu_latency_ms", "val_macro_f1"]}, "val_macro_f1 must come first"),
        ({"pruner": "hyperband"}, "a study with several objectives cannot be pruned"),
    ]
    for change, message in bad_specs:
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({**raw, **change}))
        argv = ["--study", str(path), "--storage", f"sqlite:///{tmp_path / 'bad.db'}"]
        code, err = in_process("hpo.run", argv, capsys, monkeypatch, tmp_path)
        assert code == 2 and err.strip().splitlines()[-1].startswith("error: ") and message in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    one_tmp, one_spec, one_storage, _ = finished_study
    for (cwd, target_spec, target_storage), args, message in [
        ((one_tmp, one_spec, one_storage), ("--pick", "f1-within:0.01"), "--pick chooses between objectives"),
        ((tmp, spec, storage), ("--pick", "fastest"), "expected best-f1 or f1-within:D"),
    ]:
        argv = ["--study", str(target_spec), "--storage", target_storage, *args, "--out", str(tmp_path / "x")]
        code, err = in_process("hpo.export_best", argv, capsys, monkeypatch, cwd)
        lines = err.strip().splitlines()
        assert code == 2 and lines == [lines[-1]] and message in lines[-1], err
    assert not (tmp_path / "x").exists()
