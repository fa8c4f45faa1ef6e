"""Decision biases fitted for macro-F1 (maskcls.calibrate)."""

import numpy as np

from maskcls.calibrate import fit_biases
from maskcls.labels import NUM_CLASSES
from maskcls.metrics import macro_f1


def test_biases_raise_macro_f1_where_a_class_is_under_predicted():
    rng = np.random.default_rng(0)
    labels = np.tile(np.arange(NUM_CLASSES), 20)  # every class in both halves
    probs = np.full((len(labels), NUM_CLASSES), 0.01)
    probs[np.arange(len(labels)), labels] = 0.5 + 0.1 * rng.random(len(labels))
    rare = labels == 17
    probs[rare, 16] = 0.7  # the model always prefers class 16 for the true 17s, by a margin
    probs /= probs.sum(1, keepdims=True)
    assert not (probs.argmax(1) == 17).any()
    cal = fit_biases(labels, probs)
    assert cal.applied and (cal.biases[17] > 0 or cal.biases[16] < 0)
    assert cal.after > cal.before + 0.05 and cal.check_after > cal.check_before
    biased = (np.log(probs + 1e-12) + np.array(cal.biases)).argmax(1)
    assert macro_f1(labels, biased) == cal.after and (biased[rare] == 17).all()


def test_a_perfect_classifier_keeps_its_decisions():
    labels = np.tile(np.arange(NUM_CLASSES), 10)
    probs = np.full((len(labels), NUM_CLASSES), 0.01)
    probs[np.arange(len(labels)), labels] = 0.83
    cal = fit_biases(labels, probs)
    assert not cal.applied and cal.biases == [0.0] * NUM_CLASSES and cal.before == cal.after == 1.0


def test_biases_that_do_not_carry_over_to_the_held_back_half_are_not_applied():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, NUM_CLASSES, 200)
    probs = rng.dirichlet(np.ones(NUM_CLASSES), 200)  # noise: any gain on one half is luck
    cal = fit_biases(labels, probs)
    assert cal.check_after <= cal.check_before and not cal.applied and cal.after == cal.before
