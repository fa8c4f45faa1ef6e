"""Face boxes: the table that holds them, and the crop they make.

Cropping to the face was the competition's largest single gain after the person split. The boxes
are data, computed once by a detector (`python -m maskcls.data.faces --data ROOT --out DIR`) or
drawn by the stand-in, and kept in a CSV:

    path,x0,y0,x1,y1,score,source
    train/images/000001_female_Asian_45/mask1.jpg,118.0,96.5,268.0,290.0,0.998,mtcnn

`path` is relative to the data root, the box in pixels of the original photo; a row with empty
x0..y1 says the detector found no face there (the photo is centre-cropped). The decode-once cache
applies the crop (its key holds every box and the margin), so trials pay nothing for it per epoch,
and predict and export crop exactly as training did. A photo without a box falls back to the
centre crop; the run counts them.
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

import pandas as pd
from PIL import Image

from maskcls.cli import HelpFormatter, prog, run_main
from maskcls.data.layout import all_photos
from maskcls.data.photo import upright_size
from maskcls.errors import UserError

if TYPE_CHECKING:
    from maskcls.config import DataConfig

COLUMNS = ("path", "x0", "y0", "x1", "y1", "score", "source")
STANDIN_TABLES = ("train/face_boxes.csv", "eval/face_boxes.csv")  # what the stand-in ships
TABLE_NAME = "face_boxes.csv"  # what the detector command writes into --out
Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels of the original photo


def center_window(share: float, width: int, height: int) -> tuple[int, int, int, int]:
    """The central `share` of the photo's width and height."""
    cw, ch = width * share, height * share
    return (
        round((width - cw) / 2),
        round((height - ch) / 2),
        round((width + cw) / 2),
        round((height + ch) / 2),
    )


def face_window(box: Box, margin: float, aspect: float, width: int, height: int) -> tuple[int, int, int, int]:
    """The crop around a face: its box grown by `margin` times its size on every side, widened or
    heightened about its centre to the model's aspect (height / width), moved inside the photo, and
    cut to the photo where it is larger. The README's onnxruntime recipe repeats these lines."""
    x0, y0, x1, y1 = box
    w, h = (x1 - x0) * (1 + 2 * margin), (y1 - y0) * (1 + 2 * margin)
    w, h = (w, w * aspect) if h < w * aspect else (h / aspect, h)
    w, h = min(w, width), min(h, height)
    left = min(max((x0 + x1) / 2 - w / 2, 0), width - w)
    top = min(max((y0 + y1) / 2 - h / 2, 0), height - h)
    return round(left), round(top), round(left + w), round(top + h)


@dataclass(frozen=True)
class Crop:
    """How every photo of a list is cropped before the resize to the model's size."""

    kind: str = "center"  # none | center | face (DataConfig.crop)
    share: float = 1.0  # center: the share kept; face: the fallback's
    margin: float = 0.0
    aspect: float = 1.0  # the model's height / width
    boxes: tuple[Box | None, ...] = ()  # face: one per photo, None where the table has none

    def window(self, index: int, width: int, height: int) -> tuple[int, int, int, int]:
        box = self.boxes[index] if self.kind == "face" else None
        if box is not None:
            return face_window(box, self.margin, self.aspect, width, height)
        return center_window(1.0 if self.kind == "none" else self.share, width, height)

    @property
    def fallbacks(self) -> int:
        """Photos cropped at the centre because the table has no box for them."""
        return sum(b is None for b in self.boxes) if self.kind == "face" else 0

    def key(self) -> str:
        """What the decode-once cache's name must change with."""
        boxes = hashlib.sha256(json.dumps(self.boxes).encode()).hexdigest() if self.kind == "face" else ""
        return json.dumps([self.kind, self.share, self.margin, self.aspect, boxes])


def tables_of(data: DataConfig) -> list[Path]:
    """data.face_boxes, else the boxes the data root itself carries (the stand-in's true ones)."""
    if data.face_boxes:
        return [Path(data.face_boxes).expanduser()]
    found = [Path(data.root) / name for name in STANDIN_TABLES if (Path(data.root) / name).is_file()]
    if not found:
        raise UserError(
            f"data.crop is face but no boxes table: set data.face_boxes to a CSV, e.g. the one "
            f"`python -m maskcls.data.faces --data {data.root} --out DIR` writes"
        )
    return found


def read_boxes(files: Sequence[Path], root: str | Path) -> Mapping[str, Box]:
    """Resolved photo path -> its box, from every table; UserError naming the table and the line
    for a missing file, a missing column, a row of the wrong width, an empty path, a value that is
    not a finite number, an empty box, or a photo given two different boxes. Each table is read
    once per process (it may hold a million rows) and again only when it changes on disk."""
    boxes: dict[str, Box] = {}
    lines: dict[str, tuple[Path, int]] = {}
    for file in files:
        try:
            stat = file.stat()
        except FileNotFoundError:
            raise UserError(
                f"face boxes table {file}: file not found (the detector writes one: "
                f"python -m maskcls.data.faces --data ROOT --out {file.parent})"
            ) from None
        for path, (line, box) in _read_table(str(file), stat.st_mtime_ns, stat.st_size, str(root)).items():
            if path in boxes and boxes[path] != box:
                first = lines[path]
                photo = os.path.relpath(path, Path(root).resolve())
                raise UserError(
                    f"face boxes table {file}: line {line} gives {photo} another box than {first[0]} "
                    f"line {first[1]}; keep one"
                )
            boxes[path], lines[path] = box, (file, line)
    return MappingProxyType(boxes)


@functools.lru_cache(maxsize=4)
def _read_table(file: str, mtime_ns: int, size: int, root: str) -> Mapping[str, tuple[int, Box]]:
    """Resolved photo path -> (line, box) of one table, keyed by its file's identity on disk."""
    table: dict[str, tuple[int, Box]] = {}
    bad: list[int] = []
    base = Path(root)
    try:
        with open(file, newline="", encoding="utf-8") as handle:
            rows = csv.reader(handle)
            header = [name.strip() for name in next(rows, [])]
            missing = [c for c in COLUMNS[:5] if c not in header]
            if missing:
                raise UserError(
                    f"face boxes table {file}: missing column(s) {', '.join(missing)}; expected {COLUMNS}"
                )
            at = [header.index(c) for c in COLUMNS[:5]]
            for line, row in enumerate(rows, start=2):
                if not row:
                    continue
                if len(row) != len(header):
                    width = f"{len(row)} fields, the header {len(header)}"
                    raise UserError(f"face boxes table {file}: line {line} has {width}")
                path, *coordinates = (row[i].strip() for i in at)
                if not path:
                    raise UserError(f"face boxes table {file}: line {line} has an empty path")
                if not any(coordinates):  # the detector searched this photo and found no face
                    continue
                box = _box(coordinates)
                if box is None:
                    bad.append(line)
                    continue
                key = str((base / path).resolve())
                if key in table and table[key][1] != box:
                    raise UserError(
                        f"face boxes table {file}: line {line} gives {path} another box than line "
                        f"{table[key][0]}; keep one"
                    )
                table[key] = (line, box)
    except (UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"face boxes table {file}: not a readable CSV ({str(err).strip()[:200]})") from None
    if bad:
        raise UserError(
            f"face boxes table {file}: {len(bad)} row(s) without a box x0 < x1, y0 < y1 in finite numbers "
            f"(first: line {bad[0]})"
        )
    return MappingProxyType(table)


def _box(coordinates: Sequence[str]) -> Box | None:
    try:
        x0, y0, x1, y1 = (float(c) for c in coordinates)
    except ValueError:
        return None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or x1 <= x0 or y1 <= y0:
        return None
    return (x0, y0, x1, y1)


def crop_for(data: DataConfig, paths: Sequence[str], boxes: Mapping[str, Box] | None = None) -> Crop:
    """The crop of each photo in `paths` under the config; face boxes come from `boxes` when given
    (resolved path -> box: a detector run on new photos), else from the configured tables."""
    if data.crop != "face":
        return Crop(data.crop, data.center_crop)
    if boxes is None:
        boxes = read_boxes(tables_of(data), data.root)
    aspect = data.image_size[0] / data.image_size[1]
    found = tuple(boxes.get(str(Path(p).resolve())) for p in paths)
    return Crop("face", data.center_crop, data.face_margin, aspect, found)


def check(data: DataConfig) -> None:
    """Before any training: the boxes table names only photos of the data root, and every box lies
    inside its photo. One line, with the first example of each kind of problem."""
    if data.crop != "face":
        return
    boxes = read_boxes(tables_of(data), data.root)
    known = {str(Path(p).resolve()) for p in all_photos(data.root)}
    unknown = [p for p in boxes if p not in known]
    problems = []
    if unknown:
        problems.append(
            f"{len(unknown)} row(s) for photos that are not in {data.root} (first: "
            f"{os.path.relpath(unknown[0], Path(data.root).resolve())}); is it the table of another data set?"
        )
    outside = outside_photos({p: b for p, b in boxes.items() if p in known}, data.root)
    if outside:
        problems.append(f"{len(outside)} box(es) outside their photo (first: {outside[0]})")
    if problems:
        raise UserError(f"face boxes table {', '.join(map(str, tables_of(data)))}: " + "; ".join(problems))


def outside_photos(boxes: Mapping[str, Box], root: str | Path) -> list[str]:
    """The photos (relative to `root`, with their size) whose box is not inside them, as shown."""
    outside = []
    for path, (x0, y0, x1, y1) in boxes.items():
        with Image.open(path) as img:  # reads the header only
            width, height = upright_size(img)
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            outside.append(f"{os.path.relpath(path, Path(root).resolve())} ({width}x{height})")
    return outside


def detect_table(root: str | Path, out: Path, workers: int | None = None, progress: bool = True) -> Path:
    """Run the detector over every train and eval photo once and write the table, a row for each
    photo (empty coordinates where it found no face); photos already in a table at `out` are kept,
    so an interrupted run resumes where it stopped."""
    from maskcls.data import detector
    from maskcls.rundir import write_csv

    photos = all_photos(root)
    table = out / TABLE_NAME
    if table.is_file():
        read_boxes([table], root)  # a damaged table is one error line, not a traceback halfway
    done = pd.read_csv(table, dtype={"path": str}) if table.is_file() else pd.DataFrame(columns=list(COLUMNS))
    have = set(done["path"])
    todo = [p for p in photos if os.path.relpath(p, root) not in have]
    print(f"{len(todo)} of {len(photos)} photos to search ({len(have)} already in {table})", file=sys.stderr)
    rows = []
    for start in range(0, len(todo), 512):  # written every 512 photos: a kill loses at most those
        chunk = todo[start : start + 512]
        for path, found_box in zip(chunk, detector.detect(chunk, workers, progress), strict=True):
            rows.append([os.path.relpath(path, root), *(found_box or [None] * 5), detector.SOURCE])
        new = pd.DataFrame(rows, columns=list(COLUMNS))
        done = pd.concat([done, new], ignore_index=True) if len(done) else new
        rows = []
        write_csv(done, table)
    return table


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog("maskcls.data.faces"), description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument("--data", required=True, help="data root in the competition layout")
    parser.add_argument("--out", default="runs/faces", help=f"directory for {TABLE_NAME} (resumed if there)")
    parser.add_argument("--workers", type=int, help="detector threads (default: the cores this process owns)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = detect_table(args.data, out, args.workers)
    photos, faces = len(pd.read_csv(table)), len(read_boxes([table], args.data))
    print(
        f"wrote {table}: a face in {faces} of {photos} photos (the others are centre-cropped); "
        f"train with data.crop=face data.face_boxes={table}"
    )
    return 0


if __name__ == "__main__":
    run_main(main)
