# Everything a fresh machine with Python 3.11+, pip and make needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: install system-deps test lint typecheck pytest demo bench bench-transfer clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: install
	$(BIN)/mypy --strict src

# Tools the tests drive as a user would (tmux for terminal progress bars).
system-deps:
	@command -v tmux >/dev/null 2>&1 || { \
		echo "installing tmux for the terminal tests"; \
		apt-get update -qq && apt-get install -y -qq tmux >/dev/null; }

pytest: install system-deps
	$(BIN)/pytest

test: lint typecheck pytest

demo: install
	PATH="$(CURDIR)/$(BIN):$$PATH" bash bench/demo.sh

bench: install
	$(BIN)/python bench/bench_requests.py

bench-transfer: install
	$(BIN)/python bench/bench_transfer.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
