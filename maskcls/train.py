"""Train one model from a TrainConfig: `python -m maskcls.train --data DIR --out DIR [--set k=v ...]`.

`fit` is the whole training loop, readable top to bottom. It reports validation macro-F1 after
every epoch through `on_epoch`, which may stop the run by raising (the search prunes this way),
and returns the best-F1 weights.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from maskcls import losses, models, weights
from maskcls.cli import run_main
from maskcls.config import MEAN, STD, TrainConfig, load, parse_overrides
from maskcls.data import cache
from maskcls.data.augment import mix
from maskcls.data.batches import DeviceImages, albumentations_batches, device_batches, epoch_indices
from maskcls.data.layout import scan
from maskcls.data.split import holdout, kfold
from maskcls.errors import UserError
from maskcls.labels import NUM_CLASSES, AgeCutoffs, age_band, class_name, encode
from maskcls.metrics import macro_f1, per_class_f1
from maskcls.optim import build_optimizer, build_schedule
from maskcls.runtime import configure_cpu

OnEpoch = Callable[[int, dict], None]


class Diverged(RuntimeError):
    """The loss became NaN or infinite; the message says when and what to change."""


@dataclass(frozen=True)
class TrainData:
    """The images table, its decoded cache (rows aligned) and the person-level split."""

    table: pd.DataFrame
    images: np.ndarray  # uint8 [N, H, W, 3], memory-mapped
    train_rows: np.ndarray
    val_rows: np.ndarray  # empty when retraining on everyone

    def everyone(self) -> TrainData:
        return TrainData(self.table, self.images, np.arange(len(self.table)), np.array([], dtype=int))


@dataclass
class FitResult:
    model: models.Classifier  # best weights loaded, in eval mode
    best_epoch: int
    best_val_macro_f1: float | None  # None without validation people
    history: list[dict]
    val_probs: np.ndarray | None  # [n_val, 18] at the best epoch
    val_labels: np.ndarray  # true classes of the validation images, in the same order
    stop_reason: str
    images_per_s: float
    wall_s: float


def load_data(cfg: TrainConfig, progress: bool = True) -> TrainData:
    """Scan the layout, split by person and decode the images once into the shared cache.

    `label` is always the competition's class (cutoffs 30 and 60), which validation scores;
    `train_label` uses the configured cutoffs, so moving the upper one to 58 changes what the
    model is taught, never what it is measured against.
    """
    d = cfg.data
    table = scan(d.root, d.corrections)
    table["train_label"] = encode(
        table["mask"], table["gender"], age_band(table["age"].to_numpy(), AgeCutoffs(d.young_age, d.old_age))
    )
    split = (
        kfold(table, d.folds, d.seed)[d.fold] if d.fold is not None else holdout(table, d.val_ratio, d.seed)
    )
    images = cache.build(list(table["path"]), d.image_size, d.cache_dir, d.center_crop, progress=progress)
    return TrainData(table, images, split.train, split.val)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is visible; use --device cpu")
    return torch.device(name)


def autocast(cfg: TrainConfig, device: torch.device):
    """bf16 autocast on CUDA where supported (fp16 otherwise); full precision on the CPU."""
    if device.type != "cuda" or not cfg.train.amp:
        return contextlib.nullcontext, None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return (lambda: torch.autocast("cuda", dtype=dtype)), dtype


@dataclass(frozen=True)
class DeviceData:
    """What a fit keeps on its device, moved there once before the first step."""

    images: DeviceImages  # every image of the table, uint8
    train_rows: torch.Tensor  # rows of `images` to train on
    val_rows: torch.Tensor
    train_targets: torch.Tensor  # one-hot float [n_train, 18] of the training labels
    val_targets: torch.Tensor  # one-hot float [n_val, 18] of the competition's classes


def to_device(data: TrainData, device: torch.device, channels_last: bool) -> DeviceData:
    def one_hot(labels: np.ndarray) -> torch.Tensor:
        return F.one_hot(torch.as_tensor(labels, device=device), NUM_CLASSES).float()

    return DeviceData(
        images=DeviceImages(data.images, device, channels_last),
        train_rows=torch.as_tensor(data.train_rows, device=device),
        val_rows=torch.as_tensor(data.val_rows, device=device),
        train_targets=one_hot(data.table["train_label"].to_numpy()[data.train_rows]),
        val_targets=one_hot(data.table["label"].to_numpy()[data.val_rows]),
    )


@dataclass(frozen=True)
class Draws:
    """The random streams of a fit, all from its seed."""

    order: torch.Generator  # host: each epoch's sample order
    augment: torch.Generator  # on the device: augmentation, CutMix/Mixup pairings
    mix: np.random.Generator  # host: whether and how much to mix a batch

    @classmethod
    def seeded(cls, seed: int, device: torch.device) -> Draws:
        return cls(
            torch.Generator().manual_seed(seed),
            torch.Generator(device=device).manual_seed(seed),
            np.random.default_rng(seed),
        )


def epoch_batches(
    cfg: TrainConfig, data: TrainData, on: DeviceData, draws: Draws
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of (augmented inputs, soft targets), both on the device.

    The epoch's order is drawn on the host and moved to the device in one copy; after that a
    batch is an index gather and arithmetic there, so the CPU queues steps without waiting.
    """
    labels = data.table["train_label"].to_numpy()[data.train_rows]
    order = epoch_indices(labels, cfg.sampler, draws.order)
    order_on_device = order.to(on.images.device)
    size, policy = cfg.train.batch_size, cfg.augment.policy
    if cfg.augment.backend == "device":
        batches = device_batches(on.images, on.train_rows, order_on_device, size, policy, draws.augment)
    else:
        batches = albumentations_batches(
            data.images,
            data.train_rows,
            order,
            order_on_device,
            size,
            policy,
            cfg.train.workers,
            on.images.norm,
            on.images.channels_last,
        )
    for x, positions in batches:
        yield mix(x, on.train_targets[positions], cfg.augment, draws.mix, draws.augment)


@torch.no_grad()
def predict_probs(
    model: torch.nn.Module,
    images: DeviceImages,
    rows: torch.Tensor,
    batch_size: int,
    amp=contextlib.nullcontext,
    tta: bool = False,
) -> torch.Tensor:
    """Class probabilities [len(rows), 18] on the device; with `tta`, the mean over the image and
    its mirror."""
    model.eval()
    probs = [torch.zeros((0, NUM_CLASSES), device=images.device)]
    for batch in rows.split(batch_size):
        x = images.inputs(batch)
        with amp():
            p = F.softmax(model(x).float(), dim=1)
            if tta:
                p = (p + F.softmax(model(x.flip(3)).float(), dim=1)) / 2
        probs.append(p)
    return torch.cat(probs)


def infer(model: torch.nn.Module, images: DeviceImages, batch_size: int, tta: bool = False) -> np.ndarray:
    """Class probabilities [N, 18] of every image, on the host."""
    rows = torch.arange(len(images), device=images.device)
    return predict_probs(model, images, rows, batch_size, tta=tta).cpu().numpy()


def evaluate(
    model: torch.nn.Module, on: DeviceData, loss_fn: losses.Loss, batch_size: int, amp
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validation probabilities [n_val, 18] and loss, both computed and left on the device."""
    probs = predict_probs(model, on.images, on.val_rows, batch_size, amp)
    return probs, loss_fn((probs + 1e-12).log(), on.val_targets)


def fit(
    cfg: TrainConfig,
    data: TrainData,
    device: torch.device | str = "cpu",
    on_epoch: OnEpoch | None = None,
    progress: bool = False,
) -> FitResult:
    device = torch.device(device)
    started = time.perf_counter()
    torch.manual_seed(cfg.data.seed)
    draws = Draws.seeded(cfg.data.seed, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format

    # Model, loss, optimizer and schedule, all from the config; the data moves to the device once.
    model = models.build(cfg.model).to(device, memory_format=memory_format)
    forward = torch.compile(model) if cfg.train.compile else model
    on = to_device(data, device, cfg.train.channels_last)
    train_labels = data.table["train_label"].to_numpy()[data.train_rows]
    val_labels = data.table["label"].to_numpy()[data.val_rows]
    loss_fn = losses.build(cfg.loss, np.bincount(train_labels, minlength=NUM_CLASSES), device)
    epoch_size = len(epoch_indices(train_labels, cfg.sampler, torch.Generator().manual_seed(0)))
    n_batches = math.ceil(epoch_size / cfg.train.batch_size)
    optimizer = build_optimizer(model, cfg.optim)
    schedule = build_schedule(
        optimizer, cfg.schedule, cfg.optim.lr, math.ceil(n_batches / cfg.train.accumulate), cfg.train.epochs
    )
    amp, amp_dtype = autocast(cfg, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    history: list[dict] = []
    best = {"epoch": 0, "f1": -1.0, "state": None, "probs": None}
    stop_reason, seen, train_seconds = "completed", 0, 0.0
    for epoch in range(1, cfg.train.epochs + 1):
        model.train()
        tick = time.perf_counter()
        bar = tqdm(
            epoch_batches(cfg, data, on, draws),
            total=n_batches,
            desc=f"epoch {epoch}/{cfg.train.epochs}",
            leave=False,
            disable=not progress,
            unit="batch",
        )
        loss_sum = torch.zeros((), device=device)
        for step, (x, targets) in enumerate(bar, start=1):
            with amp():
                loss = loss_fn(forward(x), targets)
            scaler.scale(loss / cfg.train.accumulate).backward()
            loss_sum += loss.detach()
            if step % cfg.train.accumulate == 0 or step == n_batches:
                if cfg.train.clip_grad:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                schedule.step()
            if step % 20 == 0 or step == n_batches:  # one host sync every 20 steps, not every step
                if not torch.isfinite(loss_sum):
                    raise Diverged(
                        f"loss became {loss_sum.item()} at epoch {epoch}, step {step}; "
                        "lower optim.lr or set train.clip_grad"
                    )
                bar.set_postfix(loss=f"{loss_sum.item() / step:.3f}")
        seen += epoch_size
        train_seconds += time.perf_counter() - tick

        metrics = {
            "epoch": epoch,
            "train_loss": loss_sum.item() / n_batches,
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_s": epoch_size / (time.perf_counter() - tick),
        }
        probs = None
        if len(val_labels):
            val_probs, val_loss = evaluate(model, on, loss_fn, cfg.train.eval_batch_size, amp)
            probs = val_probs.cpu().numpy()
            predicted = probs.argmax(1)
            metrics.update(
                val_loss=val_loss.item(),
                val_macro_f1=macro_f1(val_labels, predicted),
                val_accuracy=float((predicted == val_labels).mean()),
                val_per_class_f1=per_class_f1(val_labels, predicted).round(4).tolist(),
            )
            schedule.epoch_end(metrics["val_macro_f1"])
        metrics["seconds"] = time.perf_counter() - tick
        history.append(metrics)
        score = metrics.get("val_macro_f1", float(epoch))  # without validation, the last epoch is best
        if score > best["f1"]:
            best = {
                "epoch": epoch,
                "f1": score,
                "probs": probs,
                "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            }
        if progress:
            shown = f"val macro-F1 {metrics['val_macro_f1']:.4f}" if probs is not None else "no validation"
            tqdm.write(
                f"epoch {epoch}: train loss {metrics['train_loss']:.4f}, {shown}, "
                f"{metrics['images_per_s']:.0f} img/s"
            )
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        patience = cfg.train.patience
        if patience and probs is not None and epoch - best["epoch"] >= patience:
            stop_reason = f"early stop: no better val macro-F1 for {patience} epochs"
            break

    model.load_state_dict(best["state"])
    model.eval()
    return FitResult(
        model=model,
        best_epoch=best["epoch"],
        best_val_macro_f1=best["f1"] if len(val_labels) else None,
        history=history,
        val_probs=best["probs"],
        val_labels=val_labels,
        stop_reason=stop_reason,
        images_per_s=seen / max(train_seconds, 1e-9),
        wall_s=time.perf_counter() - started,
    )


# --- a run directory: model.safetensors + config.json + metrics.json --------------------------


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, value) -> None:
    _write_atomic(path, lambda p: p.write_text(json.dumps(value, indent=2) + "\n"))


def preprocessing(cfg: TrainConfig) -> dict:
    """What a deployment must do to a photo before the model sees it."""
    return {
        "image_size": list(cfg.data.image_size),
        "center_crop": cfg.data.center_crop,
        "mean": list(MEAN),
        "std": list(STD),
        "input": "RGB, centre crop, bilinear resize to image_size [H, W], scale to [0, 1], "
        "subtract mean and divide by std per channel; float32 [batch, 3, H, W]",
    }


def write_model_dir(out: str | Path, cfg: TrainConfig, members: list[models.Classifier]) -> Path:
    """model.safetensors (an Ensemble of `members`) and config.json (TrainConfig, classes, preprocessing)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ensemble = models.Ensemble(members)
    state = {k: v.detach().cpu().contiguous() for k, v in ensemble.state_dict().items()}
    _write_atomic(out / "model.safetensors", lambda p: save_file(state, str(p)))
    cutoffs = AgeCutoffs()
    write_json(
        out / "config.json",
        {
            "train_config": cfg.to_dict(),
            "members": len(members),
            "classes": {str(c): class_name(c, cutoffs) for c in range(NUM_CLASSES)},
            "preprocessing": preprocessing(cfg),
        },
    )
    return out


def save_run(out: str | Path, cfg: TrainConfig, result: FitResult) -> Path:
    out = write_model_dir(out, cfg, [result.model])
    write_json(
        out / "metrics.json",
        {
            "val_macro_f1": result.best_val_macro_f1,
            "best_epoch": result.best_epoch,
            "stop_reason": result.stop_reason,
            "images_per_s": result.images_per_s,
            "wall_s": result.wall_s,
            "history": result.history,
        },
    )
    return out


def load_run(run_dir: str | Path, device: torch.device | str = "cpu") -> tuple[TrainConfig, models.Ensemble]:
    """The config and model of a run or export directory (weights only, never pickled code)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file() or not (run_dir / "model.safetensors").is_file():
        raise UserError(
            f"{run_dir}: not a run or export directory (expected config.json and model.safetensors)"
        )
    try:
        saved = json.loads((run_dir / "config.json").read_text())
        cfg = TrainConfig.from_dict(saved["train_config"])
        members = int(saved["members"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise UserError(
            f"{run_dir / 'config.json'}: not a model config written by this project ({err})"
        ) from None
    # The saved weights replace whatever the backbone started from: no ImageNet download, no
    # weights file needed where a model is deployed.
    architecture = dataclasses.replace(cfg.model, pretrained=None)
    model = models.Ensemble([models.build(architecture) for _ in range(members)])
    model.load_state_dict(load_file(str(run_dir / "model.safetensors")))
    return cfg, model.to(device).eval()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m maskcls.train",
        description="Train one mask-status classifier and write model.safetensors, config.json and "
        "metrics.json (val_macro_f1 of the best epoch and the per-epoch history).",
        epilog="Config keys: see maskcls/config.py (groups data, model, sampler, loss, optim, schedule, "
        "augment, train). Example: --set model.name=resnet18 --set 'data.image_size=[128,96]' "
        "--set train.epochs=10 --set optim.lr=3e-4 --set loss.name=focal",
    )
    parser.add_argument("--data", required=True, help="data root in the competition layout")
    parser.add_argument("--out", required=True, help="run directory to write")
    parser.add_argument("--config", help="YAML file with config groups (optional)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. optim.lr=3e-4 (repeatable)",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:1 ...")
    args = parser.parse_args(argv)

    cfg = load(args.config, {**parse_overrides(args.overrides), "data.root": args.data})
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory for the run")
    device = pick_device(args.device)
    weights.ensure([cfg.model])  # missing ImageNet weights stop here, before the images are decoded
    configure_cpu()
    data = load_data(cfg)
    print(
        f"{len(data.train_rows)} training and {len(data.val_rows)} validation images "
        f"({data.table['person'].nunique()} people), {cfg.model.name} on {device}",
        file=sys.stderr,
    )
    try:
        result = fit(cfg, data, device, progress=True)
    except Diverged as err:
        print(f"training stopped: {err}", file=sys.stderr)
        return 1
    out = save_run(out, cfg, result)
    print(
        f"best val macro-F1 {result.best_val_macro_f1:.4f} at epoch {result.best_epoch} "
        f"({result.stop_reason}); wrote {out}"
    )
    return 0


if __name__ == "__main__":
    run_main(main)
