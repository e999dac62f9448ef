# `make train` and `make test` create .venv and install everything on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision pinned to the releases our machines install from local disk (the pyproject ranges admit others)
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: train test install bench docs docs-serve clean-venv

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PINS)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

# Train on the embedded synthetic imbalanced dataset. Extra Hydra overrides: make train ARGS="loss=focal loss.gamma=2"
train: install
	$(BIN)/python -m train_seg $(ARGS)

# The whole test suite (unit, end-to-end CLI and sweep tests). Extra pytest args: make test ARGS="-k losses".
# TEST_WORKERS pytest-xdist processes (one per core by default), each file on one worker (module fixtures once).
TEST_WORKERS ?= auto
test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(ARGS)

# The documentation site (mkdocs.yml, docs/) into site/; --strict: a broken link or anchor, a page outside the
# navigation or an API object that does not exist fails the build. docs-serve: http://127.0.0.1:8000, live reload.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

docs-serve: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --dev-addr 127.0.0.1:8000

bench: install
	$(BIN)/python scripts/bench_losses.py

clean-venv:
	rm -rf $(VENV)
