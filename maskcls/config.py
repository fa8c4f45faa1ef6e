"""TrainConfig: the one vocabulary that training, the search space and export all speak.

Frozen dataclasses in groups. The field types are the schema: `Literal[...]` lists the valid
choices, so loading, dotted overrides (`optim.lr=3e-4`) and the search space are all checked
against the same definition, and an unknown key or choice gets a message listing the valid ones.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from maskcls.errors import QUOTE_LIMIT, ConfigError, quoted

# The competition baseline's statistics, computed on the real training photos.
MEAN = (0.548, 0.504, 0.479)
STD = (0.237, 0.247, 0.246)


@dataclass(frozen=True)
class DataConfig:
    root: str = "runs/demo/data"
    image_size: tuple[int, int] = (256, 192)  # [H, W]; the photos are 512x384
    crop: Literal["none", "center", "face"] = "center"  # face: around each photo's face box
    center_crop: float = 1.0  # center (and face without a box): share of height and width kept
    face_boxes: str | None = None  # face: boxes table (maskcls.data.faces); none: the root's own
    face_margin: float = 0.2  # face: the box grows by this times its size on every side
    young_age: int = 30
    old_age: int = 60  # teams gained by moving it to 58 or 59
    corrections: str | None = None  # CSV of label fixes (id, field, value)
    val_ratio: float = 0.2
    folds: int = 5
    fold: int | None = None  # validate on this person-level fold instead of a holdout
    seed: int = 0
    cache_dir: str = "runs/cache"


@dataclass(frozen=True)
class ModelConfig:
    name: str = "resnet18"  # any timm model name
    pretrained: str | None = None  # none (random init) | imagenet (timm's weights) | a weights file
    head: Literal["single", "multi"] = "single"  # multi: mask, gender and age heads combined
    dropout: float = 0.0
    dropout_samples: int = 1  # > 1: multi-sample dropout, mean of several dropout masks
    # > 0: an age head (age in years / 100, smooth L1, this weight) trains beside the classifier;
    # it only trains: predict, export and ONNX return the 18 classes as without it
    age_aux_weight: float = 0.0


@dataclass(frozen=True)
class SamplerConfig:
    name: Literal["none", "weighted", "oversample"] = "weighted"
    power: float = 0.5  # weighted: per-sample weight = class frequency ** -power
    ratio: float = 0.5  # oversample: every class repeated up to ratio x the largest class


@dataclass(frozen=True)
class LossConfig:
    name: Literal["ce", "focal", "label_smoothing", "f1", "ce_f1"] = "ce"
    gamma: float = 2.0  # focal
    eps: float = 0.1  # label_smoothing
    f1_weight: float = 0.5  # ce_f1: share of the F1 loss in the mix
    class_weights: Literal["none", "balanced", "sqrt"] = "none"


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd


@dataclass(frozen=True)
class ScheduleConfig:
    name: Literal["constant", "step", "cosine", "plateau", "onecycle"] = "cosine"
    warmup_epochs: float = 1.0
    step_epochs: int = 3  # step: decay every this many epochs
    factor: float = 0.3  # step and plateau: multiply the lr by this
    patience: int = 1  # plateau: epochs without improvement before a decay
    min_lr_ratio: float = 0.01  # cosine: final lr as a share of lr


@dataclass(frozen=True)
class AugmentConfig:
    backend: Literal["device", "albumentations"] = "device"
    policy: Literal["none", "flip", "light", "medium", "heavy"] = "light"
    cutmix_p: float = 0.0
    cutmix_alpha: float = 1.0
    mixup_p: float = 0.0
    mixup_alpha: float = 0.4


@dataclass(frozen=True)
class LoopConfig:
    epochs: int = 12
    batch_size: int = 64
    accumulate: int = 1  # gradient accumulation steps
    clip_grad: float | None = 5.0
    amp: bool = True  # bf16 (else fp16) autocast on CUDA; ignored on the CPU
    channels_last: bool = True
    compile: bool = False
    patience: int | None = None  # early stop after this many epochs without a better val macro-F1
    workers: int = 2  # DataLoader workers of the albumentations backend
    eval_batch_size: int = 256


@dataclass(frozen=True)
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: LoopConfig = field(default_factory=LoopConfig)

    def __post_init__(self) -> None:
        _check_ranges(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        return _build(cls, values, "")

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def override(self, overrides: Mapping[str, Any]) -> TrainConfig:
        """A new config with dotted-path values replaced, e.g. {"optim.lr": 3e-4}."""
        values = self.to_dict()
        for path, value in overrides.items():
            group, _, key = path.partition(".")
            if group not in values or not key:
                raise ConfigError(
                    f"unknown config key {quoted(path)}; valid keys: {', '.join(field_paths())}"
                )
            if key not in values[group]:
                valid = ", ".join(f"{group}.{k}" for k in values[group])
                raise ConfigError(f"unknown config key {quoted(path)}; valid keys in {group}: {valid}")
            values[group][key] = value
        return TrainConfig.from_dict(values)


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """`key=value` strings from the command line; values are YAML (`3e-4`, `[128,96]`, `null`)."""
    overrides = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {quoted(item)} (e.g. --set optim.lr=3e-4)")
        try:
            overrides[key.strip()] = parse_yaml(text)
        except (yaml.YAMLError, RecursionError):
            raise ConfigError(f"--set {quoted(item)}: the value is not valid YAML") from None
    return overrides


MAX_NODES = 100_000  # values a spec or config may expand to, aliases (*name) followed


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, minus what only hurts in a config: a key given twice (PyYAML keeps the
    last without a word), and aliases that expand a few hundred bytes into billions of values once
    anything walks them (a "billion laughs" document)."""

    def compose_document(self) -> Any:
        node = super().compose_document()
        if node is not None and _expanded_size(node, {}) > MAX_NODES:
            raise yaml.YAMLError(f"the document expands to more than {MAX_NODES} values through its aliases")
        return node

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, list | dict):
                continue  # not hashable: construct_mapping names it
            if key in seen:
                raise yaml.YAMLError(f"key {quoted(key)} given twice (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep)


def _expanded_size(node: yaml.Node, sizes: dict[int, int | None]) -> int:
    """Values in `node` with every alias expanded; each shared node is measured once."""
    if id(node) in sizes:
        size = sizes[id(node)]
        if size is None:
            raise yaml.YAMLError("an alias (*name) inside the value it names: a value that contains itself")
        return size
    sizes[id(node)] = None  # being measured
    children = node.value if isinstance(node.value, list) else []
    items = [part for child in children for part in (child if isinstance(child, tuple) else (child,))]
    size = min(1 + sum(_expanded_size(c, sizes) for c in items), MAX_NODES + 1)
    sizes[id(node)] = size
    return size


def parse_yaml(text: str) -> Any:
    """YAML text as the project reads every spec, config and --set value (_StrictLoader)."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader


def read_yaml(path: str | Path, expected: str) -> Mapping[str, Any]:
    """A YAML file holding a mapping (empty: {}), or ConfigError naming the file and what is wrong;
    `expected` says what the mapping should hold, for the message."""
    path = Path(path)
    try:
        values = parse_yaml(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except yaml.YAMLError as err:
        reason = " ".join(str(err).split())
        raise ConfigError(f"{path}: invalid YAML ({reason[:QUOTE_LIMIT]})") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML (nested too deeply)") from None
    if not isinstance(values, Mapping):
        raise ConfigError(f"{path}: expected {expected}, got {type(values).__name__}")
    return values


def load(path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the YAML file (if any), then the overrides."""
    values = read_yaml(path, "a mapping of config groups") if path is not None else {}
    return TrainConfig.from_dict(values).override(overrides or {})


def field_paths() -> list[str]:
    """Every dotted config path, e.g. `loss.gamma`."""
    groups = get_type_hints(TrainConfig)
    return [f"{group}.{f.name}" for group, cls in groups.items() for f in dataclasses.fields(cls)]


def field_type(path: str) -> Any:
    """The declared type of a dotted path; ConfigError listing valid paths if it does not exist."""
    if path not in field_paths():
        raise ConfigError(f"unknown config key {quoted(path)}; valid keys: {', '.join(field_paths())}")
    group, key = path.split(".")
    group_cls = get_type_hints(TrainConfig)[group]
    return get_type_hints(group_cls)[key]


def check_value(path: str, value: Any) -> Any:
    """The value coerced to the type of `path` (e.g. a list to a tuple), or ConfigError."""
    return _coerce(value, field_type(path), path)


def _build(cls: type, values: Any, prefix: str) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {quoted(values)}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        raise ConfigError(
            f"unknown config key {quoted(prefix + str(unknown[0]))}; valid keys: "
            + ", ".join(prefix + n for n in names)
        )
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, prefix + name)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, path: str) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, path)
    if origin is Literal:
        if value not in args:
            raise ConfigError(
                f"{path}: invalid choice {quoted(value)}; valid choices: {', '.join(map(str, args))}"
            )
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{path}: expected a list of {len(args)} values, got {quoted(value)}")
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # PyYAML reads `3e-4` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{path}: expected {hint.__name__}, got {quoted(value)}")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # timm's names, tags included


def _check_ranges(cfg: TrainConfig) -> None:
    for group in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, group.name)):
            value = getattr(getattr(cfg, group.name), f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{group.name}.{f.name} must be a finite number, got {value}")
    if not MODEL_NAME.fullmatch(cfg.model.name):
        raise ConfigError(
            f"model.name: {quoted(cfg.model.name)} is not a timm model name such as resnet18 or "
            "convnext_nano.in12k (a weights file goes in model.pretrained)"
        )
    checks = [
        (max(cfg.data.image_size) <= 4096, "data.image_size: each side must be at most 4096"),
        (all(s >= 16 for s in cfg.data.image_size), "data.image_size: each side must be at least 16"),
        (0.2 <= cfg.data.center_crop <= 1, "data.center_crop must be in [0.2, 1]"),
        (0 <= cfg.data.face_margin <= 2, "data.face_margin must be in [0, 2]"),
        (0 < cfg.data.young_age < cfg.data.old_age, "data ages: need 0 < young_age < old_age"),
        (0 < cfg.data.val_ratio < 1, "data.val_ratio must be in (0, 1)"),
        (cfg.model.age_aux_weight >= 0, "model.age_aux_weight must be at least 0 (0 disables the age head)"),
        (cfg.data.folds >= 2, "data.folds must be at least 2"),
        (cfg.data.fold is None or 0 <= cfg.data.fold < cfg.data.folds, "data.fold must be in 0..folds-1"),
        (0 <= cfg.model.dropout < 1, "model.dropout must be in [0, 1)"),
        (cfg.model.dropout_samples >= 1, "model.dropout_samples must be at least 1"),
        (cfg.sampler.power >= 0, "sampler.power must be >= 0"),
        (0 < cfg.sampler.ratio <= 1, "sampler.ratio must be in (0, 1]"),
        (cfg.loss.gamma >= 0, "loss.gamma must be >= 0"),
        (0 <= cfg.loss.eps < 1, "loss.eps must be in [0, 1)"),
        (0 <= cfg.loss.f1_weight <= 1, "loss.f1_weight must be in [0, 1]"),
        (cfg.optim.lr > 0, "optim.lr must be > 0"),
        (cfg.optim.weight_decay >= 0, "optim.weight_decay must be >= 0"),
        (cfg.schedule.warmup_epochs >= 0, "schedule.warmup_epochs must be >= 0"),
        (cfg.schedule.step_epochs >= 1, "schedule.step_epochs must be at least 1"),
        (0 < cfg.schedule.factor < 1, "schedule.factor must be in (0, 1)"),
        (0 < cfg.schedule.min_lr_ratio <= 1, "schedule.min_lr_ratio must be in (0, 1]"),
        (0 <= cfg.augment.cutmix_p <= 1 and 0 <= cfg.augment.mixup_p <= 1, "augment probabilities: [0, 1]"),
        (cfg.augment.cutmix_alpha > 0 and cfg.augment.mixup_alpha > 0, "augment alphas must be > 0"),
        (cfg.train.epochs >= 1 and cfg.train.batch_size >= 1, "train.epochs and batch_size: at least 1"),
        (cfg.train.accumulate >= 1, "train.accumulate must be at least 1"),
        (cfg.train.patience is None or cfg.train.patience >= 1, "train.patience must be at least 1"),
        (cfg.train.eval_batch_size >= 1, "train.eval_batch_size must be at least 1"),
        (cfg.train.workers >= 0, "train.workers must be at least 0"),
        (
            cfg.train.clip_grad is None or cfg.train.clip_grad > 0,
            "train.clip_grad must be > 0 (or null: no clipping)",
        ),
        (0 <= cfg.optim.momentum < 1, "optim.momentum must be in [0, 1)"),
        (cfg.schedule.patience >= 0, "schedule.patience must be at least 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


MACHINE_LOCAL = ("root", "cache_dir")  # data keys that name folders of the machine that trained it


def portable(recipe: dict[str, Any]) -> dict[str, Any]:
    """The recipe without this machine's folders: where it re-runs, --data (or a spec) names the
    data and the decoded images go to that machine's default cache."""
    return {group: {k: v for k, v in values.items() if group != "data" or k not in MACHINE_LOCAL}
            for group, values in recipe.items()}  # fmt: skip
