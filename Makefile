# Two commands on a fresh machine:  `make serve` (set up + start)  and  `make test` (set up + run the tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# This machine only, unless HOST says otherwise (HOST=0.0.0.0: every interface; then set API_KEY too).
HOST ?= 127.0.0.1
PORT ?= 8000
DEMO_DIR ?= models/demo-tiny-random
# Connection limits (serve_ocr.uvicorn_options says why; the Dockerfile's CMD passes the same).
UVICORN_LIMITS = --http h11 --h11-max-incomplete-event-size 65536 --limit-concurrency $${LIMIT_CONCURRENCY:-2000} --timeout-keep-alive 5

.PHONY: setup setup-dev serve test lint fuzz demo-model clean test-ocr client

$(VENV)/.setup: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: a CPU build when none is there; requirements.txt then accepts it as it is.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.setup-dev: $(VENV)/.setup requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

setup: $(VENV)/.setup
setup-dev: $(VENV)/.setup-dev

$(DEMO_DIR)/config.json: | setup
	$(PY) deepseek_ocr.py make-tiny $(DEMO_DIR) --seed 0

demo-model: $(DEMO_DIR)/config.json

# With MODEL_PATH (or MODELS) set, serve those weights; without, serve the tiny random-weights demo checkpoint.
serve: setup
	@if [ -z "$$MODEL_PATH$$MODELS" ]; then \
	  $(MAKE) --no-print-directory demo-model; \
	  echo "MODEL_PATH is not set: serving the RANDOM-WEIGHTS DEMO checkpoint $(DEMO_DIR); its text is meaningless."; \
	  export MODEL_PATH=$(DEMO_DIR) DEFAULT_MAX_TOKENS=$${DEFAULT_MAX_TOKENS:-64}; \
	fi; \
	MALLOC_ARENA_MAX=$${MALLOC_ARENA_MAX:-2} exec $(VENV)/bin/uvicorn serve_ocr:app --host $(HOST) --port $(PORT) $(UVICORN_LIMITS)

# The seed's test program and the client CLI, from the venv (no need to activate it), against URL.
URL ?= http://localhost:$(PORT)
test-ocr: setup
	$(PY) test_ocr.py --url $(URL) $(ARGS)

client: setup
	$(PY) -m ocr_client --url $(URL) $(ARGS)

# Lint: ruff, and deptry: every package the product imports is named in requirements.txt itself (.ci/deptry.toml).
lint: setup-dev
	$(PY) -m ruff check .
	$(PY) -m deptry . --config .ci/deptry.toml

# The suite in TEST_WORKERS processes (pytest-xdist), a test file to a process: its module fixtures (servers,
# clusters) start once, as in one process. Most tests wait on servers they started: on 2 cores, 3 workers take
# ~13 minutes (741-804 s in CI; the cores busy throughout), 2 took ~17 and one ~25. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 3
test: lint
	# -rfEs: failures, errors and every skip listed with its reason
	$(PY) -m pytest -q -rfEs --durations=25 -n $(TEST_WORKERS) --dist loadfile

fuzz: setup-dev
	$(PY) -m pytest -q tests/test_fuzz.py

clean:
	rm -rf $(VENV) $(DEMO_DIR)
