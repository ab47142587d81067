"""Validation gates: decide whether a release candidate may take more traffic.

Kinds: threshold (the seed's), compare (RC vs PROD, fixed sample), sequential (anytime-valid),
ml_quality and ml_agreement. No data is never a pass. See docs/gates.md.
"""
from saferollout.gates.base import Gate, GateContext, Verdict
from saferollout.gates.registry import (AGGREGATE_GATES, DEFAULT_GATES, KINDS, build_gates, gates_for_backend,
                                       is_named_gate_list, named_gate_list)
from saferollout.gates.runner import GateReport, run_gates

__all__ = ["AGGREGATE_GATES", "DEFAULT_GATES", "Gate", "GateContext", "GateReport", "KINDS", "Verdict",
           "build_gates", "gates_for_backend", "is_named_gate_list", "named_gate_list", "run_gates"]
