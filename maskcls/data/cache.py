"""Decode once. JPEG decoding every epoch costs 10-45 CPU cores per GPU; instead every image is
decoded once, cropped (at the centre or around its face box) and resized to the configured size,
and kept as one uint8 array
[N, H, W, 3] on disk. Every process memory-maps the same file, so the OS shares it.

The file name is a fingerprint of the file list (paths, sizes, mtimes) and the preprocessing, so
a changed input makes a new cache. Building happens under a file lock into a temporary name that
is renamed at the end: concurrent workers build it once and the others wait, then reuse it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from filelock import FileLock
from PIL import Image

from maskcls.data.faces import Box, Crop, crop_for
from maskcls.data.photo import UNDECODABLE, open_rgb
from maskcls.errors import DataError
from maskcls.progress import bar
from maskcls.rundir import write_atomic

if TYPE_CHECKING:
    from maskcls.config import DataConfig

VERSION = 3  # bump when the preprocessing below changes


def fingerprint(paths: Sequence[str], size: tuple[int, int], crop: Crop) -> str:
    digest = hashlib.sha256(json.dumps({"version": VERSION, "size": size, "crop": crop.key()}).encode())
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def load_image(path: str, size: tuple[int, int], crop: Crop = Crop(), index: int = 0) -> np.ndarray:
    """One photo (the `index`-th of the crop's list) as uint8 [H, W, 3]: cropped, resized to `size`.

    Exactly the preprocessing written in an export's config.json: full decode, crop (centre, or
    around the face box), bilinear resize. (JPEG draft decoding would be faster but cannot be
    reproduced outside PIL.)
    """
    height, width = size
    img = open_rgb(path)  # upright, 8-bit RGB (maskcls.data.photo)
    window = crop.window(index, *img.size)
    if window != (0, 0, *img.size):
        img = img.crop(window)
    return np.asarray(img.resize((width, height), Image.Resampling.BILINEAR))


def images_for(
    data: DataConfig, paths: Sequence[str], progress: bool = True, boxes: Mapping[str, Box] | None = None
) -> tuple[np.ndarray, Crop]:
    """The photos preprocessed as `data` says (size, crop), from the cache, and the crop used: what
    training, prediction and export all decode through, so they crop alike."""
    crop = crop_for(data, paths, boxes)
    return build(paths, data.image_size, data.cache_dir, crop, progress=progress), crop


def build(
    paths: Sequence[str],
    size: tuple[int, int],
    cache_dir: str | Path,
    crop: Crop = Crop(),
    workers: int | None = None,
    progress: bool = True,
) -> np.ndarray:
    """The images as a read-only memory-mapped uint8 array [N, H, W, 3], built if missing."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"images-{fingerprint(paths, size, crop)}-{size[0]}x{size[1]}.npy"
    if not target.exists():
        with FileLock(str(target) + ".lock"):
            if not target.exists():  # another process may have built it while we waited
                _write(target, paths, size, crop, workers, progress)
    return np.load(target, mmap_mode="r")


def _write(target: Path, paths, size, crop: Crop, workers, progress) -> None:
    def fill(i: int, array: np.ndarray) -> str | None:
        try:
            array[i] = load_image(paths[i], size, crop, i)
        except UNDECODABLE as err:
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
