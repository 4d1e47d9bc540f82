# matdisc: `make demo` and `make test` each do all set-up on a fresh machine, idempotently.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU wheel on disk; a GPU machine overrides this (e.g. TORCH_SPEC="torch==2.14.1").
TORCH_SPEC ?= torch==2.13.0
# docker-compose: the tests validate deploy/docker-compose.yml with it (no engine needed)
APT_PKGS := libxc-dev libopenblas-dev libfftw3-dev g++ docker-compose
STAMP := $(VENV)/.installed

.PHONY: install sysdeps demo test docs bench clean

sysdeps:
	@if command -v dpkg >/dev/null 2>&1; then \
	  missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then \
	    echo "installing Debian packages (GPAW build, compose validation):$$missing"; \
	    SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	  fi; \
	fi

$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory sysdeps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	CC=g++ $(PY) -m pip install -q -e ".[dev]"
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
