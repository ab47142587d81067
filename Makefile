# The two commands a newcomer needs: `make demo` and `make test`. Both build .venv from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install bench bench-gates clean

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
	-$(VENV)/bin/saferollout online-endpoint delete -n $(DEMO_ENDPOINT) -y -o none 2>/dev/null
	$(VENV)/bin/saferollout run runbooks/safe_rollout.yaml -p endpoint_name=$(DEMO_ENDPOINT)
	$(VENV)/bin/saferollout run runbooks/safe_rollout.yaml -p endpoint_name=$(DEMO_ENDPOINT) \
		-p model_family=gradient_boosting
	@echo "open the run reports: $$(ls -d runs/*-safe-rollout | tail -2 | sed 's|$$|/report.html|' | tr '\n' ' ')"

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/gateway.py

# The gates on simulated streams beside the peer (savvi), then 32 gated rollouts on the real platform (~70 min).
bench-gates: $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	$(PY) bench/gates.py
	$(PY) bench/gate_rollouts.py

clean:
	rm -rf $(VENV) .saferollout runs .pytest_cache
