"""Where a study spec named on the command line (`--study demo`) is found, for every command.

In this order: a path to a YAML file; `$HPO_STUDIES/<name>.yaml`, a folder of the user's own
specs; the specs shipped with the package (`demo`, `mask`: the repository's studies/, installed as
the package data of `hpo.specs`), found through importlib.resources, so that an installed wheel
resolves them from any working folder. maskcls reads them only for `maskcls.weights fetch --study`.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

SPECS_ENV = "HPO_STUDIES"  # a folder of the user's own specs, looked up by name first
SHIPPED = "hpo.specs"


def shipped_dir() -> Path | None:
    """The folder of the shipped specs (on disk: installed or in a checkout), None if not installed."""
    try:
        folder = importlib.resources.files(SHIPPED)
    except ModuleNotFoundError:
        return None
    return Path(str(folder))


def folders() -> list[Path]:
    """Where names are looked up, in order."""
    own = os.environ.get(SPECS_ENV)
    return [p for p in (Path(own).expanduser() if own else None, shipped_dir()) if p is not None]


def available() -> list[str]:
    return sorted({p.stem for folder in folders() if folder.is_dir() for p in folder.glob("*.yaml")})


def find(name_or_path: str) -> Path | None:
    """The spec file for a path or a name, or None when neither exists."""
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or path.is_file():
        return path if path.is_file() else None
    return next(
        (f / f"{name_or_path}.yaml" for f in folders() if (f / f"{name_or_path}.yaml").is_file()), None
    )


def is_shipped(path: Path) -> bool:
    """Whether `path` is one of the specs shipped with the package (named, not pathed, in commands)."""
    folder = shipped_dir()
    return folder is not None and path.resolve().parent == folder.resolve()
