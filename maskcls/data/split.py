"""Person-level splits. Never by image: a person's seven photos are near duplicates, and an
image-level split inflated validation macro-F1 to 0.9+ while the leaderboard said ~0.75.

People are stratified by gender x age band by default so the tiny 60+ band lands on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold, train_test_split

STRATIFY = ("gender", "age_band")


@dataclass(frozen=True)
class Split:
    """Row positions into the images table."""

    train: np.ndarray
    val: np.ndarray


def _people(images: pd.DataFrame, stratify: tuple[str, ...], min_count: int) -> tuple[np.ndarray, np.ndarray]:
    people = images.groupby("person", sort=True)[list(stratify)].first()
    strata = people.astype(str).agg("/".join, axis=1) if stratify else pd.Series("all", people.index)
    rare = strata.map(strata.value_counts()) < min_count
    strata[rare] = "rare"  # too few people to spread over every side: pool them
    if 0 < rare.sum() < min_count:  # still too few: join the largest stratum
        strata[rare] = strata[~rare].value_counts().idxmax() if (~rare).any() else "rare"
    return people.index.to_numpy(), strata.to_numpy()


def _rows(images: pd.DataFrame, train_people, val_people) -> Split:
    person = images["person"].to_numpy()
    return Split(np.flatnonzero(np.isin(person, train_people)), np.flatnonzero(np.isin(person, val_people)))


def holdout(
    images: pd.DataFrame, val_ratio: float = 0.2, seed: int = 0, stratify: tuple[str, ...] = STRATIFY
) -> Split:
    if not 0 < val_ratio < 1:
        raise ValueError(f"val_ratio must be in (0, 1), got {val_ratio}")
    people, strata = _people(images, stratify, min_count=2)
    train_people, val_people = train_test_split(
        people, test_size=val_ratio, random_state=seed, stratify=strata
    )
    return _rows(images, train_people, val_people)


def kfold(
    images: pd.DataFrame, k: int = 5, seed: int = 0, stratify: tuple[str, ...] = STRATIFY
) -> list[Split]:
    if k < 2:
        raise ValueError(f"k must be at least 2, got {k}")
    people, strata = _people(images, stratify, min_count=k)
    folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(people, strata)
    return [_rows(images, people[tr], people[va]) for tr, va in folds]
