"""The platform process SIGKILLed mid-rollout, with live traffic, and started again: the rollout converges,
the endpoint's keys, traffic and tags and the metrics recorded before the kill are back, and the live clients'
failed requests are counted by when they were sent and who served them.

What a client sees: the gateway lives in the platform process, so requests sent while it is down fail
(connection refused, status 0 in traffic.jsonl); the test asserts that no request fails outside the outage
(from the kill to a few seconds after the restart) and prints what failed inside it.
"""
from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

import harness
from harness import KillPoint

pytestmark = [pytest.mark.kill, pytest.mark.timeout(900)]

SETTLE_S = 5.0  # after the restart: the first requests of the generator's backoff and the kernels' retries
POINTS = [
    KillPoint("platform-in-validate-50", r"^>> \d+ validate-50", delay_s=4.0, target="platform"),
    KillPoint("platform-in-bake", r"promote \| after:", delay_s=2.0, target="platform"),
]


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    """A private platform with one endpoint at its first release; stopped at the end, even on failure."""
    with harness.first_release(Path(tmp_path_factory.mktemp("platform-kill-home")), "kill-platform") as setup:
        yield setup


def endpoint_record(home: Path, endpoint: str) -> dict:
    show = json.loads(harness.cli(home, "online-endpoint", "show", "-n", endpoint, "-o", "json").stdout)
    keys = json.loads(harness.cli(home, "online-endpoint", "get-credentials", "-n", endpoint, "-o", "json").stdout)
    return {"keys": keys, "tags": show.get("tags"), "traffic": show.get("traffic")}


def request_count(home: Path, endpoint: str, start: float, end: float) -> float:
    os.environ["SAFEROLLOUT_HOME"] = str(home)
    from saferollout import get_backend

    series = get_backend("local").query_metrics(
        endpoint, "RequestsPerMinute", aggregation="Total", grain="PT5S",
        start=datetime.fromtimestamp(start, timezone.utc), end=datetime.fromtimestamp(end, timezone.utc))
    return sum(p.value or 0 for s in series for p in s.points) if series else 0.0


@pytest.fixture
def stable_endpoint(platform):
    """After each test: the endpoint back at PROD 100% (rolled back, or else deleted and released again when
    the test left PROD Failed), so the next test starts clean."""
    home, endpoint, runs = platform
    yield platform
    if harness.endpoint_problems(home, endpoint)[0]:
        harness.cli(home, "rollout", "rollback", "-n", endpoint, "--reason", "platform kill test cleanup", check=False)
        harness.cli(home, "rollout", "unlock", "-n", endpoint, "--force", check=False)
    if harness.endpoint_problems(home, endpoint)[0]:
        harness.cli(home, "online-endpoint", "delete", "-n", endpoint, "-y", check=False)
        harness.run_runbook(home, endpoint, None, runs)


@pytest.mark.parametrize("point", POINTS, ids=lambda p: p.name)
def test_the_platform_killed_mid_rollout_comes_back_and_the_rollout_converges(stable_endpoint, point):
    home, endpoint, runs = stable_endpoint
    before = endpoint_record(home, endpoint)
    started = time.time()
    sampler = harness.TrafficSampler(home, endpoint)
    sampler.start()
    try:
        run = harness.run_runbook(home, endpoint, None, runs, kill=point)
    finally:
        sampler.stop()
    assert run.killed_at is not None, f"{point.name} never came:\n{run.tail}"
    run_dir = harness.run_dir_of(run)
    summary = harness.summary(run_dir)
    # what the clients saw, written before anything is asserted
    outage_end = run.killed_at + (run.platform_down_s or 0) + SETTLE_S
    during = harness.client_failures(run_dir, run.killed_at - 1, outage_end)
    outside = {"before": harness.client_failures(run_dir, None, run.killed_at - 1),
               "after": harness.client_failures(run_dir, outage_end, None)}
    print(f"{point.name}: {summary['status']}; platform down {run.platform_down_s:.1f}s; client requests in the "
          f"outage: {during}; outside it: {outside}; sampler violations {len(sampler.violations)}")
    (run_dir / "platform-kill.json").write_text(json.dumps(
        {"point": point.name, "status": summary["status"], "down_s": run.platform_down_s, "during": during,
         "outside": outside, "violations": sampler.violations[:20]}, indent=1))
    assert summary["status"] in ("completed", "rolled_back"), (summary.get("failure"), run.tail)
    problems, state = harness.endpoint_problems(home, endpoint)
    assert not problems, (problems, state)
    assert not sampler.violations, sampler.violations[:5]
    after = endpoint_record(home, endpoint)
    assert after["keys"] == before["keys"]  # the same keys: clients keep working after the restart
    assert request_count(home, endpoint, started, run.killed_at - 5) > 0  # metrics from before the kill kept
    assert outside["before"]["failed"] == 0 and outside["after"]["failed"] == 0, outside
