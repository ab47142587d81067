"""run_gates on simulated time: all pass, the first fail ends the run, inconclusive fails at the limit."""
import json
from dataclasses import dataclass

import pytest

from saferollout.errors import GateFailed
from saferollout.gates import GateReport, run_gates
from saferollout.gates.base import GateBase, GateContext
from saferollout.gates.sequential import SequentialGate

from fake_backend import T0, FakeBackend, stream


class SimulatedClock:
    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Scripted(GateBase):
    """A gate that answers `decision` from `after_s` seconds into the window, inconclusive before."""

    decision: str = "pass"
    after_s: float = 0.0
    kind = "threshold"

    def look(self, ctx: GateContext):
        if ctx.elapsed_s >= self.after_s:
            return self.decision, f"scripted {self.decision}", {"n": {"green": int(ctx.elapsed_s)}}
        return "inconclusive", "scripted wait", {}


def run(gates, clock=None, **kwargs):
    clock = clock or SimulatedClock()
    lines = []
    report = run_gates(gates, FakeBackend(), "credit", "green", "blue", start=T0, poll_s=5, progress=lines.append,
                       clock=clock, sleep=clock.sleep, **kwargs)
    return report, lines, clock


def test_the_run_passes_when_every_gate_has_passed():
    report, lines, clock = run([Scripted(name="a", after_s=10), Scripted(name="b", after_s=20)])
    assert report.decision == "pass" and [v.decision for v in report.verdicts] == ["pass", "pass"]
    assert clock.now == T0 + 20
    # the counts of the freshest look: a passed at 10 s on 10 requests, b at 20 s on 20
    assert lines[-1] == "20s elapsed, n per deployment: green 20 | a: pass; b: pass"
    # a passed gate is not looked at again
    assert [v.gate for v in report.history].count("a") == 3


def test_gates_without_request_counts_say_what_they_wait_for():
    _, lines, _ = run([Scripted(name="bake", after_s=10)])
    assert lines[0] == "0s elapsed | bake: inconclusive (scripted wait)"
    assert lines[-1] == "10s elapsed, n per deployment: green 10 | bake: pass"


def test_a_fail_ends_the_run_at_once():
    report, _, clock = run([Scripted(name="slow", after_s=100), Scripted(name="bad", decision="fail", after_s=15)])
    assert report.decision == "fail" and clock.now == T0 + 15
    assert [v.decision for v in report.verdicts] == ["inconclusive", "fail"]
    with pytest.raises(GateFailed) as failure:
        report.raise_if_failed()
    assert str(failure.value) == "gate 'bad' (threshold) failed: scripted fail"
    assert failure.value.verdict.gate == "bad"


def test_an_inconclusive_gate_fails_at_its_limit():
    report, _, clock = run([Scripted(name="never", after_s=10_000, max_duration_s=60)])
    assert report.decision == "fail" and clock.now == T0 + 60
    assert report.verdicts[0].reason == "no decision within 60s: scripted wait"
    with pytest.raises(GateFailed, match="no decision within 60s"):
        report.raise_if_failed()


def test_the_report_is_json_serialisable_with_the_history_of_every_look():
    report, _, _ = run([Scripted(name="a", after_s=10)])
    data = json.loads(json.dumps(report.to_dict()))
    assert data["decision"] == "pass" and [h["decision"] for h in data["history"]] == ["inconclusive", "inconclusive", "pass"]
    assert data["verdicts"][0]["window_start"] == T0 and data["verdicts"][0]["window_end"] == T0 + 10
    assert isinstance(report, GateReport)
    report.raise_if_failed()  # a passing report raises nothing


def test_a_sequential_gate_on_an_empty_endpoint_fails_at_its_limit_never_passes():
    clock = SimulatedClock()
    report = run_gates([SequentialGate(max_duration_s=30)], FakeBackend(), "credit", "green", "blue", start=T0,
                       poll_s=5, clock=clock, sleep=clock.sleep)
    assert report.decision == "fail" and len(report.history) == 7
    assert report.verdicts[0].reason.startswith("no decision within 30s: too few samples: green has 0, blue has 0")


def test_a_sequential_gate_stops_early_on_a_clear_regression():
    rows = (stream("blue", 2700, T0, T0 + 200, error_rate=0.005, seed=1)
            + stream("green", 300, T0, T0 + 200, error_rate=0.10, seed=2))
    clock = SimulatedClock()
    report = run_gates([SequentialGate()], FakeBackend(rows), "credit", "green", "blue", start=T0, poll_s=5,
                       clock=clock, sleep=clock.sleep)
    assert report.decision == "fail" and clock.now < T0 + 200


@pytest.mark.parametrize("traffic, expected", [
    ({"green": 10, "blue": 90}, 0.1),
    ({"green": 10, "baseline": 10, "blue": 80}, 0.5),  # compared with the baseline: half of the two's requests
    ({"green": 100}, None),
    ({}, None),
])
def test_the_rcs_share_is_of_the_requests_served_by_it_and_its_control(traffic, expected):
    from saferollout.gates.runner import rc_share

    control = "baseline" if "baseline" in traffic else "blue"
    assert rc_share(FakeBackend(traffic=traffic), "credit", "green", control) == (
        pytest.approx(expected) if expected is not None else None)


def test_progress_names_the_deployments_even_when_the_evidence_says_rc_and_prod():
    rows = stream("blue", 900, T0, T0 + 60, seed=1) + stream("green", 100, T0, T0 + 60, seed=2)
    lines: list[str] = []
    clock = [T0 + 60]
    run_gates([SequentialGate(metric="errors", max_duration_s=60)], FakeBackend(rows), "credit", "green", "blue",
              start=T0, poll_s=5, progress=lines.append, clock=lambda: clock[0],
              sleep=lambda s: clock.__setitem__(0, clock[0] + s))
    assert lines[-1].startswith("60s elapsed, n per deployment: green 100, blue 900 |")
