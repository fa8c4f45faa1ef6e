"""Read the competition's folder layout into tables; never modify the data.

```
<root>/train/train.csv            id, gender, race, age, path
<root>/train/images/<path>/       mask1..mask5, incorrect_mask, normal (.jpg/.jpeg/.png)
<root>/eval/info.csv              ImageID, ans
<root>/eval/images/<ImageID>
```
Files are matched by stem because extensions vary; names starting with "." (macOS `._` files,
`.ipynb_checkpoints`) are skipped. Ids stay strings (`001498-1`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from maskcls.errors import DataError
from maskcls.labels import GENDERS, MASK_STEMS, AgeCutoffs, Mask, age_band, encode

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
TRAIN_COLUMNS = ("id", "gender", "race", "age", "path")
EVAL_COLUMNS = ("ImageID", "ans")
CORRECTION_FIELDS = ("gender", "age", "race", *MASK_STEMS)
MASK_VALUES = {m.name.lower(): m for m in Mask}


@dataclass(frozen=True)
class Layout:
    """What a scan found: one row per training image, the eval rows in file order, the problems."""

    train: pd.DataFrame
    eval: pd.DataFrame | None
    problems: list[str]


def scan(
    root: str | Path, corrections: str | Path | None = None, cutoffs: AgeCutoffs = AgeCutoffs()
) -> pd.DataFrame:
    """One row per training image with columns path, person, gender, race, age, mask, stem,
    age_band, label. Raises DataError listing every layout problem found."""
    found = read_layout(root, corrections, cutoffs)
    if found.problems:
        raise DataError(found.problems)
    return found.train


def scan_eval(root: str | Path) -> pd.DataFrame:
    """The eval images in `info.csv` row order (the submission order): ImageID, path."""
    found = read_layout(root)
    if found.problems:
        raise DataError(found.problems)
    if found.eval is None:
        raise DataError([f"{Path(root) / 'eval'}: no eval set (expected eval/info.csv and eval/images)"])
    return found.eval


def all_photos(root: str | Path) -> list[str]:
    """Every train and eval photo of a data root (DataError for a broken layout)."""
    found = read_layout(root)
    if found.problems:
        raise DataError(found.problems)
    return [*found.train["path"], *(found.eval["path"] if found.eval is not None else [])]


def read_layout(
    root: str | Path, corrections: str | Path | None = None, cutoffs: AgeCutoffs = AgeCutoffs()
) -> Layout:
    """Read everything and collect problems instead of stopping at the first one."""
    root = Path(root).expanduser().resolve()
    problems: list[str] = []
    empty = pd.DataFrame(columns=["path", "person", "gender", "race", "age", "mask", "stem", "label"])
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        return Layout(empty, None, [f"{root}: data root {what} (pass the folder holding train/)"])
    train = _read_train(root / "train", problems)
    if train is not None and corrections is not None:
        train = _apply_corrections(train, Path(corrections), problems)
    if train is not None:
        train["age_band"] = age_band(train["age"].to_numpy(), cutoffs)
        train["label"] = encode(train["mask"], train["gender"], train["age_band"])
    evals = _read_eval(root / "eval", problems) if (root / "eval").exists() else None
    return Layout(train if train is not None else empty, evals, problems)


def _read_csv(path: Path, columns: tuple[str, ...], problems: list[str]) -> pd.DataFrame | None:
    if not path.is_file():
        problems.append(f"{path}: missing")
        return None
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        problems.append(f"{path}: not a readable CSV ({str(err).strip()})")
        return None
    missing = [c for c in columns if c not in table.columns]
    if missing:
        problems.append(f"{path}: missing columns {missing} (expected {list(columns)})")
        return None
    return table


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _parse_folder(name: str) -> tuple[str, str, str, str] | None:
    """`<id>_<gender>_<race>_<age>`; the race may itself hold underscores."""
    parts = name.split("_")
    if len(parts) < 4 or not parts[0]:
        return None
    return parts[0], parts[1], "_".join(parts[2:-1]), parts[-1]


def _read_train(train_dir: Path, problems: list[str]) -> pd.DataFrame | None:
    if not train_dir.is_dir():
        problems.append(f"{train_dir}: missing (expected train/train.csv and train/images/)")
        return None
    images_dir = train_dir / "images"
    if not images_dir.is_dir():
        problems.append(f"{images_dir}: missing")
    table = _read_csv(train_dir / "train.csv", TRAIN_COLUMNS, problems)
    if table is None or not images_dir.is_dir():
        return None

    folders = {p.name: p for p in _visible(images_dir) if p.is_dir()}
    for name in sorted(set(folders) - set(table["path"])):
        problems.append(f"{images_dir / name}: folder has no row in train.csv")
    for name, count in table["path"].value_counts().items():
        if count > 1:
            problems.append(f"train.csv: path {name!r} appears in {count} rows")

    rows = []
    for line, person in enumerate(table.itertuples(index=False), start=2):
        where = f"train.csv line {line} ({person.path})"
        parsed = _parse_folder(person.path)
        if parsed is None:
            problems.append(f"{where}: folder name does not parse as <id>_<gender>_<race>_<age>")
            continue
        if parsed != (person.id, person.gender, person.race, person.age):
            problems.append(
                f"{where}: row values {person.id},{person.gender},{person.race},"
                f"{person.age} disagree with the folder name"
            )
            continue
        if person.gender not in GENDERS:
            problems.append(f"{where}: unknown gender {person.gender!r} (expected {sorted(GENDERS)})")
            continue
        if not person.age.isdigit():
            problems.append(f"{where}: age {person.age!r} is not a whole number")
            continue
        folder = folders.get(person.path)
        if folder is None:
            problems.append(f"{where}: no folder {images_dir / person.path}")
            continue
        for stem, path in _person_images(folder, problems).items():
            rows.append(
                {
                    "path": str(path),
                    "person": person.id,
                    "gender": int(GENDERS[person.gender]),
                    "race": person.race,
                    "age": int(person.age),
                    "mask": int(MASK_STEMS[stem]),
                    "stem": stem,
                }
            )
    return pd.DataFrame(rows, columns=["path", "person", "gender", "race", "age", "mask", "stem"])


def _person_images(folder: Path, problems: list[str]) -> dict[str, Path]:
    """The seven photos of a person by stem; reports missing, duplicated and unexpected files."""
    by_stem: dict[str, list[Path]] = {}
    empty_files = set()
    for path in _visible(folder):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and path.stem in MASK_STEMS:
            by_stem.setdefault(path.stem, []).append(path)
            if path.stat().st_size == 0:
                problems.append(f"{path}: empty file (0 bytes)")
                empty_files.add(path)
        else:
            problems.append(
                f"{path}: unexpected file (expected {sorted(MASK_STEMS)} with one of {list(IMAGE_SUFFIXES)})"
            )
    for stem in MASK_STEMS:
        found = by_stem.get(stem, [])
        if not found:
            problems.append(f"{folder}: missing image {stem!r}")
        elif len(found) > 1:
            problems.append(
                f"{folder}: image {stem!r} appears {len(found)} times ({', '.join(p.name for p in found)})"
            )
    usable = {s: paths for s, paths in by_stem.items() if len(paths) == 1 and paths[0] not in empty_files}
    return {stem: paths[0] for stem, paths in sorted(usable.items())}


def _read_eval(eval_dir: Path, problems: list[str]) -> pd.DataFrame | None:
    table = _read_csv(eval_dir / "info.csv", EVAL_COLUMNS, problems)
    images_dir = eval_dir / "images"
    if not images_dir.is_dir():
        problems.append(f"{images_dir}: missing")
        return None
    if table is None:
        return None
    present = {p.name: p for p in _visible(images_dir)}
    for image_id in table["ImageID"]:
        if image_id not in present:
            problems.append(f"{images_dir / image_id}: listed in info.csv but missing")
        elif present[image_id].stat().st_size == 0:
            problems.append(f"{images_dir / image_id}: empty file (0 bytes)")
    return pd.DataFrame(
        {
            "ImageID": table["ImageID"],
            "path": [str(images_dir / i) for i in table["ImageID"]],
        }
    )


def _apply_corrections(train: pd.DataFrame, path: Path, problems: list[str]) -> pd.DataFrame:
    """Apply a corrections CSV (id, field, value) to the table, never to the files.

    field is a person attribute (gender, age, race) or an image stem (e.g. `incorrect_mask`),
    whose value is then the mask status that photo really shows: wear, incorrect or not_wear.
    """
    fixes = _read_csv(path, ("id", "field", "value"), problems)
    if fixes is None:
        return train
    train = train.copy()
    known = set(train["person"])
    for line, fix in enumerate(fixes.itertuples(index=False), start=2):
        where = f"{path.name} line {line}"
        rows = train["person"] == fix.id
        if fix.id not in known:
            problems.append(f"{where}: unknown person id {fix.id!r}")
        elif fix.field == "gender" and fix.value in GENDERS:
            train.loc[rows, "gender"] = int(GENDERS[fix.value])
        elif fix.field == "age" and fix.value.isdigit():
            train.loc[rows, "age"] = int(fix.value)
        elif fix.field == "race":
            train.loc[rows, "race"] = fix.value
        elif fix.field in MASK_STEMS and fix.value in MASK_VALUES:
            train.loc[rows & (train["stem"] == fix.field), "mask"] = int(MASK_VALUES[fix.value])
        elif fix.field not in CORRECTION_FIELDS:
            problems.append(
                f"{where}: unknown field {fix.field!r} (expected one of {list(CORRECTION_FIELDS)})"
            )
        else:
            problems.append(f"{where}: invalid value {fix.value!r} for field {fix.field!r}")
    return train
