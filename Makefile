# Two commands: `make demo` sets everything up and runs the demo; `make test` runs the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The torch build this project is tested with. It is pinned here, not in the package (whose [train] extra asks for
# a range), and installed before the extras so that their range is already met: with no torch installed, a range
# lets pip pick the newest release, which on Linux x86_64 is a CUDA build of several GB. Override it for another
# build, e.g. make TORCH='torch==2.13.0 --index-url <PyTorch's CPU wheel index>'.
# pip byte-compiles what it installs: where PYTHONDONTWRITEBYTECODE is set (it was where CI was timed), Python would
# otherwise compile torch and TensorFlow again in every test process (--no-compile made the tests 1.8x slower).
TORCH ?= torch==2.13.0

.PHONY: setup demo test clean

$(BIN)/prune2edge: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[train,test]'
	touch $@

setup: $(BIN)/prune2edge
	bash scripts/system-deps.sh

demo: setup
	$(BIN)/prune2edge demo

# The tests run in two rounds: first all but those marked `alone`, one pytest-xdist worker per free core (each test
# file on one worker); then those alone (the roll-out tests, which time a fleet's versions changing: beside other
# tests' training they lost frames). The demo run they share is made once (tests/conftest.py). --durations: the
# slowest tests and fixtures, so that a test that grows shows in every CI log.
WORKERS = $(shell $(BIN)/python -c "from prune2edge import cores; print(cores.free())" 2>/dev/null || echo 1)
test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -n $(WORKERS) --dist loadfile -m "not alone" --no-loadscope-reorder --durations=15
	$(BIN)/python -m pytest -q -m alone --durations=5

clean:
	rm -rf $(VENV) runs
