//! The simulated gateway load: sessions `u0`…`u<N-1>` each stream one 20 ms chunk per tick for
//! the whole run, played by driver tasks against one mode.
//!
//! Sessions are driven in groups (`Mode::sessions_per_task`), one tokio task and one `interval`
//! per group, the groups phase-shifted across the tick (a task per session costs 500,000 timer
//! wake-ups a second at 10,000 sessions). A task that falls behind catches up (missed ticks fire
//! at once) until `stop_at`, then stops; the checks compare the store with the chunks actually
//! sent.
//!
//! Hot-path samples: per-chunk, each chunk's `INCRBY`+`EXPIRE` pipeline is timed on its own;
//! shardmeter, an `add` costs less than a clock read, so a task reads `Instant` before and after
//! its tick's loop of adds and records the loop's time divided by the adds (the clock read
//! included, spread over the batch).

use fred::prelude::*;
use futures_util::future::join_all;
use hdrhistogram::Histogram;
use shardmeter::{Engine, KeyScheme};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Milliseconds of audio per chunk.
pub(crate) const CHUNK_MS: u64 = 20;
/// One chunk per session per tick.
const TICK: Duration = Duration::from_millis(CHUNK_MS);

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
    pub(crate) per_uid: Vec<(String, u64)>,
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

    fn error(&mut self, error: String) {
        self.first_error.get_or_insert(error);
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

/// Runs `sessions` sessions for `duration` against `writer`, `per_task` sessions per driver
/// task, from 50 ms from now.
pub(crate) async fn drive(
    sessions: usize,
    duration: Duration,
    per_task: usize,
    writer: Arc<Writer>,
) -> LoadOutcome {
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    // A task still behind after the run plus a tenth of it (at least a second) gives up.
    let stop_at = start + duration + (duration / 10).max(Duration::from_secs(1));
    let ticks = (duration.as_nanos() / TICK.as_nanos()).max(1) as u64;
    let uids: Vec<String> = (0..sessions).map(|i| format!("u{i}")).collect();
    let groups: Vec<Vec<String>> = uids.chunks(per_task).map(<[_]>::to_vec).collect();
    let count = groups.len() as u32;
    let tasks: Vec<_> = (groups.into_iter().enumerate())
        .map(|(index, uids)| {
            // Spread the tasks' ticks over the 20 ms, as independent clients would be.
            let start = start + TICK * index as u32 / count;
            tokio::spawn(drive_group(writer.clone(), uids, ticks, start, stop_at))
        })
        .collect();
    let mut outcome = LoadOutcome::default();
    for task in tasks {
        match task.await {
            Ok(group) => outcome.merge(group),
            Err(error) => {
                outcome.write_errors += 1;
                outcome.error(format!("driver task failed: {error}"));
            }
        }
    }
    outcome
}

async fn drive_group(
    writer: Arc<Writer>,
    uids: Vec<String>,
    ticks: u64,
    start: tokio::time::Instant,
    stop_at: tokio::time::Instant,
) -> LoadOutcome {
    let mut outcome = LoadOutcome::default();
    // (uid, chunks sent) per session streaming; shardmeter mode: `sessions` holds its handle at
    // the same index.
    let (mut sent, mut sessions) = (Vec::new(), Vec::new());
    for uid in uids {
        if let Writer::Shardmeter(engine) = &*writer {
            match engine.open_session(&uid) {
                Ok(session) => sessions.push(session),
                Err(error) => {
                    outcome.sessions_refused += 1;
                    outcome.error(format!("open_session({uid}): {error}"));
                    continue;
                }
            }
        }
        sent.push((uid, 0));
    }
    outcome.sessions_started = sent.len() as u64;
    // `Burst` (the default): ticks missed while a round trip was slow fire at once, as audio
    // buffered behind a slow server would.
    let mut interval = tokio::time::interval_at(start, TICK);
    for tick in 0..ticks {
        let due = interval.tick().await;
        let now = tokio::time::Instant::now();
        if now >= stop_at {
            outcome.chunks_behind = (ticks - tick) * sent.len() as u64;
            break;
        }
        outcome.max_lag = outcome.max_lag.max(now - due);
        match &*writer {
            Writer::Shardmeter(_) => {
                let started = Instant::now();
                for session in &sessions {
                    session.add(CHUNK_MS);
                }
                let picos = started.elapsed().as_nanos() * 1000;
                if !sessions.is_empty() {
                    outcome
                        .samples
                        .push((picos / sessions.len() as u128) as u64);
                }
                sent.iter_mut().for_each(|(_, chunks)| *chunks += 1);
                outcome.chunks += sent.len() as u64;
            }
            Writer::PerChunk { client, keys } => {
                let writes = sent.iter_mut().map(|(uid, chunks)| async {
                    let started = Instant::now();
                    let result = write_chunk(client, keys, uid).await;
                    (chunks, started.elapsed(), result)
                });
                for (chunks, elapsed, result) in join_all(writes).await {
                    outcome.samples.push((elapsed.as_nanos() * 1000) as u64);
                    match result {
                        Ok(()) => {
                            *chunks += 1;
                            outcome.chunks += 1;
                        }
                        Err(error) => {
                            outcome.write_errors += 1;
                            outcome.error(format!("INCRBY+EXPIRE pipeline: {error}"));
                        }
                    }
                }
            }
        }
    }
    drop(sessions); // ends them
    outcome.per_uid = sent.into_iter().filter(|&(_, chunks)| chunks > 0).collect();
    outcome
}
