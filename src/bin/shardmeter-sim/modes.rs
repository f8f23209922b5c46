//! The two ways of accounting a chunk, each run as one measured window: Redis' counters are read
//! just before the first tick and just after the last write (for shardmeter: after
//! `engine.shutdown()` has flushed everything), then the totals are read back and checked.

use crate::load::{self, LoadOutcome, Plan, Writer, CHUNK_MS};
use crate::redis::{self, CommandDelta};
use fred::prelude::{Client, ClientLike};
use hdrhistogram::Histogram;
use shardmeter::sink::{Batch, BatchOutcome, SinkError};
use shardmeter::{Engine, KeyScheme, RedisSink, ShutdownReport, Sink};
use std::collections::{BTreeMap, BTreeSet};
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
}

/// Everything a mode needs.
#[derive(Debug)]
pub(crate) struct Context {
    pub(crate) plan: Plan,
    /// `shardmeter_sim:<run id>`: every key of the run starts with it.
    pub(crate) run_prefix: String,
    /// The run's Redis, and the sim's own connection to it (`INFO`, reads, cleanup).
    pub(crate) url: String,
    pub(crate) admin: Client,
    pub(crate) flush_interval: Duration,
    pub(crate) session_end_delay: Duration,
    pub(crate) worker_threads: usize,
}

/// Sessions per driver task in `mode`. Per-chunk: one task per session, each awaiting its own
/// round trip as the old gateway's handler did (grouping sessions makes their writes queue
/// behind each other: p50 155 µs alone, 575 µs in groups of 50, measured at 100 sessions).
/// Shardmeter: 50, so that one `Instant` pair times a batch of adds and 10,000 sessions cost
/// 0.5 s of CPU per 5 s run instead of 3.4 s with a task each.
pub(crate) fn sessions_per_task(mode: Mode) -> usize {
    match mode {
        Mode::PerChunk => 1,
        Mode::Shardmeter => 50,
    }
}

/// Did the store end up holding exactly the audio sent?
#[derive(Debug, Default)]
pub(crate) struct TotalsCheck {
    /// Chunks sent × 20 ms.
    pub(crate) expected_ms: u64,
    /// Sum of the mode's keys.
    pub(crate) found_ms: u64,
    pub(crate) keys: usize,
    /// Uids whose total differs from what they sent.
    pub(crate) wrong_uids: usize,
    /// A few of them, `uid: sent … ms, stored … ms`.
    pub(crate) examples: Vec<String>,
}

impl TotalsCheck {
    pub(crate) fn ok(&self) -> bool {
        self.wrong_uids == 0 && self.expected_ms == self.found_ms
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
            // Open sessions plus ended ones awaiting their flush: the plan never has more than
            // one session per slot open, so twice that (plus slack) never runs out.
            let capacity = (context.plan.slots * 2 + 1024).min(shardmeter::ledger::MAX_CAPACITY);
            let engine = Engine::builder()
                .flush_interval(context.flush_interval)
                .session_end_delay(context.session_end_delay)
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
    let start = window_start + Duration::from_millis(50);
    let duration = context.plan.duration;
    // A task still behind after the run plus a tenth of it (at least a second) gives up.
    let stop_at = start + duration + (duration / 10).max(Duration::from_secs(1));
    let per_task = sessions_per_task(mode);
    let load = load::drive(&context.plan, per_task, writer.clone(), start, stop_at).await;

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

    let found = totals_in_redis(admin, &key_prefix).await?;
    Ok(ModeReport {
        mode,
        window,
        totals: check(&expected_per_uid(&load), &found),
        load,
        commands: CommandDelta::between(&before, &after),
        engine,
    })
}

fn expected_per_uid(load: &LoadOutcome) -> BTreeMap<String, u64> {
    let mut expected = BTreeMap::new();
    for (uid, chunks) in &load.per_uid {
        *expected.entry(uid.to_string()).or_default() += chunks * CHUNK_MS;
    }
    expected
}

/// The uid of a key `<prefix>:<uid>:<YYYYMMDD>` (the uid as given, so it is what lies between
/// the prefix and the date).
fn uid_of<'k>(key: &'k str, prefix: &str) -> Option<&'k str> {
    let rest = key.strip_prefix(prefix)?.strip_prefix(':')?;
    let (uid, day) = rest.rsplit_once(':')?;
    (day.len() == 8 && day.bytes().all(|b| b.is_ascii_digit())).then_some(uid)
}

/// Totals per uid found in the store, and the number of keys.
type Found = (BTreeMap<String, u64>, usize);

async fn totals_in_redis(admin: &Client, prefix: &str) -> Result<Found, String> {
    let keys = redis::scan_keys(admin, &format!("{prefix}:*")).await?;
    let values = redis::values(admin, &keys).await?;
    let mut per_uid = BTreeMap::new();
    for (key, value) in keys.iter().zip(values) {
        let uid = uid_of(key, prefix).ok_or_else(|| format!("unexpected key {key:?}"))?;
        let value = u64::try_from(value).map_err(|_| format!("{key} holds {value}"))?;
        *per_uid.entry(uid.to_owned()).or_default() += value;
    }
    Ok((per_uid, keys.len()))
}

fn check(expected: &BTreeMap<String, u64>, (found, keys): &Found) -> TotalsCheck {
    let mut check = TotalsCheck {
        expected_ms: expected.values().sum(),
        found_ms: found.values().sum(),
        keys: *keys,
        ..TotalsCheck::default()
    };
    for uid in expected.keys().chain(found.keys()).collect::<BTreeSet<_>>() {
        let want = expected.get(uid).copied().unwrap_or(0);
        let got = found.get(uid).copied().unwrap_or(0);
        if want != got {
            check.wrong_uids += 1;
            if check.examples.len() < 5 {
                (check.examples).push(format!("{uid}: sent {want} ms, stored {got} ms"));
            }
        }
    }
    check
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_lie_between_the_prefix_and_the_date() {
        let prefix = "shardmeter_sim:ab:shardmeter";
        assert_eq!(
            uid_of("shardmeter_sim:ab:shardmeter:u12.3:20261129", prefix),
            Some("u12.3")
        );
        assert_eq!(
            uid_of("shardmeter_sim:ab:shardmeter:a:b:20261129", prefix),
            Some("a:b")
        );
        assert_eq!(uid_of("shardmeter_sim:ab:shardmeter:u1", prefix), None);
        assert_eq!(uid_of("other:u1:20261129", prefix), None);
    }

    #[test]
    fn check_finds_missing_extra_and_wrong_totals() {
        let map = |pairs: &[(&str, u64)]| -> BTreeMap<String, u64> {
            pairs
                .iter()
                .map(|&(uid, ms)| (uid.to_owned(), ms))
                .collect()
        };
        let expected = map(&[("a", 40), ("b", 20)]);
        assert!(check(&expected, &(map(&[("a", 40), ("b", 20)]), 2)).ok());
        let result = check(&expected, &(map(&[("a", 40), ("c", 20)]), 2));
        assert!(!result.ok());
        assert_eq!(result.wrong_uids, 2);
        assert_eq!(result.expected_ms, result.found_ms); // the sums agree, the uids do not
    }
}
