"""One trial = one training run: suggested overrides -> TrainConfig -> maskcls.train.fit.

Validation macro-F1 is reported after every epoch and the pruner may stop the run there. What a
person needs to judge the trial is recorded on it: user attrs (resolved config, best epoch,
per-class F1, images/s, wall time, peak memory, device, host) and artifacts shown by the
dashboard (learning curves, confusion matrix, config). A trial that runs out of memory or
diverges fails with its reason recorded; the worker releases the memory and goes on. With
hpo.run --tensorboard/--mlflow, each trial that trains is also tracked there (hpo.tracking).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import resource
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import optuna
import torch
from optuna.artifacts import FileSystemArtifactStore, upload_artifact

from hpo import record, space, tracking
from hpo.failures import (
    CudaPoisoned,
    DiskFull,
    NotTheRecipe,
    OutOfMemory,
    TrialFailed,
    WaitedForMemory,
    WorkerStops,
    cuda_poisoned,
    disk_full,
    out_of_memory,
)
from hpo.outage import StorageUnreachable
from hpo.protocol import INTERRUPTED, Attr
from hpo.record import fail, pruned
from hpo.spec import StudySpec
from maskcls import memory
from maskcls.checkpoint import CheckpointFile
from maskcls.config import TrainConfig
from maskcls.infer import autocast, cpu_latency_ms
from maskcls.labels import NUM_CLASSES, class_name
from maskcls.metrics import confusion, person_fold_f1
from maskcls.train import (
    Diverged,
    EpochMetrics,
    FitResult,
    OnEpoch,
    TrainData,
    device_image_count,
    fit,
    load_data,
)

log = logging.getLogger(__name__)
CLASS_NAMES = [class_name(c) for c in range(NUM_CLASSES)]  # the competition's cutoffs, as scored
MEMORY_WAIT_S = 3600  # how long a trial waits for GPU memory held by the trials beside it


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def validated_list(values: list[float] | None) -> list[float]:
    if values is None:
        raise RuntimeError("the trial ran without validation people")
    return values


def validated(value: float | None) -> float:
    """A validation figure; trials always have validation people (data.val_ratio > 0)."""
    if value is None:
        raise RuntimeError("the trial ran without validation people")
    return value


def hold_gpu_memory(trial: optuna.Trial, cfg: TrainConfig, n_images: int, device: torch.device) -> None:
    """Estimate what the trial needs and hold it on the GPU before anything is allocated, waiting for
    the trials it shares the GPU with; a trial that cannot fit fails now, not halfway."""
    need = memory.estimate(cfg, n_images, autocast(cfg, device)[1])
    trial.set_user_attr(Attr.MEMORY_NEED_MB, round(need.total / 2**20, 1))
    try:
        waited = memory.reserve(need.total, device, MEMORY_WAIT_S)
    except memory.NoRoom as err:
        if err.waited:  # the trials beside it kept the memory; the recipe may well fit later
            retried_from = trial.user_attrs.get(Attr.RETRIED_FROM)  # a retry's checkpoint stays its own
            user_attrs = {Attr.RETRIED_FROM: retried_from} if retried_from is not None else None
            trial.study.enqueue_trial(trial.params, user_attrs=user_attrs)
            reason = f"waited for GPU memory: {err}; its parameters are queued again"
            raise fail(trial, reason, WaitedForMemory) from None
        raise fail(
            trial, f"does not fit on {torch.cuda.get_device_name(device)}: {err}; need {need}"
        ) from None
    trial.set_user_attr(Attr.MEMORY_WAIT_S, round(waited, 1))
    torch.cuda.reset_peak_memory_stats(device)  # the peak is the trial's, not the reservation's


def checkpoint_of(trial: optuna.Trial, folder: Path | None) -> CheckpointFile | None:
    """The trial's checkpoint file; a retried trial continues from the one of the trial it retries."""
    if folder is None:
        return None
    retried_from = trial.user_attrs.get(Attr.RETRIED_FROM)
    previous = folder / f"trial-{retried_from}.pt" if retried_from is not None else None
    return CheckpointFile(folder / f"trial-{trial.number}.pt", previous)


def recipe_key(cfg: TrainConfig, device: torch.device) -> str:
    """What a checkpoint must belong to: the same recipe on the same kind of device (random
    streams differ between a CPU and a GPU)."""
    return json.dumps({"recipe": cfg.to_dict(), "device_type": device.type}, sort_keys=True)


def make_objective(
    spec: StudySpec,
    device: torch.device,
    target: int,
    artifacts: FileSystemArtifactStore | None,
    checkpoints: Path | None = None,
    targets: tracking.Targets | None = None,
) -> Callable[[optuna.Trial], float | list[float]]:
    def objective(trial: optuna.Trial) -> float | list[float]:
        checkpoint = checkpoint_of(trial, checkpoints)
        try:
            value = run(trial, checkpoint)
        except KeyboardInterrupt:  # the checkpoint stays: the trial is queued again and resumes
            trial.set_user_attr(Attr.FAIL_REASON, INTERRUPTED)
            raise
        except (StorageUnreachable, NotTheRecipe):  # it runs again: its checkpoint stays
            raise
        except (optuna.TrialPruned, TrialFailed):
            _discard(checkpoint)
            raise
        except Exception as err:
            kind = unexpected(trial, err, checkpoint)
            if kind is None:
                raise  # a bug: Optuna writes its traceback to the worker's log
            raise kind from err
        _discard(checkpoint)
        return value

    def run(trial: optuna.Trial, checkpoint: CheckpointFile | None) -> float | list[float]:
        record.claim(trial, target)
        cfg = spec.base.override(space.suggest(trial, spec.params))
        name = str(device) if device.type == "cpu" else torch.cuda.get_device_name(device)
        record.start(trial, cfg, name, torch.get_num_threads(), artifacts)
        data = load_data(cfg, progress=False)
        if device.type == "cuda":
            hold_gpu_memory(trial, cfg, device_image_count(cfg, data), device)
        # Only a trial that trains is tracked: one refused or queued again for memory is not.
        with tracked(open_trackers(targets, trial, cfg)) as trackers:
            return train(trial, cfg, data, checkpoint, trackers)

    def train(
        trial: optuna.Trial,
        cfg: TrainConfig,
        data: TrainData,
        checkpoint: CheckpointFile | None,
        trackers: tracking.Trackers,
    ) -> float | list[float]:
        keep = functools.partial(_record_pruned, trial, cfg, artifacts, trackers)
        if checkpoint is not None:
            checkpoint.key = recipe_key(cfg, device)
        inherited = continue_from(checkpoint, trial, trackers, report=not spec.multi, keep_pruned=keep)
        no_memory = None
        try:
            on_epoch = reporter(trial, trackers, spec.multi, keep, inherited)
            result = fit(cfg, data, device, on_epoch, checkpoint=checkpoint)
        except Diverged as err:
            raise fail(trial, f"diverged: {err}") from None
        except RuntimeError as err:  # torch.cuda.OutOfMemoryError is one
            if not out_of_memory(err):
                raise
            no_memory = (
                f"out of memory on {device} "
                f"(batch_size={cfg.train.batch_size}, image_size={list(cfg.data.image_size)})"
            )
        if no_memory is not None:
            # Only out here are the error's traceback, and the trial's tensors its frames hold, gone.
            memory.release(device)
            raise fail(trial, no_memory, OutOfMemory)
        if checkpoint is not None and checkpoint.set_aside is not None:  # found unfit when restored
            trial.set_user_attr(Attr.CHECKPOINT_SET_ASIDE, checkpoint.set_aside[:500])
        val_people = data.table["person"].to_numpy()[data.val_rows]
        _record(trial, cfg, result, device, artifacts, trackers, val_people)
        f1 = validated(result.best_val_macro_f1)
        return [f1, *measure(trial, spec.objectives[1:], result.model, cfg)] if spec.multi else f1

    return objective


def unexpected(trial: optuna.Trial, err: Exception, checkpoint: CheckpointFile | None) -> WorkerStops | None:
    """What an error no code of ours raised means, its reason recorded on the trial: a full disk or a
    broken CUDA context stop the worker (the trial is queued again and resumes from its checkpoint);
    anything else is a bug (None), and the trial's checkpoint goes."""
    full = disk_full(err)
    if full is not None:
        reason = f"no space left on the device of {full or 'a folder it writes'}"
        trial.set_user_attr(Attr.FAIL_REASON, reason)
        return DiskFull(reason)
    reason = f"{type(err).__name__}: {err}"[:500]
    trial.set_user_attr(Attr.FAIL_REASON, reason)
    if cuda_poisoned(err):
        return CudaPoisoned(reason)
    _discard(checkpoint)
    return None


def reporter(
    trial: optuna.Trial,
    trackers: tracking.Trackers,
    multi: bool,
    keep_pruned: Callable[[list[EpochMetrics]], None] | None = None,
    inherited: Sequence[EpochMetrics] = (),
) -> OnEpoch:
    """What each epoch does: the trackers get it, Optuna records it and may prune the trial there;
    a pruned trial's epochs so far (those `inherited` from a checkpoint first) go to `keep_pruned`,
    its learning-curve artifacts."""
    history = list(inherited)

    def on_epoch(epoch: int, metrics: EpochMetrics) -> None:
        trackers.epoch(metrics)  # before pruning: the epoch a trial is pruned at is shown too
        history.append(metrics)
        score = validated(metrics.val_macro_f1)
        if multi:  # Optuna neither records nor prunes per-epoch values of such studies
            return
        trial.report(score, epoch)
        if trial.should_prune():
            stop = pruned(trial, epoch, score)
            if keep_pruned is not None:
                keep_pruned(history)
            raise stop

    return on_epoch


def continue_from(
    checkpoint: CheckpointFile | None,
    trial: optuna.Trial,
    trackers: tracking.Trackers,
    report: bool,
    keep_pruned: Callable[[list[EpochMetrics]], None] | None = None,
) -> list[EpochMetrics]:
    """A retried trial goes on from its predecessor's checkpoint, if it left one for this recipe;
    its trackers get the inherited epochs too, so that its run shows the whole curve. Returns
    those epochs; pruned at once, the trial keeps them (`keep_pruned`)."""
    if checkpoint is None:  # a trial without checkpoints starts at epoch 1
        return []
    saved = checkpoint.peek()
    try:
        history = [EpochMetrics(**m) for m in saved["course"]["history"]] if saved is not None else []
    except (KeyError, TypeError) as err:  # written by a version whose metrics had other fields
        checkpoint.refuse(f"{type(err).__name__}: {err}")
        saved = None
    if checkpoint.set_aside is not None:
        trial.set_user_attr(Attr.CHECKPOINT_SET_ASIDE, checkpoint.set_aside[:500])
    if saved is None:
        return []
    for metrics in history:
        trackers.epoch(metrics)
    try:
        resume(trial, saved["course"], report=report)
    except optuna.TrialPruned:
        if keep_pruned is not None:
            keep_pruned(history)
        raise
    return history


def open_trackers(
    targets: tracking.Targets | None, trial: optuna.Trial, cfg: TrainConfig
) -> tracking.Trackers:
    if targets is None:
        return tracking.Trackers()
    about = (Attr.WORKER, Attr.HOST, Attr.DEVICE, Attr.RETRIED_FROM)
    tags = {key: str(trial.user_attrs[key]) for key in about if key in trial.user_attrs}
    info = tracking.TrialInfo(trial.study.study_name, trial.number, dict(trial.params), cfg.to_dict(), tags)
    return targets.open(info)


@contextlib.contextmanager
def tracked(trackers: tracking.Trackers) -> Iterator[tracking.Trackers]:
    """Closes the trial's trackers whatever ends it, with the state Optuna gives the trial."""
    try:
        yield trackers
    except optuna.TrialPruned as err:
        trackers.finish("PRUNED", str(err))
        raise
    except KeyboardInterrupt:  # Optuna fails the trial; it is queued again and resumes as another
        trackers.finish("FAIL", INTERRUPTED)
        raise
    except BaseException as err:
        trackers.finish("FAIL", str(err) if isinstance(err, TrialFailed) else f"{type(err).__name__}: {err}")
        raise
    trackers.finish("COMPLETE")


def measure(
    trial: optuna.Trial, names: Sequence[str], model: torch.nn.Module, cfg: TrainConfig
) -> list[float]:
    """The objectives besides validation macro-F1 (hpo.spec.OBJECTIVES), after training, recorded
    as user attrs too."""
    values = []
    for name in names:
        if name == "cpu_latency_ms":
            value = round(cpu_latency_ms(model, cfg.data.image_size), 3)
        else:  # params_m
            value = round(sum(p.numel() for p in model.parameters()) / 1e6, 4)
        trial.set_user_attr(name, value)
        values.append(value)
    return values


def resume(trial: optuna.Trial, course: dict, report: bool = True) -> None:
    """A retried trial continues after its checkpoint's epoch: it records that epoch, reports every
    epoch the checkpoint holds (Optuna ignores, with a warning, the ones it inherited) and is
    pruned if the pruner says so, as it would have been at that epoch."""
    trial.set_user_attr(Attr.RESUMED_AT, course["epoch"])
    if not report:
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The reported value is ignored", UserWarning)
        for metrics in course["history"]:
            trial.report(metrics["val_macro_f1"], metrics["epoch"])
    if course["history"] and trial.should_prune():
        last = course["history"][-1]
        raise pruned(trial, last["epoch"], last["val_macro_f1"])


def _discard(checkpoint: CheckpointFile | None) -> None:
    if checkpoint is not None:
        checkpoint.discard()


def _record(
    trial: optuna.Trial,
    cfg,
    result: FitResult,
    device: torch.device,
    artifacts: FileSystemArtifactStore | None,
    trackers: tracking.Trackers,
    people: np.ndarray,  # of the validation images, in val_labels' order
) -> None:
    best = result.history[result.best_epoch - 1]
    predicted = np.asarray(result.val_probs).argmax(1)
    record.end(
        trial,
        best_epoch=result.best_epoch,
        per_class_f1=dict(zip(CLASS_NAMES, validated_list(best.val_per_class_f1), strict=True)),
        attribute_accuracy=best.val_attribute_accuracy,
        val_accuracy=validated(best.val_accuracy),
        person_folds=person_fold_f1(result.val_labels, predicted, people),
        images_per_s=result.images_per_s,
        wall_s=result.wall_s,
        peak_memory_mb=peak_memory_mb(device),
        stop_reason=result.stop_reason,
        face_fallbacks=result.face_fallbacks,
    )
    if artifacts is None and not trackers.live:
        return
    with tempfile.TemporaryDirectory() as folder:
        files = _artifact_files(Path(folder), cfg, result)
        _upload(artifacts, trial, files)
        trackers.files(files)


def _upload(artifacts: FileSystemArtifactStore | None, trial: optuna.Trial, files: list[Path]) -> None:
    """A trial's files into the artifact store; its config.json is there since it started."""
    for path in files:
        if artifacts is not None and path.name != record.CONFIG_FILE:
            upload_artifact(artifact_store=artifacts, file_path=str(path), study_or_trial=trial)


def _record_pruned(
    trial: optuna.Trial,
    cfg: TrainConfig,
    artifacts: FileSystemArtifactStore | None,
    trackers: tracking.Trackers,
    history: list[EpochMetrics],
) -> None:
    """A pruned trial keeps its learning curve up to the epoch it was stopped at (learning_curves.png
    and metrics.json's history) and its config.json, beside the pruned_why attr. These serve the
    person watching and never decide the trial: a failure here is a warning in the worker's log."""
    if artifacts is None and not trackers.live:
        return
    from maskcls import plots

    try:
        with tempfile.TemporaryDirectory() as folder:
            tmp = Path(folder)
            epochs = [m.to_dict() for m in history]
            files = [plots.learning_curves(epochs, tmp / "learning_curves.png")]
            (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
            why = trial.user_attrs.get(Attr.PRUNED_WHY)
            (tmp / "metrics.json").write_text(json.dumps({"pruned_why": why, "history": epochs}, indent=2))
            files += [tmp / "config.json", tmp / "metrics.json"]
            _upload(artifacts, trial, files)
            trackers.files(files)
    except Exception as err:
        log.warning("trial %d: its pruned curve was not kept: %s: %s", trial.number, type(err).__name__, err)


def _artifact_files(tmp: Path, cfg: TrainConfig, result: FitResult) -> list[Path]:
    """What the dashboard and MLflow show of a complete trial: learning curves, confusion matrix,
    config.json and metrics.json. (matplotlib loads here and in _record_pruned, when a trial ends:
    a worker that is only started, or is asked for --help, never needs it.)"""
    from maskcls import plots

    best = result.history[result.best_epoch - 1]
    predicted = np.asarray(result.val_probs).argmax(1)
    # Validation is scored in the competition's classes, whatever cutoffs trained the model.
    files = [
        plots.learning_curves([m.to_dict() for m in result.history], tmp / "learning_curves.png"),
        plots.confusion_matrix(confusion(result.val_labels, predicted), tmp / "confusion_matrix.png"),
    ]
    (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    scores = {
        Attr.BEST_EPOCH: result.best_epoch,
        "val_macro_f1": best.val_macro_f1,
        Attr.PER_CLASS_F1: dict(zip(CLASS_NAMES, validated_list(best.val_per_class_f1), strict=True)),
        Attr.ATTRIBUTE_ACCURACY: best.val_attribute_accuracy,
        "history": [m.to_dict() for m in result.history],
    }
    (tmp / "metrics.json").write_text(json.dumps(scores, indent=2))
    return [*files, tmp / "config.json", tmp / "metrics.json"]
