import typing

import pytest
import yaml

from maskcls.config import (
    AugmentConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    check_value,
    field_paths,
    load,
    parse_overrides,
)
from maskcls.data.augment import POLICIES
from maskcls.errors import ConfigError
from maskcls.losses import LOSSES
from maskcls.models import HEAD_SIZES
from maskcls.optim import OPTIMIZERS


def choices(cls, name):
    return set(typing.get_args(typing.get_type_hints(cls)[name]))


def test_registries_match_the_choices_the_config_accepts():
    assert set(LOSSES) == choices(LossConfig, "name")
    assert set(OPTIMIZERS) == choices(OptimConfig, "name")
    assert set(POLICIES) == choices(AugmentConfig, "policy")
    assert set(HEAD_SIZES) == choices(ModelConfig, "head")


def test_round_trip_and_overrides(tmp_path):
    cfg = load(
        None,
        parse_overrides(
            [
                "optim.lr=3e-4",
                "data.image_size=[128,96]",
                "loss.name=focal",
                "train.patience=null",
                "model.pretrained=null",
            ]
        ),
    )
    assert cfg.optim.lr == 3e-4 and cfg.data.image_size == (128, 96) and cfg.loss.name == "focal"
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-2\n  name: sgd\nloss:\n  name: f1\n")
    from_file = load(path, {"optim.lr": 0.5})
    assert (from_file.optim.name, from_file.optim.lr, from_file.loss.name) == ("sgd", 0.5, "f1")
    assert check_value("data.image_size", [64, 48]) == (64, 48)
    assert "loss.gamma" in field_paths()


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.lrr=1", "valid keys in optim: optim.name, optim.lr"),
        ("nope.x=1", "valid keys: data.root"),
        ("loss.name=dice", "valid choices: ce, focal, label_smoothing, f1, ce_f1"),
        ("optim.name=lion", "valid choices: sgd, adam, adamw"),
        ("data.image_size=[64]", "expected a list of 2 values"),
        ("train.epochs=many", "train.epochs: expected int"),
        ("optim.lr=-1", "optim.lr must be > 0"),
        ("train.amp=maybe", "train.amp: expected bool"),
    ],
)
def test_bad_overrides_name_the_valid_values(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load(None, parse_overrides([override]))


def test_bad_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("optim:\n  learning_rate: 1\n")
    with pytest.raises(ConfigError, match="unknown config key 'optim.learning_rate'"):
        load(unknown)
    with pytest.raises(ConfigError, match="not found"):
        load(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["optim.lr"])


def test_train_says_where_its_config_came_from(tmp_path):
    """An export's recipe.yaml leaves out the machine's folders: the run says what it took instead."""
    from maskcls.config import portable
    from maskcls.train import config_sources

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(portable(TrainConfig().override({"optim.lr": 0.01}).to_dict())))
    total = len(field_paths()) - 2  # less data.root and data.cache_dir
    overrides = {"optim.lr": 3e-4, "train.epochs": 2}
    cfg = load(recipe, {**overrides, "data.root": "/data"})
    assert config_sources(str(recipe), overrides, cfg) == (
        f"config: {total - 2} values from {recipe}; optim.lr, train.epochs from --set (replacing the "
        "file's optim.lr, train.epochs); data.root from --data; data.cache_dir runs/cache (the default); "
        "the rest TrainConfig's defaults"
    )
    assert config_sources(None, {}, TrainConfig()) == (
        "config: data.root from --data; data.cache_dir runs/cache (the default); "
        "the rest TrainConfig's defaults"
    )
