"""Decision biases fitted for macro-F1 on predictions the model did not train on.

Macro-F1 weighs the six tiny 60+ classes like the big ones, and a model trained for accuracy
rarely predicts them. Adding a bias per class to the log-probabilities before the argmax moves the
decision boundaries towards them; the 18 biases are fitted by coordinate ascent: for each class in
turn every value of GRID is tried with the others fixed and the best kept, for up to ROUNDS rounds
or until none moves. Each nonzero bias costs PENALTY of macro-F1, so a bias that buys less (one
image of a small class) stays 0, and a perfect classifier stays unchanged.

A held-back check keeps it honest on a few hundred validation images: biases fitted on one half of
the predictions are scored on the other half, both ways round. If that does not beat the plain
argmax on average, no biases are applied (all zero).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from maskcls.labels import NUM_CLASSES
from maskcls.metrics import macro_f1

GRID = np.round(np.arange(-3.0, 3.01, 0.1), 2)
ROUNDS = 4
PENALTY = 1e-3


@dataclass(frozen=True)
class Calibration:
    biases: list[float]  # one per class, added to the log-probabilities; all 0 when not applied
    before: float  # macro-F1 of the plain argmax on the held-out predictions
    after: float  # with the biases, on the same predictions (optimistic: fitted on them)
    check_before: float  # the held-back check: plain argmax on each half, mean of both
    check_after: float  # biases fitted on the other half, mean of both

    @property
    def applied(self) -> bool:
        return any(self.biases)


def _fit(labels: np.ndarray, logp: np.ndarray) -> np.ndarray:
    biases = np.zeros(NUM_CLASSES)

    def score(b: np.ndarray) -> float:
        return macro_f1(labels, (logp + b).argmax(1)) - PENALTY * np.count_nonzero(b)

    best = score(biases)
    for _ in range(ROUNDS):
        moved = False
        for c in range(NUM_CLASSES):
            for value in GRID:
                trial = biases.copy()
                trial[c] = value
                s = score(trial)
                if s > best + 1e-12:
                    best, biases, moved = s, trial, True
        if not moved:
            break
    return biases


def fit_biases(labels: np.ndarray, probs: np.ndarray) -> Calibration:
    """Biases for argmax(log probs + b) on held-out `probs` [N, 18] with true `labels` [N]."""
    labels = np.asarray(labels)
    logp = np.log(np.asarray(probs, np.float64) + 1e-12)
    half = len(labels) // 2  # rows are in table order: a person's photos stay on one side
    halves = [(slice(0, half), slice(half, None)), (slice(half, None), slice(0, half))]
    check_before, check_after = [], []
    for fit_on, score_on in halves:
        b = _fit(labels[fit_on], logp[fit_on])
        check_before.append(macro_f1(labels[score_on], logp[score_on].argmax(1)))
        check_after.append(macro_f1(labels[score_on], (logp[score_on] + b).argmax(1)))
    before = macro_f1(labels, logp.argmax(1))
    carries_over = np.mean(check_after) > np.mean(check_before)  # else the decisions stay plain argmax
    biases = _fit(labels, logp) if carries_over else np.zeros(NUM_CLASSES)
    return Calibration(
        biases=[float(b) for b in biases],
        before=before,
        after=macro_f1(labels, (logp + biases).argmax(1)),
        check_before=float(np.mean(check_before)),
        check_after=float(np.mean(check_after)),
    )
