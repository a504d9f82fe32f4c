"""sgdtheory.experiments: the registry and the contract of every experiment module."""

from __future__ import annotations

import pytest
from experiment_contract import assert_contract

from sgdtheory.experiments import EXPERIMENTS, load


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_keeps_the_contract(name):
    assert_contract(load(name))


def test_load_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown experiment 'nope'"):
        load("nope")
