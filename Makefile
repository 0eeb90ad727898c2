# Two commands matter: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAY_USAGE_STATS_ENABLED := 0
export TUNE_DISABLE_AUTO_CALLBACK_LOGGERS := 1
export PYTHONUNBUFFERED := 1

.PHONY: venv test demo bench clean help

help:
	@echo "make demo   - install into .venv and run the whole pipeline on synthetic data"
	@echo "make test   - install into .venv and run the test suite"
	@echo "make bench  - run the benchmarks in bench/ (writes bench/results/)"

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

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) runs .cache
