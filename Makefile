# The README's two commands: `make demo` and `make test`. Each sets itself up (idempotent, quick when done).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# one stamp per extra installed: `make demo` needs [sd], `make test` [dev] (everything), `make docs` [docs]
STAMP = $(VENV)/.longtail-$(1)

# torch/torchvision pins: wheels that exist on this project's machines (x86_64: CUDA build, runs on CPU too).
ifeq ($(shell uname -m),aarch64)
TORCH_PINS := torch==2.9.1 torchvision==0.24.1
else
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
endif

.PHONY: install test demo docs lint clean-venv

$(VENV)/.longtail-%: pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[$*]' $(TORCH_PINS)
	@touch $@

install: $(call STAMP,dev)

test: $(call STAMP,dev)
	@bash scripts/sysdeps.sh test
	$(VENV)/bin/ruff check src tests benchmarks scripts
	@$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests (exit 5): check PYTEST_ARGS / tests/" >&2; fi; \
	  exit $$rc

demo: $(call STAMP,sd)
	@bash scripts/sysdeps.sh demo
	$(VENV)/bin/longtail demo --config configs/demo.yaml $(DEMO_ARGS)

# the documentation site (mkdocs.yml, docs/) into build/site/ (or SITE_DIR), any warning an error; browse it with
# `.venv/bin/mkdocs serve`
docs: $(call STAMP,docs)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir $(or $(SITE_DIR),build/site)

lint: $(call STAMP,dev)
	$(VENV)/bin/ruff check src tests benchmarks scripts

clean-venv:
	rm -rf $(VENV)
