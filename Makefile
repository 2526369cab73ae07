# coil: make demo | make test | make lint | make bench | make build
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTOS := $(wildcard proto/coil/v1/*.proto)

.PHONY: build deps gen gen-check lint breaking test test-unit demo demo-down bench install-cni cni-bundle image image-context clean

build: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

deps:
	scripts/deps.sh

# Regenerate the committed Python stubs from proto/ (see docs/design.md).
gen: $(STAMP)
	scripts/gen.sh

# CI: the committed stubs must match proto/.
gen-check: $(STAMP)
	scripts/gen.sh --check

lint: $(STAMP) gen-check
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy services clients libs
	$(VENV)/bin/lint-imports
	$(VENV)/bin/buf lint
	$(PY) scripts/validate_manifests.py

# The API must not break for clients built against an earlier version:
# `make breaking AGAINST=<git ref of the last release>` (default: the previous commit).
AGAINST ?= HEAD~1
breaking: $(STAMP)
	$(VENV)/bin/buf breaking --against '.git#ref=$(AGAINST)'

test: $(STAMP) deps
	$(VENV)/bin/pytest -q

test-unit: $(STAMP)
	$(VENV)/bin/pytest -q -m "not root"

demo: $(STAMP) deps
	$(PY) -m tests.harness.demo

demo-down: $(STAMP)
	$(PY) -m tests.harness.demo --down

bench: $(STAMP) deps
	$(PY) -m bench.run

# The CNI plugin into /opt/cni/bin (a launcher bound to this venv's interpreter).
install-cni: $(STAMP)
	$(PY) -m coil_cni.install /opt/cni/bin

# The CNI plugin as one relocatable directory (its own CPython, loader and libc), from Debian
# packages: build/cni-bundle/, entry point build/cni-bundle/coil (see docs/cni.md).
cni-bundle:
	python3 scripts/cni_bundle.py build/cni-bundle

# The OCI image localhost/coil:latest, from Debian packages and PyPI wheels only, no registry;
# rebuilt only when its inputs changed (docs/image.md).
image: $(STAMP)
	$(PY) scripts/image.py

# What deploy/image/Containerfile copies in: build/cni-bundle and build/wheelhouse.
image-context: $(STAMP)
	$(PY) scripts/image.py --context-only

clean:
	rm -rf $(VENV) build *.egg-info
