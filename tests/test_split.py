import numpy as np
import pytest

from maskcls.data.layout import scan
from maskcls.data.split import holdout, kfold


@pytest.fixture(scope="module")
def images(standin300):
    return scan(standin300)


def people(images, rows):
    return set(images["person"].iloc[rows])


def test_holdout_keeps_people_whole_and_is_seeded(images):
    split = holdout(images, val_ratio=0.2, seed=0)
    assert not people(images, split.train) & people(images, split.val)
    assert len(split.train) + len(split.val) == len(images)
    assert 0.17 <= len(people(images, split.val)) / 300 <= 0.23
    again, other = holdout(images, 0.2, seed=0), holdout(images, 0.2, seed=1)
    assert np.array_equal(split.val, again.val) and not np.array_equal(split.val, other.val)


def test_holdout_puts_the_tiny_60_band_on_both_sides(images):
    split = holdout(images, 0.2, seed=3)
    assert (images["age_band"].iloc[split.val] == 2).any() and (
        images["age_band"].iloc[split.train] == 2
    ).any()


def test_folds_are_disjoint_cover_everyone_and_have_similar_class_mix(images):
    folds = kfold(images, k=5, seed=0)
    seen = set()
    overall = np.bincount(images["label"], minlength=18) / len(images)
    for fold in folds:
        assert not people(images, fold.train) & people(images, fold.val)
        assert seen.isdisjoint(people(images, fold.val))
        seen |= people(images, fold.val)
        mix = np.bincount(images["label"].iloc[fold.val], minlength=18) / len(fold.val)
        assert np.abs(mix - overall).max() < 0.04, (mix - overall).round(3)
    assert len(seen) == 300


def test_tiny_data_with_single_person_strata_still_splits(tiny_root):
    tiny = scan(tiny_root)  # 6 people: several gender x age strata hold one person
    split = holdout(tiny, val_ratio=0.34, seed=0)
    assert len(people(tiny, split.val)) == 3 and not people(tiny, split.train) & people(tiny, split.val)
    assert len(kfold(tiny, k=2, seed=0)) == 2
