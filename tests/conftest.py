"""Seeds for every random test.

Tests draw fresh random inputs in every session, but never unseeded ones: one session
seed (printed in the header; ``JETFAST_TEST_SEED=S`` replays a session) gives each test
and each module its own seed, derived from its pytest node id. The autouse fixture seeds
Python's, NumPy's and torch's global generators with it before every test, and the
``seed``/``rng`` fixtures hand it to tests that draw from their own generators. A failing
test shows its seed in the captured output of its set-up.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from tests.seeds import SESSION_SEED, seed_of


def pytest_report_header(config):
    return f"jetfast test seed: {SESSION_SEED} (replay with JETFAST_TEST_SEED={SESSION_SEED})"


def _announce(what: str, nodeid: str, value: int) -> None:
    print(f"{what} seed {value} (session JETFAST_TEST_SEED={SESSION_SEED}, {nodeid})")


@pytest.fixture
def seed(request) -> int:
    """This test's seed."""
    value = seed_of(request.node.nodeid)
    _announce("test", request.node.nodeid, value)
    return value


@pytest.fixture
def rng(seed) -> np.random.Generator:
    """A NumPy generator seeded with this test's seed."""
    return np.random.default_rng(seed)


@pytest.fixture(scope="module")
def module_seed(request) -> int:
    """A seed for module-scoped fixtures (shared files, trained runs)."""
    value = seed_of(request.node.nodeid)
    _announce("module", request.node.nodeid, value)
    return value


@pytest.fixture(autouse=True)
def _seed_global_generators(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
