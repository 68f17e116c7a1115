# The README's two commands. Each does its own set-up, so both work on a fresh clone.
#   make run    install into .venv and run the control loop on the simulated pack
#   make test   install what the tests need and run lint, import contracts and tests

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
ARGS   ?=

.PHONY: run test lint mutation clean

run: $(VENV)/.installed-run
	$(BIN)/bms sim --config config/sim.toml $(ARGS)

test: $(VENV)/.installed-test
	$(MAKE) --no-print-directory lint
	$(BIN)/python -m pytest -q --cov --cov-report=term
	$(BIN)/python -m pytest -q hil --rig=virtual

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

# Mutation testing of bms/protection (not part of `make test`: it takes a minute or two).
mutation: $(VENV)/.installed-test
	$(BIN)/python -m pip install -q mutmut
	rm -rf mutants
	$(BIN)/mutmut run --max-children 2
	$(BIN)/mutmut results

# Debian's system Python ships venv without ensurepip: install python3-venv when we may.
$(BIN)/python:
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  rm -rf $(VENV); \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "python venv is missing; installing python3-venv"; \
	    apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null && \
	    $(PYTHON) -m venv $(VENV); \
	  else \
	    echo "error: '$(PYTHON) -m venv' failed; install python3-venv (sudo apt-get install python3-venv)"; \
	    exit 1; \
	  fi; }
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python $(VENV)/.system-tools
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed-run

# Tools the tests call (the installer's shellcheck, the unit's systemd-analyze); installed with
# apt when we may, else named. The qemu guest's own packages are set up by tests/kernel/setup.sh.
SYSTEM_TOOLS := shellcheck:shellcheck systemd-analyze:systemd
$(VENV)/.system-tools: | $(BIN)/python
	@missing=""; for pair in $(SYSTEM_TOOLS); do \
	  command -v $${pair%%:*} >/dev/null || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing$$missing"; \
	    apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else \
	    echo "error: the tests need$$missing (sudo apt-get install$$missing)"; exit 1; \
	  fi; \
	fi
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info mutants
