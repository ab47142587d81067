"""`make demo`'s script, run in-process on the session platform with a small number of requests."""
from __future__ import annotations

import importlib.util
import re
import uuid

import pytest

from saferollout.backends.local.client import platform_status
from saferollout.errors import NotFound


def _load_demo(example_dir):
    path = example_dir.parent / "blue_green_demo.py"
    spec = importlib.util.spec_from_file_location("blue_green_demo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_demo_deploys_blue_and_green_splits_traffic_and_cleans_up(platform_home, local_backend, example_dir,
                                                                  capsys, monkeypatch):
    monkeypatch.setenv("SAFEROLLOUT_HOME", str(platform_home))
    demo = _load_demo(example_dir)
    endpoint, model = f"demo-{uuid.uuid4().hex[:8]}", f"demo-model-{uuid.uuid4().hex[:8]}"
    code = demo.main(["--workspace", str(platform_home), "--endpoint", endpoint, "--model-name", model,
                      "--requests", "60"])
    out = capsys.readouterr().out
    assert code == 0, out  # 0 also means the metrics counted what the answer headers said
    blue, green = map(int, re.search(r"observed split (\d+) / (\d+)", out).groups())
    assert blue + green == 60 and blue > green
    assert [(m.version, m.tags["family"]) for m in local_backend.list_models(model)] == [
        (1, "logistic_regression"), (2, "gradient_boosting")]
    with pytest.raises(NotFound):
        local_backend.get_endpoint(endpoint)
    assert platform_status(platform_home)["running"]  # the demo did not start it, so it must not stop it
