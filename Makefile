# Two commands on a fresh machine (Python >= 3.10, a C++17 compiler, make):
#   make bench   set up, build, and run the benchmark suite (the main job)
#   make test    set up, build, and run the test suite
# Everything lands in $(VENV) (a virtual environment) and build/; nothing outside the tree is touched.
#
# Variables:
#   VENV=.venv                 the virtual environment to create or reuse
#   TORCH=torch==2.13.0        the torch to install into a new VENV (a CUDA build enables the CUDA kernels
#                              when nvcc is on PATH), e.g. TORCH=torch==2.14.1
#   FUSEDOPS_CUDA=auto|0|1, FUSEDOPS_CUDA_ARCHS="80;90", FUSEDOPS_CPU_ISAS="base;avx2;avx512"  (see CMakeLists.txt)
#   PYTEST_ARGS=...            extra pytest arguments, e.g. PYTEST_ARGS="-k adam -x"
#   BENCH_ARGS=...             extra benchmark arguments, e.g. BENCH_ARGS="--quick"

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
BUILD_DIR ?= build/$(notdir $(abspath $(VENV)))
CUDA_HEADER_WHEELS := "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-cuda-cccl==13.0.*"
DEPS_STAMP := $(VENV)/.fusedops-deps

.PHONY: all setup build test test-fast bench clean

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): Makefile | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)" numpy "cmake>=3.26" ninja "scikit-build-core>=0.10" \
	    pytest pytest-xdist matplotlib tqdm "transformers==5.23.0" $(CUDA_HEADER_WHEELS)
	touch $@

setup: $(DEPS_STAMP)

# Builds fusedops._C in $(BUILD_DIR) and installs it next to the Python sources (python/fusedops),
# so the tests and benchmarks run the tree as it is. `pip install --no-build-isolation .` builds the
# same thing as a package.
build: setup
	mkdir -p $(BUILD_DIR)
	$(VENV)/bin/cmake -S . -B $(BUILD_DIR) -G Ninja -DPython_EXECUTABLE=$(abspath $(PY)) \
	    -DCMAKE_INSTALL_PREFIX=$(abspath python) -DCMAKE_BUILD_TYPE=Release \
	    -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV)/bin/ninja) > $(BUILD_DIR).configure.log 2>&1 \
	    || (cat $(BUILD_DIR).configure.log; exit 1)
	grep "^-- fusedops" $(BUILD_DIR).configure.log || true
	$(VENV)/bin/cmake --build $(BUILD_DIR)
	$(VENV)/bin/cmake --install $(BUILD_DIR) > /dev/null

# The whole suite: CPU kernels, the CUDA kernels under the emulator (and on a GPU when present),
# the emulator's own tests, the nvcc compile check when nvcc exists. Then the emulated kernel tests
# once more under a random schedule, which exposes missing barriers that lane order hides.
test: build
	cd tests && PYTHONPATH=$(abspath python):$$PYTHONPATH $(abspath $(PY)) -m pytest -n 2 -q $(PYTEST_ARGS) .
	cd tests && FUSEDOPS_SIMT_SCHEDULE=random:$${SEED:-12345} PYTHONPATH=$(abspath python):$$PYTHONPATH \
	    $(abspath $(PY)) -m pytest -n 2 -q -m emulated $(PYTEST_ARGS) .

bench: build
	PYTHONPATH=$(abspath python):$(abspath .):$$PYTHONPATH $(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf build python/fusedops/_C*.so python/fusedops/_build_config.py
