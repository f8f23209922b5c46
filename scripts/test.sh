#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine or a developer's: installs redis-server when it
# is missing (and apt-get can), makes sure one listens on 127.0.0.1:6379, then runs every gate.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

if ! command -v redis-server >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    log "installing redis-server"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "redis-server is not installed and apt-get cannot install it here; install Redis 7 first" >&2
    exit 1
  fi
fi
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  log "starting redis-server on 127.0.0.1:6379"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --logfile /tmp/shardmeter-redis-6379.log
  for _ in $(seq 50); do redis-cli -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done
fi

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy (all targets, all features, -D warnings)"
cargo clippy --workspace --all-targets --all-features -- -D warnings
# The ledger alone (no tokio, no fred) must build for embedders that want only the core.
cargo clippy --lib --no-default-features -- -D warnings

log "cargo test (unit, integration, fault, doc)"
cargo test --workspace --all-targets --all-features
cargo test --workspace --doc --all-features

log "loom models (LOOM_MAX_PREEMPTIONS=${LOOM_MAX_PREEMPTIONS:=2})"
export LOOM_MAX_PREEMPTIONS
RUSTFLAGS="--cfg shardmeter_loom" CARGO_TARGET_DIR=target/loom \
  cargo clippy -p shardmeter-loom-tests --tests -- -D warnings
# Release for speed, with the ledger's debug assertions kept on.
RUSTFLAGS="--cfg shardmeter_loom" CARGO_TARGET_DIR=target/loom \
  CARGO_PROFILE_RELEASE_DEBUG_ASSERTIONS=true \
  cargo test -p shardmeter-loom-tests --release

log "benches (smoke: cargo bench -- --test)"
cargo bench --workspace --all-features -- --test
