"""Predict classes for the eval set (in `eval/info.csv` order) or for single images.

`python -m maskcls.predict RUN_DIR --data DATA_ROOT --out DIR [--tta]`   writes DIR/submission.csv
`python -m maskcls.predict RUN_DIR photo1.jpg photo2.png`                prints class, name, probability
RUN_DIR is what `maskcls.train` or `hpo.export-best` wrote (config.json + model.safetensors).
Photos are decoded into a temporary cache that goes when the command ends, unless --cache-dir
names a folder to keep it in (worth it when the same photos are predicted again).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from maskcls.cli import HelpFormatter, prog, run_main
from maskcls.config import TrainConfig
from maskcls.data import cache
from maskcls.data.batches import DeviceImages
from maskcls.data.check import undecodable
from maskcls.data.faces import Box, crop_for, outside_photos
from maskcls.data.layout import scan_eval
from maskcls.errors import DataError, UserError
from maskcls.infer import infer, pick_device
from maskcls.labels import AgeCutoffs, class_name
from maskcls.rundir import load_run, write_csv
from maskcls.runtime import add_threads_argument, configure_cpu


def predict_paths(
    model: torch.nn.Module,
    cfg: TrainConfig,
    paths: Sequence[str],
    device: torch.device,
    tta: bool = False,
    progress: bool = True,
    boxes: Mapping[str, Box] | None = None,
) -> np.ndarray:
    """Class probabilities [N, 18], preprocessing exactly as in training (through the same cache);
    face boxes from `boxes` (resolved path -> box) when given, else from the config's tables."""
    images, _ = cache.images_for(cfg.data, list(paths), progress, boxes)
    return infer(
        model, DeviceImages(images, device, cfg.train.channels_last), cfg.train.eval_batch_size, tta=tta
    )


def submission(
    model: torch.nn.Module,
    cfg: TrainConfig,
    root: str | Path,
    device: torch.device,
    tta: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """`ImageID,ans` for every row of eval/info.csv, in its order (face boxes: the config's table,
    else the root's own)."""
    evals = scan_eval(root)
    cfg = cfg.override({"data.root": str(root)})
    probs = predict_paths(model, cfg, list(evals["path"]), device, tta, progress)
    return pd.DataFrame({"ImageID": evals["ImageID"], "ans": probs.argmax(1)})


@contextlib.contextmanager
def cache_folder(given: str | None) -> Iterator[str]:
    """--cache-dir, or a temporary folder removed afterwards: a one-off prediction leaves nothing."""
    if given:
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="maskcls-predict-") as folder:
        yield folder


def detected(paths: Sequence[str]) -> dict[str, Box]:
    """Face boxes of new photos, from the same detector that made the training table."""
    from maskcls.data import detector

    found = detector.detect(paths, progress=len(paths) > 100)
    return {p: (b[0], b[1], b[2], b[3]) for p, b in zip(paths, found, strict=True) if b is not None}


def check_boxes(cfg: TrainConfig, paths: Sequence[str], boxes: Mapping[str, Box] | None) -> None:
    """A face-crop model's boxes for these photos: each inside its photo (else one error line), and
    every photo without one named (it is cropped at the centre instead)."""
    crop = crop_for(cfg.data, paths, boxes)
    if crop.kind != "face":
        return
    given = {p: b for p, b in zip(paths, crop.boxes, strict=True) if b is not None}
    outside = outside_photos(given, cfg.data.root)
    if outside:
        raise UserError(f"{len(outside)} face box(es) outside their photo (first: {outside[0]})")
    lacking = [p for p, b in zip(paths, crop.boxes, strict=True) if b is None]
    if lacking:
        shown = ", ".join(lacking[:10]) + (f" and {len(lacking) - 10} more" if len(lacking) > 10 else "")
        print(
            f"{len(lacking)} of {len(paths)} photos have no face box, cropped at the centre: {shown}",
            file=sys.stderr,
        )


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog("maskcls.predict"), description=__doc__.split("\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument("run_dir", help="run or export directory (config.json + model.safetensors)")
    parser.add_argument("images", nargs="*", help="image files to classify")
    parser.add_argument("--data", help="data root with eval/info.csv: write a submission")
    parser.add_argument("--eval-dir", dest="data", help=argparse.SUPPRESS)  # its former name
    parser.add_argument("--out", default="runs/predict", help="directory for submission.csv (with --data)")
    parser.add_argument("--tta", action="store_true", help="average with the mirrored image")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument(
        "--cache-dir", help="keep the decoded images in this folder (default: a temporary one)"
    )
    parser.add_argument(
        "--face-boxes",
        metavar="FILE",
        help="a model trained on face crops: the photos' boxes table (default: the model's table with "
        "--data, else the face detector runs on the photos)",
    )
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    if bool(args.images) == bool(args.data):
        raise UserError("give either --data DATA_ROOT or image files, not both or neither")
    out = Path(args.out)
    if out.suffix == ".csv" or out.is_file():
        raise UserError(f"--out {out}: give a directory; the submission is written as DIR/submission.csv")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    configure_cpu(args.threads)
    device = pick_device(args.device)
    cfg, model = load_run(args.run_dir, device)
    if args.face_boxes:
        cfg = cfg.override({"data.face_boxes": args.face_boxes})
    if args.data:
        check_boxes(cfg.override({"data.root": args.data}), scan_eval(args.data)["path"], None)
        with cache_folder(args.cache_dir) as folder:
            table = submission(model, cfg.override({"data.cache_dir": folder}), args.data, device, args.tta)
        print(f"wrote {len(table)} predictions to {write_csv(table, Path(args.out) / 'submission.csv')}")
        return 0
    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        raise UserError(f"image file not found: {', '.join(missing)}")
    paths = [str(Path(p).resolve()) for p in args.images]
    broken = undecodable(paths, progress=False)
    if broken:
        raise DataError(broken)
    boxes = detected(paths) if cfg.data.crop == "face" and not args.face_boxes else None
    check_boxes(cfg, paths, boxes)
    with cache_folder(args.cache_dir) as folder:
        probs = predict_paths(
            model,
            cfg.override({"data.cache_dir": folder}),
            paths,
            device,
            args.tta,
            progress=len(args.images) > 100,
            boxes=boxes,
        )
    cutoffs = AgeCutoffs(cfg.data.young_age, cfg.data.old_age)
    for path, p in zip(args.images, probs, strict=True):
        label = int(p.argmax())
        print(f"{path}\t{label}\t{class_name(label, cutoffs)}\t{p.max():.3f}")
    return 0


if __name__ == "__main__":
    run_main(main)
