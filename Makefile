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

demo: build
	$(PYTHON) -m birnn_ext.demo --compare

bench: build
	$(PYTHON) benchmarks/bench_lstm.py --preset targets

clean:
	rm -rf build dist *.egg-info birnn_ext/_C*.so
