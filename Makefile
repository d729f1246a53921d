# Bento: `make run` starts a server, `make test` passes the tests. Both set up
# whatever is missing first: Debian packages (when root), a .venv, the package.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8765
ARGS ?=
PYTEST_ARGS ?=

.PHONY: run test install system-deps lint bench fuzz clean web

# ARGS come last and replace HOST/PORT when they give --host/--port themselves.
RUN_ADDR := $(if $(filter --host --host=%,$(ARGS)),,--host $(HOST)) $(if $(filter --port --port=%,$(ARGS)),,--port $(PORT))

run: $(STAMP)
	@echo "bento server $(strip $(RUN_ADDR) $(ARGS))"
	@exec $(PY) -m bento.app server $(strip $(RUN_ADDR) $(ARGS))

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory system-deps
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || { \
	  echo "make: cannot create a venv; on Debian: apt-get install python3-venv" >&2; exit 1; }
	@echo "make: installing the package into $(VENV) (log: $(VENV)/install.log)"
	@{ $(PY) -m pip install -q --upgrade pip && $(PY) -m pip install -q -e '.[test,dev]'; } \
	  >$(VENV)/install.log 2>&1 || { cat $(VENV)/install.log >&2; exit 1; }
	@touch $(STAMP)

# Debian packages the project uses, installed only when running as root and missing.
system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; \
	  $(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	  command -v bwrap >/dev/null || missing="$$missing bubblewrap"; \
	  command -v chromium >/dev/null || missing="$$missing chromium"; \
	  if [ -n "$$missing" ]; then \
	    echo "make: installing$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing) >/dev/null \
	      || echo "make: could not install$$missing (continuing)" >&2; \
	  fi; \
	fi

# The web page: bento/web/static/ is built from clients/web/ (npm packages pinned by
# its package-lock.json) and committed, so `make run` needs no Node. Rebuild after
# changing clients/web; tests/web/test_build.py fails until you do.
web:
	cd clients/web && npm ci --no-audit --no-fund && node build.mjs

# Benchmarks print one table (figure, ceiling measured in the same run, ratio,
# target). ARGS=--quick for a one-minute version. Not part of `make test`.
bench: $(STAMP)
	$(PY) bench/run.py $(ARGS)

# The long fuzz run (>= 100,000 cases against the decoder and a live server).
fuzz: $(STAMP)
	$(PY) tests/reliability/fuzz_long.py $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check bento driver sandbox clients tests
	$(VENV)/bin/mypy bento driver/bento_driver sandbox/bento_sandbox clients/bento_clients

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
