//! The simulated gateway load: which session streams audio at which 20 ms tick, and the driver
//! tasks that play it against one mode.
//!
//! # Shape
//!
//! Time is counted in ticks of 20 ms (one chunk per session and channel per tick). The plan is
//! made up front: each of `--sessions` slots holds one session from its ramp-up start to the
//! end of the run, or, with `--churn`, a chain of sessions with random lifetimes and short gaps.
//! So the audio a run must account for is known before it starts.
//!
//! Sessions are split into groups of `--sessions-per-task`; one tokio task drives a group with
//! its own `tokio::time::interval` (groups are phase-shifted across the tick). With one task
//! per session, 10,000 sessions cost 500,000 timer wake-ups a second, which on two cores eats
//! most of the CPU budget before any accounting is done; a few hundred group tasks cost
//! nothing. `--sessions-per-task 1` gives the one-task-per-session shape for comparison.
//!
//! A task that falls behind catches up (missed ticks fire at once, like audio buffered by a slow
//! server) until `stop_at`, when it stops sending: what it did not send is reported as behind,
//! and the checks compare Redis with what was actually sent.
//!
//! # Hot-path timing
//!
//! - per-chunk: each chunk's `INCRBY`+`EXPIRE` pipeline is timed on its own with `Instant` (a
//!   round trip of tens of microseconds; the clock's ~20 ns do not matter);
//! - shardmeter: an `add` takes about a nanosecond, less than reading the clock. So the task reads
//!   `Instant` once before and once after the tick's loop of `session.add(20)` calls over its
//!   group, and records the loop's time divided by the number of adds: one sample per task and
//!   tick, a per-add mean over the batch. The clock's own cost (one read per batch) is included
//!   and spread over the batch.

use crate::histogram::Histogram;
use fred::prelude::*;
use futures_util::future::join_all;
use shardmeter::{Engine, KeyScheme, Session};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Milliseconds of audio per chunk.
pub(crate) const CHUNK_MS: u64 = 20;
/// One chunk per session and channel per tick.
pub(crate) const TICK: Duration = Duration::from_millis(CHUNK_MS);

/// The parts of the command line that shape the load.
#[derive(Debug, Clone)]
pub(crate) struct LoadSettings {
    pub(crate) sessions: usize,
    pub(crate) duration: Duration,
    pub(crate) ramp_up: Duration,
    pub(crate) churn: bool,
    pub(crate) channels: u32,
    pub(crate) seed: u64,
}

/// One session of the plan: `uid` streams from tick `start` (included) to `end` (excluded).
#[derive(Debug, Clone)]
pub(crate) struct PlannedSession {
    pub(crate) uid: Arc<str>,
    pub(crate) start: u64,
    pub(crate) end: u64,
}

/// Every session of the run, by slot.
#[derive(Debug)]
pub(crate) struct Plan {
    slots_sessions: Vec<Vec<PlannedSession>>,
    pub(crate) total_ticks: u64,
    pub(crate) channels: u32,
    /// Sessions open at once at most (`--sessions`).
    pub(crate) slots: usize,
    pub(crate) session_count: usize,
    /// Chunks the plan sends if no task falls behind.
    pub(crate) planned_chunks: u64,
}

impl Plan {
    /// Lays out the sessions.
    pub(crate) fn new(settings: &LoadSettings) -> Self {
        let total_ticks = ticks(settings.duration).max(1);
        let ramp_ticks = ticks(settings.ramp_up).min(total_ticks - 1);
        let slots = settings.sessions as u64;
        let mut rng = XorShift::new(settings.seed);
        let mut sessions_by_slot = Vec::with_capacity(settings.sessions);
        for slot in 0..slots {
            let mut start = ramp_ticks * slot / slots;
            let mut chain = Vec::new();
            if settings.churn {
                // Lifetimes from 1/8 to 3/8 of the run (at least 10 ticks), then a gap of up to
                // half a second before the slot's next user connects.
                let shortest = (total_ticks / 8).max(10);
                let longest = (total_ticks * 3 / 8).max(shortest + 1);
                let mut generation = 0u32;
                while start < total_ticks {
                    let end = (start + rng.between(shortest, longest)).min(total_ticks);
                    chain.push(PlannedSession {
                        uid: format!("u{slot}.{generation}").into(),
                        start,
                        end,
                    });
                    generation += 1;
                    start = end + rng.between(0, 25);
                }
            } else {
                chain.push(PlannedSession {
                    uid: format!("u{slot}").into(),
                    start,
                    end: total_ticks,
                });
            }
            sessions_by_slot.push(chain);
        }
        let planned_chunks = sessions_by_slot
            .iter()
            .flatten()
            .map(|session| (session.end - session.start) * u64::from(settings.channels))
            .sum();
        let session_count = sessions_by_slot.iter().map(Vec::len).sum();
        Self {
            slots_sessions: sessions_by_slot,
            total_ticks,
            channels: settings.channels,
            slots: settings.sessions,
            session_count,
            planned_chunks,
        }
    }
}

impl Plan {
    /// The sessions of `per_task` consecutive slots per driver task, each group by start tick.
    pub(crate) fn groups(&self, per_task: usize) -> Vec<Vec<PlannedSession>> {
        self.slots_sessions
            .chunks(per_task.max(1))
            .map(|slots| {
                let mut group: Vec<PlannedSession> = slots.iter().flatten().cloned().collect();
                group.sort_by_key(|session| session.start);
                group
            })
            .collect()
    }
}

fn ticks(duration: Duration) -> u64 {
    (duration.as_nanos() / TICK.as_nanos()) as u64
}

/// A small deterministic generator (xorshift64*), so a seed replays the same churn.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `low..high` (`low` when the range is empty).
    fn between(&mut self, low: u64, high: u64) -> u64 {
        if high <= low {
            low
        } else {
            low + self.next() % (high - low)
        }
    }
}

/// Live counters the drivers bump once per tick, for the live display.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    pub(crate) chunks: AtomicU64,
    pub(crate) active_sessions: AtomicU64,
    pub(crate) behind_tasks: AtomicU64,
}

/// How one chunk is accounted.
#[derive(Debug)]
pub(crate) enum Writer {
    /// The old way: a pipeline of `INCRBY key 20` + `EXPIRE key ttl` per chunk.
    PerChunk {
        /// The measured connection.
        client: Client,
        /// The same daily key scheme the engine uses, so keys look alike.
        keys: KeyScheme,
    },
    /// `session.add(20)` per chunk.
    Shardmeter(Engine),
}

impl Writer {
    async fn write_chunk(client: &Client, keys: &KeyScheme, uid: &str) -> Result<(), Error> {
        // As the reference gateway did: the key and TTL of the moment, then one pipeline.
        let now = SystemTime::now();
        let key = keys.key_at(uid, now);
        let ttl = keys.write_ttl(now).as_secs() as i64;
        let pipeline = client.pipeline();
        let () = pipeline.incr_by(&key, CHUNK_MS as i64).await?;
        let () = pipeline.expire(&key, ttl, None).await?;
        let (_total, _set): (i64, i64) = pipeline.all().await?;
        Ok(())
    }
}

/// When the drivers run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    /// Tick 0 of the first group.
    pub(crate) start: tokio::time::Instant,
    /// A task still behind at this instant stops sending.
    pub(crate) stop_at: tokio::time::Instant,
}

/// What the drivers did.
#[derive(Debug, Default)]
pub(crate) struct LoadOutcome {
    /// Chunks accounted (for per-chunk: pipelines that succeeded).
    pub(crate) chunks: u64,
    /// Chunks per uid, for the totals check.
    pub(crate) per_uid: Vec<(Arc<str>, u64)>,
    /// Per-chunk call time (picoseconds); see the module docs for what a sample is.
    pub(crate) hot_path: Histogram,
    /// Largest delay between a tick's due time and its handling.
    pub(crate) max_lag: Duration,
    /// Tasks that hit `stop_at` with ticks left.
    pub(crate) tasks_behind: u64,
    /// Chunks planned but not sent because a task was behind.
    pub(crate) chunks_behind: u64,
    /// Per-chunk writes that failed (their amount may or may not be in Redis).
    pub(crate) write_errors: u64,
    /// Sessions the engine refused to open.
    pub(crate) sessions_refused: u64,
    /// Sessions started.
    pub(crate) sessions_started: u64,
    /// The first error seen, for the report.
    pub(crate) first_error: Option<String>,
    /// Shardmeter: bit `i` set when adds ran on the thread with worker index `i` (bit 63: an
    /// index of 63 or more, or an unregistered thread).
    pub(crate) worker_indices: u64,
}

impl LoadOutcome {
    fn merge(&mut self, other: LoadOutcome) {
        self.chunks += other.chunks;
        self.per_uid.extend(other.per_uid);
        self.hot_path.merge(&other.hot_path);
        self.max_lag = self.max_lag.max(other.max_lag);
        self.tasks_behind += other.tasks_behind;
        self.chunks_behind += other.chunks_behind;
        self.write_errors += other.write_errors;
        self.sessions_refused += other.sessions_refused;
        self.sessions_started += other.sessions_started;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.worker_indices |= other.worker_indices;
    }
}

/// Runs `plan` against `writer`, `per_task` slots per driver task, and waits for all tasks.
pub(crate) async fn drive(
    plan: &Plan,
    per_task: usize,
    writer: Arc<Writer>,
    timing: Timing,
    progress: Arc<Progress>,
) -> LoadOutcome {
    let groups = plan.groups(per_task);
    let count = groups.len().max(1) as u32;
    let tasks: Vec<_> = groups
        .into_iter()
        .enumerate()
        .map(|(index, sessions)| {
            // Spread the tasks' ticks over the 20 ms, as independent clients would be.
            let phase = TICK * index as u32 / count;
            tokio::spawn(drive_group(
                writer.clone(),
                sessions,
                plan.total_ticks,
                plan.channels,
                timing,
                phase,
                progress.clone(),
            ))
        })
        .collect();
    let mut outcome = LoadOutcome::default();
    for task in tasks {
        match task.await {
            Ok(group) => outcome.merge(group),
            Err(error) => {
                outcome
                    .first_error
                    .get_or_insert(format!("driver task failed: {error}"));
                outcome.write_errors += 1;
            }
        }
    }
    outcome
}

struct Active {
    /// Index in the group's plan.
    index: usize,
    end: u64,
    /// Shardmeter: one handle per channel. Per-chunk: empty.
    channels: Vec<Session>,
}

async fn drive_group(
    writer: Arc<Writer>,
    sessions: Vec<PlannedSession>,
    total_ticks: u64,
    channels: u32,
    timing: Timing,
    phase: Duration,
    progress: Arc<Progress>,
) -> LoadOutcome {
    let mut outcome = LoadOutcome::default();
    let mut sent = vec![0u64; sessions.len()];
    let mut active: Vec<Active> = Vec::new();
    let mut next = 0;
    // `Burst` (the default): ticks missed while a round trip was slow fire at once, as audio
    // buffered behind a slow server would.
    let mut interval = tokio::time::interval_at(timing.start + phase, TICK);
    for tick in 0..total_ticks {
        let due = interval.tick().await;
        let now = tokio::time::Instant::now();
        if now >= timing.stop_at {
            outcome.tasks_behind = 1;
            outcome.chunks_behind = sessions
                .iter()
                .map(|s| {
                    (s.end.min(total_ticks) - s.start.max(tick).min(s.end)) * u64::from(channels)
                })
                .sum();
            progress.behind_tasks.fetch_add(1, Ordering::Relaxed);
            break;
        }
        outcome.max_lag = outcome.max_lag.max(now - due);

        let before = active.len();
        active.retain(|session| session.end > tick); // dropping the handles ends the session
        progress
            .active_sessions
            .fetch_sub((before - active.len()) as u64, Ordering::Relaxed);
        while next < sessions.len() && sessions[next].start <= tick {
            let planned = &sessions[next];
            let handles = match &*writer {
                Writer::PerChunk { .. } => Ok(Vec::new()),
                Writer::Shardmeter(engine) => engine
                    .open_session(&planned.uid)
                    .map(|session| vec![session; channels as usize]),
            };
            match handles {
                Ok(handles) => {
                    active.push(Active {
                        index: next,
                        end: planned.end,
                        channels: handles,
                    });
                    outcome.sessions_started += 1;
                    progress.active_sessions.fetch_add(1, Ordering::Relaxed);
                }
                Err(error) => {
                    outcome.sessions_refused += 1;
                    outcome
                        .first_error
                        .get_or_insert(format!("open_session({}): {error}", planned.uid));
                }
            }
            next += 1;
        }

        let chunks = match &*writer {
            Writer::Shardmeter(_) => {
                let started = Instant::now();
                for session in &active {
                    for channel in &session.channels {
                        channel.add(CHUNK_MS);
                    }
                }
                let elapsed = started.elapsed();
                let adds = active.len() as u64 * u64::from(channels);
                if adds > 0 {
                    let picos = elapsed.as_nanos().saturating_mul(1000) / u128::from(adds);
                    outcome
                        .hot_path
                        .record(u64::try_from(picos).unwrap_or(u64::MAX));
                }
                for session in &active {
                    sent[session.index] += u64::from(channels);
                }
                // Which worker shard those adds went to: on a registered thread this returns
                // its index (one thread-local read); the runtime registers every worker.
                let index = shardmeter::register_worker_thread().map_or(63, |i| i.min(63));
                outcome.worker_indices |= 1 << index;
                adds
            }
            Writer::PerChunk { client, keys } => {
                let sessions = &sessions;
                let writes = active.iter().flat_map(|session| {
                    (0..channels).map(move |_| async move {
                        let started = Instant::now();
                        let result =
                            Writer::write_chunk(client, keys, &sessions[session.index].uid).await;
                        (session.index, started.elapsed(), result)
                    })
                });
                let mut ok = 0;
                for (index, elapsed, result) in join_all(writes).await {
                    let picos = elapsed.as_nanos().saturating_mul(1000);
                    outcome
                        .hot_path
                        .record(u64::try_from(picos).unwrap_or(u64::MAX));
                    match result {
                        Ok(()) => {
                            sent[index] += 1;
                            ok += 1;
                        }
                        Err(error) => {
                            outcome.write_errors += 1;
                            outcome
                                .first_error
                                .get_or_insert(format!("INCRBY+EXPIRE pipeline: {error}"));
                        }
                    }
                }
                ok
            }
        };
        outcome.chunks += chunks;
        progress.chunks.fetch_add(chunks, Ordering::Relaxed);
    }
    progress
        .active_sessions
        .fetch_sub(active.len() as u64, Ordering::Relaxed);
    drop(active); // ends the sessions still open
    outcome.per_uid = sessions
        .into_iter()
        .zip(sent)
        .filter(|(_, chunks)| *chunks > 0)
        .map(|(session, chunks)| (session.uid, chunks))
        .collect();
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(churn: bool) -> LoadSettings {
        LoadSettings {
            sessions: 10,
            duration: Duration::from_secs(4),
            ramp_up: Duration::from_secs(1),
            churn,
            channels: 2,
            seed: 7,
        }
    }

    #[test]
    fn plan_covers_the_run_and_counts_its_chunks() {
        let plan = Plan::new(&settings(false));
        assert_eq!(plan.total_ticks, 200);
        assert_eq!(plan.groups(3).len(), 4);
        assert_eq!(plan.groups(1).len(), 10);
        assert_eq!(plan.session_count, 10);
        let groups = plan.groups(3);
        let all: Vec<_> = groups.iter().flatten().collect();
        // Ramp-up: slot i starts at 50 * i / 10 ticks.
        assert_eq!(all.iter().map(|s| s.start).max(), Some(45));
        let chunks: u64 = all.iter().map(|s| (s.end - s.start) * 2).sum();
        assert_eq!(plan.planned_chunks, chunks);
    }

    #[test]
    fn churn_chains_sessions_without_overlap() {
        let plan = Plan::new(&settings(true));
        assert!(plan.session_count > 10);
        for group in &plan.groups(3) {
            let mut by_slot = std::collections::BTreeMap::<&str, Vec<&PlannedSession>>::new();
            for session in group {
                let slot = session.uid.split('.').next().unwrap();
                by_slot.entry(slot).or_default().push(session);
            }
            for chain in by_slot.values() {
                for pair in chain.windows(2) {
                    assert!(pair[0].end <= pair[1].start);
                }
                assert!(chain
                    .iter()
                    .all(|s| s.start < s.end && s.end <= plan.total_ticks));
            }
        }
        // Same seed, same plan.
        let again = Plan::new(&settings(true));
        assert_eq!(again.planned_chunks, plan.planned_chunks);
    }
}
