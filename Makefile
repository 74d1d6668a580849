# `make demo` and `make test` work on a fresh clone; nothing else is needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/gtbus demo

# Test workers: one per core (CI has 2), at most 4 (each test may start several processes);
# JOBS=0 runs the suite in this one process.
JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)

# The deployments across network namespaces (marker netns) cut and heal links around a
# lease: they run after the rest, alone, so no other test's processes share their cores.
# (Exit 5, "no tests", is fine there: PYTEST_ARGS may select none of them.)
test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(JOBS) -m "not netns" $(PYTEST_ARGS)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m netns $(PYTEST_ARGS) || [ $$? -eq 5 ]

clean:
	rm -rf $(VENV) build *.egg-info
