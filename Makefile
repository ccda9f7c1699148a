# clmerge developer tasks. `make test` is what CI runs (.ci/run).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Nothing is downloaded at run time: open_clip must not reach for the hub.
export HF_HUB_OFFLINE := 1

.PHONY: venv test test-slow demo clean

venv: $(STAMP)

# Reinstalls only when the package metadata or the pins change; reruns are instant.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

test: venv
	$(BIN)/python -m pytest

test-slow: venv
	$(BIN)/python -m pytest -m slow

demo: venv
	$(BIN)/clmerge run

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
