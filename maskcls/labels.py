"""The 18 classes: mask status x gender x age band, encoded as `mask * 6 + gender * 3 + age_band`.

The age cutoffs are parameters because moving the upper one (58 or 59 instead of 60) is one of
the few changes that moved competition scores: ages 57-59 look like 60 and the 60 band is tiny.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np

NUM_CLASSES = 18


class Mask(IntEnum):
    WEAR = 0
    INCORRECT = 1
    NOT_WEAR = 2


class Gender(IntEnum):
    MALE = 0
    FEMALE = 1


class AgeBand(IntEnum):
    YOUNG = 0  # age < young cutoff
    MIDDLE = 1
    OLD = 2  # age >= old cutoff


# File stem -> mask status, exactly as the competition names the seven photos of a person.
MASK_STEMS: dict[str, Mask] = {
    **{f"mask{i}": Mask.WEAR for i in range(1, 6)},
    "incorrect_mask": Mask.INCORRECT,
    "normal": Mask.NOT_WEAR,
}

GENDERS: dict[str, Gender] = {"male": Gender.MALE, "female": Gender.FEMALE}


@dataclass(frozen=True)
class AgeCutoffs:
    """Band edges: YOUNG below `young`, OLD at or above `old`, MIDDLE in between."""

    young: int = 30
    old: int = 60

    def __post_init__(self) -> None:
        if not 0 < self.young < self.old:
            raise ValueError(f"age cutoffs must satisfy 0 < young < old, got {self.young}, {self.old}")


def age_band(age, cutoffs: AgeCutoffs = AgeCutoffs()):
    """AgeBand of one age, or an int array of bands for an array of ages."""
    bands = np.digitize(np.asarray(age), [cutoffs.young, cutoffs.old])
    return AgeBand(int(bands)) if bands.ndim == 0 else bands


def encode(mask, gender, band):
    """Class index from its three parts; works on ints and on numpy/pandas arrays alike."""
    return mask * 6 + gender * 3 + band


def decode(label: int) -> tuple[Mask, Gender, AgeBand]:
    if not 0 <= label < NUM_CLASSES:
        raise ValueError(f"class must be in 0..{NUM_CLASSES - 1}, got {label}")
    return Mask(label // 6), Gender(label // 3 % 2), AgeBand(label % 3)


def class_name(label: int, cutoffs: AgeCutoffs = AgeCutoffs()) -> str:
    """Readable name such as `wear/female/30-59`, for reports and confusion matrices."""
    mask, gender, band = decode(label)
    ages = {
        AgeBand.YOUNG: f"<{cutoffs.young}",
        AgeBand.MIDDLE: f"{cutoffs.young}-{cutoffs.old - 1}",
        AgeBand.OLD: f"{cutoffs.old}+",
    }[band]
    return f"{mask.name.lower()}/{gender.name.lower()}/{ages}"
