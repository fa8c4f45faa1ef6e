"""hpo.proxy, the per-host storage proxy, on the real PostgreSQL: workers' heartbeats reach the
heartbeat table through it, it fails and re-queues a silent worker's trial itself, and it refuses
what it cannot serve in one line. (A PostgreSQL restart behind it: tests/test_outage.py.)"""

import time

import optuna
import pytest
import sqlalchemy
from helpers import write_spec
from pg import fresh_database

from hpo import proxy
from hpo import spec as specs
from hpo.protocol import Attr
from hpo.spec import Heartbeat
from hpo.storage import open_storage
from maskcls.cli import run_main


@pytest.fixture
def served(tmp_path, small_root):
    """`python -m hpo.proxy` serving study "t" (heartbeat every 1 s, 2 s grace) on a fresh
    database, as hpo.run --proxy starts it."""
    spec_path = write_spec(tmp_path, small_root, heartbeat={"interval": 1, "grace": 2, "max_retry": 2})
    spec = specs.load(str(spec_path))
    with fresh_database() as url:
        optuna.create_study(study_name="t", storage=open_storage(url), direction="maximize")
        with proxy.started(str(spec_path), url, tmp_path / "proxy.log") as child:
            yield url, proxy.connect(child.address, spec.heartbeat)


@pytest.mark.slow
def test_heartbeats_reach_the_table_and_a_silent_workers_trial_is_queued_again(served):
    url, storage = served
    study = optuna.load_study(study_name="t", storage=storage)
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    trial.set_user_attr(Attr.WORKER, "elsewhere:1")
    storage.record_heartbeat(trial._trial_id)
    engine = sqlalchemy.create_engine(url)
    with engine.connect() as conn:
        beats = conn.execute(sqlalchemy.text("SELECT trial_id FROM trial_heartbeats")).scalars().all()
    engine.dispose()
    assert beats == [trial._trial_id]
    assert proxy.BEAT not in storage.get_trial(trial._trial_id).system_attrs  # a row, not an attr
    # The worker falls silent: past the grace period (and the proxy's start-up guard of grace + 8 s)
    # the proxy fails the trial and queues its parameters again; workers themselves find nothing.
    assert storage._get_stale_trial_ids(study._study_id) == []
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        states = [t.state for t in study.get_trials(deepcopy=False)]
        if optuna.trial.TrialState.WAITING in states:
            break
        time.sleep(0.5)
    failed, retry = study.get_trials(deepcopy=False)
    assert failed.state == optuna.trial.TrialState.FAIL and retry.state == optuna.trial.TrialState.WAITING
    assert failed.user_attrs[Attr.FAIL_REASON] == "worker elsewhere:1 stopped answering at epoch 0"
    assert retry.params == failed.params and retry.user_attrs[Attr.RETRIED_FROM] == failed.number


def test_reads_that_arrive_together_share_one_read_begun_after_them():
    """The proxy's cache (hpo.proxy.Coalesced): 8 workers asking at once cost 2 reads of the
    database, not 8; a worker asking after a read has begun gets a read of its own."""
    import threading

    class Backend:
        reads = 0

        def _get_trials(self, study_id, states, included_trial_ids, trial_id_greater_than):
            Backend.reads += 1
            time.sleep(0.3)
            return []

    cache = proxy.Coalesced(Backend())
    first = threading.Thread(target=cache._read_trials_from_remote_storage, args=(1,))
    first.start()
    time.sleep(0.1)  # the first read is under way: those arriving now need a later one
    burst = [threading.Thread(target=cache._read_trials_from_remote_storage, args=(1,)) for _ in range(7)]
    for thread in burst:
        thread.start()
    for thread in [first, *burst]:
        thread.join()
    assert Backend.reads == 2
    cache._read_trials_from_remote_storage(1)
    assert Backend.reads == 3


def test_a_proxy_refuses_sqlite_and_an_address_that_is_not_one(tmp_path, small_root, capsys):
    spec = write_spec(tmp_path, small_root)
    with pytest.raises(SystemExit) as end:
        run_main(proxy.main, ["--study", str(spec), "--storage", f"sqlite:///{tmp_path / 's.db'}"])
    assert end.value.code == 2
    assert capsys.readouterr().err == (
        "error: a storage proxy serves a PostgreSQL or MySQL storage; SQLite needs none\n"
    )
    with pytest.raises(SystemExit) as end:
        run_main(lambda argv: proxy.connect("no-port", Heartbeat()) and 0)
    assert end.value.code == 2
    assert "expected host:port" in capsys.readouterr().err


def test_hpo_run_refuses_a_proxy_for_sqlite(tmp_path, small_root, capsys):
    from hpo.run import main

    spec = write_spec(tmp_path, small_root)
    with pytest.raises(SystemExit) as end:
        run_main(main, ["--study", str(spec), "--proxy", "--storage", f"sqlite:///{tmp_path / 's.db'}"])
    assert end.value.code == 2
    assert capsys.readouterr().err == (
        "error: --proxy serves a PostgreSQL or MySQL storage; a SQLite study needs none\n"
    )
    assert not (tmp_path / "s.db").exists()
