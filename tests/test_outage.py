"""Storage outages are weather: a study on a PostgreSQL server of the test's own survives a
restart and a 10 s stop mid-trial with no re-run, and past its outage window the run stops with
one line, leaving nothing behind."""

import time

import optuna
import pytest
from helpers import finish, hpo_run, load, wait_for_running_trial, workers_of, write_spec
from pg import private_server

from hpo.storage import counts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server():
    with private_server() as server:
        yield server


def long_trials(tmp_path, root, name, **heartbeat):
    """3 trials of 6 epochs, none pruned: the outage lands in the middle of training."""
    return write_spec(
        tmp_path,
        root,
        name=name,
        epochs=[6],
        n_trials=3,
        pruner={"name": "none"},
        heartbeat={"interval": 1, "grace": 4, "max_retry": 2, **heartbeat},
    )


def refused(tmp_path) -> list[str]:
    """Lines of the worker logs where a finished trial's result was refused."""
    logs = "\n".join(p.read_text() for p in (tmp_path / "runs").rglob("*.log"))
    return [line for line in logs.splitlines() if "UpdateFinishedTrialError" in line or "Traceback" in line]


def assert_survived(tmp_path, spec, server, name, code, err):
    assert code == 0, err
    study = load(server.url, name)
    now = counts(study)
    assert now["finished"] == 3 and now["running"] == 0 and now["fail"] == 0, now
    assert "Traceback" not in err and refused(tmp_path) == []
    assert workers_of(spec) == {}  # no orphan


@pytest.mark.parametrize("through", ["direct", "proxy"])
def test_a_server_restart_and_a_10_s_stop_mid_trial_cost_nothing(server, small_root, tmp_path, through):
    """Merged: the restart (the connections drop and come back at once) and the stop (longer than
    the grace period, so every heartbeat is stale when it is back) hit one run, in two trials.
    With `--proxy` the workers talk to this host's proxy, and the proxy alone (with hpo.run itself)
    to PostgreSQL: it waits the outages out for them."""
    name = f"outages-{through}"
    spec = long_trials(tmp_path, small_root, name)
    run = hpo_run(
        spec, server.url, "--workers", "2", *(["--proxy"] if through == "proxy" else []), cwd=tmp_path
    )
    first = wait_for_running_trial(server.url, name, min_epoch=1)
    server.restart()
    later = wait_for_running_trial(server.url, name, min_epoch=1, other_than=first.number)
    assert later.number > first.number
    server.stop()
    time.sleep(10)
    server.start()
    code, out, err = finish(run)
    waited = (tmp_path / "runs" / name / "logs" / "proxy.log").read_text() if through == "proxy" else err
    assert "storage unreachable, retrying" in waited and "storage reachable again" in waited
    assert_survived(tmp_path, spec, server, name, code, err)
    assert [t.number for t in load(server.url, name).trials] == [0, 1, 2]  # none lost, none run twice


def test_past_the_outage_window_the_run_stops_with_one_line_and_resumes_later(server, small_root, tmp_path):
    spec = long_trials(tmp_path, small_root, "gone", outage=6)
    run = hpo_run(spec, server.url, "--workers", "2", cwd=tmp_path)
    victim = wait_for_running_trial(server.url, "gone", min_epoch=2)
    server.stop()
    try:
        code, out, err = finish(run, timeout=120)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 1 and len(errors) == 1 and "unreachable" in errors[0], err
        assert "postgres@127.0.0.1" in errors[0] and "Traceback" not in err
        assert workers_of(spec) == {}  # every worker stopped
    finally:
        server.start()
    code, out, err = finish(hpo_run(spec, server.url, "--workers", "2", cwd=tmp_path))
    assert code == 0, err
    study = load(server.url, "gone")
    now = counts(study)
    assert now["finished"] == 3 and now["running"] == 0
    stale = study.trials[victim.number]
    assert stale.state == optuna.trial.TrialState.FAIL
    assert "stopped answering at epoch" in stale.user_attrs["fail_reason"]
    retry = next(t for t in study.trials if t.user_attrs.get("retried_from") == victim.number)
    assert retry.user_attrs["resumed_at_epoch"] >= 2 and "fail_reason" not in retry.user_attrs
