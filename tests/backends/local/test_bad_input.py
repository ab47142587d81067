"""Every bad input answers 4xx with a message naming what is wrong, never 500; platform.log stays bounded.

Bad bodies and headers go to the real gateway and control API of the session platform; the rotation test
starts a platform of its own with a small log limit.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import requests

from saferollout.backends.local.backend import LocalBackend
from saferollout.backends.local.client import stop_platform
from saferollout.backends.local.workspace import admin_token

from echo_platform import ECHO_DIR, echo_spec, new_endpoint

NESTED = b"[" * 100_000 + b"]" * 100_000


@pytest.fixture(scope="module")
def endpoint(local_backend):
    name = new_endpoint(local_backend)
    yield name
    local_backend.delete_endpoint(name)


def control(backend: LocalBackend, method: str, path: str, **kwargs) -> requests.Response:
    url = f"http://127.0.0.1:{backend._platform()['control_port']}/api{path}"
    headers = {"Authorization": f"Bearer {admin_token(backend.home)}", **kwargs.pop("headers", {})}
    return requests.request(method, url, headers=headers, timeout=30, **kwargs)


def log_size(backend: LocalBackend) -> int:
    return (backend.home / "platform.log").stat().st_size


def test_a_non_ascii_authorization_header_is_401_on_the_gateway_and_the_control_api(local_backend, endpoint):
    before = log_size(local_backend)
    uri = local_backend.get_endpoint(endpoint).scoring_uri
    scoring = requests.post(uri, data=b"{}", headers={"Authorization": b"Bearer \xff\xfe\xc3("}, timeout=30)
    assert scoring.status_code == 401
    assert scoring.json()["message"] == "invalid credentials: the Authorization header holds bytes that are not ASCII"
    url = f"http://127.0.0.1:{local_backend._platform()['control_port']}/api/endpoints"
    admin = requests.get(url, headers={"Authorization": b"Bearer \xff\xfe"}, timeout=30)
    assert admin.status_code == 401 and admin.json()["error"]["message"] == "invalid admin token"
    assert log_size(local_backend) == before  # no traceback written


def test_json_nested_too_deeply_is_400_on_the_gateway_and_the_control_api(local_backend, endpoint):
    key = local_backend.get_credentials(endpoint).primary_key
    uri = local_backend.get_endpoint(endpoint).scoring_uri
    scoring = requests.post(uri, data=NESTED, headers={"Authorization": f"Bearer {key}",
                                                       "Content-Type": "application/json"}, timeout=30)
    assert scoring.status_code == 400
    assert scoring.json()["message"] == "malformed JSON in request body: it is nested too deeply"
    admin = control(local_backend, "PATCH", f"/endpoints/{endpoint}", data=NESTED,
                    headers={"Content-Type": "application/json"})
    assert admin.status_code == 400
    assert admin.json()["error"]["message"] == "invalid request: its JSON is nested too deeply"


@pytest.mark.parametrize("body, message", [
    ([], "invalid request: the body must be a JSON object, got list"),
    ("tags", "invalid request: the body must be a JSON object, got str"),
    ({"tags": "x"}, 'invalid tags: expected a mapping of names to text values, got "x"'),
    ({"tags": {"a": {"b": 1}}}, 'invalid tags: expected a mapping of names to text values, got {"a": {"b": 1}}'),
    ({"set_tags": "x"}, 'invalid set_tags: expected a mapping of names to text values, got "x"'),
    ({"remove_tags": "owner"}, "remove_tags must be a list of tag names, not 'owner'"),
    ({"tags": {}, "set_tags": {"a": "1"}}, "give tags (the whole map) or set_tags / remove_tags (changes), not both"),
])
def test_a_patch_body_of_the_wrong_shape_is_400_naming_it(local_backend, endpoint, body, message):
    resp = control(local_backend, "PATCH", f"/endpoints/{endpoint}", json=body)
    assert resp.status_code == 400 and resp.json()["error"]["message"] == message


def test_model_tags_of_the_wrong_shape_are_400(local_backend, tmp_path):
    (tmp_path / "m.bin").write_bytes(b"x")
    resp = control(local_backend, "POST", "/models", json={"name": "shape", "path": str(tmp_path / "m.bin"),
                                                          "tags": "x"})
    assert resp.status_code == 400
    assert resp.json()["error"]["message"] == 'invalid tags: expected a mapping of names to text values, got "x"'


@pytest.mark.parametrize("model_type, message", [
    ("foo", "model type must be one of custom_model, mlflow_model, triton_model, got 'foo'"),
    ("mlflow_model", "cannot be registered as mlflow_model: it is not a folder with an MLmodel file"),
])
def test_a_model_type_the_control_api_cannot_serve_is_400_and_nothing_is_registered(local_backend, tmp_path,
                                                                                    model_type, message):
    """The CLI and LocalBackend check a model's type first; a client calling the control API directly gets the
    same check from the platform itself."""
    (tmp_path / "m.bin").write_bytes(b"x")
    resp = control(local_backend, "POST", "/models", json={"name": "typed", "path": str(tmp_path / "m.bin"),
                                                          "type": model_type})
    assert resp.status_code == 400 and message in resp.json()["error"]["message"]
    assert local_backend.list_models("typed") == []


@pytest.mark.parametrize("settings, message", [
    ({"max_concurrent_requests_per_instance": 0},
     "request_settings.max_concurrent_requests_per_instance must be at least 1"),
    ({"request_timeout_ms": 0}, "request_settings.request_timeout_ms must be at least 1"),
    ({"request_timout_ms": 10}, "request_timout_ms"),
])
def test_request_settings_out_of_range_are_refused_by_the_control_api(local_backend, endpoint, settings, message):
    body = echo_spec(endpoint, "zero").to_dict()
    body["request_settings"] = settings
    resp = control(local_backend, "POST", f"/endpoints/{endpoint}/deployments", json=body)
    assert resp.status_code == 400 and message in resp.json()["error"]["message"]


def test_a_scoring_script_outside_the_code_folder_is_refused(local_backend, endpoint, tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    for script in (str(ECHO_DIR / "score.py"), "../outside.py"):
        (tmp_path / "outside.py").write_text("def init(): pass\ndef run(raw): return 1\n")
        spec = dataclasses.replace(echo_spec(endpoint, "abs"), code_path=str(code), scoring_script=script)
        resp = control(local_backend, "POST", f"/endpoints/{endpoint}/deployments", json=spec.to_dict())
        assert resp.status_code == 400
        assert resp.json()["error"]["message"] == (
            f"scoring_script must be a path inside code ({code.resolve()}), relative to it; got {script!r}")


def test_platform_log_rotates(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFEROLLOUT_LOG_MAX_BYTES", "2048")
    home = tmp_path / "ws"
    backend = LocalBackend(home)
    try:
        name = new_endpoint(backend)
        for i in range(150):  # each change made through the control API writes one line
            backend.update_endpoint(name, tags={"i": str(i)})
        logs = sorted(p.name for p in home.glob("platform.log*"))
        assert logs == ["platform.log", "platform.log.1", "platform.log.2", "platform.log.3"]
        assert all(os.path.getsize(home / n) <= 2048 for n in logs)
        assert f"PATCH /api/endpoints/{name} -> 200" in (home / "platform.log").read_text()
    finally:
        stop_platform(home)
