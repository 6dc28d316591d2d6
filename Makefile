# Hive Flow C — developer entry points. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# uv from PATH, else where install-tools.sh puts it (pip --user).
UV ?= $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
BUF ?= $(CURDIR)/node_modules/.bin/buf
COMPOSE ?= docker compose
PY_SRC := libs/common/src libs/worker/src libs/cli/src libs/testsupport/src services/execution-ticket-service/src services/service-registry/src services/orchestrator-dynamic/src bench
# Tests type-checked with the sources. Each services/*/tests/* tree gets a mypy run of its
# own: no package encloses it (dashes in the service's name), so mypy names its
# conftest.py `conftest`, as it does the root one and every other such tree's.
PY_TESTS := conftest.py tests $(wildcard libs/*/tests)
PY_TESTS_ALONE := $(wildcard services/*/tests/*/)
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: help
help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: install
install: ## Install every tool and dependency (uv, buf, FerretDB, PostgreSQL if absent, the venv)
	bash scripts/install-tools.sh

.PHONY: gen
gen: ## Regenerate the Python stubs from libs/contracts/proto
	BUF=$(BUF) libs/contracts/gen.sh

.PHONY: fmt
fmt: ## Format and auto-fix Python code
	$(UV) run ruff format .
	$(UV) run ruff check --fix .

.PHONY: lint
lint: lint-deploy ## ruff, buf lint, a check that the committed stubs match the protos, lint-deploy
	$(UV) run ruff check .
	$(UV) run ruff format --check .
	cd libs/contracts && $(BUF) lint
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	  BUF=$(BUF) libs/contracts/gen.sh "$$tmp" >/dev/null 2>&1 && \
	  if ! diff -r "$$tmp/src/neuralhive" libs/contracts/src/neuralhive -x __pycache__ >/dev/null; then \
	    echo "Generated stubs are stale: run 'make gen' and commit the result." >&2; \
	    diff -r "$$tmp/src/neuralhive" libs/contracts/src/neuralhive -x __pycache__ | head -20 >&2; exit 1; \
	  else echo "generated stubs up to date"; fi

.PHONY: lint-deploy
lint-deploy: ## Offline checks: docker-compose.yml (compose spec), deploy/k8s (Kubernetes schemas), Dockerfiles
	$(UV) run python scripts/lint_deploy.py

.PHONY: breaking
breaking: ## buf breaking-change check of the protos against the main branch
	cd libs/contracts && $(BUF) breaking --against '$(CURDIR)/.git#branch=main,subdir=libs/contracts'

.PHONY: typecheck
typecheck: ## mypy --strict over our code and its tests (generated stubs excluded)
	$(UV) run mypy $(PY_SRC) $(PY_TESTS)
	@for tree in $(PY_TESTS_ALONE); do echo "$(UV) run mypy $$tree"; $(UV) run mypy $$tree || exit 1; done

.PHONY: test
test: ## Run every test (unit, service, integration) against real databases
	$(UV) run pytest $(PYTEST_ARGS)

.PHONY: test-unit
test-unit: ## Only the fast unit tests (no databases)
	$(UV) run pytest $(PYTEST_ARGS) libs/*/tests/unit services/*/tests/unit

.PHONY: bench
bench: ## Benchmarks against same-run baselines (real services, real databases): Markdown + bench/out/*.json; BENCH_ARGS=--quick for small sizes
	$(UV) run --all-packages python -m bench $(BENCH_ARGS)

.PHONY: dev
dev: ## Run everything without Docker: local PostgreSQL + MongoDB-compatible server, 3 services, 2 workers (Ctrl-C stops)
	$(UV) run --all-packages python scripts/dev-stack.py $(DEV_ARGS)

.PHONY: up
up: compose-check ## Build and start the Docker stack (PostgreSQL, MongoDB, 3 services, 2 workers); waits until healthy
	$(COMPOSE) up -d --build --wait

.PHONY: compose-check
compose-check:
	@$(COMPOSE) version >/dev/null 2>&1 || { echo "make: '$(COMPOSE)' is not available: the Docker stack needs Docker Compose v2 and a Docker engine; 'make dev' runs the same stack as local processes without them" >&2; exit 1; }

.PHONY: down
down: compose-check ## Stop and remove the Docker stack (volumes kept; `docker compose down -v` drops the data)
	$(COMPOSE) down

.PHONY: logs
logs: compose-check ## Follow the Docker stack's logs
	$(COMPOSE) logs --follow --tail=200
