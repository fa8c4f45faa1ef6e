"""The service as people run it: logs instead of terminals, thread counts, seeded repeats, no
stray files."""

import os
import re
import shutil
import subprocess
import sys

import optuna
import pytest
from helpers import load, write_spec

pytestmark = pytest.mark.slow


def run_logged(spec, storage, log, cwd, *args):
    """`hpo.run ... > log 2>&1`, as under nohup, CI or `docker compose logs`."""
    command = [sys.executable, "-m", "hpo.run", "--study", str(spec), "--storage", storage, *args]
    with open(log, "w") as file:
        done = subprocess.run(command, stdout=file, stderr=subprocess.STDOUT, cwd=cwd, timeout=600)
    return done.returncode, log.read_text()


def trials_of(storage):
    return [
        (t.number, t.state, t.params, t.value, t.intermediate_values)
        for t in sorted(load(storage).trials, key=lambda t: t.number)
    ]


def test_one_worker_repeats_a_seeded_study_and_its_log_has_a_line_per_trial(small_root, tmp_path):
    spec = write_spec(tmp_path, small_root, n_trials=3)  # the 2 queued recipes, then 1 seeded draw
    first, second = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    code, log = run_logged(spec, first, tmp_path / "a.log", tmp_path, "--workers", "1", "--status-every", "1")
    assert code == 0, log
    code, other = run_logged(spec, second, tmp_path / "b.log", tmp_path, "--workers", "1")
    assert code == 0, other

    assert trials_of(first) == trials_of(second)  # parameters, values and every epoch's value
    finished = [t for t in load(first).trials if t.state.is_finished()]
    assert len(finished) == 3 and {t.state.name for t in finished} == {"COMPLETE", "PRUNED"}
    for t in finished:
        word = "complete: val macro-F1" if t.state == optuna.trial.TrialState.COMPLETE else "pruned at epoch"
        assert len(re.findall(rf"^trial {t.number} {word}", log, re.M)) == 1, log
    assert "\r" not in log and "ExperimentalWarning" not in log and "Warning:" not in log
    assert not re.search(r"^\[I ", log, re.M), log  # Optuna's INFO lines stay in the worker logs
    assert re.search(r"^trial \d+ started on cpu0: optim.lr=", log, re.M)
    # Time and pace: every event line carries the run's elapsed time; an ended trial's line the
    # pace and, until the last, the time left; a status line now and then; the summary the wall time.
    clock = r"\d+:\d\d:\d\d"
    starts = re.findall(r"^trial \d+ started on .*$", log, re.M)
    assert len(starts) == 3 and all(re.search(rf"optim.lr=\S+.* \[{clock}\]$", line) for line in starts), (
        starts
    )
    ends = re.findall(r"^trial \d+ (?:complete:|pruned) .*$", log, re.M)
    assert len(ends) == 3, log
    assert all(re.search(rf"; {clock} elapsed, [\d.]+ trials/h", line) for line in ends), ends
    assert [bool(re.search(rf", ETA {clock}\]$", line)) for line in ends] == [True, True, False], ends
    assert re.search(rf"^study \S+: \d/3 finished, best .*; {clock} elapsed", log, re.M), log
    assert re.search(
        rf"^wall time {clock} for the 3 trial\(s\) this run finished \([\d.]+ trials/h\)$", log, re.M
    )
    saved = re.search(
        r"^epochs: (\d+) run of the (\d+) that 3 finished trial\(s\) would have taken", log, re.M
    )
    assert saved and int(saved[1]) < int(saved[2]), log  # one trial was pruned


@pytest.fixture(scope="module")
def single_run(small_root, tmp_path_factory):
    """A one-epoch training run under `taskset -c N` without --threads: the process owns one core
    (the first this test process owns: under pytest-xdist the other core is the other worker's)."""
    tmp = tmp_path_factory.mktemp("single")
    core = str(min(os.sched_getaffinity(0)))
    command = ["taskset", "-c", core, sys.executable, "-m", "maskcls.train", "--data", str(small_root)]
    command += ["--out", str(tmp / "run"), "--set", "model.name=mobilenetv3_small_050"]
    command += ["--set", "data.image_size=[32,24]", "--set", "train.epochs=1", "--set", "train.batch_size=16"]
    command += ["--set", f"data.cache_dir={tmp / 'cache'}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp)
    assert done.returncode == 0, done.stderr
    return tmp, done


def test_training_uses_the_cores_it_owns_and_writes_lines_not_carriage_returns(single_run):
    tmp, done = single_run
    assert re.search(r"on cpu, 1 CPU threads$", done.stderr, re.M), done.stderr
    assert "\r" not in done.stderr and re.search(r"^epoch 1: train loss", done.stdout + done.stderr, re.M)


def test_each_xdist_worker_of_the_suite_keeps_to_a_core_of_its_own():
    """tests/conftest.py pins each of pyproject's 2 pytest-xdist workers to one core, so the two (and
    the processes their tests start) never share one; torch follows the affinity."""
    if "PYTEST_XDIST_WORKER" not in os.environ or os.cpu_count() == 1:
        pytest.skip("the suite runs in one process (-n 0) or on one core")
    import torch

    assert (len(os.sched_getaffinity(0)), torch.get_num_threads()) == (1, 1)


def test_openmp_does_not_spin_unless_the_user_says_so():
    """maskcls/__init__.py sets it, before any of its modules loads torch (and torch its OpenMP)."""
    probe = "import os, maskcls; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    default = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
    own = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
    )
    assert (default.stdout.strip(), own.stdout.strip()) == ("PASSIVE", "ACTIVE")


def in_process(module, argv, capsys):
    """An entry point's main in this process: exit code, stdout, stderr."""
    import importlib

    from maskcls.cli import run_main

    with pytest.raises(SystemExit) as end:
        run_main(importlib.import_module(module).main, argv)
    out, err = capsys.readouterr()
    return end.value.code, out, err


def test_threads_flag_is_checked(single_run, small_root, capsys):
    tmp, _ = single_run
    code, _, err = in_process(
        "maskcls.predict", [str(tmp / "run"), "--data", str(small_root), "--threads", "0"], capsys
    )
    assert code == 2 and err.strip() == "error: --threads must be at least 1, got 0"


def test_predicting_photos_leaves_no_cache_behind_unless_asked(single_run, small_root, tmp_path):
    tmp, _ = single_run
    photos = sorted((small_root / "eval" / "images").iterdir())[:2]
    before = set(os.listdir(tmp / "cache"))  # the run's own cache folder (its config.json names it)
    command = [sys.executable, "-m", "maskcls.predict", str(tmp / "run"), *map(str, photos)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 2 and not list(tmp_path.iterdir())  # nothing in the cwd
    assert set(os.listdir(tmp / "cache")) == before
    kept = tmp_path / "kept"
    done = subprocess.run([*command, "--cache-dir", str(kept)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(list(kept.glob("images-*.npy"))) == 1 and set(os.listdir(tmp / "cache")) == before
    shutil.rmtree(kept)


def test_predict_out_is_a_directory(single_run, small_root, tmp_path, capsys, monkeypatch):
    tmp, _ = single_run
    monkeypatch.chdir(tmp_path)
    argv = [str(tmp / "run"), "--data", str(small_root)]
    code, _, err = in_process("maskcls.predict", [*argv, "--out", str(tmp_path / "sub.csv")], capsys)
    assert code == 2 and "give a directory" in err and not list(tmp_path.iterdir())
    code, _, err = in_process("maskcls.predict", [*argv, "--out", str(tmp_path / "p")], capsys)
    assert code == 0, err
    assert [p.name for p in tmp_path.iterdir()] == ["p"] and (tmp_path / "p" / "submission.csv").is_file()


@pytest.mark.parametrize(
    "module, shown",
    [
        ("hpo.run", "trials sharing one GPU (default: 1)"),
        ("maskcls.train", "auto (cuda if present), cpu, cuda, cuda:1 ... (default: auto)"),
        ("maskcls.data.synth", "training people, 7 images each (default: 2700)"),
        ("hpo.dashboard", "port to serve on (default: 8080)"),
    ],
)
def test_help_shows_defaults(module, shown, capsys):
    code, out, _ = in_process(module, ["--help"], capsys)
    assert code == 0 and shown in " ".join(out.split()), out
