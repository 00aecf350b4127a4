# The README's commands. Every target sets up what it needs on a fresh machine.
PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
PYTEST_ARGS ?=

.PHONY: venv build test demo bench clean

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

# Fashion-MNIST comes from Debian's dataset-fashion-mnist; DATA=folder uses another
# folder of MNIST-format IDX files instead.
FASHION_MNIST := /usr/share/datasets/fashion-mnist
DATA ?=

demo: build
	@if [ -z "$(DATA)" ] && [ ! -e $(FASHION_MNIST)/train-images-idx3-ubyte.gz ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get install -y dataset-fashion-mnist || { apt-get update && apt-get install -y dataset-fashion-mnist; }; \
	  else \
	    echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist'," \
	         "or 'make demo DATA=/folder/with/idx/files'"; exit 1; \
	  fi; \
	fi
	$(PYTHON) -m birnn_ext.demo --compare $(if $(DATA),--data $(DATA))

bench: build
	$(PYTHON) benchmarks/bench_lstm.py --preset targets

clean:
	rm -rf build dist *.egg-info birnn_ext/_C*.so
