"""Fixtures for the local platform's tests: a private platform for tests that stop or kill it."""
from __future__ import annotations

import os

import pytest

from saferollout.backends.local.backend import LocalBackend
from saferollout.backends.local.daemon import stop_platform


@pytest.fixture(scope="module")
def private_platform(tmp_path_factory):
    """A platform in its own workspace (tokens live 3 s), for tests that stop or kill the platform."""
    home = tmp_path_factory.mktemp("private-home")
    previous = os.environ.get("SAFEROLLOUT_TOKEN_TTL_S")
    os.environ["SAFEROLLOUT_TOKEN_TTL_S"] = "3"  # read by every platform process this module starts
    try:
        yield LocalBackend(home)
    finally:
        stop_platform(home)
        if previous is None:
            os.environ.pop("SAFEROLLOUT_TOKEN_TTL_S", None)
        else:
            os.environ["SAFEROLLOUT_TOKEN_TTL_S"] = previous
