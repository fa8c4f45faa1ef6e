"""Decode once. JPEG decoding every epoch costs 10-45 CPU cores per GPU; instead every image is
decoded once, centre-cropped and resized to the configured size, and kept as one uint8 array
[N, H, W, 3] on disk. Every process memory-maps the same file, so the OS shares it.

The file name is a fingerprint of the file list (paths, sizes, mtimes) and the preprocessing, so
a changed input makes a new cache. Building happens under a file lock into a temporary name that
is renamed at the end: concurrent workers build it once and the others wait, then reuse it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from filelock import FileLock
from PIL import Image

from maskcls.errors import DataError
from maskcls.progress import bar
from maskcls.rundir import write_atomic

VERSION = 2  # bump when the preprocessing below changes


def fingerprint(paths: Sequence[str], size: tuple[int, int], center_crop: float) -> str:
    digest = hashlib.sha256(json.dumps({"version": VERSION, "size": size, "crop": center_crop}).encode())
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def load_image(path: str, size: tuple[int, int], center_crop: float = 1.0) -> np.ndarray:
    """One photo as uint8 [H, W, 3]: the central `center_crop` share of it, resized to `size` [H, W].

    Exactly the preprocessing written in an export's config.json: full decode, centre crop,
    bilinear resize. (JPEG draft decoding would be faster but cannot be reproduced outside PIL.)
    """
    height, width = size
    with Image.open(path) as file:
        img = file.convert("RGB")
        if center_crop < 1:
            w, h = img.size
            cw, ch = w * center_crop, h * center_crop
            img = img.crop(
                (round((w - cw) / 2), round((h - ch) / 2), round((w + cw) / 2), round((h + ch) / 2))
            )
        return np.asarray(img.resize((width, height), Image.Resampling.BILINEAR))


def build(
    paths: Sequence[str],
    size: tuple[int, int],
    cache_dir: str | Path,
    center_crop: float = 1.0,
    workers: int | None = None,
    progress: bool = True,
) -> np.ndarray:
    """The images as a read-only memory-mapped uint8 array [N, H, W, 3], built if missing."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"images-{fingerprint(paths, size, center_crop)}-{size[0]}x{size[1]}.npy"
    if not target.exists():
        with FileLock(str(target) + ".lock"):
            if not target.exists():  # another process may have built it while we waited
                _write(target, paths, size, center_crop, workers, progress)
    return np.load(target, mmap_mode="r")


def _write(target: Path, paths, size, center_crop, workers, progress) -> None:
    def fill(i: int, array: np.ndarray) -> str | None:
        try:
            array[i] = load_image(paths[i], size, center_crop)
        except (OSError, SyntaxError, ValueError) as err:
            return f"{paths[i]}: not a decodable image ({err})"
        return None

    def decode_all(tmp: Path) -> None:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), *size, 3))
        with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:  # PIL frees the GIL
            jobs = pool.map(lambda i: fill(i, array), range(len(paths)))
            shown = bar(jobs, total=len(paths), desc="decode once", unit="img", enabled=progress)
            problems = [problem for problem in shown if problem]
        if problems:  # every undecodable image at once, and no cache file
            raise DataError(problems)
        array.flush()

    write_atomic(target, decode_all)
