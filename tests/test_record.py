"""hpo.record: the light trial record. The whole config is the trial's config.json artifact and the
trial keeps its key; export-best reads it back from the artifact, or from the spec when that still
builds the same recipe, or from a study recorded before (the `config` attr); every attr is short."""

import json

import optuna
import pytest
from optuna.artifacts import FileSystemArtifactStore

from hpo import record
from hpo.failures import Surplus
from hpo.protocol import Attr
from maskcls.config import TrainConfig
from maskcls.errors import UserError
from maskcls.labels import NUM_CLASSES, class_name

LR = optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)


def started_trial(tmp_path, base: TrainConfig, store):
    """A trial as hpo.objective leaves it: its lr drawn, its start and end recorded."""
    study = optuna.create_study(direction="maximize")
    trial = study.ask({"optim.lr": LR})
    cfg = base.override({"optim.lr": trial.params["optim.lr"]})
    record.start(trial, cfg, "cpu", 2, store)
    record.end(
        trial,
        best_epoch=3,
        per_class_f1={class_name(c): 1 / 3 for c in range(NUM_CLASSES)},
        attribute_accuracy={"mask": 0.91234567, "gender": 0.8, "age_band": 0.7},
        val_accuracy=0.123456789,
        person_folds=[0.1234567] * 5,
        images_per_s=123.456,
        wall_s=12.345,
        peak_memory_mb=1234.5678,
        stop_reason="x" * 2000,
        face_fallbacks=0,
    )
    study.tell(trial, 0.5)
    return study.trials[0], cfg, study._storage


def test_the_trial_keeps_a_key_and_its_config_is_the_artifact(tmp_path):
    store = FileSystemArtifactStore(str(tmp_path / "artifacts"))
    (tmp_path / "artifacts").mkdir()
    base = TrainConfig().override({"data.root": "/data/mask", "data.cache_dir": "/cache/a"})
    trial, cfg, storage = started_trial(tmp_path, base, store)
    assert Attr.CONFIG not in trial.user_attrs and len(trial.user_attrs[Attr.RECIPE]) == 16
    assert trial.user_attrs[Attr.EPOCHS] == cfg.train.epochs and trial.user_attrs[Attr.THREADS] == 2
    assert record.has_recipe(trial)
    # The artifact, though the spec has changed since (another batch size, another machine's folders).
    changed = TrainConfig().override({"train.batch_size": 7, "data.root": "/elsewhere"})
    assert record.config_of(trial, changed, store, storage) == cfg
    # No artifact: the spec with the trial's parameters, when it builds the same recipe; its own
    # machine's folders do not count.
    here = base.override({"data.root": "/mnt/other", "data.cache_dir": "/tmp/c"})
    assert record.config_of(trial, here, None) == here.override({"optim.lr": cfg.optim.lr})
    with pytest.raises(UserError) as refused:
        record.config_of(trial, changed, None)
    assert "\n" not in str(refused.value) and "pass --artifacts" in str(refused.value)
    # Another artifact folder than the run's: no config.json there, the spec still builds it.
    elsewhere = FileSystemArtifactStore(str(tmp_path))
    assert record.config_of(trial, here, elsewhere, storage) == here.override({"optim.lr": cfg.optim.lr})
    # An artifact that is not this recipe's (a file put there by hand) is not taken for it.
    other = TrainConfig().override({"optim.lr": 0.5})
    meta = optuna.artifacts.get_all_artifact_meta(trial, storage=storage)[0]
    with open(tmp_path / "artifacts" / meta.artifact_id, "w") as f:
        json.dump(other.to_dict(), f)
    with pytest.raises(UserError):
        record.config_of(trial, changed, store, storage)


def test_a_study_recorded_before_keeps_working():
    cfg = TrainConfig().override({"optim.lr": 0.02})
    old = optuna.trial.create_trial(value=0.4, user_attrs={Attr.CONFIG: cfg.to_dict()})
    assert record.has_recipe(old) and record.config_of(old, TrainConfig(), None) == cfg
    assert not record.has_recipe(optuna.trial.create_trial(value=0.4))
    with pytest.raises(UserError, match="has no stored recipe"):
        record.config_of(optuna.trial.create_trial(value=0.4), TrainConfig(), None)


def test_no_user_attr_is_longer_than_the_limit(tmp_path):
    trial, _, _ = started_trial(tmp_path, TrainConfig(), None)
    lengths = {key: len(json.dumps(value)) for key, value in trial.user_attrs.items()}
    assert max(lengths.values()) <= record.ATTR_LIMIT, lengths
    assert trial.user_attrs[Attr.PER_CLASS_F1][class_name(0)] == 0.3333
    assert len(trial.user_attrs[Attr.STOP_REASON]) == record.REASON_LIMIT


def test_a_trial_beyond_the_target_steps_back():
    study = optuna.create_study()
    first, second = study.ask(), study.ask()
    record.claim(first, 1)
    with pytest.raises(Surplus, match="surplus: 1 trials were already finished or running"):
        record.claim(second, 1)
    assert study.trials[1].user_attrs[Attr.FAIL_REASON].startswith("surplus")
