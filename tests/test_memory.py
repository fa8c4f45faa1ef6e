"""Memory of a run: the estimate made before it starts, the hold on the GPU, the release after it.

No GPU here: the estimate is measured on fake tensors (the same on any machine) and checked against
a real forward on the CPU; the hold is exercised against a stand-in GPU whose neighbour frees memory.
"""

import weakref

import optuna
import pytest
import torch

from maskcls import memory, models
from maskcls.config import load

MiB = 2**20


def cfg_for(**values):
    base = {"model.name": "mobilenetv3_small_050", "data.image_size": [64, 48], "train.batch_size": 16}
    return load(None, {**base, **values})


def real_saved_bytes(model, x):
    """What the forward keeps for backward, measured on real tensors the same way."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(saved.values())


def test_fake_measurement_equals_a_real_forward():
    cfg = cfg_for()
    model = models.build(cfg.model)
    shape = (16, 3, 64, 48)
    assert memory.saved_for_backward(model, shape, None) == real_saved_bytes(model, torch.randn(shape))


def test_the_estimate_follows_images_batch_precision_and_optimizer():
    base = memory.estimate(cfg_for(), n_images=1000, amp_dtype=None)
    assert base.images == 1000 * 64 * 48 * 3
    params = sum(p.numel() * 4 for p in models.build(cfg_for().model).parameters())
    sgd = memory.estimate(cfg_for(**{"optim.name": "sgd"}), 1000, None)
    assert base.model - sgd.model == params  # AdamW keeps one more copy than SGD's momentum
    double = memory.estimate(cfg_for(**{"train.batch_size": 32, "train.eval_batch_size": 8}), 1000, None)
    single = memory.estimate(cfg_for(**{"train.eval_batch_size": 8}), 1000, None)
    assert 1.6 < double.activations / single.activations < 2.1  # weights are saved too: not quite 2x
    bf16 = memory.estimate(cfg_for(**{"train.eval_batch_size": 8}), 1000, torch.bfloat16)
    assert 0.4 < bf16.activations / single.activations < 0.7
    big_eval = memory.estimate(cfg_for(**{"train.eval_batch_size": 4096}), 1000, None)
    assert big_eval.activations > single.activations  # a large inference batch can set the peak
    assert base.total == base.images + base.model + base.activations + memory.HEADROOM
    assert "activations" in str(base) and "GiB" in str(base)


class StandInGpu:
    """mem_get_info and allocation of a 1 GiB GPU whose neighbour frees its memory after a few polls."""

    def __init__(self, neighbour_bytes, frees_after):
        self.total, self.neighbour, self.polls, self.frees_after = 1024 * MiB, neighbour_bytes, 0, frees_after

    def mem_get_info(self, device=None):
        self.polls += 1
        if self.polls > self.frees_after:
            self.neighbour = 0
        return self.total - self.neighbour, self.total

    def hold(self, need, device):
        return self.mem_get_info()[0] >= need


@pytest.fixture
def gpu(monkeypatch):
    def install(neighbour_bytes, frees_after):
        fake = StandInGpu(neighbour_bytes, frees_after)
        monkeypatch.setattr(torch.cuda, "mem_get_info", fake.mem_get_info)
        monkeypatch.setattr(memory, "_hold", fake.hold)
        return fake

    return install


def test_a_run_waits_for_its_neighbour_then_holds_its_memory(gpu):
    fake = gpu(neighbour_bytes=800 * MiB, frees_after=3)
    waited = memory.reserve(600 * MiB, torch.device("cuda"), wait_s=5, poll_s=0.01)
    assert fake.neighbour == 0 and waited > 0


def test_a_run_that_cannot_fit_fails_at_once_or_after_the_wait(gpu):
    gpu(neighbour_bytes=0, frees_after=0)
    with pytest.raises(memory.NoRoom, match=r"needs 2.00 GiB, more than the GPU's 1.00 GiB"):
        memory.reserve(2048 * MiB, torch.device("cuda"), wait_s=5, poll_s=0.01)
    gpu(neighbour_bytes=800 * MiB, frees_after=10**6)
    with pytest.raises(memory.NoRoom, match=r"0.22 GiB of 1.00 GiB still free after waiting"):
        memory.reserve(600 * MiB, torch.device("cuda"), wait_s=0.05, poll_s=0.01)


@pytest.mark.slow
def test_out_of_memory_releases_the_trials_tensors_before_freeing_the_cache(
    monkeypatch, tmp_path, small_root
):
    """When the allocator's cache is emptied, nothing of the failed trial may still be referenced
    (the traceback of an exception being handled holds every frame's tensors)."""
    import yaml

    from hpo import spec as specs
    from hpo.objective import TrialFailed, make_objective

    spec_path = tmp_path / "m.yaml"
    spec_path.write_text(
        yaml.safe_dump(
            {
                "data": {"root": str(small_root)},
                "fixed": {"data.cache_dir": str(tmp_path / "cache"), "data.image_size": [32, 24]},
                "space": {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2}},
            }
        )
    )
    alive_at_release = []
    trial_tensor = []

    def fit_that_runs_out(*args, **kwargs):
        weights = torch.ones(1000)  # stands for the trial's model and images
        trial_tensor.append(weakref.ref(weights))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def release(device):
        import gc

        gc.collect()
        alive_at_release.append(trial_tensor[0]() is not None)

    monkeypatch.setattr("hpo.objective.fit", fit_that_runs_out)
    monkeypatch.setattr(memory, "release", release)
    study = optuna.create_study(direction="maximize")
    objective = make_objective(specs.load(str(spec_path)), torch.device("cpu"), target=5, artifacts=None)
    study.optimize(objective, n_trials=1, catch=(TrialFailed,))
    assert study.trials[0].user_attrs["fail_reason"].startswith("out of memory on cpu")
    assert alive_at_release == [False]
