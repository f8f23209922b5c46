//! `shardmeter-sim`: a simulated realtime speech gateway that measures what shardmeter saves.
//!
//! N sessions each stream 20 ms audio chunks at 50 chunks/s for T seconds, on a multi-thread
//! tokio runtime whose workers are registered with shardmeter. The same plan runs in two modes,
//! one after the other, against the same Redis: **per-chunk** (every chunk sends `INCRBY` +
//! `EXPIRE`, as the old gateway did) and **shardmeter** (`session.add(20)`; the engine flushes
//! through `RedisSink`). It reports Redis' own command counts per mode (`INFO`), the reduction,
//! hot-path percentiles and flush times, and checks that Redis holds exactly chunks × 20 ms in
//! both modes. Redis: `--redis URL`, else `REDIS_URL`, else a private `redis-server` from
//! `PATH`, else shardmeter mode alone on a `MemorySink`. See `docs/sim.md`.
//!
//! Modules, each using only those listed before it: `redis_process` (a private server, `INFO`
//! parsing), `redis` (the sim's own Redis client), `load` (the plan and its drivers), `modes`
//! (one measured run of a mode), `report` (the JSON figures and the table drawn from them).

mod load;
mod modes;
mod redis;
mod redis_process;
mod report;

use clap::{Parser, ValueEnum};
use modes::{Context, Mode, Store};
use serde_json::{json, Value};
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

/// Simulates a realtime speech gateway and compares per-chunk Redis writes with shardmeter.
#[derive(Debug, Parser)]
#[command(name = "shardmeter-sim", version, about, long_about = None)]
struct Args {
    /// Concurrent sessions (each streams 20 ms chunks at 50/s).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    sessions: u64,
    /// Streaming per mode: seconds (`10`, `2.5`) or a duration (`500ms`, `1m`).
    #[arg(long, default_value = "10", value_parser = duration)]
    seconds: Duration,
    /// Spread session starts over this long at the beginning of each mode.
    #[arg(long, default_value = "0", value_parser = duration)]
    ramp_up: Duration,
    /// Sessions end and new ones (new users) start during the run.
    #[arg(long)]
    churn: bool,
    /// Channels per session: clones of one `Session`, each streaming its own chunks.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    channels: u32,
    /// Which modes to run.
    #[arg(long, value_enum, default_value_t = ModeArg::Both)]
    mode: ModeArg,
    /// Shardmeter mode: how often the engine flushes.
    #[arg(long, default_value = "5", value_parser = duration)]
    flush_interval: Duration,
    /// Shardmeter mode: flush delay after a session ends (capped at the flush interval).
    #[arg(long, default_value = "200ms", value_parser = duration)]
    session_end_delay: Duration,
    /// Redis to use; without it, a private redis-server from PATH is started.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    redis: Option<String>,
    /// Write the figures as JSON to this file (`-` for stdout; the table then goes to stderr).
    #[arg(long, value_name = "PATH")]
    json: Option<String>,
    /// Tokio worker threads (default: one per CPU).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=256))]
    worker_threads: Option<u64>,
    /// Sessions driven by one task [default: 1 in per-chunk mode, 50 in shardmeter mode].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    sessions_per_task: Option<u64>,
    /// Seed for `--churn` lifetimes (default: from the run id).
    #[arg(long)]
    seed: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ModeArg {
    Both,
    PerChunk,
    Shardmeter,
}

/// A plain number is seconds; anything else is a `humantime` duration. 0 to 24 h.
fn duration(text: &str) -> Result<Duration, String> {
    let parsed = match text.trim().parse::<f64>() {
        Ok(seconds) => Duration::try_from_secs_f64(seconds).map_err(|e| e.to_string()),
        Err(_) => humantime::parse_duration(text.trim()).map_err(|e| e.to_string()),
    };
    match parsed {
        Ok(value) if value <= Duration::from_secs(86_400) => Ok(value),
        Ok(_) => Err("more than 24 h".into()),
        Err(error) => Err(format!("{error} (try 10, 2.5, 10s or 500ms)")),
    }
}

/// Why a run ended without a report; each maps to an exit status.
#[derive(Debug, thiserror::Error)]
enum SimError {
    /// The arguments ask for something impossible (status 2, as clap's own errors).
    #[error("{0}")]
    Usage(String),
    /// Ctrl-C (status 130).
    #[error("interrupted; this run's keys were deleted")]
    Interrupted,
    /// Anything else (status 1).
    #[error("{0}")]
    Failed(String),
}

impl From<String> for SimError {
    fn from(message: String) -> Self {
        SimError::Failed(message)
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let workers = args.worker_threads.map_or_else(
        || std::thread::available_parallelism().map_or(2, |n| n.get()),
        |n| n as usize,
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        // The fast path: every worker thread owns a private shard.
        .on_thread_start(|| {
            let _ = shardmeter::register_worker_thread();
        })
        .on_thread_stop(shardmeter::unregister_worker_thread)
        .build();
    let outcome = match runtime {
        Ok(runtime) => {
            let outcome = runtime.block_on(run(args, workers));
            // Driver tasks are all joined by now; don't wait for idle blocking threads.
            runtime.shutdown_timeout(Duration::from_secs(1));
            outcome
        }
        Err(error) => Err(SimError::Failed(format!("cannot start tokio: {error}"))),
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(match error {
                SimError::Usage(_) => 2,
                SimError::Interrupted => 130,
                SimError::Failed(_) => 1,
            })
        }
    }
}

/// Runs the modes and writes the report; `Ok(passed)`.
async fn run(args: Args, workers: usize) -> Result<bool, SimError> {
    if args.seconds < Duration::from_millis(100) {
        return Err(SimError::Usage("--seconds must be at least 0.1".into()));
    }
    let run_id = run_id();
    let (store, private) = Store::open(args.redis.as_deref()).await?;
    let mut notes = Vec::new();
    let modes = match (args.mode, store.is_redis()) {
        (ModeArg::Both, true) => vec![Mode::PerChunk, Mode::Shardmeter],
        (ModeArg::PerChunk, true) => vec![Mode::PerChunk],
        (ModeArg::Shardmeter, _) => vec![Mode::Shardmeter],
        (ModeArg::Both, false) => {
            notes.push(
                "no Redis (no --redis, no REDIS_URL, no redis-server on PATH): shardmeter mode \
                 ran on a MemorySink; the per-chunk comparison needs Redis"
                    .to_owned(),
            );
            vec![Mode::Shardmeter]
        }
        (ModeArg::PerChunk, false) => {
            return Err(SimError::Usage(
                "per-chunk mode needs Redis: pass --redis URL, set REDIS_URL, or put \
                 redis-server on PATH"
                    .into(),
            ))
        }
    };
    for note in &notes {
        eprintln!("note: {note}");
    }
    let seed = args
        .seed
        .unwrap_or_else(|| u64::from_str_radix(&run_id, 16).unwrap_or(1));
    let plan = load::Plan::new(&load::LoadSettings {
        sessions: args.sessions as usize,
        duration: args.seconds,
        ramp_up: args.ramp_up,
        churn: args.churn,
        channels: args.channels,
        seed,
    });
    let context = Context {
        plan,
        run_prefix: format!("shardmeter_sim:{run_id}"),
        store,
        flush_interval: args.flush_interval,
        session_end_delay: args.session_end_delay.min(args.flush_interval),
        worker_threads: workers,
        per_task: args.sessions_per_task.map(|n| n as usize),
    };

    // Ctrl-C stops the modes; the run's keys are deleted all the same.
    let outcome = tokio::select! {
        outcome = run_modes(&context, &modes) => outcome,
        _ = tokio::signal::ctrl_c() => Err(SimError::Interrupted),
    };
    let keys_deleted = context.store.delete_run_keys(&context.run_prefix).await;
    drop(private); // stops a private redis-server
    let mode_reports = outcome?;

    let modes: serde_json::Map<String, Value> = (mode_reports.iter())
        .map(|r| {
            (
                r.mode.name().replace('-', "_"),
                report::mode_json(r, workers),
            )
        })
        .collect();
    let mut json = json!({
        "run_id": run_id,
        "ok": !mode_reports.is_empty() && mode_reports.iter().all(modes::ModeReport::ok),
        "settings": {
            "sessions": args.sessions,
            "seconds": args.seconds.as_secs_f64(),
            "ramp_up_seconds": args.ramp_up.as_secs_f64(),
            "churn": args.churn,
            "channels": args.channels,
            "chunk_ms": load::CHUNK_MS,
            "flush_interval_ms": args.flush_interval.as_millis() as u64,
            "session_end_delay_ms": context.session_end_delay.as_millis() as u64,
            "worker_threads": workers,
            "seed": seed,
        },
        "redis": context.store.json(),
        "notes": notes,
        "sessions_planned": context.plan.session_count,
        "chunks_planned": context.plan.planned_chunks,
        "clock_read_ns": load::clock_read_ns(),
        "modes": modes,
        "keys_deleted": keys_deleted,
    });
    json["reduction"] = report::reduction(&json["modes"]);
    let table = report::table(&json);
    match args.json.as_deref() {
        Some("-") => {
            eprint!("{table}");
            println!("{json:#}");
        }
        Some(path) => {
            print!("{table}");
            std::fs::write(path, format!("{json:#}\n"))
                .map_err(|e| format!("cannot write {path}: {e}"))?;
        }
        None => print!("{table}"),
    }
    Ok(json["ok"] == true)
}

async fn run_modes(context: &Context, modes: &[Mode]) -> Result<Vec<modes::ModeReport>, SimError> {
    let mut reports = Vec::new();
    for &mode in modes {
        if std::io::stderr().is_terminal() {
            eprintln!(
                "running {} mode for {:?}…",
                mode.name(),
                context.plan.duration
            );
        }
        reports.push(modes::run(context, mode).await?);
    }
    Ok(reports)
}

/// Eight hex digits, different for every run.
fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    let mixed = (nanos ^ (u64::from(std::process::id()) << 32)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    format!("{:08x}", mixed >> 32)
}
