# Commands for a fresh machine: `make demo`, `make test` and `make docs`.
# Each creates .venv if it is missing. torch is pinned here to the CPU build that
# these machines carry; pyproject.toml states the range users need.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0

.PHONY: demo test lint docs bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# the docs extra (Sphinx and its extensions) on top of the dev install
$(VENV)/.installed-docs: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[dev,docs]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/moekit demo --out demo_output

test: $(VENV)/.installed
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests bench examples
	$(VENV)/bin/ruff format --check src tests bench examples

# offline (nothing is fetched), warnings are errors; the gallery runs examples/
docs: $(VENV)/.installed-docs
	$(VENV)/bin/sphinx-build -W --keep-going -b html docs docs/_build/html
	@echo "open docs/_build/html/index.html"

clean:
	rm -rf $(VENV) demo_output .pytest_cache docs/_build docs/generated docs/auto_examples
