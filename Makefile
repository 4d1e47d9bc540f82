# matdisc: `make demo` and `make test` each do all set-up on a fresh machine, idempotently.
# Python 3.12 or newer (torch-sim 0.6): PYTHON=/path/to/python, else the first of these that runs
# (pyenv's shims exist on PATH for versions that are not active, and fail when run).
PYTHON ?= $(shell for p in python3.12 $(HOME)/.pyenv/versions/3.12*/bin/python3.12 python3.13 \
  $(HOME)/.pyenv/versions/3.1[3-9]*/bin/python3 python3; do \
  $$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1 && { command -v $$p; break; }; done)
VENV := .venv
PY := $(VENV)/bin/python
# PyPI's wheel: a CUDA build that runs on the CPU too (about 3 GB with its CUDA libraries)
TORCH_SPEC ?= torch==2.14.1
# docker-compose: the tests validate deploy/docker-compose.yml with it (no engine needed); chromium:
# the tests read the Prefect UI's pages in it, headless
APT_PKGS := libxc-dev libopenblas-dev libfftw3-dev g++ docker-compose chromium
STAMP := $(VENV)/.installed
# the extras installed: dev (tests, docs, lint) and gpaw (the default reference calculator);
# `make install GPU=1` adds gpu (dask-cuda, cuEquivariance for the CUDA major of TORCH_SPEC's wheel)
comma := ,
EXTRAS := dev,gpaw$(if $(GPU),$(comma)gpu)

.PHONY: install sysdeps demo test docs bench clean

sysdeps:
	@if command -v dpkg >/dev/null 2>&1; then \
	  missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then \
	    echo "installing Debian packages (GPAW build, compose validation, headless browser):$$missing"; \
	    SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	  fi; \
	fi

$(STAMP): pyproject.toml
	@[ -n "$(PYTHON)" ] || { echo "matdisc needs Python 3.12 or newer and found none (python3.12 on PATH," \
	  "or in ~/.pyenv/versions): install one, or give its path as PYTHON=/path/to/python3.12" >&2; exit 2; }
	@$(MAKE) --no-print-directory sysdeps
	@# a venv of an older Python (made before matdisc needed 3.12) is made again
	@$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null || { rm -rf $(VENV); \
	  echo "creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	CC=g++ $(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(VENV)/bin/matdisc run examples/quickstart.yaml

test: install
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(PY) -m pytest -q -n 2 --dist loadgroup --durations=30

docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict
	@echo "documentation: site/index.html"

bench: install
	$(PY) benchmarks/store.py
	$(PY) benchmarks/generate.py
	$(PY) benchmarks/relax.py
	OMP_NUM_THREADS=1 $(PY) benchmarks/dft_validation.py
	OMP_NUM_THREADS=1 $(PY) benchmarks/discovery.py

clean:
	rm -rf $(VENV) runs site .pytest_cache
