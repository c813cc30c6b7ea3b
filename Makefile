# One command per chore; CI calls the same ones.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: help install demo test test-fast test-peers test-matrix test-matrix-ci dist smoke docs lint bench bench-core bench-celery bench-curves bench-durable soak clean

help:
	@echo "make demo   - set up and run the demo chat site on the embedded broker"
	@echo "make test   - set up and run the whole test suite, then channels_redis's own tests"
	@echo "make test-peers - channels_redis's own tests against our layer (ARGS=... for pytest)"
	@echo "make test-matrix - the suite on every supported Python x Django pair (nox; see noxfile.py)"
	@echo "make dist   - build the sdist and the wheel into dist/"
	@echo "make smoke  - make dist, then install the wheel in a fresh venv and try it outside the checkout"
	@echo "make docs   - build the documentation site from docs/ into site/ (mkdocs --strict: a warning fails)"
	@echo "make bench  - run the benchmarks, then bench-celery and bench-durable (writes benchmarks/results/)"
	@echo "make bench-celery - Celery on our broker, Redis and RabbitMQ, about 2-5 minutes (ARGS=--quick: under a minute)"
	@echo "make bench-durable - confirmed persistent publishes: ours (fsync always/everysec/off), Redis AOF always, RabbitMQ; about 2-3 minutes (ARGS=--quick: under a minute)"
	@echo "make bench-core - micro-benchmarks of the pure broker core, a few seconds (writes benchmarks/results/core-latest.md)"
	@echo "make bench-curves - cost curves against the peers, about 10 minutes (ARGS=--quick: 1 minute; writes benchmarks/results/curves-*)"
	@echo "make soak   - run the long reliability tests"
	@echo "make lint   - ruff and mypy"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) example/run_demo.py

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider
	$(PY) tests/peers/run.py -q

# channels_redis's tests/ from its sdist (cached in .cache/peers/), run against
# ChannelsServerLayer. Offline, it says why it skipped and succeeds.
test-peers: $(STAMP)
	$(PY) tests/peers/run.py $(ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -x -m "not slow"

# Python 3.10-3.13 x Django 4.2/5.2/6.0 (supported pairs only): the whole
# suite on one pair, the fast suite on the others. noxfile.py finds the pyenv
# interpreters by itself. ARGS=... goes to nox (e.g. ARGS="-s fast -R").
test-matrix: $(STAMP)
	$(VENV)/bin/nox $(ARGS)

# What CI runs after make test (which covers the "full" pair).
test-matrix-ci: $(STAMP)
	$(VENV)/bin/nox -s fast $(ARGS)

dist: $(STAMP)
	rm -rf dist
	$(PY) -m build --outdir dist .

smoke: dist
	PYTHON=$(PYTHON) TOOLS=$(PY) .ci/smoke_wheel.sh

# The site from docs/ (pages listed in mkdocs.yml's nav) into site/. Strict:
# a broken link or anchor, or a page missing from nav, fails the build.
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --clean

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks example
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) benchmarks/run.py
	$(PY) benchmarks/celery_bench.py
	$(PY) benchmarks/durable_bench.py

# Celery: dmb:// against the Redis transport and RabbitMQ (started if Debian's
# rabbitmq-server is installed; else the report says why it was left out).
bench-celery: $(STAMP)
	$(PY) benchmarks/celery_bench.py $(ARGS)

# Durable queues (issue 12): confirmed publishes of 1 KB persistent messages,
# 1 then 16 producers, on ours, Redis (appendfsync always) and RabbitMQ.
bench-durable: $(STAMP)
	$(PY) benchmarks/durable_bench.py $(ARGS)

bench-core: $(STAMP)
	$(PY) benchmarks/core.py

bench-curves: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) benchmarks/curves.py $(ARGS)

soak: $(STAMP)
	DMB_SOAK=1 $(PY) -m pytest -q tests/reliability tests/durability -m soak --timeout=3600 -s

clean:
	rm -rf $(VENV) build dist site src/*.egg-info .pytest_cache .cache/peers .nox
