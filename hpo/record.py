"""What a trial records on itself, as user attrs the dashboard, `studies trials`, the progress lines
and export-best read: who runs it, its recipe, why it was pruned, its figures at the end.

Torch-free, so that bench/scale.py's simulated workers record exactly what hpo.objective's trials
do. Every attr stays short (at most ATTR_LIMIT characters as JSON): every worker re-reads the
running trials' attrs many times per trial, and the dashboard lays them out in one row. The full
config is no attr: it is the trial's config.json artifact, and `Attr.RECIPE` is its short key
(config_of reads it back).
"""

from __future__ import annotations

import hashlib
import json
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.artifacts.exceptions import ArtifactNotFound

from hpo.failures import Surplus, TrialFailed
from hpo.protocol import Attr, worker_id
from maskcls.config import TrainConfig, portable
from maskcls.errors import UserError

ATTR_LIMIT = 600  # characters of a user attr's JSON
REASON_LIMIT = 500  # of a fail reason
ACTIVE = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING)
CONFIG_FILE = "config.json"


def fail(trial: optuna.Trial, reason: str, kind: type[TrialFailed] = TrialFailed) -> TrialFailed:
    """The failure `kind` with its reason, recorded on the trial."""
    trial.set_user_attr(Attr.FAIL_REASON, reason[:REASON_LIMIT])
    return kind(reason)


def claim(trial: optuna.Trial, target: int) -> None:
    """The worker takes the trial. Workers that ask at the same moment may start more trials than
    the target: the trials with the lowest numbers keep their slots, a later one fails at once
    without training."""
    trial.set_user_attr(Attr.WORKER, worker_id())
    ahead = [t for t in trial.study.get_trials(deepcopy=False, states=ACTIVE) if t.number < trial.number]
    if len(ahead) >= target:
        raise fail(trial, f"surplus: {target} trials were already finished or running", Surplus)


def recipe_id(config: dict[str, Any]) -> str:
    """A short key of the recipe: the config without this machine's folders (data.root,
    data.cache_dir), so that the same recipe has the same key on every machine."""
    text = json.dumps(portable(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def start(
    trial: optuna.Trial,
    cfg: TrainConfig,
    device: str,
    threads: int,
    artifacts: optuna.artifacts.FileSystemArtifactStore | None,
) -> None:
    """What a trial records once its parameters are drawn: its recipe's key and epochs (the full
    config goes to the artifact store as config.json), where it runs and on how many threads
    (export --holdout reproduces a CPU trial with them)."""
    config = cfg.to_dict()
    if artifacts is not None:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / CONFIG_FILE
            path.write_text(json.dumps(config, indent=2))
            optuna.artifacts.upload_artifact(
                artifact_store=artifacts, file_path=str(path), study_or_trial=trial
            )
    trial.set_user_attr(Attr.RECIPE, recipe_id(config))
    trial.set_user_attr(Attr.EPOCHS, cfg.train.epochs)
    trial.set_user_attr(Attr.DEVICE, device)
    trial.set_user_attr(Attr.HOST, socket.gethostname())
    trial.set_user_attr(Attr.THREADS, threads)


def pruned(trial: optuna.Trial, epoch: int, score: float) -> optuna.TrialPruned:
    """Why the pruner stopped the trial, recorded on it (Attr.PRUNED_WHY) for the run's line, the
    dashboard and `studies trials`: its value against the trials that reached the same epoch
    (pruners differ in their rule, but every one compares there)."""
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    others = [
        t.intermediate_values[epoch]
        for t in trial.study.get_trials(deepcopy=False, states=finished)
        if epoch in t.intermediate_values
    ]
    why = f"val macro-F1 {score:.4f}"
    if others:
        rank = 1 + sum(v > score for v in others)
        why += (
            f", rank {rank} of {len(others) + 1} trials at epoch {epoch} "
            f"(median {float(np.median(others)):.4f}, best {max(others):.4f})"
        )
    why += f"; {type(trial.study.pruner).__name__}"
    trial.set_user_attr(Attr.PRUNED_WHY, why)
    return optuna.TrialPruned(f"pruned after epoch {epoch}: {why}")


def end(
    trial: optuna.Trial,
    *,
    best_epoch: int,
    per_class_f1: dict[str, float],
    attribute_accuracy: dict[str, float] | None,
    val_accuracy: float,
    person_folds: Sequence[float],
    images_per_s: float,
    wall_s: float,
    peak_memory_mb: float,
    stop_reason: str,
    face_fallbacks: int,
) -> None:
    """A complete trial's figures at its best epoch, rounded as they are shown."""
    for key, value in {
        Attr.BEST_EPOCH: best_epoch,
        Attr.PER_CLASS_F1: {name: round(f1, 4) for name, f1 in per_class_f1.items()},
        Attr.ATTRIBUTE_ACCURACY: attribute_accuracy,
        Attr.VAL_ACCURACY: round(val_accuracy, 4),
        Attr.VAL_PERSON_FOLDS: [round(f, 4) for f in person_folds],
        Attr.IMAGES_PER_S: round(images_per_s, 1),
        Attr.WALL_S: round(wall_s, 1),
        Attr.PEAK_MEMORY_MB: round(peak_memory_mb, 1),
        Attr.STOP_REASON: stop_reason[:REASON_LIMIT],
        Attr.FACE_FALLBACKS: face_fallbacks,
    }.items():
        trial.set_user_attr(key, value)


def has_recipe(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether hpo.run recorded the trial's recipe (as the light record's key or the old attr)."""
    return Attr.RECIPE in trial.user_attrs or Attr.CONFIG in trial.user_attrs


class Recipes:
    """config_of the trials of one study, each read once."""

    def __init__(
        self,
        spec_base: TrainConfig,
        artifacts: optuna.artifacts.FileSystemArtifactStore | None,
        storage: optuna.storages.BaseStorage | None = None,
    ):
        self.spec_base, self.artifacts, self.storage = spec_base, artifacts, storage
        self.read: dict[int, TrainConfig] = {}

    def __call__(self, trial: optuna.trial.FrozenTrial) -> TrainConfig:
        if trial.number not in self.read:
            self.read[trial.number] = config_of(trial, self.spec_base, self.artifacts, self.storage)
        return self.read[trial.number]


def config_of(
    trial: optuna.trial.FrozenTrial,
    spec_base: TrainConfig,
    artifacts: optuna.artifacts.FileSystemArtifactStore | None,
    storage: optuna.storages.BaseStorage | None = None,
) -> TrainConfig:
    """The trial's full config: the `config` attr of a study recorded before the light record,
    else its config.json artifact, else the spec's fixed values with the trial's parameters; the
    last two only when they match the recipe key the trial recorded. The artifact is looked up in
    `storage`, the study's."""
    if Attr.CONFIG in trial.user_attrs:
        return TrainConfig.from_dict(trial.user_attrs[Attr.CONFIG])
    key = trial.user_attrs.get(Attr.RECIPE)
    if key is None:
        raise UserError(f"trial {trial.number} has no stored recipe (was it run by hpo.run?)")
    if artifacts is not None and storage is not None:
        for meta in optuna.artifacts.get_all_artifact_meta(trial, storage=storage):
            if meta.filename != CONFIG_FILE:
                continue
            try:
                with artifacts.open_reader(meta.artifact_id) as reader:
                    config = json.loads(reader.read())
            except ArtifactNotFound:  # another artifact folder than the run's: the spec may still do
                continue
            if recipe_id(config) == key:
                return TrainConfig.from_dict(config)
    from hpo import space

    rebuilt = spec_base.override(space.overrides(trial.params))
    if recipe_id(rebuilt.to_dict()) == key:
        return rebuilt
    raise UserError(
        f"trial {trial.number}: its config.json artifact is not in the artifact folder"
        f"{'' if artifacts is not None else ' (none given)'}, and the spec no longer builds its recipe "
        f"(key {key}): pass --artifacts with the study's artifact folder, or the spec it ran with"
    )
