# Two commands for a new user: `make train` and `make test`.
# Both create .venv if missing, install nano-train (editable) and prepare the default data.

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
CONFIG ?= configs/shakespeare_char.toml
NPROC  ?= 2
ARGS   ?=
# make test runs the suite in JOBS pytest-xdist workers. Two on a 2-core machine: one pytest process
# alone leaves a core idle while a single-process test runs and while a world's ranks wait on each
# other; a third worker only adds oversubscription (measured: README, under `make test`).
JOBS   ?= 2
PYTEST := $(PY) -m pytest -q -n $(JOBS) --dist loadgroup

.PHONY: train train-dp test test-docs test-avx2 test-wheel test-slurm setup data bench clean

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

# The default demo: the DeepSeek-shaped model (MLA + MoE) on tiny Shakespeare in 4D,
# tp=2 x pp=2 x dp=2 with ep=2: 8 gloo processes under torchrun (nanotrain.torchrun: torchrun that ends
# a Ctrl-C with one line, after the workers saved) (about 3 minutes of training on 2 cores of an
# AVX2-only AMD EPYC, 5 from a fresh clone, README), then a sample from its checkpoint.
# `make train-dp` is the nanoGPT-sized character model, data parallel over NPROC processes.
train: data
	OMP_NUM_THREADS=1 $(PY) -m nanotrain.torchrun --standalone --nproc-per-node 8 \
		examples/train_4d.py --config configs/deepseek_tiny.toml $(ARGS)
	$(PY) -m nanotrain sample --config configs/deepseek_tiny.toml --prompt "ROMEO:" --max-new-tokens 300

train-dp: data
	OMP_NUM_THREADS=1 $(PY) -m nanotrain.torchrun --standalone --nproc-per-node $(NPROC) \
		-m nanotrain train --config $(CONFIG) --parallel.dp=$(NPROC) $(ARGS)
	$(PY) -m nanotrain sample --config $(CONFIG) --prompt "ROMEO:" --max-new-tokens 300

test: data
	$(PYTEST) $(ARGS)

# Every command that README.md, docs/ and docs/learn/ show, run as pasted in a copy of the checkout
# with .venv activated, and checked against the output the page shows (tests/docs). `make test` runs
# the fast ones (marked `fast` in the page); this runs them all and lists the ten slowest.
test-docs: data
	$(PYTEST) --docs tests/docs --durations=10 $(ARGS)

# The suite as an AVX2-only CPU runs it (no AVX-512, no bf16 units), on any x86 CPU: oneDNN, MKL and
# PyTorch's own kernels are told to use AVX2 at most. Their rounding and speed are then the AVX2
# machine's (a bf16 matmul ~100x slower than fp32), so both kinds of CPU can be tested on one machine.
test-avx2: data
	MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 $(PYTEST) $(ARGS)

bench: setup
	$(PY) bench/overhead.py
	$(PY) bench/nanogpt.py

clean:
	rm -rf runs data/*.nanotrain

# The package as a user installs it (issue 41): a wheel built from this checkout, installed into a
# fresh environment (torch pinned as above), trains the shipped config from an empty folder.
test-wheel: setup
	rm -rf build/wheel-test && mkdir -p build/wheel-test/run
	$(PY) -m pip wheel --quiet --no-deps --wheel-dir build/wheel-test .
	$(PYTHON) -m venv build/wheel-test/venv
	build/wheel-test/venv/bin/python -m pip install --quiet "torch==2.13.0"
	build/wheel-test/venv/bin/python -m pip install --quiet build/wheel-test/nanotrain-*.whl
	cd build/wheel-test/run && ../venv/bin/nanotrain train --config shakespeare_char --train.max_steps=20 \
		--logging.progress=plain


# examples/slurm/train.sbatch under a real Slurm on this machine (issue 41): sets up Slurm if it is not
# running (Debian's slurm-wlm, munge, slurmctld + slurmd for this one node; needs root), trains
# tp=2 x dp=2 for 30 steps under torchrun and again with `sbatch --wait` as two torchrun agents on this
# node, and compares the losses step by step (examples/slurm/check.sh; ARGS: another layout). Not part
# of make test: CI has no Slurm, and the set-up needs root. About a minute on 2 cores once Slurm runs.
test-slurm: data
	PYTHON=$(abspath $(PY)) examples/slurm/check.sh $(ARGS)
