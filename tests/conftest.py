"""Shared fixtures: one local platform for the session, a trained credit model, the example files.

Tests of servers start real processes on free loopback ports and always stop them: the session's
platform is stopped (and its instances with it) when the session ends, even after a failure.
"""
from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from saferollout import data, training
from saferollout.backends.local.backend import LocalBackend
from saferollout.backends.local.client import stop_platform

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "credit-risk"


@pytest.fixture(scope="session")
def example_dir() -> Path:
    return EXAMPLE


@pytest.fixture(scope="session")
def credit_split() -> data.Split:
    return data.split(seed=42)


@pytest.fixture(scope="session")
def credit_model_dir(tmp_path_factory, credit_split) -> Path:
    """A trained logistic-regression credit model saved as a folder model `model/`."""
    folder = tmp_path_factory.mktemp("credit-model") / "model"
    training.train("logistic_regression", credit_split).save(folder)
    return folder


@pytest.fixture(scope="session")
def platform_home(tmp_path_factory):
    """A workspace whose platform runs for the whole session and is stopped at its end."""
    home = tmp_path_factory.mktemp("saferollout-home")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SAFEROLLOUT_HOME", str(home))  # notebooks and CLI subprocesses find the same platform
        try:
            yield home
        finally:
            stop_platform(home)


@pytest.fixture(scope="session")
def local_backend(platform_home) -> LocalBackend:
    return LocalBackend(platform_home)


@pytest.fixture
def unique_name():
    """A fresh valid endpoint name per call, so tests sharing the platform never collide."""
    def make(prefix: str = "ep") -> str:
        return f"{prefix}-{uuid.uuid4().hex[:8]}"
    return make


def pytest_collection_modifyitems(config, items):
    """Files holding slow tests first (order within a file kept): `make test` hands whole files to two workers
    in this order (`--dist loadfile`), so the longest start early instead of leaving one worker busy alone at
    the end (the notebook, own-model and runbook files take 1-4 minutes each)."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)
