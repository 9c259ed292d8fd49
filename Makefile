# Every target bootstraps .venv itself, so each works on a fresh clone.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# mypy --strict (pyproject) on every package: the pure cores and the shells alike.
TYPED  := intentions traffic connect agent devstack

.PHONY: install test lint typecheck pytest demo dev compat bench bench-smoke bench-tools clean

install: $(STAMP)

# Re-install when the project's dependency list changes; otherwise a no-op.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy $(TYPED)

pytest: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

test: lint typecheck pytest

demo: $(STAMP)
	$(BIN)/meshlet demo

dev: $(STAMP)
	$(BIN)/meshlet dev

# The project's one benchmark (bench/README.md): meshlet vs haproxy pairs, open-loop latency,
# handshakes, bulk, upload, control plane. Under 5 minutes on 2 cores; writes
# bench/results/latest.json and prints the markdown table.
bench: $(STAMP) bench-tools
	$(BIN)/python bench/run.py

# The same in seconds, for CI: asserts only that every variant produced figures.
bench-smoke: $(STAMP) bench-tools
	$(BIN)/python bench/run.py --smoke --out bench/results/smoke

# haproxy, nginx and wrk from apt when any is missing (Debian puts two of them in /usr/sbin).
bench-tools:
	@missing=""; for t in haproxy nginx wrk; do \
	    command -v $$t >/dev/null || [ -x /usr/sbin/$$t ] || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	    SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	    echo "bench: installing$$missing with apt-get"; \
	    $$SUDO apt-get update -qq && \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends$$missing >/dev/null; \
	fi

# py-consul's own test suite against `meshlet dev` (see compat/README.md).
compat: $(STAMP)
	$(BIN)/python compat/run.py

clean:
	rm -rf $(VENV) .compat .pytest_cache .mypy_cache .ruff_cache *.egg-info
