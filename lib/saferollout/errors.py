"""One small exception hierarchy for everything saferollout raises on purpose.

Messages say what is wrong and, where it helps, what to do next. The CLI maps
`SpecError` (and `UsageError`) to exit code 2 and every other `SafeRolloutError`
to exit code 1, printing only the message.
"""
from __future__ import annotations

from typing import Any


class SafeRolloutError(Exception):
    """Root of every error saferollout raises on purpose."""

    exit_code = 1


class SpecError(SafeRolloutError):
    """A YAML file, a name, a parameter or a value is invalid."""

    exit_code = 2


class UsageError(SpecError):
    """The command line itself is wrong (unknown flag, missing argument)."""


class NotFound(SafeRolloutError):
    """A model, endpoint or deployment that does not exist."""


class Conflict(SafeRolloutError):
    """The request contradicts the current state (lock held, live deployment, name taken)."""


class BackendError(SafeRolloutError):
    """The platform or the SDK failed; `cause` keeps the original error."""

    def __init__(self, message: str, cause: BaseException | None = None):
        super().__init__(message)
        self.cause = cause
        if cause is not None:
            self.__cause__ = cause


class DeploymentFailed(BackendError):
    """A deployment did not become ready (its scoring script failed, or probes never passed)."""

    def __init__(self, message: str, reason: str = "", logs: str = ""):
        super().__init__(message)
        self.reason = reason
        self.logs = logs


class GateFailed(SafeRolloutError):
    """A validation gate returned a verdict of fail; `verdict` carries the evidence."""

    def __init__(self, message: str, verdict: Any = None):
        super().__init__(message)
        self.verdict = verdict
