"""Losses on soft targets [B, C] (one-hot, or mixed by CutMix/Mixup), from one registry.

Every loss takes log_softmax of the model output, so single-head logits and multi-head
log-probabilities are treated alike. Class weights multiply each class's term.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from maskcls.config import LossConfig

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _ce(logp: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return -(weights * targets * logp).sum(1).mean()


def _focal(logp, targets, weights, gamma: float) -> torch.Tensor:
    """Down-weights easy examples by (1 - p) ** gamma; gamma = 0 is cross-entropy."""
    return -(weights * targets * (1 - logp.exp()).pow(gamma) * logp).sum(1).mean()


def _soft_f1(logp, targets, weights) -> torch.Tensor:
    """1 - macro-F1 computed on probabilities over the batch, for any number of classes."""
    p = logp.exp()
    tp = (p * targets).sum(0)
    fp = (p * (1 - targets)).sum(0)
    fn = ((1 - p) * targets).sum(0)
    f1 = 2 * tp / (2 * tp + fp + fn + 1e-7)
    return 1 - (weights * f1).sum() / weights.sum()


def _smooth(targets: torch.Tensor, eps: float) -> torch.Tensor:
    return targets * (1 - eps) + eps / targets.shape[1]


LOSSES: dict[str, Callable[[LossConfig], Callable]] = {
    "ce": lambda cfg: _ce,
    "focal": lambda cfg: lambda lp, t, w: _focal(lp, t, w, cfg.gamma),
    "label_smoothing": lambda cfg: lambda lp, t, w: _ce(lp, _smooth(t, cfg.eps), w),
    "f1": lambda cfg: _soft_f1,
    "ce_f1": lambda cfg: (
        lambda lp, t, w: (1 - cfg.f1_weight) * _ce(lp, t, w) + cfg.f1_weight * _soft_f1(lp, t, w)
    ),
}


def class_weights(cfg: LossConfig, counts: np.ndarray) -> np.ndarray:
    """none: all 1; balanced: n / (C * count) as scikit-learn; sqrt: its square root. Mean 1."""
    counts = np.maximum(counts, 1).astype(np.float64)
    weights = {"none": np.ones_like(counts), "balanced": counts.sum() / (len(counts) * counts)}.get(
        cfg.class_weights, np.sqrt(counts.sum() / (len(counts) * counts))
    )
    return weights / weights.mean()


def build(cfg: LossConfig, counts: np.ndarray, device: torch.device) -> Loss:
    weights = torch.as_tensor(class_weights(cfg, counts), dtype=torch.float32, device=device)
    loss = LOSSES[cfg.name](cfg)
    return lambda output, targets: loss(F.log_softmax(output.float(), dim=1), targets, weights)
