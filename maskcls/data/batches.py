"""Keep the data where the model is.

A trial moves the cached uint8 images to the training device once; an epoch is a tensor of row
indices moved there once (sampling is index arithmetic on the host), and batches are built by
indexing and augmented on the device. The albumentations backend reads the same cache in
DataLoader workers.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from maskcls.config import SamplerConfig
from maskcls.data.augment import POLICIES, Normalize, albumentations_transform, device_augment, to_input


def epoch_indices(labels: np.ndarray, cfg: SamplerConfig, gen: torch.Generator) -> torch.Tensor:
    """Positions into `labels` for one epoch, drawn the way the sampler config says.

    weighted: N draws with replacement, weight of a sample = (its class frequency) ** -power,
              so power 1 balances the classes and power 0 is plain shuffling.
    oversample: every class smaller than ratio x the largest is repeated up to that size.
    """
    n = len(labels)
    if cfg.name == "none":
        return torch.randperm(n, generator=gen)
    counts = np.bincount(labels)
    if cfg.name == "weighted":
        weights = torch.as_tensor(counts[labels].astype(np.float64) ** -cfg.power)
        return torch.multinomial(weights, n, replacement=True, generator=gen)
    target = int(np.ceil(cfg.ratio * counts.max()))
    parts = [torch.arange(n)]
    for cls in np.flatnonzero((counts > 0) & (counts < target)):
        members = torch.as_tensor(np.flatnonzero(labels == cls))
        extra = target - len(members)
        draws = torch.cat(
            [torch.randperm(len(members), generator=gen) for _ in range(extra // len(members) + 1)]
        )
        parts.append(members[draws[:extra]])
    everything = torch.cat(parts)
    return everything[torch.randperm(len(everything), generator=gen)]


class DeviceImages:
    """The cached uint8 images [N, H, W, 3], moved to the device once, with the normalisation
    constants made there once. Every batch is an index gather from it: `rows` are on the device."""

    def __init__(self, images: np.ndarray, device: torch.device | str, channels_last: bool = False):
        with warnings.catch_warnings():  # a read-only memmap is fine: these images are never written
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            self.images = torch.from_numpy(np.ascontiguousarray(images)).to(device)
        self.norm = Normalize.on(device)
        self.channels_last = channels_last

    def __len__(self) -> int:
        return len(self.images)

    @property
    def device(self) -> torch.device:
        return self.images.device

    def inputs(self, rows: torch.Tensor) -> torch.Tensor:
        """Normalised float model inputs, no augmentation (validation, inference)."""
        return to_input(self.images[rows], self.norm, self.channels_last)

    def augmented(self, rows: torch.Tensor, policy: str, gen: torch.Generator) -> torch.Tensor:
        return device_augment(self.images, rows, POLICIES[policy], gen, self.norm, self.channels_last)


class _Albumented(Dataset):
    """Rows of the memory-mapped cache, augmented per image: DataLoader workers share the page cache."""

    def __init__(self, cache: np.ndarray, rows: np.ndarray, policy_name: str):
        self.cache, self.rows = cache, rows
        self.transform = albumentations_transform(POLICIES[policy_name])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = np.asarray(self.cache[self.rows[i]])
        return torch.from_numpy(np.ascontiguousarray(self.transform(image=image)["image"]))


def device_batches(
    images: DeviceImages,
    rows: torch.Tensor,
    order: torch.Tensor,
    batch_size: int,
    policy: str,
    gen: torch.Generator,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(augmented, normalised batch, its positions) for one epoch. `order` holds positions into
    `rows` (rows of `images`); both are on the device, so a batch costs no host-device copy."""
    for positions in order.split(batch_size):
        yield images.augmented(rows[positions], policy, gen), positions


def albumentations_batches(
    cache: np.ndarray,
    rows: np.ndarray,
    order: torch.Tensor,
    order_on_device: torch.Tensor,
    batch_size: int,
    policy: str,
    workers: int,
    norm: Normalize,
    channels_last: bool,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The same contract, with per-image albumentations transforms in DataLoader workers: they read
    the host `order`, and each batch is copied to the device (pinned and asynchronous on CUDA)."""
    device = norm.scale.device
    loader = DataLoader(
        _Albumented(cache, rows, policy),
        batch_sampler=[chunk.tolist() for chunk in order.split(batch_size)],
        num_workers=workers,
        pin_memory=device.type == "cuda" and torch.cuda.is_available(),
    )
    for positions, batch in zip(order_on_device.split(batch_size), loader, strict=True):
        yield to_input(batch.to(device, non_blocking=True), norm, channels_last), positions
