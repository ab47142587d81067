"""saferollout: roll a new model version into production without disruption."""
from saferollout.backends import get_backend
from saferollout.backends.base import Backend, Deployment, Endpoint, InvokeResult, Model
from saferollout.errors import (BackendError, Conflict, GateFailed, NotFound, SafeRolloutError,
                                SpecError)

__all__ = [
    "Backend", "BackendError", "Conflict", "Deployment", "Endpoint", "GateFailed", "InvokeResult",
    "Model", "NotFound", "SafeRolloutError", "SpecError", "get_backend",
]
__version__ = "0.1.0"
