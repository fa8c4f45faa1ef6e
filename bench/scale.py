"""Hundreds of workers, tens of thousands of trials: measured by simulation on a PostgreSQL of the
bench's own (initdb and pg_ctl as user postgres, a free local port; stopped and removed at the end).

A simulated worker imports no torch but runs our worker's protocol: hpo.storage's storage (outage
retries, heartbeats) or a per-host proxy (hpo.proxy), the spec's real sampler and pruner, the
loop of hpo.worker (stale check, counts, one `optimize(n_trials=1)` at a time), the records of
hpo.record (claim, start, a report per epoch, pruned, end) and tell. Its trial "trains" by
sleeping --trial-seconds over the spec's epochs, its value a made-up function of its parameters.
Several workers share a process (threads), each with its own storage, as separate processes
would have.

Per cell (workers x study size x direct or proxy) it prints:
- storage s/trial: the median time one worker spends in storage calls for one trial (its loop's
  stale check and counts, ask, records, reports, tell; heartbeats apart), and the sampler's own;
- load s: how long a starting worker takes to read the study into its cache, all starting at once;
- connections: the most PostgreSQL connections open at once (pg_stat_activity);
- trials/s: finished trials per second while every worker ran;
- lost: trials started and neither finished nor queued again, or finished slots missing from the
  target; duplicated: finished trials beyond the target.
A study size is reached by copying made-up finished trials into the tables first (no workers).

    python bench/scale.py --quick     # a reduced grid, <= 10 minutes on 2 cores
    python bench/scale.py             # the full grid of docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import multiprocessing as mp
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.storages._rdb import models

from hpo import record, space
from hpo import spec as specs
from hpo.protocol import Attr, quiet_experimental
from hpo.storage import counts, open_storage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from pg import private_server  # noqa: E402  (the tests' private PostgreSQL, shared with them)

CONNECTIONS_SQL = (  # clients only: autovacuum workers show the database's name too
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    " AND backend_type = 'client backend'"
)


@dataclass
class Cell:
    mode: str  # direct | proxy
    workers: int
    size: int  # finished trials the study holds before the workers start
    new: int  # finished trials the workers add
    seconds: float  # a trial's length: long enough that the workers leave this machine's CPU idle
    threads: int = 8  # workers per process (1: a process each, as hpo.run starts them)

    @property
    def name(self) -> str:
        return f"scale-{self.mode}-{self.workers}w-{self.size}t-{uuid.uuid4().hex[:6]}"


@dataclass
class Result:
    cell: Cell
    storage_s: float  # median per trial
    load_s: float  # median time a starting worker takes to read the study (all of them at once)
    sampler_s: float  # median per trial of the sampler's own time (its storage reads included)
    connections: int
    trials_per_s: float
    lost: int
    duplicated: int
    errors: list[str] = field(default_factory=list)


# --- the simulated trial -------------------------------------------------------------------------


def quality(params: dict[str, Any]) -> float:
    """A made-up final macro-F1 of a recipe: best near lr 1e-3, a little worse with dropout."""
    lr = float(params.get("optim.lr", 1e-3))
    value = 0.75 - 0.12 * abs(math.log10(lr) + 3) - 0.1 * float(params.get("model.dropout", 0.0))
    return value + 0.02 * (zlib.crc32(json.dumps(params, sort_keys=True).encode()) % 100) / 100


def curve(final: float, epoch: int) -> float:
    return final * (1 - math.exp(-epoch / 3))


def simulated(spec: specs.StudySpec, target: int, epoch_s: float) -> Callable[[optuna.Trial], float]:
    """hpo.objective's trial without the training: the same records, one report per epoch."""
    epochs = spec.base.train.epochs

    def objective(trial: optuna.Trial) -> float:
        record.claim(trial, target)
        cfg = spec.base.override(space.suggest(trial, spec.params))
        record.start(trial, cfg, "sim", 1, None)
        final = quality(trial.params)
        for epoch in range(1, epochs + 1):
            time.sleep(epoch_s)
            score = curve(final, epoch)
            trial.report(score, epoch)
            if trial.should_prune():
                raise record.pruned(trial, epoch, score)
        end(trial, final, epochs)
        return final

    return objective


def end(trial: optuna.Trial, final: float, epochs: int) -> None:
    from maskcls.labels import NUM_CLASSES, class_name

    record.end(
        trial,
        best_epoch=epochs,
        per_class_f1={class_name(c): final for c in range(NUM_CLASSES)},
        attribute_accuracy={"mask": 0.9, "gender": 0.8, "age_band": 0.7},
        val_accuracy=final,
        person_folds=[final] * 5,
        images_per_s=1000.0,
        wall_s=1.0,
        peak_memory_mb=1000.0,
        stop_reason="finished",
        face_fallbacks=0,
    )


# --- timing what a worker spends in the storage and the sampler --------------------------------


class Clock:
    def __init__(self) -> None:
        self.storage = 0.0
        self.sampler = 0.0
        self.local = threading.local()

    def timed(self, method: Callable[..., Any], kind: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if getattr(self.local, "inside", False):  # a call within a timed call: counted once
                return method(*args, **kwargs)
            self.local.inside = True
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.local.inside = False
                if threading.current_thread().name == "worker":  # Optuna's heartbeat thread apart
                    setattr(self, kind, getattr(self, kind) + time.perf_counter() - start)

        return call


def clocked(study: optuna.Study, clock: Clock) -> None:
    """Every storage method the study and its trials call, and the sampler's, run on `clock`."""
    storage = study._storage
    for name in dir(optuna.storages.BaseStorage) + ["_get_stale_trial_ids", "record_heartbeat"]:
        if not name.startswith("__") and callable(getattr(storage, name, None)):
            setattr(storage, name, clock.timed(getattr(storage, name), "storage"))
    for name in ("infer_relative_search_space", "sample_relative", "sample_independent"):
        setattr(study.sampler, name, clock.timed(getattr(study.sampler, name), "sampler"))


# --- a process of simulated workers --------------------------------------------------------------


def join(spec: specs.StudySpec, connect: Callable[[], Any], name: str) -> tuple[optuna.Study, Clock, float]:
    """A worker starts: its storage, the study, and a first read of every trial into its cache
    (hpo.worker's first look at the counts); returns how long that took."""
    started = time.perf_counter()
    study = optuna.load_study(
        study_name=name, storage=connect(), sampler=spec.make_sampler(), pruner=spec.make_pruner()
    )
    counts(study)
    clock = Clock()
    clocked(study, clock)
    return study, clock, time.perf_counter() - started


def work(study: optuna.Study, clock: Clock, objective: Callable, target: int, out: list) -> None:
    """hpo.worker's loop on the simulated objective; each trial's storage and sampler seconds go
    to `out`."""
    while True:
        clock.storage = clock.sampler = 0.0
        with quiet_experimental():
            optuna.storages.fail_stale_trials(study)
        now = counts(study)
        if now["finished"] >= target:
            return
        if now["finished"] + now["running"] >= target:
            time.sleep(0.5)
            continue
        study.optimize(objective, n_trials=1, catch=(Exception,))
        out.append((clock.storage, clock.sampler))


def process(
    spec_path: str, mode: str, url: str, proxy: str | None, name: str, threads: int, target: int,
    epoch_s: float, ready, results,
) -> None:  # fmt: skip
    """`threads` workers: each joins the study, then all start at once with every other process's."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    spec = specs.load(spec_path)
    errors: list[str] = []
    out: list[tuple[float, float]] = []
    loads: list[float] = []
    joined, go = threading.Barrier(threads + 1), threading.Event()

    def connect() -> Any:
        if mode == "proxy":
            from hpo import proxy as proxies

            assert proxy is not None
            return proxies.connect(proxy, spec.heartbeat)
        return open_storage(url, spec.heartbeat, wait=True)

    def run() -> None:
        try:
            study, clock, load_s = join(spec, connect, name)
            loads.append(load_s)
        except Exception as err:  # noqa: BLE001 - the bench counts every error
            errors.append(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            joined.wait()
            return
        joined.wait()
        go.wait()
        try:
            work(study, clock, simulated(spec, target, epoch_s), target, out)
        except Exception as err:  # noqa: BLE001
            errors.append(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")

    pool = [threading.Thread(target=run, name="worker") for _ in range(threads)]
    for thread in pool:
        thread.start()
    joined.wait()  # every worker of this process has read the study
    ready.wait()  # and every other process's
    go.set()
    for thread in pool:
        thread.join()
    results.put((out, loads, errors))


# --- the study: made, filled, checked ------------------------------------------------------------


def made_trials(spec: specs.StudySpec, n: int) -> list[optuna.trial.FrozenTrial]:
    """n finished trials as the workers would leave them: about 2 in 3 pruned at a Hyperband rung."""
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    epochs = spec.base.train.epochs
    rungs = [e for e in (2, 6) if e < epochs] or [1]
    for i in range(n):
        trial = study.ask()
        trial.set_user_attr(Attr.WORKER, "prefill:0")
        cfg = spec.base.override(space.suggest(trial, spec.params))
        record.start(trial, cfg, "sim", 1, None)
        final = quality(trial.params)
        stop = rungs[i % len(rungs)] if i % 3 else epochs
        for epoch in range(1, stop + 1):
            trial.report(curve(final, epoch), epoch)
        if stop < epochs:
            trial.set_user_attr(
                Attr.PRUNED_WHY, f"val macro-F1 {curve(final, stop):.4f}; made by bench/scale.py"
            )
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            end(trial, final, epochs)
            study.tell(trial, final)
    return study.get_trials(deepcopy=False)


def fill(url: str, name: str, made: list[optuna.trial.FrozenTrial], n: int) -> None:
    """n finished trials, the made ones over and over, copied into the study's tables in a few
    statements (Optuna's add_trial takes minutes for 10,000)."""
    trials = [made[i % len(made)] for i in range(n)]
    engine = sqlalchemy.create_engine(url)
    now = datetime.datetime.now()
    with engine.begin() as conn:
        study_id = conn.execute(
            sqlalchemy.select(models.StudyModel.study_id).where(models.StudyModel.study_name == name)
        ).scalar_one()
        rows = [
            {"number": i, "study_id": study_id, "state": t.state, "datetime_start": now,
             "datetime_complete": now}
            for i, t in enumerate(trials)
        ]  # fmt: skip
        ids = (
            conn.execute(
                sqlalchemy.insert(models.TrialModel.__table__).returning(
                    models.TrialModel.__table__.c.trial_id, sort_by_parameter_order=True
                ),
                rows,
            )
            .scalars()
            .all()
        )
        params, values, steps, attrs = [], [], [], []
        for trial_id, t in zip(ids, trials, strict=True):
            for key, value in t.params.items():
                dist = t.distributions[key]
                as_json = optuna.distributions.distribution_to_json(dist)
                internal = dist.to_internal_repr(value)
                row = {"trial_id": trial_id, "param_name": key, "param_value": internal}
                params.append({**row, "distribution_json": as_json})
            if t.values:
                values.append(
                    {"trial_id": trial_id, "objective": 0, "value": t.values[0], "value_type": "FINITE"}
                )
            for step, value in t.intermediate_values.items():
                steps.append({"trial_id": trial_id, "step": step, "intermediate_value": value,
                              "intermediate_value_type": "FINITE"})  # fmt: skip
            for key, value in t.user_attrs.items():
                attrs.append({"trial_id": trial_id, "key": key, "value_json": json.dumps(value)})
        for model, batch in (
            (models.TrialParamModel, params),
            (models.TrialValueModel, values),
            (models.TrialIntermediateValueModel, steps),
            (models.TrialUserAttributeModel, attrs),
        ):
            if batch:
                conn.execute(sqlalchemy.insert(model.__table__), batch)
    engine.dispose()


def audit(study: optuna.Study, size: int, target: int) -> tuple[int, int]:
    """(lost, duplicated): trials started and neither finished nor queued again, plus finished
    slots missing; finished trials beyond the target."""
    trials = study.get_trials(deepcopy=False)
    finished = counts(study)["finished"]
    retried = {t.user_attrs.get(Attr.RETRIED_FROM) for t in trials}
    surplus = {t.number for t in trials if str(t.user_attrs.get(Attr.FAIL_REASON, "")).startswith("surplus")}
    stranded = [
        t for t in trials
        if t.state == optuna.trial.TrialState.RUNNING
        or (t.state == optuna.trial.TrialState.FAIL and t.number not in retried and t.number not in surplus)
    ]  # fmt: skip
    return len(stranded) + max(0, target - finished), max(0, finished - target)


@contextlib.contextmanager
def watched_connections(url: str) -> Iterator[list[int]]:
    """The number of other connections to the database, sampled every 0.2 s."""
    seen = [0]
    stop = threading.Event()
    # Autocommit: inside a transaction PostgreSQL would show the first snapshot of its statistics again.
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, isolation_level="AUTOCOMMIT")

    def watch() -> None:
        with engine.connect() as conn:
            while not stop.wait(0.2):
                seen.append(conn.execute(sqlalchemy.text(CONNECTIONS_SQL)).scalar_one())

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join()
        engine.dispose()


@contextlib.contextmanager
def proxies_for(mode: str, url: str, spec_path: str, hosts: int) -> Iterator[list[str]]:
    """One proxy per simulated host (`python -m hpo.proxy`), or none."""
    if mode != "proxy":
        yield []
        return
    from hpo import proxy as proxies

    procs, addresses = [], []
    for _ in range(hosts):
        port = proxies.free_port()
        env = {**os.environ, "HPO_STORAGE": url}
        command = [sys.executable, "-m", "hpo.proxy", "--study", spec_path, "--port", str(port)]
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        addresses.append(f"127.0.0.1:{port}")
    try:
        for address in addresses:
            proxies.wait_ready(address, 60)
        yield addresses
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)


def measure(cell: Cell, url: str, spec_path: str, made: list) -> Result:
    spec = specs.load(spec_path)
    epoch_s = cell.seconds / spec.base.train.epochs
    name = cell.name
    storage = open_storage(url, spec.heartbeat)
    optuna.create_study(study_name=name, storage=storage, direction="maximize")
    if cell.size:
        fill(url, name, made, cell.size)
    storage.engine.dispose()
    target = cell.size + cell.new
    per_process = min(cell.threads, cell.workers)
    n_processes = math.ceil(cell.workers / per_process)
    hosts = max(1, cell.workers // 64)  # a host of 8 GPUs x 2 trials x ... : 64 workers
    ctx = mp.get_context("spawn")
    ready, results = ctx.Barrier(n_processes + 1), ctx.Queue()
    with proxies_for(cell.mode, url, spec_path, hosts) as addresses:
        procs = []
        for i in range(n_processes):
            threads = min(per_process, cell.workers - i * per_process)
            address = addresses[i * per_process // 64 % len(addresses)] if addresses else None
            args = (spec_path, cell.mode, url, address, name, threads, target, epoch_s, ready, results)
            procs.append(ctx.Process(target=process, args=args))
        for proc in procs:
            proc.start()
        with watched_connections(url) as seen:
            ready.wait(timeout=600)
            start = time.perf_counter()
            outs, loads, errors, reported = [], [], [], 0
            while reported < len(procs):
                try:
                    out, load, errs = results.get(timeout=5)
                except queue.Empty:
                    dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                    if len(dead) + reported >= len(procs):
                        errors += [f"a worker process exited with {code}" for code in dead]
                        break
                    continue
                outs += out
                loads += load
                errors += errs
                reported += 1
            seconds = time.perf_counter() - start
        for proc in procs:
            proc.join(timeout=60)
    checker = open_storage(url)
    after = optuna.load_study(study_name=name, storage=checker)
    lost, duplicated = audit(after, cell.size, target)
    optuna.delete_study(study_name=name, storage=checker)
    checker.engine.dispose()  # its connections would count in the next cell
    return Result(
        cell,
        storage_s=median([s for s, _ in outs]),
        load_s=median(loads),
        sampler_s=median([s for _, s in outs]),
        connections=max(seen),
        trials_per_s=cell.new / seconds,
        lost=lost,
        duplicated=duplicated,
        errors=errors,
    )


# --- optuna-dashboard on a large study -----------------------------------------------------------


def dashboard_seconds(url: str, name: str, cached: bool) -> tuple[float, float, int]:
    """optuna-dashboard's study API over HTTP, as its browser page calls it: the first load of every
    trial, then a poll once its trial cache has expired (10 s at this size). Its storage is ours
    as hpo.dashboard hands it over (`cached`: wrapped in Optuna's cache) or the bare one. Returns
    (first s, poll s, bytes of the first answer)."""
    import urllib.request
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    import optuna_dashboard

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    storage = open_storage(url)
    served = optuna.storages.get_storage(storage) if cached else storage
    study_id = storage.get_study_id_from_name(name)
    server = make_server("127.0.0.1", 0, optuna_dashboard.wsgi(served), handler_class=Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}/api/studies/{study_id}"

    def get(after: int) -> tuple[float, int]:
        start = time.perf_counter()
        with urllib.request.urlopen(f"{base}?after={after}", timeout=600) as answer:
            size = len(answer.read())
        return time.perf_counter() - start, size

    try:
        first, size = get(0)
        time.sleep(10.5)  # optuna-dashboard keeps the trials 10 s
        poll, _ = get(storage.get_n_trials(study_id))
    finally:
        server.shutdown()
        storage.engine.dispose()
    return first, poll, size


def dashboard_table(url: str, made: list) -> None:
    """optuna-dashboard at 1,000 and 10,000 trials: its storage bare, and cached as hpo.dashboard
    now hands it over."""
    print(f"{'dashboard':>10s}{'trials':>8s}{'storage':>9s}{'first s':>9s}{'poll s':>8s}{'MB':>7s}")
    for size in (1_000, 10_000):
        name = f"scale-dashboard-{size}"
        storage = open_storage(url)
        optuna.create_study(study_name=name, storage=storage, direction="maximize")
        storage.engine.dispose()
        fill(url, name, made, size)
        for cached in (False, True):
            first, poll, answer = dashboard_seconds(url, name, cached)
            kind = "cached" if cached else "bare"
            print(f"{'':10s}{size:8d}{kind:>9s}{first:9.2f}{poll:8.2f}{answer / 1e6:7.1f}", flush=True)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def grid(quick: bool, modes: list[str], seconds: float) -> list[Cell]:
    """Study sizes with 4 workers, a process each (as hpo.run starts them), three rounds of trials:
    at 10,000 trials TPE computes for seconds per trial, and workers sharing a process, or many
    sharing this machine's 2 cores, would time the queue for the CPU, not the storage (a real
    worker has its host's). Worker counts at 100 trials, one round, 8 workers per process, direct
    and through proxies; a trial lasts a second per worker."""
    sizes = [100, 10_000] if quick else [100, 1_000, 10_000]
    workers = [64] if quick else [16, 64, 256]
    cells = [Cell("direct", 4, size, 12, seconds, threads=1) for size in sizes]
    cells += [Cell(mode, n, 100, n, max(seconds, float(n))) for n in workers for mode in modes]
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="sizes 100 and 10,000; 64 workers (<= 10 min)")
    parser.add_argument("--spec", default="mask", help="study spec whose space, sampler and pruner run")
    parser.add_argument(
        "--trial-seconds",
        type=float,
        default=10.0,
        help="a simulated trial's length at 16 workers and 100 trials",
    )
    parser.add_argument("--modes", default="direct,proxy", help="direct, proxy or both")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    spec_path = str(specs.resolve(args.spec))
    spec = specs.load(spec_path)
    cells = grid(args.quick, args.modes.split(","), args.trial_seconds)
    started = time.perf_counter()
    made = made_trials(spec, min(1000, max(c.size for c in cells)))
    print(f"{len(made)} made trials in {time.perf_counter() - started:.0f} s; {len(cells)} cells", flush=True)
    # fill() repeats them up to a study's size
    header = (
        f"{'mode':7s}{'workers':>8s}{'trials':>8s}{'storage s/trial':>17s}{'load s':>8s}{'sampler s':>11s}"
    )
    print(header + f"{'connections':>13s}{'trials/s':>10s}{'lost':>6s}{'dup':>5s}", flush=True)
    results = []
    with private_server(max_connections=1200) as server:
        for cell in cells:
            result = measure(cell, server.url, spec_path, made)
            results.append(result)
            c = result.cell
            print(
                f"{c.mode:7s}{c.workers:8d}{c.size:8d}{result.storage_s:17.3f}{result.load_s:8.2f}"
                f"{result.sampler_s:11.3f}"
                f"{result.connections:13d}{result.trials_per_s:10.2f}{result.lost:6d}{result.duplicated:5d}"
                + (f"  errors: {len(result.errors)}, e.g. {result.errors[0]}" if result.errors else ""),
                flush=True,
            )
        if not args.quick:
            dashboard_table(server.url, made)
    if args.json:
        args.json.write_text(json.dumps([{**r.__dict__, "cell": r.cell.__dict__} for r in results], indent=2))
    by_size = {r.cell.size: r for r in results if r.cell.threads == 1}
    ratio = by_size[max(by_size)].storage_s / by_size[min(by_size)].storage_s
    proxied = [r for r in results if r.cell.mode == "proxy"]
    per_host = max((r.connections / max(1, r.cell.workers // 64) for r in proxied), default=math.nan)
    lost = sum(r.lost + r.duplicated for r in results)  # L counts both
    print(f"({time.perf_counter() - started:.0f} s in all)")
    print(
        f"scale: overhead ratio {ratio:.2f} (per-trial storage time at {max(by_size)} trials / at "
        f"{min(by_size)} trials), connections {per_host:.0f} per host through the proxy, lost {lost}"
    )


if __name__ == "__main__":
    main()
