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
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from maskcls.cli import HelpFormatter, prog, run_main
from maskcls.config import TrainConfig
from maskcls.data import cache
from maskcls.data.batches import DeviceImages
from maskcls.data.layout import scan_eval
from maskcls.errors import UserError
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


@contextlib.contextmanager
def cache_folder(given: str | None) -> Iterator[str]:
    """--cache-dir, or a temporary folder removed afterwards: a one-off prediction leaves nothing."""
    if given:
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="maskcls-predict-") as folder:
        yield folder


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
    if args.data:
        with cache_folder(args.cache_dir) as folder:
            table = submission(model, cfg.override({"data.cache_dir": folder}), args.data, device, args.tta)
        print(f"wrote {len(table)} predictions to {write_csv(table, Path(args.out) / 'submission.csv')}")
        return 0
    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        raise UserError(f"image file not found: {', '.join(missing)}")
    with cache_folder(args.cache_dir) as folder:
        probs = predict_paths(
            model,
            cfg.override({"data.cache_dir": folder}),
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
