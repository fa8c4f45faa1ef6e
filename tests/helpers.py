"""Helpers for tests that run the search service in real processes."""

import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import optuna
import yaml

from hpo.storage import open_storage

# Trials of 1 epoch complete; trials of more epochs are pruned at epoch 2 by the threshold pruner.
# So every study below holds both states, deterministically.
EPOCH_CHOICES = [1, 3]


def write_spec(tmp_path, root, name="t", epochs=EPOCH_CHOICES, **extra):
    spec = {
        "study": name,
        "data": {"root": str(root)},
        "n_trials": 5,
        "fixed": {
            "model.name": "mobilenetv3_small_050",
            "data.image_size": [32, 24],
            "train.batch_size": 16,
            "data.val_ratio": 0.3,
            "data.cache_dir": str(tmp_path / "cache"),
        },
        "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 2},
        "pruner": {"name": "threshold", "lower": 1.01, "n_warmup_steps": 2},
        "space": {
            "optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
            "train.epochs": {"type": "categorical", "choices": epochs},
        },
        "enqueue": [
            {"train.epochs": epochs[0], "optim.lr": 3e-3},
            {"train.epochs": epochs[-1], "optim.lr": 3e-3},
        ],
        "heartbeat": {"interval": 1, "grace": 4, "max_retry": 2},
        **extra,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _interruptible():
    """In the child before exec: Ctrl-C (SIGINT) as a terminal gives it. A suite started as a
    background job of a non-interactive shell runs with SIGINT ignored, and Python keeps an ignored
    SIGINT ignored, so hpo.run would never see the tests' Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def hpo_run(spec, storage, *args, **popen):
    command = [
        sys.executable,
        "-m",
        "hpo.run",
        "--study",
        str(spec),
        "--storage",
        storage,
        "--no-progress",
        *args,
    ]
    popen.setdefault("preexec_fn", _interruptible)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def recipe_of(trial, spec, artifacts=None, storage=None) -> dict:
    """The trial's whole config as hpo.export-best reads it: its config.json artifact in
    `artifacts`, else the spec with its parameters (hpo.record.config_of)."""
    from optuna.artifacts import FileSystemArtifactStore

    from hpo import spec as specs
    from hpo.record import config_of

    store = FileSystemArtifactStore(str(artifacts)) if artifacts is not None else None
    return config_of(trial, specs.load(str(spec)).base, store, storage).to_dict()


@functools.cache
def storage_at(url):
    """One storage (one connection pool) per URL for the whole test session: tests poll a study
    many times, and a pool per poll would exhaust a server's connections."""
    return open_storage(url)


def load(storage, name="t"):
    return optuna.load_study(study_name=name, storage=storage_at(storage))


def wait_for_running_trial(
    storage, name="t", min_epoch=1, timeout=120, poll_s=0.3, other_than=None, resumed=False
):
    """The first RUNNING trial (but trial `other_than`) that has reported at least `min_epoch` epochs
    (with `resumed`: one that has gone on from its predecessor's checkpoint)."""
    end = time.time() + timeout
    while time.time() < end:
        try:
            running = load(storage, name).get_trials(states=(optuna.trial.TrialState.RUNNING,))
        except KeyError:
            running = []
        for trial in running:
            if trial.number == other_than:
                continue
            if resumed and "resumed_at_epoch" not in trial.user_attrs:
                continue
            if len(trial.intermediate_values) >= min_epoch and "worker" in trial.user_attrs:
                return trial
        time.sleep(poll_s)
    raise AssertionError("no trial reached the expected epoch in time")


def system_tool(name: str, package: str) -> str:
    """Path of a command from the system's packages. Tests install nothing: `make system-tools`
    (which .ci/run calls) installs it. Where it is missing, CI fails and elsewhere the test skips,
    saying how to get it."""
    import shutil

    import pytest

    found = shutil.which(name)
    if found is None:
        message = f"{name} is missing: `make system-tools` installs it (Debian package {package})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


@contextlib.contextmanager
def dashboard_server(spec, storage, artifacts, cwd, plain=False):
    """`hpo.dashboard` (or, with `plain`, the `optuna-dashboard` CLI) on a free loopback port;
    yields its base URL and the /api/studies answer."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    if plain:
        tool = os.path.join(os.path.dirname(sys.executable), "optuna-dashboard")
        command = [
            tool,
            storage,
            "--artifact-dir",
            str(artifacts),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
    else:
        command = [
            sys.executable,
            "-m",
            "hpo.dashboard",
            "--study",
            str(spec),
            "--storage",
            storage,
            "--artifacts",
            str(artifacts),
            "--port",
            str(port),
        ]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=cwd)
    base = f"http://127.0.0.1:{port}"
    try:
        yield base, _first_answer(server, f"{base}/api/studies")  # the test body's errors pass through
    finally:
        server.terminate()
        server.wait(timeout=10)


def _first_answer(server, url):
    """The server's first JSON answer: only start-up (connection refused, a slow first reply) is retried."""
    for _ in range(150):
        try:
            return json.load(urllib.request.urlopen(url, timeout=2))
        except OSError:
            if server.poll() is not None:
                raise AssertionError(f"the dashboard exited: {server.stderr.read()}") from None
            time.sleep(0.2)
    raise AssertionError("the dashboard did not answer in 30 s")


def command_lines(containing: str) -> dict[int, str]:
    """pid -> command line of every live process whose command line holds `containing`."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as file:
                line = file.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # it ended meanwhile
            continue
        if containing in line:
            found[int(entry)] = line
    return found


def workers_of(spec) -> dict[int, str]:
    return {pid: line for pid, line in command_lines(str(spec)).items() if "hpo.worker" in line}
