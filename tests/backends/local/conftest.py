"""Fixtures for the local platform's tests: a private platform for tests that stop or kill it."""
from __future__ import annotations


import pytest

from saferollout.backends.local.backend import LocalBackend
from saferollout.backends.local.client import stop_platform


@pytest.fixture(scope="module")
def private_platform(tmp_path_factory):
    """A platform in its own workspace (tokens live 3 s), for tests that stop or kill the platform."""
    home = tmp_path_factory.mktemp("private-home")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SAFEROLLOUT_TOKEN_TTL_S", "3")  # read by every platform process this module starts
        try:
            yield LocalBackend(home)
        finally:
            stop_platform(home)
