#!/usr/bin/env bash
# Finds what makes the engine's polls long: runs the polls pass of `benches/flush.rs` (a million
# sessions and accounts, `cargo bench --bench flush -- polls`) on a traced copy of the tree, and
# prints every poll of the flusher, write or read task that used over 1 ms of CPU, with the steps
# inside it that took 50 µs or more or faulted in a page:
#
#   LONGPOLL Flusher cpu=2216us: src/engine/flusher.rs:498 -> src/engine/flusher.rs:498 2198us/126flt;
#
# A step is the work between two step boundaries: the poll's start and end, and every call of
# `Slicer::pause` or `Slicer::spent` (file:line of the call), which every sliced loop of the
# flusher and of the Redis sink makes between steps. Each boundary reads the thread's CPU clock
# and its minor page faults (`getrusage(RUSAGE_THREAD)`), a few hundred ns.
#
#   scripts/poll-trace.sh            # traced polls pass (a few minutes; first build ~5 min)
#   scripts/poll-trace.sh --check    # only check that the trace still applies and builds
#
# The edits are made in a scratch copy (never in this checkout), built into target/trace. Like
# scripts/mutations.sh it matches the code it edits: if an edit no longer applies, it says which.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
scratch="$(mktemp -d "${TMPDIR:-/tmp}/shardmeter-trace.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT
tar -C "$repo" --exclude=./target --exclude=./.git -cf - . | tar -C "$scratch" -xf -

# Applies one perl substitution to a file of the copy; fails if it matched nothing.
edit() {
  local file="$1" substitution="$2"
  perl -0pi -e "\$n = ($substitution); END { exit(\$n ? 0 : 1) }" "$scratch/$file" || {
    echo "poll-trace: the edit of $file no longer applies: $substitution" >&2
    exit 1
  }
}

cat >"$scratch/src/trace.rs" <<'EOF'
//! Step boundaries of the current poll (scripts/poll-trace.sh; never in the repository).
use std::cell::RefCell;
use std::time::Duration;

thread_local! {
    static STEPS: RefCell<Vec<(String, Duration, i64)>> = const { RefCell::new(Vec::new()) };
}

fn cpu_and_faults() -> (Duration, i64) {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out-pointers that the calls only write.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe {
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now);
        libc::getrusage(libc::RUSAGE_THREAD, &mut usage);
    }
    (Duration::new(now.tv_sec as u64, now.tv_nsec as u32), usage.ru_minflt)
}

pub(crate) fn mark(label: String) {
    let (cpu, faults) = cpu_and_faults();
    STEPS.with(|steps| steps.borrow_mut().push((label, cpu, faults)));
}

#[track_caller]
pub(crate) fn mark_here() {
    mark(std::panic::Location::caller().to_string());
}

pub(crate) fn begin() {
    STEPS.with(|steps| steps.borrow_mut().clear());
    mark("poll-start".into());
}

pub(crate) fn end(task: &str, cpu: Duration, long: bool) {
    mark("poll-end".into());
    if !long {
        return;
    }
    STEPS.with(|steps| {
        let steps = steps.borrow();
        let mut line = format!("LONGPOLL {task} cpu={}us:", cpu.as_micros());
        for pair in steps.windows(2) {
            let took = pair[1].1.saturating_sub(pair[0].1).as_micros();
            let faults = pair[1].2 - pair[0].2;
            if took >= 50 || faults > 0 {
                line += &format!(" {} -> {} {took}us/{faults}flt;", pair[0].0, pair[1].0);
            }
        }
        eprintln!("{line} boundaries={}", steps.len());
    });
}
EOF

edit src/lib.rs 's/^mod loom;$/mod loom;\nmod trace;/m'
edit src/sink/mod.rs 's/    pub\(crate\) fn spent\(&self\) -> bool \{/    #[track_caller]\n    pub(crate) fn spent(&self) -> bool {\n        crate::trace::mark_here();/'
edit src/sink/mod.rs 's/    pub\(crate\) async fn pause\(&mut self\) \{\n        if self\.budget_spent\(\) \{/    #[track_caller]\n    pub(crate) fn pause(&mut self) -> impl std::future::Future<Output = ()> + \x27_ {\n        crate::trace::mark_here();\n        async move { if self.budget_spent() {/'
edit src/sink/mod.rs 's/(            self\.since = Instant::now\(\);\n        \})\n    \}/$1 }\n    }/'
edit src/engine/stats.rs 's/(        let cpu_started = thread_cpu_time\(\);\n)/$1        crate::trace::begin();\n/'
edit src/engine/stats.rs 's/(        raise_longest_poll\(&record\.longest, started\.elapsed\(\), cpu\);\n)/        crate::trace::end(&format!("{:?}", self.task), cpu, cpu > LONG_POLL);\n$1/'

export CARGO_TARGET_DIR="$repo/target/trace"
unset RUSTFLAGS
cd "$scratch"
if [[ "${1:-}" == "--check" ]]; then
  cargo check --benches --all-features
  echo "poll-trace: the trace applies and builds"
  exit 0
fi
cargo bench --bench flush -- polls
