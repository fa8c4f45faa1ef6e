"""A trial that runs out of memory or diverges fails with its reason; the worker goes on."""

import json

import optuna
import pytest
import torch
import yaml

from hpo import spec as specs
from hpo.objective import TrialFailed, make_objective
from maskcls import train
from maskcls.config import TrainConfig


@pytest.fixture
def spec(small_root, tmp_path):
    path = tmp_path / "o.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "study": "o",
                "data": {"root": str(small_root)},
                "fixed": {
                    "model.name": "mobilenetv3_small_050",
                    "data.image_size": [32, 24],
                    "train.batch_size": 16,
                    "train.epochs": 1,
                    "data.cache_dir": str(tmp_path / "cache"),
                    "optim.name": "sgd",
                    "train.clip_grad": None,
                    "schedule.warmup_epochs": 0,
                },
                "space": {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e30, "log": True}},
                "pruner": "none",
            }
        )
    )
    return specs.load(str(path))


def run_trials(spec, lrs):
    study = optuna.create_study(direction="maximize")
    for lr in lrs:
        study.enqueue_trial({"optim.lr": lr})
    objective = make_objective(spec, torch.device("cpu"), target=10, artifacts=None)
    study.optimize(objective, n_trials=len(lrs), catch=(TrialFailed,))
    return study.trials


@pytest.mark.slow
def test_divergence_fails_the_trial_with_its_reason_and_the_next_one_runs(spec):
    diverged, fine = run_trials(spec, [1e30, 3e-3])
    assert diverged.state == optuna.trial.TrialState.FAIL
    assert diverged.user_attrs["fail_reason"].startswith("diverged: loss became")
    assert fine.state == optuna.trial.TrialState.COMPLETE and 0 <= fine.value <= 1


@pytest.mark.slow
def test_out_of_memory_fails_the_trial_and_the_next_one_runs(spec, monkeypatch):
    """No GPU here, so the allocator's error is raised by a stand-in for fit; the handling is real."""
    real_fit = train.fit
    calls = []

    def fit_that_runs_out_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_fit(*args, **kwargs)

    monkeypatch.setattr("hpo.objective.fit", fit_that_runs_out_once)
    oom, fine = run_trials(spec, [3e-3, 3e-3])
    assert oom.state == optuna.trial.TrialState.FAIL
    assert oom.user_attrs["fail_reason"].startswith("out of memory on cpu (batch_size=16")
    assert fine.state == optuna.trial.TrialState.COMPLETE


def test_a_pruned_trial_records_why_keeps_its_curve_and_its_line_says_it(tmp_path):
    """Its value against the trials that reached the same epoch, and the pruner: on the trial
    (the dashboard, `studies trials`) and in hpo.run's line; its learning curve to the epoch it was
    stopped at and that history are artifacts, as a complete trial's are (its config.json has been
    one since it started: hpo.record.start)."""
    import functools

    from optuna.artifacts import FileSystemArtifactStore, download_artifact, get_all_artifact_meta

    from hpo.objective import _record_pruned, reporter
    from hpo.progress import ended
    from hpo.protocol import Attr
    from hpo.tracking import Trackers
    from maskcls.train import EpochMetrics

    study = optuna.create_study(
        direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    )
    for value in (0.5, 0.6, 0.7):
        trial = study.ask()
        trial.report(value, 1)
        study.tell(trial, value)
    trial = study.ask()
    metrics = EpochMetrics(epoch=1, train_loss=1.0, lr=0.1, images_per_s=1.0, seconds=1.0, val_macro_f1=0.3)
    store = FileSystemArtifactStore(str(tmp_path))
    keep = functools.partial(_record_pruned, trial, TrainConfig(), store, Trackers())
    with pytest.raises(optuna.TrialPruned) as stop:
        reporter(trial, Trackers(), multi=False, keep_pruned=keep)(1, metrics)
    why = "val macro-F1 0.3000, rank 4 of 4 trials at epoch 1 (median 0.6000, best 0.7000); MedianPruner"
    assert str(stop.value) == f"pruned after epoch 1: {why}"
    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    frozen = study.trials[-1]
    assert frozen.user_attrs[Attr.PRUNED_WHY] == why
    kept = {m.filename: m.artifact_id for m in get_all_artifact_meta(frozen, storage=study._storage)}
    assert set(kept) == {"learning_curves.png", "metrics.json"}  # config.json: uploaded at its start
    download_artifact(
        artifact_store=store, artifact_id=kept["metrics.json"], file_path=str(tmp_path / "m.json")
    )
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["pruned_why"] == why and [h["val_macro_f1"] for h in saved["history"]] == [0.3]

    # A store that cannot take the files leaves a warning, and the trial is pruned all the same.
    (tmp_path / "not-a-folder").write_text("")
    trial = study.ask()
    broken = FileSystemArtifactStore(str(tmp_path / "not-a-folder"))
    keep = functools.partial(_record_pruned, trial, TrainConfig(), broken, Trackers())
    with pytest.raises(optuna.TrialPruned):
        reporter(trial, Trackers(), multi=False, keep_pruned=keep)(1, metrics)
    assert ended(frozen, epochs=5) == f"trial 3 pruned at epoch 1/5: {why}"
