"""Backends by name: `local` (the embedded default) and `azure`."""
from __future__ import annotations

from typing import Any

from saferollout.backends.base import Backend
from saferollout.errors import SpecError

BACKEND_NAMES = ("local", "azure")


def backend_class(name: str) -> type[Backend]:
    """The class of the backend called `name`, without connecting to anything (its capabilities are class
    attributes: `supports_raw_samples`, `supports_mirrored_pairs`, `metrics_delay_s`)."""
    if name == "local":
        from saferollout.backends.local.backend import LocalBackend

        return LocalBackend
    if name == "azure":
        try:
            from saferollout.backends.azure.backend import AzureBackend
        except ImportError as exc:  # the SDK is missing
            raise SpecError(f"the azure backend is not available: {exc}") from exc
        return AzureBackend
    raise SpecError(f"unknown backend {name!r}: choose one of {', '.join(BACKEND_NAMES)}")


def get_backend(name: str = "local", **settings: Any) -> Backend:
    """Return the backend called `name`; settings go to its constructor (e.g. `home=` for local)."""
    return backend_class(name)(**settings)
