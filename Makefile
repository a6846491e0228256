# The README's two commands: `make demo` and `make test`. Each sets itself up (idempotent, quick when done).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.longtail-installed

# torch/torchvision pins: wheels that exist on this project's machines (x86_64: CUDA build, runs on CPU too).
ifeq ($(shell uname -m),aarch64)
TORCH_PINS := torch==2.9.1 torchvision==0.24.1
else
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
endif

.PHONY: install test demo lint clean-venv

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_PINS)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]' $(TORCH_PINS)
	@touch $(STAMP)

install: $(STAMP)

test: install
	@bash scripts/sysdeps.sh test
	$(VENV)/bin/ruff check src tests benchmarks scripts
	@$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests (exit 5): check PYTEST_ARGS / tests/" >&2; fi; \
	  exit $$rc

demo: install
	@bash scripts/sysdeps.sh demo
	$(VENV)/bin/longtail demo --config configs/demo.yaml $(DEMO_ARGS)

lint: install
	$(VENV)/bin/ruff check src tests benchmarks scripts

clean-venv:
	rm -rf $(VENV)
