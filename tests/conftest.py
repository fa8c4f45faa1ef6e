"""Shared stand-in data sets, generated once per test session at small image sizes."""

from __future__ import annotations

import pytest

from maskcls.data.synth import generate


@pytest.fixture(scope="session")
def standin300(tmp_path_factory):
    """The acceptance-sized stand-in: 300 people, small images, a small eval set."""
    return generate(
        tmp_path_factory.mktemp("data") / "s300",
        people=300,
        eval_people=20,
        seed=0,
        size=(48, 64),
        workers=2,
        progress=False,
    )


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    """A few people, for layout tests that copy and then break the data."""
    return generate(
        tmp_path_factory.mktemp("data") / "tiny",
        people=6,
        eval_people=2,
        seed=1,
        size=(32, 32),
        workers=1,
        progress=False,
    )
