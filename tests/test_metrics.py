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


def test_person_folds_score_disjoint_groups_of_people():
    from maskcls.metrics import macro_f1, person_fold_f1

    person = np.array(["p3", "p1", "p2", "p1", "p4", "p3", "p2", "p5", "p6"])
    y_true = np.array([0, 1, 2, 1, 3, 0, 2, 4, 5])
    y_pred = np.array([0, 1, 0, 1, 3, 1, 2, 4, 0])
    folds = person_fold_f1(y_true, y_pred, person, folds=3)
    # sorted people p1..p6 dealt out in turn: {p1, p4}, {p2, p5}, {p3, p6}
    groups = [{"p1", "p4"}, {"p2", "p5"}, {"p3", "p6"}]
    expected = [macro_f1(y_true[np.isin(person, list(g))], y_pred[np.isin(person, list(g))]) for g in groups]
    assert folds == expected and len(set(folds)) > 1
    assert len(person_fold_f1(y_true[:2], y_pred[:2], person[:2], folds=5)) == 2  # fewer people than folds
