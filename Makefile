# Everything a fresh machine needs: `make demo` and `make test` build .venv first.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
# The PyTorch pair this project is tested with; timm needs torchvision, and the two must match.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test format

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet $(TORCH)
	$(PYTHON) -m pip install --quiet -e ".[test]"
	touch $@

# Pretrain on the embedded handwritten digits, fine-tune on 5% and 20% of the labels against training from
# scratch, and print the table (outputs/digits).
demo: install
	$(PYTHON) run_sweep.py configs/digits.json

# Write docs/results.md, and the README's results tables, from the result files in docs/results/.
.PHONY: report
report: install
	$(PYTHON) -m selfie_training.report

# Lint and format checks first (ruff, configured in pyproject.toml), then the tests.
test: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m pytest $(PYTEST_ARGS)

# Fix what ruff can: import order, formatting.
format: install
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .
