"""Every tensor a training step, validation or inference touches is on the trial's device.

No GPU here: the CUDA paths run on fake CUDA tensors (tests/fake_cuda.py), which raise when an op
mixes devices, and `Traffic` counts host-device copies and syncs. These are the functions that fit,
predict and export run, not copies of them. The albumentations backend's DataLoader draws its seed
with `.item()`, which fake tensors cannot answer; `pytest -m cuda` (tests/test_cuda_real.py) trains
with it on a real GPU.
"""

import contextlib

import numpy as np
import pytest
import torch
from fake_cuda import CUDA, Traffic, fake_cuda

from maskcls import losses, models
from maskcls.config import LossConfig, ModelConfig
from maskcls.data.batches import DeviceImages
from maskcls.infer import predict_probs
from maskcls.labels import NUM_CLASSES
from maskcls.train import Draws, epoch_batches, evaluate, load_data, step_loss, to_device


def host_draws(seed=0):
    """A CUDA generator needs a real GPU; fake tensors accept a host one (the GPU check covers it)."""
    return Draws(
        torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    )


@pytest.fixture
def data(tiny_cfg):
    return load_data(tiny_cfg, progress=False)


def on_cuda(*tensors):
    return all(t.device.type == "cuda" for t in tensors)


def build_on_cuda(cfg: ModelConfig):
    with torch.device("cuda"):
        return models.build(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("every_image", [True, False], ids=["device backend", "albumentations backend"])
def test_validation_loss_and_probabilities_stay_on_the_device(tiny_cfg, data, every_image):
    counts = np.bincount(data.table["train_label"], minlength=NUM_CLASSES)
    with fake_cuda():
        on = to_device(data, CUDA, channels_last=True, every_image=every_image)
        model = build_on_cuda(tiny_cfg.model)
        for weights in ("none", "balanced"):
            loss_fn = losses.build(LossConfig(class_weights=weights), counts, CUDA)
            probs, loss = evaluate(model, on, loss_fn, batch_size=16, amp=contextlib.nullcontext)
            assert on_cuda(probs, loss)
            assert probs.shape == (len(data.val_rows), NUM_CLASSES) and loss.shape == ()
    # the albumentations backend trains from the host cache: only validation images go to the device
    assert len(on.images) == (len(data.table) if every_image else len(data.val_rows))


CHOICES = [
    {},
    {"augment.policy": "heavy", "sampler.name": "oversample"},
    {"augment.policy": "none", "sampler.name": "none"},
    {"augment.cutmix_p": 1.0},
    {"augment.mixup_p": 1.0, "train.channels_last": False},
    {"model.age_aux_weight": 0.5, "augment.cutmix_p": 1.0},
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "choice", CHOICES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default"
)
def test_a_training_epoch_copies_only_its_order_to_the_device(tiny_cfg, data, choice):
    cfg = tiny_cfg.override(choice)
    counts = np.bincount(data.table["train_label"], minlength=NUM_CLASSES)
    with fake_cuda():
        on = to_device(data, CUDA, cfg.train.channels_last, ages=cfg.model.age_aux_weight > 0)
        model = build_on_cuda(cfg.model).train()
        loss_fn = losses.build(cfg.loss, counts, CUDA)
        with Traffic() as traffic:
            steps = 0
            for x, targets in epoch_batches(cfg, data, on, host_draws()):
                forward = model.forward_with_age if cfg.model.age_aux_weight > 0 else model
                loss = step_loss(forward, loss_fn, cfg, x, targets)  # forward and loss; backward needs a GPU
                assert on_cuda(x, targets, loss)
                steps += 1
    assert steps == -(-len(data.train_rows) // cfg.train.batch_size) or cfg.sampler.name != "none"
    assert len(traffic.uploads) == 1, traffic.uploads  # the epoch's order, once
    assert traffic.syncs == []


@pytest.mark.parametrize("name", list(losses.LOSSES))
def test_every_loss_runs_on_the_device(name):
    counts = np.arange(1, NUM_CLASSES + 1) * 10
    with fake_cuda():
        output = torch.randn(8, NUM_CLASSES, device=CUDA)
        targets = torch.softmax(torch.randn(8, NUM_CLASSES, device=CUDA), 1)
        for weights in ("none", "balanced", "sqrt"):
            loss = losses.build(LossConfig(name=name, class_weights=weights), counts, CUDA)(output, targets)
            assert on_cuda(loss)


@pytest.mark.slow
def test_inference_with_tta_on_an_ensemble_stays_on_the_device(tiny_cfg, data):
    with fake_cuda():
        with torch.device("cuda"):
            ensemble = models.Ensemble(
                [
                    models.build(tiny_cfg.model),
                    models.build(ModelConfig(name=tiny_cfg.model.name, head="multi")),
                ]
            )
        images = DeviceImages(data.images, CUDA, channels_last=True)
        rows = torch.arange(len(images), device=CUDA)
        with Traffic() as traffic:
            probs = predict_probs(ensemble, images, rows, batch_size=32, tta=True)
    assert on_cuda(probs) and probs.shape == (len(data.table), NUM_CLASSES)
    assert traffic.uploads == [] and traffic.syncs == []


def test_the_checks_themselves_catch_mixing_and_copies():
    """The fake device is strict: a host tensor in a device op raises (FakeTensorDeviceMismatchError
    since torch 2.7, a RuntimeError naming both devices before), a copy is recorded."""
    with fake_cuda():
        weights = torch.ones(NUM_CLASSES, device=CUDA)
        with pytest.raises(RuntimeError, match="(?i)device"):
            weights * torch.ones(4, NUM_CLASSES)
        with Traffic() as traffic:
            torch.arange(4).to(CUDA)
            torch.tensor([0.5, 0.2], device=CUDA)
    assert len(traffic.uploads) == 2
