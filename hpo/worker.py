"""One worker process of `hpo.run`: runs trials until the study holds its target of finished ones.

Started by the dispatcher with CUDA_VISIBLE_DEVICES pinned (or a share of the CPU threads); not
meant to be run by hand. Each trial goes through `study.optimize(n_trials=1)`, which brings
Optuna's heartbeat thread, stale-trial recovery and FAIL-on-interrupt. The target counts finished
(complete + pruned) trials in the storage, so it holds across workers, machines and re-runs.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from collections.abc import Sequence

import optuna
from optuna.artifacts import FileSystemArtifactStore

from hpo import spec as specs
from hpo.objective import SURPLUS, WAITED, TrialFailed, make_objective
from hpo.protocol import Attr, Exit, WorkerArgs, quiet_experimental, worker_id
from hpo.storage import counts, open_storage
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


def work(spec: specs.StudySpec, args: WorkerArgs, poll_s: float = 1.0) -> int:
    device = pick_device(args.device)
    study = optuna.load_study(
        study_name=spec.name,
        storage=open_storage(args.storage, spec.heartbeat),
        sampler=spec.make_sampler(worker_id()),
        pruner=spec.make_pruner(),
    )
    store = FileSystemArtifactStore(args.artifacts) if args.artifacts else None
    objective = make_objective(spec, device, args.target, store)
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
