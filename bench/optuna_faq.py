"""The same trials as a study of ours, run the way Optuna's FAQ runs PyTorch on GPUs: one
`study.optimize` process per GPU on a shared storage, a torchvision-style Dataset that opens and
decodes every JPEG each epoch in a DataLoader (num_workers = the cores), and a plain fp32 loop.

Same spec, same data root, same person split, same recipes (the spec's queued ones, in order),
same epochs; what differs is how the data reaches the model and how the GPU is shared. The
figure is trials per hour of wall time, this process's start-up included, as for hpo.run.

    python bench/optuna_faq.py --spec SPEC --storage sqlite:///faq.db --device cuda --json FILE
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import optuna
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from hpo import space
from hpo import spec as specs
from maskcls.config import MEAN, STD, TrainConfig
from maskcls.data.layout import scan
from maskcls.data.split import holdout
from maskcls.metrics import macro_f1


class Photos(Dataset):
    """Open, decode, resize, flip, normalise: every photo, every epoch."""

    def __init__(self, paths: list[str], labels: np.ndarray, size: tuple[int, int], train: bool):
        self.paths, self.labels, self.size, self.train = paths, labels, size, train
        self.mean = torch.tensor(MEAN).view(3, 1, 1)
        self.std = torch.tensor(STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with Image.open(self.paths[i]) as img:
            img = img.convert("RGB").resize((self.size[1], self.size[0]), Image.Resampling.BILINEAR)
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255
        if self.train and torch.rand(()) < 0.5:
            x = x.flip(2)
        return (x - self.mean) / self.std, int(self.labels[i])


def objective_for(spec: specs.StudySpec, device: torch.device, workers: int):
    import timm

    table = scan(spec.base.data.root)
    split = holdout(table, spec.base.data.val_ratio, spec.base.data.seed)
    paths, labels = list(table["path"]), table["label"].to_numpy()

    def loader(rows: np.ndarray, cfg: TrainConfig, train: bool) -> DataLoader:
        dataset = Photos([paths[r] for r in rows], labels[rows], tuple(cfg.data.image_size), train)
        return DataLoader(
            dataset,
            cfg.train.batch_size,
            shuffle=train,
            num_workers=workers,
            pin_memory=device.type == "cuda",
        )

    def objective(trial: optuna.Trial) -> float:
        cfg = spec.base.override(space.suggest(trial, spec.params))
        torch.manual_seed(cfg.data.seed)
        model = timm.create_model(cfg.model.name, pretrained=False, num_classes=18).to(device)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
        )
        train, val = loader(split.train, cfg, True), loader(split.val, cfg, False)
        best = 0.0
        for epoch in range(1, cfg.train.epochs + 1):
            model.train()
            for x, y in train:
                loss = torch.nn.functional.cross_entropy(model(x.to(device)), y.to(device))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            model.eval()
            predicted = []
            with torch.no_grad():
                for x, _ in val:
                    predicted.append(model(x.to(device)).argmax(1).cpu())
            score = macro_f1(labels[split.val], torch.cat(predicted).numpy())
            trial.report(score, epoch)
            best = max(best, score)
        return best

    return objective


def main() -> None:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spec", required=True, help="the study spec whose queued recipes to run")
    parser.add_argument("--storage", required=True)
    parser.add_argument("--n-trials", type=int, help="default: the spec's queued recipes")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    spec = specs.load(args.spec)
    n_trials = args.n_trials or len(spec.enqueue)
    device = torch.device(args.device)
    workers = len(os.sched_getaffinity(0))
    study = optuna.create_study(study_name="faq", storage=args.storage, direction="maximize")
    for recipe in spec.enqueue[:n_trials]:
        study.enqueue_trial(recipe)
    study.optimize(objective_for(spec, device, workers), n_trials=n_trials)
    wall = time.perf_counter() - started
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    per_hour = len(done) / wall * 3600
    print(
        f"{len(done)} trials in {wall:.0f} s on {device} ({workers} DataLoader workers): "
        f"{per_hour:.0f} trials/h"
    )
    if args.json:
        figures = {
            "trials": len(done),
            "wall_s": wall,
            "trials_per_h": per_hour,
            "values": [t.value for t in done],
        }
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
