"""One worker process of `hpo.run`: runs trials until the study holds its target of finished ones.

Started by the dispatcher with CUDA_VISIBLE_DEVICES pinned (or a share of the CPU threads); not
meant to be run by hand. Each trial goes through `study.optimize(n_trials=1)`, which brings
Optuna's heartbeat thread, stale-trial recovery and FAIL-on-interrupt. The target counts finished
(complete + pruned) trials in the storage, so it holds across workers, machines and re-runs.

PyTorch, timm and the objective load once the arguments are read (`work`), so that `--help`
and a refused start cost a second, not the ten of a trainer's imports.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import optuna

from hpo import spec as specs
from hpo import stopping
from hpo.failures import NotTheRecipe, WorkerStops
from hpo.outage import ResilientStorage, StorageUnreachable
from hpo.protocol import (
    Attr,
    Exit,
    WorkerArgs,
    checkpoints_dir,
    quiet_experimental,
)
from hpo.storage import counts, open_storage, requeue, study_deleted
from hpo.tracking import Targets
from maskcls import weights
from maskcls.cli import run_main
from maskcls.runtime import configure_cpu

if TYPE_CHECKING:
    import torch

MAX_CONSECUTIVE_FAILURES = 5


INTERRUPTED_BY_SIGNAL = threading.Event()


def _interrupt(signum, frame) -> None:
    """First SIGINT/SIGTERM interrupts the trial (Optuna marks it FAIL); later ones wait for that.
    The exception can land where Python swallows it (a garbage-collection callback: "Exception
    ignored in ..."), and the trial then runs to its end: the flag still stops the worker before
    its next trial."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    INTERRUPTED_BY_SIGNAL.set()
    raise KeyboardInterrupt


def watch_parent(parent: int | None, every_s: float = 1.0) -> None:
    """Stop like on SIGTERM (the trial is failed and re-queued) once the dispatcher is gone, so no
    worker trains on as an orphan whose result the study would refuse."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        print("the dispatcher is gone; stopping this worker", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    if parent is not None:
        threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def requeue_own(study: optuna.Study, number: int | None, max_retry: int) -> None:
    """Queue this worker's failed trial again (the one Ctrl-C, SIGTERM or a broken CUDA context
    stopped, or a full disk), so that it continues from its checkpoint instead of something else
    being sampled."""
    trials = study.get_trials(deepcopy=False)
    if number is None or any(t.user_attrs.get(Attr.RETRIED_FROM) == number for t in trials):
        return
    trial = next((t for t in trials if t.number == number), None)
    if trial is not None and trial.state == optuna.trial.TrialState.FAIL:
        requeue(study, trial, max_retry)


class Watched:
    """The objective, remembering the trial it ran last and what that trial raised: the worker's
    failure streak and its re-queues go by the failure's kind (hpo.failures)."""

    def __init__(self, objective: Callable[[optuna.Trial], float | list[float]]):
        self.objective = objective
        self.number: int | None = None
        self.error: BaseException | None = None

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        self.number, self.error = trial.number, None
        try:
            return self.objective(trial)
        except BaseException as err:
            self.error = err
            raise


def log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}", file=sys.stderr, flush=True)


def work(spec: specs.StudySpec, args: WorkerArgs, poll_s: float = 1.0) -> int:
    from optuna.artifacts import FileSystemArtifactStore

    from hpo.objective import make_objective
    from maskcls.infer import pick_device

    device = pick_device(args.device)
    weights.check_names(spec.models)  # every backbone the spec can choose, before any trial
    storage = worker_storage(spec, args)
    study = optuna.load_study(
        study_name=spec.name,
        storage=storage,
        sampler=spec.make_sampler(),
        pruner=spec.make_pruner(),
    )
    store = FileSystemArtifactStore(args.artifacts) if args.artifacts else None
    checkpoints = checkpoints_dir(Path(args.artifacts), spec.name) if args.artifacts else None
    targets = Targets(args.tensorboard, args.mlflow)
    objective = Watched(make_objective(spec, device, args.target, store, checkpoints, targets))
    try:
        return trials(study, objective, args, device, stopping.parse(args.stop, spec.multi), poll_s)
    except (KeyboardInterrupt, WorkerStops) as err:
        with contextlib.suppress(StorageUnreachable):  # then the heartbeat re-queues it later
            requeue_own(study, objective.number, spec.heartbeat.max_retry)
        if isinstance(err, KeyboardInterrupt):
            raise
        print(f"error: trial {objective.number}: {err}; it is queued again", file=sys.stderr, flush=True)
        return err.exit_code
    except Exception:  # Optuna's own bookkeeping fails in odd ways once the storage or study is gone
        if isinstance(storage, ResilientStorage) and storage.outage.gave_up:
            log(f"error: storage unreachable for more than {spec.heartbeat.outage} s; stopping this worker")
            return Exit.STORAGE_LOST
        if study_deleted(storage, spec.name):
            log(f"error: study {spec.name} was deleted from the storage; stopping this worker")
            return Exit.FAILED
        raise


def worker_storage(spec: specs.StudySpec, args: WorkerArgs) -> optuna.storages.BaseStorage:
    """The storage itself, or this host's proxy of it (hpo.proxy), which then holds the connections,
    waits out outages and fails stale trials for every worker of the host."""
    if args.proxy:
        from hpo import proxy

        return proxy.connect(args.proxy, spec.heartbeat)
    return open_storage(WorkerArgs.storage(), spec.heartbeat, on_outage=log, wait=True)


def trials(
    study: optuna.Study,
    objective: Watched,
    args: WorkerArgs,
    device: torch.device,
    rule: stopping.Rule | None,
    poll_s: float,
) -> int:
    from maskcls.memory import release

    failures: list[str] = []

    def note(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        reason = trial.user_attrs.get(Attr.FAIL_REASON, "")
        if trial.state != optuna.trial.TrialState.FAIL:
            failures.clear()
        elif not isinstance(objective.error, NotTheRecipe):
            failures.append(f"trial {trial.number}: {reason or 'see the log above'}")

    while True:
        if INTERRUPTED_BY_SIGNAL.is_set():  # its KeyboardInterrupt was swallowed mid-trial
            raise KeyboardInterrupt
        with quiet_experimental():
            optuna.storages.fail_stale_trials(study)
        now = counts(study)
        if now["finished"] >= args.target or (args.deadline is not None and time.time() >= args.deadline):
            return Exit.OK
        if now["finished"] + now["running"] >= args.target:  # the last trials are running elsewhere
            time.sleep(poll_s)
            continue
        if rule is not None and (reason := rule.reason(study)) is not None:
            log(f"starting no trial: {reason}")  # the dispatcher, polling, stops the others
            return Exit.OK
        # Every failure kind ends its trial only, a bug (any other Exception) too, its traceback in
        # this log; but one that every later trial here would share ends the worker as well.
        study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=[note])
        if isinstance(objective.error, WorkerStops):
            raise objective.error
        release(device)  # every trial's GPU memory goes back, so the trial beside it can have it
        if len(failures) >= MAX_CONSECUTIVE_FAILURES:
            print(
                f"error: {len(failures)} trials failed in a row on this worker; stopping it. "
                f"Reasons:\n  " + "\n  ".join(failures),
                file=sys.stderr,
            )
            return Exit.TOO_MANY_FAILURES


def main(argv: Sequence[str] | None = None) -> int:
    args = WorkerArgs.from_argv(argv)
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    watch_parent(args.parent)
    configure_cpu(args.threads)
    optuna.logging.set_verbosity(optuna.logging.INFO)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    spec = specs.load(args.study).with_data(args.data)
    try:
        return work(spec, args)
    except KeyboardInterrupt:
        return Exit.INTERRUPTED


if __name__ == "__main__":
    run_main(main)
