# segmentd — the two quick-start commands are `make demo` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
BIN := $(or $(CARGO_TARGET_DIR),target)/release/segmentd
EXAMPLE := out/example

# ccache serves rebuilds of the bundled C/C++ libraries (RocksDB, librdkafka) from cache.
# - CC and CXX are expanded when a recipe runs, not when make reads this file: on a fresh
#   machine `deps` installs ccache first, and every build after it must see the same
#   compiler, or cargo rebuilds the C/C++ libraries when CC changes.
# - CCACHE_BASEDIR=/ makes paths relative, so the copies built for the dev profile (make
#   test) and the release profile (make demo), in different OUT_DIRs, share cache entries.
export CCACHE_DIR ?= $(HOME)/.cache/segmentd-ccache
export CCACHE_BASEDIR ?= /
export CC = $(if $(shell command -v ccache 2>/dev/null),ccache gcc,gcc)
export CXX = $(if $(shell command -v ccache 2>/dev/null),ccache g++,g++)

.PHONY: deps build demo batch-demo test chaos lint bench bench-batch bench-stream bench-audiences bench-peer clean

# make demo runs until Ctrl-C; DURATION=60 stops it after a minute.
DURATION ?=
DEMO_FLAGS := $(if $(DURATION),--duration $(DURATION),)

deps:
	@./scripts/install-deps.sh

build: deps
	$(CARGO) build --release

# The main job: the streaming daemon on its embedded (in-process) Kafka cluster, fed a
# generated shop's live events, with a live view.
demo: build
	$(BIN) demo $(DEMO_FLAGS)

# The batch half, on a bundled (seeded, generated) example shop: generate, discover, assign,
# validate. The verdict comes last, so its exit code (1 on FAIL) is the target's.
batch-demo: build
	$(BIN) generate --customers 20000 --order-lines 250000 --seed 42 --out-dir $(EXAMPLE)
	$(BIN) discover --orders $(EXAMPLE)/orders.csv --returns $(EXAMPLE)/returns.csv \
	  --support $(EXAMPLE)/support.csv --engagement $(EXAMPLE)/engagement.csv \
	  --out $(EXAMPLE)/snapshot.json
	$(BIN) assign --snapshot $(EXAMPLE)/snapshot.json --orders $(EXAMPLE)/orders.csv \
	  --returns $(EXAMPLE)/returns.csv --support $(EXAMPLE)/support.csv \
	  --engagement $(EXAMPLE)/engagement.csv --out $(EXAMPLE)/memberships.csv
	@echo "first rows of $(EXAMPLE)/memberships.csv:" && head -3 $(EXAMPLE)/memberships.csv | cut -c1-300
	$(BIN) validate --snapshot $(EXAMPLE)/snapshot.json --orders $(EXAMPLE)/orders.csv \
	  --returns $(EXAMPLE)/returns.csv --support $(EXAMPLE)/support.csv \
	  --engagement $(EXAMPLE)/engagement.csv

test: deps
	$(CARGO) test --all-targets

# The kill -9 harness: segmentd broker in its own process, a daemon SIGKILLed KILLS times,
# compared with a clean run. Prints the verdict (exit 1 on DIFFERENT).
KILLS ?= 50
chaos: build
	$(BIN) chaos --kills $(KILLS)

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

# Criterion benches: feature update, assignment, k-means, silhouette.
bench: deps
	$(CARGO) bench

# End-to-end batch figures on 93,565 customers and 1,000,000 order lines.
bench-batch: build
	./scripts/bench-batch.sh

# segmentd audiences over 5,000,000 scores across 1,000 products.
bench-audiences: build
	./scripts/bench-audiences.sh

# Streaming figures: passthrough ceiling, daemon throughput, latency at 20k events/s, and a
# daemon process over a million customers in state.
bench-stream: build
	$(BIN) bench --events 300000 --customers 20000 --latency-seconds 5 --state-customers 1000000

# segmentd beside a minimal Quix Streams job on one tansu broker (needs tansu and
# benches/peers/requirements.txt; not part of test or CI).
bench-peer: build
	./benches/peers/run.sh

clean:
	rm -rf out
