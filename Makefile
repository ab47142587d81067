# The two commands a newcomer needs: `make demo` and `make test`. Both build .venv from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint test-kill install bench bench-gates bench-chaos clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("saferollout needs Python 3.10 or newer") if sys.version_info < (3, 10) else None'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

install: $(STAMP)

# The local twin of .github/workflows/safe-rollout.yml: a first release, then a gated safe rollout of a
# second model (gradient boosting), each leaving runs/<UTC time>-safe-rollout/ with executed notebooks,
# summary.json and report.html. The demo endpoint is recreated so the first run is a first release.
DEMO_ENDPOINT ?= credit-risk-demo
demo: $(STAMP)
	@$(VENV)/bin/saferollout online-endpoint delete -n $(DEMO_ENDPOINT) -y -o none 2>/dev/null || true
	$(VENV)/bin/saferollout run runbooks/safe_rollout.yaml -p endpoint_name=$(DEMO_ENDPOINT)
	$(VENV)/bin/saferollout run runbooks/safe_rollout.yaml -p endpoint_name=$(DEMO_ENDPOINT) \
		-p model_family=gradient_boosting
	@echo "open the run reports: $$(ls -d runs/*-safe-rollout | tail -2 | sed 's|$$|/report.html|' | tr '\n' ' ')"

# The linter and the type checker first (configured in pyproject.toml), then the tests.
lint: $(STAMP)
	$(VENV)/bin/ruff check lib tests/test_imports.py
	$(VENV)/bin/mypy

# Two workers (the machine's two cores), each with its own platform; a file's tests stay on one worker, so
# module fixtures (a platform of its own, a shared endpoint) are set up once.
test: lint
	$(PY) -m pytest -q -m "not kill" -n 2 --dist loadfile

# Fault injection (tests/kill/): the real runbook SIGKILLed at every step boundary and inside every gated step,
# then resumed or run afresh; the platform SIGKILLed mid-rollout. 9 tests, each one to ten rollouts of ~30-60 s on a
# quiet 2-core machine (~20 min in all; three times that at load 12); CI runs it after `make test`.
test-kill: $(STAMP)
	$(PY) -m pytest -q -s -m kill tests/kill

# N rollouts, each with a kill at a random point (runner or platform): bench/results/chaos.json, docs/benchmarks.md.
CHAOS_N ?= 10
bench-chaos: $(STAMP)
	$(PY) bench/chaos.py -n $(CHAOS_N)

bench: $(STAMP)
	$(PY) bench/gateway.py

# The gates on simulated streams beside the peer (savvi), then 32 gated rollouts on the real platform (~70 min).
bench-gates: $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	$(PY) bench/gates.py
	$(PY) bench/gate_rollouts.py

clean:
	rm -rf $(VENV) .saferollout runs .pytest_cache
