"""Predict classes for the eval set (in `eval/info.csv` order) or for single images.

`python -m maskcls.predict RUN_DIR --eval-dir DATA_ROOT --out submission.csv [--tta]`
`python -m maskcls.predict RUN_DIR photo1.jpg photo2.png`
RUN_DIR is what `maskcls.train` or `hpo.export-best` wrote (config.json + model.safetensors).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from maskcls.cli import run_main
from maskcls.config import TrainConfig
from maskcls.data import cache
from maskcls.data.batches import DeviceImages
from maskcls.data.layout import scan_eval
from maskcls.errors import UserError
from maskcls.infer import infer, pick_device
from maskcls.labels import AgeCutoffs, class_name
from maskcls.rundir import load_run, write_csv


def predict_paths(
    model: torch.nn.Module,
    cfg: TrainConfig,
    paths: Sequence[str],
    device: torch.device,
    tta: bool = False,
    progress: bool = True,
) -> np.ndarray:
    """Class probabilities [N, 18], preprocessing exactly as in training (through the same cache)."""
    images = cache.build(
        list(paths), cfg.data.image_size, cfg.data.cache_dir, cfg.data.center_crop, progress=progress
    )
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
    """`ImageID,ans` for every row of eval/info.csv, in its order."""
    evals = scan_eval(root)
    probs = predict_paths(model, cfg, list(evals["path"]), device, tta, progress)
    return pd.DataFrame({"ImageID": evals["ImageID"], "ans": probs.argmax(1)})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m maskcls.predict", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="run or export directory (config.json + model.safetensors)")
    parser.add_argument("images", nargs="*", help="image files to classify")
    parser.add_argument("--eval-dir", help="data root with eval/info.csv: write a submission")
    parser.add_argument("--out", default="submission.csv", help="submission file (default submission.csv)")
    parser.add_argument("--tta", action="store_true", help="average with the mirrored image")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument(
        "--cache-dir", help="where decoded images are cached (default: the run's data.cache_dir)"
    )
    args = parser.parse_args(argv)
    if bool(args.images) == bool(args.eval_dir):
        raise UserError("give either --eval-dir DATA_ROOT or image files, not both or neither")
    device = pick_device(args.device)
    cfg, model = load_run(args.run_dir, device)
    if args.cache_dir:
        cfg = cfg.override({"data.cache_dir": args.cache_dir})
    if args.eval_dir:
        table = submission(model, cfg, args.eval_dir, device, args.tta)
        print(f"wrote {len(table)} predictions to {write_csv(table, args.out)}")
        return 0
    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        raise UserError(f"image file not found: {', '.join(missing)}")
    probs = predict_paths(
        model,
        cfg,
        [str(Path(p).resolve()) for p in args.images],
        device,
        args.tta,
        progress=len(args.images) > 100,
    )
    cutoffs = AgeCutoffs(cfg.data.young_age, cfg.data.old_age)
    for path, p in zip(args.images, probs, strict=True):
        label = int(p.argmax())
        print(f"{path}\t{label}\t{class_name(label, cutoffs)}\t{p.max():.3f}")
    return 0


if __name__ == "__main__":
    run_main(main)
