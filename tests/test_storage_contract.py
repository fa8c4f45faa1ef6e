"""ResilientStorage keeps Optuna's storage contract: Optuna's own storage tests (the StorageTestCase
that Optuna ships for storage implementations) run against it on SQLite and PostgreSQL, pickling
included; and a write whose commit went through but whose answer was lost with the connection is
retried without being done twice."""

import contextlib
import pickle

import optuna
import pytest
import sqlalchemy
from optuna.distributions import FloatDistribution
from optuna.study import StudyDirection
from optuna.testing.pytest_storages import StorageTestCase
from optuna.trial import TrialState
from pg import fresh_database

from hpo.outage import begin_immediate
from hpo.storage import open_storage


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def database(request, tmp_path_factory):
    """One database per backend for all the contract tests, emptied before each (creating
    Optuna's schema anew for each of them would cost most of their time)."""
    if request.param == "sqlite":
        opened = open_storage(f"sqlite:///{tmp_path_factory.mktemp('contract') / 'contract.db'}")
        yield opened
        opened.engine.dispose()
        return
    with fresh_database() as url:
        opened = open_storage(url)
        yield opened
        opened.engine.dispose()


@pytest.fixture
def storage(database):
    from optuna.storages._rdb import models

    from hpo.outage import TOKENS

    opened = database
    tables = [TOKENS.name, *(t.name for t in reversed(models.BaseModel.metadata.sorted_tables))]
    kept = {"alembic_version", "version_info"}
    with opened.engine.begin() as conn:
        if opened.engine.url.get_backend_name() == "postgresql":
            emptied = ", ".join(t for t in tables if t not in kept)
            conn.exec_driver_sql(f"TRUNCATE {emptied} RESTART IDENTITY CASCADE")
        else:
            for table in (t for t in tables if t not in kept):
                conn.exec_driver_sql(f"DELETE FROM {table}")
    return opened


class TestOptunasStorageContract(StorageTestCase):
    """Every test of optuna.testing.pytest_storages.StorageTestCase, as Optuna runs it on RDBStorage."""

    def test_pickle_storage(self, storage):
        super().test_pickle_storage(storage)
        copy = pickle.loads(pickle.dumps(storage))
        assert copy.outage is not storage.outage and copy.outage.window_s == storage.outage.window_s
        if storage.engine.url.get_backend_name() == "sqlite":  # still one transaction per operation
            assert sqlalchemy.event.contains(copy.engine, "begin", begin_immediate)
        assert copy.create_new_study([StudyDirection.MAXIMIZE], "after pickling") > 0


@contextlib.contextmanager
def answers_lost(storage, times=1):
    """The next `times` commits reach the database and commit there, then the connection drops
    before the answer arrives: the driver raises its own "connection lost" error, as a server
    restart or a network cut between the two would make it."""
    left = [times]
    dialect = storage.engine.dialect
    commit = dialect.do_commit

    def commit_then_lose(dbapi_connection):
        commit(dbapi_connection)
        if left[0] > 0:
            left[0] -= 1
            raise dialect.dbapi.OperationalError("server closed the connection unexpectedly")

    dialect.do_commit = commit_then_lose
    try:
        yield left
    finally:
        del dialect.do_commit  # the class's own again
    assert left[0] == 0, "the fault was never injected"


LR = FloatDistribution(1e-4, 1e-1, log=True)


@pytest.mark.slow
def test_writes_whose_answer_is_lost_are_done_once():
    """On PostgreSQL: a SQLite file has no connection to lose between its commit and its answer."""
    with fresh_database() as url:
        storage = open_storage(url)
        with answers_lost(storage):
            study_id = storage.create_new_study([StudyDirection.MAXIMIZE], "lost")
        with answers_lost(storage):
            unnamed = storage.create_new_study([StudyDirection.MAXIMIZE])
        assert sorted(s.study_name for s in storage.get_all_studies())[0] == "lost"
        assert len(storage.get_all_studies()) == 2
        storage.delete_study(unnamed)
        with answers_lost(storage):
            trial_id = storage.create_new_trial(study_id)
        template = optuna.trial.create_trial(
            state=TrialState.WAITING, params={"lr": 0.01}, distributions={"lr": LR}
        )
        with answers_lost(storage, times=2):  # Optuna's own retry of a creation, then ours
            waiting_id = storage.create_new_trial(study_id, template)
        with answers_lost(storage):
            storage.set_trial_param(trial_id, "lr", LR.to_internal_repr(0.003), LR)
        with answers_lost(storage):
            storage.set_trial_intermediate_value(trial_id, 1, 0.25)
        with answers_lost(storage):
            storage.set_trial_user_attr(trial_id, "worker", "host:1")
        with answers_lost(storage):
            storage.set_trial_system_attr(trial_id, "key", "value")
        with answers_lost(storage):
            storage.set_study_user_attr(study_id, "note", "x")
        with answers_lost(storage):
            assert storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [0.5])
        trials = storage.get_all_trials(study_id)
        assert [t.number for t in trials] == [0, 1]  # one trial per creation, no duplicate
        done = storage.get_trial(trial_id)
        assert (done.state, done.values, done.params) == (TrialState.COMPLETE, [0.5], {"lr": 0.003})
        assert done.intermediate_values == {1: 0.25} and done.user_attrs == {"worker": "host:1"}
        assert done.system_attrs == {"key": "value"}
        assert storage.get_trial(waiting_id).state == TrialState.WAITING
        assert storage.get_study_user_attrs(study_id) == {"note": "x"}
        with answers_lost(storage):
            storage.delete_study(study_id)
        assert [s.study_name for s in storage.get_all_studies()] == []
        storage.engine.dispose()


@pytest.mark.slow
def test_a_trial_started_outside_hpo_is_left_alone_by_the_heartbeat_rule(tmp_path, monkeypatch):
    """Optuna leaves a RUNNING trial without a heartbeat alone; so do we, unless one of our own
    storages made it (a start whose answer was lost: no worker took it up)."""
    import time

    from hpo.spec import Heartbeat

    monkeypatch.setattr("hpo.outage.BACKOFF_CAP_S", 0.0)  # the rule's wait: grace + one backoff step

    url = f"sqlite:///{tmp_path / 'h.db'}"
    plain = optuna.storages.RDBStorage(url)
    theirs = optuna.create_study(study_name="s", storage=plain).ask().number
    ours_storage = open_storage(url, Heartbeat(interval=1, grace=1))
    ours = optuna.load_study(study_name="s", storage=ours_storage)
    mine = ours.ask().number  # no heartbeat thread, no worker attr: as if its start was lost
    study_id = ours._study_id
    time.sleep(1.5)
    stale = ours_storage._get_stale_trial_ids(study_id)
    numbers = {ours_storage.get_trial(t).number for t in stale}
    assert numbers == {mine} and theirs not in numbers
