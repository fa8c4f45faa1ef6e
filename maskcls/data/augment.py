"""Augmentation policies, one vocabulary for both backends.

`device`: whole batches on the training device (flip, scale/shift/rotate through one affine
grid_sample, colour jitter), so no CPU work per image. `albumentations`: the same policy per image
in DataLoader workers, the backend to extend with transforms the batched path lacks.
CutMix, Mixup and normalisation are batch operations and run on the device for both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from maskcls.config import MEAN, STD, AugmentConfig

if TYPE_CHECKING:
    import albumentations as A


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


@dataclass(frozen=True)
class Normalize:
    """Per-channel scale and bias that map uint8 values straight to normalised floats.

    Made once per device and passed in: building them from Python lists is a host-to-device copy,
    which on CUDA blocks the CPU until the GPU has caught up, once per batch if done there.
    """

    scale: torch.Tensor
    bias: torch.Tensor

    @classmethod
    def on(cls, device: torch.device | str) -> Normalize:
        mean, std = torch.tensor(MEAN), torch.tensor(STD)
        return cls((1 / (255 * std)).to(device), (-mean / std).to(device))


def _to_nchw(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """[B, H, W, 3] -> [B, 3, H, W]; the permuted view already has the channels_last layout."""
    x = x.permute(0, 3, 1, 2)
    return x if channels_last else x.contiguous()


def to_input(batch: torch.Tensor, norm: Normalize, channels_last: bool = True) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> normalised float [B, 3, H, W] in one fused pass."""
    return _to_nchw(torch.addcmul(norm.bias, batch.float(), norm.scale), channels_last)


def _warp(store: torch.Tensor, rows: torch.Tensor, policy: Policy, gen: torch.Generator) -> torch.Tensor:
    """Flip, zoom, shift and rotate the images `store[rows]` at once: one nearest-neighbour gather.

    Each output pixel copies the source pixel its inverse affine map points to (clamped to the
    border), read straight from the uint8 store: the batch is never copied out before warping.
    """
    n, (h, w) = len(rows), store.shape[1:3]
    device = store.device
    zoom = _uniform(n, *policy.scale, gen, device)[:, None, None]
    angle = (_uniform(n, -policy.rotate, policy.rotate, gen, device) * (math.pi / 180))[:, None, None]
    shift_y, shift_x = (
        _uniform(n, -policy.shift, policy.shift, gen, device)[:, None, None] for _ in range(2)
    )
    mirror = torch.ones(n, 1, 1, device=device)
    if policy.flip:
        mirror = torch.where(torch.rand(n, 1, 1, generator=gen, device=device) < 0.5, -1.0, 1.0)
    # Output pixel centres in [-1, 1], mapped back to source pixel indices.
    ys = torch.linspace(-1 + 1 / h, 1 - 1 / h, h, device=device)[None, :, None]
    xs = torch.linspace(-1 + 1 / w, 1 - 1 / w, w, device=device)[None, None, :]
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    if policy.rotate:  # rows and columns depend on both coordinates: a full 2-D map
        src_x = mirror * (cos * xs - sin * ys * (h / w)) + 2 * shift_x
        src_y = sin * xs * (w / h) + cos * ys + 2 * shift_y
    else:  # separable: one row index per output row, one column index per output column
        src_x, src_y = mirror * cos * xs + 2 * shift_x, cos * ys + 2 * shift_y
    index = torch.int32 if store.shape[0] * h * w < 2**31 else torch.int64  # int32 is faster, when it fits
    col = ((src_x + 1) * (w / 2)).to(index).clamp_(0, w - 1)
    row = ((src_y + 1) * (h / 2)).to(index).clamp_(0, h - 1)
    base = rows[:, None, None].to(index) * (h * w)
    pixel = ((base + row * w) + col).view(-1)  # broadcast to [n, h, w] only here
    return store.view(-1, 3).index_select(0, pixel).view(n, h, w, 3)


def device_augment(
    store: torch.Tensor,
    rows: torch.Tensor,
    policy: Policy,
    gen: torch.Generator,
    norm: Normalize,
    channels_last: bool = True,
) -> torch.Tensor:
    """Images `store[rows]` (uint8 [N, H, W, 3] on the device) -> augmented, normalised float
    [B, 3, H, W]; every image its own random draw."""
    n, device = len(rows), store.device
    if policy.flip or policy.scale != (1.0, 1.0) or policy.shift or policy.rotate:
        batch = _warp(store, rows, policy, gen)
    else:
        batch = store[rows]
    if not policy.jitter:
        return to_input(batch, norm, channels_last)
    # Brightness b, contrast c and saturation s in one in-place pass over the float image:
    # y = b*x;  y = (y - mean(y))*c + mean(y);  out = (y - grey(y))*s + grey(y)
    j = policy.jitter
    b, c, s = (_uniform(n, 1 - j, 1 + j, gen, device)[:, None, None, None] for _ in range(3))
    x = batch.float()
    grey = ((x[..., 0] + x[..., 1] + x[..., 2]) / 3).unsqueeze(3)  # 7x faster than mean(3) here
    offset = (b * c * (1 - s)) * grey + b * (1 - c) * grey.mean((1, 2), keepdim=True)
    torch.addcmul(offset, x, b * c * s, out=x).clamp_(0, 255)  # fused multiply-add: one pass each
    torch.addcmul(norm.bias, x, norm.scale, out=x)
    return _to_nchw(x, channels_last)


def albumentations_transform(policy: Policy) -> A.Compose:
    """The same policy, per image, on uint8 HWC arrays."""
    import albumentations as A  # half a second of start-up, for the backend that uses it only

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
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)  # the share actually kept
    else:
        lam = rng.beta(cfg.mixup_alpha, cfg.mixup_alpha)
        x = lam * x + (1 - lam) * x[perm]
    return x, lam * targets + (1 - lam) * targets[perm]
