#!/usr/bin/env bash
# For auditors: shows that the loom models can fail, and that each ordering in src/ledger/ is
# load-bearing. For each weakening it copies the working tree to a scratch directory, applies one
# edit there (never in this checkout), runs the loom model that covers it, and checks that loom
# reports the expected failure. Exits 0 only if every selected weakening is caught.
#
#   scripts/loom-weakened.sh                  # every weakening
#   scripts/loom-weakened.sh claim-acquire    # just the named ones
#   scripts/loom-weakened.sh --list
#
# About a minute on 2 cores: the first run also builds loom's dependencies into
# target/loom-weakened (about 40 s more); then each weakening costs one rebuild of the ledger and
# a sub-second model run.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"

# One line per weakening, tab-separated: name, file, perl substitution (run on the whole file),
# test binary, model, and what loom must report. The last four are not orderings: they check
# that the models see a lost update on a shared stripe, an old session's amount leaking into the
# new session of a reused slot (cells not reset, or the sweeper's last reading not reset), and
# a new session's amount charged to the old one (slot freed before its remainder is read).
weakenings="$(
  cat <<'EOF'
open-release	src/ledger/slots.rs	s/state\.store\(OPEN, Ordering::Release\)/state.store(OPEN, Ordering::Relaxed)/	lifetime	reused_slot_racing_late_sweep	Causality violation
account-acquire	src/ledger/slots.rs	s/state\.load\(Ordering::Acquire\) != OPEN/state.load(Ordering::Relaxed) != OPEN/	lifetime	reused_slot_racing_late_sweep	Causality violation
claim-acquire	src/ledger/worker.rs	s/(bits \| \(1 << bit\),\s*)Ordering::Acquire,/${1}Ordering::Relaxed,/	workers	worker_handoff	assertion `left == right` failed
release-release	src/ledger/worker.rs	s/\(index % 64\)\), Ordering::Release\)/(index % 64)), Ordering::Relaxed)/	workers	worker_handoff	assertion `left == right` failed
striped-no-rmw	src/ledger/shard.rs	s/let previous = cell\s*\.fetch_update\(.*?\.unwrap_or_else\(\|value\| value\);/let previous = cell.load(Ordering::Relaxed);\n        cell.store(previous.saturating_add(amount), Ordering::Relaxed);/s	adds	striped_adds_share_a_shard	assertion `left == right` failed
no-reset-on-free	src/ledger/mod.rs	s/shards\.reset\(shard, slot\);/let _ = shards;/	lifetime	reused_slot_racing_late_sweep	assertion `left == right` failed
keep-seen-on-free	src/ledger/mod.rs	s/\*seen = 0;/let _ = &seen;/	lifetime	reused_slot_racing_late_sweep	assertion `left == right` failed
free-before-collect	src/ledger/mod.rs	s/(let total = self\.take_delta\(slot as usize, true\);)(\s*)(let account = self\.shared\.slots\.free\(slot\);)/$3$2$1/	lifetime	reused_slot_racing_late_sweep	assertion `left == right` failed
EOF
)"

if [[ "${1:-}" == "--list" ]]; then
  while IFS=$'\t' read -r name file _ test model _; do
    printf '%-20s %-22s -> %s::%s\n' "$name" "$file" "$test" "$model"
  done <<<"$weakenings"
  exit 0
fi

names="$(cut -f1 <<<"$weakenings")"
for name in "$@"; do
  if ! grep -qxF -- "$name" <<<"$names"; then
    echo "no weakening named $name; see --list" >&2
    exit 2
  fi
done

scratch="$(mktemp -d "${TMPDIR:-/tmp}/shardmeter-loom-weakened.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT
export RUSTFLAGS="--cfg shardmeter_loom"
export CARGO_TARGET_DIR="$repo/target/loom-weakened"
export LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-2}"
export LOOM_LOCATION=1 # source locations in loom's causality reports

# The working tree, without build output or history. tar keeps the files' times, which can be
# older than the artifacts a previous run left in the shared target dir (cargo shares them across
# scratch copies); touching every source makes cargo rebuild from this copy instead of reusing them.
tar -C "$repo" --exclude=./target --exclude=./.git -cf - . | tar -C "$scratch" -xf -
find "$scratch" -type f -exec touch {} +

selected=" $* "
wanted() { [[ "$selected" == "  " || "$selected" == *" $1 "* ]]; }

# Baseline: every model used below must pass on the unmodified copy, or a failure below would
# prove nothing.
printf '==> baseline: the unmodified models pass\n'
checked=" "
while IFS=$'\t' read -r name _ _ test model _; do
  wanted "$name" || continue
  [[ "$checked" == *" $test::$model "* ]] && continue
  checked+="$test::$model "
  if ! (cd "$scratch" && cargo test -q -p shardmeter-loom-tests --release --test "$test" \
    -- --exact "$model") >"$scratch/baseline.log" 2>&1; then
    echo "    $test::$model fails without any weakening:" >&2
    tail -n 20 "$scratch/baseline.log" | sed 's/^/      /' >&2
    exit 1
  fi
done <<<"$weakenings"

ran=0
failures=0
while IFS=$'\t' read -r name file substitution test model expect; do
  wanted "$name" || continue
  ran=$((ran + 1))
  printf '\n==> %s: weaken %s, run %s::%s\n' "$name" "$file" "$test" "$model"
  cp "$repo/$file" "$scratch/$file"
  perl -0pi -e "$substitution" "$scratch/$file"
  if cmp -s "$repo/$file" "$scratch/$file"; then
    echo "    the edit did not apply: has $file changed? Update this script." >&2
    failures=$((failures + 1))
    continue
  fi
  { diff -U1 "$repo/$file" "$scratch/$file" || true; } | tail -n +3 | grep -v '^@@' | sed 's/^/    /'
  log="$scratch/$name.log"
  if (cd "$scratch" && cargo test -q -p shardmeter-loom-tests --release --test "$test" \
    -- --exact "$model") >"$log" 2>&1; then
    echo "    NOT CAUGHT: the model passed with the weakened code" >&2
    failures=$((failures + 1))
  elif grep -qF -- "$expect" "$log"; then
    echo "    caught; loom reported:"
    grep -m1 -A3 -F -- "$expect" "$log" | cut -c1-160 | sed 's/^/      /'
  else
    echo "    the model failed, but not with \"$expect\":" >&2
    tail -n 20 "$log" | sed 's/^/      /' >&2
    failures=$((failures + 1))
  fi
  cp "$repo/$file" "$scratch/$file"
done <<<"$weakenings"

if ((failures)); then
  printf '\n%d of %d weakening(s) not caught as expected\n' "$failures" "$ran" >&2
  exit 1
fi
printf '\nall %d weakening(s) caught\n' "$ran"
