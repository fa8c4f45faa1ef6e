"""`hpo.run --stop plateau:N` and `--stop terminator[:N]`: the rules on made studies (no
training), their refusals, and real runs that they stop, which a second run of the same command
then leaves stopped."""

import datetime
import warnings

import numpy as np
import optuna
import pytest
from helpers import finish, hpo_run, storage_at, write_spec

from hpo.protocol import Attr
from hpo.stopping import Plateau, Terminator, noise, parse
from maskcls.errors import UserError

COMPLETE, PRUNED = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED


def study_of(finished, direction="maximize"):
    """Trials in the order they finished (a value completes, None is pruned), added the other way
    round: trial numbers run against the order of completion, as with several workers."""
    study = optuna.create_study(direction=direction)
    start = datetime.datetime(2026, 12, 1)
    for position, value in reversed(list(enumerate(finished))):
        trial = optuna.trial.create_trial(state=COMPLETE if value is not None else PRUNED, value=value)
        trial.datetime_start = start
        trial.datetime_complete = start + datetime.timedelta(minutes=position)
        study.add_trial(trial)
    return study


def test_plateau_counts_finished_trials_since_the_best_in_the_order_they_finished():
    assert Plateau(2).reason(study_of([])) is None
    assert Plateau(2).reason(study_of([None, None, None])) is None  # nothing to improve on yet
    assert Plateau(2).reason(study_of([0.3, 0.5, 0.4])) is None  # 1 since the best
    why = Plateau(2).reason(study_of([0.3, 0.5, 0.4, None]))
    best = 4 - 1 - 1  # the second to finish holds number 2
    assert why == (
        f"plateau: the best value 0.5000 (trial {best}) has not improved in the 2 trials finished "
        "since (--stop plateau:2)"
    )
    assert Plateau(2).reason(study_of([0.3, 0.5, 0.4, None, 0.6])) is None  # improved again
    assert Plateau(1).reason(study_of([0.5, 0.2], direction="minimize")) is None  # lower is better
    assert Plateau(1).reason(study_of([0.2, 0.5], direction="minimize")) is not None


def study_with_noise(values, folds):
    """Complete trials of a 2-parameter space with the given values, each with `folds` as its
    macro-F1 over groups of validation people."""
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    space = {
        "lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True),
        "dropout": optuna.distributions.FloatDistribution(0.0, 0.5),
    }
    rng = np.random.default_rng(0)
    for value in values:
        params = {"lr": float(10 ** rng.uniform(-4, -1)), "dropout": float(rng.uniform(0, 0.5))}
        study.add_trial(
            optuna.trial.create_trial(
                value=value, params=params, distributions=space, user_attrs={Attr.VAL_PERSON_FOLDS: folds}
            )
        )
    return study


def test_the_noise_is_optunas_cross_validation_error_of_the_person_folds():
    folds = [0.31, 0.52, 0.44, 0.61, 0.38]
    trial = optuna.trial.create_trial(
        value=0.45,
        user_attrs={Attr.VAL_PERSON_FOLDS: folds},
        system_attrs={"terminator:cv_scores": folds},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from optuna.terminator import CrossValidationErrorEvaluator

        theirs = CrossValidationErrorEvaluator().evaluate([trial], optuna.study.StudyDirection.MAXIMIZE)
    assert noise(trial) == pytest.approx(theirs)
    assert noise(optuna.trial.create_trial(value=0.4)) is None  # a trial recorded before the folds
    assert noise(optuna.trial.create_trial(value=0.4, user_attrs={Attr.VAL_PERSON_FOLDS: [0.4]})) is None


def test_the_terminator_stops_when_the_values_differ_less_than_the_noise(recwarn):
    rng = np.random.default_rng(1)
    flat = list(0.5 + 0.002 * rng.standard_normal(12))
    spread = list(rng.uniform(0.1, 0.9, 12))
    noisy, exact = [0.3, 0.7, 0.45, 0.55, 0.5], [0.5, 0.5001, 0.4999, 0.5, 0.5]
    why = Terminator(10).reason(study_with_noise(flat, noisy))
    assert why is not None and why.startswith("terminator: the regret bound ")
    assert why.endswith("over 5 groups of validation people) after 12 complete trials (--stop terminator:10)")
    assert Terminator(10).reason(study_with_noise(spread, exact)) is None  # room left, little noise
    assert Terminator(13).reason(study_with_noise(flat, noisy)) is None  # too few complete trials
    assert Terminator(10).reason(study_with_noise(flat, [])) is None  # no folds recorded: no decision
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]  # Optuna's deprecation


def test_rules_parse():
    assert parse("plateau:3") == Plateau(3)
    assert parse("terminator") == Terminator(20)
    assert parse("terminator:5") == Terminator(5)
    with pytest.raises(UserError, match="^--stop terminator weighs one objective"):
        parse("terminator", multi=True)


@pytest.mark.parametrize(
    "text",
    ["plateau", "plateau:0", "plateau:-1", "plateau:x", "Plateau:3"]
    + ["terminator:1", "terminator:", "terminator:x"],
)
def test_a_bad_rule_is_one_error(text):
    with pytest.raises(UserError, match=r"^--stop takes plateau:N \(N >= 1 finished trials\) or terminator"):
        parse(text)


def test_hpo_run_refuses_a_bad_rule_in_one_line(capsys, tmp_path, small_root):
    from hpo.run import main
    from maskcls.cli import run_main

    spec = write_spec(tmp_path, small_root)
    with pytest.raises(SystemExit) as end:
        run_main(main, ["--study", str(spec), "--stop", "plateau:0"])
    assert end.value.code == 2
    assert (
        capsys.readouterr().err
        == "error: --stop takes plateau:N (N >= 1 finished trials) or terminator[:N] (N >= 2 complete "
        "trials), got 'plateau:0'\n"
    )
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_plateau_stops_the_run_a_second_run_starts_no_trial_and_add_runs_one_more(small_root, tmp_path):
    """The spec's queued recipes: trial 0 completes in 1 epoch, trial 1 is pruned at epoch 2. With
    plateau:1 the run stops once trial 1 has finished, though --n-trials asks for 8."""
    spec = write_spec(tmp_path, small_root, n_trials=8)
    storage = f"sqlite:///{tmp_path / 'stop.db'}"
    args = ("--workers", "1", "--stop", "plateau:1", "--artifacts", str(tmp_path / "artifacts"))
    code, out, err = finish(hpo_run(spec, storage, *args, cwd=tmp_path))
    assert code == 0, err
    study = optuna.load_study(study_name="t", storage=storage_at(storage))
    finished = [t for t in study.trials if t.state in (COMPLETE, PRUNED)]
    # The worker weighs the rule before each trial: none starts after trial 1, however late the
    # dispatcher's poll (on a loaded machine it came 2 trials late when only the dispatcher weighed it).
    assert [(t.number, t.state) for t in study.trials] == [(0, COMPLETE), (1, PRUNED)]
    worker_log = (tmp_path / "runs" / "t" / "logs" / "cpu0.log").read_text()
    assert "starting no trial: plateau: the best value" in worker_log
    line = "stopping: plateau: the best value"
    assert sum(line in x for x in err.splitlines()) == 1, err
    assert f"study t: {len(finished)}/8 finished" in out

    code, out, err = finish(hpo_run(spec, storage, *args, cwd=tmp_path))
    assert code == 0 and "not starting: plateau: the best value" in err, err
    again = optuna.load_study(study_name="t", storage=storage_at(storage))
    assert len([t for t in again.trials if t.state in (COMPLETE, PRUNED)]) == len(finished)

    # Without --stop the rule is off; --add 1 runs one trial more than the study holds.
    code, out, err = finish(hpo_run(spec, storage, *args[:2], *args[4:], "--add", "1", cwd=tmp_path))
    more = len(finished) + 1
    assert code == 0 and f"study t: {more}/{more} finished" in out, err


@pytest.mark.slow
def test_the_terminator_stops_a_search_with_no_room_left_and_a_rerun_starts_nothing(small_root, tmp_path):
    """Every trial trains the same recipe (lr within 1e-7 of 3e-3, 1 epoch), so two complete trials
    leave the Gaussian process no room above the best value: a regret bound of about 0, below the
    noise that the trials themselves recorded over groups of validation people."""
    same = {
        "train.epochs": {"type": "categorical", "choices": [1]},
        "optim.lr": {"type": "float", "low": 3e-3, "high": 3.0001e-3},
    }
    spec = write_spec(tmp_path, small_root, n_trials=8, pruner={"name": "none"}, enqueue=[], space=same)
    storage = f"sqlite:///{tmp_path / 'stop.db'}"
    args = ("--workers", "1", "--stop", "terminator:2", "--artifacts", str(tmp_path / "artifacts"))
    code, out, err = finish(hpo_run(spec, storage, *args, cwd=tmp_path))
    assert code == 0, err
    study = optuna.load_study(study_name="t", storage=storage_at(storage))
    complete = [t for t in study.trials if t.state == COMPLETE]
    assert [(t.number, t.state) for t in study.trials] == [(0, COMPLETE), (1, COMPLETE)], err
    assert all(len(t.user_attrs[Attr.VAL_PERSON_FOLDS]) == 5 for t in complete)
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    lines = [x for x in err.splitlines() if "stopping: terminator: the regret bound" in x]
    assert len(lines) == 1 and "after 2 complete trials (--stop terminator:2)" in lines[0], err
    assert "FutureWarning" not in err + out

    code, out, err = finish(hpo_run(spec, storage, *args, cwd=tmp_path))
    assert code == 0 and "not starting: terminator: the regret bound" in err, err
    again = optuna.load_study(study_name="t", storage=storage_at(storage))
    assert len([t for t in again.trials if t.state == COMPLETE]) == len(complete)


def test_hpo_run_refuses_the_terminator_for_several_objectives(capsys, tmp_path, small_root):
    from hpo.run import main
    from maskcls.cli import run_main

    spec = write_spec(tmp_path, small_root, objectives=["val_macro_f1", "params_m"], pruner={"name": "none"})
    with pytest.raises(SystemExit) as end:
        run_main(main, ["--study", str(spec), "--stop", "terminator"])
    assert end.value.code == 2
    assert capsys.readouterr().err == (
        "error: --stop terminator weighs one objective; this study has several: use plateau:N\n"
    )
    assert not (tmp_path / "runs").exists()
