"""Storage outages are weather: a PostgreSQL restart, a failover, a network blip or "too many
clients" make every storage operation of this process wait and try again, with bounded
exponential backoff and jitter, for up to a window (the spec's `heartbeat.outage`, 5 minutes by
default). A worker then finishes the epoch it is in and holds its report until the storage is
back; Optuna's heartbeat thread waits the same way instead of dying. Past the window every later
operation fails at once with StorageUnreachable, so a process can stop with one clear line.

Two consequences are handled here too. A completion whose first commit went through before the
connection dropped is refused when retried ("already finished"): it counts as done when the
stored trial already holds the same state and values. And once the storage is back, every
RUNNING trial's heartbeat is old: trials are not failed as stale until this process has seen the
storage reachable for longer than the grace period plus one backoff step, the time a live worker
needs to beat again.
"""

from __future__ import annotations

import contextlib
import functools
import random
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

import optuna
import sqlalchemy
from optuna.storages._base import DEFAULT_STUDY_NAME_PREFIX
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import TrialState
from sqlalchemy import exc, orm
from sqlalchemy.engine import make_url

from hpo.protocol import Attr

OUTAGE_S = 300  # default window: how long the storage may stay unreachable
BACKOFF_S, BACKOFF_CAP_S = 0.5, 8.0
NOTE_EVERY_S = 5.0
T = TypeVar("T")
OnOutage = Callable[[str], None]  # told "storage unreachable, retrying (12 s): <reason>"


class StorageUnreachable(Exception):
    """The storage stayed unreachable for longer than the outage window."""


def transient(err: BaseException, backend: str) -> bool:
    """A lost or refused connection, anywhere in the error's chain (Optuna wraps a failed commit
    in StorageInternalError). For SQLite, whose file cannot go away, only a lock timeout."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, exc.DBAPIError) and seen.connection_invalidated:
            return True
        if isinstance(seen, (exc.OperationalError, exc.InterfaceError, exc.TimeoutError)):
            return backend != "sqlite" or "database is locked" in str(seen)
        seen = seen.__cause__ or seen.__context__
    return False


def reason_of(err: BaseException) -> str:
    root = err
    while root.__cause__ is not None or root.__context__ is not None:
        root = root.__cause__ or root.__context__  # type: ignore[assignment]
    lines = str(root).strip().splitlines()
    return lines[0] if lines else type(root).__name__


class Outage:
    """The retry loop shared by every operation of one storage (connecting included): when it
    started failing, when it was last reachable, whether the window was spent."""

    def __init__(self, url: str, window_s: float, on_outage: OnOutage | None):
        self.backend = make_url(url).get_backend_name()
        self.window_s, self.on_outage = window_s, on_outage
        self.reachable_since = float("-inf")  # after an outage: when this process saw it back
        self.gave_up = False
        self.local = threading.local()  # per thread: inside an operation, and its attempt number
        self.last_note = float("-inf")

    def __getstate__(self) -> dict[str, Any]:
        """A copy in another process starts with no outage behind it (a thread-local cannot travel)."""
        state = self.__dict__.copy()
        del state["local"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.local = threading.local()
        self.reachable_since, self.last_note, self.gave_up = float("-inf"), float("-inf"), False

    def limit(self, seconds: float) -> None:
        """Wait out outages no longer than `seconds` from now on (a process that is stopping)."""
        self.window_s = min(self.window_s, seconds)

    def retried(self) -> bool:
        """Whether the operation this thread is in has already failed once and been tried again."""
        return getattr(self.local, "attempt", 0) > 0

    def call(self, operation: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if getattr(self.local, "active", False):  # nested operations retry as one
            return operation(*args, **kwargs)
        self.local.active = True
        try:
            return self._retrying(operation, *args, **kwargs)
        finally:
            self.local.active, self.local.attempt = False, 0

    def _retrying(self, operation: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        started, attempt = None, 0
        while True:
            if self.gave_up:
                raise StorageUnreachable(f"storage unreachable for more than {self.window_s:.0f} s")
            self.local.attempt = attempt
            try:
                result = operation(*args, **kwargs)
            except Exception as err:
                if not transient(err, self.backend):
                    raise
                now = time.monotonic()
                started = now if started is None else started
                if now - started > self.window_s:
                    self.gave_up = True
                    raise StorageUnreachable(
                        f"storage unreachable for {now - started:.0f} s ({reason_of(err)})"
                    ) from None
                self._note(f"storage unreachable, retrying ({now - started:.0f} s): {reason_of(err)}", False)
                time.sleep(min(BACKOFF_CAP_S, BACKOFF_S * 2**attempt) * random.uniform(0.5, 1.0))
                attempt += 1
                continue
            if started is not None:
                self.reachable_since = time.monotonic()
                self._note(f"storage reachable again after {self.reachable_since - started:.0f} s", True)
            return result

    def _note(self, message: str, always: bool) -> None:
        now = time.monotonic()
        if self.on_outage is not None and (always or now - self.last_note >= NOTE_EVERY_S):
            self.last_note = now
            self.on_outage(message)


# Every RDBStorage operation that reaches the database, including the private ones through which
# Optuna's cache (_CachedStorage) calls it.
OPERATIONS = (
    "set_study_user_attr",
    "set_study_system_attr",
    "get_study_id_from_name",
    "get_study_name_from_id",
    "get_study_directions",
    "get_study_user_attrs",
    "get_study_system_attrs",
    "get_all_studies",
    "_set_trial_param",
    "get_trial_param",
    "set_trial_state_values",
    "set_trial_intermediate_value",
    "set_trial_user_attr",
    "set_trial_system_attr",
    "get_trial_user_attrs",
    "get_trial_system_attrs",
    "get_trial_id_from_study_id_trial_number",
    "get_trial",
    "_get_trials",
    "_get_best_trial_id",
    "_get_stale_trial_ids",
)


# Which trial each creation made, by a token drawn once per creation: a creation retried after its
# commit went through (the answer lost with the connection) finds its trial instead of adding one.
TOKENS = sqlalchemy.Table(
    "hpo_trial_creations",
    sqlalchemy.MetaData(),
    sqlalchemy.Column("token", sqlalchemy.String(32), primary_key=True),
    sqlalchemy.Column("trial_id", sqlalchemy.Integer, nullable=False),  # a random token outlives no one
)


def begin_immediate(connection: sqlalchemy.engine.Connection) -> None:
    """SQLite: every transaction takes the write lock at its start, so a read-check-write (claiming
    a waiting trial, finishing a running one) is atomic across processes (hpo.storage)."""
    connection.exec_driver_sql("BEGIN IMMEDIATE")


class ResilientStorage(optuna.storages.RDBStorage):
    """An RDBStorage whose operations wait out outages (see the module docstring), and whose
    creations stay single when their acknowledgement is lost. It keeps Optuna's storage contract:
    Optuna's own storage tests run against it (tests/test_storage_contract.py), pickling included;
    with `begin_immediate` (SQLite) every copy's transactions begin IMMEDIATE."""

    def __init__(self, url: str, outage: Outage, begin_immediate: bool = False, **kwargs: Any):
        self.outage, self.begin_immediate = outage, begin_immediate
        self.creation = threading.local()  # the token of the creation this thread is in
        super().__init__(url, **kwargs)
        self._instrument()

    def _instrument(self) -> None:
        if self.begin_immediate and not sqlalchemy.event.contains(self.engine, "begin", begin_immediate):
            sqlalchemy.event.listen(self.engine, "begin", begin_immediate)
        self.outage.call(TOKENS.create, self.engine, checkfirst=True)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        del state["creation"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state["outage"].call(super().__setstate__, state)  # reconnecting waits out an outage too
        self.creation = threading.local()
        self._instrument()

    def create_new_study(self, directions: Any, study_name: str | None = None) -> int:
        """A create retried after its commit went through finds the study it made: the name is
        drawn before the first attempt, and a study of that name after a lost answer is ours (hpo.run
        sets a study up under hpo.storage.setup_lock, so no rival creates it meanwhile)."""
        name = study_name if study_name is not None else f"{DEFAULT_STUDY_NAME_PREFIX}{uuid.uuid4()}"
        plain = optuna.storages.RDBStorage

        def create() -> int:
            try:
                return plain.create_new_study(self, directions, name)
            except optuna.exceptions.DuplicatedStudyError:
                if not self.outage.retried():
                    raise
                return plain.get_study_id_from_name(self, name)

        return self.outage.call(create)

    def _create_new_trial(self, study_id: int, template_trial: Any = None) -> Any:
        """One token per creation, kept across every retry (Optuna's own and the outage's)."""
        self.creation.token = uuid.uuid4().hex
        try:
            return self.outage.call(super()._create_new_trial, study_id, template_trial)
        finally:
            self.creation.token = None

    def _get_prepared_new_trial(self, study_id: int, template_trial: Any, session: orm.Session) -> Any:
        token = getattr(self.creation, "token", None)
        if token is not None:
            made = session.execute(
                sqlalchemy.select(TOKENS.c.trial_id).where(TOKENS.c.token == token)
            ).first()
            if made is not None:  # an earlier attempt of this creation committed
                return session.get(models.TrialModel, made.trial_id)
        trial = super()._get_prepared_new_trial(study_id, template_trial, session)
        if token is not None:
            session.execute(TOKENS.insert().values(token=token, trial_id=trial.trial_id))
        return trial

    def _created_here(self, trial_ids: list[int]) -> list[int]:
        """Those of the trials that a ResilientStorage created (an hpo run's, not a plain Optuna
        user's `study.ask()` on the same database)."""
        if not trial_ids:
            return []
        with self.engine.connect() as conn:
            rows = conn.execute(sqlalchemy.select(TOKENS.c.trial_id).where(TOKENS.c.trial_id.in_(trial_ids)))
            return sorted({row.trial_id for row in rows})

    def delete_study(self, study_id: int) -> None:
        plain = optuna.storages.RDBStorage

        def delete() -> None:
            try:
                plain.delete_study(self, study_id)
            except KeyError:
                if not self.outage.retried():  # gone before we came: Optuna's KeyError stands
                    raise

        self.outage.call(delete)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Any = None) -> bool:
        try:
            return super().set_trial_state_values(trial_id, state, values)
        except optuna.exceptions.UpdateFinishedTrialError:
            if not self.outage.retried():  # another process finished it: Optuna's guard stands
                raise
            stored = self.get_trial(trial_id)  # our own first attempt may have committed it
            if stored.state == state and (values is None or list(stored.values or []) == list(values)):
                return True
            raise

    def record_heartbeat(self, trial_id: int) -> None:
        """Optuna's heartbeat thread waits out an outage like any operation; past the window it
        stays quiet (the process is stopping) instead of dying with a traceback."""
        with contextlib.suppress(StorageUnreachable):
            self.outage.call(super().record_heartbeat, trial_id)

    def beating_trials(self, study_id: int, within_s: float) -> list[int]:
        """Numbers of the study's RUNNING trials whose heartbeat is younger than `within_s`: a
        worker is on them now (the database's clock, as Optuna's own stale check reads it)."""

        def read() -> list[int]:
            with _create_scoped_session(self.scoped_session, True) as session:
                now = (
                    session.execute(sqlalchemy.select(sqlalchemy.func.now()))
                    .scalar_one()
                    .replace(tzinfo=None)
                )
                running = (
                    session.query(models.TrialModel)
                    .options(orm.selectinload(models.TrialModel.heartbeats))
                    .filter(models.TrialModel.state == TrialState.RUNNING)
                    .filter(models.TrialModel.study_id == study_id)
                    .all()
                )
                fresh = timedelta(seconds=within_s)
                return sorted(
                    t.number for t in running if t.heartbeats and now - t.heartbeats[0].heartbeat <= fresh
                )

        return self.outage.call(read)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        """Trials nobody runs, each given its fail_reason while still RUNNING (a failed trial's
        attributes can no longer change): those whose heartbeat stopped, and those that never got
        a worker (a start whose confirmation was lost with the connection: no heartbeat either).
        None right after an outage, when every heartbeat is old."""
        grace = self.grace_period or 2 * (self.heartbeat_interval or 0)
        if time.monotonic() - self.outage.reachable_since < grace + BACKOFF_CAP_S:
            return []
        reasons = {}
        for trial_id in super()._get_stale_trial_ids(study_id):
            trial = super().get_trial(trial_id)
            epoch = max(trial.intermediate_values, default=0)
            who = trial.user_attrs.get(Attr.WORKER, "?")
            reasons[trial_id] = f"worker {who} stopped answering at epoch {epoch}"
        long_ago = datetime.now() - timedelta(seconds=grace + BACKOFF_CAP_S)
        running = super().get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        orphans = [
            t
            for t in running
            if Attr.WORKER not in t.user_attrs and (t.datetime_start or long_ago) < long_ago
        ]
        for trial_id in self._created_here([t._trial_id for t in orphans]):  # others are not ours to fail
            reasons[trial_id] = "no worker took it up (its start was lost with a connection)"
        for trial_id, reason in reasons.items():
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):  # it just finished
                super().set_trial_user_attr(trial_id, Attr.FAIL_REASON, reason)
        return list(reasons)


def _retried(name: str) -> Callable[..., Any]:
    plain = getattr(ResilientStorage, name)

    @functools.wraps(plain)
    def operation(self: ResilientStorage, *args: Any, **kwargs: Any) -> Any:
        return self.outage.call(plain, self, *args, **kwargs)

    return operation


for _name in OPERATIONS:
    setattr(ResilientStorage, _name, _retried(_name))
