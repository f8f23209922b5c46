//! The simulated gateway load: which session streams at which 20 ms tick, and the driver tasks
//! that play it against one mode.
//!
//! The plan is made up front: each of `--sessions` slots holds one session from its ramp-up
//! start to the end of the run or, with `--churn`, a chain of sessions with random lifetimes and
//! short gaps. Sessions are driven in groups (`modes::sessions_per_task`), one tokio task and one
//! `interval` per group, the groups phase-shifted across the tick (a task per session costs
//! 500,000 timer wake-ups a second at 10,000 sessions). A task that falls behind catches up
//! (missed ticks fire at once) until `stop_at`, then stops; the checks compare the store with
//! the chunks actually sent.
//!
//! Hot-path samples: per-chunk, each chunk's `INCRBY`+`EXPIRE` pipeline is timed on its own;
//! shardmeter, an `add` costs less than a clock read, so a task reads `Instant` before and after
//! its tick's loop of adds and records the loop's time divided by the adds (the clock read
//! included, spread over the batch).

use fred::prelude::*;
use futures_util::future::join_all;
use hdrhistogram::Histogram;
use shardmeter::{Engine, KeyScheme, Session};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Milliseconds of audio per chunk.
pub(crate) const CHUNK_MS: u64 = 20;
/// One chunk per session and channel per tick.
const TICK: Duration = Duration::from_millis(CHUNK_MS);

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
    by_slot: Vec<Vec<PlannedSession>>,
    /// Streaming time per mode (`--seconds`).
    pub(crate) duration: Duration,
    pub(crate) total_ticks: u64,
    pub(crate) channels: u32,
    /// Sessions open at once at most (`--sessions`).
    pub(crate) slots: usize,
    pub(crate) session_count: usize,
    /// Chunks the plan sends if no task falls behind.
    pub(crate) planned_chunks: u64,
}

impl Plan {
    /// `sessions` slots streaming for `duration`, their starts spread over `ramp_up`; `churn`:
    /// see the module docs.
    pub(crate) fn new(
        sessions: usize,
        duration: Duration,
        ramp_up: Duration,
        churn: bool,
        channels: u32,
    ) -> Self {
        let ticks = |d: Duration| (d.as_nanos() / TICK.as_nanos()) as u64;
        let total_ticks = ticks(duration).max(1);
        let ramp_ticks = ticks(ramp_up).min(total_ticks - 1);
        // Churn: lifetimes from 1/8 to 3/8 of the run (at least 10 ticks), then a gap of up to
        // half a second before the slot's next user connects. A fixed seed: every run with the
        // same settings streams the same plan.
        let shortest = (total_ticks / 8).max(10);
        let longest = (total_ticks * 3 / 8).max(shortest + 1);
        let mut rng = XorShift(0x5eed);
        let slots = sessions as u64;
        let by_slot: Vec<Vec<PlannedSession>> = (0..slots)
            .map(|slot| {
                let mut start = ramp_ticks * slot / slots;
                if !churn {
                    let (uid, end) = (format!("u{slot}").into(), total_ticks);
                    return vec![PlannedSession { uid, start, end }];
                }
                let mut chain = Vec::new();
                while start < total_ticks {
                    let end = (start + rng.between(shortest, longest)).min(total_ticks);
                    let uid = format!("u{slot}.{}", chain.len()).into();
                    chain.push(PlannedSession { uid, start, end });
                    start = end + rng.between(0, 25);
                }
                chain
            })
            .collect();
        let all = by_slot.iter().flatten();
        Self {
            planned_chunks: all.map(|s| (s.end - s.start) * u64::from(channels)).sum(),
            session_count: by_slot.iter().map(Vec::len).sum(),
            by_slot,
            duration,
            total_ticks,
            channels,
            slots: sessions,
        }
    }

    /// The sessions of `per_task` consecutive slots per driver task, each group by start tick.
    pub(crate) fn groups(&self, per_task: usize) -> Vec<Vec<PlannedSession>> {
        let group = |slots: &[Vec<PlannedSession>]| {
            let mut group: Vec<PlannedSession> = slots.iter().flatten().cloned().collect();
            group.sort_by_key(|session| session.start);
            group
        };
        self.by_slot.chunks(per_task.max(1)).map(group).collect()
    }
}

/// The median cost of one `Instant::now()`, over 101 batches of 1,000 reads.
pub(crate) fn clock_read_ns() -> f64 {
    let mut batches: Vec<f64> = (0..101)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..1000 {
                std::hint::black_box(Instant::now());
            }
            started.elapsed().as_nanos() as f64 / 1000.0
        })
        .collect();
    batches.sort_by(f64::total_cmp);
    batches[50]
}

/// A small deterministic generator (xorshift64*), so a seed replays the same churn.
struct XorShift(u64);

impl XorShift {
    /// Uniform in `low..high`.
    fn between(&mut self, low: u64, high: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        low + self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % (high - low).max(1)
    }
}

/// How one chunk is accounted.
#[derive(Debug)]
pub(crate) enum Writer {
    /// The old way: a pipeline of `INCRBY key 20` + `EXPIRE key ttl` per chunk, with the same
    /// daily keys the engine writes.
    PerChunk { client: Client, keys: KeyScheme },
    /// `session.add(20)` per chunk.
    Shardmeter(Engine),
}

async fn write_chunk(client: &Client, keys: &KeyScheme, uid: &str) -> Result<(), Error> {
    // As the reference gateway did: the key and TTL of the moment, then one pipeline.
    let now = SystemTime::now();
    let key = keys.key_at(uid, now);
    let pipeline = client.pipeline();
    let () = pipeline.incr_by(&key, CHUNK_MS as i64).await?;
    let () = (pipeline.expire(&key, keys.write_ttl(now).as_secs() as i64, None)).await?;
    let (_total, _set): (i64, i64) = pipeline.all().await?;
    Ok(())
}

/// What the drivers did.
#[derive(Debug, Default)]
pub(crate) struct LoadOutcome {
    /// Chunks accounted (for per-chunk: pipelines that succeeded).
    pub(crate) chunks: u64,
    /// Chunks per uid, for the totals check.
    pub(crate) per_uid: Vec<(Arc<str>, u64)>,
    /// Hot-path samples in picoseconds (see the module docs for what a sample is).
    samples: Vec<u64>,
    /// Largest delay between a tick's due time and its handling.
    pub(crate) max_lag: Duration,
    /// Chunks not sent by tasks that hit `stop_at` with ticks left.
    pub(crate) chunks_behind: u64,
    /// Per-chunk writes that failed (their amount may or may not be in Redis).
    pub(crate) write_errors: u64,
    pub(crate) sessions_refused: u64,
    pub(crate) sessions_started: u64,
    pub(crate) first_error: Option<String>,
}

impl LoadOutcome {
    fn merge(&mut self, other: LoadOutcome) {
        self.chunks += other.chunks;
        self.per_uid.extend(other.per_uid);
        self.samples.extend(other.samples);
        self.max_lag = self.max_lag.max(other.max_lag);
        self.chunks_behind += other.chunks_behind;
        self.write_errors += other.write_errors;
        self.sessions_refused += other.sessions_refused;
        self.sessions_started += other.sessions_started;
        self.first_error = self.first_error.take().or(other.first_error);
    }

    /// The hot-path samples' distribution, in picoseconds.
    pub(crate) fn hot_path(&self) -> Histogram<u64> {
        let mut histogram = Histogram::new(3).expect("3 significant digits are supported");
        for &sample in &self.samples {
            let _ = histogram.record(sample); // auto-resizing: every value fits
        }
        histogram
    }
}

/// Runs `plan` against `writer`, `per_task` slots per driver task, from tick 0 at `start`;
/// tasks still behind at `stop_at` stop sending.
pub(crate) async fn drive(
    plan: &Plan,
    per_task: usize,
    writer: Arc<Writer>,
    start: tokio::time::Instant,
    stop_at: tokio::time::Instant,
) -> LoadOutcome {
    let groups = plan.groups(per_task);
    let count = groups.len().max(1) as u32;
    let tasks: Vec<_> = (groups.into_iter().enumerate())
        .map(|(index, sessions)| {
            // Spread the tasks' ticks over the 20 ms, as independent clients would be.
            let start = start + TICK * index as u32 / count;
            let (writer, ticks, channels) = (writer.clone(), plan.total_ticks, plan.channels);
            tokio::spawn(drive_group(
                writer, sessions, ticks, channels, start, stop_at,
            ))
        })
        .collect();
    let mut outcome = LoadOutcome::default();
    for task in tasks {
        match task.await {
            Ok(group) => outcome.merge(group),
            Err(error) => {
                outcome.write_errors += 1;
                (outcome.first_error).get_or_insert(format!("driver task failed: {error}"));
            }
        }
    }
    outcome
}

async fn drive_group(
    writer: Arc<Writer>,
    sessions: Vec<PlannedSession>,
    total_ticks: u64,
    channels: u32,
    start: tokio::time::Instant,
    stop_at: tokio::time::Instant,
) -> LoadOutcome {
    let mut outcome = LoadOutcome::default();
    let mut sent = vec![0u64; sessions.len()];
    // (index in `sessions`, one handle per channel: empty in per-chunk mode)
    let mut active: Vec<(usize, Vec<Session>)> = Vec::new();
    let mut next = 0;
    // `Burst` (the default): ticks missed while a round trip was slow fire at once, as audio
    // buffered behind a slow server would.
    let mut interval = tokio::time::interval_at(start, TICK);
    for tick in 0..total_ticks {
        let due = interval.tick().await;
        let now = tokio::time::Instant::now();
        if now >= stop_at {
            let left = |s: &PlannedSession| s.end - s.start.max(tick).min(s.end);
            outcome.chunks_behind = sessions.iter().map(left).sum::<u64>() * u64::from(channels);
            break;
        }
        outcome.max_lag = outcome.max_lag.max(now - due);

        active.retain(|&(index, _)| sessions[index].end > tick); // dropping handles ends sessions
        while next < sessions.len() && sessions[next].start <= tick {
            let handles = match &*writer {
                Writer::PerChunk { .. } => Ok(Vec::new()),
                Writer::Shardmeter(engine) => (engine.open_session(&sessions[next].uid))
                    .map(|session| vec![session; channels as usize]),
            };
            match handles {
                Ok(handles) => {
                    active.push((next, handles));
                    outcome.sessions_started += 1;
                }
                Err(error) => {
                    outcome.sessions_refused += 1;
                    let uid = &sessions[next].uid;
                    (outcome.first_error).get_or_insert(format!("open_session({uid}): {error}"));
                }
            }
            next += 1;
        }

        match &*writer {
            Writer::Shardmeter(_) => {
                let started = Instant::now();
                for channel in active.iter().flat_map(|(_, handles)| handles) {
                    channel.add(CHUNK_MS);
                }
                let elapsed = started.elapsed().as_nanos() * 1000;
                let adds = active.len() as u64 * u64::from(channels);
                if adds > 0 {
                    outcome.samples.push((elapsed / u128::from(adds)) as u64);
                }
                for (index, _) in &active {
                    sent[*index] += u64::from(channels);
                }
                outcome.chunks += adds;
            }
            Writer::PerChunk { client, keys } => {
                let writes = active.iter().flat_map(|&(index, _)| {
                    let uid = &sessions[index].uid;
                    (0..channels).map(move |_| async move {
                        let started = Instant::now();
                        let result = write_chunk(client, keys, uid).await;
                        (index, started.elapsed(), result)
                    })
                });
                for (index, elapsed, result) in join_all(writes).await {
                    outcome.samples.push((elapsed.as_nanos() * 1000) as u64);
                    match result {
                        Ok(()) => {
                            sent[index] += 1;
                            outcome.chunks += 1;
                        }
                        Err(error) => {
                            outcome.write_errors += 1;
                            let error = format!("INCRBY+EXPIRE pipeline: {error}");
                            outcome.first_error.get_or_insert(error);
                        }
                    }
                }
            }
        }
    }
    drop(active); // ends the sessions still open
    let sent_by_uid = sessions.into_iter().zip(sent).filter(|(_, n)| *n > 0);
    outcome.per_uid = sent_by_uid.map(|(s, chunks)| (s.uid, chunks)).collect();
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(churn: bool) -> Plan {
        Plan::new(10, Duration::from_secs(4), Duration::from_secs(1), churn, 2)
    }

    #[test]
    fn plan_covers_the_run_and_counts_its_chunks() {
        let plan = plan(false);
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
        let plan = plan(true);
        assert!(plan.session_count > 10);
        for chain in &plan.by_slot {
            for pair in chain.windows(2) {
                assert!(pair[0].end <= pair[1].start);
            }
            assert!((chain.iter()).all(|s| s.start < s.end && s.end <= plan.total_ticks));
        }
        // Same settings, same plan.
        assert_eq!(self::plan(true).planned_chunks, plan.planned_chunks);
    }
}
