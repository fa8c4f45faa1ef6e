"""Where a study lives, and how to share it safely.

URL: `--storage`, else $HPO_STORAGE, else the spec's `storage`, else sqlite:///runs/<study>/study.db.

SQLite is configured so that all the workers of one machine share it: WAL journal (readers never
block the writer), a 60 s busy timeout (a writer waits instead of failing with "database is
locked"), and transactions that begin IMMEDIATE at their first statement, reads included. pysqlite
on its own begins a transaction only at the first write, so Optuna's claim of a waiting trial (read
that it is WAITING, then write RUNNING) interleaved between two workers and both ran the trial;
PostgreSQL locks the row (SELECT ... FOR UPDATE) and needs none of this. PostgreSQL and MySQL get
pool_pre_ping (survive server restarts) and a small pool per process, which is what many workers
on many machines need. Heartbeats let a RUNNING trial of a dead machine be failed and re-queued.
Every operation waits out an outage of the server (hpo.outage).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import optuna
from filelock import FileLock
from sqlalchemy import text
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from hpo.outage import OUTAGE_S, OnOutage, Outage, ResilientStorage, StorageUnreachable
from hpo.protocol import Attr, quiet_experimental
from hpo.spec import Heartbeat, StudySpec
from maskcls.errors import QUOTE_LIMIT, UserError, mask_secrets, quoted

BUSY_TIMEOUT_S = 60
CREATE_ATTEMPTS = 5
T = TypeVar("T")
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def resolve_url(cli_url: str | None, spec: StudySpec) -> str:
    return (
        cli_url or os.environ.get("HPO_STORAGE") or spec.storage or f"sqlite:///{spec.runs_dir / 'study.db'}"
    )


def masked(url: str) -> str:
    """The URL with its password hidden, for every message and log line."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):  # ValueError: a port that is no number
        scheme = url.split("://", 1)[0] if "://" in url else ""
        return f"<a URL that does not parse{f', of scheme {quoted(scheme[:20])}' if scheme else ''}>"


def parse_url(url: str) -> URL:
    """The storage URL parsed, or UserError that does not repeat it (it may hold a password)."""
    try:
        return make_url(url)
    except (ArgumentError, ValueError):  # ValueError: a port that is no number
        raise UserError(
            f"storage URL {masked(url)} does not parse (it is not shown: it may hold a password); "
            "e.g. sqlite:///runs/demo/study.db or postgresql+psycopg://user:password@host/db"
        ) from None


POOL = (2, 4)  # pool_size, max_overflow: Optuna uses one connection per process plus the heartbeat thread's
PROXIED_POOL = (1, 1)  # hpo.run's own when its workers go through a proxy (hpo.proxy holds 2 more)
POOL_WAIT_S = 120  # how long a request waits for a connection of a full pool (a proxy under load)


def engine_kwargs(url: str, tuned: bool = True, pool: tuple[int, int] = POOL) -> dict:
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        # isolation_level None: pysqlite emits no BEGIN of its own; _begin_immediate emits ours.
        return {"connect_args": {"timeout": BUSY_TIMEOUT_S, "isolation_level": None}} if tuned else {}
    size, overflow = pool
    return {
        "pool_pre_ping": True,
        "pool_size": size,
        "max_overflow": overflow,
        "pool_recycle": 1800,
        "pool_timeout": POOL_WAIT_S,
    }


def open_storage(
    url: str,
    heartbeat: Heartbeat | None = None,
    tuned: bool = True,
    on_outage: OnOutage | None = None,
    wait: bool = False,
    existing: bool = False,
    kind: type[ResilientStorage] = ResilientStorage,
    pool: tuple[int, int] = POOL,
) -> ResilientStorage:
    """A storage that waits out outages (ResilientStorage), or UserError naming the (masked) URL
    and the reason it cannot be used. With `wait`, a server that is down now is waited for too
    (a worker restarted during an outage); otherwise that is an error at once (a wrong URL). With
    `existing`, a SQLite file that is not there is an error, not a new empty database (commands
    that only read a study). `kind` and `pool` are the storage proxy's (hpo.proxy): its class, and
    its connections (pool size, overflow) to PostgreSQL or MySQL."""
    parsed = parse_url(url)
    database = parsed.database if parsed.get_backend_name() == "sqlite" else None
    if existing and database and database != ":memory:" and not Path(database).is_file():
        raise UserError(f"no study database at {database}: run the study first, or pass --storage")
    outage_s = heartbeat.outage if heartbeat is not None else OUTAGE_S
    try:
        if database and database != ":memory:" and tuned:
            Path(database).parent.mkdir(parents=True, exist_ok=True)
            _while_racing(lambda: _enable_wal(database))
        with quiet_experimental():
            options: dict[str, Any] = {}
            if heartbeat is not None:
                options = {
                    "heartbeat_interval": heartbeat.interval,
                    "grace_period": heartbeat.grace,
                    "heartbeat_stale_trial_callback": functools.partial(
                        requeue, max_retry=heartbeat.max_retry
                    ),
                }
            kwargs = engine_kwargs(url, tuned, pool)
            outage = Outage(url, outage_s, on_outage)  # connecting and every operation share it

            def make() -> ResilientStorage:
                immediate = bool(database) and tuned
                return kind(url, outage, immediate, engine_kwargs=kwargs, **options)

            return _while_racing(lambda: outage.call(make) if wait else make())
    except (SQLAlchemyError, ImportError, ValueError, sqlite3.Error, StorageUnreachable) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"cannot use storage {masked(url)}: {mask_secrets(reason)[:QUOTE_LIMIT]}") from None


def _enable_wal(path: str) -> None:
    with sqlite3.connect(path, timeout=BUSY_TIMEOUT_S) as conn:
        conn.execute("PRAGMA journal_mode=WAL")  # persistent: stored in the database file


def _while_racing(make: Callable[[], T]) -> T:
    """Processes started together on a new database race to set it up (WAL mode, Optuna's tables):
    a loser sees "database is locked", "already exists" or a duplicate key, and finds the
    database ready on its next try."""
    signs = ("database is locked", "already exists", "duplicate key", "UNIQUE constraint failed")
    for attempt in range(CREATE_ATTEMPTS - 1):
        try:
            return make()
        except (SQLAlchemyError, sqlite3.Error) as err:
            if not any(sign in str(err) for sign in signs):
                raise
            time.sleep(0.2 * (attempt + 1))
    return make()


def requeue(study: optuna.Study, trial: optuna.trial.FrozenTrial, max_retry: int) -> None:
    """Queue a failed trial again with the same parameters and its reported epochs (it resumes from
    its checkpoint), as Optuna's RetryHeartbeatStaleTrialCallback does, but starting clean: the
    retry records `retried_from` instead of inheriting the failed trial's fail_reason."""
    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    if len(history) > max_retry:
        return
    system_attrs = {
        **trial.system_attrs,
        "failed_trial": trial.system_attrs.get("failed_trial", trial.number),
        "retry_history": history,
    }
    study.add_trial(
        optuna.create_trial(
            state=optuna.trial.TrialState.WAITING,
            params=trial.params,
            distributions=trial.distributions,
            user_attrs={Attr.RETRIED_FROM: trial.number},
            system_attrs=system_attrs,
            intermediate_values=trial.intermediate_values,
        )
    )


@contextlib.contextmanager
def setup_lock(storage: ResilientStorage, name: str) -> Iterator[None]:
    """One process at a time sets a study up (create it, queue its recipes), across every machine
    sharing the storage: a lock file beside a SQLite database, an advisory lock on PostgreSQL and
    MySQL. Optuna's enqueue_trial(skip_if_exists=True) checks and then inserts, so two runs
    starting together would both queue the recipes."""
    url = storage.engine.url
    backend = url.get_backend_name()
    if backend == "sqlite":
        in_memory = url.database in (None, "", ":memory:")
        with contextlib.nullcontext() if in_memory else FileLock(f"{url.database}.setup.lock"):
            yield
        return
    key = int.from_bytes(hashlib.sha256(f"hpo setup {name}".encode()).digest()[:7], "big")
    lock, unlock = {
        "postgresql": ("SELECT pg_advisory_lock(:k)", "SELECT pg_advisory_unlock(:k)"),
        "mysql": ("SELECT GET_LOCK(:k, 600)", "SELECT RELEASE_LOCK(:k)"),
    }.get(backend, ("SELECT 1", "SELECT 1"))
    params = {"k": key if backend == "postgresql" else str(key)}
    engine = storage.engine.execution_options(isolation_level="AUTOCOMMIT")

    def locked() -> Connection:
        conn = engine.connect()
        conn.execute(text(lock), params)
        return conn

    conn = storage.outage.call(locked)
    try:
        yield
    finally:
        with contextlib.suppress(SQLAlchemyError):  # a lost connection has dropped the lock already
            conn.execute(text(unlock), params)
        conn.close()


def counts(study: optuna.Study) -> dict[str, int]:
    """Trials per state name (complete, pruned, fail, running, waiting) plus finished."""
    return tally(study.get_trials(deepcopy=False))


def tally(trials: Sequence[optuna.trial.FrozenTrial]) -> dict[str, int]:
    """counts() of trials already read."""
    states = [t.state for t in trials]
    out = {s.name.lower(): states.count(s) for s in optuna.trial.TrialState}
    out["finished"] = out["complete"] + out["pruned"]
    return out


def study_deleted(storage: optuna.storages.BaseStorage, name: str) -> bool:
    """Whether the study is gone from the storage (`mask-hpo studies delete --force` during a run)."""
    return name not in optuna.get_all_study_names(storage)
