"""A minimal scoring script: answers with the request it got, as fast as the inference server allows.

Used by the gateway benchmark and the local platform's tests. Knobs (deployment environment_variables):
  ECHO_DELAY_MS   sleep this long in run() (to hold a request in flight)
  ECHO_FAIL       "1": run() raises, so the inference server answers 500
  ECHO_INIT_FAIL  "1": init() raises, so the deployment never becomes ready
  ECHO_INIT_FAIL_ONCE  a file path: while that file exists, init() removes it and raises (one failed start)
"""
import json
import os
import time

name = ""
init_niceness = 0


def init():
    global name, init_niceness
    init_niceness = os.getpriority(os.PRIO_PROCESS, 0)
    if os.environ.get("ECHO_INIT_FAIL") == "1":
        raise RuntimeError("echo init failed on purpose (ECHO_INIT_FAIL=1)")
    once = os.environ.get("ECHO_INIT_FAIL_ONCE")
    if once and os.path.exists(once):
        os.remove(once)
        raise RuntimeError(f"echo init failed on purpose, once ({once} existed)")
    name = os.environ.get("ECHO_NAME", "")


def run(raw_data):
    delay_ms = float(os.environ.get("ECHO_DELAY_MS", "0"))
    if delay_ms:
        time.sleep(delay_ms / 1000.0)
    if os.environ.get("ECHO_FAIL") == "1":
        raise RuntimeError("echo run failed on purpose (ECHO_FAIL=1)")
    payload = json.loads(raw_data) if isinstance(raw_data, (str, bytes)) else raw_data
    return {"echo": payload, "name": name, "pid": os.getpid(), "init_niceness": init_niceness,
            "niceness": os.getpriority(os.PRIO_PROCESS, 0)}
