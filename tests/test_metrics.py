import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, f1_score

from maskcls.metrics import confusion, macro_f1, per_class_f1

CLASSES = list(range(18))


@pytest.mark.parametrize("seed", range(5))
def test_numpy_metrics_equal_scikit_learns(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    y_true = rng.integers(0, 18, n)
    y_pred = np.where(rng.random(n) < 0.5, y_true, rng.integers(0, 12, n))  # some classes never predicted
    expected = f1_score(y_true, y_pred, labels=CLASSES, average=None, zero_division=0)
    assert np.allclose(per_class_f1(y_true, y_pred), expected)
    assert macro_f1(y_true, y_pred) == pytest.approx(
        f1_score(y_true, y_pred, labels=CLASSES, average="macro", zero_division=0)
    )
    assert np.array_equal(confusion(y_true, y_pred), confusion_matrix(y_true, y_pred, labels=CLASSES))


def test_a_class_never_seen_nor_predicted_scores_zero():
    assert per_class_f1(np.array([0, 0]), np.array([0, 0])).tolist() == [1.0] + [0.0] * 17
    assert macro_f1(np.array([0, 0]), np.array([0, 0])) == pytest.approx(1 / 18)


def test_attribute_accuracy_tells_which_part_of_the_class_was_wrong():
    from maskcls.metrics import attribute_accuracy

    # 17 = not_wear/female/60+; 14 = not_wear/male/60+ (gender wrong); 16 = not_wear/female/30-59 (age wrong)
    assert attribute_accuracy(np.array([17, 17]), np.array([14, 16])) == {
        "mask": 1.0,
        "gender": 0.5,
        "age_band": 0.5,
    }
    assert attribute_accuracy(np.array([0]), np.array([6])) == {"mask": 0.0, "gender": 1.0, "age_band": 1.0}
