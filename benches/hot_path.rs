//! The hot path: [`Session::add`] against the baselines of `docs/facts.md`, on 1 and on 2
//! threads, in one run so that every ratio in `docs/benchmarks.md` is a same-run ratio.
//!
//! Contenders (each thread works on its own session or key, except `shared_atomic_fetch_add`):
//!
//! | id | what one operation is |
//! | --- | --- |
//! | `floor_load_store` | `load` + `store` (Relaxed) on a cache-padded `AtomicU64` only this thread writes, its address in a register |
//! | `floor_via_handle` | the same, with the cell's address loaded from a handle on every call, as a session's must be |
//! | `session_add_worker` | [`Session::add`] on a thread that called `register_worker_thread` |
//! | `session_add_unregistered` | [`Session::add`] elsewhere: the ledger's striped compare-and-swap fallback |
//! | `striped_fetch_add` | `fetch_add` (Relaxed) on this thread's cache-padded stripe |
//! | `shared_atomic_fetch_add` | `fetch_add` (Relaxed) on one `AtomicU64` that every thread hits |
//! | `mutex_hashmap` | `Mutex<HashMap<u32, u64>>`: lock, look up this thread's key, add |
//! | `dashmap` | `DashMap<u32, u64>`: `get_mut` of this thread's key (keys on distinct shards), add |
//!
//! Groups `add_1_thread` and `add_2_threads` hit one session (key, cell) per thread over and
//! over, as the targets in `docs/facts.md` are stated. That makes each add wait for the
//! previous one's store to the same cell (store-to-load forwarding), which a gateway never does:
//! one session gets a chunk every 30 ms or so. Groups `add_1_thread_64_sessions` and
//! `add_2_threads_64_sessions` therefore also run the floor and the ledger round-robin over 64
//! sessions (cells) per thread, which measures the cost of the instructions instead.
//!
//! Groups `add_10k_sessions_shuffled` and `add_1M_sessions_shuffled` (one registered thread) are
//! a gateway at scale: 10k or 1M sessions, each visited once per pass in a fixed shuffled order,
//! so the handles and cells are rarely in cache and the cost is the cache misses of one `add`.
//! Contenders there: `floor_via_handle`, the fair floor (a `Vec` of handles, each holding a
//! reference to its own counter in one contiguous array, like a shard's cells; `Relaxed` load +
//! store), `arc_fetch_add` (a `Vec<Arc<AtomicU64>>`, `fetch_add`), and `session_add_worker` (a
//! `Vec<Session>` of one ledger, slot `i` for session `i`).
//!
//! Every contender runs through the same harness ([`run_threads`]): each sample starts `threads`
//! fresh threads; each does its setup (registration, picking its key), waits on a barrier, then
//! times `iters` operations. A sample's time is from the first thread's start to the last one's
//! end, and a sample is `threads` elements, so criterion's throughput is the aggregate rate.
//! Thread start-up and setup are outside the timed span.
//!
//! The amount goes through `black_box` once per thread and every cell or map is reached through a
//! `black_box`ed reference, so LLVM cannot fold or delete the loops. Checked in the disassembly:
//! `floor_load_store` compiles to one `add %reg,(%mem)` per operation (LLVM fuses the load and
//! the store; the loop is unrolled 4x), `floor_via_handle` adds one load of the address, and
//! `session_add_worker` is about 13 instructions: a TLS load of the worker index, loads of three
//! fields of the `Session` value itself (worker-shard count, cell pointer, shard stride), a
//! compare and branch, an `imul`, then the cell's load, `add`, overflow branch and store.
//!
//! Run: `cargo bench --bench hot_path`; smoke: `cargo bench --bench hot_path -- --test`.

use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use crossbeam_utils::CachePadded;
use dashmap::DashMap;
use shardmeter::ledger::{Ledger, Session};
use shardmeter::{register_worker_thread, unregister_worker_thread};
use std::collections::HashMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

/// One audio chunk, in milliseconds: what a gateway adds per call.
const CHUNK_MS: u64 = 30;
/// Worker shards of the benchmarked ledger: one per thread of the 2-thread runs.
const WORKER_SHARDS: usize = 2;
/// Keys already in the maps, so that they are not trivially small.
const MAP_KEYS: u32 = 1024;

/// Starts `threads` threads; each builds its operation with `setup(thread_index)`, waits for the
/// others, then runs it `iters` times. Returns the span from the first start to the last end.
fn run_threads<S, O>(threads: usize, iters: u64, setup: &S) -> Duration
where
    S: Fn(usize) -> O + Sync,
    O: FnMut(),
{
    let barrier = Barrier::new(threads);
    let spans: Vec<(Instant, Instant)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|thread| {
                let barrier = &barrier;
                scope.spawn(move || {
                    let mut op = setup(thread);
                    barrier.wait();
                    let start = Instant::now();
                    for _ in 0..iters {
                        op();
                    }
                    let end = Instant::now();
                    drop(op);
                    // Give the worker index back now, not in a thread-local destructor that may
                    // still be running when the next sample's threads register.
                    unregister_worker_thread();
                    (start, end)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().expect("benchmark thread panicked"))
            .collect()
    });
    let first_start = spans.iter().map(|span| span.0).min().expect("no threads");
    let last_end = spans.iter().map(|span| span.1).max().expect("no threads");
    last_end - first_start
}

fn bench_contender<S, O>(
    group: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>,
    threads: usize,
    id: &str,
    setup: S,
) where
    S: Fn(usize) -> O + Sync,
    O: FnMut(),
{
    group.bench_function(id, |b| {
        b.iter_custom(|iters| run_threads(threads, iters, &setup))
    });
}

/// Sessions (keys, cells) per thread in the round-robin groups.
const ROUND_ROBIN: usize = 64;

/// What a handle-based API has to do at least: find the cell through the handle on each call.
struct Handle<'a> {
    cell: &'a AtomicU64,
}

/// One thread's cells in the round-robin floor: contiguous, like a worker shard's.
#[repr(align(128))]
struct CellRow([AtomicU64; ROUND_ROBIN]);

/// What every contender of one thread count works on.
struct Fixtures {
    padded: Vec<CachePadded<AtomicU64>>,
    rows: Vec<CellRow>,
    shared: CachePadded<AtomicU64>,
    /// Sessions of one ledger, `ROUND_ROBIN` per thread (thread `t` has `t * ROUND_ROBIN..`);
    /// the single-session groups use each thread's first. The ledger lives as long as they do.
    sessions: Vec<Session>,
    mutex_map: Mutex<HashMap<u32, u64>>,
    dashmap: DashMap<u32, u64>,
    /// Each thread's key in `dashmap`, each on a different shard of it.
    dashmap_keys: Vec<u32>,
}

impl Fixtures {
    fn new(threads: usize) -> Self {
        let (ledger, _sweeper) = Ledger::builder()
            .capacity(1024)
            .worker_shards(WORKER_SHARDS)
            .striped_shards(2)
            .build()
            .expect("ledger");
        // Adjacent slots, as a gateway's sessions usually are.
        let sessions = (0..threads * ROUND_ROBIN)
            .map(|i| ledger.open_session(&format!("user-{i}")).expect("slot"))
            .collect();
        let dashmap: DashMap<u32, u64> = (0..MAP_KEYS).map(|key| (key, 0)).collect();
        let mut dashmap_keys: Vec<u32> = Vec::new();
        let mut used_shards = Vec::new();
        for key in 0..MAP_KEYS {
            let shard = dashmap.determine_map(&key);
            if !used_shards.contains(&shard) {
                used_shards.push(shard);
                dashmap_keys.push(key);
                if dashmap_keys.len() == threads {
                    break;
                }
            }
        }
        assert_eq!(dashmap_keys.len(), threads, "dashmap has too few shards");
        Self {
            padded: (0..threads)
                .map(|_| CachePadded::new(AtomicU64::new(0)))
                .collect(),
            rows: (0..threads)
                .map(|_| CellRow(std::array::from_fn(|_| AtomicU64::new(0))))
                .collect(),
            shared: CachePadded::new(AtomicU64::new(0)),
            sessions,
            mutex_map: Mutex::new((0..MAP_KEYS).map(|key| (key, 0)).collect()),
            dashmap,
            dashmap_keys,
        }
    }

    fn session(&self, thread: usize) -> &Session {
        &self.sessions[thread * ROUND_ROBIN]
    }

    /// A fixed-size array, so that indexing it needs no bounds check (as for `CellRow`).
    fn sessions(&self, thread: usize) -> &[Session; ROUND_ROBIN] {
        self.sessions[thread * ROUND_ROBIN..(thread + 1) * ROUND_ROBIN]
            .try_into()
            .expect("ROUND_ROBIN sessions")
    }
}

/// Registers the calling thread, and checks that its index has a worker shard.
fn register() {
    let index = register_worker_thread().expect("worker index");
    assert!(
        index < WORKER_SHARDS,
        "worker index {index} has no worker shard: this would measure the striped path"
    );
}

fn group_name(threads: usize, suffix: &str) -> String {
    let plural = if threads == 1 { "" } else { "s" };
    format!("add_{threads}_thread{plural}{suffix}")
}

fn one_session_per_thread(c: &mut Criterion, threads: usize, fx: &Fixtures) {
    let mut group = c.benchmark_group(group_name(threads, ""));
    group.throughput(Throughput::Elements(threads as u64));

    bench_contender(&mut group, threads, "floor_load_store", |thread| {
        let cell: &AtomicU64 = black_box(&fx.padded[thread]);
        let amount = black_box(CHUNK_MS);
        move || {
            // The single-writer step of a worker's add, without the ledger around it.
            let current = cell.load(Ordering::Relaxed);
            cell.store(current.wrapping_add(amount), Ordering::Relaxed);
        }
    });

    let handles: Vec<Handle<'_>> = fx.padded.iter().map(|cell| Handle { cell }).collect();
    bench_contender(&mut group, threads, "floor_via_handle", |thread| {
        let handle: &Handle<'_> = black_box(&handles[thread]);
        let amount = black_box(CHUNK_MS);
        move || {
            let cell = handle.cell;
            let current = cell.load(Ordering::Relaxed);
            cell.store(current.wrapping_add(amount), Ordering::Relaxed);
        }
    });

    bench_contender(&mut group, threads, "session_add_worker", |thread| {
        register();
        let session: &Session = black_box(fx.session(thread));
        let amount = black_box(CHUNK_MS);
        move || session.add(amount)
    });

    bench_contender(&mut group, threads, "session_add_unregistered", |thread| {
        let session: &Session = black_box(fx.session(thread));
        let amount = black_box(CHUNK_MS);
        move || session.add(amount)
    });

    bench_contender(&mut group, threads, "striped_fetch_add", |thread| {
        let stripe: &AtomicU64 = black_box(&fx.padded[thread]);
        let amount = black_box(CHUNK_MS);
        move || {
            stripe.fetch_add(amount, Ordering::Relaxed);
        }
    });

    bench_contender(&mut group, threads, "shared_atomic_fetch_add", |_thread| {
        let shared: &AtomicU64 = black_box(&fx.shared);
        let amount = black_box(CHUNK_MS);
        move || {
            shared.fetch_add(amount, Ordering::Relaxed);
        }
    });

    bench_contender(&mut group, threads, "mutex_hashmap", |thread| {
        let map: &Mutex<HashMap<u32, u64>> = black_box(&fx.mutex_map);
        let key = black_box(thread as u32);
        let amount = black_box(CHUNK_MS);
        move || {
            let mut map = map.lock().expect("poisoned");
            if let Some(total) = map.get_mut(&key) {
                *total += amount;
            }
        }
    });

    bench_contender(&mut group, threads, "dashmap", |thread| {
        let map: &DashMap<u32, u64> = black_box(&fx.dashmap);
        let key = black_box(fx.dashmap_keys[thread]);
        let amount = black_box(CHUNK_MS);
        move || {
            if let Some(mut total) = map.get_mut(&key) {
                *total += amount;
            }
        }
    });

    group.finish();
}

fn round_robin(c: &mut Criterion, threads: usize, fx: &Fixtures) {
    let mut group = c.benchmark_group(group_name(threads, "_64_sessions"));
    group.throughput(Throughput::Elements(threads as u64));

    bench_contender(&mut group, threads, "floor_load_store", |thread| {
        let row: &CellRow = black_box(&fx.rows[thread]);
        let amount = black_box(CHUNK_MS);
        let mut next = 0;
        move || {
            let cell = &row.0[next % ROUND_ROBIN];
            next += 1;
            let current = cell.load(Ordering::Relaxed);
            cell.store(current.wrapping_add(amount), Ordering::Relaxed);
        }
    });

    bench_contender(&mut group, threads, "session_add_worker", |thread| {
        register();
        let sessions: &[Session; ROUND_ROBIN] = black_box(fx.sessions(thread));
        let amount = black_box(CHUNK_MS);
        let mut next = 0;
        move || {
            sessions[next % ROUND_ROBIN].add(amount);
            next += 1;
        }
    });

    bench_contender(&mut group, threads, "session_add_unregistered", |thread| {
        let sessions: &[Session; ROUND_ROBIN] = black_box(fx.sessions(thread));
        let amount = black_box(CHUNK_MS);
        let mut next = 0;
        move || {
            sessions[next % ROUND_ROBIN].add(amount);
            next += 1;
        }
    });

    group.finish();
}

/// Session counts of the at-scale groups: 10k fits this CPU's L2 and L3 (barely: the ledger's
/// sessions, handles and cells together), 1M fits neither.
const AT_SCALE: [(usize, &str); 2] = [(10_000, "10k"), (1_000_000, "1M")];

/// A permutation of `0..n` from a fixed seed (Fisher–Yates over splitmix64), so every contender
/// and every run visits its sessions in the same order, and that order defeats the prefetcher.
fn shuffled(n: usize) -> Vec<u32> {
    let mut state = 0x5EED_u64;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut order: Vec<u32> = (0..n as u32).collect();
    for i in (1..n).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// Cycles through `order` forever: the index of the session to add to next.
struct Visit<'a> {
    order: &'a [u32],
    next: usize,
}

impl Visit<'_> {
    #[inline(always)]
    fn next(&mut self) -> usize {
        let index = self.order[self.next] as usize;
        self.next += 1;
        if self.next == self.order.len() {
            self.next = 0;
        }
        index
    }
}

/// Many sessions, each touched once per pass in a shuffled order, as a gateway's are every
/// 20 ms: the handles and cells are rarely in cache, so this measures the misses an `add` takes.
fn at_scale(c: &mut Criterion) {
    for (sessions, label) in AT_SCALE {
        let (ledger, _sweeper) = Ledger::builder()
            .capacity(sessions)
            .worker_shards(WORKER_SHARDS)
            .striped_shards(1)
            .build()
            .expect("ledger");
        // Slot `i` belongs to session `i`: the ledger hands out slots in order.
        let ledger_sessions: Vec<Session> = (0..sessions)
            .map(|i| ledger.open_session(&format!("user-{i}")).expect("slot"))
            .collect();
        // The fair floor's cells are contiguous, like a shard's, one per session.
        let cells: Box<[AtomicU64]> = (0..sessions).map(|_| AtomicU64::new(0)).collect();
        let handles: Vec<Handle<'_>> = cells.iter().map(|cell| Handle { cell }).collect();
        let arcs: Vec<Arc<AtomicU64>> =
            (0..sessions).map(|_| Arc::new(AtomicU64::new(0))).collect();
        let order = shuffled(sessions);

        let mut group = c.benchmark_group(format!("add_{label}_sessions_shuffled"));
        group.throughput(Throughput::Elements(1));

        bench_contender(&mut group, 1, "floor_via_handle", |_| {
            let handles: &[Handle<'_>] = black_box(&handles);
            let mut visit = Visit {
                order: &order,
                next: 0,
            };
            let amount = black_box(CHUNK_MS);
            move || {
                let cell = handles[visit.next()].cell;
                let current = cell.load(Ordering::Relaxed);
                cell.store(current.wrapping_add(amount), Ordering::Relaxed);
            }
        });

        bench_contender(&mut group, 1, "arc_fetch_add", |_| {
            let arcs: &[Arc<AtomicU64>] = black_box(&arcs);
            let mut visit = Visit {
                order: &order,
                next: 0,
            };
            let amount = black_box(CHUNK_MS);
            move || {
                arcs[visit.next()].fetch_add(amount, Ordering::Relaxed);
            }
        });

        bench_contender(&mut group, 1, "session_add_worker", |_| {
            register();
            let sessions: &[Session] = black_box(&ledger_sessions);
            let mut visit = Visit {
                order: &order,
                next: 0,
            };
            let amount = black_box(CHUNK_MS);
            move || sessions[visit.next()].add(amount)
        });

        group.finish();
        black_box((&cells, &arcs));
    }
}

fn hot_path(c: &mut Criterion) {
    at_scale(c);
    for threads in [1, 2] {
        let fx = Fixtures::new(threads);
        one_session_per_thread(c, threads, &fx);
        round_robin(c, threads, &fx);
        // The cells and maps saw real adds: keep them observable to the end.
        black_box(&fx);
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(40)
        .without_plots();
    targets = hot_path
}
criterion_main!(benches);
