"""Face crop: the boxes table, its geometry, the cache that applies it, and the same crop at train,
predict and export (checked against the README's onnxruntime recipe on the stand-in's true boxes)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import optuna
import pandas as pd
import pytest
import yaml
from helpers import finish, hpo_run, recipe_of, storage_at, write_spec
from helpers import load as load_study
from PIL import Image

from maskcls.config import load
from maskcls.data import cache
from maskcls.data.faces import STANDIN_TABLES, crop_for, face_window, read_boxes
from maskcls.data.layout import all_photos, scan, scan_eval
from maskcls.errors import UserError


def test_the_window_grows_the_box_takes_the_models_aspect_and_stays_in_the_photo():
    assert face_window((100, 100, 200, 200), 0.0, 1.0, 400, 500) == (100, 100, 200, 200)
    assert face_window((100, 100, 200, 200), 0.25, 1.0, 400, 500) == (75, 75, 225, 225)
    x0, y0, x1, y1 = face_window((100, 100, 200, 200), 0.0, 4 / 3, 400, 500)  # a 4:3 portrait model
    assert x1 - x0 == 100 and abs((y1 - y0) - 400 / 3) <= 1 and (x0 + x1) / 2 == 150
    assert face_window((0, 0, 50, 60), 0.5, 1.0, 400, 500) == (0, 0, 120, 120)  # moved inside
    assert face_window((10, 10, 390, 490), 0.5, 1.0, 400, 500) == (0, 0, 400, 500)  # cut to the photo


def test_the_stand_in_ships_a_box_for_every_photo_inside_it(small_root):
    boxes = read_boxes([small_root / t for t in STANDIN_TABLES], small_root)
    assert set(boxes) == {str(Path(p).resolve()) for p in all_photos(small_root)}
    for x0, y0, x1, y1 in boxes.values():
        assert 0 <= x0 < x1 <= 48 and 0 <= y0 < y1 <= 64 and (x1 - x0) * (y1 - y0) > 0.2 * 48 * 64


def face_cfg(root, tmp_path, **values):
    overrides = {
        "data.root": str(root),
        "data.image_size": [32, 24],
        "data.cache_dir": str(tmp_path / "cache"),
        "data.val_ratio": 0.3,
        "data.crop": "face",
        "data.face_margin": 0.1,
        "model.name": "mobilenetv3_small_050",
        "train.epochs": 1,
        "train.batch_size": 16,
        "optim.lr": 3e-3,
    }
    return load(None, {**overrides, **values})


def recipe_input(path, box, pre):
    """The README's onnxruntime recipe, written out independently of maskcls.data.faces."""
    img = Image.open(path).convert("RGB")
    W, H = img.size
    h, w = pre["image_size"]
    if pre["crop"] == "face" and box is not None:
        x0, y0, x1, y1 = box
        m = pre["face_margin"]
        bw, bh = (x1 - x0) * (1 + 2 * m), (y1 - y0) * (1 + 2 * m)
        a = h / w  # the model's aspect
        bw, bh = (bw, bw * a) if bh < bw * a else (bh / a, bh)
        bw, bh = min(bw, W), min(bh, H)
        left = min(max((x0 + x1) / 2 - bw / 2, 0), W - bw)
        top = min(max((y0 + y1) / 2 - bh / 2, 0), H - bh)
        img = img.crop((round(left), round(top), round(left + bw), round(top + bh)))
    x = np.asarray(img.resize((w, h), Image.BILINEAR), np.float32) / 255
    return ((x - pre["mean"]) / pre["std"]).transpose(2, 0, 1).astype(np.float32)


def test_the_cache_crops_each_photo_around_its_box_and_its_key_follows_the_boxes(small_root, tmp_path):
    cfg = face_cfg(small_root, tmp_path)
    paths = list(scan(small_root)["path"])[:10]
    images, crop = cache.images_for(cfg.data, paths, progress=False)
    boxes = read_boxes([small_root / STANDIN_TABLES[0]], small_root)
    pre = {"image_size": [32, 24], "crop": "face", "face_margin": 0.1, "mean": 0, "std": 1 / 255}
    for path, image in zip(paths, images, strict=True):
        expected = recipe_input(path, boxes[path], pre).transpose(1, 2, 0)
        assert np.array_equal(image, expected.round().astype(np.uint8))
    assert crop.fallbacks == 0
    center, _ = cache.images_for(cfg.override({"data.crop": "center"}).data, paths, progress=False)
    wider, _ = cache.images_for(cfg.override({"data.face_margin": 0.3}).data, paths, progress=False)
    assert not np.array_equal(center, images) and not np.array_equal(wider, images)
    assert len(list((tmp_path / "cache").glob("images-*.npy"))) == 3


def copy_root(root, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(root, copy)
    return copy


def train_argv(root, tmp_path, *sets):
    argv = ["--data", str(root), "--out", str(tmp_path / "run")]
    for key, value in face_cfg(root, tmp_path).to_dict()["data"].items():
        if key in ("image_size", "cache_dir", "val_ratio", "crop", "face_margin"):
            argv += ["--set", f"data.{key}={json.dumps(value)}"]
    argv += ["--set", "model.name=mobilenetv3_small_050", "--set", "train.epochs=1"]
    argv += ["--set", "train.batch_size=16", "--threads", "2"]
    for item in sets:
        argv += ["--set", item]
    return argv


def train(root, tmp_path, *sets):
    command = [sys.executable, "-m", "maskcls.train", *train_argv(root, tmp_path, *sets)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_photos_without_a_box_fall_back_and_are_counted(small_root, tmp_path):
    root = copy_root(small_root, tmp_path)
    table = pd.read_csv(root / STANDIN_TABLES[0])
    table.drop(index=[0, 5, 9]).to_csv(root / STANDIN_TABLES[0], index=False)
    done = train(root, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "3 photos have no face box: cropped at the centre" in done.stderr
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["face_crop_fallbacks"] == 3


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing", "face boxes table {table}: file not found"),
        ("not numbers", "row(s) without a box x0 < x1, y0 < y1 in finite numbers (first: line 3"),
        ("outside", "1 box(es) outside their photo (first: train/images/"),
        ("unknown photo", "1 row(s) for photos that are not in"),
        ("no column", "missing column(s) y1"),
    ],
)
def test_a_bad_boxes_table_is_one_line_and_exit_2(small_root, tmp_path, damage, message, capsys):
    root = copy_root(small_root, tmp_path)
    table_path = root / STANDIN_TABLES[0]
    table = pd.read_csv(table_path)
    if damage == "missing":
        table_path = tmp_path / "nowhere.csv"
    elif damage == "not numbers":
        table["x0"] = table["x0"].astype(object)
        table.loc[1, "x0"] = "left"
    elif damage == "outside":
        table.loc[4, "x1"] = 500.0
    elif damage == "unknown photo":
        table.loc[len(table)] = ["train/images/nobody/mask1.jpg", 1, 1, 20, 20, 1.0, "hand"]
    else:
        table = table.drop(columns=["y1"])
    if damage != "missing":
        table.to_csv(table_path, index=False)
    from maskcls.cli import run_main
    from maskcls.train import main

    with pytest.raises(SystemExit) as end:  # in this process: it stops before any training
        run_main(main, train_argv(root, tmp_path, f"data.face_boxes={table_path}"))
    stderr = capsys.readouterr().err
    lines = stderr.strip().splitlines()
    assert end.value.code == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("error: face boxes table") and message.format(table=table_path) in lines[0]
    assert not (tmp_path / "run").exists()


def test_no_table_for_a_face_crop_names_the_fix(tiny_root, tmp_path):
    root = copy_root(tiny_root, tmp_path)
    for name in STANDIN_TABLES:
        (root / name).unlink()
    with pytest.raises(UserError, match="no boxes table: set data.face_boxes"):
        crop_for(face_cfg(root, tmp_path).data, list(scan(root)["path"]))


@pytest.fixture
def in_process(capsys):
    """An entry point's main in this process: exit code, stdout, stderr; torch's thread count is
    the process's own again afterwards (train and export set it)."""
    import importlib

    import torch

    from maskcls.cli import run_main

    threads = torch.get_num_threads()

    def call(module, *argv):
        with pytest.raises(SystemExit) as end:
            run_main(importlib.import_module(module).main, [str(a) for a in argv])
        torch.set_num_threads(threads)
        out, err = capsys.readouterr()
        return end.value.code, out, err

    return call


@pytest.mark.slow
def test_face_crop_trains_exports_and_the_onnx_recipe_reproduces_predict(small_root, tmp_path, in_process):
    code, _, err = in_process("maskcls.train", *train_argv(small_root, tmp_path))
    assert code == 0, err
    export = tmp_path / "export"
    code, _, err = in_process("maskcls.export", tmp_path / "run", "--out", export)
    assert code == 0, err
    pre = json.loads((export / "config.json").read_text())["preprocessing"]
    assert (pre["crop"], pre["face_margin"]) == ("face", 0.1)

    code, _, err = in_process("maskcls.predict", export, "--data", small_root, "--out", tmp_path / "p")
    assert code == 0, err
    predicted = pd.read_csv(tmp_path / "p" / "submission.csv")
    assert predicted.equals(pd.read_csv(export / "submission.csv"))

    boxes = read_boxes([small_root / STANDIN_TABLES[1]], small_root)
    evals = scan_eval(small_root)
    session = ort.InferenceSession(str(export / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.stack([recipe_input(p, boxes[p], pre) for p in evals["path"]])
    probs = session.run(["probabilities"], {"image": x})[0]
    assert list(probs.argmax(1)) == list(predicted["ans"])  # every eval image

    photos = list(evals["path"][:3])  # single photos with their boxes given: the same classes
    code, out, err = in_process(
        "maskcls.predict", export, *photos, "--face-boxes", small_root / STANDIN_TABLES[1]
    )
    assert code == 0, err
    assert [int(line.split("\t")[1]) for line in out.splitlines()] == list(predicted["ans"][:3])


@pytest.mark.slow
def test_hpo_run_crops_faces_and_a_table_that_does_not_fit_stops_it_before_any_trial(
    small_root, tmp_path, in_process
):
    fixed = {"data.crop": "face", "data.face_margin": 0.1}
    spec = write_spec(tmp_path, small_root, epochs=[1], n_trials=2)
    spec_values = yaml.safe_load(spec.read_text())
    spec_values["fixed"].update(fixed)
    spec.write_text(yaml.safe_dump(spec_values))
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    code, out, err = finish(hpo_run(spec, storage, "--workers", "1", cwd=tmp_path))
    assert code == 0, err
    trials = load_study(storage).trials
    assert len(trials) == 2 and all(t.user_attrs["face_crop_fallbacks"] == 0 for t in trials)
    assert all(recipe_of(t, spec)["data"]["crop"] == "face" for t in trials)

    spec_values["study"] = "broken"
    spec_values["fixed"]["data.face_boxes"] = str(tmp_path / "nowhere.csv")
    spec.write_text(yaml.safe_dump(spec_values))
    code, out, err = in_process(
        "hpo.run", "--study", spec, "--storage", storage
    )  # it stops before any worker
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: face boxes table"), err
    assert "broken" not in optuna.get_all_study_names(storage_at(storage))


@pytest.mark.slow
def test_the_detector_command_writes_a_row_per_photo_and_resumes(tiny_root, tmp_path):
    command = [sys.executable, "-m", "maskcls.data.faces", "--data", str(tiny_root), "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(tmp_path / "face_boxes.csv")
    photos = all_photos(tiny_root)
    assert sorted(table["path"]) == sorted(str(Path(p).relative_to(tiny_root.resolve())) for p in photos)
    assert f"0 of {len(photos)} photos to search" not in done.stderr
    table.iloc[:-5].to_csv(tmp_path / "face_boxes.csv", index=False)  # as if killed before the last 5
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and f"5 of {len(photos)} photos to search" in again.stderr, again.stderr
    assert pd.read_csv(tmp_path / "face_boxes.csv").equals(table)
    boxes = read_boxes([tmp_path / "face_boxes.csv"], tiny_root)  # rows without a face are not boxes
    assert len(boxes) == table["x0"].notna().sum()
