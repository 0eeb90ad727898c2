# Two commands matter: `make demo` and `make test`. Both create .venv on first use.
# After `make demo`, `make serve` serves its latest run again (serve/serve_config.yaml as shipped).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAY_USAGE_STATS_ENABLED := 0
export TUNE_DISABLE_AUTO_CALLBACK_LOGGERS := 1
export PYTHONUNBUFFERED := 1

.PHONY: venv test demo serve bench bench-quick clean help

help:
	@echo "make demo   - install into .venv and run the whole pipeline on synthetic data"
	@echo "make test   - install into .venv and run the test suite"
	@echo "make serve  - serve the latest demo run on http://127.0.0.1:8000 (serve/serve_config.yaml; Ctrl-C stops)"
	@echo "make bench  - rerun the CPU benchmarks behind README's Results (hours on 2 cores; writes bench/results/)"
	@echo "make bench-quick - a minutes-scale smoke run of the cheap benchmarks (writes runs/bench-quick/)"

venv: $(STAMP)

# Reinstall only when the dependency declarations change; reruns are a no-op.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	RAY_DATA_DISABLE_PROGRESS_BARS=1 $(BIN)/python -m pytest -q tests

demo: $(STAMP)
	$(BIN)/dialclip demo

# `serve run` resolves the config's relative paths (runs/demo/latest/{run,index}) against this directory.
serve: $(STAMP)
	@if grep -q 'runs/demo/latest/index' serve/serve_config.yaml && ! test -f runs/demo/latest/index/index.json; then \
	  echo "runs/demo/latest/index does not exist: run 'make demo' first, or point run_dir/index_dir in"; \
	  echo "serve/serve_config.yaml at another run (README: Serving another run)"; exit 1; fi
	$(BIN)/serve run serve/serve_config.yaml

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

bench-quick: $(STAMP)
	$(BIN)/python bench/run_all.py --quick

clean:
	rm -rf $(VENV) runs .cache
