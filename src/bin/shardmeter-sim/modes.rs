//! The two ways of accounting a chunk, each run as one measured window: Redis' counters are read
//! just before the first tick and just after the last write (for shardmeter: after
//! `engine.shutdown()` has flushed everything), then the totals are read back and checked.

use crate::load::{self, LoadOutcome, Writer, CHUNK_MS};
use crate::redis::{self, CommandDelta};
use fred::prelude::{Client, ClientLike};
use hdrhistogram::Histogram;
use shardmeter::sink::{Batch, BatchOutcome, SinkError};
use shardmeter::{Engine, KeyScheme, RedisSink, ShutdownReport, Sink};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    PerChunk,
    Shardmeter,
}

impl Mode {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Mode::PerChunk => "per-chunk",
            Mode::Shardmeter => "shardmeter",
        }
    }

    /// Sessions per driver task. Per-chunk: one task per session, each awaiting its own round
    /// trip as the old gateway's handler did (grouping sessions makes their writes queue behind
    /// each other: p50 155 µs alone, 575 µs in groups of 50, measured at 100 sessions).
    /// Shardmeter: 50, so that one `Instant` pair times a batch of adds and 10,000 sessions cost
    /// 0.5 s of CPU per 5 s run instead of 3.4 s with a task each.
    pub(crate) fn sessions_per_task(self) -> usize {
        match self {
            Mode::PerChunk => 1,
            Mode::Shardmeter => 50,
        }
    }
}

/// Everything a mode needs.
#[derive(Debug)]
pub(crate) struct Context {
    pub(crate) sessions: usize,
    /// Streaming time per mode.
    pub(crate) duration: Duration,
    /// `shardmeter_sim:<run id>`: every key of the run starts with it.
    pub(crate) run_prefix: String,
    /// The run's Redis, and the sim's own connection to it (`INFO`, reads, cleanup).
    pub(crate) url: String,
    pub(crate) admin: Client,
    pub(crate) flush_interval: Duration,
    pub(crate) worker_threads: usize,
}

/// Did the store end up holding exactly the audio sent?
#[derive(Debug)]
pub(crate) struct TotalsCheck {
    /// Chunks sent × 20 ms.
    pub(crate) expected_ms: u64,
    /// Sum of the mode's keys.
    pub(crate) found_ms: u64,
    /// Uids whose total differs from what they sent: `uid: sent … ms, stored … ms`.
    pub(crate) wrong: Vec<String>,
}

impl TotalsCheck {
    pub(crate) fn ok(&self) -> bool {
        self.wrong.is_empty() && self.expected_ms == self.found_ms
    }
}

/// Shardmeter mode's engine figures.
#[derive(Debug)]
pub(crate) struct EngineFigures {
    /// Every write round's time in µs, taken around the sink's `write` (see [`Timed`]).
    pub(crate) flush_micros: Histogram<u64>,
    /// How long `engine.shutdown()` took (its final sweep and flush).
    pub(crate) shutdown: Duration,
    pub(crate) report: ShutdownReport,
    pub(crate) stats: shardmeter::StatsSnapshot,
}

/// One mode's results.
#[derive(Debug)]
pub(crate) struct ModeReport {
    pub(crate) mode: Mode,
    /// The measured window.
    pub(crate) window: Duration,
    pub(crate) load: LoadOutcome,
    /// From Redis' own counters.
    pub(crate) commands: CommandDelta,
    pub(crate) totals: TotalsCheck,
    pub(crate) engine: Option<EngineFigures>,
}

impl ModeReport {
    /// All checks of this mode passed.
    pub(crate) fn ok(&self) -> bool {
        self.totals.ok()
            && self.load.write_errors == 0
            && self.load.sessions_refused == 0
            && (self.engine.as_ref()).is_none_or(|engine| engine.report.is_complete())
    }
}

/// A sink that times every write round of the one it wraps: exact per-round figures, where
/// sampling `stats().last_flush_micros` would miss or repeat rounds.
struct Timed<S> {
    inner: S,
    micros: Arc<Mutex<Histogram<u64>>>,
}

impl<S: Sink> Sink for Timed<S> {
    async fn write(&self, batches: &[Batch]) -> Vec<Result<BatchOutcome, SinkError>> {
        let started = Instant::now();
        let results = self.inner.write(batches).await;
        let micros = started.elapsed().as_micros() as u64;
        let mut histogram = self.micros.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = histogram.record(micros); // auto-resizing: every value fits
        results
    }

    async fn read_totals(&self, keys: &[String]) -> Result<Vec<Option<i64>>, SinkError> {
        self.inner.read_totals(keys).await
    }

    fn commands_sent(&self) -> u64 {
        self.inner.commands_sent()
    }
}

/// Runs `mode` once.
pub(crate) async fn run(context: &Context, mode: Mode) -> Result<ModeReport, String> {
    let key_prefix = format!("{}:{}", context.run_prefix, mode.name().replace('-', "_"));
    let keys = KeyScheme::daily_utc(key_prefix.clone());
    let flush_micros = Arc::new(Mutex::new(Histogram::new(3).map_err(|e| e.to_string())?));
    let (url, admin) = (&context.url, &context.admin);

    // Set up everything that connects before the window opens.
    let writer = Arc::new(match mode {
        Mode::PerChunk => Writer::PerChunk {
            client: redis::connect(url).await?,
            keys,
        },
        Mode::Shardmeter => {
            let sink = RedisSink::builder()
                .marker_prefix(format!("{}:batch", context.run_prefix))
                .connect(url)
                .await
                .map_err(|e| format!("RedisSink: {e}"))?;
            // Open sessions plus ended ones awaiting their flush, with slack.
            let capacity = (context.sessions * 2 + 1024).min(shardmeter::ledger::MAX_CAPACITY);
            let engine = Engine::builder()
                .flush_interval(context.flush_interval)
                .capacity(capacity)
                // One private shard per tokio worker (registered in `on_thread_start`).
                .worker_shards(context.worker_threads)
                .keys(keys)
                .sink(Timed {
                    inner: sink,
                    micros: flush_micros.clone(),
                })
                .build()
                .map_err(|e| format!("engine: {e}"))?;
            Writer::Shardmeter(engine)
        }
    });

    let before = redis::counters(admin).await?;
    let window_start = Instant::now();
    let per_task = mode.sessions_per_task();
    let load = load::drive(context.sessions, context.duration, per_task, writer.clone()).await;

    let engine = match &*writer {
        Writer::Shardmeter(engine) => {
            let shutdown_started = Instant::now();
            let report = (engine.shutdown().await).map_err(|e| format!("engine shutdown: {e}"))?;
            let flush_micros = flush_micros.lock().unwrap_or_else(PoisonError::into_inner);
            Some(EngineFigures {
                flush_micros: flush_micros.clone(),
                shutdown: shutdown_started.elapsed(),
                report,
                stats: engine.stats(),
            })
        }
        Writer::PerChunk { .. } => None,
    };
    let after = redis::counters(admin).await?;
    let window = window_start.elapsed();
    if let Writer::PerChunk { client, .. } = &*writer {
        let _ = client.quit().await; // after the window: the old gateway never quits
    }

    let found = redis::totals(admin, &key_prefix).await?;
    Ok(ModeReport {
        mode,
        window,
        totals: check(&load.per_uid, found),
        load,
        commands: CommandDelta::between(&before, &after)?,
        engine,
    })
}

/// Compares the chunks sent per uid (each uid once) with the totals found per uid.
fn check(sent: &[(String, u64)], mut found: BTreeMap<String, u64>) -> TotalsCheck {
    let expected_ms = sent.iter().map(|(_, chunks)| chunks * CHUNK_MS).sum();
    let found_ms = found.values().sum();
    let mut wrong = Vec::new();
    for (uid, chunks) in sent {
        let (want, got) = (chunks * CHUNK_MS, found.remove(uid).unwrap_or(0));
        if want != got {
            wrong.push(format!("{uid}: sent {want} ms, stored {got} ms"));
        }
    }
    wrong.extend(
        found
            .iter()
            .map(|(uid, got)| format!("{uid}: sent 0 ms, stored {got} ms")),
    );
    TotalsCheck {
        expected_ms,
        found_ms,
        wrong,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_finds_missing_extra_and_wrong_totals() {
        let sent = |pairs: &[(&str, u64)]| -> Vec<(String, u64)> {
            pairs.iter().map(|&(uid, n)| (uid.to_owned(), n)).collect()
        };
        let found = |pairs: &[(&str, u64)]| -> BTreeMap<String, u64> {
            pairs
                .iter()
                .map(|&(uid, ms)| (uid.to_owned(), ms))
                .collect()
        };
        let chunks = sent(&[("a", 2), ("b", 1)]);
        assert!(check(&chunks, found(&[("a", 40), ("b", 20)])).ok());
        let wrong = check(&chunks, found(&[("a", 40), ("c", 20)]));
        assert!(!wrong.ok());
        assert_eq!(wrong.expected_ms, wrong.found_ms); // the sums agree, the uids do not
        let expected = ["b: sent 20 ms, stored 0 ms", "c: sent 0 ms, stored 20 ms"];
        assert_eq!(wrong.wrong, expected);
        let wrong = check(&chunks, found(&[("a", 40), ("b", 40)])).wrong;
        assert_eq!(wrong, ["b: sent 20 ms, stored 40 ms"]);
    }
}
