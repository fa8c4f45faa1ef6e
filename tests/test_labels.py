import itertools

import numpy as np
import pytest

from maskcls.labels import (
    MASK_STEMS,
    NUM_CLASSES,
    AgeBand,
    AgeCutoffs,
    Gender,
    Mask,
    age_band,
    class_name,
    decode,
    encode,
)

EXPECTED_MASK = {"mask1": 0, "mask2": 0, "mask3": 0, "mask4": 0, "mask5": 0, "incorrect_mask": 1, "normal": 2}
AGES = {18: 0, 29: 0, 30: 1, 31: 1, 57: 1, 58: 1, 59: 1, 60: 2}


@pytest.mark.parametrize("stem,gender,age", list(itertools.product(EXPECTED_MASK, ["male", "female"], AGES)))
def test_every_stem_gender_age_combination(stem, gender, age):
    g = {"male": 0, "female": 1}[gender]
    expected = EXPECTED_MASK[stem] * 6 + g * 3 + AGES[age]
    label = encode(MASK_STEMS[stem], Gender(g), age_band(age))
    assert label == expected
    assert decode(label) == (Mask(EXPECTED_MASK[stem]), Gender(g), AgeBand(AGES[age]))


@pytest.mark.parametrize("old,age,band", [(58, 57, 1), (58, 58, 2), (59, 58, 1), (59, 59, 2), (60, 59, 1)])
def test_moved_upper_cutoff(old, age, band):
    assert age_band(age, AgeCutoffs(old=old)) == band


def test_vectorised_encode_matches_scalar():
    ages = np.array([18, 29, 30, 59, 60])
    bands = age_band(ages)
    assert bands.tolist() == [0, 0, 1, 1, 2]
    assert encode(np.full(5, 2), np.ones(5, int), bands).tolist() == [15, 15, 16, 16, 17]


def test_every_class_round_trips_and_has_a_distinct_name():
    names = {class_name(c) for c in range(NUM_CLASSES)}
    assert len(names) == NUM_CLASSES
    for c in range(NUM_CLASSES):
        assert encode(*decode(c)) == c
    assert class_name(17) == "not_wear/female/60+"
    assert class_name(4, AgeCutoffs(old=58)) == "wear/female/30-57"


def test_bad_values_are_refused():
    assert "mask6" not in MASK_STEMS  # the layout reports such a file as unexpected
    with pytest.raises(ValueError):
        decode(18)
    with pytest.raises(ValueError):
        AgeCutoffs(young=60, old=30)
    assert len(MASK_STEMS) == 7
