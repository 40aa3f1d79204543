# The two commands of the README: `make demo` and `make test`. Each installs what
# it needs first (Debian packages, .venv, the project) via scripts/install-deps.sh.
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: deps demo test lint typecheck pytest bench soak clean

deps:
	bash scripts/install-deps.sh

demo: deps
	$(PY) scripts/demo.py

lint: deps
	$(VENV)/bin/ruff check fetchd stage1 tests benchmarks scripts
	$(VENV)/bin/ruff format --check fetchd stage1 tests benchmarks scripts

typecheck: deps
	$(VENV)/bin/mypy --strict fetchd stage1

pytest: deps
	bash scripts/pytest-backtrace.sh

test: lint typecheck pytest

bench: deps
	$(PY) benchmarks/pull_registry.py

# kill -9 at 20 random moments across pulls from three sources while gc loops (issue 9);
# minutes, so not part of `test`. SOAK_ARGS="--seed N" repeats a run's plan.
soak: deps
	$(PY) tests/soak.py --kills 20 $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
