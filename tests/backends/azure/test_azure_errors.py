"""SDK errors become our hierarchy: the cause is kept and the message says what to do."""
import pytest
from azure.ai.ml.exceptions import ValidationException
from azure.core.exceptions import (ClientAuthenticationError, HttpResponseError, ResourceExistsError,
                                   ResourceNotFoundError, ServiceRequestError)

from saferollout.backends.azure.errors import sdk_errors, translate
from saferollout.errors import BackendError, Conflict, NotFound, SpecError


def http_error(status: int, message: str = "(Code) the service said no") -> HttpResponseError:
    error = HttpResponseError(message=message)
    error.status_code = status
    return error


@pytest.mark.parametrize("exc, kind, message", [
    (ClientAuthenticationError(message="DefaultAzureCredential failed"), BackendError, "az login"),
    (ResourceNotFoundError(message="(ResourceNotFound) gone"), NotFound, "endpoint 'ep' not found"),
    (ResourceExistsError(message="(Conflict) exists"), Conflict, "endpoint 'ep' already exists"),
    (http_error(409), Conflict, "wait for it to finish, then retry"),
    (http_error(429), BackendError, "wait a minute and retry"),
    (http_error(400), SpecError, "Azure rejected the request on endpoint 'ep': \\(Code\\) the service said no"),
    (http_error(403), BackendError, "AzureML Data Scientist"),
    (http_error(404), NotFound, "not found"),
    (http_error(503), BackendError, "retry"),
    (ValidationException(message="bad field", no_personal_data_message="bad field"), SpecError, "bad field"),
    (ServiceRequestError(message="connection reset"), BackendError, "the Azure SDK failed"),
])
def test_sdk_errors_map_to_our_hierarchy_with_cause_and_advice(exc, kind, message):
    with pytest.raises(kind, match=message) as raised:
        with sdk_errors("endpoint 'ep'"):
            raise exc
    assert raised.value.__cause__ is exc


def test_backend_error_keeps_the_cause_attribute():
    exc = http_error(500)
    error = translate(exc, "endpoint 'ep'")
    assert isinstance(error, BackendError) and error.cause is exc


def test_message_is_one_line_even_when_the_sdk_dumps_the_response():
    exc = http_error(400, "(BadArgument) traffic is wrong\nCode: BadArgument\nMessage: traffic is wrong")
    assert "\n" not in str(translate(exc, "endpoint 'ep'"))


def test_our_own_errors_pass_through_untouched():
    original = Conflict("lock held")
    with pytest.raises(Conflict) as raised:
        with sdk_errors("endpoint 'ep'"):
            raise original
    assert raised.value is original
