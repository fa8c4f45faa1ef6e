import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskcls.config import LossConfig
from maskcls.losses import build, class_weights

COUNTS = np.arange(1, 19) * 10


def batch(seed=0, n=32):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 18, generator=gen) * 3
    labels = torch.randint(0, 18, (n,), generator=gen)
    return logits, labels, F.one_hot(labels, 18).float()


def loss(name, **kw):
    return build(LossConfig(name=name, **kw), COUNTS, torch.device("cpu"))


def test_focal_with_gamma_zero_equals_cross_entropy():
    logits, labels, targets = batch()
    expected = F.cross_entropy(logits, labels)
    assert torch.allclose(loss("focal", gamma=0.0)(logits, targets), expected, atol=1e-6)
    assert torch.allclose(loss("ce")(logits, targets), expected, atol=1e-6)
    assert loss("focal", gamma=2.0)(logits, targets) < expected  # easy examples weigh less


def test_label_smoothing_with_eps_zero_equals_cross_entropy_and_smooths_otherwise():
    logits, labels, targets = batch()
    assert torch.allclose(loss("label_smoothing", eps=0.0)(logits, targets), F.cross_entropy(logits, labels))
    smoothed = F.cross_entropy(logits, labels, label_smoothing=0.1)
    assert torch.allclose(loss("label_smoothing", eps=0.1)(logits, targets), smoothed, atol=1e-6)


def test_f1_loss_works_with_18_classes():
    logits, labels, targets = batch(n=64)
    value = loss("f1")(logits.requires_grad_(), targets)
    value.backward()
    assert 0 < value.item() < 1 and logits.grad.abs().sum() > 0
    perfect = targets * 50.0
    assert loss("f1")(perfect, targets).item() < 0.01  # a perfect prediction scores macro-F1 ~1
    mixed = loss("ce_f1", f1_weight=0.25)(logits, targets)
    expected = 0.75 * loss("ce")(logits, targets) + 0.25 * loss("f1")(logits, targets)
    assert torch.allclose(mixed, expected)


def test_class_weights():
    assert np.allclose(class_weights(LossConfig(class_weights="none"), COUNTS), 1)
    balanced = class_weights(LossConfig(class_weights="balanced"), COUNTS)
    assert balanced[0] / balanced[-1] == pytest.approx(18) and balanced.mean() == pytest.approx(1)
    sqrt = class_weights(LossConfig(class_weights="sqrt"), COUNTS)
    assert sqrt[0] / sqrt[-1] == pytest.approx(np.sqrt(18))
    logits, labels, targets = batch()
    weighted = loss("ce", class_weights="balanced")(logits, targets)
    assert not torch.allclose(weighted, loss("ce")(logits, targets))
