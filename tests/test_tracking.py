"""Experiment tracking: every trial's epochs in TensorBoard event files and as an MLflow run, read
back with each tool's own reader; and a clear error before any trial when a package is missing."""

import contextlib
import os
import subprocess
import sys
import threading

import optuna
import pytest
import torch
import yaml
from helpers import finish, hpo_run, load, write_spec

import hpo.objective
from hpo import spec as specs
from hpo import tracking
from hpo.objective import CLASS_NAMES, TrialFailed, make_objective
from hpo.protocol import INTERRUPTED, Attr
from maskcls.errors import UserError
from maskcls.train import EpochMetrics

EPOCH_SCALARS = ["train/loss", "train/lr", "val/loss", "val/macro_f1"]
ARTIFACTS = {"learning_curves.png", "confusion_matrix.png", "config.json", "metrics.json"}
PRUNED_ARTIFACTS = ARTIFACTS - {"confusion_matrix.png"}  # the curve to the epoch it was stopped at
STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


def tensorboard_scalars(folder):
    """tag -> [(step, value)] of one trial's event files, as TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(s.step, s.value) for s in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def mlflow_runs(uri, study):
    """trial number -> MLflow run, checking that the study has one experiment, one parent run that
    every trial's run nests under, and a run per trial."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiments = [e for e in client.search_experiments() if e.name == study]
    assert len(experiments) == 1
    found = client.search_runs([experiments[0].experiment_id])
    parents = [run for run in found if run.data.tags.get("optuna.role") == "study"]
    assert [p.info.run_name for p in parents] == [f"study-{study}"]
    runs = [run for run in found if run not in parents]
    assert {run.data.tags["mlflow.parentRunId"] for run in runs} <= {parents[0].info.run_id}
    numbers = [int(run.data.tags["optuna.trial_number"]) for run in runs]
    assert len(numbers) == len(set(numbers)), f"more than one run for a trial: {sorted(numbers)}"
    return client, {n: run for n, run in zip(numbers, runs, strict=True)}


def steps(client, run, key):
    return [
        (m.step, m.value)
        for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
    ]


def metrics_of(epoch, f1=0.5):
    return EpochMetrics(
        epoch=epoch,
        train_loss=1.0 / epoch,
        lr=0.01,
        images_per_s=100.0,
        seconds=1.0,
        val_loss=0.9,
        val_macro_f1=f1,
        val_accuracy=0.6,
        val_per_class_f1=[c / 18 for c in range(18)],
        val_attribute_accuracy={"mask": 0.9, "gender": 0.8, "age_band": 0.7},
    )


@pytest.mark.parametrize("package", ["tensorboard", "mlflow"])
def test_a_missing_package_is_one_error_line_naming_the_extra(package, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now fails as if not installed
    flags = {"tensorboard": str(tmp_path / "tb"), "mlflow": None} if package == "tensorboard" else {}
    flags = flags or {"tensorboard": None, "mlflow": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    with pytest.raises(UserError) as err:
        tracking.check_available(**flags)
    message = str(err.value)
    assert f"pip install -e '.[{package}]'" in message and f"--{package}" in message
    assert "\n" not in message
    tracking.check_available(None, None)  # without the flags nothing is needed


def test_mlflow_refusing_its_file_store_is_one_error_line_naming_sqlite(monkeypatch, tmp_path):
    from mlflow import environment_variables

    if not hasattr(environment_variables, "MLFLOW_ALLOW_FILE_STORE"):
        pytest.skip("this MLflow writes its file store without being asked")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(UserError) as err:
        tracking.check_available(None, (tmp_path / "mlruns").as_uri(), "s")
    assert "sqlite:///" in str(err.value) and "MLFLOW_ALLOW_FILE_STORE=true" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_each_outcome_closes_its_run_with_the_matching_status(tmp_path):
    """No training: a trial's calls as hpo.objective makes them, against an SQLite MLflow store."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.check_available(str(tmp_path / "tb"), uri, "s")
    targets = tracking.Targets(str(tmp_path / "tb"), uri)
    config = {"optim": {"lr": 0.01, "name": "sgd"}, "data": {"image_size": [32, 24]}}
    (tmp_path / "config.json").write_text("{}")
    outcomes = [
        ("COMPLETE", None),
        ("PRUNED", "pruned after epoch 2"),
        ("FAIL", "diverged"),
        ("FAIL", INTERRUPTED),
    ]
    for number, (state, reason) in enumerate(outcomes):
        trackers = targets.open(
            tracking.TrialInfo("s", number, {"optim.lr": 0.01}, config, {"worker": "h:1"})
        )
        assert set(trackers.live) == {"TensorBoard", "MLflow"}
        for epoch in (1, 2):
            trackers.epoch(metrics_of(epoch, f1=epoch / 10))
        if state == "COMPLETE":
            trackers.files([tmp_path / "config.json"])
        trackers.finish(state, reason)

    client, runs = mlflow_runs(uri, "s")
    assert sorted(runs) == [0, 1, 2, 3]
    for number, (state, reason) in enumerate(outcomes):
        run = runs[number]
        expected = "KILLED" if reason == INTERRUPTED else STATUS[state]
        assert (run.info.status, run.info.run_name, run.data.tags["optuna.state"]) == (
            expected,
            f"trial-{number}",
            state,
        )
        assert run.data.params == {"optim.lr": "0.01", "optim.name": "sgd", "data.image_size": "[32, 24]"}
        assert run.data.tags["worker"] == "h:1"
        assert reason is None or reason in run.data.tags.values()
        assert steps(client, run, "val/macro_f1") == [(1, 0.1), (2, 0.2)]
        assert steps(client, run, "val_f1/not_wear/female/60plus") == [(1, 17 / 18), (2, 17 / 18)]
        assert steps(client, run, "val_f1/wear/male/under30") == [(1, 0.0), (2, 0.0)]
        listed = {f.path for f in client.list_artifacts(run.info.run_id)}
        assert listed == ({"config.json"} if state == "COMPLETE" else set())
        scalars = tensorboard_scalars(tmp_path / "tb" / "s" / f"trial-{number}")
        assert {*EPOCH_SCALARS, *(f"val_f1/{name}" for name in CLASS_NAMES)} <= set(scalars)
        assert [step for step, _ in scalars["val/macro_f1"]] == [1, 2]
        assert scalars["val_f1/not_wear/female/60+"][0][1] == pytest.approx(17 / 18)
    stored = tmp_path / "mlartifacts" / "s" / runs[0].info.run_id / "artifacts" / "config.json"
    assert stored.is_file()  # beside the database, not in ./mlruns of the current folder


@pytest.mark.slow
def test_trial_runs_nest_under_the_studys_run_whose_best_tags_follow_the_best_trial(tmp_path):
    """No training: complete trials of values 0.2, 0.5, 0.3 (their best epochs), a pruned one of 0.9."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.check_available(None, uri, "s")
    targets = tracking.Targets(None, uri)
    for number, (state, f1s) in enumerate(
        [("COMPLETE", [0.1, 0.2]), ("COMPLETE", [0.5, 0.4]), ("COMPLETE", [0.3]), ("PRUNED", [0.9])]
    ):
        trackers = targets.open(tracking.TrialInfo("s", number, {"optim.lr": 0.01}, {}, {}))
        for epoch, f1 in enumerate(f1s, 1):
            trackers.epoch(metrics_of(epoch, f1=f1))
        trackers.finish(state, None)
    client, runs = mlflow_runs(uri, "s")
    parent = client.get_run(runs[0].data.tags["mlflow.parentRunId"])
    assert parent.info.status == "RUNNING" and parent.data.tags["optuna.study"] == "s"
    assert {k: parent.data.tags[k] for k in ("best_trial", "best_value", "best_run_id")} == {
        "best_trial": "1",
        "best_value": "0.5",
        "best_run_id": runs[1].info.run_id,
    }
    best = {n: client.get_run(run.info.run_id).data.tags.get("optuna.best") for n, run in runs.items()}
    assert best == {0: "false", 1: "true", 2: None, 3: None}
    # Two workers finishing at once may both have written; the dispatcher's end puts the study's best.
    client.set_tag(runs[2].info.run_id, "optuna.best", "true")
    client.set_tag(parent.info.run_id, "best_trial", "2")
    tracking.end_study_run(uri, "s", (1, 0.5))  # hpo.run once the study holds its trials
    ended = client.get_run(parent.info.run_id)
    assert ended.info.status == "FINISHED" and ended.data.tags["best_trial"] == "1"
    best = {n: client.get_run(run.info.run_id).data.tags.get("optuna.best") for n, run in runs.items()}
    assert best == {0: "false", 1: "true", 2: "false", 3: None}
    tracking.check_available(None, uri, "s")  # the study run on: its parent runs again
    assert client.get_run(parent.info.run_id).info.status == "RUNNING"


@pytest.mark.slow
def test_processes_asking_at_once_share_one_experiment_in_a_file_store(tmp_path, monkeypatch):
    """MLflow's file store creates a second experiment of the same name when asked at once (it
    did in every try without the lock); threads with their own clients stand in for workers."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    MlflowClient(tracking_uri=uri).search_experiments()  # the store exists, the experiment not yet
    barrier, ids = threading.Barrier(8), []

    def worker():
        client = MlflowClient(tracking_uri=uri)
        barrier.wait()
        ids.append(tracking.experiment_id(client, uri, "s"))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    named = [e.experiment_id for e in MlflowClient(tracking_uri=uri).search_experiments() if e.name == "s"]
    assert len(named) == 1 and ids == named * 8


class Broken:
    def epoch(self, metrics):
        raise OSError("disk full")

    def files(self, paths):
        pass

    def finish(self, state, reason):
        self.finished = (state, reason)


def test_a_failing_tracker_is_dropped_and_the_others_go_on(tmp_path, caplog):
    trackers = tracking.Trackers()
    broken = Broken()
    trackers.add("Broken", lambda: broken)
    trackers.add("Unopenable", lambda: 1 / 0)
    trackers.add(
        "TensorBoard", lambda: tracking.TensorBoardTracker(tmp_path, tracking.TrialInfo("s", 0, {}, {}))
    )
    assert set(trackers.live) == {"Broken", "TensorBoard"}
    trackers.epoch(metrics_of(1))
    trackers.epoch(metrics_of(2))
    trackers.finish("COMPLETE")
    assert broken.finished == ("FAIL", "tracking failed: disk full")
    assert [step for step, _ in tensorboard_scalars(tmp_path / "s" / "trial-0")["val/macro_f1"]] == [1, 2]
    assert "Broken tracking is off for this trial: OSError: disk full" in caplog.text
    assert "Unopenable tracking is off for this trial: ZeroDivisionError" in caplog.text


@pytest.mark.slow
def test_hpo_run_without_mlflow_stops_before_any_trial_with_one_error_line(small_root, tmp_path):
    shadow = tmp_path / "shadow"  # an `mlflow` that cannot be imported, ahead of the installed one
    shadow.mkdir()
    (shadow / "mlflow.py").write_text("raise ImportError(\"No module named 'mlflow'\")\n")
    paths = [str(shadow), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    spec = write_spec(tmp_path, small_root)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    mlflow_db = tmp_path / "mlflow.db"
    code, out, err = finish(
        hpo_run(spec, storage, "--mlflow", f"sqlite:///{mlflow_db}", cwd=tmp_path, env=env)
    )
    assert code == 2, err
    assert (
        err.strip().splitlines()[-1] == "error: --mlflow needs the mlflow package: pip install -e '.[mlflow]'"
    )
    assert not mlflow_db.exists()
    with contextlib.suppress(KeyError):  # KeyError: the study was not even created
        assert load(storage).trials == []


@pytest.mark.slow
def test_without_the_flags_nothing_imports_tensorboard_or_mlflow():
    code = (
        "import sys\n"
        "import hpo.tracking\n"
        "hpo.tracking.check_available(None, None)\n"
        "assert 'torch' not in sys.modules, 'the dispatcher must not import torch'\n"
        "import hpo.worker, hpo.objective\n"
        "assert not {'tensorboard', 'mlflow'} & set(sys.modules), sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.fixture
def two_epoch_spec(small_root, tmp_path):
    path = tmp_path / "r.yaml"
    fixed = {
        "model.name": "mobilenetv3_small_050",
        "data.image_size": [32, 24],
        "train.batch_size": 16,
        "train.epochs": 2,
        "data.val_ratio": 0.3,
        "data.cache_dir": str(tmp_path / "cache"),
    }
    raw = {"study": "r", "data": {"root": str(small_root)}, "fixed": fixed, "pruner": "none"}
    path.write_text(
        yaml.safe_dump({**raw, "space": {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2}}})
    )
    return specs.load(str(path))


@pytest.mark.slow
def test_an_interrupted_trial_is_killed_and_its_retry_shows_the_epochs_it_resumed(
    two_epoch_spec, tmp_path, monkeypatch
):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses its file store otherwise
    uri, tb = (tmp_path / "mlruns").as_uri(), tmp_path / "tb"
    study = optuna.create_study(study_name="r", direction="maximize")
    objective = make_objective(
        two_epoch_spec,
        torch.device("cpu"),
        10,
        None,
        tmp_path / "checkpoints",
        tracking.Targets(str(tb), uri),
    )
    real_fit = hpo.objective.fit

    def fit_interrupted_after_epoch_1(cfg, data, device, on_epoch, checkpoint=None):
        def on_epoch_then_ctrl_c(epoch, metrics):
            on_epoch(epoch, metrics)
            raise KeyboardInterrupt  # after the epoch's checkpoint, as Ctrl-C would

        return real_fit(cfg, data, device, on_epoch_then_ctrl_c, checkpoint=checkpoint)

    study.enqueue_trial({"optim.lr": 3e-3})
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr("hpo.objective.fit", fit_interrupted_after_epoch_1)
        study.optimize(objective, n_trials=1)
    study.enqueue_trial({"optim.lr": 3e-3}, user_attrs={Attr.RETRIED_FROM: 0})  # as hpo.worker queues it
    study.optimize(objective, n_trials=1, catch=(TrialFailed,))
    interrupted, retry = study.trials
    assert (interrupted.state, retry.state) == (
        optuna.trial.TrialState.FAIL,
        optuna.trial.TrialState.COMPLETE,
    )
    assert retry.user_attrs[Attr.RESUMED_AT] == 1

    client, runs = mlflow_runs(uri, "r")
    assert runs[0].info.status == "KILLED" and runs[0].data.tags[Attr.FAIL_REASON] == INTERRUPTED
    assert runs[1].info.status == "FINISHED" and runs[1].data.tags[Attr.RETRIED_FROM] == "0"
    first = steps(client, runs[0], "val/macro_f1")
    assert [s for s, _ in first] == [1]
    assert steps(client, runs[1], "val/macro_f1")[0] == first[0]  # the inherited epoch, replayed
    assert [s for s, _ in steps(client, runs[1], "val/macro_f1")] == [1, 2]
    assert {f.path for f in client.list_artifacts(runs[1].info.run_id)} == ARTIFACTS
    for number, epochs in ((0, [1]), (1, [1, 2])):
        assert [s for s, _ in tensorboard_scalars(tb / "r" / f"trial-{number}")["train/loss"]] == epochs


@pytest.mark.slow
def test_hpo_run_tracks_every_trial_in_tensorboard_and_mlflow(small_root, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the file store, as the issue asks
    spec = write_spec(tmp_path, small_root)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    tb, uri = tmp_path / "tb", (tmp_path / "mlruns").as_uri()
    flags = ["--workers", "2", "--n-trials", "3", "--tensorboard", str(tb), "--mlflow", uri]
    code, out, err = finish(hpo_run(spec, storage, *flags, cwd=tmp_path))
    assert code == 0, err
    trials = load(storage).trials
    trained = [t for t in trials if not str(t.user_attrs.get(Attr.FAIL_REASON, "")).startswith("surplus")]
    states = {t.state for t in trained}
    assert {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED} <= states

    client, runs = mlflow_runs(uri, "t")
    assert sorted(runs) == sorted(t.number for t in trained)  # one run per trial that trained
    for trial in trained:
        epochs = sorted(trial.intermediate_values)
        scalars = tensorboard_scalars(tb / "t" / f"trial-{trial.number}")
        for tag in [*EPOCH_SCALARS, *(f"val_f1/{name}" for name in CLASS_NAMES)]:
            assert [step for step, _ in scalars[tag]] == epochs, (trial.number, tag)
        reported = [trial.intermediate_values[e] for e in epochs]
        assert [v for _, v in scalars["val/macro_f1"]] == pytest.approx(reported)

        run = runs[trial.number]
        assert run.info.run_name == f"trial-{trial.number}"
        assert (
            run.info.status == STATUS[trial.state.name] and run.data.tags["optuna.state"] == trial.state.name
        )
        assert {k: run.data.params[k] for k in trial.params} == {k: str(v) for k, v in trial.params.items()}
        assert run.data.params["model.name"] == "mobilenetv3_small_050"  # the rest of the config too
        for key in [*EPOCH_SCALARS, "val_f1/incorrect/female/30-59"]:
            assert [s for s, _ in steps(client, run, key)] == epochs, (trial.number, key)
        assert [v for _, v in steps(client, run, "val/macro_f1")] == pytest.approx(reported)
        listed = {f.path for f in client.list_artifacts(run.info.run_id)}
        assert listed == (ARTIFACTS if trial.state == optuna.trial.TrialState.COMPLETE else PRUNED_ARTIFACTS)
    parent = client.get_run(runs[trained[0].number].data.tags["mlflow.parentRunId"])
    best = load(storage).best_trial
    assert parent.info.status == "FINISHED" and parent.data.tags["best_trial"] == str(best.number)
    assert float(parent.data.tags["best_value"]) == pytest.approx(best.value)
    assert client.get_run(runs[best.number].info.run_id).data.tags["optuna.best"] == "true"
