"""Optimizers and learning-rate schedules from their config groups.

Schedules step once per optimizer step (warmup, then the main shape), except `plateau`, which
also reacts once per epoch to validation macro-F1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim import lr_scheduler as sched

from maskcls.config import OptimConfig, ScheduleConfig

OPTIMIZERS = {
    "sgd": lambda params, cfg: torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay
    ),
    "adam": lambda params, cfg: torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay),
    "adamw": lambda params, cfg: torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay),
}


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    return OPTIMIZERS[cfg.name](model.parameters(), cfg)


def _main_factor(cfg: ScheduleConfig, steps_per_epoch: int, total: int, warmup: int):
    """lr multiplier after warmup, as a function of the step."""
    if cfg.name == "step":
        return lambda step: cfg.factor ** (step // (cfg.step_epochs * steps_per_epoch))
    if cfg.name == "cosine":
        span = max(total - warmup, 1)
        return lambda step: (
            cfg.min_lr_ratio
            + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(step - warmup, span) / span))
        )
    return lambda step: 1.0  # constant, plateau


@dataclass
class Schedule:
    """`per_step` after each optimizer step; `per_epoch(val_macro_f1)` after each validation."""

    per_step: sched.LRScheduler
    plateau: sched.ReduceLROnPlateau | None = None
    per_step_until: int | None = None  # plateau: stop the per-step warmup so it cannot undo a decay
    steps: int = 0

    def step(self) -> None:
        if self.per_step_until is None or self.steps < self.per_step_until:
            self.per_step.step()
        self.steps += 1

    def epoch_end(self, val_macro_f1: float) -> None:
        if self.plateau is not None:
            self.plateau.step(val_macro_f1)

    def state_dict(self) -> dict:
        plateau = self.plateau.state_dict() if self.plateau is not None else None
        return {"per_step": self.per_step.state_dict(), "plateau": plateau, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.per_step.load_state_dict(state["per_step"])
        if self.plateau is not None:
            self.plateau.load_state_dict(state["plateau"])
        self.steps = state["steps"]


def build_schedule(optimizer, cfg: ScheduleConfig, lr: float, steps_per_epoch: int, epochs: int) -> Schedule:
    total = steps_per_epoch * epochs
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total - 1)
    if cfg.name == "onecycle":  # its own warm-up: the rising part takes warmup_epochs
        start = max(warmup / total, 0.05)
        return Schedule(sched.OneCycleLR(optimizer, max_lr=lr, total_steps=total + 1, pct_start=start))
    main = _main_factor(cfg, steps_per_epoch, total, warmup)
    factor = lambda step: min(1.0, (step + 1) / (warmup + 1)) if step < warmup else main(step)  # noqa: E731
    per_step = sched.LambdaLR(optimizer, factor)
    if cfg.name != "plateau":
        return Schedule(per_step)
    plateau = sched.ReduceLROnPlateau(optimizer, mode="max", factor=cfg.factor, patience=cfg.patience)
    return Schedule(per_step, plateau, per_step_until=warmup)
