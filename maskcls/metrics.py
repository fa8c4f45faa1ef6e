"""The competition metric: macro-F1 over the 18 classes, zero for a class never predicted.

A few lines of numpy, the same figures as scikit-learn's f1_score(average=None/"macro",
zero_division=0) (tests/test_metrics.py compares them), without its import in every worker.
"""

from __future__ import annotations

import numpy as np

from maskcls.labels import NUM_CLASSES


def confusion(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Counts [18, 18]: row = true class, column = predicted class."""
    pairs = np.asarray(y_true, np.int64) * NUM_CLASSES + np.asarray(y_pred, np.int64)
    return np.bincount(pairs, minlength=NUM_CLASSES**2).reshape(NUM_CLASSES, NUM_CLASSES)


def per_class_f1(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """F1 = 2 TP / (2 TP + FP + FN) per class; 0 where a class is neither present nor predicted."""
    counts = confusion(y_true, y_pred)
    tp = np.diag(counts).astype(np.float64)
    denominator = counts.sum(0) + counts.sum(1)  # (TP + FP) + (TP + FN)
    return np.divide(2 * tp, denominator, out=np.zeros(NUM_CLASSES), where=denominator > 0)


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Unweighted mean over all 18 classes."""
    return float(per_class_f1(y_true, y_pred).mean())


def attribute_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """How often each attribute of the class is right (class = mask * 6 + gender * 3 + age_band):
    where the 18 classes lose, mask, gender or the age band."""
    t, p = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    parts = {"mask": lambda c: c // 6, "gender": lambda c: c // 3 % 2, "age_band": lambda c: c % 3}
    return {name: round(float((part(t) == part(p)).mean()), 4) for name, part in parts.items()}


def person_fold_f1(y_true: np.ndarray, y_pred: np.ndarray, person: np.ndarray, folds: int = 5) -> list[float]:
    """Macro-F1 on each of `folds` disjoint groups of people (people in sorted order, dealt out in
    turn): how much the validation score moves with the people it is measured on, which is the
    noise a stopping rule weighs improvements against. Fewer folds when there are fewer people."""
    people = np.unique(person)
    folds = min(folds, len(people))
    fold_of = dict(zip(people.tolist(), np.arange(len(people)) % folds, strict=True))
    fold = np.array([fold_of[p] for p in np.asarray(person).tolist()], dtype=np.int64)
    t, p = np.asarray(y_true), np.asarray(y_pred)
    return [macro_f1(t[fold == k], p[fold == k]) for k in range(folds)]
