//! The two ways of accounting a chunk, each run as one measured window: Redis' counters are read
//! just before the first tick and just after the last write (for shardmeter: after
//! `engine.shutdown()` has flushed everything), then the totals are read back and checked.

use crate::load::{self, LoadOutcome, Plan, Progress, Timing, Writer, CHUNK_MS};
use crate::monitor::{self, FlushSamples, Watch};
use crate::redis::{self as redis_util, CommandDelta};
use fred::prelude::*;
use shardmeter::sink::redis::RedisSink;
use shardmeter::{Engine, KeyScheme, MemorySink, ShutdownReport};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// Which mode.
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

    /// Names the mode in keys.
    fn key_part(self) -> &'static str {
        match self {
            Mode::PerChunk => "per_chunk",
            Mode::Shardmeter => "shardmeter",
        }
    }
}

/// Where totals go.
#[derive(Debug, Clone)]
pub(crate) enum Store {
    /// A Redis server, and the sim's own connection to it (reads, `INFO`, cleanup).
    Redis { url: String, admin: Client },
    /// No Redis: the engine writes to a `MemorySink` (shardmeter mode only).
    Memory,
}

/// Engine settings for shardmeter mode.
#[derive(Debug, Clone)]
pub(crate) struct EngineSettings {
    pub(crate) flush_interval: Duration,
    pub(crate) session_end_delay: Duration,
    pub(crate) worker_threads: usize,
}

/// Everything a mode needs.
#[derive(Debug)]
pub(crate) struct Context {
    pub(crate) plan: Arc<Plan>,
    pub(crate) duration: Duration,
    pub(crate) run_id: String,
    pub(crate) store: Store,
    pub(crate) engine: EngineSettings,
    /// `--sessions-per-task`, if given.
    pub(crate) per_task: Option<usize>,
    pub(crate) live: bool,
}

impl Context {
    /// Sessions per driver task in `mode`. Per-chunk: one task per session, each awaiting its
    /// own round trip as the old gateway's handler did (grouping sessions makes their writes
    /// queue behind each other: p50 155 µs alone, 575 µs in groups of 50, measured at 100
    /// sessions). Shardmeter: 50, so that one `Instant` pair times a batch of adds and 10,000
    /// sessions cost 0.5 s of CPU per 5 s run instead of 3.4 s with a task each.
    pub(crate) fn sessions_per_task(&self, mode: Mode) -> usize {
        self.per_task.unwrap_or(match mode {
            Mode::PerChunk => 1,
            Mode::Shardmeter => 50,
        })
    }

    /// Every key of this run starts with this.
    pub(crate) fn run_prefix(&self) -> String {
        run_prefix(&self.run_id)
    }

    fn key_prefix(&self, mode: Mode) -> String {
        format!("{}:{}", self.run_prefix(), mode.key_part())
    }
}

/// `shardmeter_sim:<run id>`.
pub(crate) fn run_prefix(run_id: &str) -> String {
    format!("shardmeter_sim:{run_id}")
}

/// Did the store end up holding exactly the audio sent?
#[derive(Debug, Default)]
pub(crate) struct TotalsCheck {
    /// Chunks sent × 20 ms.
    pub(crate) expected_ms: u64,
    /// Sum of the mode's keys.
    pub(crate) found_ms: u64,
    /// Keys found.
    pub(crate) keys: usize,
    /// Uids whose total differs from what they sent.
    pub(crate) wrong_uids: usize,
    /// A few of them, `uid: expected vs found`.
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
    pub(crate) samples: FlushSamples,
    /// How long `engine.shutdown()` took (its final sweep and flush).
    pub(crate) shutdown: Duration,
    pub(crate) report: ShutdownReport,
    pub(crate) stats: shardmeter::StatsSnapshot,
}

/// One mode's results.
#[derive(Debug)]
pub(crate) struct ModeReport {
    pub(crate) mode: Mode,
    /// `redis` or `memory`.
    pub(crate) sink: &'static str,
    pub(crate) key_prefix: String,
    /// Sessions per driver task.
    pub(crate) sessions_per_task: usize,
    /// The measured window.
    pub(crate) window: Duration,
    pub(crate) load: LoadOutcome,
    /// From Redis' own counters; `None` without Redis.
    pub(crate) commands: Option<CommandDelta>,
    pub(crate) totals: TotalsCheck,
    pub(crate) engine: Option<EngineFigures>,
}

impl ModeReport {
    /// All checks of this mode passed.
    pub(crate) fn ok(&self) -> bool {
        self.totals.ok()
            && self.load.write_errors == 0
            && self.load.sessions_refused == 0
            && self
                .engine
                .as_ref()
                .is_none_or(|engine| engine.report.is_complete())
    }
}

/// Runs `mode` once.
pub(crate) async fn run(context: &Context, mode: Mode) -> Result<ModeReport, String> {
    let key_prefix = context.key_prefix(mode);
    let keys = KeyScheme::daily_utc(key_prefix.clone());
    let progress = Arc::new(Progress::default());

    // Set up everything that connects before the window opens.
    let (writer, memory) = match (mode, &context.store) {
        (Mode::PerChunk, Store::Redis { url, .. }) => {
            let client = redis_util::connect(url).await?;
            (
                Writer::PerChunk {
                    client,
                    keys: keys.clone(),
                },
                None,
            )
        }
        (Mode::PerChunk, Store::Memory) => {
            return Err(
                "per-chunk mode needs Redis: pass --redis URL or put redis-server on PATH".into(),
            )
        }
        (Mode::Shardmeter, Store::Redis { url, .. }) => {
            let sink = RedisSink::builder()
                .marker_prefix(format!("{}:batch", context.run_prefix()))
                .connect(url)
                .await
                .map_err(|e| format!("RedisSink: {e}"))?;
            (
                Writer::Shardmeter(build_engine(context, keys.clone(), sink)?),
                None,
            )
        }
        (Mode::Shardmeter, Store::Memory) => {
            let sink = MemorySink::new();
            let engine = build_engine(context, keys.clone(), sink.clone())?;
            (Writer::Shardmeter(engine), Some(sink))
        }
    };
    let writer = Arc::new(writer);
    let engine = match &*writer {
        Writer::Shardmeter(engine) => Some(engine.clone()),
        Writer::PerChunk { .. } => None,
    };
    let admin = match &context.store {
        Store::Redis { admin, .. } => Some(admin.clone()),
        Store::Memory => None,
    };

    let before = match &admin {
        Some(admin) => Some(redis_util::counters(admin).await?),
        None => None,
    };
    let window_start = Instant::now();
    let start = window_start + Duration::from_millis(50);
    let timing = Timing {
        start,
        // A task still behind after the run plus a tenth of it (at least a second) gives up.
        stop_at: start + context.duration + (context.duration / 10).max(Duration::from_secs(1)),
    };
    let (stop, stopped) = watch::channel(false);
    let watcher = tokio::spawn(monitor::run(
        Watch {
            label: mode.name(),
            engine: engine.clone(),
            redis: if context.live { admin.clone() } else { None },
            progress: progress.clone(),
            start,
            duration: context.duration,
            live: context.live,
        },
        stopped,
    ));

    let per_task = context.sessions_per_task(mode);
    let load = load::drive(&context.plan, per_task, writer.clone(), timing, progress).await;

    let mut engine_figures = None;
    if let Some(engine) = &engine {
        let shutdown_started = Instant::now();
        let report = engine
            .shutdown()
            .await
            .map_err(|e| format!("engine shutdown: {e}"))?;
        let shutdown = shutdown_started.elapsed();
        let _ = stop.send(true);
        let samples = watcher.await.map_err(|e| format!("monitor task: {e}"))?;
        engine_figures = Some(EngineFigures {
            samples,
            shutdown,
            report,
            stats: engine.stats(),
        });
    } else {
        let _ = stop.send(true);
        let _ = watcher.await;
    }
    let after = match &admin {
        Some(admin) => Some(redis_util::counters(admin).await?),
        None => None,
    };
    let window = window_start.elapsed();
    drop(engine);
    if let Writer::PerChunk { client, .. } = &*writer {
        let _ = client.quit().await;
    }
    drop(writer);

    let expected = expected_per_uid(&load);
    let found = match (&admin, &memory) {
        (Some(admin), _) => totals_in_redis(admin, &key_prefix).await?,
        (None, Some(sink)) => totals_in_memory(sink, &key_prefix),
        (None, None) => return Err("no store to check".into()),
    };
    let totals = check(&expected, &found);

    Ok(ModeReport {
        mode,
        sink: if admin.is_some() { "redis" } else { "memory" },
        key_prefix,
        sessions_per_task: per_task,
        window,
        load,
        commands: before
            .zip(after)
            .map(|(before, after)| CommandDelta::between(&before, &after)),
        totals,
        engine: engine_figures,
    })
}

fn build_engine<S: shardmeter::Sink>(
    context: &Context,
    keys: KeyScheme,
    sink: S,
) -> Result<Engine, String> {
    let settings = &context.engine;
    // Open sessions plus ended ones awaiting their flush: the plan never has more than one
    // session per slot open, so twice that (plus slack) never runs out.
    let capacity = (context.plan.slots * 2 + 1024).min(shardmeter::ledger::MAX_CAPACITY);
    Engine::builder()
        .flush_interval(settings.flush_interval)
        .session_end_delay(settings.session_end_delay.min(settings.flush_interval))
        .capacity(capacity)
        // One private shard per tokio worker (they are registered in `on_thread_start`).
        .worker_shards(settings.worker_threads)
        .keys(keys)
        .sink(sink)
        .build()
        .map_err(|e| format!("engine: {e}"))
}

fn expected_per_uid(load: &LoadOutcome) -> BTreeMap<String, u64> {
    let mut expected = BTreeMap::new();
    for (uid, chunks) in &load.per_uid {
        *expected.entry(uid.to_string()).or_default() += chunks * CHUNK_MS;
    }
    expected
}

/// The uid inside a key's hash tag: `<prefix>:{<uid>}:<day>`.
fn uid_of(key: &str) -> Option<&str> {
    let start = key.find('{')? + 1;
    let end = start + key[start..].find('}')?;
    Some(&key[start..end])
}

struct Found {
    per_uid: BTreeMap<String, u64>,
    keys: usize,
}

async fn totals_in_redis(admin: &Client, prefix: &str) -> Result<Found, String> {
    let keys = redis_util::scan_keys(admin, &format!("{prefix}:*"), 100_000).await?;
    let values = redis_util::values(admin, &keys).await?;
    let mut per_uid = BTreeMap::new();
    for (key, value) in keys.iter().zip(values) {
        let uid = uid_of(key).ok_or_else(|| format!("unexpected key {key:?}"))?;
        let value = u64::try_from(value).map_err(|_| format!("{key} holds {value}"))?;
        *per_uid.entry(uid.to_owned()).or_default() += value;
    }
    Ok(Found {
        per_uid,
        keys: keys.len(),
    })
}

fn totals_in_memory(sink: &MemorySink, prefix: &str) -> Found {
    let mut per_uid = BTreeMap::new();
    let mut keys = 0;
    let prefix = format!("{prefix}:");
    for (key, total) in sink.totals() {
        if !key.starts_with(&prefix) {
            continue;
        }
        keys += 1;
        if let Some(uid) = uid_of(&key) {
            *per_uid.entry(uid.to_owned()).or_default() += u64::try_from(total).unwrap_or(0);
        }
    }
    Found { per_uid, keys }
}

fn check(expected: &BTreeMap<String, u64>, found: &Found) -> TotalsCheck {
    let mut check = TotalsCheck {
        expected_ms: expected.values().sum(),
        found_ms: found.per_uid.values().sum(),
        keys: found.keys,
        ..TotalsCheck::default()
    };
    let uids: std::collections::BTreeSet<&String> =
        expected.keys().chain(found.per_uid.keys()).collect();
    for uid in uids {
        let want = expected.get(uid).copied().unwrap_or(0);
        let got = found.per_uid.get(uid).copied().unwrap_or(0);
        if want != got {
            check.wrong_uids += 1;
            if check.examples.len() < 5 {
                check
                    .examples
                    .push(format!("{uid}: sent {want} ms, stored {got} ms"));
            }
        }
    }
    check
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_come_from_the_hash_tag() {
        assert_eq!(
            uid_of("shardmeter_sim:ab:shardmeter:{u12.3}:20261129"),
            Some("u12.3")
        );
        assert_eq!(uid_of("no-tag"), None);
    }

    #[test]
    fn check_finds_missing_extra_and_wrong_totals() {
        let expected: BTreeMap<String, u64> =
            [("a".into(), 40), ("b".into(), 20)].into_iter().collect();
        let found = Found {
            per_uid: [("a".into(), 40), ("b".into(), 20)].into_iter().collect(),
            keys: 2,
        };
        assert!(check(&expected, &found).ok());
        let found = Found {
            per_uid: [("a".into(), 40), ("c".into(), 20)].into_iter().collect(),
            keys: 2,
        };
        let result = check(&expected, &found);
        assert!(!result.ok());
        assert_eq!(result.wrong_uids, 2);
        assert_eq!(result.expected_ms, result.found_ms); // the sums agree, the uids do not
    }
}
