"""Every recipe choice trains a step; the loop reports, stops and refuses as promised."""

import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from maskcls.config import load
from maskcls.predict import submission
from maskcls.rundir import load_run
from maskcls.train import Diverged, fit, load_data, save_run

CHOICES = (
    [{"loss.name": n} for n in ("ce", "focal", "label_smoothing", "f1", "ce_f1")]
    + [{"sampler.name": n} for n in ("none", "weighted", "oversample")]
    + [{"schedule.name": n} for n in ("constant", "step", "cosine", "plateau", "onecycle")]
    + [{"optim.name": n} for n in ("sgd", "adam", "adamw")]
    + [
        {"model.head": "multi"},
        {"model.dropout": 0.3, "model.dropout_samples": 3},
        {"loss.class_weights": "balanced"},
        {"train.accumulate": 2},
        {"train.channels_last": False},
    ]
    + [{"augment.policy": p} for p in ("none", "flip", "light", "medium", "heavy")]
    + [
        {"augment.backend": "albumentations", "augment.policy": "heavy"},
        {"augment.cutmix_p": 1.0},
        {"augment.mixup_p": 1.0},
    ]
    + [
        {"model.age_aux_weight": 0.5},
        {"model.age_aux_weight": 1.0, "model.head": "multi", "augment.mixup_p": 1.0},
        {"model.age_aux_weight": 0.5, "augment.backend": "albumentations"},
    ]
)


@pytest.mark.slow
@pytest.mark.parametrize("choice", CHOICES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_every_choice_trains_a_step(tiny_cfg, choice):
    cfg = tiny_cfg.override({**choice, "train.epochs": 1})  # its schedule, loss and batches: one epoch
    result = fit(cfg, load_data(cfg, progress=False), "cpu")
    assert len(result.history) == 1 and result.best_epoch == 1
    assert all(math.isfinite(h.train_loss) for h in result.history)
    assert 0 <= result.best_val_macro_f1 <= 1
    assert result.val_probs.shape == (len(load_data(cfg, progress=False).val_rows), 18)


@pytest.mark.slow
def test_on_epoch_gets_metrics_and_raising_stops_training(tiny_cfg):
    cfg = tiny_cfg.override({"train.epochs": 5})
    seen = []

    class Stop(Exception):
        pass

    def on_epoch(epoch, metrics):
        seen.append((epoch, set(metrics.to_dict())))
        if epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        fit(cfg, load_data(cfg, progress=False), "cpu", on_epoch=on_epoch)
    assert [e for e, _ in seen] == [1, 2]
    assert {"val_macro_f1", "val_per_class_f1", "val_accuracy", "val_loss", "train_loss"} <= seen[0][1]


@pytest.mark.slow
def test_nan_stops_with_its_reason(tiny_cfg):
    cfg = tiny_cfg.override(
        {
            "optim.name": "sgd",
            "optim.lr": 1e30,
            "train.clip_grad": None,
            "schedule.warmup_epochs": 0,
            "train.epochs": 3,
        }
    )
    with pytest.raises(Diverged, match=r"loss became (nan|inf) at epoch \d, step \d+; lower optim.lr"):
        fit(cfg, load_data(cfg, progress=False), "cpu")


@pytest.mark.slow
def test_training_on_everyone_keeps_the_last_epoch(tiny_cfg):
    data = load_data(tiny_cfg, progress=False).everyone()
    result = fit(tiny_cfg.override({"train.epochs": 2}), data, "cpu")
    assert result.best_epoch == 2 and result.best_val_macro_f1 is None


@pytest.mark.slow
def test_run_directory_round_trip_and_submission(tiny_cfg, tmp_path):
    result = fit(tiny_cfg, load_data(tiny_cfg, progress=False), "cpu")
    save_run(tmp_path / "run", tiny_cfg, result)
    cfg, model = load_run(tmp_path / "run")
    assert cfg == tiny_cfg
    table = submission(model, cfg, tiny_cfg.data.root, "cpu", tta=True, progress=False)
    info = pd.read_csv(f"{tiny_cfg.data.root}/eval/info.csv")
    assert list(table["ImageID"]) == list(info["ImageID"]) and table["ans"].between(0, 17).all()


@pytest.mark.slow
def test_a_200_person_run_learns_well_above_chance(tmp_path):
    """Acceptance: 200 people at 64x48, mobilenetv3_small_050, 6 epochs, CPU."""
    from maskcls.data.synth import generate

    root = generate(tmp_path / "s200", people=200, eval_people=0, seed=0, size=(96, 128), progress=False)
    cfg = load(
        None,
        {
            "data.root": str(root),
            "data.image_size": [64, 48],
            "data.cache_dir": str(tmp_path / "c"),
            "model.name": "mobilenetv3_small_050",
            "train.epochs": 6,
            "train.batch_size": 32,
            "optim.lr": 3e-3,
        },
    )
    result = fit(cfg, load_data(cfg, progress=False), "cpu")
    print(f"val macro-F1 per epoch: {[round(h.val_macro_f1, 3) for h in result.history]}")
    assert result.best_val_macro_f1 > 0.15  # chance is 1/18 = 0.056


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300)


def in_process(module, *argv):
    """An entry point's main in this process, for what it refuses before any training: exit code."""
    import importlib

    from maskcls.cli import run_main

    with pytest.raises(SystemExit) as end:
        run_main(importlib.import_module(module).main, list(argv))
    return end.value.code


@pytest.mark.slow
def test_train_cli_writes_a_run_and_refuses_bad_config(tiny_cfg, tmp_path, capsys):
    common = [
        "--data",
        tiny_cfg.data.root,
        "--out",
        str(tmp_path / "run"),
        "--set",
        "model.name=mobilenetv3_small_050",
        "--set",
        "data.image_size=[32,24]",
        "--set",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    assert in_process("maskcls.train", *common, "--set", "loss.name=dice") == 2
    err = capsys.readouterr().err
    assert "valid choices: ce, focal" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    good = run_cli("maskcls.train", *common, "--set", "train.epochs=2", "--set", "train.batch_size=16")
    assert good.returncode == 0, good.stderr  # the command itself, in its own process
    metrics = pd.read_json(tmp_path / "run" / "metrics.json", typ="series")
    assert 0 <= metrics["val_macro_f1"] <= 1 and len(metrics["history"]) == 2
    assert (
        in_process(
            "maskcls.predict",
            str(tmp_path / "run"),
            "--data",
            tiny_cfg.data.root,
            "--out",
            str(tmp_path / "p"),
        )
        == 0
    )
    sub = tmp_path / "p" / "submission.csv"
    assert np.array_equal(
        pd.read_csv(sub)["ImageID"], pd.read_csv(f"{tiny_cfg.data.root}/eval/info.csv")["ImageID"]
    )
    assert in_process("maskcls.train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")) == 2
    assert "data root does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_early_stopping_follows_the_history(tiny_cfg):
    """With patience 1 the run continues exactly while each epoch beats the best so far."""
    cfg = tiny_cfg.override({"train.epochs": 8, "train.patience": 1, "optim.lr": 1e-2})
    result = fit(cfg, load_data(cfg, progress=False), "cpu")
    scores = [h.val_macro_f1 for h in result.history]
    improved = [s > max(scores[:i]) for i, s in enumerate(scores) if i > 0]
    assert all(improved[:-1])  # it went on only after improvements
    if len(scores) < 8:
        assert not improved[-1] and result.stop_reason.startswith("early stop")
    else:
        assert result.stop_reason == "completed"
    assert result.best_val_macro_f1 == max(scores) and scores[result.best_epoch - 1] == max(scores)


def test_a_moved_age_cutoff_changes_training_labels_not_validation_labels(tiny_cfg):
    moved = tiny_cfg.override({"data.old_age": 45})
    standard, shifted = load_data(tiny_cfg, progress=False), load_data(moved, progress=False)
    assert (standard.table["label"] == shifted.table["label"]).all()
    changed = shifted.table["train_label"] != shifted.table["label"]
    assert changed.any() and (shifted.table.loc[changed, "age"].between(45, 59)).all()
    result = fit(moved, shifted, "cpu")
    assert np.array_equal(result.val_labels, standard.table["label"].to_numpy()[standard.val_rows])


@pytest.mark.slow
def test_the_age_head_trains_and_leaves_the_exported_output_as_it_was(tiny_cfg, tmp_path):
    import torch

    from maskcls import models
    from maskcls.export import check_onnx, export_onnx

    cfg = tiny_cfg.override({"model.age_aux_weight": 1.0, "train.epochs": 2})
    data = load_data(cfg, progress=False)
    torch.manual_seed(cfg.data.seed)
    untrained = models.build(cfg.model)
    result = fit(cfg, data, "cpu")
    assert result.model.age is not None
    assert not torch.equal(result.model.age.weight, untrained.age.weight)  # it learned from the ages
    run = save_run(tmp_path / "run", cfg, result)
    _, model = load_run(run)
    x = torch.zeros(3, 3, *cfg.data.image_size)
    with torch.no_grad():
        assert model(x).shape == (3, 18)
    check = check_onnx(export_onnx(model, cfg.data.image_size, tmp_path / "m.onnx"), model, data.images[:20])
    assert check.argmax_agree == 20 and check.max_abs_diff < 1e-4
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [o.shape[1] for o in session.get_outputs()] == [18]  # one output, the 18 classes
