"""The competition metric: macro-F1 over the 18 classes, zero for a class never predicted."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score

from maskcls.labels import NUM_CLASSES

CLASSES = list(range(NUM_CLASSES))


def per_class_f1(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    return f1_score(y_true, y_pred, labels=CLASSES, average=None, zero_division=0)


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Unweighted mean over all 18 classes."""
    return float(f1_score(y_true, y_pred, labels=CLASSES, average="macro", zero_division=0))


def confusion(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    return confusion_matrix(y_true, y_pred, labels=CLASSES)
