"""A whole rollout through the state machine, resumable: the kill-at-each-step test runs and kills it.

    python tests/rollout/driver.py ENDPOINT DEPLOYMENT_YML MODEL_REF RUN_ID STEPS BODIES_JSON

Each pass reads the endpoint's state, asks `next_step` what to do, does it, and prints a marker line
before and after (`begin <step>`, `done <step>`), flushed, so the test can kill it at a step boundary.
Run again after a kill, it resumes from what the endpoint says. The gates here are short checks (a few
requests through the endpoint must all answer 200): the test is about state, not about statistics.
"""
from __future__ import annotations

import json
import sys

from saferollout import rollout
from saferollout.backends.local.backend import LocalBackend
from saferollout.errors import GateFailed
from saferollout.specs import load_deployment_spec

OWNER = "kill-test-driver"


def say(line: str) -> None:
    print(line, flush=True)


def quick_gate(backend: LocalBackend, endpoint: str, bodies: list[bytes]) -> None:
    answers = [backend.invoke(endpoint, body) for body in bodies]
    bad = [a.status for a in answers if a.status != 200]
    if bad:
        raise GateFailed(f"{len(bad)} of {len(answers)} requests failed: {bad}")


def main(endpoint: str, deployment_yml: str, model: str, run_id: str, steps: str, bodies_json: str) -> int:
    backend = LocalBackend()  # SAFEROLLOUT_HOME names the workspace
    spec = load_deployment_spec(deployment_yml, endpoint_name=endpoint)
    traffic_steps = [int(s) for s in steps.split(",")]
    bodies = [body.encode() for body in json.loads(open(bodies_json).read())]
    rollout.acquire_lock(backend, endpoint, OWNER, run_id)
    say("locked")
    while True:
        state = rollout.read_state(backend, endpoint)
        step = rollout.next_step(state, traffic_steps, model=model)
        say(f"begin {step}")
        if step.kind == rollout.Next.DONE:
            rollout.release_lock(backend, endpoint, OWNER)
            say("done done")
            return 0
        if step.kind == rollout.Next.DEPLOY:
            rollout.deploy_candidate(backend, endpoint, spec, model)
        elif step.kind == rollout.Next.SMOKE:
            rollout.smoke_test(backend, endpoint, state.rc, bodies).raise_if_failed()
            rollout.mark_smoke_tested(backend, endpoint)
        elif step.kind == rollout.Next.SHIFT:
            rollout.shift_traffic(backend, endpoint, step.percent)
        elif step.kind == rollout.Next.GATE:
            quick_gate(backend, endpoint, bodies)
            rollout.mark_gate_passed(backend, endpoint, step.percent)
        elif step.kind == rollout.Next.PROMOTE:
            rollout.promote(backend, endpoint)
        elif step.kind == rollout.Next.BAKE:
            quick_gate(backend, endpoint, bodies)
            rollout.delete_old_prod(backend, endpoint)
        say(f"done {step}")


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
