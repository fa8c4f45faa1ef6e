"""Failure kinds decide what happens, by type: a broken CUDA context fails its trial once and
ends its worker, a fresh worker takes the slot and the study goes on; a GPU that keeps breaking
leaves the rotation; a trial is placed on a GPU only where the memory the GPU reports free holds
its estimate."""

import os
from pathlib import Path

import optuna
import pytest
import torch
from helpers import finish, hpo_run, load, write_spec

from hpo.failures import CudaPoisoned, DiskFull, cuda_poisoned, out_of_memory
from hpo.storage import counts
from maskcls import memory

FAULTS = Path(__file__).parent / "fault_injection"


def with_fault(fault: str, marker: Path) -> dict:
    path = os.pathsep.join([str(FAULTS), os.environ.get("PYTHONPATH", "")])
    return {"env": {**os.environ, "PYTHONPATH": path, "HPO_FAULT": f"{fault}:{marker}"}}


def test_the_kinds_come_from_types_and_torchs_own_words():
    accelerator_error = getattr(torch, "AcceleratorError", RuntimeError)  # its own type since torch 2.8
    assert cuda_poisoned(accelerator_error("CUDA error: an illegal memory access was encountered"))
    assert cuda_poisoned(RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"))  # torch gives no type
    assert cuda_poisoned(RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling cublasSgemm"))
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert out_of_memory(oom) and not cuda_poisoned(oom)  # a trial too big: the context is fine
    assert not cuda_poisoned(ValueError("CUDA error")) and not cuda_poisoned(RuntimeError("shape mismatch"))
    assert issubclass(CudaPoisoned, Exception) and CudaPoisoned.exit_code != DiskFull.exit_code


@pytest.mark.slow
def test_a_broken_cuda_context_fails_its_trial_once_and_a_new_worker_takes_the_slot(small_root, tmp_path):
    spec = write_spec(tmp_path, small_root, epochs=[2], n_trials=2, pruner={"name": "none"})
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    run = hpo_run(
        spec, storage, "--workers", "1", cwd=tmp_path, **with_fault("cuda-error", tmp_path / "fired")
    )
    code, out, err = finish(run)
    assert code == 0, err
    study = load(storage)
    broken = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert (
        len(broken) == 1
        and "AcceleratorError: CUDA error: an illegal memory access" in broken[0].user_attrs["fail_reason"]
    )
    retry = next(t for t in study.trials if t.user_attrs.get("retried_from") == broken[0].number)
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.params == broken[0].params
    assert retry.user_attrs["resumed_at_epoch"] == 1  # it went on from the checkpoint of epoch 1
    assert retry.user_attrs["worker"] != broken[0].user_attrs["worker"]  # a fresh process
    assert counts(study)["finished"] == 2 and counts(study)["running"] == 0
    assert "exited on a CUDA error" in err and "starting a fresh worker" in err and "Traceback" not in err


@pytest.mark.slow
def test_a_device_that_keeps_breaking_leaves_the_rotation_in_one_line(small_root, tmp_path):
    """Three recipes broken on one device within the window: not the trials' fault but the device's.
    (No retries in this spec, so that each break is a different recipe.)"""
    spec = write_spec(
        tmp_path,
        small_root,
        epochs=[2],
        n_trials=5,
        pruner={"name": "none"},
        heartbeat={"interval": 1, "grace": 4, "max_retry": 0},
    )
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    fault = with_fault("cuda-error-always", tmp_path / "fired")
    code, out, err = finish(hpo_run(spec, storage, "--workers", "1", cwd=tmp_path, **fault))
    out_of_rotation = [line for line in err.splitlines() if "out of the rotation" in line]
    assert code == 1 and len(out_of_rotation) == 2, err  # the device's line, then the run's
    assert "CUDA errors broke trials of 3 recipes" in out_of_rotation[0] and "Traceback" not in err
    assert counts(load(storage))["running"] == 0


def test_placement_refuses_a_gpu_whose_reported_free_memory_is_below_the_estimate(monkeypatch):
    """Another process holds most of the GPU: the hold is never even tried, the trial waits and
    then fails with the GPU's own figures, though our estimates alone would have fit."""
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    tried = []
    real_empty = torch.empty

    def empty(*args, **kwargs):
        if str(kwargs.get("device", "")).startswith("cuda"):
            tried.append(args)
            return real_empty(0)  # stands for the block held on the GPU
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)
    with pytest.raises(memory.NoRoom, match=r"needs 3.00 GiB; 2.00 GiB of 80.00 GiB still free"):
        memory.reserve(3 * gib, torch.device("cuda"), wait_s=0.05, poll_s=0.01)
    assert tried == []
    memory.reserve(1 * gib, torch.device("cuda"), wait_s=0.05, poll_s=0.01)  # what fits is held
    assert len(tried) == 1


def test_workers_number_gpus_as_nvml_does(monkeypatch):
    from hpo.run import gpu_slots

    monkeypatch.setattr("hpo.run.gpu_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert {s.env["CUDA_DEVICE_ORDER"] for s in gpu_slots(None, 1, None)} == {"PCI_BUS_ID"}


def test_an_interrupt_python_swallowed_still_stops_the_worker_before_its_next_trial(monkeypatch):
    """SIGINT's KeyboardInterrupt can land in a garbage-collection callback, where Python prints
    "Exception ignored" and goes on (seen in CI: the worker then ran six more trials after the
    dispatcher stopped it). The handler's flag stops the worker before its next trial."""
    import signal
    import threading
    from types import SimpleNamespace

    from hpo import worker

    monkeypatch.setattr(worker, "INTERRUPTED_BY_SIGNAL", threading.Event())
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(KeyboardInterrupt):
            worker._interrupt(signal.SIGINT, None)
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    assert worker.INTERRUPTED_BY_SIGNAL.is_set()  # as if that KeyboardInterrupt had been swallowed

    ran = []
    objective = worker.Watched(lambda trial: ran.append(trial.number) or 0.0)
    args = SimpleNamespace(target=5, deadline=None)
    with pytest.raises(KeyboardInterrupt):
        worker.trials(optuna.create_study(), objective, args, torch.device("cpu"), None, poll_s=0.01)
    assert ran == []
