"""`python -m maskcls.data.check --data ROOT`: is this folder a usable competition data set?

Prints the people, images and per-class counts, then every problem found. Exit 0 when clean,
2 otherwise. Decoding every image catches truncated or non-image files that a layout scan misses.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

from maskcls.cli import HelpFormatter, prog, run_main
from maskcls.data import cache
from maskcls.data.faces import Crop
from maskcls.data.layout import read_layout
from maskcls.data.photo import UNDECODABLE, decodes
from maskcls.errors import DataError, UserError
from maskcls.labels import NUM_CLASSES, AgeCutoffs, class_name
from maskcls.progress import bar


def undecodable(paths: Iterable[str], workers: int = 4, progress: bool = True) -> list[str]:
    """A problem line for every file PIL cannot fully decode. Threads suffice: decoding frees the GIL."""
    paths = list(paths)

    def problem(path: str) -> str | None:
        try:
            decodes(path)
        except UNDECODABLE as err:
            return f"{path}: not a decodable image ({err})"
        return None

    with ThreadPoolExecutor(workers) as pool:
        found = bar(pool.map(problem, paths), total=len(paths), desc="decode", unit="img", enabled=progress)
        return [p for p in found if p]


def verify_decodable(paths: Sequence[str], cache_dir: str | Path, progress: bool = True) -> None:
    """DataError naming every image that does not decode; checked once per set of files (a marker
    in the cache folder keyed by their names, sizes and times), so a re-run pays only the stats."""
    paths = [p for p in paths if os.path.isfile(p) and os.path.getsize(p)]  # the layout names the rest
    marker = Path(cache_dir) / f"decodable-{cache.fingerprint(paths, (0, 0), Crop())}"
    if marker.exists():
        return
    problems = undecodable(paths, progress=progress)
    if problems:
        raise DataError(problems)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()


def check(
    root: str,
    corrections: str | None = None,
    cutoffs: AgeCutoffs = AgeCutoffs(),
    decode: bool = True,
    progress: bool = True,
) -> pd.DataFrame:
    """The training table, or DataError carrying every problem (layout and decoding)."""
    found = read_layout(root, corrections, cutoffs)
    problems = list(found.problems)
    if decode:
        paths = list(found.train["path"]) + (list(found.eval["path"]) if found.eval is not None else [])
        files = [p for p in paths if os.path.isfile(p)]
        problems += undecodable(files, progress=progress) if files else []
    if problems:
        raise DataError(problems)
    return found.train


def summary(train: pd.DataFrame, cutoffs: AgeCutoffs) -> str:
    people = train.groupby("person").first()
    counts = train["label"].value_counts().reindex(range(NUM_CLASSES), fill_value=0)
    lines = [
        f"people: {len(people)} ({(people['gender'] == 1).mean():.1%} female), images: {len(train)}",
        f"ages: {people['age'].min()}-{people['age'].max()}; per age band: "
        + ", ".join(f"{n}" for n in people["age_band"].value_counts().sort_index()),
        "images per class:",
    ]
    lines += [f"  {c:2d} {class_name(c, cutoffs):24s} {n:6d}" for c, n in counts.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog("maskcls.data.check"), description=__doc__.split("\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument("--data", help="data root holding train/ (and eval/)")
    parser.add_argument("root", nargs="?", help=argparse.SUPPRESS)  # the data root, as it was first given
    parser.add_argument("--corrections", help="label-corrections CSV (id, field, value)")
    parser.add_argument("--old-age", type=int, default=60, help="age at which the oldest band starts")
    parser.add_argument("--no-decode", action="store_true", help="check the layout only (fast)")
    args = parser.parse_args(argv)
    root = args.data or args.root
    if not root:
        raise UserError("give the data root: --data DIR")
    cutoffs = AgeCutoffs(old=args.old_age)
    try:
        train = check(root, args.corrections, cutoffs, decode=not args.no_decode)
    except DataError as err:
        for problem in err.problems:
            print(f"problem: {problem}")
        print(f"{len(err.problems)} problem(s) found in {root}")
        return 2
    print(summary(train, cutoffs))
    print("no problems found")
    return 0


if __name__ == "__main__":
    run_main(main)
