"""Stopping rules besides --n-trials and --timeout:

- `--stop plateau:N` ends the search once N trials have finished (complete or pruned) since the
  last one that improved the best value;
- `--stop terminator[:N]` is Optuna's Terminator (Makarova et al., 2022): once N trials (default
  20) are complete, it ends the search when the regret bound of a Gaussian process fitted to the
  trials (how much better the best value could still get) falls below the noise of the best
  trial's value. The noise is what hpo.objective measures on every complete trial: the spread of
  its macro-F1 over 5 disjoint groups of validation people (Attr.VAL_PERSON_FOLDS), scaled as
  Optuna's CrossValidationErrorEvaluator scales cross-validation scores.

Every worker evaluates the rule before it starts a trial, and every dispatcher when the count of
finished trials moves (then it stops its running trials): all machines of a shared study weigh the
same trials, so all of them stop, and none starts a trial once the study meets the rule, however
late a dispatcher's poll. A run started again on such a study stops before starting a trial.

Optuna deprecated `optuna.terminator` in 4.9 and removes it in 6.0: with Optuna 6 the terminator
rule is refused in one line (plateau stays), and its FutureWarning is not shown.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import optuna

from hpo.protocol import Attr
from maskcls.errors import UserError, quoted

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
TERMINATOR_MIN_TRIALS = 20  # Optuna's default


@dataclass(frozen=True)
class Plateau:
    trials: int  # finished trials without improvement that end the search

    def reason(self, study: optuna.Study) -> str | None:
        """Why the search should stop now, or None. The best value is the first objective's, in
        its direction; trials count in the order they finished."""
        finished = sorted(
            study.get_trials(deepcopy=False, states=FINISHED),
            key=lambda t: (t.datetime_complete is None, t.datetime_complete, t.number),
        )
        sign = 1 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else -1
        best, best_at = None, None
        for i, trial in enumerate(finished):
            if trial.state == optuna.trial.TrialState.COMPLETE and (
                best is None or sign * trial.values[0] > sign * best.values[0]
            ):
                best, best_at = trial, i
        if best is None or best_at is None:
            return None  # nothing to improve on yet
        since = len(finished) - 1 - best_at
        if since < self.trials:
            return None
        return (
            f"plateau: the best value {best.values[0]:.4f} (trial {best.number}) has not improved in the "
            f"{since} trials finished since (--stop plateau:{self.trials})"
        )


def noise(trial: optuna.trial.FrozenTrial) -> float | None:
    """The standard error of a trial's validation value from its person folds, scaled as Optuna's
    CrossValidationErrorEvaluator does (var * (1/k + 1/(k-1))); None without two folds."""
    folds = trial.user_attrs.get(Attr.VAL_PERSON_FOLDS)
    if not isinstance(folds, list) or len(folds) < 2:
        return None
    k = len(folds)
    return math.sqrt((1 / k + 1 / (k - 1)) * float(np.var(folds)))


@dataclass(frozen=True)
class Terminator:
    trials: int = TERMINATOR_MIN_TRIALS  # complete trials before the rule is weighed

    def reason(self, study: optuna.Study) -> str | None:
        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if len(complete) < self.trials:
            return None
        sign = 1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1
        best = max(complete, key=lambda t: sign * t.values[0])
        error = noise(best)
        if error is None:  # a trial recorded before the folds were (or one with a single person)
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the module's deprecation, said above
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            from optuna.terminator import RegretBoundEvaluator

            bound = RegretBoundEvaluator(min_n_trials=min(self.trials, TERMINATOR_MIN_TRIALS)).evaluate(
                list(complete), study.direction
            )
        if not bound < error:
            return None
        folds = len(best.user_attrs[Attr.VAL_PERSON_FOLDS])
        return (
            f"terminator: the regret bound {bound:.4f} is below the noise {error:.4f} of the best value "
            f"{best.values[0]:.4f} (trial {best.number}, over {folds} groups of validation people) after "
            f"{len(complete)} complete trials (--stop terminator:{self.trials})"
        )


Rule = Plateau | Terminator
USAGE = "--stop takes plateau:N (N >= 1 finished trials) or terminator[:N] (N >= 2 complete trials)"


def parse(text: str | None, multi: bool = False) -> Rule | None:
    if text is None:
        return None
    name, colon, count = text.partition(":")
    if name == "terminator" and (not colon or (count.isdigit() and int(count) >= 2)):
        if multi:
            raise UserError("--stop terminator weighs one objective; this study has several: use plateau:N")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                import optuna.terminator  # noqa: F401
        except ImportError:
            raise UserError(
                f"--stop terminator needs optuna.terminator, which Optuna {optuna.__version__} no longer "
                "has (removed in 6.0): use --stop plateau:N"
            ) from None
        return Terminator(int(count) if colon else TERMINATOR_MIN_TRIALS)
    if name != "plateau" or not count.isdigit() or int(count) < 1:
        raise UserError(f"{USAGE}, got {quoted(text)}")
    return Plateau(int(count))
