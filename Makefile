# Sluice: one entry point for building, testing and running locally.
# Persistent caches live outside the clone so a fresh clone rebuilds fast.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

export SLUICE_CACHE ?= $(HOME)/.cache/sluice
export CARGO_TARGET_DIR ?= $(SLUICE_CACHE)/target
export SLUICE_BIN_DIR ?= $(SLUICE_CACHE)/bin
export PATH := $(SLUICE_BIN_DIR):$(PATH)
CARGO ?= cargo

.PHONY: help build tools node-deps lint fmt unit e2e compat test fuzz crds bench bench-build bench-build-musl bench-pooler bench-operator demo images clean-cache

help: ## List targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

build: ## Build the binaries (debug)
	$(CARGO) build --workspace --bins

tools: ## Build and cache etcd, kube-apiserver, kube-controller-manager, kubectl, helm (minutes the first time)
	bash e2e/platform/build-tools.sh

fmt: ## Format the code
	$(CARGO) fmt --all

lint: ## rustfmt check and clippy -D warnings on all targets
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

node-deps: ## Install the Node packages of the @neondatabase/serverless and Prisma tests (npm ci from compat/neon's lockfile, once per lockfile)
	bash compat/neon/setup.sh

unit: tools node-deps ## Unit and integration tests (real PostgreSQL, real Node drivers; the operator and testkit also start a real control plane)
	$(CARGO) test -p sluice-testkit -p sluice-pooler -p sluice-operator

e2e: tools build node-deps ## End-to-end tests against the real control plane and node agent (prints their figures)
	$(CARGO) test -p sluice-e2e -- --test-threads=1 --nocapture

compat: ## asyncpg's own test suite (pinned, fetched from PyPI) directly and through the pooler in both modes (~5 min)
	bash compat/asyncpg/setup.sh
	$(CARGO) test -p sluice-pooler --test compat -- --ignored --nocapture

test: lint unit e2e compat ## Everything CI runs: lint, unit, integration, e2e, driver compatibility

fuzz: ## Differential fuzzing of the pooler against PostgreSQL for SLUICE_FUZZ_SECS (default 3600) seconds
	SLUICE_FUZZ_SECS=$${SLUICE_FUZZ_SECS:-3600} $(CARGO) test -p sluice-pooler --test differential differential_fuzz -- --ignored --nocapture

crds: ## Regenerate the CRD YAML in crds/, config/crd/bases and charts/sluice/crds
	$(CARGO) run -q -p sluice-operator -- crd --write-all .

bench: ## Benchmarks: pooler vs PgBouncer, and the operator at scale; writes docs/benchmarks.md (~14 min once built)
	@start=$$SECONDS; $(MAKE) bench-pooler; $(MAKE) bench-operator; echo "make bench: pooler and operator took $$((SECONDS - start)) s"
	{ echo "# Benchmarks"; echo; echo "Measured by \`make bench\` on $$(date -u +%Y-%m-%d). Ratios compare runs made in the same invocation on the same machine."; echo; \
	  cat "$(SLUICE_CACHE)/bench/pooler.md"; echo; \
	  cat "$(SLUICE_CACHE)/bench/operator.md"; \
	  [[ -f docs/benchmarks-analysis.md ]] && { echo; cat docs/benchmarks-analysis.md; } || true; } > docs/benchmarks.md
	@echo "wrote docs/benchmarks.md"

# One release build for both benchmarks: building the pooler alone would unify features
# differently and rebuild it.
bench-build:
	$(CARGO) build -q --release -p sluice-operator -p sluice-pooler -p sluice-e2e --bin sluice-operator --bin sluice-pooler --bin sluice-bench-operator --bin sluice-bench-http

bench-pooler: bench-build bench-build-musl ## Pooler (glibc and musl builds) vs PgBouncer 1.25 (../shared/anchors or PGBOUNCER=) and 1.18 vs PostgreSQL (pgbench; ~15 min)
	mkdir -p "$(SLUICE_CACHE)/bench"
	SLUICE_POOLER="$(CARGO_TARGET_DIR)/release/sluice-pooler" \
	  SLUICE_POOLER_MUSL="$(CARGO_TARGET_DIR)/$(MUSL_TARGET)/release/sluice-pooler" \
	  bash e2e/bench/pooler.sh "$(SLUICE_CACHE)/bench/pooler.md"

# The static pooler the container image runs (`make images`), measured next to the glibc one.
MUSL_TARGET := x86_64-unknown-linux-musl
bench-build-musl:
	command -v musl-gcc >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq musl-tools >/dev/null
	rustup target list --installed | grep -qx $(MUSL_TARGET) || rustup target add $(MUSL_TARGET)
	$(CARGO) build -q --release --target $(MUSL_TARGET) -p sluice-pooler --bin sluice-pooler

bench-operator: tools bench-build ## 200 ConnectionPools on the real control plane (~4 min)
	mkdir -p "$(SLUICE_CACHE)/bench"
	"$(CARGO_TARGET_DIR)/release/sluice-bench-operator" "$(SLUICE_CACHE)/bench/operator.md"

demo: tools build ## Run Sluice locally: PostgreSQL, control plane, node agent, operator, a sample pool (Ctrl-C stops)
	@[[ $$(id -u) == 0 ]] || { echo "make demo needs root: pods get their own network namespaces" >&2; exit 1; }
	"$(CARGO_TARGET_DIR)/debug/sluice-demo"

images: ## Container images without a Docker engine: static musl binaries + umoci OCI layouts in ~/.cache/sluice/images
	e2e/platform/oci-images.sh "$(SLUICE_CACHE)/images"

clean-cache: ## Remove the Rust target dir (keeps the Go tool cache)
	rm -rf "$(CARGO_TARGET_DIR)"
