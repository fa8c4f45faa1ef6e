"""Stopping rules besides --n-trials and --timeout: `hpo.run --stop plateau:N` ends the search once
N trials have finished (complete or pruned) since the last one that improved the best value.

Every machine of a shared study evaluates the rule on the same trials, so all of them stop; a run
started again on a study that meets it stops before starting a trial. (Optuna's Terminator, the
other rule such studies use, is deprecated since Optuna 4.9 and leaves in 6.0: not offered.)
"""

from __future__ import annotations

from dataclasses import dataclass

import optuna

from maskcls.errors import UserError, quoted

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


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


def parse(text: str | None) -> Plateau | None:
    if text is None:
        return None
    name, _, count = text.partition(":")
    if name != "plateau" or not count.isdigit() or int(count) < 1:
        raise UserError(f"--stop takes plateau:N with N >= 1 finished trials, got {quoted(text)}")
    return Plateau(int(count))
