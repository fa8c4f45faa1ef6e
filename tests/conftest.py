"""Shared stand-in data sets, generated once per test session at small image sizes; one core for
each pytest-xdist worker."""

from __future__ import annotations

import os


def _one_core_per_worker() -> None:
    """pyproject.toml runs the suite in 2 pytest-xdist workers. Each keeps to a core of its own, and
    so does every process its tests start: torch's default threads and `owned_cores()` follow the
    affinity, so the two never compete for a core, and a test times what a process on one core does
    whatever the other worker runs. Set before numpy or torch is imported."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ...
    if worker and hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[int(worker.removeprefix("gw")) % len(cores)]})


_one_core_per_worker()

import pytest  # noqa: E402
from helpers import finish, hpo_run, write_spec  # noqa: E402

from maskcls.data.synth import generate  # noqa: E402


@pytest.fixture(scope="session")
def standin300(tmp_path_factory):
    """The acceptance-sized stand-in: 300 people, small images, a small eval set."""
    return generate(
        tmp_path_factory.mktemp("data") / "s300",
        people=300,
        eval_people=20,
        seed=0,
        size=(48, 64),
        workers=2,
        progress=False,
    )


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """A few people, for layout tests that copy and then break the data."""
    return generate(
        tmp_path_factory.mktemp("data") / "tiny",
        people=6,
        eval_people=2,
        seed=1,
        size=(32, 32),
        workers=1,
        progress=False,
    )


@pytest.fixture(scope="session")
def small_root(tmp_path_factory):
    """24 people: enough for a person-level split, small enough to train on in a second."""
    return generate(
        tmp_path_factory.mktemp("data") / "small",
        people=24,
        eval_people=3,
        seed=2,
        size=(48, 64),
        workers=2,
        progress=False,
    )


@pytest.fixture
def tiny_cfg(small_root, tmp_path):
    """A config that trains a tiny model for one epoch in about a second on the CPU."""
    from maskcls.config import load

    return load(
        None,
        {
            "data.root": str(small_root),
            "data.image_size": [32, 24],
            "data.cache_dir": str(tmp_path / "cache"),
            "data.val_ratio": 0.3,
            "model.name": "mobilenetv3_small_050",
            "train.epochs": 1,
            "train.batch_size": 16,
            "train.workers": 0,
            "optim.lr": 3e-3,
        },
    )


@pytest.fixture(scope="session")
def finished_study(small_root, tmp_path_factory):
    """A 5-trial study run by `hpo.run` with 2 workers on SQLite."""
    tmp = tmp_path_factory.mktemp("run")
    spec = write_spec(tmp, small_root)
    storage = f"sqlite:///{tmp / 'study.db'}"
    code, out, err = finish(
        hpo_run(spec, storage, "--workers", "2", "--artifacts", str(tmp / "artifacts"), cwd=tmp)
    )
    assert code == 0, err
    return tmp, spec, storage, out


SUMMARY_LINES: list[str] = []  # shown after the run, also for passing tests (CI logs)
SUMMARY = "summary line"  # the report's user property that carries one (from an xdist worker too)


@pytest.fixture
def summary_line(request):
    return lambda line: request.node.user_properties.append((SUMMARY, line))


_FILE_SECONDS: dict[str, float] = {}


def pytest_runtest_logreport(report):
    """Setup, call and teardown of every test, summed per file for the summary below, and the
    summary lines a test left."""
    path = report.nodeid.split("::")[0]
    _FILE_SECONDS[path] = _FILE_SECONDS.get(path, 0.0) + report.duration
    if report.when == "teardown":
        SUMMARY_LINES.extend(value for name, value in report.user_properties if name == SUMMARY)


def pytest_terminal_summary(terminalreporter):
    """The summary lines tests left, then the ten slowest test files: where the suite's time goes."""
    for line in SUMMARY_LINES:
        terminalreporter.write_line(line)
    if not _FILE_SECONDS:
        return
    terminalreporter.write_sep("=", "slowest files (setup + call + teardown)")
    for path, seconds in sorted(_FILE_SECONDS.items(), key=lambda kv: -kv[1])[:10]:
        terminalreporter.write_line(f"{seconds:8.1f}s {path}")
