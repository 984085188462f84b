# Every target does its own setup: a fresh clone needs nothing but Python 3.10+.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements-cpu.txt constraints-cpu.txt 2>/dev/null | sha1sum | cut -c1-12)
# The declared Airflow floor's newest patch (README "Compatibility"): the unit suite runs here too.
AIRFLOW_FLOOR := 3.1.8
VENV_FLOOR := .venv-af31
PY_FLOOR := $(VENV_FLOOR)/bin/python
STAMP_FLOOR := $(VENV_FLOOR)/.installed-$(shell cat pyproject.toml requirements-cpu.txt constraints-af31-cpu.txt 2>/dev/null | sha1sum | cut -c1-12)
# The real engine (SGLang Diffusion + sglang-router) in a venv of its own: about 11 GB and 6 minutes once
# per machine (torch's CUDA wheels come along; the workers run on the CPU here), reused while its pins hold.
VENV_SGLANG := .venv-sglang
PY_SGLANG := $(VENV_SGLANG)/bin/python
STAMP_SGLANG := $(VENV_SGLANG)/.installed-$(shell cat requirements-sglang.txt constraints-sglang.txt 2>/dev/null | sha1sum | cut -c1-12)

.PHONY: install install-floor install-sglang test-sglang test test-floor lint wheel-smoke bench-smoke e2e e2e-distributed e2e-distributed-packages demo demo-ui bench clean constraints constraints-floor

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch is pinned to the CPU wheel here (requirements-cpu.txt); the package's own `local` extra stays a
# range so users on GPUs get the build that matches their CUDA.
$(STAMP): $(PY) pyproject.toml requirements-cpu.txt constraints-cpu.txt
	$(PY) -m pip install -q -r requirements-cpu.txt -c constraints-cpu.txt -e '.[local,s3,dev,nsfw,accel]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

$(PY_FLOOR):
	$(PYTHON) -m venv $(VENV_FLOOR)
	$(PY_FLOOR) -m pip install -q --upgrade pip

$(STAMP_FLOOR): $(PY_FLOOR) pyproject.toml requirements-cpu.txt constraints-af31-cpu.txt
	$(PY_FLOOR) -m pip install -q -r requirements-cpu.txt -c constraints-af31-cpu.txt -e '.[local,s3,dev,nsfw,accel]'
	rm -f $(VENV_FLOOR)/.installed-*
	touch $(STAMP_FLOOR)

install-floor: $(STAMP_FLOOR)

$(PY_SGLANG):
	$(PYTHON) -m venv $(VENV_SGLANG)
	$(PY_SGLANG) -m pip install -q --upgrade pip

# constraints-sglang.txt (pip freeze of a working engine venv) makes the resolution reproducible.
$(STAMP_SGLANG): $(PY_SGLANG) requirements-sglang.txt constraints-sglang.txt
	$(PY_SGLANG) -m pip install -q -r requirements-sglang.txt -c constraints-sglang.txt
	rm -f $(VENV_SGLANG)/.installed-*
	touch $(STAMP_SGLANG)

# nginx is the cluster's router (sglang-router does not route /v1/images/generations): Debian's, when missing.
install-sglang: $(STAMP_SGLANG)
	@if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx; \
	  else echo "make install-sglang needs: sudo apt-get install -y nginx" >&2; exit 1; fi; \
	fi

# The real engine: two `sglang serve` workers on the tiny checkpoint behind nginx (tests/sglang, one
# cluster for the session, ~2 min to start on 2 loaded cores), then the engine bench's smoke (its own
# cluster). A missing engine fails here (ZIMAGE_SGLANG_REQUIRED=1) instead of skipping.
test-sglang: install install-sglang
	ZIMAGE_SGLANG_VENV=$(VENV_SGLANG) ZIMAGE_SGLANG_REQUIRED=1 $(PY) -m pytest -q -m sglang tests/sglang --timeout=1200 -p no:randomly
	ZIMAGE_SGLANG_VENV=$(VENV_SGLANG) $(PY) bench/engine_throughput.py --smoke

lint: install
	$(VENV)/bin/ruff check airflow_provider_zimage tests dags bench scripts
	$(VENV)/bin/ruff format --check airflow_provider_zimage tests dags bench scripts
	$(VENV)/bin/mypy  # strict on airflow_provider_zimage/ ([tool.mypy] in pyproject.toml)

# `python -m build`, then the wheel alone (no dev or local extra) in a fresh venv: imports, providers
# manager, DagBag of dags/, dag.test() of zimage_quickstart (scripts/wheel_smoke.py; about a minute).
wheel-smoke: install
	$(PY) scripts/wheel_smoke.py

# The unit suite on both cores, on the newest Airflow and on the floor, then the e2e suite alone on the
# newest (its Airflow deployment needs both cores).
test: install lint wheel-smoke bench-smoke test-floor test-sglang
	$(PY) -m pytest -q -n 2 --timeout=600
	$(PY) -m pytest -q -m e2e tests/e2e --timeout=3000 -p no:randomly

test-floor: install-floor
	$(PY_FLOOR) -c 'import airflow; assert airflow.__version__ == "$(AIRFLOW_FLOOR)", airflow.__version__'
	$(PY_FLOOR) -m pytest -q -n 2 --timeout=600

# A real Airflow deployment (scheduler, dag-processor, triggerer, api-server) on loopback; ~7 minutes on
# 2 cores. Writes its figures to tests/e2e/results.json (or $$E2E_RESULTS) and prints the table of
# docs/reliability.md; `python -m tests.e2e.report --write` copies it there.
e2e: install
	$(PY) -m pytest -q -m e2e tests/e2e --timeout=3000 -p no:randomly -rs
	$(PY) -m tests.e2e.report

# The production shape: PostgreSQL, Redis, CeleryExecutor, two schedulers, two triggerers, two Celery
# workers (default and gpu queues) next to a zimage-executor, nodes SIGKILLed mid-run. Not part of
# `make test` (see docs/reliability.md for its wall time); writes tests/e2e/results-distributed.json and
# prints the README's second Reliability table (`python -m tests.e2e.report --distributed --write`).
e2e-distributed: install e2e-distributed-packages
	$(PY) -m pytest -q -m e2e_distributed tests/e2e/distributed --timeout=3600 -p no:randomly -rs
	$(PY) -m tests.e2e.report --distributed

# Debian's postgresql and redis-server, installed when missing (as root; otherwise says what to install).
e2e-distributed-packages:
	@if ! command -v redis-server >/dev/null || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql redis-server; \
	  else echo "make e2e-distributed needs: sudo apt-get install -y postgresql redis-server" >&2; exit 1; fi; \
	fi

# Runs dags/zimage_quickstart and dags/zimage_content_pipeline in a throwaway Airflow under .demo/:
# RUNWARE_API_KEY=... for the Runware API, ZIMAGE_MODEL_PATH=... for local weights, neither for a tiny
# random-weight model on the CPU (see scripts/demo.py).
demo: install
	$(PY) scripts/demo.py

# The Airflow UI of the last `make demo` on http://127.0.0.1:8080 (ZIMAGE_DEMO_PORT, read every time), no
# login, until Ctrl-C; the task logs of the demo are in its Logs tab:
# the Images tab URL that `make demo` printed opens there.
demo-ui: install
	$(PY) scripts/demo.py --ui

bench: install
	@echo "Benchmarks are run one by one: ls bench/ (figures: docs/benchmarks.md); make bench-smoke runs them all tiny"

# Every bench/*.py (but _*.py) with --smoke: the real code path at tiny sizes, so a changed interface
# fails here and not in the next measurement. gpu_check.py goes through its shell wrapper (the CPU path
# without a GPU). A bench's output is shown only when it fails; tests/test_bench_smoke.py checks that
# every bench has the flag. Time per bench: docs/benchmarks.md.
bench-smoke: install
	@total=$$(date +%s); log=$$(mktemp); for bench in bench/[!_]*.py; do \
	  case $$bench in \
	    bench/gpu_check.py) set -- bash bench/gpu_check.sh --smoke ;; \
	    bench/engine_throughput.py) echo "bench-smoke: $$bench runs in make test-sglang (needs the engine)"; continue ;; \
	    *) set -- $(PY) $$bench --smoke ;; \
	  esac; \
	  start=$$(date +%s); \
	  if PYTHON=$(PY) "$$@" > $$log 2>&1; then \
	    echo "bench-smoke: $$bench ok ($$(( $$(date +%s) - start )) s)"; \
	  else \
	    tail -n 40 $$log; echo "bench-smoke: $$bench FAILED: $$*" >&2; rm -f $$log; exit 1; \
	  fi; \
	done; rm -f $$log; echo "bench-smoke: all passed in $$(( $$(date +%s) - total )) s"

# After changing dependencies: re-resolve from scratch, then freeze what the suite passed with.
constraints:
	rm -rf .venv-constraints && $(PYTHON) -m venv .venv-constraints
	.venv-constraints/bin/pip install -q -r requirements-cpu.txt -e '.[local,s3,dev,nsfw,accel]'
	(head -2 constraints-cpu.txt; .venv-constraints/bin/pip freeze --exclude-editable \
	  | grep -v airflow-provider-zimage) > constraints-cpu.txt.new && mv constraints-cpu.txt.new constraints-cpu.txt
	rm -rf .venv-constraints

# The floor's constraints: the newest pins where Airflow $(AIRFLOW_FLOOR) allows them, re-resolved where not.
constraints-floor:
	rm -rf .venv-constraints && $(PYTHON) -m venv .venv-constraints
	.venv-constraints/bin/pip install -q --upgrade pip
	.venv-constraints/bin/python scripts/floor_constraints.py .venv-constraints/bin/python $(AIRFLOW_FLOOR) \
	  constraints-cpu.txt constraints-af31-cpu.txt
	rm -rf .venv-constraints

clean:
	rm -rf $(VENV) $(VENV_FLOOR) $(VENV_SGLANG) .demo .pytest_cache .ruff_cache
