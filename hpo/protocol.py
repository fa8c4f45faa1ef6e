"""What the processes of a search share, in one place: the names recorded on trials, who a worker
is, which trials rank, where artifacts go, how processes end, which warnings are silenced, and the
command line by which the dispatcher starts a worker.

The dispatcher (hpo.run), its workers (hpo.worker, hpo.objective), hpo.export-best and the
dashboard agree through these names only; none of them spells a key or an exit code itself.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import socket
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # optuna is imported where it is used: hpo.run --help stays light
    import optuna


class Attr:
    """User-attribute keys: on every trial, and EXPORT on the study."""

    WORKER = "worker"  # worker_id() of the process running the trial
    HOST = "host"
    DEVICE = "device"  # "cpu" or the GPU's name
    THREADS = "threads"  # CPU threads; export --holdout reproduces a CPU trial with them
    RECIPE = "recipe"  # the key of the resolved TrainConfig, whose whole is the config.json artifact
    EPOCHS = "epochs"  # the trial's train.epochs
    CONFIG = "config"  # the whole TrainConfig, as studies before the light record kept it (hpo.record)
    FAIL_REASON = "fail_reason"
    RETRIED_FROM = "retried_from"  # on a re-queued trial: the number of the trial it retries
    RESUMED_AT = "resumed_at_epoch"  # the epoch of the checkpoint a retried trial continued from
    CHECKPOINT_SET_ASIDE = "checkpoint_set_aside"  # why a retry started afresh: its checkpoint was unusable
    BEST_EPOCH = "best_epoch"
    PER_CLASS_F1 = "per_class_f1"  # class name -> F1 at the best epoch
    ATTRIBUTE_ACCURACY = "attribute_accuracy"  # mask, gender, age_band -> accuracy at the best epoch
    VAL_ACCURACY = "val_accuracy"
    VAL_PERSON_FOLDS = "val_person_folds"  # macro-F1 on 5 disjoint groups of validation people: its noise
    IMAGES_PER_S = "images_per_s"
    WALL_S = "wall_s"
    PEAK_MEMORY_MB = "peak_memory_mb"
    MEMORY_NEED_MB = "memory_need_mb"  # the estimate held on the GPU before the trial started
    MEMORY_WAIT_S = "memory_wait_s"  # how long it waited for the trials beside it
    STOP_REASON = "stop_reason"
    PRUNED_WHY = "pruned_why"  # its value against the trials at the same epoch, and the pruner
    FACE_FALLBACKS = "face_crop_fallbacks"  # data.crop face: photos without a box, centre-cropped
    EXPORT = "export"  # on the study: the last hpo.export-best


INTERRUPTED = "interrupted (Ctrl-C or SIGTERM)"  # a fail_reason: such a trial is queued again and resumes


class Exit:
    """How our processes end."""

    OK = 0
    FAILED = 1  # the run stopped: a worker kept failing trials or kept dying
    USAGE = 2  # bad input: one `error:` line says what to fix (maskcls.cli.run_main)
    TOO_MANY_FAILURES = 3  # a worker saw five failed trials in a row
    STORAGE_LOST = 4  # the storage stayed unreachable past the outage window
    CUDA_POISONED = 5  # the worker's CUDA context broke (hpo.failures.CudaPoisoned): start a fresh one
    DISK_FULL = 6  # no space left where a trial writes (hpo.failures.DiskFull): the run stops
    INTERRUPTED = 130  # Ctrl-C or SIGTERM


def worker_id(pid: int | None = None) -> str:
    """host:pid of a worker process (this one by default): how a dead worker's trials are found."""
    return f"{socket.gethostname()}:{pid or os.getpid()}"


def ranked(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The complete trials, best validation macro-F1 (every study's first objective) first."""
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return sorted(complete, key=lambda t: t.values[0], reverse=True)


def artifacts_dir(given: str | None, runs_dir: Path) -> Path:
    """--artifacts, else $HPO_ARTIFACTS, else runs/<study>/artifacts: shared by the workers, the
    export and the dashboard."""
    return Path(given or os.environ.get("HPO_ARTIFACTS") or runs_dir / "artifacts")


def checkpoints_dir(artifacts: Path, study: str) -> Path:
    """A study's per-trial checkpoints live beside the artifacts, on the filesystem every worker
    shares; one folder per study, as several studies may share one artifacts folder."""
    return artifacts.parent / "checkpoints" / study


def export_dir(given: str | None, runs_dir: Path) -> Path:
    """--out, else runs/<study>/export."""
    return Path(given) if given else runs_dir / "export"


@contextlib.contextmanager
def quiet_experimental() -> Iterator[None]:
    """Optuna's ExperimentalWarning for the features we rely on on purpose (heartbeats, retry,
    metric names, some samplers): said once in the docs instead of in every log."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


STORAGE_ENV = "HPO_STORAGE"  # how a worker gets the storage URL: never on its command line
MLFLOW_ENV = "HPO_MLFLOW"  # and the MLflow tracking URI, which may hold a password too


@dataclass(frozen=True)
class WorkerArgs:
    """The command line of one `python -m hpo.worker`: written by the dispatcher, read by the
    worker. The storage URL, which may hold a password, travels in the environment instead
    (`ps` shows every command line; a process's environment only to its user)."""

    study: str  # spec name or path
    target: int  # finished trials the study should hold
    device: str = "auto"
    threads: int | None = None  # CPU threads for this worker
    data: str | None = None
    artifacts: str | None = None
    deadline: float | None = None  # start no trial after this UNIX time
    parent: int | None = None  # the dispatcher's pid: the worker stops when it is gone
    tensorboard: str | None = None  # write each trial's per-epoch scalars under DIR/<study>/trial-<n>
    proxy: str | None = None  # host:port of this host's storage proxy (hpo.proxy), when it has one
    stop: str | None = None  # hpo.run's --stop rule: the worker starts no trial once the study meets it
    mlflow: str | None = None  # log each trial as an MLflow run at this tracking URI (in the environment)

    def to_argv(self) -> list[str]:
        argv = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None and f.name != "mlflow":
                argv += [f"--{f.name}", str(value)]
        return argv

    def secrets_env(self, storage_url: str) -> dict[str, str]:
        """What the worker gets through its environment: the storage URL, the MLflow URI."""
        return {STORAGE_ENV: storage_url, **({MLFLOW_ENV: self.mlflow} if self.mlflow else {})}

    @staticmethod
    def storage() -> str:
        url = os.environ.get(STORAGE_ENV)
        if not url:
            raise SystemExit(f"hpo.worker: ${STORAGE_ENV} is not set (workers are started by hpo.run)")
        return url

    @classmethod
    def from_argv(cls, argv: Sequence[str] | None = None) -> WorkerArgs:
        parser = argparse.ArgumentParser(
            prog="python -m hpo.worker", description="One worker of hpo.run; not meant to be run by hand."
        )
        kinds: dict[str, Any] = {"str": str, "int": int, "float": float}
        for f in dataclasses.fields(cls):
            if f.name == "mlflow":
                continue
            kind = kinds[str(f.type).split(" |")[0]]
            required = f.default is dataclasses.MISSING
            parser.add_argument(
                f"--{f.name}", type=kind, required=required, default=None if required else f.default
            )
        return cls(**vars(parser.parse_args(argv)), mlflow=os.environ.get(MLFLOW_ENV) or None)
