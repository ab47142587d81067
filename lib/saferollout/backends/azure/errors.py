"""Azure SDK errors -> saferollout's error hierarchy, with the cause kept and a message that says what to do.

Every call into `azure-ai-ml` or `azure-monitor-query` runs inside `sdk_errors(what)`, so a notebook or the
CLI sees `NotFound`, `Conflict`, `SpecError` or `BackendError` (never a raw SDK traceback for a user error).
"""
from __future__ import annotations

import sys
from contextlib import contextmanager, redirect_stdout
from typing import Iterator

from azure.core.exceptions import (AzureError, ClientAuthenticationError, HttpResponseError,
                                   ResourceExistsError, ResourceNotFoundError)

from saferollout.errors import BackendError, Conflict, NotFound, SafeRolloutError, SpecError

AUTH_HINT = ("sign in with `az login`, or set AZURE_CLIENT_ID, AZURE_TENANT_ID and AZURE_CLIENT_SECRET for a "
             "service principal (see docs/azure.md)")


def error_detail(exc: BaseException) -> str:
    """The service's own message, on one line (the SDK's str() adds a multi-line dump of the response)."""
    message = getattr(exc, "message", None) or str(exc)
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def translate(exc: BaseException, what: str) -> SafeRolloutError:
    """Map one SDK exception about `what` (e.g. "endpoint 'credit-risk'") to our hierarchy."""
    detail = error_detail(exc)
    if isinstance(exc, SafeRolloutError):
        return exc
    if isinstance(exc, ClientAuthenticationError):
        return BackendError(f"Azure refused the credentials while accessing {what}: {detail}; {AUTH_HINT}", exc)
    if isinstance(exc, ResourceNotFoundError):
        error: SafeRolloutError = NotFound(f"{what} not found in the Azure ML workspace ({detail})")
        error.__cause__ = exc
        return error
    if isinstance(exc, (ResourceExistsError, HttpResponseError)) and exc.status_code == 409:
        # azure-core raises every 409 as ResourceExistsError, "operation in progress" included: never say
        # "already exists" (the backend checks that itself before it creates anything)
        error = Conflict(f"Azure reports a conflict on {what}: {detail}; another operation may still be "
                         "running on it: wait for it to finish, then retry")
        error.__cause__ = exc
        return error
    if isinstance(exc, ResourceExistsError):
        error = Conflict(f"{what} already exists ({detail})")
        error.__cause__ = exc
        return error
    if isinstance(exc, HttpResponseError) and _is_failed_operation(exc):
        error = BackendError(f"Azure could not complete {what}: the operation failed: {detail}", exc)
        return error
    if isinstance(exc, HttpResponseError):
        status = exc.status_code
        if status in (401, 403):
            return BackendError(f"Azure denied access to {what} (HTTP {status}: {detail}): give the identity the "
                                f"'AzureML Data Scientist' role on the workspace, or {AUTH_HINT}", exc)
        if status == 404:
            error = NotFound(f"{what} not found in the Azure ML workspace ({detail})")
            error.__cause__ = exc
            return error
        if status == 429:
            return BackendError(f"Azure throttled the request on {what} (HTTP 429: {detail}): wait a minute and "
                                "retry, or lower the polling rate", exc)
        if status == 400:
            error = SpecError(f"Azure rejected the request on {what}: {detail}")
            error.__cause__ = exc
            return error
        return BackendError(f"Azure failed on {what} (HTTP {status}: {detail}); retry, and check the "
                            "workspace's activity log if it persists", exc)
    validation = _validation_error_types()
    if validation and isinstance(exc, validation):
        error = SpecError(f"invalid request on {what}: {detail}")
        error.__cause__ = exc
        return error
    if isinstance(exc, AzureError):
        return BackendError(f"the Azure SDK failed on {what}: {detail}", exc)
    return BackendError(f"unexpected error on {what}: {type(exc).__name__}: {detail}", exc)


def _is_failed_operation(exc: HttpResponseError) -> bool:
    """A long-running operation that ended Failed: the poller raises with the *poll's* status (200)."""
    return exc.status_code is not None and 200 <= exc.status_code < 300


def _validation_error_types() -> tuple[type, ...]:
    try:
        from azure.ai.ml.exceptions import ValidationException
    except ImportError:  # pragma: no cover - azure-ai-ml is a dependency
        return ()
    return (ValidationException,)


@contextmanager
def sdk_errors(what: str) -> Iterator[None]:
    """Run SDK calls about `what`; anything they raise leaves as one of our errors, cause attached.

    azure-ai-ml prints progress (a `.` per poll, "Check: endpoint exists") on stdout; it goes to stderr
    here, so a command's stdout holds only its own output (`-o json` stays parseable)."""
    try:
        with redirect_stdout(sys.stderr):
            yield
    except SafeRolloutError:
        raise
    except Exception as exc:  # noqa: BLE001 - every SDK failure is translated, none is swallowed
        raise translate(exc, what) from exc
