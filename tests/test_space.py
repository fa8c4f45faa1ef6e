import dataclasses
import re

import optuna
import pytest
import yaml

from hpo import spec as specs
from hpo.space import check_recipe, parse, suggest
from maskcls.errors import UserError

SPACE = {
    "loss.name": {"type": "categorical", "choices": ["ce", "focal"]},
    "loss.gamma": {"type": "float", "low": 0.5, "high": 3.0, "when": {"loss.name": "focal"}},
    "data.image_size": {"type": "categorical", "choices": [[64, 48], [32, 24]]},
    "train.batch_size": {"type": "int", "low": 8, "high": 64, "step": 8},
    "optim.lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
}


def test_conditional_parameters_and_tuple_values():
    params = parse(SPACE)
    focal = suggest(
        optuna.trial.FixedTrial(
            {
                "loss.name": "focal",
                "loss.gamma": 2.0,
                "data.image_size": "32x24",
                "train.batch_size": 16,
                "optim.lr": 0.01,
            }
        ),
        params,
    )
    assert focal == {
        "loss.name": "focal",
        "loss.gamma": 2.0,
        "data.image_size": [32, 24],
        "train.batch_size": 16,
        "optim.lr": 0.01,
    }
    ce = suggest(
        optuna.trial.FixedTrial(
            {"loss.name": "ce", "data.image_size": "64x48", "train.batch_size": 8, "optim.lr": 0.001}
        ),
        params,
    )
    assert "loss.gamma" not in ce
    study = optuna.create_study()
    for _ in range(20):
        trial = study.ask()
        chosen = suggest(trial, params)
        assert ("loss.gamma" in chosen) == (chosen["loss.name"] == "focal")
        study.tell(trial, 0.0)


@pytest.mark.parametrize(
    "space,message",
    [
        ({"optim.lrr": {"type": "float", "low": 1, "high": 2}}, "unknown config key 'optim.lrr'"),
        (
            {"loss.name": {"type": "categorical", "choices": ["ce", "dice"]}},
            "invalid choice 'dice'; valid choices: ce",
        ),
        ({"optim.lr": {"type": "float", "low": 1, "high": 0.1}}, "low must be below high"),
        (
            {"optim.lr": {"type": "uniform", "low": 1, "high": 2}},
            "type must be one of float, int, categorical",
        ),
        (
            {"loss.gamma": {"type": "float", "low": 1, "high": 2, "when": {"loss.name": "focal"}}},
            "must be a categorical parameter listed before it",
        ),
        (
            {
                "loss.name": {"type": "categorical", "choices": ["ce"]},
                "loss.gamma": {"type": "float", "low": 1, "high": 2, "when": {"loss.name": "focall"}},
            },
            "'focall' is not a choice of loss.name",
        ),
        ({"model.name": {"type": "float", "low": 1, "high": 2}}, "model.name: expected str"),
    ],
)
def test_bad_spaces_name_the_problem(space, message):
    with pytest.raises(UserError, match=message):
        parse(space)


def test_enqueue_recipes_are_checked():
    params = parse(SPACE)
    assert check_recipe({"data.image_size": [64, 48], "optim.lr": "3e-3"}, params, "e") == {
        "data.image_size": "64x48",
        "optim.lr": 0.003,
    }
    with pytest.raises(UserError, match="not in the space"):
        check_recipe({"optim.name": "sgd"}, params, "e")
    with pytest.raises(UserError, match="outside"):
        check_recipe({"optim.lr": 5.0}, params, "e")


def test_shipped_specs_load():
    assert {"demo", "mask"} <= set(specs.available())
    mask = specs.load("mask")
    assert mask.n_trials == 100 and mask.base.train.epochs == 12
    tuned = {p.path for p in mask.params}
    assert {
        "model.name",
        "optim.lr",
        "optim.weight_decay",
        "optim.name",
        "train.batch_size",
        "data.image_size",
        "sampler.name",
        "sampler.power",
        "loss.name",
        "loss.gamma",
        "schedule.name",
        "schedule.warmup_epochs",
        "augment.policy",
        "augment.cutmix_p",
        "augment.mixup_p",
        "model.head",
        "data.old_age",
    } <= tuned
    assert mask.enqueue and isinstance(mask.make_pruner(), optuna.pruners.HyperbandPruner)


def test_a_users_spec_folder_comes_first_and_hpo_cache_moves_the_decoded_images(tmp_path, monkeypatch):
    own = tmp_path / "specs"
    own.mkdir()
    space = "space: {optim.lr: {type: float, low: 0.001, high: 0.1}}\n"
    (own / "mask.yaml").write_text("study: mine\n" + space)
    monkeypatch.setenv("HPO_STUDIES", str(own))
    mine = specs.load("mask")
    assert mine.name == "mine" and mine.base.data.cache_dir == "runs/mine/cache"
    assert specs.load("demo").name == "demo"  # the shipped one, not in the user's folder

    monkeypatch.setenv("HPO_CACHE", str(tmp_path / "node-local"))
    assert specs.load("mask").base.data.cache_dir == str(tmp_path / "node-local" / "mine")
    (own / "fixed.yaml").write_text("fixed: {data.cache_dir: /scratch/c}\n" + space)
    assert specs.load("fixed").base.data.cache_dir == "/scratch/c"  # a spec's own value wins


def draws(spec, n=6, seed=None):
    """Parameters of n trials asked one by one from the spec's sampler (a fresh study each call)."""
    if seed is not None:
        spec = dataclasses.replace(spec, sampler=dataclasses.replace(spec.sampler, seed=seed))
    study = optuna.create_study(sampler=spec.make_sampler(), direction="maximize")
    params = []
    for i in range(n):
        trial = study.ask()
        suggest(trial, spec.params)
        study.tell(trial, float(i % 3))
        params.append(trial.params)
    return params


def test_a_trials_draws_follow_the_spec_seed_and_the_trial_number_not_the_process():
    demo = specs.load("demo")
    first = draws(demo)
    assert draws(demo) == first  # another process, worker or machine asking: the same trials
    assert len({str(p) for p in first}) == len(first)  # each trial a stream of its own
    assert draws(demo, seed=1) != first


@pytest.mark.parametrize(
    "heartbeat, message",
    [
        ({"outage": "5m"}, "heartbeat.outage must be a whole number of seconds (or retries), got '5m'"),
        ({"grace": 0}, "heartbeat.grace must be a whole number"),
        ({"max_retry": -1}, "heartbeat.max_retry must be a whole number"),
        ({"every": 3}, "heartbeat takes interval, grace, max_retry and outage"),
    ],
)
def test_a_bad_heartbeat_names_the_key(tmp_path, heartbeat, message):
    lr = {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"study": "s", "space": lr, "heartbeat": heartbeat}))
    with pytest.raises(UserError, match=re.escape(message)):
        specs.load(str(path))
    path.write_text(yaml.safe_dump({"study": "s", "space": lr, "heartbeat": {"outage": 60, "max_retry": 0}}))
    assert specs.load(str(path)).heartbeat.outage == 60


def test_objectives_give_the_study_its_directions_and_no_pruner(tmp_path):
    lr = {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"study": "s", "space": lr, "objectives": ["val_macro_f1", "params_m"]}))
    two = specs.load(str(path))
    assert two.multi and two.directions == ["maximize", "minimize"] and two.pruner.name == "none"
    path.write_text(yaml.safe_dump({"study": "s", "space": lr}))
    one = specs.load(str(path))
    assert not one.multi and one.directions == ["maximize"] and one.pruner.name == "hyperband"


def test_the_patient_pruner_stops_a_trial_three_epochs_below_its_best():
    spec_pruner = specs.PRUNERS["patient"](5)  # patience 2: its best epoch plus 2 more may pass
    study = optuna.create_study(direction="maximize", pruner=spec_pruner)
    trial = study.ask()
    decisions = []
    for epoch, value in enumerate([0.30, 0.20, 0.25, 0.22], start=1):
        trial.report(value, epoch)
        decisions.append(trial.should_prune())
    assert decisions == [False, False, False, True]


@pytest.mark.parametrize(
    "export, message",
    [
        ({"top_k": 0}, "export.top_k must be a whole number of trials, at least 1, got 0"),
        ({"top_k": "3"}, "export.top_k must be a whole number of trials, at least 1, got '3'"),
        ({"k": 3}, "export must be a mapping with `top_k`"),
        ([3], "export must be a mapping with `top_k`"),
        (False, "export must be a mapping with `top_k`"),
        ({"top_k": 2, "objectives": 2}, "export.top_k: a study with several objectives exports the trial"),
    ],
)
def test_the_export_default_is_a_whole_number_of_trials(tmp_path, export, message):
    lr = {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2}}
    path = tmp_path / "s.yaml"
    two = isinstance(export, dict) and export.pop("objectives", None)
    objectives = {"objectives": ["val_macro_f1", "params_m"], "pruner": "none"} if two else {}
    path.write_text(yaml.safe_dump({"study": "s", "space": lr, "export": export, **objectives}))
    with pytest.raises(UserError, match=re.escape(message)):
        specs.load(str(path))
    path.write_text(yaml.safe_dump({"study": "s", "space": lr}))
    assert specs.load(str(path)).top_k == 1  # a spec without it: the single best trial


def test_export_best_defaults_to_the_specs_top_k_or_as_many_distinct_recipes_as_there_are(capsys):
    from hpo.export_best import default_trials
    from hpo.protocol import Attr
    from hpo.record import Recipes
    from maskcls.config import TrainConfig

    config = TrainConfig().to_dict()
    lr = optuna.distributions.FloatDistribution(1e-3, 1e-2)
    study = optuna.create_study(direction="maximize")
    with pytest.raises(UserError, match="has no finished trial yet"):
        default_trials(study, 3, Recipes(TrainConfig(), None))
    for value, rate in [(0.3, 3e-3), (0.5, 5e-3), (0.4, 3e-3), (0.2, 2e-3)]:  # 0.4 repeats 0.3's recipe
        study.add_trial(
            optuna.trial.create_trial(
                params={"optim.lr": rate},
                distributions={"optim.lr": lr},
                value=value,
                user_attrs={Attr.CONFIG: config},
            )
        )
    assert [t.value for t in default_trials(study, 1, Recipes(TrainConfig(), None))] == [0.5]
    assert [t.value for t in default_trials(study, 2, Recipes(TrainConfig(), None))] == [0.5, 0.4]
    assert capsys.readouterr().err == ""
    assert [t.value for t in default_trials(study, 5, Recipes(TrainConfig(), None))] == [
        0.5,
        0.4,
        0.2,
    ]  # three distinct recipes
    assert "export.top_k is 5; study" in capsys.readouterr().err
