# fastreg: every command sets up what it needs, then runs.
#   make demo        set up, build, run the regularization demo, then the quick benchmark on this machine's device
#   make test        set up, build, run the test suite (and the benchmark smoke tests); CI runs it (.ci/run)
#   make build       set up and build only
#   make gpu-check   on a GPU machine: environment, build for its GPU, GPU tests, GPU-only checks,
#                    benchmark, summary, within a deadline (bench/gpu_check.py; DEVICE=cpu: its CPU mode)
#
# Where it runs:
#   default          a .venv in the repository root with torch $(TORCH_SPEC) and the test tools from the registry
#   SYSTEM_TORCH=1   $(PYTHON)'s own environment with the torch already in it, offline; the build is
#                    `$(PYTHON) -m pip install --no-build-isolation --no-deps --no-index -e .`
#                    (gpu-check uses it whenever $(PYTHON) imports torch)
# The build compiles on every core (MAX_JOBS overrides) for the GPU present (FASTREG_CUDA_ARCHS overrides);
# see setup.py.
PYTHON       ?= python3
TORCH_SPEC   ?= torch==2.14.1
DEVICE       ?= cuda
# arguments added to the gpu-check command line (bench/gpu_check.py --help) and to pytest's
CHECK_ARGS   ?=
PYTEST_ARGS  ?=
VENV         := .venv
# nvcc present: compile the CUDA kernels too (no GPU needed), and make the tests require them
HAVE_NVCC    := $(shell command -v nvcc >/dev/null 2>&1 || test -x /usr/local/cuda/bin/nvcc && echo 1)
export PATH  := $(PATH):/usr/local/cuda/bin

SYSTEM_TORCH ?= $(if $(filter gpu-check,$(MAKECMDGOALS)),auto,0)
ifeq ($(SYSTEM_TORCH),auto)
override SYSTEM_TORCH := $(shell $(PYTHON) -c "import torch" >/dev/null 2>&1 && echo 1 || echo 0)
endif
ifeq ($(SYSTEM_TORCH),1)
PY     := $(PYTHON)
# stamps of this environment's build, apart from other environments' (build/ is ignored by git)
STAMPS := build/stamps-$(shell $(PYTHON) -c "import hashlib, sys; print(hashlib.sha1(sys.prefix.encode()).hexdigest()[:10])")
else
PY     := $(VENV)/bin/python
STAMPS := $(VENV)
endif

SOURCES := setup.py $(shell find csrc -type f 2>/dev/null)
# the test processes: one per core where pytest-xdist is installed
XDIST = $$($(PY) -c "import xdist" >/dev/null 2>&1 && echo "-n auto")
# what `make test` requires of the build: the CUDA kernels wherever they can compile
EXPECT_BUILD = $$($(PY) -c "import os, torch; cuda = '$(HAVE_NVCC)' and torch.version.cuda and os.environ.get('FASTREG_BUILD_CUDA') != '0'; print('cuda' if cuda else 'cpu')")

.PHONY: setup build test demo bench gpu-check clean

ifeq ($(SYSTEM_TORCH),1)
$(STAMPS)/.deps:
	@$(PY) -c "import torch; print('using', torch.__file__, torch.__version__)" || \
		{ echo "SYSTEM_TORCH=1: $(PYTHON) cannot import torch; install torch there or drop SYSTEM_TORCH"; exit 1; }
	@mkdir -p $(STAMPS) && touch $@
else
$(STAMPS)/.deps: requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)" -r requirements-dev.txt
	touch $@
endif

setup: $(STAMPS)/.deps

# pip's editable build needs setuptools 64+ (PEP 660) and, below 70.1, the wheel package;
# without them setuptools' own develop command makes the same in-place build
PIP_EDITABLE_WORKS := import importlib.util, setuptools; \
	v = tuple(int(p) for p in setuptools.__version__.split(".")[:2]); \
	raise SystemExit(not (v >= (70, 1) or (v >= (64, 0) and importlib.util.find_spec("wheel"))))

$(STAMPS)/.built: $(STAMPS)/.deps $(SOURCES)
	if $(PY) -c '$(PIP_EDITABLE_WORKS)'; then \
		$(PY) -m pip install -q --no-build-isolation --no-deps --no-index -e .; \
	else \
		$(PY) setup.py -q develop --no-deps; \
	fi
	touch $@

build: $(STAMPS)/.built

test: build
	FASTREG_EXPECT_BUILD=$(EXPECT_BUILD) $(PY) -m pytest tests bench -q --benchmark-disable $(XDIST) $(PYTEST_ARGS)

demo: build
	$(PY) examples/regularization_demo.py

bench: build
	$(PY) -m fastreg.bench

# its own build phase, timed within its deadline, replaces `make build`
gpu-check: setup
	$(PY) bench/gpu_check.py --device $(DEVICE) $(CHECK_ARGS)

clean:
	rm -rf build *.egg-info fastreg/_C*.so $(VENV)/.built
