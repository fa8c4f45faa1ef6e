"""hpo.export-best end to end on the finished test study: retrain, export, check, predict."""

import io
import json
import os
import re
import subprocess
import sys
import zipfile

import numpy as np
import onnxruntime as ort
import optuna
import pandas as pd
import pytest
import torch
import yaml
from helpers import recipe_of

from hpo import spec as specs
from hpo.storage import open_storage
from maskcls.config import portable
from maskcls.data import cache
from maskcls.data.augment import Normalize, to_input
from maskcls.data.layout import scan_eval
from maskcls.metrics import macro_f1
from maskcls.rundir import load_run

pytestmark = pytest.mark.slow


def export_best(tmp, spec, storage, *args):
    command = [
        sys.executable,
        "-m",
        "hpo.export-best",
        "--study",
        str(spec),
        "--storage",
        storage,
        "--artifacts",
        str(tmp / "artifacts"),
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp)


@pytest.fixture
def in_process(capsys, monkeypatch):
    """export-best or predict in this process (a retrain needs no fresh interpreter): the exit code
    and stderr; torch's thread count (the export sets it) is the process's own again afterwards."""
    import importlib

    from maskcls.cli import run_main

    threads = torch.get_num_threads()

    def call(module, cwd, *argv):
        monkeypatch.chdir(cwd)
        with pytest.raises(SystemExit) as end:
            run_main(importlib.import_module(module).main, [str(a) for a in argv])
        torch.set_num_threads(threads)
        return end.value.code, capsys.readouterr().err

    return call


def export_here(tmp, spec, storage, capsys, monkeypatch, *args):
    """export-best in this process (its refusals need no fresh interpreter): exit code and stderr."""
    from hpo.export_best import main
    from maskcls.cli import run_main

    monkeypatch.chdir(tmp)
    argv = ["--study", str(spec), "--storage", storage, "--artifacts", str(tmp / "artifacts"), *args]
    with pytest.raises(SystemExit) as end:
        run_main(main, argv)
    return end.value.code, capsys.readouterr().err


def onnx_vs_torch(export_dir, root):
    """An independent check in this process: both runtimes on every eval image."""
    cfg, model = load_run(export_dir)
    images = cache.build(
        list(scan_eval(root)["path"]), cfg.data.image_size, cfg.data.cache_dir, progress=False
    )
    x = to_input(torch.from_numpy(np.array(images)), Normalize.on("cpu"), channels_last=False)
    with torch.no_grad():
        expected = torch.softmax(model(x), 1).numpy()
    session = ort.InferenceSession(str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": x.numpy()})[0]
    return expected, got


@pytest.fixture(scope="module")
def exported(finished_study):
    tmp, spec, storage, _ = finished_study
    done = export_best(tmp, spec, storage, "--out", str(tmp / "export"))
    assert done.returncode == 0, done.stderr
    # What a log file gets: lines, no carriage-return bars, no library warnings.
    assert "\r" not in done.stderr and "Warning" not in done.stderr, done.stderr
    assert "retraining trial" in done.stderr and "exporting: ONNX" in done.stderr
    # The retrain's epochs, then what it measured in four lines and where the report is; not the
    # report itself.
    *epochs, exported, onnx, report, wrote = done.stdout.splitlines()
    assert all(line.startswith("epoch ") for line in epochs) and len(epochs) <= 3, done.stdout
    assert exported.startswith("exported (") and onnx.startswith("ONNX agrees with PyTorch: argmax ")
    assert [report, wrote] == [f"report: {tmp / 'export' / 'report.md'}", f"wrote {tmp / 'export'}"]
    return tmp, spec, storage, tmp / "export"


def test_export_runs_in_a_fresh_process_and_onnx_agrees(exported, small_root):
    tmp, spec, storage, out = exported
    assert {
        "model.safetensors",
        "config.json",
        "model.onnx",
        "report.md",
        "submission.csv",
        "metrics.json",
        "confusion_matrix.png",
        "recipe.yaml",
    } <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["members"] == 1 and config["classes"]["17"] == "not_wear/female/60+"
    # A serving container running as another user reads it: what mkdir and open give under the
    # umask (0755 and 0644 under the usual 022), not the 0700 / 0600 of temporary files.
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~umask}
    assert config["preprocessing"]["image_size"] == [32, 24] and len(config["preprocessing"]["mean"]) == 3
    expected, got = onnx_vs_torch(out, small_root)
    assert (expected.argmax(1) == got.argmax(1)).all()
    # The dashboard's study note: the search's part (hpo.run) and the export's, one after the other.
    from optuna_dashboard import get_note

    note = get_note(optuna.load_study(study_name="t", storage=open_storage(storage, existing=True)))
    assert note.index("### Search") < note.index("```yaml") < note.index("### Last export"), note
    assert f"- in `{out.resolve()}` (report.md there)" in note and "training photos of 24 people" in note
    assert np.abs(expected - got).max() < 1e-4

    predicted = tmp / "fresh" / "submission.csv"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "maskcls.predict",
            str(out),
            "--data",
            str(small_root),
            "--out",
            str(predicted.parent),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp,
    )
    assert run.returncode == 0, run.stderr
    info = pd.read_csv(small_root / "eval" / "info.csv")
    for path in (predicted, out / "submission.csv"):
        sub = pd.read_csv(path)
        assert list(sub["ImageID"]) == list(info["ImageID"]) and sub["ans"].between(0, 17).all()
    assert pd.read_csv(predicted).equals(pd.read_csv(out / "submission.csv"))  # the export alone suffices

    metrics = json.loads((out / "metrics.json").read_text())
    gt = pd.read_csv(small_root / "eval" / "gt.csv")["ans"].to_numpy()
    score = macro_f1(gt, pd.read_csv(out / "submission.csv")["ans"].to_numpy())
    assert metrics["eval_macro_f1"] == pytest.approx(score)
    assert f"| submission vs eval/gt.csv | {score:.4f} |" in (out / "report.md").read_text()
    study = optuna.load_study(study_name="t", storage=open_storage(storage))
    assert study.user_attrs["export"]["trial"] == study.best_trial.number
    record = study.user_attrs["export"]  # the zipped export is a study artifact, the export itself
    store = optuna.artifacts.FileSystemArtifactStore(str(tmp / "artifacts"))
    with store.open_reader(record["artifact_id"]) as reader, zipfile.ZipFile(io.BytesIO(reader.read())) as z:
        assert z.read("model.onnx") == (out / "model.onnx").read_bytes()
        assert {"config.json", "model.safetensors", "report.md", "submission.csv"} <= set(z.namelist())


def test_the_exports_recipe_yaml_reruns_the_trial_and_is_a_specs_fixed_values(exported, tmp_path):
    tmp, spec, storage, out = exported
    study = optuna.load_study(study_name="t", storage=open_storage(storage))
    trial = next(t for t in study.trials if t.number == study.user_attrs["export"]["trial"])
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    config = recipe_of(trial, spec, tmp / "artifacts", study._storage)
    # The trial's recipe, less the folders of the machine that ran it.
    assert recipe == portable(config) and "root" not in recipe["data"] and "cache_dir" not in recipe["data"]
    elsewhere = tmp_path / "elsewhere"  # another machine's working folder: nothing of the study's
    elsewhere.mkdir()
    command = [sys.executable, "-m", "maskcls.train", "--config", str(out / "recipe.yaml")]
    command += ["--data", config["data"]["root"], "--out", str(tmp_path / "again"), "--threads", "1"]
    again = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=elsewhere)
    assert again.returncode == 0, again.stderr
    rerun = json.loads((tmp_path / "again" / "config.json").read_text())["train_config"]
    assert portable(rerun) == recipe and rerun["data"]["cache_dir"] != config["data"]["cache_dir"]
    assert (elsewhere / rerun["data"]["cache_dir"]).is_dir()  # its own default cache, not the study's
    space = {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2}}  # a spec searches something
    (tmp_path / "again.yaml").write_text(yaml.safe_dump({"study": "again", "fixed": recipe, "space": space}))
    assert portable(specs.load(str(tmp_path / "again.yaml")).base.to_dict()) == recipe


def test_the_report_shows_the_study_the_recipe_and_what_each_figure_was_measured_on(exported, small_root):
    tmp, spec, storage, out = exported
    report = (out / "report.md").read_text()
    study = optuna.load_study(study_name="t", storage=open_storage(storage))
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    pruned = sum(t.state.name == "PRUNED" for t in finished)
    assert f"{len(finished)} finished trials ({pruned} pruned)" in report and pruned > 0
    assert "![study learning curves](study_curves.png)" in report
    assert (out / "study_curves.png").read_bytes().startswith(b"\x89PNG")
    assert "- `optim.lr`: " in report and "- `train.epochs`: " in report  # the two searched parameters
    recipe = (
        report.split("## Complete recipe (fixed and searched values)")[1].split("```json")[1].split("```")[0]
    )
    trial = next(t for t in study.trials if t.number == study.user_attrs["export"]["trial"])
    assert json.loads(recipe) == recipe_of(
        trial, spec, tmp / "artifacts", study._storage
    )  # the trial's, not the retrain's
    images = len(pd.read_csv(small_root / "eval" / "gt.csv"))
    assert f"| the data root's eval set: {images} images (about {images // 7} people) |" in report
    assert (
        "| study best value | " in report
        and "| the search's validation people (30% of the training" in report
    )
    shown = r"Accuracy per attribute: mask [01]\.\d{4}, gender [01]\.\d{4}, age band [01]\.\d{4}\."
    assert re.search(shown, report)


def study_args(tmp, spec, storage):
    return ["--study", spec, "--storage", storage, "--artifacts", tmp / "artifacts"]


def test_holdout_reproduces_the_trials_validation_f1(exported, in_process, monkeypatch):
    tmp, spec, storage, _ = exported
    # This machine's $HPO_CACHE, not the folder the trial's machine decoded into (a cluster's
    # node-local disk): the same pixels, so the same F1.
    monkeypatch.setenv("HPO_CACHE", str(tmp / "node-local"))
    code, err = in_process(
        "hpo.export_best", tmp, *study_args(tmp, spec, storage), "--holdout", "--out", tmp / "holdout"
    )
    assert code == 0, err
    metrics = json.loads((tmp / "holdout" / "metrics.json").read_text())
    print(f"trial {metrics['trial_value']:.6f} vs holdout retrain {metrics['val_macro_f1']:.6f}")
    # Same seed, split, code path and (recorded) thread count on the CPU: the same run again.
    assert metrics["val_macro_f1"] == pytest.approx(metrics["trial_value"], abs=1e-9)
    assert list((tmp / "node-local").glob("*/images-*.npy")), "the retrain decoded elsewhere"


def test_folds_export_an_ensemble_that_onnx_reproduces(exported, small_root, in_process):
    tmp, spec, storage, _ = exported
    code, err = in_process(
        "hpo.export_best", tmp, *study_args(tmp, spec, storage), "--folds", "3", "--out", tmp / "folds"
    )
    assert code == 0, err
    config = json.loads((tmp / "folds" / "config.json").read_text())
    assert config["members"] == 3
    metrics = json.loads((tmp / "folds" / "metrics.json").read_text())
    assert len(metrics["fold_macro_f1"]) == 3 and 0 <= metrics["val_macro_f1"] <= 1
    expected, got = onnx_vs_torch(tmp / "folds", small_root)
    assert (expected.argmax(1) == got.argmax(1)).all() and np.abs(expected - got).max() < 1e-4


def predict_eval(tmp, model_dir, root, in_process):
    out = tmp / f"predicted-{model_dir.name}"
    code, err = in_process("maskcls.predict", tmp, model_dir, "--data", root, "--out", out)
    assert code == 0, err
    return pd.read_csv(out / "submission.csv")


def test_top_k_exports_one_ensemble_of_distinct_trials_that_onnx_and_predict_agree_on(
    exported, small_root, in_process
):
    tmp, spec, storage, _ = exported
    out = tmp / "top2"
    args = ["--top-k", "2", "--holdout", "--weighting", "f1", "--out", out]
    code, err = in_process("hpo.export_best", tmp, *study_args(tmp, spec, storage), *args)
    assert code == 0, err
    study = optuna.load_study(study_name="t", storage=open_storage(storage))
    best_two = sorted(
        (t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE), key=lambda t: -t.value
    )
    assert best_two[0].params != best_two[1].params  # the fixture's two enqueued recipes differ
    config = json.loads((out / "config.json").read_text())
    assert config["members"] == 2 and len(config["member_configs"]) == 2
    epochs = [c["train"]["epochs"] for c in config["member_configs"]]
    assert epochs == [t.params["train.epochs"] for t in best_two[:2]]
    assert config["weights"] == pytest.approx(
        [t.value / (best_two[0].value + best_two[1].value) for t in best_two[:2]], abs=1e-5
    )

    metrics = json.loads((out / "metrics.json").read_text())
    members = metrics["members"]
    assert [m["trial"] for m in members] == [t.number for t in best_two[:2]]
    # Each member retrained on its own trial's split reproduces the trial (same seed and threads).
    for member, trial in zip(members, best_two, strict=False):
        assert member["retrain"] == pytest.approx(trial.value, abs=1e-9)
    report = (out / "report.md").read_text()
    for m in members:
        assert f"| {m['trial']} | {m['search']:.4f} | {m['retrain']:.4f} | {m['weight']:.3f} |" in report
    assert f"| ensemble | - | {metrics['val_macro_f1']:.4f} | 1.000 |" in report

    expected, got = onnx_vs_torch(out, small_root)  # one graph holds both members
    assert (expected.argmax(1) == got.argmax(1)).all() and np.abs(expected - got).max() < 1e-4
    predicted = predict_eval(tmp, out, small_root, in_process)
    assert (predicted["ans"].to_numpy() == got.argmax(1)).all()  # predict agrees on every eval image
    assert predicted.equals(pd.read_csv(out / "submission.csv"))
    assert study.user_attrs["export"]["members"] == [t.number for t in best_two[:2]]


def test_top_k_refuses_zero_more_than_the_distinct_trials_and_folds(exported, tmp_path, capsys, monkeypatch):
    tmp, spec, storage, _ = exported
    study = optuna.load_study(study_name="t", storage=open_storage(storage))
    distinct = {json.dumps(t.params, sort_keys=True) for t in study.trials if t.state.name == "COMPLETE"}
    checks = [
        (("--top-k", "0"), "--top-k must be at least 1, got 0"),
        (
            ("--top-k", str(len(distinct) + 1)),
            f"has only {len(distinct)} complete trials with distinct recipes",
        ),
        (("--top-k", "2", "--folds", "3"), "--top-k and --folds do not combine"),
    ]
    for args, message in checks:  # ours: exactly one line
        code, err = export_here(tmp, spec, storage, capsys, monkeypatch, *args, "--out", str(tmp_path / "x"))
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
        assert message in lines[0]
    code, err = export_here(
        tmp, spec, storage, capsys, monkeypatch, "--top-k", "2", "--trial", "0", "--out", str(tmp_path / "x")
    )
    assert code == 2 and "argument --trial: not allowed with argument --top-k" in err  # argparse's
    assert not (tmp_path / "x").exists()


def test_bad_input_is_one_clear_error_exit_2_and_nothing_half_written(
    exported, tmp_path, capsys, monkeypatch
):
    tmp, spec, storage, out = exported
    checks = [
        (("--trial", "999", "--out", str(tmp_path / "a")), "trial 999 does not exist"),
        (("--out", str(out)), "exists and is not empty; pass --force"),
        (("--out", str(tmp), "--force"), "--force replaces only a previous export"),  # the study's folder
    ]
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    optuna.create_study(study_name="t", storage=open_storage(empty))
    for args, message in checks:
        code, err = export_here(tmp, spec, storage, capsys, monkeypatch, *args)
        assert code == 2 and message in err and "Traceback" not in err, err
    assert (tmp / "study.db").is_file() and (tmp / "artifacts").is_dir()  # --force deleted nothing
    code, err = export_here(tmp, spec, empty, capsys, monkeypatch, "--out", str(tmp_path / "b"))
    assert code == 2 and "has no finished trial yet" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert not [p for p in tmp.iterdir() if p.name.startswith(".export")]  # no temporary leftovers
    from maskcls.cli import run_main
    from maskcls.predict import main as predict

    with pytest.raises(SystemExit) as end:
        run_main(predict, [str(tmp_path), "--data", str(tmp)])
    assert end.value.code == 2 and "not a run or export directory" in capsys.readouterr().err


def test_force_replaces_a_previous_export_and_nothing_else(exported, tmp_path):
    """A folder that holds anything besides a previous export's own files is never replaced."""
    tmp, spec, storage, out = exported
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(out, copy)
    (copy / "notes.txt").write_text("mine")
    from maskcls.errors import UserError
    from maskcls.rundir import check_out

    with pytest.raises(UserError, match="also holds notes.txt, which --force would delete"):
        check_out(copy, force=True)
    (copy / "notes.txt").unlink()
    check_out(copy, force=True)  # a previous export alone: replaceable


def test_config_preprocessing_alone_reproduces_the_model_outside_the_project(exported, small_root):
    """A deployment with PIL, numpy and onnxruntime only (the README's recipe) gets our probabilities."""
    from PIL import Image

    tmp, spec, storage, out = exported
    pre = json.loads((out / "config.json").read_text())["preprocessing"]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    paths = list(scan_eval(small_root)["path"])
    expected, _ = onnx_vs_torch(out, small_root)
    for path, want in zip(paths, expected, strict=True):
        img = Image.open(path).convert("RGB")
        w0, h0, c = *img.size, pre["center_crop"]
        img = img.crop(
            (
                round(w0 * (1 - c) / 2),
                round(h0 * (1 - c) / 2),
                round(w0 * (1 + c) / 2),
                round(h0 * (1 + c) / 2),
            )
        )
        h, w = pre["image_size"]
        x = np.asarray(img.resize((w, h), Image.BILINEAR), np.float32) / 255
        x = ((x - pre["mean"]) / pre["std"]).transpose(2, 0, 1)[None].astype(np.float32)
        got = session.run(["probabilities"], {"image": x})[0][0]
        assert np.abs(got - want).max() < 1e-4


def test_a_plain_training_run_exports_without_a_study(tiny_cfg, tmp_path, capsys):
    from maskcls.train import fit, load_data, save_run

    cfg = tiny_cfg.override({"train.epochs": 2})
    run = save_run(tmp_path / "run", cfg, fit(cfg, load_data(cfg, progress=False), "cpu"))
    command = [sys.executable, "-m", "maskcls.export", str(run), "--out", str(tmp_path / "export")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "export"
    assert {
        "model.safetensors",
        "config.json",
        "model.onnx",
        "submission.csv",
        "report.md",
        "metrics.json",
    } <= {p.name for p in out.iterdir()}
    metrics = json.loads((out / "metrics.json").read_text())
    trained = json.loads((run / "metrics.json").read_text())
    assert metrics["val_macro_f1"] == trained["val_macro_f1"] and metrics["onnx"]["max_abs_diff"] < 1e-4
    assert (
        f"| run | {trained['val_macro_f1']:.4f} | the run's validation people |"
        in (out / "report.md").read_text()
    )
    expected, got = onnx_vs_torch(out, cfg.data.root)
    assert (expected.argmax(1) == got.argmax(1)).all()
    from maskcls.cli import run_main
    from maskcls.export import main as export

    for argv, message in (
        ([str(run), "--out", str(out)], "pass --force"),
        ([str(tmp_path), "--out", str(tmp_path / "x")], "not a run or export directory"),
    ):
        with pytest.raises(SystemExit) as end:
            run_main(export, argv)
        err = capsys.readouterr().err
        assert end.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_decision_biases_are_baked_into_the_onnx_graph_and_predict_agrees(tiny_cfg, tmp_path, in_process):
    from maskcls.export import complete, run_info
    from maskcls.rundir import write_model_dir
    from maskcls.train import fit, load_data

    cfg = tiny_cfg.override({"train.epochs": 1})
    result = fit(cfg, load_data(cfg, progress=False), "cpu")
    plain, biased = tmp_path / "plain", tmp_path / "biased"
    biases = [0.0] * 18
    biases[2], biases[17] = 2.5, 3.0  # pushes decisions to two 60+ classes
    for folder, b in ((plain, None), (biased, biases)):
        write_model_dir(folder, cfg, [result.model], biases=b)
        complete(folder, cfg.data.root, torch.device("cpu"), run_info(folder))
    assert json.loads((biased / "config.json").read_text())["biases"] == biases
    p_plain, _ = onnx_vs_torch(plain, cfg.data.root)
    expected, got = onnx_vs_torch(biased, cfg.data.root)
    assert (expected.argmax(1) == got.argmax(1)).all() and np.abs(expected - got).max() < 1e-4
    shifted = np.log(p_plain + 1e-12) + np.array(biases)  # the graph applies exactly these biases
    assert (got.argmax(1) == shifted.argmax(1)).all() and (got.argmax(1) != p_plain.argmax(1)).any()
    predicted = predict_eval(tmp_path, biased, cfg.data.root, in_process)
    assert (predicted["ans"].to_numpy() == got.argmax(1)).all()


def test_calibrating_without_held_out_predictions_is_one_clear_error(exported, tmp_path, capsys, monkeypatch):
    tmp, spec, storage, _ = exported
    code, err = export_here(
        tmp, spec, storage, capsys, monkeypatch, "--calibrate", "bias", "--out", str(tmp_path / "x")
    )
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: --calibrate bias fits decision biases on held-out predictions")
    assert not (tmp_path / "x").exists()
