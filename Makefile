# fastreg: every command sets up what it needs (a .venv in the repo root, torch, the build).
#   make demo   set up, build, run the regularization demo, then the quick benchmark on this machine's device
#   make test   set up, build, run the test suite (and the benchmark smoke tests)
PYTHON      ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
TORCH_SPEC  ?= torch==2.14.1
# nvcc present: compile the CUDA kernels too (no GPU needed), and make the tests require them
HAVE_NVCC   := $(shell command -v nvcc >/dev/null 2>&1 || test -x /usr/local/cuda/bin/nvcc && echo 1)
export PATH := $(PATH):/usr/local/cuda/bin
export MAX_JOBS ?= 2

SOURCES := setup.py $(shell find csrc -type f 2>/dev/null)

.PHONY: setup build test demo bench clean

$(VENV)/.deps: requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)" -r requirements-dev.txt
	touch $@

setup: $(VENV)/.deps

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install -q -e . --no-build-isolation
	touch $@

build: $(VENV)/.built

test: build
	FASTREG_EXPECT_BUILD=$(if $(HAVE_NVCC),cuda,cpu) $(PY) -m pytest tests bench -q --benchmark-disable

demo: build
	$(PY) examples/regularization_demo.py

bench: build
	$(PY) -m fastreg.bench

clean:
	rm -rf build *.egg-info fastreg/_C*.so $(VENV)/.built
