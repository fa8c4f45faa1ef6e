"""One worker process of `hpo.run`: runs trials until the study holds its target of finished ones.

Started by the dispatcher with CUDA_VISIBLE_DEVICES pinned (or a share of the CPU threads); not
meant to be run by hand. Each trial goes through `study.optimize(n_trials=1)`, which brings
Optuna's heartbeat thread, stale-trial recovery and FAIL-on-interrupt. The target counts finished
(complete + pruned) trials in the storage, so it holds across workers, machines and re-runs.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
import warnings
from collections.abc import Sequence

import optuna
from optuna.artifacts import FileSystemArtifactStore

from hpo import spec as specs
from hpo.objective import TrialFailed, make_objective, worker_id
from hpo.storage import counts, open_storage
from maskcls import memory
from maskcls.cli import run_main
from maskcls.infer import pick_device
from maskcls.runtime import configure_cpu

MAX_CONSECUTIVE_FAILURES = 5
EXIT_TOO_MANY_FAILURES = 3


def _interrupt(signum, frame) -> None:
    """First SIGINT/SIGTERM interrupts the trial (Optuna marks it FAIL); later ones wait for that."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def work(
    spec: specs.StudySpec,
    storage_url: str,
    target: int,
    device_name: str,
    artifacts: str | None,
    deadline: float | None = None,
    poll_s: float = 1.0,
) -> int:
    device = pick_device(device_name)
    storage = open_storage(storage_url, spec.heartbeat)
    study = optuna.load_study(
        study_name=spec.name,
        storage=storage,
        sampler=spec.make_sampler(worker_id()),
        pruner=spec.make_pruner(),
    )
    store = FileSystemArtifactStore(artifacts) if artifacts else None
    objective = make_objective(spec, device, target, store)
    failures: list[str] = []

    def note(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        reason = trial.user_attrs.get("fail_reason", "")
        if trial.state != optuna.trial.TrialState.FAIL:
            failures.clear()
        elif not reason.startswith("surplus"):
            failures.append(f"trial {trial.number}: {reason or 'see the log above'}")

    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        now = counts(study)
        if now["finished"] >= target or (deadline is not None and time.time() >= deadline):
            return 0
        if now["finished"] + now["running"] >= target:  # the last trials are running elsewhere
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
            return EXIT_TOO_MANY_FAILURES


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpo.worker", description=__doc__.split("\n")[0])
    parser.add_argument("--study", required=True, help="spec name or path")
    parser.add_argument("--storage", required=True)
    parser.add_argument("--target", type=int, required=True, help="finished trials the study should hold")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for this worker")
    parser.add_argument("--data", default=None)
    parser.add_argument("--artifacts", default=None, help="artifact directory shared with the dashboard")
    parser.add_argument("--deadline", type=float, default=None, help="start no trial after this UNIX time")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    configure_cpu(args.threads)
    optuna.logging.set_verbosity(optuna.logging.INFO)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    spec = specs.load(args.study).with_data(args.data)
    try:
        return work(spec, args.storage, args.target, args.device, args.artifacts, args.deadline)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    run_main(main)
