"""Train one model from a TrainConfig: `python -m maskcls.train --data DIR --out DIR [--set k=v ...]`.

`fit` is the whole training loop, readable top to bottom. `setup` builds what it needs from the
config and puts it on the device before the first step, `epoch_batches` is the batch source and
`evaluate` the validation. Each epoch's metrics go to `on_epoch`, which may stop the run by raising
(the search prunes this way); fit returns the best epoch's weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from maskcls import losses, models, weights
from maskcls.checkpoint import CheckpointFile
from maskcls.cli import HelpFormatter, prog, run_main
from maskcls.config import TrainConfig, load, parse_overrides, read_yaml
from maskcls.data import cache, faces
from maskcls.data.augment import mix
from maskcls.data.batches import DeviceImages, albumentations_batches, device_batches, epoch_indices
from maskcls.data.layout import scan
from maskcls.data.split import holdout, kfold
from maskcls.errors import UserError
from maskcls.infer import Autocast, autocast, pick_device, predict_probs
from maskcls.labels import NUM_CLASSES, AgeCutoffs, age_band, encode
from maskcls.metrics import attribute_accuracy, macro_f1, per_class_f1
from maskcls.optim import Schedule, build_optimizer, build_schedule
from maskcls.progress import bar
from maskcls.rundir import write_json, write_model_dir
from maskcls.runtime import add_threads_argument, configure_cpu

DIVERGED_FACTOR = 100  # a loss this many times its first step's has diverged, finite or not


class Diverged(RuntimeError):
    """The loss became NaN, infinite or exploded; the message says when and what to change."""


@dataclass(frozen=True)
class TrainData:
    """The images table, its decoded cache (rows aligned) and the person-level split."""

    table: pd.DataFrame
    images: np.ndarray  # uint8 [N, H, W, 3], memory-mapped
    train_rows: np.ndarray
    val_rows: np.ndarray  # empty when retraining on everyone
    face_fallbacks: int = 0  # data.crop face: photos without a face box, centre-cropped instead

    def everyone(self) -> TrainData:
        everyone = np.arange(len(self.table))
        return dataclasses.replace(self, train_rows=everyone, val_rows=np.array([], dtype=int))


@dataclass(frozen=True)
class EpochMetrics:
    """One epoch's figures; the validation ones are None without validation people."""

    epoch: int
    train_loss: float
    lr: float
    images_per_s: float
    seconds: float
    val_loss: float | None = None
    val_macro_f1: float | None = None
    val_accuracy: float | None = None
    val_per_class_f1: list[float] | None = None
    val_attribute_accuracy: dict[str, float] | None = None  # mask, gender, age_band

    def to_dict(self) -> dict[str, Any]:
        """As metrics.json records it: the validation keys only when measured."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def __str__(self) -> str:
        shown = f"val macro-F1 {self.val_macro_f1:.4f}" if self.val_macro_f1 is not None else "no validation"
        return f"epoch {self.epoch}: train loss {self.train_loss:.4f}, {shown}, {self.images_per_s:.0f} img/s"


OnEpoch = Callable[[int, EpochMetrics], None]


@dataclass
class FitResult:
    model: models.Classifier  # best weights loaded, in eval mode
    best_epoch: int
    best_val_macro_f1: float | None  # None without validation people
    history: list[EpochMetrics]
    val_probs: np.ndarray | None  # [n_val, 18] at the best epoch
    val_labels: np.ndarray  # true classes of the validation images, in the same order
    stop_reason: str
    images_per_s: float
    wall_s: float
    face_fallbacks: int = 0  # photos of the table without a face box (data.crop face), centre-cropped


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
    images, crop = cache.images_for(d, list(table["path"]), progress)
    return TrainData(table, images, split.train, split.val, crop.fallbacks)


@dataclass(frozen=True)
class DeviceData:
    """What a fit keeps on its device, moved there once before the first step."""

    images: DeviceImages  # every image of the table, uint8
    train_rows: torch.Tensor  # rows of `images` to train on
    val_rows: torch.Tensor
    train_targets: torch.Tensor  # one-hot float [n_train, 18] of the training labels (+ age / 100)
    val_targets: torch.Tensor  # one-hot float [n_val, 18] of the competition's classes


def device_image_count(cfg: TrainConfig, data: TrainData) -> int:
    """Images a fit moves to the device: every image for the device backend, which trains from
    there; the validation images only for the albumentations backend, which trains from the host."""
    return len(data.table) if cfg.augment.backend == "device" else len(data.val_rows)


def to_device(
    data: TrainData, device: torch.device, channels_last: bool, every_image: bool = True, ages: bool = False
) -> DeviceData:
    """With `ages`, the training targets carry age / 100 as a 19th column: CutMix and Mixup then mix
    it with the classes, and the age head learns the mixed age."""

    def one_hot(labels: np.ndarray) -> torch.Tensor:
        return F.one_hot(torch.as_tensor(labels, device=device), NUM_CLASSES).float()

    train_targets = one_hot(data.table["train_label"].to_numpy()[data.train_rows])
    if ages:
        age = torch.as_tensor(data.table["age"].to_numpy()[data.train_rows] / 100, device=device)
        train_targets = torch.cat([train_targets, age.float()[:, None]], dim=1)

    images, train_rows, val_rows = data.images, data.train_rows, data.val_rows
    if not every_image:  # validation images only, at positions 0..n_val
        images, train_rows, val_rows = data.images[val_rows], np.array([], int), np.arange(len(val_rows))
    return DeviceData(
        images=DeviceImages(images, device, channels_last),
        train_rows=torch.as_tensor(train_rows, device=device),
        val_rows=torch.as_tensor(val_rows, device=device),
        train_targets=train_targets,
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


@dataclass
class Parts:
    """What fit builds from the config before its first step, all on the run's device."""

    model: models.Classifier
    # The training forward (the model, or its forward_with_age with the age head), compiled with
    # train.compile in either case.
    forward: Callable[[torch.Tensor], Any]
    loss_fn: losses.Loss
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    scaler: torch.amp.GradScaler  # scales fp16 losses; a no-op otherwise
    amp: Autocast
    on: DeviceData
    draws: Draws
    epoch_size: int  # images drawn per epoch (the sampler may oversample)
    n_batches: int


def setup(cfg: TrainConfig, data: TrainData, device: torch.device) -> Parts:
    """Seeded model, loss, optimizer and schedule from the config; the data moved to the device."""
    torch.manual_seed(cfg.data.seed)
    draws = Draws.seeded(cfg.data.seed, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = models.build(cfg.model).to(device).to(memory_format=memory_format)
    train_labels = data.table["train_label"].to_numpy()[data.train_rows]
    epoch_size = len(epoch_indices(train_labels, cfg.sampler, torch.Generator().manual_seed(0)))
    n_batches = math.ceil(epoch_size / cfg.train.batch_size)
    optimizer = build_optimizer(model, cfg.optim)
    steps_per_epoch = math.ceil(n_batches / cfg.train.accumulate)
    amp, amp_dtype = autocast(cfg, device)
    forward = model.forward_with_age if cfg.model.age_aux_weight > 0 else model
    return Parts(
        model=model,
        forward=torch.compile(forward) if cfg.train.compile else forward,
        loss_fn=losses.build(cfg.loss, np.bincount(train_labels, minlength=NUM_CLASSES), device),
        optimizer=optimizer,
        schedule=build_schedule(optimizer, cfg.schedule, cfg.optim.lr, steps_per_epoch, cfg.train.epochs),
        scaler=torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16),
        amp=amp,
        on=to_device(
            data,
            device,
            cfg.train.channels_last,
            every_image=cfg.augment.backend == "device",
            ages=cfg.model.age_aux_weight > 0,
        ),
        draws=draws,
        epoch_size=epoch_size,
        n_batches=n_batches,
    )


def step_loss(
    forward: Callable[[torch.Tensor], Any],
    loss_fn: losses.Loss,
    cfg: TrainConfig,
    x: torch.Tensor,
    targets: torch.Tensor,
) -> torch.Tensor:
    """A batch's training loss: the classes', plus the age head's when model.age_aux_weight > 0
    (`forward` then returns the age too, and the targets' last column is age / 100)."""
    weight = cfg.model.age_aux_weight
    if not weight:
        return loss_fn(forward(x), targets)
    scores, age = forward(x)
    return loss_fn(scores, targets[:, :NUM_CLASSES]) + weight * F.smooth_l1_loss(
        age.float(), targets[:, NUM_CLASSES]
    )


def train_one_batch(
    p: Parts, cfg: TrainConfig, x: torch.Tensor, targets: torch.Tensor, step: int
) -> torch.Tensor:
    """Forward and backward one batch under the run's autocast; every `accumulate` batches (and at
    the epoch's last) clip, step the optimizer and the schedule. Returns the batch's loss, on the
    device (reading it would make the host wait)."""
    with p.amp():
        loss = step_loss(p.forward, p.loss_fn, cfg, x, targets)
    p.scaler.scale(loss / cfg.train.accumulate).backward()
    if step % cfg.train.accumulate == 0 or step == p.n_batches:
        if cfg.train.clip_grad:
            p.scaler.unscale_(p.optimizer)
            torch.nn.utils.clip_grad_norm_(p.model.parameters(), cfg.train.clip_grad)
        p.scaler.step(p.optimizer)
        p.scaler.update()
        p.optimizer.zero_grad(set_to_none=True)
        p.schedule.step()
    return loss.detach()


def evaluate(
    model: torch.nn.Module, on: DeviceData, loss_fn: losses.Loss, batch_size: int, amp: Autocast
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validation probabilities [n_val, 18] and loss, both computed and left on the device."""
    probs = predict_probs(model, on.images, on.val_rows, batch_size, amp)
    return probs, loss_fn((probs + 1e-12).log(), on.val_targets)


def epoch_metrics(
    p: Parts, cfg: TrainConfig, epoch: int, loss_sum: torch.Tensor, val_labels: np.ndarray, tick: float
) -> tuple[EpochMetrics, np.ndarray | None]:
    """The epoch's figures, with validation's when there are validation people, and the
    validation probabilities on the host."""
    figures: dict[str, Any] = {
        "epoch": epoch,
        "train_loss": loss_sum.item() / p.n_batches,
        "lr": p.optimizer.param_groups[0]["lr"],
        "images_per_s": p.epoch_size / (time.perf_counter() - tick),
    }
    probs = None
    if len(val_labels):
        val_probs, val_loss = evaluate(p.model, p.on, p.loss_fn, cfg.train.eval_batch_size, p.amp)
        probs = val_probs.cpu().numpy()  # one copy to the host per validation
        predicted = probs.argmax(1)
        figures.update(
            val_loss=val_loss.item(),
            val_macro_f1=macro_f1(val_labels, predicted),
            val_accuracy=float((predicted == val_labels).mean()),
            val_per_class_f1=per_class_f1(val_labels, predicted).round(4).tolist(),
            val_attribute_accuracy=attribute_accuracy(val_labels, predicted),
        )
    return EpochMetrics(**figures, seconds=time.perf_counter() - tick), probs


@dataclass
class Best:
    """The best epoch so far: its number, validation macro-F1, weights and validation probabilities."""

    epoch: int = 0
    score: float = -1.0
    state: dict[str, torch.Tensor] | None = None
    probs: np.ndarray | None = None

    def offer(self, epoch: int, score: float, model: torch.nn.Module, probs: np.ndarray | None) -> None:
        if score > self.score:
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.epoch, self.score, self.state, self.probs = epoch, score, state, probs


@dataclass
class Course:
    """Where a fit stands after `epoch`: what a checkpoint carries besides the parts' own state."""

    epoch: int = 0
    history: list[EpochMetrics] = field(default_factory=list)
    best: Best = field(default_factory=Best)
    first_loss: float | None = None  # the loss of the first step, before any update: the bound's base
    train_seconds: float = 0.0

    def check_loss(self, mean: float, epoch: int, step: int) -> None:
        """Stop a run whose loss is no longer finite or has grown DIVERGED_FACTOR times over."""
        if self.first_loss is None and math.isfinite(mean):
            self.first_loss = mean
        if not math.isfinite(mean) or mean > DIVERGED_FACTOR * (self.first_loss or math.inf):
            finite = math.isfinite(mean)
            grown = f", over {DIVERGED_FACTOR}x its start ({self.first_loss:.3g})" if finite else ""
            raise Diverged(
                f"loss became {mean:.4g} at epoch {epoch}, step {step}{grown}; "
                "lower optim.lr or set train.clip_grad"
            )


def snapshot(p: Parts, c: Course) -> dict[str, Any]:
    """Everything to continue after epoch `c.epoch`, as torch.load(weights_only=True) reads it."""
    rng = {
        "torch": torch.get_rng_state(),
        "order": p.draws.order.get_state(),
        "augment": p.draws.augment.get_state(),
        "mix": p.draws.mix.bit_generator.state,
    }
    if p.on.images.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(p.on.images.device)
    best: dict[str, Any] = {"epoch": c.best.epoch, "score": c.best.score, "state": c.best.state}
    best["probs"] = _tensor(c.best.probs)
    course = {"epoch": c.epoch, "first_loss": c.first_loss, "train_seconds": c.train_seconds}
    return {
        "course": {**course, "history": [m.to_dict() for m in c.history], "best": best},
        "model": p.model.state_dict(),
        "optimizer": p.optimizer.state_dict(),
        "schedule": p.schedule.state_dict(),
        "scaler": p.scaler.state_dict(),
        "rng": rng,
    }


def restore(p: Parts, state: dict[str, Any]) -> Course:
    p.model.load_state_dict(state["model"])
    p.optimizer.load_state_dict(state["optimizer"])
    p.schedule.load_state_dict(state["schedule"])
    p.scaler.load_state_dict(state["scaler"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"].cpu())
    p.draws.order.set_state(rng["order"].cpu())
    p.draws.augment.set_state(rng["augment"].cpu())
    p.draws.mix.bit_generator.state = rng["mix"]
    if "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"].cpu(), p.on.images.device)
    course = dict(state["course"])
    best = dict(course["best"])
    best["probs"] = best["probs"].cpu().numpy() if best["probs"] is not None else None
    history = [EpochMetrics(**m) for m in course["history"]]
    return Course(**{**course, "history": history, "best": Best(**best)})


def start(
    cfg: TrainConfig, data: TrainData, p: Parts, checkpoint: CheckpointFile | None
) -> tuple[Parts, Course]:
    """A fresh course, or the one a checkpoint holds (copied into the parts, then let go). A state
    that does not fit (another version's, another model's) sets the file aside and starts afresh."""
    saved = checkpoint.take() if checkpoint is not None else None
    if saved is None:
        return p, Course()
    try:
        return p, restore(p, saved)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
        assert checkpoint is not None
        checkpoint.refuse(f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}")
        return setup(cfg, data, p.on.images.device), Course()  # the parts restore had begun to fill


def _tensor(array: np.ndarray | None) -> torch.Tensor | None:
    return torch.from_numpy(np.ascontiguousarray(array)) if array is not None else None


def fit(
    cfg: TrainConfig,
    data: TrainData,
    device: torch.device | str = "cpu",
    on_epoch: OnEpoch | None = None,
    progress: bool = False,
    checkpoint: CheckpointFile | None = None,
) -> FitResult:
    device = torch.device(device)
    started = time.perf_counter()
    p = setup(cfg, data, device)
    val_labels = data.table["label"].to_numpy()[data.val_rows]
    p, c = start(cfg, data, p, checkpoint)  # a retried run goes on where its predecessor stopped
    stop_reason = "completed"
    for epoch in range(c.epoch + 1, cfg.train.epochs + 1):
        # Stop early once validation macro-F1 has not improved for `patience` epochs.
        patience = cfg.train.patience
        if patience and len(val_labels) and c.epoch - c.best.epoch >= patience:
            stop_reason = f"early stop: no better val macro-F1 for {patience} epochs"
            break
        # Train: forward and backward every batch, an optimizer step every `accumulate` batches.
        p.model.train()
        tick = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        batches = epoch_batches(cfg, data, p.on, p.draws)
        shown = bar(batches, total=p.n_batches, desc=f"epoch {epoch}", unit="batch", enabled=progress)
        for step, (x, targets) in enumerate(shown, start=1):
            loss_sum += train_one_batch(p, cfg, x, targets, step)
            # Read the loss every 20 steps only (and at the first): a read makes the host wait.
            if step % 20 == 0 or step == p.n_batches or c.first_loss is None:
                mean_loss = loss_sum.item() / step
                c.check_loss(mean_loss, epoch, step)
                if progress:
                    shown.set_postfix(loss=f"{mean_loss:.3f}")
        c.train_seconds += time.perf_counter() - tick

        # Validate on the device, score on the host; a plateau schedule reacts to the score.
        metrics, probs = epoch_metrics(p, cfg, epoch, loss_sum, val_labels, tick)
        c.history.append(metrics)
        if metrics.val_macro_f1 is not None:
            p.schedule.epoch_end(metrics.val_macro_f1)
        # Keep the best epoch's weights; without validation people the last epoch is the best.
        score = metrics.val_macro_f1 if metrics.val_macro_f1 is not None else float(epoch)
        c.best.offer(epoch, score, p.model, probs)
        c.epoch = epoch
        if progress:
            tqdm.write(str(metrics))
        # Checkpoint: a run interrupted from here on continues after this epoch.
        if checkpoint is not None:
            checkpoint.save(snapshot(p, c))
        # Report the epoch: the search stops a hopeless run by raising here.
        if on_epoch is not None:
            on_epoch(epoch, metrics)

    assert c.best.state is not None  # every run trains at least one epoch
    p.model.load_state_dict(c.best.state)
    p.model.eval()
    return FitResult(
        model=p.model,
        best_epoch=c.best.epoch,
        best_val_macro_f1=c.best.score if len(val_labels) else None,
        history=c.history,
        val_probs=c.best.probs,
        val_labels=val_labels,
        stop_reason=stop_reason,
        images_per_s=p.epoch_size * len(c.history) / max(c.train_seconds, 1e-9),
        wall_s=time.perf_counter() - started,
        face_fallbacks=data.face_fallbacks,
    )


def save_run(out: str | Path, cfg: TrainConfig, result: FitResult) -> Path:
    """A model directory (maskcls.rundir) plus metrics.json: the best epoch and every epoch's figures."""
    out = write_model_dir(out, cfg, [result.model])
    write_json(
        out / "metrics.json",
        {
            "val_macro_f1": result.best_val_macro_f1,
            "best_epoch": result.best_epoch,
            "stop_reason": result.stop_reason,
            "images_per_s": result.images_per_s,
            "wall_s": result.wall_s,
            "face_crop_fallbacks": result.face_fallbacks,
            "history": [m.to_dict() for m in result.history],
        },
    )
    return out


def config_sources(path: str | None, overrides: Mapping[str, Any], cfg: TrainConfig) -> str:
    """One line saying where the run's config came from: the file, --set, --data, and for the
    folders of this machine (data.cache_dir) which value it took, since an export's recipe.yaml
    leaves them out."""
    from_file = read_yaml(path, "a mapping of config groups") if path else {}
    keys = {
        f"{group}.{key}"
        for group, values in from_file.items()
        if isinstance(values, Mapping)
        for key in values
    }
    parts = [f"{len(keys - set(overrides))} values from {path}"] if path else []
    if overrides:
        replaced = sorted(keys & set(overrides))
        note = f" (replacing the file's {', '.join(replaced)})" if replaced else ""
        parts.append(f"{', '.join(sorted(overrides))} from --set{note}")
    parts.append("data.root from --data")
    if "data.cache_dir" not in keys | set(overrides):
        parts.append(f"data.cache_dir {cfg.data.cache_dir} (the default)")
    return "config: " + "; ".join(parts) + "; the rest TrainConfig's defaults"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog("maskcls.train"),
        formatter_class=HelpFormatter,
        description="Train one mask-status classifier and write model.safetensors, config.json and "
        "metrics.json (val_macro_f1 of the best epoch and the per-epoch history).",
        epilog="Config keys: see maskcls/config.py (groups data, model, sampler, loss, optim, schedule, "
        "augment, train). Example: --set model.name=resnet18 --set 'data.image_size=[128,96]' "
        "--set train.epochs=10 --set optim.lr=3e-4 --set loss.name=focal\n"
        "An export's recipe.yaml is a --config file: it re-runs the exported trial's recipe as is.",
    )
    parser.add_argument("--data", required=True, help="data root in the competition layout")
    parser.add_argument("--out", required=True, help="run directory to write")
    parser.add_argument(
        "--config", help="YAML file with config groups, e.g. an export's recipe.yaml (optional)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. optim.lr=3e-4 (repeatable)",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:1 ...")
    add_threads_argument(parser)
    args = parser.parse_args(argv)

    overrides = parse_overrides(args.overrides)
    cfg = load(args.config, {**overrides, "data.root": args.data})
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory for the run")
    device = pick_device(args.device)
    weights.check_names([cfg.model])  # an unknown backbone, or missing ImageNet weights, stop here,
    weights.ensure([cfg.model])  # before the images are decoded
    faces.check(cfg.data)  # and a face boxes table that does not fit the data
    threads = configure_cpu(args.threads)
    data = load_data(cfg)
    print(config_sources(args.config, overrides, cfg), file=sys.stderr)  # after every input check
    print(
        f"{len(data.train_rows)} training and {len(data.val_rows)} validation images "
        f"({data.table['person'].nunique()} people), {cfg.model.name} on {device}, {threads} CPU threads",
        file=sys.stderr,
    )
    if data.face_fallbacks:
        print(f"{data.face_fallbacks} photos have no face box: cropped at the centre", file=sys.stderr)
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
