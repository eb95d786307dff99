# modelgate: the two commands first, then the rest.
#
#   make demo   set up everything on first use, run the demo (stack started by it)
#   make test   set up everything on first use, run the test suite
#
# Each target installs what it needs and is quick the second time: the venv from
# requirements.lock (infra/bootstrap.sh), the Kafka jars and redis-server
# (infra/kafka/kafka.sh install, infra/redis.sh install). Kafka and Redis are started
# and stopped by the commands themselves, through gateway.stack.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV := .venv
BIN := $(VENV)/bin
# Extra arguments for pytest, e.g. make test PYTEST_ARGS="-k stack -x".
PYTEST_ARGS ?=

.PHONY: help demo test lint fmt up down status monitor bootstrap services kernels lock clean

help:
	@echo "make demo     run the demo (installs and starts what it needs)"
	@echo "make test     run the test suite (installs and starts what it needs)"
	@echo "make lint     ruff check, ruff format --check, mypy --strict"
	@echo "make fmt      ruff format + ruff check --fix"
	@echo "make up       start Kafka and Redis and keep them running"
	@echo "make down     drop the 'up' hold; they stop when nothing else holds them"
	@echo "make status   holders and services"
	@echo "make monitor  start Prometheus (127.0.0.1:19090) with modelgate's alert rules"
	@echo "              and Alertmanager (127.0.0.1:19095) receiving them"
	@echo "make lock     regenerate requirements.lock from pyproject.toml"
	@echo "make clean    remove var/ (jars, data, logs) and caches; keeps .venv"

bootstrap:
	@infra/bootstrap.sh

# Fetch the Kafka jars and install redis-server ahead of time, so the first test run
# does not spend its per-test timeout on downloads inside the pytest fixture. The
# MLServer venv (remote-backend tests) likewise; it needs uv from bootstrap. Debian's
# prometheus brings promtool, which checks the alert rules and the dashboard;
# prometheus-alertmanager brings amtool, which checks its configuration.
services:
	@infra/kafka/kafka.sh install
	@infra/redis.sh install
	@infra/mlserver/mlserver.sh install
	@infra/prometheus.sh install
	@infra/alertmanager.sh install

demo: bootstrap services kernels
	$(BIN)/modelgate demo

# The recipe's exit status is pytest's, so `make test` fails exactly when pytest
# does (including exit 5, no tests collected).
test: bootstrap services kernels
	$(BIN)/pytest $(PYTEST_ARGS)

# Compile the detectors' numba kernels once, before workers start (each would
# otherwise compile them in its first batches); seconds when already cached.
kernels: bootstrap
	@$(BIN)/python -m detectors.warm

# All three run even if one fails, so one CI pass shows every problem.
lint: bootstrap
	@rc=0; \
	echo "ruff check"; $(BIN)/ruff check . || rc=1; \
	echo "ruff format --check"; $(BIN)/ruff format --check . || rc=1; \
	echo "mypy --strict"; $(BIN)/mypy || rc=1; \
	exit $$rc

fmt: bootstrap
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

up: services
	@infra/stack.sh up

down:
	@infra/stack.sh down

status:
	@infra/stack.sh status

# Scrapes the metrics listeners the settings (MODELGATE_CONFIG) give each process
# and sends firing alerts to the Alertmanager started first; infra/prometheus.sh
# stop and infra/alertmanager.sh stop end them (docs/monitoring.md).
monitor: bootstrap
	@infra/alertmanager.sh start
	@infra/prometheus.sh start

lock:
	@infra/bootstrap.sh lock

# Refuses while this checkout's Kafka or Redis runs: deleting var/ under them would
# pull the data directory out from under a live broker.
clean:
	@infra/stack.sh down
	@infra/prometheus.sh stop
	@infra/alertmanager.sh stop
	@if infra/kafka/kafka.sh status >/dev/null || infra/redis.sh status >/dev/null; then \
		echo "services from this checkout are still held by someone:"; \
		infra/stack.sh status; \
		echo "release them (or 'infra/stack.sh reset') before make clean"; \
		exit 1; \
	fi
	rm -rf var .mypy_cache .ruff_cache .pytest_cache report build *.egg-info
	find . -path ./.venv -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
