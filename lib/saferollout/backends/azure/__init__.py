"""The Azure ML backend: managed online endpoints through azure-ai-ml, metrics through Azure Monitor."""
from saferollout.backends.azure.backend import AzureBackend

__all__ = ["AzureBackend"]
