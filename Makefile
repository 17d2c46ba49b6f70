# Each target works on a fresh machine with only Python 3.11+, pip and gcc: the venv is created
# and the package installed (editable) on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# Tests use 8 virtual CPU devices (tests/conftest.py); two workers match the 2-core CI machine.
PYTEST_WORKERS ?= 2

.PHONY: demo demo-camera stream test test-all e2e bench aot tensorboard clean

$(VENV)/.installed-core: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed-core
	# torch is pinned to the CPU build that lies on the machines' disk (parity tests only). Elsewhere
	# the pin alone gets the multi-GB CUDA build: install the CPU build first (BUILD.md).
	$(PIP) install --quiet -e '.[test,parity]'
	touch $@

# The main job: the testbed's short variant (experiments/testbed.py:short) on the panorama world in
# pixels: stage 1, the distilled and the AAPT generators, then the evaluation against the exact oracle
# in demo_out/testbed/report (claims.md, report.json, drift PNGs, GIFs beside the oracle) and an
# example first frame + controls file in demo_out/testbed/examples. Rerunning resumes. It runs on
# XLA's optimised backend (cheap-compile flags cost 2.2x at run time; the compilation cache pays
# the compile once).
demo: $(VENV)/.installed-core
	$(PY) -m apt2_jax.main --config=experiments/testbed.py:short --workdir=demo_out/testbed

# The camera world's chain (VAE, stages 0-3, ablations, long video) as a visual smoke run.
demo-camera: $(VENV)/.installed-core
	$(PY) -m apt2_jax.main --config=experiments/toy_pipeline.py:demo --workdir=demo_out/pipeline

# Stream 120 latent frames from the random-weight `small` model and print latency / fps
# (64x64 pixels: the CPU-real-time setting; --height/--width for more).
stream: $(VENV)/.installed-core
	$(PY) -m apt2_jax.demo --size=small --frames=120 --height=64 --width=64

test: $(VENV)/.installed-test
	$(PY) -m pytest -q -m "not slow and not e2e" -n $(PYTEST_WORKERS) --durations=15 tests

test-all: $(VENV)/.installed-test
	$(PY) -m pytest -q -m "not e2e" -n $(PYTEST_WORKERS) tests

# The browser test: headless system Chromium driven by Playwright; no browser is downloaded by
# Playwright. A machine without /usr/bin/chromium gets Debian's package (apt-get: root, or sudo),
# so neither of the test's skip conditions (no playwright, no browser) can hold. The screenshot lands
# in build/demo_page.png.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_GET := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600
e2e: $(VENV)/.installed-test
	$(PIP) install --quiet -e '.[e2e]'
	$(PY) -c "import playwright.sync_api"
	test -x /usr/bin/chromium || { $(APT_GET) update -q && $(APT_GET) install -y -q chromium; }
	test -x /usr/bin/chromium
	APT2_SCREENSHOT=$${APT2_SCREENSHOT:-build/demo_page.png} $(PY) -m pytest -q -rs -m e2e tests/e2e

# TensorBoard over a run (or the pipeline's root): scalars, config/hparams, evaluation rollouts,
# profiles (xprof plugin). LOGDIR=... to choose; binds localhost:6006.
LOGDIR ?= demo_out/testbed
tensorboard: $(VENV)/.installed-core
	$(PIP) install --quiet -e '.[tensorboard]'
	$(VENV)/bin/tensorboard --logdir $(LOGDIR)

clean:
	rm -rf $(VENV) build dist *.egg-info
