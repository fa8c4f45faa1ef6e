"""`hpo.run --stop plateau:N`: the rule on made studies (no training), its refusals, and one real
run that it stops, which a second run of the same command then leaves stopped."""

import datetime

import optuna
import pytest
from helpers import finish, hpo_run, storage_at, write_spec

from hpo.stopping import Plateau, parse
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


@pytest.mark.parametrize(
    "text", ["plateau", "plateau:0", "plateau:-1", "plateau:x", "terminator", "Plateau:3"]
)
def test_a_bad_rule_is_one_error(text):
    with pytest.raises(UserError, match="--stop takes plateau:N"):
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
        == "error: --stop takes plateau:N with N >= 1 finished trials, got 'plateau:0'\n"
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
    # The trial running when the rule fired is interrupted and queued again, or, when its
    # interrupt lands where Python swallows it, ends first (tests/test_failures.py): no other starts.
    assert [(t.number, t.state) for t in finished][:2] == [(0, COMPLETE), (1, PRUNED)] and len(finished) <= 3
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
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
