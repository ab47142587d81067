"""The gate benchmark's fast path makes the same decisions, at the same times, as run_gates and Gate.check."""
import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "gates.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gates", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_fast_path_matches_run_gates_on_simulated_streams():
    assert load_bench().check_fast_path(runs=3) == {"runs": 3, "kind": "sequential", "identical": True}


def test_a_gate_step_fails_first_passes_last_and_times_out_otherwise():
    step = load_bench().step
    assert step([("pass", 50.0), ("fail", 80.0)]) == ("fail", 80.0)
    assert step([("pass", 50.0), ("pass", 120.0)]) == ("pass", 120.0)
    assert step([("pass", 50.0), ("none", 600.0)]) == ("timeout", 600.0)
