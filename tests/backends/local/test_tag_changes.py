"""Tag changes land on the tags the endpoint has when they arrive: two clients changing different tags at the
same time never undo each other (the CLI's --set/--remove, the rollout's own tags), on the real platform."""
from __future__ import annotations

from typing import Any

import pytest

from saferollout.backends.local.backend import LocalBackend
from saferollout.cli import build_parser
from saferollout.cli.endpoints import endpoint_update
from saferollout.rollout.state import write_state

from echo_platform import new_endpoint


@pytest.fixture
def endpoint(local_backend):
    name = new_endpoint(local_backend)
    local_backend.update_endpoint(name, tags={"team": "risk"})
    yield name
    local_backend.delete_endpoint(name)


class RacedBackend:
    """The backend, except that right after a client reads the endpoint another client changes a tag: the
    interleaving two concurrent `update --set` calls can have."""

    def __init__(self, backend: LocalBackend, endpoint: str, other: dict[str, str]):
        self.backend, self.endpoint, self.other, self.raced = backend, endpoint, other, False

    def get_endpoint(self, name: str):
        seen = self.backend.get_endpoint(name)
        if not self.raced:
            self.raced = True
            LocalBackend(self.backend.home).update_endpoint(self.endpoint, set_tags=self.other)
        return seen

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)


def test_a_tag_set_by_someone_else_between_the_clis_read_and_write_is_kept(local_backend, endpoint):
    args = build_parser().parse_args(["online-endpoint", "update", "-n", endpoint, "--set", "tags.owner=me",
                                      "--remove", "tags.team", "-o", "none"])
    raced = RacedBackend(local_backend, endpoint, {"reviewer": "you"})
    assert endpoint_update(args, lambda: raced) == 0
    assert local_backend.get_endpoint(endpoint).tags == {"owner": "me", "reviewer": "you"}


def test_the_rollouts_tags_keep_a_tag_set_meanwhile(local_backend, endpoint):
    raced = RacedBackend(local_backend, endpoint, {"reviewer": "you"})
    write_state(raced, endpoint, set_tags={"RC_DEPLOYMENT": "green"}, remove_tags=("team",))
    assert local_backend.get_endpoint(endpoint).tags == {"RC_DEPLOYMENT": "green", "reviewer": "you"}


def test_tags_given_whole_still_replace_them(local_backend, endpoint):
    local_backend.update_endpoint(endpoint, tags={"only": "this"})
    assert local_backend.get_endpoint(endpoint).tags == {"only": "this"}
    local_backend.update_endpoint(endpoint, set_tags={"and": "that"}, remove_tags=["only", "absent"])
    assert local_backend.get_endpoint(endpoint).tags == {"and": "that"}
