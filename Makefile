# The two commands of the README: `make demo` (the main job) and `make test` (every test).
# Both create the virtual environment in .venv and install what they need first.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: demo run test lint bench clean mutation

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

## the simulator and the bridge side by side (Ctrl-C stops both)
demo: $(STAMP)
	demo/run

## the daemon in the foreground (make run CONFIG=my.toml); the example configuration's
## placeholder secrets are refused: copy it, set real ones, and pass it as CONFIG
CONFIG ?= config.example.toml
run: $(STAMP)
	$(BIN)/tcbridge run --config $(CONFIG)

## ruff, mypy (strict) and the whole test suite
test: $(STAMP) lint
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check tcbridge tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache

## the benchmark suite of issue 6 (about 10 minutes): a table of ratios against baselines
## measured in the same run, written into bench/README.md
.PHONY: bench-smoke bench-long
bench: $(STAMP)
	@sh bench/ensure_wrk.sh
	@$(BIN)/python -m pip install --quiet py-spy || echo "bench: py-spy not installed: no profile"
	$(BIN)/python -m bench --profile --write-readme

## every benchmark for a second or two with tiny sizes, no speed asserted (CI runs it)
bench-smoke: $(STAMP)
	@sh bench/ensure_wrk.sh
	$(BIN)/python -m bench --smoke
	$(BIN)/python -m bench.long --smoke

## a million webhooks through the daemon (not in CI; 6-18 minutes here): ingest rate, RSS and
## CPU in the first and the last 10 % of the events; `make bench-long EVENTS=100000` for less
EVENTS ?= 1000000
bench-long: $(STAMP)
	@sh bench/ensure_wrk.sh
	$(BIN)/python -m bench.long --events $(EVENTS)

## mutation testing (mutmut 3) of the core modules with the in-process tests, one module
## at a time: `make mutation MUTATE=poller`; results in mutants/, `mutmut browse` to read
MUTATE ?= envelope poller store.sqlite store.rules dispatch files filewriter
MUTATION_CHILDREN ?= 1
mutation: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,mutation]'
	@for module in $(MUTATE); do \
		$(BIN)/mutmut run --max-children $(MUTATION_CHILDREN) "tcbridge.$$module.*" || exit 1; \
	done
	$(BIN)/mutmut results
