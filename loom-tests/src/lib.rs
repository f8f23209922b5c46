//! Loom models of the shardmeter ledger live in `tests/`; this library holds their helpers.
//!
//! Build and run them with the crate's own cfg (never `--cfg loom`, which breaks tokio and fred):
//!
//! ```text
//! RUSTFLAGS="--cfg shardmeter_loom" CARGO_TARGET_DIR=target/loom LOOM_MAX_PREEMPTIONS=2 \
//!     cargo test -p shardmeter-loom-tests --release
//! ```
//!
//! Without the cfg this library and every model compile to nothing. What each model proves, and
//! the proof sketch it checks, is in `docs/design.md`.

#[cfg(shardmeter_loom)]
mod helpers {
    use shardmeter::Usage;
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    /// Runs `model` under every interleaving loom explores (bounded by `LOOM_MAX_PREEMPTIONS`),
    /// then prints how many iterations that took. Returns the iteration count.
    pub fn run_model(name: &'static str, model: impl Fn() + Sync + Send + 'static) -> usize {
        // std, not loom: it counts executions from outside them.
        let iterations = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        let counter = iterations.clone();
        loom::model::Builder::new().check(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            model();
        });
        let iterations = iterations.load(Ordering::SeqCst);
        println!(
            "loom model {name}: {iterations} iterations in {:.2?}",
            start.elapsed()
        );
        iterations
    }

    /// Sums usage records per account.
    pub fn totals(usage: &[Usage]) -> BTreeMap<String, u64> {
        let mut totals = BTreeMap::new();
        for record in usage {
            *totals.entry(record.account.to_string()).or_insert(0) += record.amount;
        }
        totals
    }

    /// The expected per-account totals, written as `&[("a", 3), ...]`; zero totals are left
    /// out, as a sweep never reports an empty amount.
    pub fn expected(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
        pairs
            .iter()
            .filter(|&&(_, amount)| amount > 0)
            .map(|&(account, amount)| (account.to_string(), amount))
            .collect()
    }

    /// Spawns a named loom thread (the name shows in loom's reports and in [`thread_name`]).
    pub fn spawn<T: Send + 'static>(
        name: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> loom::thread::JoinHandle<T> {
        loom::thread::Builder::new()
            .name(name.to_string())
            .spawn(f)
            .expect("loom spawns threads")
    }

    /// Spawns the `sweeper` thread of the adds models: two sweeps, racing the adds. Returns the
    /// sweeper, the usage of both sweeps and the totals of the first, for the final checks.
    pub fn sweep_twice(
        mut sweeper: shardmeter::Sweeper,
    ) -> loom::thread::JoinHandle<(shardmeter::Sweeper, Vec<Usage>, BTreeMap<String, u64>)> {
        spawn("sweeper", move || {
            let mut usage = Vec::new();
            sweeper.sweep(&mut usage);
            let first = totals(&usage);
            sweeper.sweep(&mut usage);
            (sweeper, usage, first)
        })
    }

    /// The name of the calling loom thread; the model's own thread is `main`.
    pub fn thread_name() -> String {
        loom::thread::current().name().unwrap_or("main").to_string()
    }

    /// What a model observed, across all of its iterations: the outcomes of its races.
    ///
    /// loom's exploration has known gaps (its DPOR can skip the interleavings in which a thread's
    /// load is followed by another thread's load and store; tokio-rs/loom#166 and #392). A
    /// model therefore records which outcomes it reached and asserts, after loom has finished,
    /// that the racy ones were among them: a model that silently stopped exploring its race
    /// fails instead of passing vacuously.
    #[derive(Debug)]
    pub struct Seen(Mutex<BTreeSet<String>>);

    impl Default for Seen {
        fn default() -> Self {
            Self::new()
        }
    }

    impl Seen {
        /// Nothing seen yet.
        pub const fn new() -> Self {
            Self(Mutex::new(BTreeSet::new()))
        }

        /// Notes one outcome.
        pub fn note(&self, outcome: impl Into<String>) {
            self.0.lock().unwrap().insert(outcome.into());
        }

        /// Everything noted so far.
        pub fn all(&self) -> BTreeSet<String> {
            self.0.lock().unwrap().clone()
        }

        /// Panics unless every one of `wanted` was noted.
        pub fn assert_reached(&self, model: &str, wanted: &[&str]) {
            let seen = self.all();
            let missing: Vec<_> = wanted
                .iter()
                .filter(|outcome| !seen.contains(**outcome))
                .collect();
            assert!(
                missing.is_empty(),
                "model {model} never reached {missing:?}; it reached {seen:?} \
                 (the models need LOOM_MAX_PREEMPTIONS of at least 2)"
            );
        }
    }
}

#[cfg(shardmeter_loom)]
pub use helpers::*;
