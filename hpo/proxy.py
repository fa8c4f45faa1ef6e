"""A per-host storage proxy: one process holds the host's PostgreSQL connections (at most
CONNECTIONS) and every worker of the host talks to it through Optuna's gRPC storage proxy.

    python -m hpo.proxy --study mask --port 13000      # or: python -m hpo.run --study mask --proxy

Without it each worker process holds its own pool: 128 workers open hundreds of connections, past
PostgreSQL's default max_connections of 100. Optuna's gRPC proxy carries no heartbeats, and our
workers need them (a dead worker's trial is failed and queued again). So here a worker's
heartbeat travels as a trial system attr, BEAT, that the proxy turns into a heartbeat row written
with the database's clock (RDBStorage.record_heartbeat), and the proxy, instead of each worker,
fails and re-queues the study's stale trials every heartbeat interval. Its storage waits out a
PostgreSQL outage as a worker's does (hpo.outage): a restart behind the proxy holds the workers'
calls until the server is back.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import GrpcStorageProxy
from optuna.storages._cached_storage import _CachedStorage
from optuna.storages._heartbeat import BaseHeartbeat

from hpo import spec as specs
from hpo.outage import ResilientStorage
from hpo.protocol import STORAGE_ENV, quiet_experimental
from hpo.spec import Heartbeat
from hpo.storage import open_storage, resolve_url
from maskcls.cli import HelpFormatter, prog, run_main
from maskcls.errors import QUOTE_LIMIT, UserError, mask_secrets

BEAT = "hpo:heartbeat"  # a worker's heartbeat, as the proxy receives it
CONNECTIONS = 2  # the proxy's PostgreSQL connections; hpo.run's own make at most 2 more
THREADS = 16  # requests the proxy serves at once (they queue for the connections)
READY_S = 120  # how long hpo.run waits for its proxy to answer


class BeatRelay(ResilientStorage):
    """The proxy's storage: a worker's BEAT becomes a heartbeat row."""

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        if key == BEAT:
            self.record_heartbeat(trial_id)
            return
        super().set_trial_system_attr(trial_id, key, value)


class Coalesced(_CachedStorage):
    """Optuna's in-process cache of finished trials (what its docs advise for the proxy), whose
    reads of the running and new trials are shared: a read that began after a caller arrived
    serves that caller too. Each caller still sees the database as it was after its call began, as
    with a read of its own, while a burst of workers' reads costs one or two reads, not one each."""

    def __init__(self, backend: ResilientStorage):
        super().__init__(backend)
        self._reading = threading.Lock()
        self._read_began: dict[int, float] = {}  # study id -> when its last completed read began

    def _read_trials_from_remote_storage(self, study_id: int) -> None:
        arrived = time.monotonic()
        with self._reading:
            if self._read_began.get(study_id, -math.inf) >= arrived:
                return
            began = time.monotonic()
            super()._read_trials_from_remote_storage(study_id)
            self._read_began[study_id] = began


class ProxyStorage(GrpcStorageProxy, BaseHeartbeat):
    """A worker's storage through the proxy. Optuna's heartbeat thread beats through it; stale
    trials are the proxy's to find (none here)."""

    def __init__(self, host: str, port: int, interval: int):
        with quiet_experimental():
            super().__init__(host=host, port=port)
        self.interval = interval

    def record_heartbeat(self, trial_id: int) -> None:
        import grpc  # type: ignore[import-untyped]

        with contextlib.suppress(grpc.RpcError, optuna.exceptions.UpdateFinishedTrialError):
            self.set_trial_system_attr(trial_id, BEAT, True)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        return []

    def get_heartbeat_interval(self) -> int:
        return self.interval

    def get_heartbeat_stale_trial_callback(self) -> None:
        return None


def connect(address: str, heartbeat: Heartbeat, wait_s: float = 60) -> ProxyStorage:
    """The worker's storage through the proxy at host:port, once it answers."""
    storage = ProxyStorage(*split(address), interval=heartbeat.interval)
    wait_ready(address, wait_s, storage)
    return storage


def split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"proxy address {address!r}: expected host:port, e.g. 127.0.0.1:13000")
    return host, int(port)


def wait_ready(address: str, wait_s: float, storage: GrpcStorageProxy | None = None) -> None:
    if storage is None:
        with quiet_experimental():
            probe = GrpcStorageProxy(host=split(address)[0], port=split(address)[1])
    else:
        probe = storage
    try:
        probe.wait_server_ready(timeout=wait_s)
    except ConnectionError:
        raise UserError(f"no storage proxy answers at {address} after {wait_s:.0f} s") from None
    finally:
        if storage is None:
            probe.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Child:
    proc: subprocess.Popen
    address: str  # host:port, for the workers (WorkerArgs.proxy)
    log: Path


@contextlib.contextmanager
def started(spec_path: str, url: str, log_path: Path) -> Iterator[Child]:
    """This host's proxy as a child process (`hpo.run --proxy`), on a free local port, answering
    before the block starts and stopped after it; its output goes to `log_path`. The storage URL
    travels in its environment, never on its command line."""
    port = free_port()
    command = [sys.executable, "-m", "hpo.proxy", "--study", spec_path, "--port", str(port)]
    with open(log_path, "a") as log:
        proc = subprocess.Popen(
            command, env={**os.environ, STORAGE_ENV: url}, stdout=log, stderr=subprocess.STDOUT
        )
    child = Child(proc, f"127.0.0.1:{port}", log_path)
    try:
        deadline = time.monotonic() + READY_S
        while True:
            if proc.poll() is not None:
                raise UserError(f"the storage proxy exited with code {proc.returncode}; its log: {log_path}")
            try:
                wait_ready(child.address, 1)
                break
            except UserError:
                if time.monotonic() > deadline:
                    raise UserError(
                        f"the storage proxy did not answer in {READY_S} s; its log: {log_path}"
                    ) from None
        yield child
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        if proc.poll() is None:
            proc.kill()


def reap(storage: optuna.storages.BaseStorage, name: str, every_s: float, stop: threading.Event) -> None:
    """Fail and re-queue the study's stale trials every heartbeat interval, as hpo.worker does
    before each trial when it holds its own storage."""
    while not stop.wait(every_s):
        try:
            study = optuna.load_study(study_name=name, storage=storage)
            with quiet_experimental():
                optuna.storages.fail_stale_trials(study)
        except KeyError:  # not created yet, or deleted
            continue
        except Exception as err:  # the storage gone past its outage window: said, tried again later
            log(f"stale trials not checked: {type(err).__name__}: {mask_secrets(str(err))[:QUOTE_LIMIT]}")


def log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} proxy: {message}", file=sys.stderr, flush=True)


def serve(spec: specs.StudySpec, url: str, host: str, port: int) -> int:
    backend = open_storage(
        url, spec.heartbeat, on_outage=log, wait=True, kind=BeatRelay, pool=(CONNECTIONS, 0)
    )
    storage = Coalesced(backend)
    stop = threading.Event()
    threading.Thread(
        target=reap, args=(storage, spec.name, spec.heartbeat.interval, stop), name="reap", daemon=True
    ).start()
    log(f"serving study {spec.name} at {host}:{port} with {CONNECTIONS} storage connections")
    with quiet_experimental():
        optuna.storages.run_grpc_proxy_server(
            storage, host=host, port=port, thread_pool=ThreadPoolExecutor(max_workers=THREADS)
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog("hpo.proxy"),
        description="A per-host storage proxy: the workers of this host share its few storage "
        "connections (hpo.run --proxy starts one itself).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--study", required=True, help="name in studies/ (e.g. mask, demo) or a spec path")
    parser.add_argument("--storage", help="storage URL (default: $HPO_STORAGE, the spec's)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on: this host only by default")
    parser.add_argument("--port", type=int, default=13000, help="port to listen on")
    args = parser.parse_args(argv)
    spec = specs.load(args.study)
    url = resolve_url(args.storage, spec)
    if url.startswith("sqlite"):
        raise UserError("a storage proxy serves a PostgreSQL or MySQL storage; SQLite needs none")
    return serve(spec, url, args.host, args.port)


if __name__ == "__main__":
    run_main(main)
