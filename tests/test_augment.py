import numpy as np
import pytest
import torch

from maskcls.config import MEAN, STD, AugmentConfig
from maskcls.data.augment import (
    POLICIES,
    Normalize,
    Policy,
    _warp,
    albumentations_transform,
    device_augment,
    mix,
    to_input,
)

STORE = torch.randint(0, 256, (10, 16, 12, 3), dtype=torch.uint8)
ROWS = torch.tensor([3, 1, 4, 1, 5, 9])
NORM = Normalize.on("cpu")


def to_uint8(x):
    """Undo the normalisation: [B, 3, H, W] floats back to [B, H, W, 3] pixel values."""
    pixels = (x.permute(0, 2, 3, 1) * torch.tensor(STD) + torch.tensor(MEAN)) * 255
    return pixels.round()


def test_to_input_normalises_like_the_formula():
    x = to_input(STORE[ROWS], NORM)
    expected = (
        STORE[ROWS].permute(0, 3, 1, 2).float() / 255 - torch.tensor(MEAN)[:, None, None]
    ) / torch.tensor(STD)[:, None, None]
    assert torch.allclose(x, expected, atol=1e-5) and x.shape == (6, 3, 16, 12)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert to_input(STORE[ROWS], NORM, channels_last=False).is_contiguous()


def test_no_policy_is_the_identity_and_flip_is_an_exact_mirror():
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(
        to_uint8(device_augment(STORE, ROWS, POLICIES["none"], gen, NORM)), STORE[ROWS].float()
    )
    flipped = _warp(STORE, ROWS, Policy(flip=True), gen)
    same = [torch.equal(f, s) for f, s in zip(flipped, STORE[ROWS], strict=True)]
    mirrored = [torch.equal(f, s.flip(1)) for f, s in zip(flipped, STORE[ROWS], strict=True)]
    assert all(a or b for a, b in zip(same, mirrored, strict=True)) and any(mirrored) and any(same)


def test_geometric_policies_keep_source_pixels_and_vary_per_image():
    gen = torch.Generator().manual_seed(1)
    store = torch.arange(16 * 12, dtype=torch.int32).view(1, 16, 12, 1).expand(2, 16, 12, 3).to(torch.uint8)
    warped = _warp(store.contiguous(), torch.tensor([0, 0, 0, 0]), POLICIES["heavy"], gen)
    assert set(warped.unique().tolist()) <= set(store.unique().tolist())  # nearest neighbour: no new values
    assert not torch.equal(warped[0], warped[1])  # each image its own draw


@pytest.mark.parametrize("policy", list(POLICIES))
def test_every_policy_stays_in_the_pixel_range(policy):
    x = device_augment(STORE, ROWS, POLICIES[policy], torch.Generator().manual_seed(2), NORM)
    pixels = to_uint8(x)
    assert x.shape == (6, 3, 16, 12) and pixels.min() >= 0 and pixels.max() <= 255


def test_albumentations_backend_uses_the_same_policy_names():
    image = STORE[0].numpy()
    for name, policy in POLICIES.items():
        out = albumentations_transform(policy)(image=image)["image"]
        assert out.shape == image.shape and out.dtype == np.uint8, name
    assert np.array_equal(albumentations_transform(POLICIES["none"])(image=image)["image"], image)


def test_cutmix_and_mixup_mix_targets_by_the_kept_share():
    x = to_input(STORE[ROWS], NORM)
    targets = torch.nn.functional.one_hot(torch.arange(6), 18).float()
    for cfg in (AugmentConfig(cutmix_p=1.0), AugmentConfig(mixup_p=1.0)):
        mixed, soft = mix(x, targets, cfg, np.random.default_rng(0), torch.Generator().manual_seed(0))
        assert mixed.shape == x.shape and torch.allclose(soft.sum(1), torch.ones(6))
        assert (soft.max(1).values < 1).any()
    same, hard = mix(x, targets, AugmentConfig(), np.random.default_rng(0), torch.Generator())
    assert same is x and hard is targets
