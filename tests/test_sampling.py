import numpy as np
import torch

from maskcls.config import SamplerConfig
from maskcls.data.batches import epoch_indices

# Imbalanced like the real data: the largest class 30x the smallest.
COUNTS = np.array([600, 400, 60, 300, 200, 30] * 3)
LABELS = np.repeat(np.arange(18), COUNTS)


def drawn_share(cfg, epochs=20):
    gen = torch.Generator().manual_seed(0)
    drawn = np.concatenate([LABELS[epoch_indices(LABELS, cfg, gen).numpy()] for _ in range(epochs)])
    return np.bincount(drawn, minlength=18) / len(drawn), len(drawn) // epochs


def test_weighted_sampler_draws_classes_in_the_expected_proportions():
    for power in (0.0, 0.5, 1.0):
        share, size = drawn_share(SamplerConfig(name="weighted", power=power))
        expected = COUNTS ** (1 - power) / (COUNTS ** (1 - power)).sum()
        assert size == len(LABELS)
        # 20 epochs x 7,470 draws: a binomial share has sd < 0.002; allow 5 sd.
        assert np.abs(share - expected).max() < 0.01, (power, (share - expected).round(4))


def test_oversampling_reaches_the_configured_ratio():
    for ratio in (0.25, 0.5, 1.0):
        gen = torch.Generator().manual_seed(1)
        order = epoch_indices(LABELS, SamplerConfig(name="oversample", ratio=ratio), gen).numpy()
        counts = np.bincount(LABELS[order], minlength=18)
        target = int(np.ceil(ratio * COUNTS.max()))
        assert (counts == np.maximum(COUNTS, target)).all()
        assert set(range(len(LABELS))) <= set(order)  # every original image still appears


def test_no_sampler_is_a_permutation():
    order = epoch_indices(LABELS, SamplerConfig(name="none"), torch.Generator().manual_seed(0)).numpy()
    assert sorted(order) == list(range(len(LABELS)))
