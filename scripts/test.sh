#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine or a developer's: installs redis-server when it
# is missing (and apt-get can), makes sure one listens on 127.0.0.1:6379, then runs every gate.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"

log() { printf '\n==> %s\n' "$*"; }

# Each stage's wall time, printed at the end.
timings=""
stage_start=$SECONDS
stage_name=""
stage() {
  if [[ -n "$stage_name" ]]; then
    timings+="$(printf '%6ss  %s' $((SECONDS - stage_start)) "$stage_name")"$'\n'
  fi
  stage_name="$1"
  stage_start=$SECONDS
  log "$1"
}

# Makes sure a rustup toolchain is there, installing it (with the given components) if rustup
# can; returns 1, without failing the run, where it cannot. `ready` is the command that shows it
# is usable (for nightly: that cargo-miri runs).
toolchain() {
  local name="$1" components="$2" ready="$3"
  eval "$ready" >/dev/null 2>&1 && return 0
  command -v rustup >/dev/null 2>&1 || return 1
  local args=(toolchain install "$name" --profile minimal)
  [[ -n "$components" ]] && args+=(--component "$components")
  echo "installing the $name toolchain with rustup (log: /tmp/shardmeter-rustup-$name.log)"
  timeout 600 rustup "${args[@]}" >"/tmp/shardmeter-rustup-$name.log" 2>&1 || return 1
  eval "$ready" >/dev/null 2>&1
}

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

stage "cargo fmt --check"
cargo fmt --all -- --check

stage "cargo clippy (all targets, all features, -D warnings)"
cargo clippy --workspace --all-targets --all-features -- -D warnings
# The ledger alone (no tokio, no fred) must build for embedders that want only the core.
cargo clippy --lib --no-default-features -- -D warnings

stage "cargo test (unit, integration, stress, fault, doc)"
cargo test --workspace --all-targets --all-features
cargo test --workspace --doc --all-features

stage "loom models (LOOM_MAX_PREEMPTIONS=${LOOM_MAX_PREEMPTIONS:=2})"
export LOOM_MAX_PREEMPTIONS
RUSTFLAGS="--cfg shardmeter_loom" CARGO_TARGET_DIR=target/loom \
  cargo clippy -p shardmeter-loom-tests --tests -- -D warnings
# Release for speed, with the ledger's debug assertions kept on.
RUSTFLAGS="--cfg shardmeter_loom" CARGO_TARGET_DIR=target/loom \
  CARGO_PROFILE_RELEASE_DEBUG_ASSERTIONS=true \
  cargo test -p shardmeter-loom-tests --release

stage "Miri: the ledger's tests and the engine's prefetch, Stacked and Tree Borrows"
if toolchain nightly miri,rust-src "cargo +nightly miri --version" &&
  cargo +nightly miri setup >/dev/null 2>&1; then
  # Small capacities and few iterations under `cfg(miri)`; no default features: the ledger alone
  # (tokio and fred add nothing to check here and take long to interpret). Built once, then both
  # models run at once, each into its own log: an interpreter is one thread, this machine has two.
  # The crate example (the ledger's doc test, ~30 s of Stacked Borrows tracking: it builds 1,024
  # slots) runs under Stacked Borrows only; tests/ledger.rs covers its calls under both.
  # Also the engine's prefetch hints (`src/engine/prefetch.rs`: the hint, an `unsafe` block, and
  # a test's unsafe read of an `Arc`'s counts), through their unit tests: ~30 s more of building,
  # 2 s per model.
  miri_tests=(--no-default-features --test ledger --test ledger_stress)
  miri_prefetch=(--no-default-features --features engine --lib -- engine::prefetch)
  cargo +nightly miri test "${miri_tests[@]}" --no-run
  cargo +nightly miri test --no-default-features --features engine --lib --no-run
  miri_logs="$(mktemp -d "${TMPDIR:-/tmp}/shardmeter-miri.XXXXXX")"
  {
    MIRIFLAGS="" cargo +nightly miri test "${miri_tests[@]}" &&
      MIRIFLAGS="" cargo +nightly miri test "${miri_prefetch[@]}" &&
      MIRIFLAGS="" cargo +nightly miri test --no-default-features --doc -- src/ledger/mod.rs
  } >"$miri_logs/stacked.log" 2>&1 &
  stacked=$!
  {
    MIRIFLAGS="-Zmiri-tree-borrows" cargo +nightly miri test "${miri_tests[@]}" &&
      MIRIFLAGS="-Zmiri-tree-borrows" cargo +nightly miri test "${miri_prefetch[@]}"
  } >"$miri_logs/tree.log" 2>&1 &
  tree=$!
  # Background jobs outlive an interrupted script: stop them with it.
  trap 'kill "$stacked" "$tree" 2>/dev/null || true; rm -rf "$miri_logs"' EXIT
  miri_failed=""
  wait "$stacked" || miri_failed+=" stacked"
  wait "$tree" || miri_failed+=" tree"
  trap - EXIT
  for borrows in stacked tree; do
    log "Miri, $borrows borrows"
    cat "$miri_logs/$borrows.log"
  done
  rm -rf "$miri_logs"
  [[ -z "$miri_failed" ]] || { echo "Miri failed under:$miri_failed borrows" >&2; exit 1; }
else
  echo "SKIPPED: Miri did NOT run: a nightly toolchain with Miri could not be installed here" \
    "(rustup toolchain install nightly --component miri,rust-src)"
fi

stage "hot-path guard (callgrind + objdump, release build)"
bash scripts/hot-path-guard.sh

stage "poll trace still applies (scripts/poll-trace.sh --check)"
bash scripts/poll-trace.sh --check

stage "publish readiness: cargo doc -D warnings, cargo package, MSRV"
# Every rustdoc warning is an error (broken intra-doc links included) except
# `redundant_explicit_links`: src/lib.rs:12 and src/engine/mod.rs:1 still write a link target that
# equals its label; drop this `-A` once they are fixed.
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --all-features
# Builds the packaged crate from its own contents (all features: the dependencies built above are
# reused). `--allow-dirty`: a developer's uncommitted changes are what they want checked.
cargo package -p shardmeter --all-features --allow-dirty --quiet
msrv="$(sed -n 's/^rust-version = "\(.*\)"/\1/p' Cargo.toml)"
if toolchain "$msrv" "" "rustc +$msrv --version"; then
  # The committed Cargo.lock holds the newest dependencies (fred's `url` pulls ICU crates that
  # need a newer rustc), so check what a user on the MSRV gets: in a scratch copy, a lockfile
  # resolved for `rust-version` (cargo's MSRV-aware fallback), then `cargo +MSRV check`.
  log "MSRV $msrv: cargo +$msrv check (the library, every feature, MSRV-resolved lockfile)"
  msrv_copy="$(mktemp -d "${TMPDIR:-/tmp}/shardmeter-msrv.XXXXXX")"
  tar --exclude=./target --exclude=./.git -cf - . | tar -C "$msrv_copy" -xf -
  if (cd "$msrv_copy" && CARGO_RESOLVER_INCOMPATIBLE_RUST_VERSIONS=fallback cargo update --quiet); then
    (cd "$msrv_copy" && CARGO_TARGET_DIR="$root/target/msrv" cargo "+$msrv" check --lib --all-features) ||
      { rm -rf "$msrv_copy"; exit 1; }
  else
    echo "SKIPPED: the declared MSRV ($msrv) was NOT checked: no lockfile could be resolved for it" \
      "(is crates.io reachable?)"
  fi
  rm -rf "$msrv_copy"
else
  echo "SKIPPED: the declared MSRV ($msrv) was NOT checked: rustup could not install it here"
fi

stage "benches (smoke: cargo bench -- --test)"
cargo bench --workspace --all-features -- --test

stage "mutations: every one must be caught (scripts/mutations.sh)"
bash scripts/mutations.sh

stage "done"
printf '\nstage timings:\n%s' "$timings"
