"""The search service end to end on the CPU: real worker processes, real SQLite and PostgreSQL."""

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import optuna
import pytest
import yaml
from helpers import (
    _first_answer,
    command_lines,
    dashboard_server,
    finish,
    hpo_run,
    load,
    wait_for_running_trial,
    workers_of,
    write_spec,
)

from hpo.storage import counts, open_storage
from maskcls.cli import run_main
from maskcls.errors import UserError

pytestmark = pytest.mark.slow
POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def test_two_workers_reach_exactly_n_with_reports_and_pruning(finished_study):
    tmp, spec, storage, out = finished_study
    study = load(storage)
    now = counts(study)
    assert now["finished"] == 5 and now["running"] == 0 and now["waiting"] == 0
    assert now["complete"] >= 1 and now["pruned"] >= 1
    for trial in study.trials:
        # A light record (issue 24): every attr short, the whole config a config.json artifact.
        assert max(len(json.dumps(v)) for v in trial.user_attrs.values()) <= 600, trial.user_attrs
        assert "config" not in trial.user_attrs and len(trial.user_attrs["recipe"]) == 16
        if trial.state == optuna.trial.TrialState.PRUNED:
            assert sorted(trial.intermediate_values) == [1, 2]  # pruned at epoch 2
        elif trial.state == optuna.trial.TrialState.COMPLETE:
            epochs = trial.user_attrs["epochs"]
            assert sorted(trial.intermediate_values) == list(range(1, epochs + 1))
            assert {
                "best_epoch",
                "per_class_f1",
                "images_per_s",
                "wall_s",
                "peak_memory_mb",
                "device",
                "host",
            } <= set(trial.user_attrs)
            assert (
                len(trial.user_attrs["per_class_f1"]) == 18
                and "not_wear/female/60+" in trial.user_attrs["per_class_f1"]
            )
            accuracy = trial.user_attrs["attribute_accuracy"]
            assert set(accuracy) == {"mask", "gender", "age_band"} and all(
                0 <= v <= 1 for v in accuracy.values()
            )
    workers = {t.user_attrs["worker"] for t in study.trials}
    assert len(workers) == 2  # both workers ran trials
    assert "study t: 5/5 finished" in out and "mask-hpo dashboard --study" in out


def test_rerunning_a_finished_study_adds_nothing(finished_study):
    tmp, spec, storage, _ = finished_study
    before = len(load(storage).trials)
    code, out, err = finish(hpo_run(spec, storage, "--workers", "2", cwd=tmp))
    assert code == 0, err
    assert len(load(storage).trials) == before and "5/5 finished" in out


def test_dashboard_serves_the_study_and_its_artifacts(finished_study):
    tmp, spec, storage, _ = finished_study
    with dashboard_server(spec, storage, tmp / "artifacts", tmp) as (base, studies):
        summary = next(s for s in studies["study_summaries"] if s["study_name"] == "t")
        detail = json.load(urllib.request.urlopen(f"{base}/api/studies/{summary['study_id']}", timeout=5))
        assert len(detail["trials"]) == 5
        complete = next(t for t in detail["trials"] if t["state"] == "Complete")
        names = {a["filename"]: a["artifact_id"] for a in complete["artifacts"]}
        assert {"learning_curves.png", "confusion_matrix.png", "config.json", "metrics.json"} <= set(names)
        trial_url = f"{base}/artifacts/{summary['study_id']}/{complete['trial_id']}"
        config = json.load(urllib.request.urlopen(f"{trial_url}/{names['config.json']}", timeout=5))
        assert config["model"]["name"] == "mobilenetv3_small_050"
        scores = json.load(urllib.request.urlopen(f"{trial_url}/{names['metrics.json']}", timeout=5))
        stored = next(t for t in load(storage).trials if t.number == complete["number"])
        assert (
            scores["per_class_f1"] == stored.user_attrs["per_class_f1"]
            and scores["val_macro_f1"] == stored.value
        )
        assert len(scores["per_class_f1"]) == 18 and set(scores["attribute_accuracy"]) == {
            "mask",
            "gender",
            "age_band",
        }
        png = urllib.request.urlopen(f"{trial_url}/{names['learning_curves.png']}", timeout=5).read()
        assert png.startswith(b"\x89PNG")


def test_the_summarys_dashboard_command_runs_as_printed_on_the_storage_used(finished_study):
    tmp, spec, storage, out = finished_study
    lines = out.splitlines()
    command = shlex.split(lines[lines.index("dashboard:") + 1])
    console = os.path.join(os.path.dirname(sys.executable), "mask-hpo")  # by its full path: no venv needed
    assert command[:2] == [console, "dashboard"] and storage in command
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([*command, "--port", str(port)], stderr=subprocess.PIPE, text=True, cwd="/")
    try:
        studies = _first_answer(server, f"http://127.0.0.1:{port}/api/studies")
        assert [s["study_name"] for s in studies["study_summaries"]] == ["t"]
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_the_plain_optuna_dashboard_cli_serves_it_too(finished_study):
    tmp, spec, storage, _ = finished_study
    with dashboard_server(spec, storage, tmp / "artifacts", tmp, plain=True) as (base, studies):
        assert [s["study_name"] for s in studies["study_summaries"]] == ["t"]


def test_sigkill_of_one_worker_fails_and_requeues_its_trial(small_root, tmp_path):
    spec = write_spec(tmp_path, small_root, epochs=[3], n_trials=2, pruner={"name": "none"})
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    run = hpo_run(spec, storage, "--workers", "2", cwd=tmp_path)
    victim = wait_for_running_trial(storage, min_epoch=1)
    os.kill(int(victim.user_attrs["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
    code, out, err = finish(run)
    assert code == 0, err
    study = load(storage)
    killed = study.trials[victim.number]
    assert killed.state == optuna.trial.TrialState.FAIL and "died" in killed.user_attrs["fail_reason"]
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retried) == 1 and retried[0].params == killed.params
    assert retried[0].state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    now = counts(study)
    assert now["finished"] == 2 and now["running"] == 0 and now["waiting"] == 0
    assert "worker cpu" in err and "re-queued" in err


def test_sigkill_of_the_whole_run_is_recovered_by_the_heartbeat(small_root, tmp_path):
    spec = write_spec(tmp_path, small_root, epochs=[3], n_trials=2, pruner={"name": "none"})
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    run = hpo_run(spec, storage, "--workers", "2", cwd=tmp_path, start_new_session=True)
    victim = wait_for_running_trial(storage, min_epoch=1)
    os.killpg(run.pid, signal.SIGKILL)  # the machine dies: dispatcher and workers at once
    run.communicate()
    assert load(storage).trials[victim.number].state == optuna.trial.TrialState.RUNNING
    code, out, err = finish(hpo_run(spec, storage, "--workers", "2", cwd=tmp_path))
    assert code == 0, err
    study = load(storage)
    stale = study.trials[victim.number]
    assert stale.state == optuna.trial.TrialState.FAIL
    who = victim.user_attrs["worker"]
    assert stale.user_attrs["fail_reason"].startswith(f"worker {who} stopped answering")
    retry = next(t for t in study.trials if t.system_attrs.get("failed_trial") == victim.number)
    assert retry.user_attrs["retried_from"] == victim.number and "fail_reason" not in retry.user_attrs
    now = counts(study)
    assert now["finished"] == 2 and now["running"] == 0


def test_two_machines_share_one_postgresql_study_and_no_password_shows(small_root, tmp_path):
    """Two runs (two machines) on one PostgreSQL study stop at N in total. Merged with the check that
    the storage password, given in $HPO_STORAGE, never shows in a command line (`ps`) or a log: both
    need the same two runs on a URL with a password."""
    name = f"two-{uuid.uuid4().hex[:8]}"
    secret = f"pw-{uuid.uuid4().hex[:12]}"
    url = POSTGRES.replace("postgres@", f"postgres:{secret}@")  # trust auth accepts any password
    spec = write_spec(tmp_path, small_root, name=name, n_trials=5)
    command = [sys.executable, "-m", "hpo.run", "--study", str(spec), "--workers", "1", "--no-progress"]
    env = {**os.environ, "HPO_STORAGE": url}
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    try:
        runs = [subprocess.Popen(command, text=True, cwd=tmp_path, env=env, **pipes) for _ in range(2)]
        wait_for_running_trial(POSTGRES, name, min_epoch=1)
        seen = command_lines("hpo.")
        assert len([line for line in seen.values() if "hpo.worker" in line]) == 2
        assert not [line for line in seen.values() if secret in line]
        results = [finish(r) for r in runs]
        assert all(code == 0 for code, _, _ in results), [err for _, _, err in results]
        study = load(POSTGRES, name)
        now = counts(study)
        assert now["finished"] == 5 and now["running"] == 0
        assert len({t.user_attrs["worker"] for t in study.trials}) == 2
        logs = "".join(p.read_text() for p in (tmp_path / "runs").rglob("*.log"))
        printed = "".join(out + err for _, out, err in results)
        assert secret not in printed + logs and "postgres:***@" in printed
    finally:
        optuna.delete_study(study_name=name, storage=open_storage(POSTGRES))


def test_ctrl_c_leaves_no_trial_running_and_an_orphaned_worker_stops_within_seconds(small_root, tmp_path):
    """Merged, one study: Ctrl-C stops the first run (its trial failed and queued again); the second
    run of the same command resumes that trial, and its worker stops by itself within seconds once
    its dispatcher is killed."""
    spec = write_spec(tmp_path, small_root, epochs=[30], n_trials=2, pruner={"name": "none"})
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    run = hpo_run(spec, storage, "--workers", "1", cwd=tmp_path)
    victim = wait_for_running_trial(storage, min_epoch=1)
    run.send_signal(signal.SIGINT)
    code, out, err = finish(run, timeout=120)
    assert code == 130 and "re-run the same command" in err and "Traceback" not in err
    study = load(storage)
    assert counts(study)["running"] == 0
    assert study.trials[victim.number].state == optuna.trial.TrialState.FAIL
    assert "interrupted" in study.trials[victim.number].user_attrs["fail_reason"]
    # queued again, so the next run continues it from its checkpoint instead of sampling anew
    retries = [t for t in study.trials if t.user_attrs.get("retried_from") == victim.number]
    assert len(retries) == 1 and retries[0].state == optuna.trial.TrialState.WAITING
    assert retries[0].params == study.trials[victim.number].params
    assert (tmp_path / "runs" / "t" / "checkpoints" / "t" / f"trial-{victim.number}.pt").is_file()

    again = hpo_run(spec, storage, "--workers", "1", cwd=tmp_path)
    resumed = wait_for_running_trial(storage, min_epoch=1, resumed=True)
    assert resumed.number == retries[0].number and resumed.user_attrs["resumed_at_epoch"] >= 1
    assert len(workers_of(spec)) == 1
    again.kill()  # the dispatcher alone; its worker is not signalled
    again.communicate()
    end = time.time() + 15
    while workers_of(spec) and time.time() < end:
        time.sleep(0.2)
    assert workers_of(spec) == {}
    study = load(storage)
    assert counts(study)["running"] == 0
    assert study.trials[resumed.number].user_attrs["fail_reason"].startswith("interrupted")
    assert any(t.user_attrs.get("retried_from") == resumed.number for t in study.trials)


def run_in_process(capsys, *argv):
    from hpo.run import main

    with pytest.raises(SystemExit) as exit_:
        run_main(main, list(argv))
    return exit_.value.code, capsys.readouterr().err


def test_bad_input_is_one_clear_error_and_exit_2(small_root, tmp_path, capsys):
    code, err = run_in_process(capsys, "--study", "nosuch")
    assert code == 2 and "unknown study 'nosuch'; available: demo, mask" in err
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("study: [x\n")
    code, err = run_in_process(capsys, "--study", str(bad_yaml))
    assert code == 2 and "invalid YAML" in err
    spec = yaml.safe_load(write_spec(tmp_path, small_root).read_text())
    for key, entry, message in [
        ("optim.lrr", {"type": "float", "low": 1, "high": 2}, "unknown config key 'optim.lrr'"),
        ("loss.name", {"type": "categorical", "choices": ["dice"]}, "invalid choice 'dice'"),
    ]:
        path = tmp_path / "space.yaml"
        path.write_text(yaml.safe_dump({**spec, "space": {key: entry}, "enqueue": []}))
        code, err = run_in_process(capsys, "--study", str(path))
        assert code == 2 and message in err, err
    good = write_spec(tmp_path, small_root)
    code, err = run_in_process(
        capsys, "--study", str(good), "--storage", "postgresql+psycopg://u:secret@127.0.0.1:1/x"
    )
    assert code == 2 and "cannot use storage" in err and "secret" not in err
    code, err = run_in_process(
        capsys, "--study", str(good), "--gpus", "0", "--storage", f"sqlite:///{tmp_path / 's.db'}"
    )
    assert code == 2 and "GPU 0 is not there" in err
    code, err = run_in_process(
        capsys, "--study", str(good), "--n-trials", "0", "--storage", f"sqlite:///{tmp_path / 's.db'}"
    )
    assert code == 2 and "--n-trials must be at least 1, got 0" in err
    code, err = run_in_process(capsys, "--study", str(good), "--add", "0")
    assert code == 2 and "--add must be at least 1, got 0" in err
    code, err = run_in_process(capsys, "--study", str(good), "--add", "2", "--n-trials", "3")
    assert code == 2 and "not allowed with argument" in err  # a total or a number more, not both
    nowhere = f"sqlite:///{tmp_path / 'nowhere.db'}"
    code, err = run_in_process(
        capsys, "--study", str(good), "--data", str(tmp_path / "no-data"), "--storage", nowhere
    )
    assert code == 2 and "data root does not exist" in err
    assert optuna.get_all_study_names(open_storage(nowhere)) == []  # nothing written to the storage
    assert "Traceback" not in err


def test_timeout_stops_starting_trials_and_leaves_none_running(small_root, tmp_path):
    spec = write_spec(tmp_path, small_root, epochs=[2], n_trials=50, pruner={"name": "none"})
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    # The deadline lands after the worker's start (its imports take ~10 s of CPU) and first trials.
    code, out, err = finish(hpo_run(spec, storage, "--workers", "2", "--timeout", "16", cwd=tmp_path))
    assert code == 0, err
    now = counts(load(storage))
    assert 0 < now["finished"] < 50 and now["running"] == 0


def test_gpu_slots_pin_one_device_each(monkeypatch):
    """No GPU on this machine: the driver's GPU count is faked to check how slots are laid out."""
    from hpo.run import gpu_slots

    monkeypatch.setattr("hpo.run.gpu_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    slots = gpu_slots(None, per_gpu=2, workers=None)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0", "0", "1", "1"]
    assert all(s.device == "cuda" for s in slots)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in gpu_slots("1", 1, None)] == ["1"]
    assert [s.device for s in gpu_slots(None, 1, workers=3)] == ["cpu"] * 3  # --workers means CPU workers
    with pytest.raises(UserError, match="GPU 2 is not there; this machine has GPUs 0-1"):
        gpu_slots("0,2", 1, None)


def test_gpu_slots_map_through_the_parents_cuda_visible_devices(monkeypatch):
    """Under CUDA_VISIBLE_DEVICES=2,3 the workers must land on physical GPUs 2 and 3, not 0 and 1."""
    from hpo.run import gpu_slots

    monkeypatch.setattr("hpo.run.gpu_count", lambda: 4)  # the physical GPUs, as NVML counts them
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in gpu_slots(None, 1, None)] == ["2", "3"]
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in gpu_slots("1", 2, None)] == [
        "3",
        "3",
    ]  # --gpus indexes them
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8f2a,MIG-1c3e,MIG-77d0")
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in gpu_slots(None, 1, None)] == [
        "GPU-8f2a",
        "MIG-1c3e",
        "MIG-77d0",
    ]
    monkeypatch.setenv(
        "CUDA_VISIBLE_DEVICES", "1,7,0"
    )  # as CUDA does: the list ends at a GPU that is not there
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in gpu_slots(None, 1, None)] == ["1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")  # hides every GPU: CPU workers
    assert [s.device for s in gpu_slots(None, 1, None)] == ["cpu"]


def test_a_recipe_that_always_fails_stops_the_run_with_its_reasons(small_root, tmp_path):
    spec = write_spec(
        tmp_path,
        small_root,
        epochs=[1],
        n_trials=20,
        pruner={"name": "none"},
        enqueue=[],
        space={
            "optim.lr": {"type": "float", "low": 1e29, "high": 1e30, "log": True},
            "train.epochs": {"type": "categorical", "choices": [2]},
        },
    )
    data = yaml.safe_load(spec.read_text())
    data["fixed"].update({"optim.name": "sgd", "train.clip_grad": None, "schedule.warmup_epochs": 0})
    spec.write_text(yaml.safe_dump(data))
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    code, out, err = finish(hpo_run(spec, storage, "--workers", "1", cwd=tmp_path))
    assert code == 1 and "too many failed trials in a row" in err and "diverged: loss became" in err
    now = counts(load(storage))
    assert now["fail"] >= 5 and now["finished"] == 0 and now["running"] == 0


def test_runs_started_together_on_a_new_sqlite_file_all_succeed(small_root, tmp_path):
    """Two runs, not eight: each must wait for the setup lock while the other creates the tables and
    the study and queues the recipes, which two started together race for; tests/test_storage.py
    races eight processes on the setup alone, without training, where the race is narrower."""
    spec = write_spec(tmp_path, small_root, epochs=[1], n_trials=3)
    storage = f"sqlite:///{tmp_path / 'new.db'}"
    runs = [hpo_run(spec, storage, "--workers", "1", cwd=tmp_path) for _ in range(2)]
    results = [finish(r) for r in runs]
    assert [code for code, _, _ in results] == [0] * 2, [err for _, _, err in results]
    study = load(storage)
    assert counts(study)["finished"] == 3 and counts(study)["running"] == 0
    recipes = yaml.safe_load(spec.read_text())["enqueue"]
    for recipe in recipes:  # each queued once, not once per run
        assert sum(t.params == recipe for t in study.trials) == 1, recipe


def test_an_undecodable_photo_stops_the_run_before_any_trial(tiny_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    photos = sorted((root / "train" / "images").glob("*/mask1.*"))
    photos[0].write_bytes(photos[0].read_bytes()[:200])  # truncated
    photos[1].write_bytes(b"")  # empty
    spec = write_spec(tmp_path, root)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    code, out, err = finish(hpo_run(spec, storage, cwd=tmp_path))
    assert code == 2 and "Traceback" not in err
    assert f"{photos[0]}: not a decodable image" in err and f"{photos[1]}: empty file" in err
    assert optuna.get_all_study_names(open_storage(storage)) == []  # no trial, no study
    check = [sys.executable, "-m", "maskcls.data.check", "--data", str(root), "--no-decode"]
    layout_only = subprocess.run(check, capture_output=True, text=True)
    assert layout_only.returncode == 2 and f"problem: {photos[1]}: empty file (0 bytes)" in layout_only.stdout
