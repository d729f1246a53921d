# Bento: `make run` starts a server, `make test` passes the tests. Both set up
# whatever is missing first: Debian packages (when root), a .venv, the package.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
STAMP := $(VENV)/.installed
NODE_BENCH := bench/node/node_modules/.package-lock.json
JUPYTER_BENCH := bench/jupyter/.venv/.installed
HOST ?= 127.0.0.1
PORT ?= 8765
ARGS ?=
PYTEST_ARGS ?=
# The suite mostly waits on processes it starts: two workers (pytest-xdist) halve
# its time on 2 cores. PYTEST_WORKERS=0 runs it in one process. worksteal: a
# worker that runs out takes tests queued for the other, so both end together.
PYTEST_WORKERS ?= 2

.PHONY: run test install system-deps lint bench fuzz clean cluster web

# ARGS come last and replace HOST/PORT when they give --host/--port themselves.
RUN_ADDR := $(if $(filter --host --host=%,$(ARGS)),,--host $(HOST)) $(if $(filter --port --port=%,$(ARGS)),,--port $(PORT))

run: $(STAMP)
	@echo "bento server $(strip $(RUN_ADDR) $(ARGS))"
	@exec $(PY) -m bento.app server $(strip $(RUN_ADDR) $(ARGS))

test: $(STAMP) $(NODE_BENCH) $(JUPYTER_BENCH)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory system-deps
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || { \
	  echo "make: cannot create a venv; on Debian: apt-get install python3-venv" >&2; exit 1; }
	@echo "make: installing the package into $(VENV) (log: $(VENV)/install.log)"
	@# uv (a dependency of the package: it builds the sessions' environments) installs
	@# several times faster than pip; pip only bootstraps it.
	@{ $(PY) -m pip install -q uv && $(UV) pip install -q --python $(PY) -e '.[test,dev,cluster]'; } \
	  >$(VENV)/install.log 2>&1 || { cat $(VENV)/install.log >&2; exit 1; }
	@touch $(STAMP)

# Debian packages the project uses, installed only when running as root and missing.
system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; \
	  $(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	  command -v bwrap >/dev/null || missing="$$missing bubblewrap"; \
	  command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	  command -v chromium >/dev/null || missing="$$missing chromium"; \
	  if [ -n "$$missing" ]; then \
	    echo "make: installing$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing) >/dev/null \
	      || echo "make: could not install$$missing (continuing)" >&2; \
	  fi; \
	fi

# A local cluster to try: a redis-server without persistence and two nodes (a, b) on
# ports 8801 and 8802, all in the foreground; Ctrl-C stops the three. State in .cluster/.
CLUSTER_REDIS_PORT ?= 6390
cluster: $(STAMP)
	@command -v redis-server >/dev/null || { echo "make cluster: redis-server is missing (apt-get install redis-server)" >&2; exit 1; }
	@mkdir -p .cluster; \
	redis-server --port $(CLUSTER_REDIS_PORT) --bind 127.0.0.1 --save "" --appendonly no \
	  --dir .cluster --logfile redis.log & r=$$!; \
	trap 'kill $$r $$a $$b 2>/dev/null; wait' EXIT INT TERM; \
	for i in $$(seq 50); do redis-cli -p $(CLUSTER_REDIS_PORT) ping >/dev/null 2>&1 && break; sleep 0.1; done; \
	url=redis://127.0.0.1:$(CLUSTER_REDIS_PORT)/0; \
	$(PY) -m bento.app server --port 8801 --data-dir .cluster/a --cluster $$url --node a $(ARGS) & a=$$!; \
	$(PY) -m bento.app server --port 8802 --data-dir .cluster/b --cluster $$url --node b $(ARGS) & b=$$!; \
	sleep 2; \
	echo "make cluster: Redis at $$url; nodes ws://127.0.0.1:8801/v1 (a) and ws://127.0.0.1:8802/v1 (b)"; \
	echo "  run on a:   .venv/bin/bento run --server ws://127.0.0.1:8801/v1 --name NAME FILE.py"; \
	echo "  read on b:  .venv/bin/bento attach --server ws://127.0.0.1:8802/v1 NAME"; \
	echo "  Ctrl-C stops the nodes and Redis (docs/cluster.md)"; \
	wait

# The web page: bento/web/static/ is built from clients/web/ (npm packages pinned by
# its package-lock.json) and committed, so `make run` needs no Node. Rebuild after
# changing clients/web; tests/web/test_build.py fails until you do.
web:
	cd clients/web && npm ci --no-audit --no-fund && node build.mjs

# Benchmarks print one table (figure, ceiling measured in the same run, ratio,
# target). ARGS=--quick for a one-minute version. Not part of `make test`.
bench: $(STAMP) $(NODE_BENCH) $(JUPYTER_BENCH)
	$(PY) bench/run.py $(ARGS)

# The bench's independent client (bench/node: stock ws + cbor-x), installed when
# npm is present; without it the bench's Node rows say why they have no figure.
$(NODE_BENCH): bench/node/package-lock.json
	@if command -v npm >/dev/null; then \
	  npm ci --prefix bench/node --no-audit --no-fund --loglevel=error \
	    || echo "make: npm ci in bench/node failed: the bench's Node client rows will say so" >&2; \
	fi

# The bench's Jupyter ceilings (a warm kernel, and the kernel gateway), in a venv
# of their own; without it (no PyPI) the bench's Jupyter rows say why they have no figure.
$(JUPYTER_BENCH): bench/jupyter/requirements.txt | $(STAMP)
	@{ test -x bench/jupyter/.venv/bin/python || $(PYTHON) -m venv --without-pip bench/jupyter/.venv; } \
	  && $(UV) pip install -q --python bench/jupyter/.venv/bin/python -r bench/jupyter/requirements.txt \
	    >bench/jupyter/install.log 2>&1 \
	  && touch $@ \
	  || echo "make: installing bench/jupyter/requirements.txt failed (bench/jupyter/install.log): the bench's Jupyter rows will say so" >&2

# The long fuzz run (>= 100,000 cases against the decoder and a live server).
fuzz: $(STAMP)
	$(PY) tests/reliability/fuzz_long.py $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check bento driver sandbox clients tests
	$(VENV)/bin/mypy bento driver/bento_driver sandbox/bento_sandbox clients/bento_clients

clean:
	rm -rf $(VENV) bench/jupyter/.venv build *.egg-info .pytest_cache .mypy_cache .ruff_cache
