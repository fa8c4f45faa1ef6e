"""optuna-dashboard for the slim image (docker build --target dashboard), which holds
optuna-dashboard and the PostgreSQL driver but neither PyTorch nor this project.

The storage URL is read from $HPO_STORAGE, never from the command line: optuna-dashboard's own CLI
takes it only as an argument, and a process's arguments are readable by every user of the machine
(/proc/<pid>/cmdline) while its environment is not. Artifacts (learning curves, confusion
matrices, exports) from $HPO_ARTIFACTS. A restarted database costs no failed page (pool_pre_ping).

    HPO_STORAGE=postgresql+psycopg://... HPO_ARTIFACTS=/shared/artifacts python dashboard.py --host 0.0.0.0
"""

import argparse
import os
import sys

import optuna
import optuna_dashboard
from optuna.artifacts import FileSystemArtifactStore


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8080, help="port (default: %(default)s)")
    args = parser.parse_args()
    url = os.environ.get("HPO_STORAGE")
    if not url:
        print("error: set HPO_STORAGE to the study's storage URL", file=sys.stderr)
        return 2
    pool = {"pool_pre_ping": True} if not url.startswith("sqlite") else {}
    try:
        storage = optuna.storages.RDBStorage(url, engine_kwargs=pool)
    except Exception as err:  # a wrong URL or an unreachable database: one line, no URL in it
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"error: cannot open the storage in $HPO_STORAGE: {first}", file=sys.stderr)
        return 2
    folder = os.environ.get("HPO_ARTIFACTS")
    artifacts = None
    if folder:
        os.makedirs(folder, exist_ok=True)  # before the first trial makes it
        artifacts = FileSystemArtifactStore(folder)
    # Behind Optuna's trial cache, as optuna-dashboard's own CLI opens a URL (hpo.dashboard.cached).
    served = optuna.storages.get_storage(storage)
    optuna_dashboard.run_server(served, host=args.host, port=args.port, artifact_store=artifacts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
