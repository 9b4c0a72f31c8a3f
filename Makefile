# Two commands set everything up from the lock file: `make demo` and `make test`.
SHELL := /bin/bash
# uv from PATH, else the one pip installs into this Python (installed on first use).
UV ?= $(shell command -v uv 2>/dev/null || echo python3 -m uv)
VENV := .venv
STAMP := $(VENV)/.synced
RUN := $(UV) run --frozen --no-sync

.PHONY: setup demo test test-fast lint bench bench-search bench-racing bench-posthoc bench-gpu clean browser-deps

$(STAMP): uv.lock pyproject.toml
	@$(UV) --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --frozen --all-groups
	@touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(RUN) evolver loop loop=demo search=demo objective=cv.oof_log_loss $(ARGS)

# Tests pin torch to one thread each (tests/conftest.py), so two pytest-xdist workers fill two
# cores; a module stays on one worker, so its module-scoped runs train once. Tests marked
# `serial` (several processes racing each other, heartbeats, outage timers) run afterwards, alone.
# Both passes always run; make fails if either did. pytest's exit status 5 is "no test
# selected": an ARGS that picks only one kind is fine.
TEST_WORKERS ?= 2
PYTEST_PARALLEL := pytest -q -n $(TEST_WORKERS) --dist loadfile
define two_passes
	@failed=0; \
	$(RUN) $(PYTEST_PARALLEL) -m "$(1)" $(ARGS) || [ $$? -eq 5 ] || failed=1; \
	$(RUN) pytest -q -m "$(2)" $(ARGS) || [ $$? -eq 5 ] || failed=1; \
	[ $$failed -eq 0 ] || { echo "make: a test pass failed (output above)"; exit 1; }
endef

test: setup browser-deps
	$(call two_passes,not serial,serial)

test-fast: setup
	$(call two_passes,not slow and not serial,not slow and serial)

lint: setup
	$(RUN) ruff check .
	$(RUN) ruff format --check .

bench: setup
	$(RUN) python benchmarks/overhead.py --profile --compare-sync
	$(RUN) python benchmarks/step_overhead.py
	$(RUN) python benchmarks/diagnosis_speed.py
	$(RUN) python benchmarks/tracking_logging.py --server
	$(RUN) python benchmarks/search_efficiency.py

# Evolver against Optuna's samplers and pruners at equal training seconds (hours on 2 CPU cores;
# ARGS narrows it, e.g. ARGS="--tasks pretrained --seeds 3 --budget 300").
bench-search: setup
	$(RUN) python benchmarks/equal_compute.py $(ARGS)

# Fold racing's false-stop rate, replayed on loops that trained every fold.
bench-racing: setup
	$(RUN) python benchmarks/racing.py $(ARGS)

# The post-hoc study's share of a 5-fold run's wall time, and its OOF log-loss gain.
bench-posthoc: setup
	$(RUN) python benchmarks/posthoc_cost.py $(ARGS)

# Needs a CUDA GPU.
bench-gpu: setup
	$(RUN) python benchmarks/gpu_throughput.py

# N = 1..16 loop workers on one fresh PostgreSQL database, 10 s and 60 s simulated trials (~40 min;
# run it alone on the machine). ARGS="--quick" for a smoke run.
.PHONY: bench-workers
bench-workers: setup
	$(RUN) python benchmarks/workers.py $(ARGS)

# The browser test needs Debian's Chromium; installed when missing and apt is available.
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium not installed: browser tests will be skipped"; }

clean:
	rm -rf runs outputs multirun mlruns test-artifacts
