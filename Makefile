# Everything a fresh machine needs: `make demo` and `make test` build .venv first.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
# The PyTorch pair this project is tested with; timm needs torchvision, and the two must match.
TORCH := torch==2.14.1 torchvision==0.29.1
LOCK := requirements-lock.txt

.PHONY: install lock demo test format

install: $(VENV)/.installed

# The exact versions of requirements-lock.txt, then this package itself without resolving anything again: every
# machine gets the environment that produced the README's figures.
$(VENV)/.installed: $(LOCK) setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --requirement $(LOCK)
	$(PYTHON) -m pip install --quiet --no-deps --editable .
	touch $@

# Refresh requirements-lock.txt: resolve setup.cfg's ranges (with the test extra) and the PyTorch pair to the newest
# releases that satisfy them (pip-tools, in a throwaway environment). Rerun `make demo` and the tests after it.
lock:
	python3 -m venv $(VENV)-lock
	$(VENV)-lock/bin/python -m pip install --quiet pip-tools
	CUSTOM_COMPILE_COMMAND="make lock" $(VENV)-lock/bin/pip-compile --quiet --upgrade --extra test --strip-extras \
		--allow-unsafe --no-emit-index-url --no-emit-find-links \
		$(foreach package,$(TORCH),--upgrade-package "$(package)") --output-file $(LOCK) setup.cfg
	rm -rf $(VENV)-lock

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
