# jetfast: `make demo` and `make test` do all set-up themselves (venv, torch,
# system packages, build) and skip whatever is already done.
#
#   make test         build and run the test suite (compiles the CUDA sources too when nvcc exists)
#   make demo         the short end-to-end demo
#   make bench        pytest-benchmark runs; the README's tables come from here
#   make build        (re)build the compiled extension after editing csrc/
#   make sanitize     the prefetcher's C++ tests under ThreadSanitizer and AddressSanitizer
#
# Variables: PYTHON (interpreter for the venv, default python3), VENV (default .venv),
# TORCH_SPEC (default torch==2.13.0; e.g. TORCH_SPEC="torch --index-url .../cu126" for CUDA),
# JETFAST_CUDA (AUTO, ON or OFF), PYTEST_ARGS.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
JETFAST_CUDA ?= AUTO
PYTEST_ARGS ?=
SYSTEM_PACKAGES := libhdf5-dev zlib1g-dev

PY := $(VENV)/bin/python
STAMPS := $(VENV)/.jetfast-stamps
NATIVE_SOURCES := CMakeLists.txt $(shell find csrc -type f 2>/dev/null)
export JETFAST_CUDA

.PHONY: all test demo bench build sanitize system-packages clean help FORCE
all: test

help:
	@sed -n '1,16p' Makefile

# --- set-up ------------------------------------------------------------------
$(STAMPS)/system: | $(STAMPS)
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "jetfast: installing system packages:$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else \
	    echo "jetfast: missing system packages:$$missing"; \
	    echo "  install them with: sudo apt-get install -y$$missing   (then re-run make)"; exit 1; \
	  fi; \
	fi
	@touch $@

$(STAMPS):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@mkdir -p $@

$(STAMPS)/torch: | $(STAMPS)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	@touch $@

$(STAMPS)/deps: pyproject.toml $(STAMPS)/torch $(STAMPS)/system
	$(PY) -m pip install -q scikit-build-core pybind11 cmake ninja
	@# Dependencies only (the editable build below is the one that compiles).
	$(PY) -c "import tomllib,pathlib; p=tomllib.loads(pathlib.Path('pyproject.toml').read_text())['project']; print('\n'.join(p['dependencies']+p['optional-dependencies']['test']))" > $(STAMPS)/requirements.txt
	$(PY) -m pip install -q -r $(STAMPS)/requirements.txt
	@touch $@

# The editable install maps each module of the package to its file, so adding, moving or
# removing a module needs a reinstall: this list changes (and triggers one) only then.
$(STAMPS)/modules: FORCE | $(STAMPS)
	@find jetfast -name '*.py' | sort > $@.new
	@cmp -s $@.new $@ && rm $@.new || mv $@.new $@

$(STAMPS)/build: $(STAMPS)/deps $(STAMPS)/modules $(NATIVE_SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e . \
	  -Ccmake.define.JETFAST_CUDA=$(JETFAST_CUDA)
	@$(PY) -c "import jetfast._C as c; print(f'jetfast: built extension (CUDA kernels: {c.built_with_cuda}, C++ prefetcher: {c.built_with_prefetch})')"
	@touch $@

build: $(STAMPS)/build

# --- what people run -----------------------------------------------------------
test: $(STAMPS)/build
	@# With nvcc on PATH the build above compiled the .cu sources; the suite checks it did.
	JETFAST_EXPECT_CUDA_BUILD=$$(command -v nvcc >/dev/null && [ "$(JETFAST_CUDA)" != OFF ] && echo 1 || echo 0) \
	  $(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMPS)/build
	$(VENV)/bin/jetfast demo

bench: $(STAMPS)/build
	$(PY) -m pytest benchmarks -o python_files='bench_*.py' -p no:cacheprovider --benchmark-only \
	  --benchmark-columns=min,median,rounds --benchmark-sort=fullname $(PYTEST_ARGS)

sanitize: $(STAMPS)/build
	$(MAKE) -C csrc/prefetch/tests PYTHON=$(abspath $(PY))

clean:
	rm -rf build $(VENV) .pytest_cache .benchmarks
