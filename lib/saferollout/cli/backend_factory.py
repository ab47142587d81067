"""The backend a command runs against: chosen by `--backend`, made on first use, the same one afterwards.
"""
from __future__ import annotations

import argparse
from typing import Any



# az's workspace flags -> the Azure backend's settings (the local backend has one workspace: SAFEROLLOUT_HOME)
AZURE_SETTINGS_FLAGS = {"subscription": "subscription_id", "resource_group": "resource_group",
                        "workspace_name": "workspace_name"}


class BackendFactory:
    """Makes the chosen backend on first use and hands the same one out afterwards."""

    def __init__(self, name: str, settings: dict[str, Any] | None = None):
        self.name = name
        self.settings = dict(settings or {})
        self._backend: Any = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "BackendFactory":
        settings = {}
        if args.backend == "azure":
            settings = {key: getattr(args, flag) for flag, key in AZURE_SETTINGS_FLAGS.items()
                        if getattr(args, flag, None)}
        return cls(args.backend, settings)

    def __call__(self) -> Any:
        if self._backend is None:
            from saferollout.backends import get_backend

            self._backend = get_backend(self.name, **self.settings)
        return self._backend

