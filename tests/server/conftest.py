"""Fixtures of the server tests: a live server over the fake engine on a free loopback port."""
from __future__ import annotations

import random

import pytest

from server_live import start_fake_server


@pytest.fixture(scope="module")
def fake_server():
    live, server = start_fake_server()
    yield server
    live.__exit__(None, None, None)


@pytest.fixture
def rng():
    seed = random.randrange(1 << 30)
    print(f"random seed {seed}")
    return random.Random(seed)
