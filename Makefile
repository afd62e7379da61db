# The two commands a new user needs are `make quickstart` and `make test` (see README.md).
# Both create the virtual environment first if it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1

.PHONY: install quickstart test test-fast lint format bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# The CPU wheel first: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

tiny/model/model_index.json: $(VENV)/.installed scripts/make_tiny_sd.py
	$(PY) scripts/make_tiny_sd.py tiny/model

tiny/data/img_000.png: $(VENV)/.installed scripts/make_tiny_dataset.py
	$(PY) scripts/make_tiny_dataset.py tiny/data

quickstart: tiny/model/model_index.json tiny/data/img_000.png
	# A fresh run each time: --overwrite replaces what an earlier quickstart left in output/tiny.
	$(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no \
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

# Our loop against a bare PyTorch loop; and, given DIFFUSERS_SCRIPT=path/to/
# train_text_to_image_lora.py (it needs torchvision and datasets in the venv), against the
# diffusers example script. Results go in BENCHMARKS.md by hand, with the machine named.
bench: $(VENV)/.installed
	$(PY) scripts/bench_overhead.py --json bench_overhead.json
	if [ -n "$(DIFFUSERS_SCRIPT)" ]; then \
		$(PY) scripts/bench_vs_diffusers.py --diffusers-script $(DIFFUSERS_SCRIPT) --json bench_vs_diffusers.json; \
	fi

format: $(VENV)/.installed
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf output tiny .pytest_cache .ruff_cache
