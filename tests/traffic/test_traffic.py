"""The live-traffic simulator: open-loop schedule, bounded in-flight requests, JSON-lines results,
the background process and the `saferollout traffic` command, against the real local platform.

Scheduling behaviour is checked with a tiny in-process backend whose answers we control (slow, blocked,
failing); everything that talks to an endpoint uses a real one.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from saferollout import cli, data, rollout, traffic
from saferollout.backends.base import InvokeResult
from saferollout.errors import BackendError, SpecError
from saferollout.specs import load_deployment_spec, load_endpoint_spec

RECORD_KEYS = {"ts", "status", "deployment", "latency_ms", "request_id"}


class ControlledBackend:
    """Answers `invoke` the way a test wants: after a delay, once released, or with an exception."""

    def __init__(self, delay_s: float = 0.0, gate: threading.Event | None = None, error: Exception | None = None):
        self.delay_s, self.gate, self.error = delay_s, gate, error
        self.bodies: list[bytes] = []
        self.lock = threading.Lock()

    def invoke(self, endpoint, body, *, deployment=None, timeout_s=60.0):
        with self.lock:
            self.bodies.append(body)
        if self.gate is not None:
            self.gate.wait(10)
        time.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        return InvokeResult(status=200, body=b"{}", deployment="blue", request_id="r", latency_ms=self.delay_s * 1000)


def ticks(rps: float, duration_s: float) -> int:
    """How many sends an open-loop schedule makes: one at every i / rps below the duration."""
    count = 0
    while count / rps < duration_s:
        count += 1
    return count


@pytest.fixture(scope="module")
def live_endpoint(local_backend, example_dir, credit_model_dir):
    """An endpoint with PROD `blue` serving the credit model, deleted at the end of the module."""
    name = f"traffic-{int(time.time() * 1000) % 10**8}"
    rollout.ensure_endpoint(local_backend, load_endpoint_spec(example_dir / "endpoint.yml", name=name))
    spec = load_deployment_spec(example_dir / "deployment.yml", endpoint_name=name)
    try:
        rollout.deploy_candidate(local_backend, name, spec, str(credit_model_dir))
        yield name
    finally:
        local_backend.delete_endpoint(name)


@pytest.fixture(scope="module")
def held_out_bodies(credit_split):
    return data.sample_requests(credit_split.X_test.head(12), batch_size=3)


def test_load_generator_sends_every_scheduled_request_and_records_each_outcome(
        local_backend, live_endpoint, held_out_bodies, tmp_path):
    results = tmp_path / "traffic.jsonl"
    result = traffic.LoadGenerator(local_backend, live_endpoint, held_out_bodies, rps=20, duration_s=1.0,
                                   results_path=results).run()
    expected = ticks(20, 1.0)
    assert result.sent + result.dropped == expected
    assert result.ok == result.sent and result.failed == 0
    assert result.by_deployment == {"blue": result.sent}
    assert result.by_status == {200: result.sent}
    assert result.latencies_ms["p50"] is not None and result.latencies_ms["p99"] >= result.latencies_ms["p50"]
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(rows) == result.sent
    assert all(set(row) == RECORD_KEYS and row["status"] == 200 and row["deployment"] == "blue" for row in rows)
    assert len({row["request_id"] for row in rows}) == len(rows)
    assert traffic.summarize(results).to_dict()["by_deployment"] == {"blue": result.sent}


def test_bodies_are_replayed_round_robin():
    backend = ControlledBackend()
    bodies = [b"a", b"b", b"c"]
    result = traffic.LoadGenerator(backend, "ep", bodies, rps=50, duration_s=7 / 50 - 0.001).run()
    assert result.sent == 7
    assert sorted(backend.bodies) == sorted([b"a", b"b", b"c", b"a", b"b", b"c", b"a"])


def test_schedule_is_open_loop_when_answers_are_slow():
    # each answer takes 0.4 s: a closed loop (send, wait, send) would manage 3 requests in a second
    backend = ControlledBackend(delay_s=0.4)
    result = traffic.LoadGenerator(backend, "ep", [b"x"], rps=20, duration_s=1.0).run()
    assert result.sent == ticks(20, 1.0)
    assert result.dropped == 0


def test_requests_in_flight_are_bounded_and_the_skipped_ticks_counted():
    gate = threading.Event()
    backend = ControlledBackend(gate=gate)
    generator = traffic.LoadGenerator(backend, "ep", [b"x"], rps=50, duration_s=0.5, max_in_flight=3)
    generator.start()
    assert generator.wait(10)
    gate.set()  # let the three blocked requests answer
    result = generator.stop()
    assert result.sent == 3
    assert result.dropped == ticks(50, 0.5) - 3


def test_a_request_without_an_answer_is_recorded_with_status_0_and_its_error(tmp_path):
    backend = ControlledBackend(error=BackendError("cannot reach endpoint 'ep': connection refused"))
    results = tmp_path / "r.jsonl"
    result = traffic.LoadGenerator(backend, "ep", [b"x"], rps=20, duration_s=0.2, results_path=results).run()
    assert result.sent == ticks(20, 0.2) and result.ok == 0 and result.failed == result.sent
    assert result.by_status == {0: result.sent}
    assert result.failed_by_deployment == {traffic.NO_DEPLOYMENT: result.sent}
    assert result.latencies_ms["p50"] is None  # no answers: no latency to report, not zero
    row = json.loads(results.read_text().splitlines()[0])
    assert row["status"] == 0 and "connection refused" in row["error"]


def test_summarize_skips_a_last_line_cut_short_by_a_kill(tmp_path):
    path = tmp_path / "r.jsonl"
    rows = [{"ts": 1.0, "status": 200, "deployment": "blue", "latency_ms": 10.0, "request_id": "a"},
            {"ts": 1.1, "status": 503, "deployment": "green", "latency_ms": 30.0, "request_id": "b"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"ts": 1.2, "sta')
    result = traffic.summarize(path)
    assert (result.sent, result.ok, result.failed) == (2, 1, 1)
    assert result.by_deployment == {"blue": 1, "green": 1}
    assert result.failed_by_deployment == {"green": 1}
    assert result.started_at == 1.0


def test_summarize_names_a_missing_results_file(tmp_path):
    with pytest.raises(SpecError, match="traffic results file not found: .*missing.jsonl"):
        traffic.summarize(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("kwargs, message", [
    ({"bodies": []}, "needs at least one request body"),
    ({"rps": 0}, "rps must be a positive number, got 0"),
    ({"max_in_flight": 0}, "max_in_flight must be at least 1"),
])
def test_load_generator_refuses_impossible_settings(kwargs, message):
    settings = {"bodies": [b"x"], "rps": 10.0, **kwargs}
    with pytest.raises(SpecError, match=message):
        traffic.LoadGenerator(ControlledBackend(), "ep", settings.pop("bodies"), **settings)


def test_background_generator_runs_until_stopped_and_leaves_its_results(live_endpoint, platform_home, tmp_path):
    results = tmp_path / "bg" / "traffic.jsonl"
    proc = traffic.start_background(live_endpoint, 20, duration_s=None, results_path=results,
                                    home=str(platform_home))
    try:
        assert results.exists()  # start_background returned once the generator began
        assert results.with_suffix(".pid").read_text() == str(proc.pid)
        deadline = time.monotonic() + 20
        while len(results.read_text().splitlines()) < 10 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        result = traffic.stop_background(proc)
    assert proc.returncode == 0  # SIGTERM ends it cleanly
    assert result is not None and result.sent >= 10
    assert result.ok == result.sent and result.by_deployment == {"blue": result.sent}
    assert traffic.stop_background(proc).sent == result.sent  # stopping again only re-reads the results


def test_background_generator_can_be_stopped_from_another_process_by_its_results_path(
        live_endpoint, platform_home, tmp_path):
    # a notebook kernel may stop the generator another kernel started: it knows the path, not the Popen
    results = tmp_path / "traffic.jsonl"
    proc = traffic.start_background(live_endpoint, 20, duration_s=None, results_path=results,
                                    home=str(platform_home))
    try:
        result = traffic.stop_background(results)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert result is not None and result.failed == 0 and result.sent == len(results.read_text().splitlines())


def test_background_generator_stops_by_itself_when_the_process_it_serves_ends(live_endpoint, platform_home, tmp_path):
    runner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])  # a runner, killed soon
    results = tmp_path / "traffic.jsonl"
    proc = traffic.start_background(live_endpoint, 20, duration_s=None, results_path=results,
                                    home=str(platform_home), stop_with_pid=runner.pid)
    try:
        runner.wait()
        assert proc.wait(15) == 0  # ended on its own, in-flight requests completed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    result = traffic.summarize(results)
    assert result.sent > 0 and result.failed == 0


def test_background_generator_that_cannot_start_says_why(platform_home, tmp_path):
    with pytest.raises(BackendError, match="exited with code 1 before sending: .*endpoint 'no-such-ep' not found"):
        traffic.start_background("no-such-ep", 10, duration_s=1, results_path=tmp_path / "t.jsonl",
                                 home=str(platform_home))


def test_traffic_command_replays_held_out_rows_for_its_duration(live_endpoint, platform_home, tmp_path):
    results = tmp_path / "cli.jsonl"
    done = subprocess.run([sys.executable, "-m", "saferollout.traffic", "-n", live_endpoint, "--rps", "10",
                           "--duration", "1", "--batch-size", "2", "--results", str(results), "--quiet"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["sent"] + summary["dropped"] == ticks(10, 1.0)
    assert summary["ok"] == summary["sent"] and summary["by_deployment"] == {"blue": summary["sent"]}
    assert len(results.read_text().splitlines()) == summary["sent"]


def test_traffic_command_shows_progress_and_the_result_table(live_endpoint, capsys):
    assert cli.main(["traffic", "-n", live_endpoint, "--rps", "10", "--duration", "0.5", "-o", "table"]) == 0
    out = capsys.readouterr().out
    assert "Sent" in out and "Ok" in out  # the az-style table of the result
    assert f"{live_endpoint} @ 10 rps" in out  # the rich progress line


@pytest.mark.parametrize("argv, code, message", [
    (["-n", "no-such-ep", "--duration", "1"], 1, "error: endpoint 'no-such-ep' not found"),
    (["-n", "whatever", "--rps", "0"], 2, "error: --rps must be positive, got 0"),
    (["-n", "whatever", "--duration", "-1"], 2, "error: --duration must be 0 (until stopped) or positive, got -1"),
    (["-n", "whatever", "--batch-size", "0"], 2, "error: --batch-size must be at least 1, got 0"),
])
def test_traffic_command_failures_are_one_line(platform_home, argv, code, message, capsys):
    assert cli.main(["traffic", *argv]) == code
    assert capsys.readouterr().err.strip() == message


def test_a_request_file_is_one_json_body_or_a_jsonl_of_bodies(tmp_path):
    from saferollout.traffic import load_request_bodies

    single = tmp_path / "request.json"
    single.write_text('{\n  "data": [[1.0, 2.0]]\n}\n')
    lines = tmp_path / "requests.jsonl"
    lines.write_text('{"data": [[1]]}\n\n{"data": [[2]]}\n')
    assert load_request_bodies(single) == [b'{"data": [[1.0, 2.0]]}']
    assert [json.loads(b) for b in load_request_bodies(lines)] == [{"data": [[1]]}, {"data": [[2]]}]


@pytest.mark.parametrize("name, content, message", [
    ("missing.json", None, "request_file '{path}' does not exist"),
    ("bad.jsonl", '{"data": 1}\n{"data": \n', "request_file '{path}' line 2 is not JSON: "),
    ("bad.json", '{"data": 1}\n{"data": 2}\n', "(one body per line? name the file .jsonl)"),
    ("empty.jsonl", "\n", "request_file '{path}' holds no request body"),
])
def test_a_bad_request_file_is_refused_naming_the_file_and_line(tmp_path, name, content, message):
    from saferollout.traffic import load_request_bodies

    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(SpecError) as caught:
        load_request_bodies(path)
    assert message.format(path=path) in str(caught.value)
