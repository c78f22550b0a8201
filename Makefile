# Each target sets up what it needs: a fresh clone with only python3 works.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HASH := $(shell cat setup.py Makefile | cksum | cut -d" " -f1)
# Two stamps: the library alone (demo, serve: ~75 s to install on 2 cores) and the test extras on top
# (torch, transformers, Beam, Playwright, ...: ~1 min more).
RUN_STAMP := $(VENV)/.runtime-$(HASH)
STAMP := $(VENV)/.installed-$(HASH)
WORKDIR ?= workdir/demo
PYTEST_ARGS ?=

.PHONY: setup demo serve test test-all bench clean

$(RUN_STAMP): setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e . 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) -c "import pixelground, jax, flax, grain, gradio"
	rm -f $(VENV)/.runtime-*; touch $(RUN_STAMP)

$(STAMP): $(RUN_STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test]" 2>&1 | grep -v "is ignored: it is neither" || true
	# timm (EVA02 parity reference) without its torchvision dependency, which would pull CUDA torch;
	# tests/test_eva02.py explains the in-test torchvision stand-in.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps "timm==1.0.31"
	# segment-anything (automatic-mask-generator reference) likewise without torchvision
	# (tests/sam_reference.py stands in for the four torchvision functions it imports).
	$(PY) -m pip install -q --disable-pip-version-check --no-deps "segment-anything==1.0"
	$(PY) -c "import pixelground, jax, flax, torch, transformers"
	rm -f $(VENV)/.installed-*; touch $(STAMP)

setup: $(STAMP)

# The main job on embedded data: the PixelLLM + LISA demo (builds its synthetic datasets on first use).
# DEMO_CONFIG=configs/demo.py:gella adds GELLA's parts and tasks (~20 min from a fresh clone).
DEMO_CONFIG ?= configs/demo.py
demo: $(RUN_STAMP)
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) -m pixelground.train --config=$(DEMO_CONFIG) --workdir=$(WORKDIR)

# The web demo on the demo checkpoint (trains it first when WORKDIR has no finished checkpoint);
# SERVE_ARGS passes more flags, e.g. SERVE_ARGS="--port=8080 --host=0.0.0.0".
SERVE_ARGS ?=
serve: $(RUN_STAMP)
	@$(PY) -c "from pixelground.training import checkpointing as c; c.find_checkpoint('$(WORKDIR)')" \
		2>/dev/null || $(MAKE) demo
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) -m pixelground.serve --checkpoint=$(WORKDIR) $(SERVE_ARGS)

# Default test run: everything except @pytest.mark.slow. `make test-all` (or pytest --runslow) runs all.
# TEST_WORKERS pytest-xdist processes, one test file each at a time (module fixtures are built once):
# most of a test's time is single-threaded XLA compilation, so 2 workers use both cores of a 2-core
# machine. TEST_WORKERS=1 runs in one process.
TEST_WORKERS ?= 2
XDIST = $(if $(filter-out 0 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile,)
test: $(STAMP)
	$(PY) -m pytest -q $(XDIST) tests $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q $(XDIST) --runslow tests $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/t5_decode.py
	$(PY) bench/t5_train_step.py
	$(PY) bench/vision.py
	$(PY) bench/input_pipeline.py
	$(PY) bench/amg.py
	$(PY) bench/serve.py

clean:
	rm -rf $(VENV) workdir .pytest_cache
