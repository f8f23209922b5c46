#!/usr/bin/env bash
# Checks the checks: each mutation below breaks the ledger (or, last, the engine and the Redis
# sink) in one known way, and the check named beside it (a loom model, a test, the hot-path guard
# or Miri) must fail on it. For each mutation the script copies the working tree to a scratch
# directory, applies one edit there (never in this checkout), runs the check and requires the
# expected failure. Exits 0 only if every selected mutation is caught. `scripts/test.sh` runs it
# last.
#
#   scripts/mutations.sh                          # every mutation
#   scripts/mutations.sh claim-acquire worker-rmw # just the named ones (all of their checks)
#   scripts/mutations.sh --list
#
# Kinds of check:
#   loom   a model of loom-tests/ (release, debug assertions on, as scripts/test.sh runs them)
#   test   a test of tests/ (debug build, all features, as scripts/test.sh runs them)
#   unit   a unit test of the library (debug build, all features; the test binary column is -)
#   guard  scripts/hot-path-guard.sh (the registered-worker `add` within its budget)
#   miri   a test of tests/ under Miri (Stacked Borrows); skipped, with a message, where the
#          nightly toolchain with Miri is not installed (scripts/test.sh installs it if it can)
#
# Builds share the target directories of scripts/test.sh (target/loom, target, target/miri), so
# after its earlier stages each mutation costs one rebuild of the crate plus the check.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"

# One line per (mutation, check), tab-separated: name, file, perl substitution (run on the whole
# file), kind, test binary (or -), test or model name (or -), and what the failure must print
# (an extended regular expression: `a|b` accepts either).
mutations="$(
  cat <<'EOF'
open-release	src/ledger/slots.rs	s/state\.store\(OPEN, Ordering::Release\)/state.store(OPEN, Ordering::Relaxed)/	loom	lifetime	reused_slot_racing_late_sweep	Causality violation
account-acquire	src/ledger/slots.rs	s/state\.load\(Ordering::Acquire\) != OPEN/state.load(Ordering::Relaxed) != OPEN/	loom	lifetime	reused_slot_racing_late_sweep	Causality violation
claim-acquire	src/ledger/worker.rs	s/(bits \| \(1 << bit\),\s*)Ordering::Acquire,/${1}Ordering::Relaxed,/	loom	workers	worker_handoff	assertion `left == right` failed
release-release	src/ledger/worker.rs	s/\(index % 64\)\), Ordering::Release\)/(index % 64)), Ordering::Relaxed)/	loom	workers	worker_handoff	assertion `left == right` failed
striped-no-rmw	src/ledger/shard.rs	s/let previous = saturating_fetch_add\(cell, amount\);/let previous = cell.load(Ordering::Relaxed);\n        cell.store(previous.saturating_add(amount), Ordering::Relaxed);/s	loom	adds	striped_adds_share_a_shard	assertion `left == right` failed
no-reset-on-free	src/ledger/mod.rs	s/shards\.reset\(slot\);/let _ = shards;/	loom	lifetime	reused_slot_racing_late_sweep	assertion `left == right` failed
keep-seen-on-free	src/ledger/mod.rs	s/\*seen = 0;/let _ = &seen;/	loom	lifetime	reused_slot_racing_late_sweep	assertion `left == right` failed
free-before-collect	src/ledger/mod.rs	s/(let total = self\.take_delta\(slot as usize, true\);)(\s*)(let account = self\.shared\.slots\.free\(slot\);)/$3$2$1/	loom	lifetime	reused_slot_racing_late_sweep	assertion `left == right` failed
holders-release-relaxed	src/ledger/slots.rs	s/fetch_sub\(1, Ordering::Release\)/fetch_sub(1, Ordering::Relaxed)/	loom	lifetime	clones_drop_on_different_threads	assertion `left == right` failed
holders-no-fence	src/ledger/slots.rs	s/\n\s*fence\(Ordering::Acquire\);//	loom	lifetime	clones_drop_on_different_threads	assertion `left == right` failed
reset-open-slots	src/ledger/mod.rs	s/let total = self\.take_delta\(slot, false\);/let total = self.take_delta(slot, true);/	loom	adds	sums_over_two_shards_racing_sweeps	assertion `left == right` failed
unregister-keeps-index	src/ledger/worker.rs	s/cell\.replace\(WorkerProbe::NOT_A_WORKER\)/cell.get()/	loom	workers	old_owner_leaves_the_worker_shard	assertion `left == right` failed
unregister-keeps-index	src/ledger/worker.rs	s/cell\.replace\(WorkerProbe::NOT_A_WORKER\)/cell.get()/	test	ledger_stress	worker_indexes_change_hands_while_old_owners_keep_adding	adds lost or counted twice|readings went back from|held index 0|never changed hands
worker-rmw	src/ledger/shard.rs	s/Some\(total\) => cell\.store\(total, Ordering::Relaxed\),/Some(total) => {\n                    cell.fetch_max(total, Ordering::Relaxed);\n                }/	guard	-	-	HOT PATH OVER BUDGET: locked instruction
lazy-worker-index	src/loom.rs	s/static \$name: \$t = const \{ \$init \};/static \$name: \$t = \$init;/	guard	-	-	HOT PATH OVER BUDGET
cell-provenance	src/ledger/shard.rs	s/let pages = self\.pages_start\(\)\.cast::<u8>\(\);/let pages = NonNull::from(&self.pages[0].cells[0]).cast::<u8>();/	miri	ledger	open_add_sweep_is_exact_on_both_paths	Undefined Behavior
collect-ignores-bound	src/ledger/mod.rs	s/while ended < max \{/while ended < usize::MAX {/	test	ledger	ended_sessions_collected_in_bounded_steps_are_exact	assertion `left == right` failed
seqlock-no-writer-fence	src/seqlock.rs	s/\n\s*fence\(Ordering::Release\);//	loom	seqlock	seqlock_reads_whole_publications	torn read
seqlock-no-reader-fence	src/seqlock.rs	s/\n\s*fence\(Ordering::Acquire\);//	loom	seqlock	seqlock_reads_whole_publications	torn read
seqlock-relaxed-begin	src/seqlock.rs	s/let before = self\.sequence\.load\(Ordering::Acquire\)/let before = self.sequence.load(Ordering::Relaxed)/	loom	seqlock	seqlock_reads_whole_publications	torn read
seqlock-relaxed-end	src/seqlock.rs	s/\.store\(sequence\.wrapping_add\(2\), Ordering::Release\)/.store(sequence.wrapping_add(2), Ordering::Relaxed)/	loom	seqlock	seqlock_reads_whole_publications	torn read
orphans-left-running	src/bin/shardmeter-sim/orphans.rs	s/\.args\(\["-KILL",/.args(["-0",/	test	fixture	a_server_left_behind_is_killed_by_the_next_test_process	still runs
sim-never-reaps	src/bin/shardmeter-sim/redis.rs	s/\n\s*orphans::reap_once\(\);//	test	sim	the_server_a_killed_sim_left_behind_is_killed_by_the_next_sim	still runs
engine-session-copies-id	src/engine/mod.rs	s/ledger\.open_session_shared\(account\)/ledger.open_session(\&account)/	test	read_side_memory	the_read_side_costs_a_bounded_few_hundred_bytes_per_account_and_checks_never_allocate	a second session of a tracked account allocates nothing
slicer-budget-per-loop	src/sink/mod.rs	s/POLL_STARTED\.get\(\)\.unwrap_or\(self\.since\)/self.since/	unit	-	sink::tests::a_slicer_counts_its_budget_from_the_start_of_a_marked_poll	assertion
arc-counts-offset	src/engine/prefetch.rs	s/wrapping_sub\(2 \* size_of::<usize>\(\)\)/wrapping_sub(size_of::<usize>())/	unit	-	engine::prefetch::tests::the_counts_prefetched_are_the_arc_s_counts	two handles
review-ignores-lookup	src/engine/accounts.rs	s/\(self\.overrides\.is_empty\(\) && self\.lookup\.is_none\(\)\)/true/	unit	-	engine::accounts::tests::a_review_asks_the_lookup_again	assertion `left == right` failed
state-before-slot	src/engine/accounts.rs	s/let opened = open\(account\.clone\(\)\)\?;/let opened = open(account.clone());/; s/Ok\(\(opened, state\)\)/Ok((opened?, state))/	unit	-	engine::accounts::tests::an_opening_shares_the_state_s_id_and_one_that_fails_creates_nothing	no state
wake-never	src/engine/accounts.rs	s/        if woken \{/        if false {/	test	budgets	exhaustion_is_at_exactly_the_limit_as_the_deployments_reader_sees_it	panicked|timed out|Elapsed
wake-not-on-sync	src/engine/accounts.rs	s/\n\s*\|\| \(synced && !self\.synced\.load\(Ordering::Relaxed\)\)//	test	budgets	a_session_opens_while_redis_is_down_and_fails_open	the failed read settles
lua-no-acl-check	src/sink/redis_apply.lua	s/^if redis\.acl_check_cmd then/if false then/m	test	redis_sink	an_acl_forbidding_a_command_of_the_script_refuses_the_whole_call	was written
misconfig-normal-backoff	src/engine/flusher.rs	s/self\.backoff\.failed_for_good\(now\)/self.backoff.failed(now)/	test	engine	a_misconfigured_sink_is_retried_at_the_longest_backoff_and_shown_in_the_stats	retried like an outage
ack-ignores-bucket	src/engine/accounts.rs	s/\n\s*\.filter\(\|tracked\| Arc::ptr_eq\(&tracked\.key, key\) \|\| tracked\.key == \*key\)//	unit	-	engine::accounts::tests::a_new_bucket_starts_from_zero_and_is_read_again	assertion
counted-whole-increment	src/engine/pending.rs	s/amount: counted_now as u64,/amount: now as u64,/	unit	-	engine::pending::tests::what_was_counted_comes_back_with_each_increment	assertion
lane-never-joins-keyed	src/engine/pending.rs	s/if let Some\(keyed\) = self\.take_keyed\(&key\)/if let Some(keyed) = None::<Waiting>/	unit	-	engine::pending::tests::what_was_counted_comes_back_with_each_increment	one increment per key
lane-stale-generation	src/engine/pending.rs	s/\n\s*self\.at\.iter_mut\(\)\.for_each\(\|block\| block\.fill\(\(0, 0\)\)\);//	unit	-	engine::pending::tests::an_owner_s_entry_of_a_round_four_billion_rounds_ago_is_gone	out of bounds|a new entry
lane-blocks-dropped	src/engine/pending.rs	s/self\.spares\.push\(block\);/drop(block);/	unit	-	engine::pending::tests::a_round_s_emptied_blocks_are_filled_again_by_the_next	both blocks kept
keyed-room-not-raised	src/engine/pending.rs	s/\.max\(room\)/.min(*expected)/	unit	-	engine::pending::tests::a_map_sized_like_a_smaller_one_makes_room_for_more_when_told	grew
round-end-drops-tables	src/engine/pending.rs	s/self\.spare_shards\s*\.extend\(unbegun\.filter\(\|shard\| shard\.capacity\(\) > 0\)\);/drop(unbegun);/	unit	-	engine::pending::tests::a_round_of_owned_keys_keeps_the_keyed_tables_made_for_it	none freed at the round
spares-never-taken	src/engine/pending.rs	s/if let Some\(spare\) = spares\.pop\(\)/if let Some(spare) = None::<HashMap<K, V, foldhash::fast::RandomState>>/	unit	-	engine::pending::tests::a_round_s_emptied_tables_are_filled_again_by_the_next	every table taken again
spares-kept-past-next-round	src/engine/pending.rs	s/\n\s*self\.released\.append\(&mut self\.spare_shards\);//	unit	-	engine::pending::tests::a_round_s_emptied_tables_are_filled_again_by_the_next	round 3's one table
released-never-freed	src/engine/pending.rs	s/\n\s*self\.released\.truncate\(keep\);//	unit	-	engine::pending::tests::a_round_s_emptied_tables_are_filled_again_by_the_next	assertion
key-text-allocated-per-key	src/sink/redis.rs	s/self\.0\.split\(\)\.freeze\(\)/Bytes::copy_from_slice(key.as_bytes())/	unit	-	sink::redis::tests::key_texts_are_slices_of_shared_chunks	assertion
enabled-unpublished	src/engine/flusher.rs	s/(        self\.enabled = enabled;\n)        self\.stats\.publish_enabled\(enabled\);\n/$1/	test	engine	racing_set_enabled_calls_end_with_the_state_applied_last	assertion
shutdown-without-cut-slices	src/engine/flusher.rs	s/\n\s*_ = tokio::task::yield_now\(\), if self\.pending\.needs_cut\(\) => self\.cut_slice\(\),\n(\s*_ = tokio::time::sleep_until\(deadline\))/\n$1/	test	engine	a_shutdown_writes_batches_larger_than_a_cut_step	ShutdownReport
unanswered-write-not-in-doubt	src/engine/flusher.rs	s/\n\s*self\.pending\.unanswered_in_doubt\(\);//	test	engine	a_write_unanswered_at_the_deadline_is_in_doubt	every batch reached the sink
absorb-locates-another-record	src/engine/flusher.rs	s/locate\(book, at \+ 1\)/locate(book, at + 2)/	test	engine	a_sweep_of_many_tracked_accounts_counts_each_amount_for_its_own_account	assertion `left == right` failed
readings-written-lazily	src/ledger/mod.rs	s/\n\s*page\[0\] = 0;//	test	ledger_memory	the_first_sweep_faults_in_none_of_the_sweepers_memory	page faults in the first sweep
readings-written-lazily	src/ledger/mod.rs	s/\n\s*page\[0\] = 0;//	test	ledger_memory	building_a_ledger_writes_every_page_it_allocates	lazy zero pages
EOF
)"

if [[ "${1:-}" == "--list" ]]; then
  while IFS=$'\t' read -r name file _ kind test check _; do
    case "$kind" in
    guard) target="scripts/hot-path-guard.sh" ;;
    *) target="$test::$check" ;;
    esac
    printf '%-24s %-22s %-6s %s\n' "$name" "$file" "$kind" "$target"
  done <<<"$mutations"
  exit 0
fi

names="$(cut -f1 <<<"$mutations")"
for name in "$@"; do
  if ! grep -qxF -- "$name" <<<"$names"; then
    echo "no mutation named $name; see --list" >&2
    exit 2
  fi
done

scratch="$(mktemp -d "${TMPDIR:-/tmp}/shardmeter-mutations.XXXXXX")"
# The scratch copy builds into this checkout's target dirs under the same crate hashes (cargo
# hashes workspace members by their relative path), and cargo decides freshness by file times:
# the last mutated build would look up to date to the checkout, whose files are older. So, on
# the way out, touch the checkout's files: its next build rebuilds the workspace crates.
restore() {
  rm -rf "$scratch"
  find "$repo" \( -path "$repo/target" -o -path "$repo/.git" \) -prune -o -type f -exec touch {} +
}
trap restore EXIT
export LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-2}"
export LOOM_LOCATION=1 # source locations in loom's causality reports
unset RUSTFLAGS

have_miri() { cargo +nightly miri --version >/dev/null 2>&1; }

# Runs one check in the scratch copy; its output goes to the file $2.
run_check() {
  local kind="$1" log="$2" test="$3" check="$4"
  case "$kind" in
  loom)
    (cd "$scratch" && RUSTFLAGS="--cfg shardmeter_loom" CARGO_TARGET_DIR="$repo/target/loom" \
      CARGO_PROFILE_RELEASE_DEBUG_ASSERTIONS=true \
      cargo test -q -p shardmeter-loom-tests --release --test "$test" -- --exact "$check") \
      >"$log" 2>&1
    ;;
  test)
    (cd "$scratch" && CARGO_TARGET_DIR="$repo/target" \
      cargo test -q --all-features --test "$test" -- --exact "$check") >"$log" 2>&1
    ;;
  unit)
    (cd "$scratch" && CARGO_TARGET_DIR="$repo/target" \
      cargo test -q --all-features --lib -- --exact "$check") >"$log" 2>&1
    ;;
  guard)
    (cd "$scratch" && CARGO_TARGET_DIR="$repo/target" bash scripts/hot-path-guard.sh) >"$log" 2>&1
    ;;
  miri)
    (cd "$scratch" && CARGO_TARGET_DIR="$repo/target" \
      MIRIFLAGS="" cargo +nightly miri test -q --no-default-features --test "$test" -- --exact "$check") \
      >"$log" 2>&1
    ;;
  esac
}

# The working tree, without build output or history. tar keeps the files' times, which can be
# older than the artifacts a previous run left in the shared target dirs (cargo shares them across
# scratch copies); touching every source makes cargo rebuild from this copy instead of reusing them.
tar -C "$repo" --exclude=./target --exclude=./.git -cf - . | tar -C "$scratch" -xf -
find "$scratch" -type f -exec touch {} +

selected=" $* "
wanted() { [[ "$selected" == "  " || "$selected" == *" $1 "* ]]; }
skip_kind() { [[ "$1" == miri ]] && ! have_miri; }

# Baseline: every check used below must pass on the unmodified copy, or a failure below would
# prove nothing.
printf '==> baseline: every check passes on the unmodified code\n'
checked=" "
while IFS=$'\t' read -r name _ _ kind test check _; do
  wanted "$name" || continue
  skip_kind "$kind" && continue
  [[ "$checked" == *" $kind:$test::$check "* ]] && continue
  checked+="$kind:$test::$check "
  if ! run_check "$kind" "$scratch/baseline.log" "$test" "$check"; then
    echo "    $kind $test::$check fails without any mutation:" >&2
    tail -n 20 "$scratch/baseline.log" | sed 's/^/      /' >&2
    exit 1
  fi
  echo "    $kind $test::$check passes"
done <<<"$mutations"

ran=0
skipped=0
failures=0
while IFS=$'\t' read -r name file substitution kind test check expect; do
  wanted "$name" || continue
  if skip_kind "$kind"; then
    printf '\n==> %s: SKIPPED (%s check): cargo +nightly miri is not installed here\n' "$name" "$kind"
    skipped=$((skipped + 1))
    continue
  fi
  ran=$((ran + 1))
  printf '\n==> %s: mutate %s, run %s %s::%s\n' "$name" "$file" "$kind" "$test" "$check"
  cp "$repo/$file" "$scratch/$file"
  perl -0pi -e "$substitution" "$scratch/$file"
  if cmp -s "$repo/$file" "$scratch/$file"; then
    echo "    the edit did not apply: has $file changed? Update this script." >&2
    failures=$((failures + 1))
    continue
  fi
  { diff -U1 "$repo/$file" "$scratch/$file" || true; } | tail -n +3 | grep -v '^@@' | sed 's/^/    /'
  log="$scratch/$name.$kind.log"
  if run_check "$kind" "$log" "$test" "$check"; then
    echo "    NOT CAUGHT: the check passed with the mutated code" >&2
    failures=$((failures + 1))
  elif grep -qE -- "$expect" "$log"; then
    echo "    caught; the check reported:"
    grep -m1 -A3 -E -- "$expect" "$log" | cut -c1-160 | sed 's/^/      /'
  else
    echo "    the check failed, but not with \"$expect\":" >&2
    tail -n 20 "$log" | sed 's/^/      /' >&2
    failures=$((failures + 1))
  fi
  cp "$repo/$file" "$scratch/$file"
done <<<"$mutations"

if ((failures)); then
  printf '\n%d of %d mutation check(s) not caught as expected\n' "$failures" "$ran" >&2
  exit 1
fi
if ((skipped)); then
  printf '\nall %d mutation check(s) run were caught; %d SKIPPED (see above)\n' "$ran" "$skipped"
else
  printf '\nall %d mutation check(s) caught\n' "$ran"
fi
