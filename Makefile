# Two commands set up everything on a fresh Debian machine with Python >= 3.10:
#   make demo   creates .venv, installs what the demo needs, runs conf/demo.yaml on a local Ray
#   make test   creates .venv, installs everything (Java for Spark and `mcl` via apt-get too), runs the tests
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: demo test lint sysdeps clean

$(PY):
	$(PYTHON) -m venv $(VENV) || { $(SUDO) apt-get update && $(SUDO) apt-get install -y python3-venv && $(PYTHON) -m venv $(VENV); }
	$(PIP) install -q --upgrade pip

$(VENV)/.demo-deps: pyproject.toml | $(PY)
	$(PIP) install -q -e .
	touch $@

$(VENV)/.test-deps: pyproject.toml | $(PY)
	$(PIP) install -q -e ".[dev,cluster,s3,spark]"
	touch $@ $(VENV)/.demo-deps

demo: $(VENV)/.demo-deps
	$(VENV)/bin/vecgraph run conf/demo.yaml

# Debian packages the tests use: Java for Spark, van Dongen's mcl as the MCL reference.
sysdeps:
	@missing=""; command -v java >/dev/null || missing="$$missing default-jre-headless"; \
	command -v mcl >/dev/null || missing="$$missing mcl"; \
	if [ -n "$$missing" ]; then echo "installing$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; fi

test: sysdeps $(VENV)/.test-deps
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.test-deps
	$(VENV)/bin/ruff check jobs sharding graph clustering tests bench

clean:
	rm -rf $(VENV) runs build *.egg-info
