//! The sweep: what one [`Sweeper::sweep`] costs, by capacity (1Ki, 64Ki, 1Mi slots) and by the
//! number of shards (2, 4, 8: half worker, half striped), with every slot held by an open session.
//!
//! Two fractions of dirty slots, set up (untimed) before each timed sweep:
//! - `all_dirty`: every session added once since the last sweep (a busy gateway: with a 60 s
//!   flush interval, every live audio session has sent chunks), so one `Usage` per slot;
//! - `sparse_1_in_64`: one session in 64 added since the last sweep.
//!
//! The adds come from this (registered) thread, so they land in worker shard 0 and those cells
//! are warm in this core's cache when the sweep starts; the other shards' cells and the
//! sweeper's own bookkeeping are as the previous sweep left them. The output `Vec` is reused, as
//! a flusher would, and cleared outside the timed span. Throughput is slots swept per second.
//!
//! Run: `cargo bench --bench sweep`; smoke: `cargo bench --bench sweep -- --test`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use shardmeter::ledger::{Ledger, Session, Sweeper, Usage};
use std::hint::black_box;
use std::time::{Duration, Instant};

const CAPACITIES: [(usize, &str); 3] = [(1 << 10, "1Ki"), (1 << 16, "64Ki"), (1 << 20, "1Mi")];
const SHARDS: [usize; 3] = [2, 4, 8];
const DIRTY: [(&str, usize); 2] = [("all_dirty", 1), ("sparse_1_in_64", 64)];

/// A ledger with every slot open, swept clean once.
struct Full {
    sessions: Vec<Session>,
    sweeper: Sweeper,
    out: Vec<Usage>,
}

impl Full {
    fn new(capacity: usize, shards: usize) -> Self {
        let (ledger, mut sweeper) = Ledger::builder()
            .capacity(capacity)
            .worker_shards(shards / 2)
            .striped_shards(shards - shards / 2)
            .build()
            .expect("ledger");
        let sessions: Vec<Session> = (0..capacity)
            .map(|i| ledger.open_session(&format!("user-{i}")).expect("slot"))
            .collect();
        let mut out = Vec::with_capacity(capacity);
        sweeper.sweep(&mut out);
        assert!(out.is_empty());
        Self {
            sessions,
            sweeper,
            out,
        }
    }

    /// Dirties one session in `stride`, sweeps, and returns the time of the sweep alone.
    fn dirty_then_sweep(&mut self, stride: usize) -> Duration {
        for session in self.sessions.iter().step_by(stride) {
            session.add(30);
        }
        self.out.clear();
        let start = Instant::now();
        self.sweeper.sweep(black_box(&mut self.out));
        let elapsed = start.elapsed();
        assert_eq!(self.out.len(), self.sessions.len().div_ceil(stride));
        elapsed
    }
}

fn sweep(c: &mut Criterion) {
    shardmeter::register_worker_thread().expect("worker index");
    for (capacity, label) in CAPACITIES {
        let mut group = c.benchmark_group(format!("sweep_{label}_slots"));
        group.throughput(Throughput::Elements(capacity as u64));
        if capacity >= 1 << 20 {
            // Tens of milliseconds per sweep: fewer, longer samples.
            group
                .sample_size(10)
                .measurement_time(Duration::from_secs(4));
        }
        for shards in SHARDS {
            let mut full = Full::new(capacity, shards);
            for (dirty, stride) in DIRTY {
                group.bench_function(BenchmarkId::new(dirty, format!("{shards}_shards")), |b| {
                    b.iter_custom(|iters| (0..iters).map(|_| full.dirty_then_sweep(stride)).sum())
                });
            }
        }
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20)
        .without_plots();
    targets = sweep
}
criterion_main!(benches);
