"""`python -m hpo.dashboard --study NAME [--port P]`: optuna-dashboard for a study, on 127.0.0.1.

Serves the study's storage and artifact store (learning curves, confusion matrices, configs). The
plain CLI works too: `optuna-dashboard sqlite:///runs/demo/study.db --artifact-dir runs/demo/artifacts`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import optuna
import optuna_dashboard
from optuna.artifacts import FileSystemArtifactStore

from hpo import spec as specs
from hpo.protocol import artifacts_dir
from hpo.storage import masked, open_storage, resolve_url
from maskcls.cli import HelpFormatter, prog, run_main
from maskcls.errors import UserError


def cached(storage: optuna.storages.BaseStorage) -> optuna.storages.BaseStorage:
    """The storage behind Optuna's in-process trial cache, as optuna-dashboard's own CLI opens a URL:
    handed a bare RDBStorage, the dashboard reads every trial again each time its 10 s cache
    expires (at 10,000 trials, seconds per page refresh: docs/BENCHMARKS.md)."""
    return optuna.storages.get_storage(storage)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog("hpo.dashboard"), description=__doc__.split("\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument("--study", required=True, help="name in studies/ or a spec path")
    parser.add_argument("--storage", help="storage URL (default: as hpo.run resolves it)")
    parser.add_argument("--artifacts", help="artifact directory (default runs/<study>/artifacts)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8080, help="port to serve on")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = specs.load(args.study)
    url = resolve_url(args.storage, spec)
    storage = open_storage(url, existing=True)
    artifacts = artifacts_dir(args.artifacts, spec.runs_dir)
    if not artifacts.is_dir():
        raise UserError(
            f"artifact directory {artifacts} not found (run the study first, or pass --artifacts)"
        )
    print(
        f"optuna-dashboard for {masked(url)} on http://{args.host}:{args.port}/ (Ctrl-C stops it)",
        file=sys.stderr,
    )
    try:
        optuna_dashboard.run_server(
            cached(storage),
            host=args.host,
            port=args.port,
            artifact_store=FileSystemArtifactStore(str(artifacts)),
        )
    except OSError as err:  # the address is taken or cannot be bound
        raise UserError(
            f"cannot serve on {args.host}:{args.port}: {err.strerror}; choose another --port"
        ) from None
    return 0


if __name__ == "__main__":
    run_main(main)
