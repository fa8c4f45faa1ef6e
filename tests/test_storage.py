"""8 processes hammer one study: no "database is locked", no lost or duplicated trials."""

import uuid

import optuna
import pytest

from hpo.storage import counts, masked, open_storage
from hpo.stress import hammer
from maskcls.errors import UserError

POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def check_study(url: str, name: str, expected: int, reports: int) -> None:
    study = optuna.load_study(study_name=name, storage=open_storage(url))
    trials = study.get_trials(deepcopy=False)
    assert counts(study)["complete"] == expected == len(trials)
    assert sorted(t.number for t in trials) == list(range(expected))  # none lost, none duplicated
    assert all(len(t.intermediate_values) == reports for t in trials)


def test_eight_processes_on_one_sqlite_study(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    result = hammer(url, "stress", processes=8, trials=8, reports=25)
    assert result.errors == []
    check_study(url, "stress", 64, 25)


def test_eight_processes_on_one_postgresql_study():
    name = f"stress-{uuid.uuid4().hex[:8]}"
    try:
        result = hammer(POSTGRES, name, processes=8, trials=8, reports=25)
        assert result.errors == []
        check_study(POSTGRES, name, 64, 25)
    finally:
        optuna.delete_study(study_name=name, storage=open_storage(POSTGRES))


def test_sqlite_is_configured_for_many_writers(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}")
    conn = storage.engine.raw_connection().driver_connection
    assert conn.isolation_level == "IMMEDIATE"
    assert conn.execute("pragma journal_mode").fetchone()[0] == "wal"
    assert conn.execute("pragma busy_timeout").fetchone()[0] == 60000


def test_unreachable_storage_is_one_clear_error_with_the_password_masked():
    with pytest.raises(UserError) as err:
        open_storage("postgresql+psycopg://alice:s3cret@127.0.0.1:1/nowhere")
    assert "cannot use storage postgresql+psycopg://alice:***@127.0.0.1:1/nowhere" in str(err.value)
    assert "s3cret" not in str(err.value)
    assert masked("mysql+pymysql://bob:pw@db/x") == "mysql+pymysql://bob:***@db/x"
    with pytest.raises(UserError, match="does not parse"):
        open_storage("not a url")
