# Two commands for a new user: `make train` and `make test`.
# Both create .venv if missing, install nano-train (editable) and prepare the default data.

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
CONFIG ?= configs/shakespeare_char.toml
NPROC  ?= 2
ARGS   ?=

.PHONY: train test setup data bench clean

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch is pinned to the CPU build 2.13.0 in pyproject.toml; installing it first keeps
	# pip from resolving any other torch build for the packages that follow.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

setup: $(VENV)/.installed

data: setup
	$(PY) -m nanotrain prepare --config $(CONFIG)

# The default demo: train the nanoGPT-sized character model on tiny Shakespeare, data parallel
# over NPROC processes (torchrun, gloo; the same model as one process would train), then sample.
train: data
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc-per-node $(NPROC) \
		-m nanotrain train --config $(CONFIG) --parallel.dp=$(NPROC) $(ARGS)
	$(PY) -m nanotrain sample --config $(CONFIG) --prompt "ROMEO:" --max-new-tokens 300

test: data
	$(PY) -m pytest -q $(ARGS)

bench: setup
	$(PY) bench/overhead.py
	$(PY) bench/nanogpt.py

clean:
	rm -rf runs data/*.nanotrain
