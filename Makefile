# The two commands a new user needs are `make quickstart` and `make test` (see README.md).
# Both create the virtual environment first if it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1

# The exact versions the tests ran (requirements/README.md). Every install goes through a lock:
# `pip install -c LOCK -e ".[dev]"`. The CPU lock pins PyTorch's CPU build, which pip finds on
# PyTorch's CPU index, or in the find-links this machine's pip is configured with.
LOCK ?= requirements/cpu.lock
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
# pip's configured find-links (this machine's own copy of the CPU build), else PyTorch's index.
FIND_LINKS := $(strip $(shell python3 -m pip config list 2>/dev/null | sed -n "s/.*find-links='\(.*\)'/\1/p" | head -n 1))
PIP_TORCH := $(if $(FIND_LINKS),,--extra-index-url $(TORCH_CPU_INDEX))

.PHONY: install quickstart test test-fast test-latest test-floors lock lint format bench gpu-wheels clean

$(VENV)/.installed: pyproject.toml $(LOCK)
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet $(PIP_TORCH) -c $(LOCK) -e ".[dev]"
	touch $@

install: $(VENV)/.installed

tiny/model/model_index.json: $(VENV)/.installed scripts/make_tiny_sd.py
	$(PY) scripts/make_tiny_sd.py tiny/model

tiny/data/img_000.png: $(VENV)/.installed scripts/make_tiny_dataset.py
	$(PY) scripts/make_tiny_dataset.py tiny/data

quickstart: tiny/model/model_index.json tiny/data/img_000.png
	# A fresh run each time: --overwrite replaces what an earlier quickstart left in output/tiny.
	# `sdlora launch` is `accelerate launch` without accelerate's traceback after a failed run.
	$(VENV)/bin/sdlora launch --num_processes 1 --num_machines 1 --mixed_precision no \
		--dynamo_backend no --num_cpu_threads_per_process 2 \
		train.py --config configs/tiny.toml --overwrite

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

# Everything but the subprocess and end-to-end tests (marked slow): a quick check while
# working. `make test` is what CI runs.
test-fast: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -m "not slow and not heavy"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Regenerate both locks from pyproject.toml with the newest releases its ranges allow, then run
# `make test` and commit (README: Development).
# LOCK_UPGRADE= (empty) keeps every locked version that still fits and only adds what is new.
LOCK_UPGRADE ?= --upgrade
UV_LOCK := $(VENV)/bin/uv pip compile pyproject.toml --all-extras $(LOCK_UPGRADE) --quiet \
	--python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock"
# uv comes with the dev extra; a checkout whose lock is missing or broken gets it on its own.
$(VENV)/bin/uv:
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet $(if $(wildcard $(LOCK)),-c $(LOCK)) uv
lock: $(VENV)/bin/uv
	$(UV_LOCK) --python-version 3.11 -c requirements/torch-cpu.txt \
		$(if $(FIND_LINKS),--find-links $(FIND_LINKS),--index $(TORCH_CPU_INDEX)) \
		--index-strategy unsafe-best-match -o requirements/cpu.lock
	$(UV_LOCK) --python-version 3.12 -o requirements/cuda.lock

# Drift, reported rather than suffered: a throwaway venv with the newest release of every
# dependency (torch held at the lock's CPU build: PyPI's newer ones are multi-GB CUDA builds),
# the fast suite, and which packages moved relative to the lock. Exits non-zero if tests fail.
test-latest: $(VENV)/.installed
	$(PY) scripts/deps_check.py latest --lock $(LOCK)

# The lowest version each range in pyproject.toml allows, and the fast suite on them.
test-floors: $(VENV)/.installed
	$(PY) scripts/deps_check.py floors --lock $(LOCK) --uv $(VENV)/bin/uv

# Our loop against a bare PyTorch loop; and, given DIFFUSERS_SCRIPT=path/to/
# train_text_to_image_lora.py (it needs torchvision and datasets in the venv), against the
# diffusers example script. Results go in BENCHMARKS.md by hand, with the machine named.
bench: $(VENV)/.installed
	$(PY) scripts/bench_overhead.py --json bench_overhead.json
	if [ -n "$(DIFFUSERS_SCRIPT)" ]; then \
		$(PY) scripts/bench_vs_diffusers.py --diffusers-script $(DIFFUSERS_SCRIPT) --json bench_vs_diffusers.json; \
	fi

# The wheels scripts/gpu_check.sh installs on a GPU machine that reaches no registry (docs/gpu.md):
# the lock's versions of what that machine's image lacks, for Python 3.12 manylinux x86-64,
# into the ignored .whl/. DIFFUSERS_SCRIPT=path/to/train_text_to_image_lora.py carries the
# diffusers script too. Needs only python3 with pip, and PyPI.
gpu-wheels:
	python3 scripts/gpu_wheels.py $(if $(DIFFUSERS_SCRIPT),--diffusers-script $(DIFFUSERS_SCRIPT))

format: $(VENV)/.installed
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf output tiny .pytest_cache .ruff_cache .venv-latest .venv-floors
