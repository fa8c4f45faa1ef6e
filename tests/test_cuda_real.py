"""The GPU paths on a real GPU: `pytest -m cuda`, run by bench/gpu_check.sh; skipped without one.

These catch what fake CUDA tensors cannot (tests/test_cuda_paths.py): values, backward, generator
devices, stream synchronisation inside the step loop, and real memory held and given back.
"""

import itertools

import optuna
import pytest
import torch
import yaml

from hpo import spec as specs
from hpo.objective import TrialFailed, make_objective
from maskcls import losses, memory
from maskcls.infer import infer
from maskcls.labels import NUM_CLASSES
from maskcls.models import build
from maskcls.optim import build_optimizer
from maskcls.train import Draws, epoch_batches, fit, load_data, to_device

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
CUDA = torch.device("cuda")


@pytest.mark.parametrize("backend", ["device", "albumentations"])
def test_fit_trains_and_validates_on_the_gpu(tiny_cfg, backend):
    cfg = tiny_cfg.override({"train.epochs": 2, "augment.backend": backend, "augment.cutmix_p": 0.5})
    result = fit(cfg, load_data(cfg, progress=False), CUDA)
    assert len(result.history) == 2 and all(
        h.val_macro_f1 is not None and h.val_loss >= 0 for h in result.history
    )
    assert next(result.model.parameters()).device.type == "cuda"


def test_a_training_epoch_never_waits_for_the_gpu(tiny_cfg):
    """Under CUDA's sync debug mode every synchronising call raises: the steps after the epoch's
    first batch (which uploads its order) must queue without one."""
    cfg = tiny_cfg.override({"augment.policy": "heavy", "augment.mixup_p": 0.5, "train.batch_size": 8})
    data = load_data(cfg, progress=False)
    on = to_device(data, CUDA, cfg.train.channels_last)
    model = build(cfg.model).to(CUDA, memory_format=torch.channels_last).train()
    counts = torch.bincount(torch.as_tensor(data.table["train_label"].to_numpy()), minlength=NUM_CLASSES)
    loss_fn = losses.build(cfg.loss, counts.numpy(), CUDA)
    optimizer = build_optimizer(model, cfg.optim)
    batches = epoch_batches(cfg, data, on, Draws.seeded(0, CUDA))
    first = next(batches)
    steps = 0
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, targets in itertools.chain([first], batches):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_fn(model(x), targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert steps > 2 and torch.isfinite(loss)


def test_inference_on_the_gpu_matches_the_cpu(tiny_cfg):
    cfg = tiny_cfg.override({"train.amp": False})
    data = load_data(cfg, progress=False)
    model = fit(cfg, data, CUDA).model
    on_gpu = infer(model, to_device(data, CUDA, True).images, 64, tta=True)
    on_cpu = infer(model.cpu(), to_device(data, torch.device("cpu"), True).images, 64, tta=True)
    assert abs(on_gpu - on_cpu).max() < 1e-3


def objective_for(small_root, tmp_path, fixed):
    path = tmp_path / "gpu.yaml"
    base = {
        "data.cache_dir": str(tmp_path / "cache"),
        "model.name": "mobilenetv3_small_050",
        "train.epochs": 1,
    }
    path.write_text(
        yaml.safe_dump(
            {
                "data": {"root": str(small_root)},
                "fixed": {**base, **fixed},
                "space": {"optim.lr": {"type": "float", "low": 1e-3, "high": 3e-3}},
                "pruner": "none",
            }
        )
    )
    return make_objective(specs.load(str(path)), CUDA, target=5, artifacts=None)


def run_one(objective):
    study = optuna.create_study(direction="maximize")
    study.optimize(objective, n_trials=1, catch=(TrialFailed,))
    memory.release(CUDA)  # as the worker does after every trial
    return study.trials[0]


def test_a_trial_holds_what_it_needs_and_peaks_below_it(small_root, tmp_path):
    memory.release(CUDA)
    before, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    trial = run_one(
        objective_for(small_root, tmp_path, {"data.image_size": [128, 96], "train.batch_size": 32})
    )
    assert trial.state == optuna.trial.TrialState.COMPLETE, trial.user_attrs.get("fail_reason")
    need, peak = trial.user_attrs["memory_need_mb"], trial.user_attrs["peak_memory_mb"]
    print(f"memory: estimated {need:.0f} MiB, peak {peak:.0f} MiB ({peak / need:.2f} of the estimate)")
    assert peak <= need
    assert torch.cuda.memory_allocated() == before  # everything given back after the trial,
    assert torch.cuda.memory_reserved() <= reserved  # the held reservation included (cuBLAS workspace)


def test_a_trial_too_big_for_the_gpu_fails_before_allocating(small_root, tmp_path):
    fixed = {"data.image_size": [256, 256], "train.batch_size": 65536, "train.eval_batch_size": 65536}
    before = torch.cuda.memory_allocated()
    trial = run_one(objective_for(small_root, tmp_path, fixed))
    assert trial.state == optuna.trial.TrialState.FAIL
    reason = trial.user_attrs["fail_reason"]
    assert "does not fit" in reason and "more than the GPU" in reason
    assert torch.cuda.memory_allocated() == before


def test_worker_slots_see_every_gpu():
    from hpo.run import visible_gpus

    assert len(visible_gpus()) == torch.cuda.device_count()
