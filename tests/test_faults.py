"""Faults an operator meets, each from the hostile-input sweep (issue 27): unreadable checkpoints,
a study deleted under a run, a full disk, photos that decode wrong, two exports racing to one
folder, a huge boxes table read again and again. Nothing is lost and nothing reads wrong."""

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from helpers import finish, hpo_run, load, wait_for_running_trial, write_spec
from PIL import Image

from hpo import spec as specs
from hpo.failures import TrialFailed
from hpo.objective import make_objective
from hpo.protocol import Attr
from hpo.storage import counts, open_storage
from maskcls.checkpoint import CheckpointFile
from maskcls.errors import UserError
from maskcls.train import fit, load_data


def test_a_truncated_checkpoint_is_set_aside_and_the_retry_starts_from_epoch_1(tmp_path):
    damaged = tmp_path / "trial-0.pt"
    damaged.write_bytes(b"PK\x03\x04 not a whole zip")
    retry = CheckpointFile(tmp_path / "trial-1.pt", resume_from=damaged, key="recipe")
    assert retry.peek() is None and not damaged.exists()
    assert (tmp_path / "trial-0.pt.unreadable").read_bytes().startswith(b"PK")  # kept, not deleted
    assert retry.set_aside.startswith("checkpoint trial-0.pt could not be used (")


@pytest.mark.slow
def test_a_checkpoint_whose_state_no_longer_fits_is_set_aside_and_the_trial_still_completes(
    small_root, tmp_path
):
    """A retried trial whose predecessor's checkpoint was written by a version with another
    EpochMetrics: it trains from epoch 1 instead of failing (and losing its parameters)."""
    path = write_spec(tmp_path, small_root, epochs=[2], n_trials=2, pruner={"name": "none"})
    spec = specs.load(str(path))
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"optim.lr": 3e-3, "train.epochs": 2}, user_attrs={Attr.RETRIED_FROM: 7})
    folder = tmp_path / "checkpoints"
    cfg = spec.base.override({"optim.lr": 3e-3, "train.epochs": 2})
    first = CheckpointFile(folder / "trial-7.pt")
    with contextlib.suppress(Stop):
        fit(cfg, load_data(cfg, progress=False), "cpu", on_epoch=stop_after_one, checkpoint=first)
    state = torch.load(first.path, weights_only=True)
    state["course"]["history"][0]["a_field_added_later"] = 1.0
    from hpo.objective import recipe_key

    state["key"] = recipe_key(cfg, torch.device("cpu"))
    torch.save(state, first.path)
    objective = make_objective(spec, torch.device("cpu"), target=5, artifacts=None, checkpoints=folder)
    study.optimize(objective, n_trials=1, catch=(TrialFailed,))
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE, trial.user_attrs.get("fail_reason")
    assert "a_field_added_later" in trial.user_attrs[Attr.CHECKPOINT_SET_ASIDE]
    assert Attr.RESUMED_AT not in trial.user_attrs and sorted(trial.intermediate_values) == [1, 2]
    assert (folder / "trial-7.pt.unreadable").is_file()


class Stop(Exception):
    """Ends a fit after its first epoch, as a killed worker would, its checkpoint written."""


def stop_after_one(epoch, metrics):
    raise Stop


def test_deleting_a_study_a_run_is_on_refuses_unless_forced(tmp_path, capsys):
    from hpo.spec import Heartbeat
    from hpo.studies import main
    from maskcls.cli import run_main

    url = f"sqlite:///{tmp_path / 'busy.db'}"
    storage = open_storage(url, Heartbeat(interval=1, grace=60))
    study = optuna.create_study(study_name="busy", storage=storage)
    storage.record_heartbeat(study.ask()._trial_id)  # a worker is on it now
    with pytest.raises(SystemExit) as end:
        run_main(main, ["delete", "--storage", url, "--study", "busy", "--yes"])
    assert end.value.code == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: not deleting study busy with 1 trials") and "a run is on it (trial(s) 0" in err
    )
    assert optuna.get_all_study_names(storage) == ["busy"]
    with pytest.raises(SystemExit) as end:
        run_main(main, ["delete", "--storage", url, "--study", "busy", "--yes", "--force"])
    assert end.value.code == 0 and optuna.get_all_study_names(storage) == []


@pytest.mark.slow
def test_a_run_whose_study_is_deleted_under_it_stops_with_one_line(small_root, tmp_path):
    spec = write_spec(tmp_path, small_root, epochs=[30], n_trials=2, pruner={"name": "none"})
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    run = hpo_run(spec, storage, "--workers", "1", cwd=tmp_path)
    wait_for_running_trial(storage, min_epoch=1)
    command = [sys.executable, "-m", "hpo.studies", "delete", "--storage", storage, "--study", "t", "--yes"]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "a run is on it" in refused.stderr
    forced = subprocess.run([*command, "--force"], capture_output=True, text=True, timeout=60)
    assert forced.returncode == 0, forced.stderr
    code, out, err = finish(run, timeout=120)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and errors == ["error: study t was deleted from the storage during the run"], err
    assert "Traceback" not in err


@pytest.mark.slow
def test_an_unknown_backbone_among_a_specs_choices_stops_the_run_before_any_trial(small_root, tmp_path):
    space = {
        "optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2},
        "model.name": {"type": "categorical", "choices": ["mobilenetv3_small_050", "resnet_nope"]},
    }
    spec = write_spec(tmp_path, small_root, space=space, enqueue=[])
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    code, out, err = finish(hpo_run(spec, storage, "--workers", "1", cwd=tmp_path))
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "unknown timm model 'resnet_nope'" in errors[0], err
    assert load(storage).trials == [] and "Traceback" not in err


@contextlib.contextmanager
def small_disk(folder: Path, size: str):
    """A tmpfs of `size` mounted at `folder` (root only; the test skips elsewhere)."""
    folder.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.mark.slow
def test_a_full_disk_stops_the_run_with_one_line_naming_it_and_loses_no_trial(small_root, tmp_path):
    spec = write_spec(tmp_path, small_root, epochs=[2], n_trials=2, pruner={"name": "none"})
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    with small_disk(tmp_path / "small", "64k") as disk:
        artifacts = disk / "artifacts"  # checkpoints go beside it: the first one does not fit
        code, out, err = finish(
            hpo_run(spec, storage, "--workers", "1", "--artifacts", str(artifacts), cwd=tmp_path)
        )
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1 and "no space left on the device of" in errors[0], err
    assert str(disk) in errors[0] and "Traceback" not in err
    study = load(storage)
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 1 and failed[0].user_attrs["fail_reason"].startswith("no space left")
    queued = [t for t in study.trials if t.user_attrs.get("retried_from") == failed[0].number]
    assert len(queued) == 1 and queued[0].state == optuna.trial.TrialState.WAITING  # nothing lost
    assert counts(study)["running"] == 0


def test_16_bit_greyscale_photos_decode_to_their_levels_not_white(tmp_path):
    from maskcls.data.cache import load_image

    ramp = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)  # mode I;16
    assert Image.open(path).mode.startswith("I")
    pixels = load_image(str(path), (48, 64))
    assert pixels.shape == (48, 64, 3) and (pixels[..., 0] == (ramp >> 8)).all()
    assert pixels.min() == 0 and pixels.max() == 255


def turned_jpeg(path: Path, orientation: int = 6) -> None:
    """A photo stored sideways with the EXIF orientation that turns it upright: red at its top."""
    upright = np.zeros((80, 40, 3), np.uint8)  # tall: a person
    upright[:20] = (255, 0, 0)  # red at the top
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # 40 tall, 80 wide
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, exif=exif.tobytes(), quality=95)


def test_exif_orientation_is_honoured_in_the_cache_and_the_size_checks(tmp_path):
    from maskcls.data.cache import load_image
    from maskcls.data.photo import upright_size

    path = tmp_path / "phone.jpg"
    turned_jpeg(path)
    assert Image.open(path).size == (80, 40) and upright_size(Image.open(path)) == (40, 80)
    pixels = load_image(str(path), (80, 40))
    assert pixels.shape == (80, 40, 3)
    assert pixels[:15, :, 0].mean() > 200 and pixels[-30:, :, 0].mean() < 50  # red on top, as shown


def test_the_readmes_onnxruntime_recipe_turns_photos_upright_too(tmp_path):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    recipe = readme.split("Or with onnxruntime alone")[1].split("```python")[1].split("```")[0]
    assert "ImageOps.exif_transpose(" in recipe


def test_two_exports_to_one_folder_at_once_leave_the_first_whole(tmp_path):
    from maskcls.rundir import EXPORT_MARK, building

    out = tmp_path / "export"
    with (
        pytest.raises(UserError, match="was filled by another command meanwhile"),
        building(out, mark=True) as tmp,
    ):
        (tmp / "model.onnx").write_text("second")
        out.mkdir()  # the first export lands while the second is still building
        (out / "model.onnx").write_text("first")
    assert (out / "model.onnx").read_text() == "first" and not (out / EXPORT_MARK).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # the second's temporary folder went


def test_a_boxes_table_is_read_once_however_often_it_is_asked_for(small_root, tmp_path):
    from maskcls.data import faces

    table = [tmp_path / "boxes.csv"]
    shutil.copy(Path(small_root) / faces.STANDIN_TABLES[0], table[0])
    before = faces._read_table.cache_info().misses
    for _ in range(3):
        faces.read_boxes(table, small_root)
    assert faces._read_table.cache_info().misses - before <= 1
    os.utime(table[0], ns=(1, 1))  # changed on disk: read again
    faces.read_boxes(table, small_root)
    assert faces._read_table.cache_info().misses - before <= 2
