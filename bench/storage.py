"""Finished trials per second with 1, 2, 4 and 8 worker processes, side by side in one run:
SQLite as hpo.storage configures it, SQLite with Optuna's defaults, and PostgreSQL.

Fake trials (no training; `--reports` intermediate values each) make the storage the bottleneck.

    python bench/storage.py [--trials 15] [--reports 20] [--postgres URL]
"""

from __future__ import annotations

import argparse
import tempfile
import uuid
from pathlib import Path

import optuna

from hpo.storage import open_storage
from hpo.stress import hammer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=15, help="fake trials per process")
    parser.add_argument("--reports", type=int, default=20, help="intermediate values per trial")
    parser.add_argument("--workers", default="1,2,4,8")
    parser.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    counts = [int(n) for n in args.workers.split(",")]
    backends = {
        "SQLite, ours (WAL, busy timeout, IMMEDIATE)": lambda n: (f"sqlite:///{work / f'ours-{n}.db'}", True),
        "SQLite, Optuna defaults": lambda n: (f"sqlite:///{work / f'default-{n}.db'}", False),
        "PostgreSQL": lambda n: (args.postgres, True),
    }
    print(
        f"{args.trials} fake trials per process, {args.reports} reports each; finished trials/s "
        "(errors in brackets)"
    )
    print(f"{'storage':46s}" + "".join(f"{f'{n} workers':>16s}" for n in counts))
    for label, make in backends.items():
        cells = []
        for n in counts:
            url, tuned = make(n)
            name = f"bench-{uuid.uuid4().hex[:8]}"
            result = hammer(url, name, processes=n, trials=args.trials, reports=args.reports, tuned=tuned)
            rate = n * args.trials / result.seconds
            cells.append(f"{rate:8.1f}" + (f" [{len(result.errors)}]" if result.errors else "     "))
            if url.startswith("postgresql"):
                optuna.delete_study(study_name=name, storage=open_storage(url))
        print(f"{label:46s}" + "".join(f"{c:>16s}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
