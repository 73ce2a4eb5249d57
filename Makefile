# Two set-up commands: `make demo` trains a VAE on the embedded digits (no network), `make test` passes
# the tests. Each creates the virtual environment .venv from pyproject.toml and constraints.txt.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test bench clean-venv

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/pvae train

# one thread per process unless told otherwise: on 2 shared cores the suite runs several times faster
test: $(VENV)/.installed
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -q

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/fit_speed.py

clean-venv:
	rm -rf $(VENV)
