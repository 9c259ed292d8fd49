# Every target bootstraps .venv itself, so each works on a fresh clone.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# mypy --strict (pyproject) on every package: the pure cores and the shells alike.
TYPED  := intentions traffic connect agent devstack

.PHONY: install test lint typecheck pytest demo dev compat bench bench-smoke bench-tools compiled test-compiled faults soak fuzz clean

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
# Then what metrics and access logs cost per request (http_pair_micro.py, in one process).
bench: $(STAMP) bench-tools compiled
	$(BIN)/python bench/run.py --sidecar-python $(MYPYC_VENV)/bin/python
	$(BIN)/python bench/http_pair_micro.py --requests 10000
	$(BIN)/python bench/http_pair_micro.py --requests 10000 --metrics
	$(BIN)/python bench/http_pair_micro.py --requests 10000 --access-log
	$(BIN)/python bench/http_pair_micro.py --requests 10000 --tracing 10

# The same in seconds, for CI: asserts only that every variant produced figures.
bench-smoke: $(STAMP) bench-tools compiled
	$(BIN)/python bench/run.py --smoke --out bench/results/smoke --sidecar-python $(MYPYC_VENV)/bin/python

# The sidecar's hot modules compiled with mypyc (setup.py), installed in a venv of their own
# that the benchmark's sidecars run from: the dev tree stays pure Python (compiled modules
# beside the sources would shadow edits). Rebuilt when a package source changes; without a C
# compiler it holds pure Python (setup.py says so) and the benchmark records which it ran.
MYPYC_VENV  := .venv-mypyc
MYPYC_STAMP := $(MYPYC_VENV)/.installed

compiled: $(MYPYC_STAMP)

$(MYPYC_STAMP): $(STAMP) setup.py pyproject.toml \
               $(shell find agent connect intentions traffic devstack -name '*.py')
	rm -rf $(MYPYC_VENV) build
	$(PYTHON) -m venv $(MYPYC_VENV)
	$(MYPYC_VENV)/bin/pip install --quiet --upgrade pip
	$(MYPYC_VENV)/bin/pip install --quiet . 'mypy>=1.10' 'setuptools>=68' wheel
	MESHLET_MYPYC=1 $(MYPYC_VENV)/bin/pip install --quiet --no-build-isolation --no-deps \
	    --force-reinstall .
	rm -rf build  # setuptools' build/lib would hand the .so files to a later pure build
	touch $(MYPYC_STAMP)

# tests/connect and tests/fuzz against the compiled modules: a copy of the tracked tree in
# build/compiled-tests with setup.py's HOT modules compiled in place there (never here).
test-compiled: $(STAMP)
	@if ! command -v $${CC:-cc} >/dev/null; then echo "test-compiled: no C compiler, skipped"; \
	else set -ex; \
	    rm -rf build/compiled-tests; mkdir -p build/compiled-tests; \
	    git ls-files -z | xargs -0 cp --parents -t build/compiled-tests; \
	    cd build/compiled-tests; \
	    ../../$(BIN)/python -c 'import runpy, sys; \
	        hot = runpy.run_path("setup.py", run_name="hot")["HOT"]; sys.argv = ["mypyc", *hot]; \
	        from mypyc.__main__ import main; main()' >/dev/null; \
	    ../../$(BIN)/python -c 'import connect.http1.downstream as m; \
	        assert m.__file__.endswith(".so"), m.__file__'; \
	    ../../$(BIN)/pytest -q -p no:cacheprovider tests/connect tests/fuzz; \
	fi

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

# Issue 14: the fault suite's long form (30 s control-plane outage, 20 leaf rotations, ...)
# and the 10-minute soak; `make test` runs the short forms. Figures are printed (-s).
faults: $(STAMP)
	MESHLET_FAULTS=full $(BIN)/pytest -s -p no:cacheprovider tests/integration/faults/test_faults.py tests/integration/faults/test_routing_faults.py

soak: $(STAMP)
	MESHLET_SOAK_SECONDS=600 $(BIN)/pytest -s -p no:cacheprovider tests/integration/faults/test_soak.py

# Coverage-guided fuzzing (atheris) of every target for a fixed number of runs from the corpus
# in tests/fuzz/corpus, then the Hypothesis properties with more examples than CI's pass
# (tests/fuzz/README.md). A crash stops it and is left in tests/fuzz/.work/<target>/.
FUZZ_RUNS      ?= 20000
FUZZ_HTTP_RUNS ?= 2000
FUZZ_EXAMPLES  ?= 1000
FUZZ_TARGETS   := policy intentions_entry traffic_entry traffic_chain filter_expression \
                  agent_config consul_results catalog
FUZZ_STAMP     := $(VENV)/.fuzz-installed

$(FUZZ_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[test,fuzz]'
	touch $(FUZZ_STAMP)

fuzz: $(FUZZ_STAMP)
	set -e; for t in $(FUZZ_TARGETS); do \
	    $(BIN)/python -m tests.fuzz.run $$t --runs $(FUZZ_RUNS); done
	$(BIN)/python -m tests.fuzz.run http_proxy --runs $(FUZZ_HTTP_RUNS)
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) FUZZ_RANDOM=1 $(BIN)/pytest -q -p no:cacheprovider tests/fuzz

clean:
	rm -rf $(VENV) $(MYPYC_VENV) .compat .pytest_cache .mypy_cache .ruff_cache *.egg-info
