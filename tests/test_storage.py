"""Processes hammer one study: no "database is locked", no lost or duplicated trials."""

import uuid

import optuna
import pytest

from hpo.storage import counts, masked, open_storage
from hpo.stress import hammer
from maskcls.errors import UserError

POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
# Processes started at one barrier for the races below, as few as still show each race: with its
# fix taken out, four asking at once claimed one waiting trial twice and raced to create the tables
# every time; queueing a study's recipes twice took eight (four showed it in no try of two).
PROCESSES, SETUP_PROCESSES = 4, 8


def check_study(url: str, name: str, expected: int, reports: int) -> None:
    study = optuna.load_study(study_name=name, storage=open_storage(url))
    trials = study.get_trials(deepcopy=False)
    assert counts(study)["complete"] == expected == len(trials)
    assert sorted(t.number for t in trials) == list(range(expected))  # none lost, none duplicated
    assert all(len(t.intermediate_values) == reports for t in trials)


@pytest.mark.slow
def test_writers_hammering_one_sqlite_study_lose_and_lock_nothing(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    result = hammer(url, "stress", processes=4, trials=8, reports=25)
    assert result.errors == []
    check_study(url, "stress", 32, 25)


@pytest.mark.slow
def test_writers_hammering_one_postgresql_study_lose_nothing():
    name = f"stress-{uuid.uuid4().hex[:8]}"
    try:
        result = hammer(POSTGRES, name, processes=4, trials=8, reports=25)
        assert result.errors == []
        check_study(POSTGRES, name, 32, 25)
    finally:
        optuna.delete_study(study_name=name, storage=open_storage(POSTGRES))


def test_sqlite_is_configured_for_many_writers(tmp_path):
    import sqlite3

    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}")
    conn = storage.engine.raw_connection().driver_connection
    assert conn.execute("pragma journal_mode").fetchone()[0] == "wal"
    assert conn.execute("pragma busy_timeout").fetchone()[0] == 60000
    # A transaction holds the write lock from its first statement, a read: another writer must wait.
    with storage.engine.connect() as reader, reader.begin():
        reader.exec_driver_sql("select count(*) from trials")
        other = sqlite3.connect(tmp_path / "s.db", timeout=0, isolation_level=None)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("begin immediate")
        other.close()


def test_unreachable_storage_is_one_clear_error_with_the_password_masked():
    with pytest.raises(UserError) as err:
        open_storage("postgresql+psycopg://alice:s3cret@127.0.0.1:1/nowhere")
    assert "cannot use storage postgresql+psycopg://alice:***@127.0.0.1:1/nowhere" in str(err.value)
    assert "s3cret" not in str(err.value)
    assert masked("mysql+pymysql://bob:pw@db/x") == "mysql+pymysql://bob:***@db/x"
    with pytest.raises(UserError, match="does not parse"):
        open_storage("not a url")


def _open_together(url, barrier, results):
    barrier.wait()
    try:
        open_storage(url)
        results.put("ok")
    except Exception as err:  # reported to the test, which shows it
        results.put(f"{type(err).__name__}: {err}")


def open_at_once(url, processes=PROCESSES):
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_open_together, args=(url, barrier, results)) for _ in range(processes)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    return outcomes


@pytest.mark.slow
def test_processes_create_a_new_sqlite_storage_together(tmp_path):
    assert open_at_once(f"sqlite:///{tmp_path / 'new.db'}") == ["ok"] * PROCESSES


@pytest.mark.slow
def test_processes_create_a_new_postgresql_storage_together():
    from sqlalchemy import create_engine, text

    database = f"race_{uuid.uuid4().hex[:8]}"
    admin = create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {database}"))
    try:
        assert open_at_once(POSTGRES.rsplit("/", 1)[0] + f"/{database}") == ["ok"] * PROCESSES
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE {database} WITH (FORCE)"))
        admin.dispose()


def _ask_together(url, name, barrier, results):
    study = optuna.load_study(study_name=name, storage=open_storage(url))
    barrier.wait()
    try:
        results.put(study.ask().number)
    except Exception as err:  # reported to the test, which shows it
        results.put(f"{type(err).__name__}: {err}")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_waiting_trial_is_claimed_by_one_worker_only(backend, tmp_path):
    """Enqueued trials wait in the storage; workers that ask at the same moment must each get a
    different one (a trial claimed twice runs twice and the second result is refused)."""
    import multiprocessing

    url = f"sqlite:///{tmp_path / 'claim.db'}" if backend == "sqlite" else POSTGRES
    name = f"claim-{uuid.uuid4().hex[:8]}"
    study = optuna.create_study(study_name=name, storage=open_storage(url))
    for i in range(PROCESSES // 2):
        study.enqueue_trial({"x": float(i)})
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(PROCESSES), ctx.Queue()
    procs = [ctx.Process(target=_ask_together, args=(url, name, barrier, results)) for _ in range(PROCESSES)]
    try:
        for p in procs:
            p.start()
        numbers = [results.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=30)
        assert sorted(numbers) == list(range(PROCESSES)), (
            numbers
        )  # the queued ones claimed once each, others new
    finally:
        optuna.delete_study(study_name=name, storage=open_storage(url))


def _set_up_together(url, spec_path, barrier, results):
    from hpo import spec as specs
    from hpo.run import open_study

    spec = specs.load(spec_path)
    storage = open_storage(url)
    barrier.wait()
    try:
        open_study(spec, storage)
        results.put("ok")
    except Exception as err:  # reported to the test, which shows it
        results.put(f"{type(err).__name__}: {err}")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_runs_setting_up_one_study_together_create_it_once_and_queue_its_recipes_once(backend, tmp_path):
    """Optuna's enqueue_trial(skip_if_exists=True) checks, then inserts: without the setup lock,
    runs starting together queue every recipe several times."""
    import multiprocessing

    from helpers import write_spec

    name = f"setup-{uuid.uuid4().hex[:8]}"
    spec = write_spec(tmp_path, tmp_path / "data", name=name)
    url = f"sqlite:///{tmp_path / 'setup.db'}" if backend == "sqlite" else POSTGRES
    open_storage(url)  # the tables exist; their creation race is tested above
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(SETUP_PROCESSES), ctx.Queue()
    procs = [
        ctx.Process(target=_set_up_together, args=(url, str(spec), barrier, results))
        for _ in range(SETUP_PROCESSES)
    ]
    try:
        for p in procs:
            p.start()
        assert [results.get(timeout=120) for _ in procs] == ["ok"] * SETUP_PROCESSES
        for p in procs:
            p.join(timeout=30)
        study = optuna.load_study(study_name=name, storage=open_storage(url))
        assert counts(study)["waiting"] == 2  # the spec's two recipes, once each
    finally:
        optuna.delete_study(study_name=name, storage=open_storage(url))


def _lost_connection() -> Exception:
    from sqlalchemy.exc import OperationalError

    return OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))


def test_an_operation_waits_out_a_lost_connection_and_gives_up_past_the_window(monkeypatch):
    from hpo import outage

    monkeypatch.setattr(outage, "BACKOFF_S", 0.01)
    notes = []
    failures = iter([_lost_connection(), _lost_connection()])

    def flaky():
        err = next(failures, None)
        if err is not None:
            raise err
        return "answer"

    waits = outage.Outage("postgresql+psycopg://u@h/db", window_s=5, on_outage=notes.append)
    assert waits.call(flaky) == "answer"
    assert notes[0].startswith("storage unreachable, retrying (0 s): ")
    assert "server closed the connection" in notes[0]
    assert notes[-1].startswith("storage reachable again after")

    def down():
        raise _lost_connection()

    gone = outage.Outage("postgresql+psycopg://u@h/db", window_s=0.05, on_outage=None)
    with pytest.raises(outage.StorageUnreachable, match="server closed the connection"):
        gone.call(down)
    with pytest.raises(outage.StorageUnreachable):  # at once from now on: the process is stopping
        gone.call(lambda: "never asked")


def test_only_connection_errors_are_waited_out():
    from sqlalchemy.exc import IntegrityError, OperationalError

    from hpo.outage import transient

    assert transient(_lost_connection(), "postgresql")
    wrapped = optuna.exceptions.StorageInternalError("An exception is raised during the commit")
    wrapped.__cause__ = _lost_connection()
    assert transient(wrapped, "postgresql")  # Optuna's misleading wrapper of a failed commit
    assert not transient(IntegrityError("INSERT", {}, Exception("duplicate key")), "postgresql")
    assert not transient(OperationalError("SELECT", {}, Exception("no such table: trials")), "sqlite")
    assert transient(OperationalError("SELECT", {}, Exception("database is locked")), "sqlite")


def test_failing_a_finished_trial_again_is_refused_unless_our_own_retry_committed_it(tmp_path):
    """Two workers that find the same stale trial must not both re-queue it: Optuna relies on the
    second FAIL being refused."""
    from hpo.spec import Heartbeat

    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}", Heartbeat(interval=1, grace=1))
    study = optuna.create_study(storage=storage)
    trial_id = study.ask()._trial_id
    assert storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)


@pytest.mark.slow
def test_a_trial_started_but_never_taken_up_is_failed_and_queued_again(tmp_path):
    """A start whose commit went through but whose answer was lost with the connection leaves a
    RUNNING trial with no worker and no heartbeat, which Optuna's stale check never sees."""
    import time

    from hpo.outage import BACKOFF_CAP_S
    from hpo.spec import Heartbeat

    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}", Heartbeat(interval=1, grace=1, max_retry=2))
    study = optuna.create_study(storage=storage)
    study.enqueue_trial({"x": 1.0})
    orphan = study.ask()  # RUNNING; nobody will ever set its worker or beat for it
    orphan.suggest_float("x", 0, 2)
    optuna.storages.fail_stale_trials(study)
    assert counts(study)["running"] == 1  # not before the grace period (+ one backoff step)
    time.sleep(1 + BACKOFF_CAP_S + 0.5)
    optuna.storages.fail_stale_trials(study)
    failed, retry = study.get_trials()
    assert failed.state == optuna.trial.TrialState.FAIL
    assert failed.user_attrs["fail_reason"].startswith("no worker took it up")
    assert retry.state == optuna.trial.TrialState.WAITING and retry.params == {"x": 1.0}
