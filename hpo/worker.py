"""One worker process of `hpo.run`: runs trials until the study holds its target of finished ones.

Started by the dispatcher with CUDA_VISIBLE_DEVICES pinned (or a share of the CPU threads); not
meant to be run by hand. Each trial goes through `study.optimize(n_trials=1)`, which brings
Optuna's heartbeat thread, stale-trial recovery and FAIL-on-interrupt. The target counts finished
(complete + pruned) trials in the storage, so it holds across workers, machines and re-runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import optuna
import torch
from optuna.artifacts import FileSystemArtifactStore

from hpo import spec as specs
from hpo.objective import SURPLUS, WAITED, TrialFailed, make_objective
from hpo.outage import StorageUnreachable
from hpo.protocol import (
    INTERRUPTED,
    Attr,
    Exit,
    WorkerArgs,
    checkpoints_dir,
    quiet_experimental,
    worker_id,
)
from hpo.storage import counts, open_storage, requeue
from hpo.tracking import Targets
from maskcls import memory
from maskcls.cli import run_main
from maskcls.infer import pick_device
from maskcls.runtime import configure_cpu

MAX_CONSECUTIVE_FAILURES = 5


def _interrupt(signum, frame) -> None:
    """First SIGINT/SIGTERM interrupts the trial (Optuna marks it FAIL); later ones wait for that."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
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


def requeue_interrupted(study: optuna.Study, max_retry: int) -> None:
    """Ctrl-C or SIGTERM failed this worker's trial (Optuna marks it FAIL): queue it again, so the
    next run continues it from its checkpoint instead of sampling something else."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get(Attr.RETRIED_FROM) for t in trials}
    for trial in trials:
        if (
            trial.state == optuna.trial.TrialState.FAIL
            and trial.user_attrs.get(Attr.WORKER) == worker_id()
            and str(trial.user_attrs.get(Attr.FAIL_REASON, "")).startswith(INTERRUPTED)
            and trial.number not in retried
        ):
            requeue(study, trial, max_retry)


def log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}", file=sys.stderr, flush=True)


def work(spec: specs.StudySpec, args: WorkerArgs, poll_s: float = 1.0) -> int:
    device = pick_device(args.device)
    storage = open_storage(WorkerArgs.storage(), spec.heartbeat, on_outage=log, wait=True)
    study = optuna.load_study(
        study_name=spec.name,
        storage=storage,
        sampler=spec.make_sampler(),
        pruner=spec.make_pruner(),
    )
    store = FileSystemArtifactStore(args.artifacts) if args.artifacts else None
    checkpoints = checkpoints_dir(Path(args.artifacts), spec.name) if args.artifacts else None
    targets = Targets(args.tensorboard, args.mlflow)
    objective = make_objective(spec, device, args.target, store, checkpoints, targets)
    try:
        return trials(study, objective, args, device, poll_s)
    except KeyboardInterrupt:
        with contextlib.suppress(StorageUnreachable):  # then the heartbeat re-queues it later
            requeue_interrupted(study, spec.heartbeat.max_retry)
        raise
    except Exception:  # Optuna's own bookkeeping fails in odd ways once the storage is gone
        if not storage.outage.gave_up:
            raise
        log(f"error: storage unreachable for more than {spec.heartbeat.outage} s; stopping this worker")
        return Exit.STORAGE_LOST


def trials(study: optuna.Study, objective, args: WorkerArgs, device: torch.device, poll_s: float) -> int:
    failures: list[str] = []

    def note(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        reason = trial.user_attrs.get(Attr.FAIL_REASON, "")
        if trial.state != optuna.trial.TrialState.FAIL:
            failures.clear()
        elif not reason.startswith((SURPLUS, WAITED)):
            failures.append(f"trial {trial.number}: {reason or 'see the log above'}")

    while True:
        with quiet_experimental():
            optuna.storages.fail_stale_trials(study)
        now = counts(study)
        if now["finished"] >= args.target or (args.deadline is not None and time.time() >= args.deadline):
            return Exit.OK
        if now["finished"] + now["running"] >= args.target:  # the last trials are running elsewhere
            time.sleep(poll_s)
            continue
        study.optimize(objective, n_trials=1, catch=(TrialFailed, Exception), callbacks=[note])
        memory.release(device)  # every trial's GPU memory goes back, so the trial beside it can have it
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
