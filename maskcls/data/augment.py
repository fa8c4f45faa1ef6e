"""Augmentation policies, one vocabulary for both backends.

`device`: whole batches on the training device (flip, scale/shift/rotate through one affine
grid_sample, colour jitter), so no CPU work per image. `albumentations`: the same policy per image
in DataLoader workers, the backend to extend with transforms the batched path lacks.
CutMix, Mixup and normalisation are batch operations and run on the device for both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import albumentations as A
import numpy as np
import torch
import torch.nn.functional as F

from maskcls.config import MEAN, STD, AugmentConfig


@dataclass(frozen=True)
class Policy:
    flip: bool = False
    scale: tuple[float, float] = (1.0, 1.0)  # zoom range; > 1 zooms in
    shift: float = 0.0  # max translation as a share of the side
    rotate: float = 0.0  # max rotation in degrees
    jitter: float = 0.0  # brightness, contrast and saturation strength


POLICIES = {
    "none": Policy(),
    "flip": Policy(flip=True),
    "light": Policy(flip=True, scale=(0.95, 1.1), shift=0.05, jitter=0.1),
    "medium": Policy(flip=True, scale=(0.9, 1.2), shift=0.08, rotate=8, jitter=0.2),
    "heavy": Policy(flip=True, scale=(0.8, 1.3), shift=0.12, rotate=15, jitter=0.35),
}


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) * (hi - lo) + lo


def device_augment(x: torch.Tensor, policy: Policy, gen: torch.Generator) -> torch.Tensor:
    """Augment a float batch [B, 3, H, W] in [0, 1], each image with its own random draw."""
    n, device = x.shape[0], x.device
    if policy.flip:
        flip = torch.rand(n, generator=gen, device=device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if policy.scale != (1.0, 1.0) or policy.shift or policy.rotate:
        zoom = _uniform(n, *policy.scale, gen, device)
        angle = _uniform(n, -policy.rotate, policy.rotate, gen, device) * (math.pi / 180)
        tx, ty = (_uniform(n, -2 * policy.shift, 2 * policy.shift, gen, device) for _ in range(2))
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if policy.jitter:
        j = policy.jitter
        bright = _uniform(n, 1 - j, 1 + j, gen, device)[:, None, None, None]
        contrast = _uniform(n, 1 - j, 1 + j, gen, device)[:, None, None, None]
        saturation = _uniform(n, 1 - j, 1 + j, gen, device)[:, None, None, None]
        x = x * bright
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * contrast + mean
        grey = x.mean(dim=1, keepdim=True)
        x = ((x - grey) * saturation + grey).clamp_(0, 1)
    return x


def albumentations_transform(policy: Policy) -> A.Compose:
    """The same policy, per image, on uint8 HWC arrays."""
    steps = []
    if policy.flip:
        steps.append(A.HorizontalFlip(p=0.5))
    if policy.scale != (1.0, 1.0) or policy.shift or policy.rotate:
        steps.append(
            A.Affine(
                scale=policy.scale,
                translate_percent=(-policy.shift, policy.shift),
                rotate=(-policy.rotate, policy.rotate),
                border_mode=4,
                p=1.0,
            )
        )
    if policy.jitter:
        j = policy.jitter
        steps.append(A.ColorJitter(brightness=j, contrast=j, saturation=j, hue=0, p=1.0))
    return A.Compose(steps)


def normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN, device=x.device, dtype=x.dtype)[None, :, None, None]
    std = torch.tensor(STD, device=x.device, dtype=x.dtype)[None, :, None, None]
    return (x - mean) / std


def mix(
    x: torch.Tensor, targets: torch.Tensor, cfg: AugmentConfig, rng: np.random.Generator, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix or Mixup on a batch with soft targets [B, C]; at most one of them per batch."""
    draw = rng.random()
    if draw >= cfg.cutmix_p + cfg.mixup_p or x.shape[0] < 2:
        return x, targets
    perm = torch.randperm(x.shape[0], generator=gen, device=x.device)
    if draw < cfg.cutmix_p:
        lam = rng.beta(cfg.cutmix_alpha, cfg.cutmix_alpha)
        h, w = x.shape[2:]
        ch, cw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = rng.integers(h), rng.integers(w)
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)  # the share actually kept
    else:
        lam = rng.beta(cfg.mixup_alpha, cfg.mixup_alpha)
        x = lam * x + (1 - lam) * x[perm]
    return x, lam * targets + (1 - lam) * targets[perm]
