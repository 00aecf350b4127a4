# The README's commands. Every target sets up what it needs on a fresh machine.
PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
PYTEST_ARGS ?=

.PHONY: venv build test demo bench gpu-check gpu-train gpu-variants torch-compat clean

venv: $(STAMP)

$(STAMP): requirements.txt
	$(PY) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet -r requirements.txt
	touch $@

# JIT-builds the extension (cached under build/, incremental) and loads it.
build: venv
	$(PYTHON) -c "import birnn_ext"

test: build
	$(PYTHON) -m pytest $(PYTEST_ARGS)

# The data comes from Debian: dataset-fashion-mnist for the classifier, fortunes for
# the tagging task. DATA=folder uses another folder of MNIST-format IDX files instead.
FASHION_MNIST := /usr/share/datasets/fashion-mnist
FORTUNES := /usr/share/games/fortunes
DATA ?=

demo: build
	@missing=""; \
	if [ -z "$(DATA)" ] && [ ! -e $(FASHION_MNIST)/train-images-idx3-ubyte.gz ]; then missing=" dataset-fashion-mnist"; fi; \
	if [ ! -e $(FORTUNES)/fortunes ]; then missing="$$missing fortunes"; fi; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get install -y $$missing || { apt-get update && apt-get install -y $$missing; }; \
	  else \
	    echo "Missing data: run 'sudo apt-get install$$missing'" \
	         "(or 'make demo DATA=/folder/with/idx/files' for the images)"; exit 1; \
	  fi; \
	fi
	$(PYTHON) -m birnn_ext.demo --compare $(if $(DATA),--data $(DATA))
	$(PYTHON) -m birnn_ext.tagging

bench: build
	$(PYTHON) benchmarks/bench_lstm.py --preset targets

# On a GPU machine, with the python3 and torch already there (no venv: such a machine may
# have no package index): build, GPU tests, sanitizers, benchmarks and kernel profile in
# a few minutes; gpu-train runs the demo there (DATA=folder of Fashion-MNIST's files, by
# default data/fashion-mnist or Debian's) and times its training step; gpu-variants times
# each launch switch awaiting its measurement against the defaults. LOGS=folder for the
# logs, results and summary; DEADLINE=seconds for a machine lent for a fixed time.
# benchmarks/gpu_check.py says what each step runs.
GPU_CHECK_ARGS = $(if $(LOGS),--logs $(LOGS)) $(if $(DEADLINE),--deadline $(DEADLINE))

gpu-check:
	$(PY) benchmarks/gpu_check.py --group core $(GPU_CHECK_ARGS)

gpu-train:
	$(PY) benchmarks/gpu_check.py --group train $(GPU_CHECK_ARGS) $(if $(DATA),--data $(DATA))

gpu-variants:
	$(PY) benchmarks/gpu_check.py --group variants $(GPU_CHECK_ARGS)

# The GPU machine's torch is its own (2.11.0+cu130 when last seen), older than
# requirements.txt's: this builds the extension, CUDA kernels included (nvcc needed),
# against that version in a venv of its own under build/ and runs the test suite there,
# so that a GPU session does not spend its minutes on a build or a test that fails on the
# older torch. About 5 GB of packages; TORCH_COMPAT=version for another.
TORCH_COMPAT ?= 2.11.0
COMPAT := build/torch-$(TORCH_COMPAT)

torch-compat:
	$(PY) -m venv $(COMPAT)/venv
	grep -v '^torch==' requirements.txt > $(COMPAT)/requirements.txt
	$(COMPAT)/venv/bin/python -m pip install --quiet torch==$(TORCH_COMPAT) "setuptools>=77" -r $(COMPAT)/requirements.txt
	BIRNN_EXT_BUILD_DIR=$(COMPAT)/ext BIRNN_EXT_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 \
	  $(COMPAT)/venv/bin/python -m pytest -p no:cacheprovider $(PYTEST_ARGS)

clean:
	rm -rf build dist *.egg-info birnn_ext/_C*.so
