"""Hammer a storage with short fake trials from many processes: the check behind our SQLite and
PostgreSQL promises (tests/test_storage.py) and the figures of bench/storage.py.

Each process runs `trials` fake trials that report `reports` intermediate values and a few user
attrs, with no training in between, so the storage itself is the bottleneck.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import threading
import time
import traceback
from dataclasses import dataclass

import optuna

from hpo.protocol import Attr
from hpo.storage import open_storage


@dataclass(frozen=True)
class StressResult:
    seconds: float
    errors: list[str]  # one line per failed process or trial


def _fake_objective(reports: int):
    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", -10, 10)
        for step in range(reports):
            trial.report(-abs(x) + step * 0.01, step)
        trial.set_user_attr(Attr.DEVICE, "none")
        return -abs(x)

    return objective


def _worker(url: str, study_name: str, tuned: bool, trials: int, reports: int, queue, ready) -> None:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    errors = []
    try:
        study = optuna.load_study(study_name=study_name, storage=open_storage(url, tuned=tuned))
        ready.wait()  # all processes start together, after their imports
        for _ in range(trials):
            try:
                study.optimize(_fake_objective(reports), n_trials=1)
            except Exception as err:  # noqa: BLE001 - every error is what this stress test counts
                errors.append(f"{type(err).__name__}: {str(err).splitlines()[0]}")
    except Exception as err:  # noqa: BLE001
        errors.append(f"{type(err).__name__}: {str(err).splitlines()[0]}\n{traceback.format_exc(limit=2)}")
    queue.put(errors)


def hammer(
    url: str, study_name: str, processes: int, trials: int, reports: int, tuned: bool = True
) -> StressResult:
    """Create the study, run `processes` processes at once, and collect every error they saw."""
    optuna.create_study(study_name=study_name, storage=open_storage(url, tuned=tuned), direction="maximize")
    ctx = mp.get_context("spawn")
    queue, ready = ctx.Queue(), ctx.Barrier(processes + 1)
    procs = [
        ctx.Process(target=_worker, args=(url, study_name, tuned, trials, reports, queue, ready))
        for _ in range(processes)
    ]
    for p in procs:
        p.start()
    # The clock starts when every process has loaded the study. A process that died before it was
    # ready breaks the barrier; its exit code is reported below.
    with contextlib.suppress(threading.BrokenBarrierError):
        ready.wait(timeout=300)
    start = time.perf_counter()
    for p in procs:
        p.join(timeout=600)
    seconds = time.perf_counter() - start
    errors = []
    while not queue.empty():
        errors += queue.get()
    errors += [f"process exited with {p.exitcode}" for p in procs if p.exitcode != 0]
    return StressResult(seconds, errors)
