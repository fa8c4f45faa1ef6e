"""Pretrained backbones: a local file, timm's hub cache offline, and one clear error without either.

No network here: the hub cache is one the test builds itself, in huggingface_hub's layout, holding a
real timm state dict; every process runs with HF_HUB_OFFLINE=1 and its own HF_HOME.
"""

import os
import subprocess
import sys

import optuna
import pytest
import timm
import torch
from helpers import finish, hpo_run, write_spec
from safetensors.torch import save_file

from hpo.storage import open_storage
from maskcls.config import ModelConfig
from maskcls.rundir import load_run
from maskcls.train import fit, load_data, save_run
from maskcls.weights import hub_location, read_spec, spec_models

TINY = "mobilenetv3_small_050"


def offline_env(hf_home):
    return {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}


def build_hub_cache(hf_home, name=TINY):
    """A real state dict where huggingface_hub keeps `name`'s default weights: hub/models--org--repo/
    with refs/main naming a snapshot that holds the file."""
    repo, files, _ = hub_location(name)
    folder = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    state = timm.create_model(name, num_classes=1000).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / files[0]))
    return state


def test_mask_spec_fine_tunes_imagenet_weights_of_every_backbone():
    models = spec_models(read_spec("mask"))
    assert {m.pretrained for m in models} == {"imagenet"}
    assert {m.name for m in models} == {
        "resnet34",
        "efficientnet_b0",
        "convnext_nano",
        "regnety_016",
        "mobilenetv3_large_100",
    }


@pytest.mark.slow
def test_imagenet_weights_load_from_the_hub_cache_offline(tmp_path):
    state = build_hub_cache(tmp_path / "hf")
    torch.save(state["conv_stem.weight"], tmp_path / "expected.pt")
    fetched = subprocess.run(
        [sys.executable, "-m", "maskcls.weights", "fetch", "--model", TINY],
        capture_output=True,
        text=True,
        timeout=120,
        env=offline_env(tmp_path / "hf"),
    )
    assert fetched.returncode == 0, fetched.stderr
    assert str(tmp_path / "hf" / "hub") in fetched.stdout  # found in the cache, nothing downloaded
    check = f"""
import torch
from maskcls.config import ModelConfig
from maskcls.models import build
model = build(ModelConfig(name={TINY!r}, pretrained="imagenet", head="multi"))
print(torch.equal(model.backbone.conv_stem.weight, torch.load({str(tmp_path / "expected.pt")!r})))
print([tuple(h.weight.shape) for h in model.heads])
"""
    done = subprocess.run(
        [sys.executable, "-c", check],
        capture_output=True,
        text=True,
        timeout=120,
        env=offline_env(tmp_path / "hf"),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["True", "[(3, 1024), (2, 1024), (3, 1024)]"]


@pytest.mark.slow
def test_offline_without_cache_stops_the_study_before_anything_is_stored(small_root, tmp_path):
    spec = write_spec(tmp_path, small_root)
    text = spec.read_text().replace(
        "model.name: mobilenetv3_small_050", "model.name: mobilenetv3_small_050\n  model.pretrained: imagenet"
    )
    spec.write_text(text)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    code, out, err = finish(
        hpo_run(spec, storage, "--workers", "1", cwd=tmp_path, env=offline_env(tmp_path / "hf"))
    )
    assert code == 2 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert TINY in line and "python -m maskcls.weights fetch" in line and "HF_HUB_OFFLINE" in line
    assert optuna.get_all_study_names(open_storage(storage)) == []


@pytest.mark.slow
def test_fetch_names_every_missing_backbone_of_a_study_at_once(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "maskcls.weights", "fetch", "--study", "mask"],
        capture_output=True,
        text=True,
        timeout=120,
        env=offline_env(tmp_path / "hf"),
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert all(name in done.stderr for name in ("resnet34", "convnext_nano", "regnety_016"))


@pytest.mark.slow
def test_training_starts_from_a_local_weights_file(tiny_cfg, tmp_path):
    state = timm.create_model(TINY, num_classes=1000).state_dict()
    path = tmp_path / "weights.pth"
    torch.save(state, path)  # a plain state dict: loads with weights_only=True
    cfg = tiny_cfg.override({"model.pretrained": str(path), "train.epochs": 1, "optim.lr": 1e-12})
    result = fit(cfg, load_data(cfg, progress=False), "cpu")
    member = result.model.backbone
    assert torch.allclose(member.conv_stem.weight, state["conv_stem.weight"], atol=1e-6)  # lr ~0: unchanged
    with pytest.raises(Exception, match="not found"):
        fit(cfg.override({"model.pretrained": str(tmp_path / "missing.pth")}), load_data(cfg, progress=False))
    save_run(tmp_path / "run", cfg, result)
    path.unlink()  # where the model is deployed, the starting weights are not needed
    loaded_cfg, model = load_run(tmp_path / "run")
    assert loaded_cfg.model.pretrained == str(path)
    assert torch.equal(model.members[0].backbone.conv_stem.weight, member.conv_stem.weight)


def test_a_spec_lists_fixed_searched_and_enqueued_backbones():
    spec = {
        "fixed": {"model": {"pretrained": "imagenet"}},
        "space": {"model.name": {"type": "categorical", "choices": ["resnet18", "resnet34"]}},
        "enqueue": [{"model.name": "efficientnet_b0"}],
    }
    assert sorted(m.name for m in spec_models(spec)) == ["efficientnet_b0", "resnet18", "resnet34"]
    assert spec_models({})[0] == ModelConfig()  # nothing given: the default backbone, random init
