"""A PostgreSQL server of a test's own: initdb into a temporary folder, a free loopback port, so
the test can restart it or stop it for a while without touching the machine's own server."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def _binary(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None)
    if found is None:
        raise RuntimeError(f"{name} not found: PostgreSQL's server binaries are needed")
    return found


def _as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root; CI runs as root."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@dataclass
class Server:
    folder: Path
    port: int
    max_connections: int = 100

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def ctl(self, *args: str) -> None:
        command = [_binary("pg_ctl"), "-D", str(self.folder / "data"), "-l", str(self.folder / "log"), "-w"]
        subprocess.run(_as_postgres([*command, *args]), check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.folder}"
        options += f" -c max_connections={self.max_connections}"
        self.ctl("-o", options, "start")

    def stop(self) -> None:
        self.ctl("-m", "fast", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()


@contextlib.contextmanager
def private_server(max_connections: int = 100) -> Iterator[Server]:
    folder = Path(tempfile.mkdtemp(prefix="hpo-pg-", dir="/tmp"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    init = [_binary("initdb"), "-D", str(folder / "data"), "-U", "postgres", "--auth=trust", "-E", "UTF8"]
    subprocess.run(_as_postgres(init), check=True, capture_output=True, timeout=120)
    server = Server(folder, port, max_connections)
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            server.ctl("-m", "immediate", "stop")
        time.sleep(0.2)
        shutil.rmtree(folder, ignore_errors=True)


LOCAL = "postgresql+psycopg://postgres@127.0.0.1:5432"  # the machine's own server (trust auth)


@contextlib.contextmanager
def fresh_database() -> Iterator[str]:
    """A new, empty database on the machine's PostgreSQL for one test (dropped afterwards): tests
    that count every study in their storage cannot share the `test` database."""
    import uuid

    import sqlalchemy

    name = f"hpo_test_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(f"{LOCAL}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield f"{LOCAL}/{name}"
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()
