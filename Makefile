# make demo: train the CPU-sized LaVie on the embedded synthetic dataset, sample videos, print what they show.
# make test: the test suite. Both create the virtual environment (.venv) on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR := logs/demo

.PHONY: demo test install clean-venv bench

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py --out $(DEMO_DIR)

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/temporal_attention.py

clean-venv:
	rm -rf $(VENV)
