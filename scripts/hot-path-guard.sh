#!/usr/bin/env bash
# The hot-path guard: fails when a registered worker's `Session::add` costs more than its budget.
#
# It builds `hot-path-guard/` (a driver that calls `add` through one non-inlined function,
# `shardmeter_hot_path_add`) in the release build, and
#   - counts, with callgrind, the instructions, memory loads and stores that one call executes
#     (two runs, N1 and N2 calls; the difference divided by N2 - N1, so set-up costs cancel);
#   - disassembles that function with objdump and fails on any locked instruction (a `lock`
#     prefix, or `xchg` with memory, which the CPU locks implicitly).
# Counts, not times: callgrind's counts are the same for the same binary whatever else the
# machine is doing.
#
# Installs valgrind with apt-get when it is missing (as root); where it cannot, it says so and
# skips the counts (the lock check still runs).
set -euo pipefail
cd "$(dirname "$0")/.."

# The budget, for `shardmeter_hot_path_add(&Session, u64)` on the worker path. It is `add` plus
# what the driver function itself adds: two argument moves for the cold paths' tail calls and the
# `ret` (which reads the return address: one of the loads). Measured with rustc 1.95.0 on x86_64:
# 15 instructions, 5 loads (the session value; the thread's worker key and offset from TLS; the
# cell; the return address), 1 store. Inlined into a caller's loop, `add` is 10 instructions and
# 4 loads, as docs/design.md quotes. History: 16 instructions and 8 loads while the cursor sat
# behind the session's `Arc`; 15 and 6 with a 24-byte session value holding the cursor (cell
# pointer, shard stride, shard counts); 15 and 5 since the value is 8 bytes (session 7).
# Change these numbers only in a commit that says why the hot path got dearer.
MAX_INSTRUCTIONS=15
MAX_LOADS=5
MAX_STORES=1
MAX_LOCKED=0
SYMBOL=shardmeter_hot_path_add

target_dir="${CARGO_TARGET_DIR:-target}"
echo "building the driver (release)"
cargo build -q --release -p shardmeter-hot-path-guard
driver="$target_dir/release/hot-path-driver"

failures=0

# --- locked instructions, from the disassembly -----------------------------------------------
if ! command -v objdump >/dev/null 2>&1; then
  echo "objdump (binutils) is missing; install binutils" >&2
  exit 1
fi
# (awk reads to the end rather than `exit`: an early exit would kill objdump with SIGPIPE.)
body="$(objdump -d --no-show-raw-insn "$driver" |
  awk -v sym="<$SYMBOL>:" '$2 == sym {on=1; next} on && /^$/ {on=0} on')"
if [[ -z "$body" ]]; then
  echo "no function $SYMBOL in $driver" >&2
  exit 1
fi
locked="$(grep -cE '\block\b|\bxchg[a-z]*\b.*\(' <<<"$body" || true)"
printf '%-40s %s\n' "$SYMBOL, static instructions:" "$(wc -l <<<"$body")"
printf '%-40s %s (budget %s)\n' "locked instructions:" "$locked" "$MAX_LOCKED"
if ((locked > MAX_LOCKED)); then
  echo "HOT PATH OVER BUDGET: locked instruction(s) in $SYMBOL:" >&2
  grep -E '\block\b|\bxchg[a-z]*\b.*\(' <<<"$body" | sed 's/^/    /' >&2
  failures=$((failures + 1))
fi

# --- executed instructions, loads and stores, from callgrind ----------------------------------
if ! command -v valgrind >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing valgrind"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
  fi
fi
if ! command -v valgrind >/dev/null 2>&1; then
  echo "SKIPPED: valgrind is not installed and cannot be installed here; the instruction and" \
    "load counts of the hot path were NOT checked (only the lock check ran)"
else
  scratch="$(mktemp -d "${TMPDIR:-/tmp}/shardmeter-hot-path.XXXXXX")"
  trap 'rm -rf "$scratch"' EXIT
  # Prints "Ir Dr Dw" for `calls` calls of the symbol (events: Ir Dr Dw I1mr ...).
  count() {
    local calls="$1" out="$scratch/callgrind.$1"
    valgrind --tool=callgrind --cache-sim=yes --toggle-collect="$SYMBOL" \
      --callgrind-out-file="$out" "$driver" "$calls" >"$scratch/run.$calls.log" 2>&1 || {
      echo "the driver failed under callgrind:" >&2
      tail -n 20 "$scratch/run.$calls.log" >&2
      exit 1
    }
    awk '$1 == "totals:" {print $2, $3, $4}' "$out"
  }
  n1=1000
  n2=3000
  read -r ir1 dr1 dw1 < <(count "$n1")
  read -r ir2 dr2 dw2 < <(count "$n2")
  calls=$((n2 - n1))
  check() {
    local what="$1" delta="$2" max="$3"
    if ((delta % calls != 0)); then
      echo "HOT PATH: $what per call is not a whole number ($delta over $calls calls):" \
        "is the path data-dependent?" >&2
      failures=$((failures + 1))
      return
    fi
    local per=$((delta / calls))
    printf '%-40s %s (budget %s)\n' "$what per add:" "$per" "$max"
    if ((per > max)); then
      echo "HOT PATH OVER BUDGET: $per $what per add, budget $max" >&2
      failures=$((failures + 1))
    fi
  }
  check "instructions" $((ir2 - ir1)) "$MAX_INSTRUCTIONS"
  check "loads" $((dr2 - dr1)) "$MAX_LOADS"
  check "stores" $((dw2 - dw1)) "$MAX_STORES"
fi

if ((failures)); then
  echo "hot-path guard: $failures check(s) over budget (see scripts/hot-path-guard.sh)" >&2
  exit 1
fi
echo "hot-path guard: within budget"
