# Everything a fresh machine needs: `make test` builds .venv and runs the test suite.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
# The PyTorch pair this project is tested with; timm needs torchvision, and the two must match.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: install test

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet $(TORCH)
	$(PYTHON) -m pip install --quiet -e ".[test]"
	touch $@

test: install
	$(PYTHON) -m pytest $(PYTEST_ARGS)
