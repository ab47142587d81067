"""Fixtures for gate tests: a context factory over the in-memory backend double."""
from __future__ import annotations

import pytest

from saferollout.gates.base import GateContext

from fake_backend import ENDPOINT, T0


@pytest.fixture
def context():
    """context(backend, elapsed_s, rc="green", prod="blue") -> a GateContext whose window began at T0."""
    def make(backend, elapsed_s: float, rc: str = "green", prod: str | None = "blue") -> GateContext:
        return GateContext(backend=backend, endpoint=ENDPOINT, rc=rc, prod=prod, start=T0, now=T0 + elapsed_s)
    return make
