# Everything a fresh machine with Python 3.11+, pip and make needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: install system-deps bench-deps test lint typecheck pytest demo bench bench-transfer clean

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

# The peers of the benchmark: OpenSSH (a throwaway sshd on 127.0.0.1), socat,
# asyncssh and paramiko.
BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): pyproject.toml | $(STAMP)
	$(BIN)/pip install -q -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench-deps: $(BENCH_STAMP)
	@command -v sshd >/dev/null 2>&1 || test -x /usr/sbin/sshd && command -v socat >/dev/null 2>&1 || { \
		echo "installing openssh-server and socat for the benchmark peers"; \
		apt-get update -qq && apt-get install -y -qq openssh-server openssh-client socat >/dev/null; }

# Every row of bench/README.md's table; `make bench ARGS="--only exec"` for one section.
bench: install bench-deps
	$(BIN)/python -m compileall -q src/tether
	$(BIN)/python bench/run.py $(ARGS)

bench-transfer: install
	$(BIN)/python bench/bench_transfer.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
