"""Face crop against centre crop at equal settings, scored side by side on a stand-in evaluation
set that no training saw:

    python bench/face_crop.py [--people 300] [--eval-people 150] [--seeds 3] [--epochs 8]

One stand-in is generated (train people and a hidden eval set, the true face boxes with it). For
each training seed (data.seed: the split, the initialisation, the sampling) the same recipe is
trained twice, `data.crop: center` and `data.crop: face`, and each model predicts the hidden set;
the table gives macro-F1 on eval/gt.csv for both and their difference, then the mean over seeds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from maskcls.config import load  # noqa: E402
from maskcls.data.synth import generate  # noqa: E402
from maskcls.metrics import macro_f1  # noqa: E402
from maskcls.predict import submission  # noqa: E402
from maskcls.runtime import configure_cpu  # noqa: E402
from maskcls.train import fit, load_data  # noqa: E402


def recipe(root: Path, cache: Path, crop: str, seed: int, epochs: int):
    """The demo's recipe (studies/demo.yaml's fixed values and enqueued trial), one crop or the other."""
    return load(
        None,
        {
            "data.root": str(root),
            "data.cache_dir": str(cache),
            "data.image_size": [64, 48],
            "data.crop": crop,
            "data.face_margin": 0.15,
            "data.seed": seed,
            "model.name": "mobilenetv3_small_050",
            "train.epochs": epochs,
            "train.batch_size": 32,
            "schedule.warmup_epochs": 0.5,
            "optim.name": "adamw",
            "optim.lr": 3e-3,
            "sampler.name": "weighted",
            "augment.policy": "light",
        },
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--people", type=int, default=300, help="training people")
    parser.add_argument("--eval-people", type=int, default=150, help="people in the hidden set")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds (data.seed 0..N-1)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--standin-seed", type=int, default=1, help="seed of the generated stand-in")
    args = parser.parse_args()
    started = time.perf_counter()
    threads = configure_cpu()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        root = generate(
            Path(folder) / "data", args.people, args.eval_people, args.standin_seed, (96, 128), progress=False
        )
        truth = pd.read_csv(root / "eval" / "gt.csv")["ans"].to_numpy()
        for seed in range(args.seeds):
            row: dict = {"seed": seed}
            for crop in ("center", "face"):
                cfg = recipe(root, Path(folder) / "cache", crop, seed, args.epochs)
                result = fit(cfg, load_data(cfg, progress=False), torch.device("cpu"))
                predicted = submission(result.model, cfg, root, torch.device("cpu"), progress=False)
                row[crop] = macro_f1(truth, predicted["ans"].to_numpy())
                row[f"{crop} val"] = result.best_val_macro_f1
            row["face - center"] = row["face"] - row["center"]
            rows.append(row)
            print(f"seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "seed"))
    table = pd.DataFrame(rows)
    gains = table["face - center"].to_numpy()
    print()
    print(
        f"{args.people} training people, hidden set: {args.eval_people} people ({len(truth)} images), "
        f"96x128 photos at 64x48, {args.epochs} epochs, {threads} CPU threads"
    )
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(
        f"mean hidden-set macro-F1: center {table['center'].mean():.4f}, face {table['face'].mean():.4f}, "
        f"face - center {gains.mean():+.4f} (face better in {int((gains > 0).sum())} of {len(gains)} seeds; "
        f"sd of the difference {np.std(gains, ddof=1) if len(gains) > 1 else 0:.4f}); "
        f"{time.perf_counter() - started:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
