//! `shardmeter-sim`: a simulated realtime speech gateway that measures what shardmeter saves.
//!
//! N sessions each stream 20 ms audio chunks at 50 chunks/s for T seconds, on a multi-thread
//! tokio runtime whose workers are registered with shardmeter. The same load runs twice against
//! the same Redis, one mode after the other:
//!
//! - **per-chunk**: every chunk sends a pipeline of `INCRBY` + `EXPIRE` (the old gateway);
//! - **shardmeter**: every chunk is `session.add(20)`; the engine flushes per-account totals every
//!   `--flush-interval` and at session end, through `RedisSink`.
//!
//! It reports Redis' own command counts for each mode (from `INFO`, not from counting in the
//! sim), the reduction, the per-chunk call's latency percentiles, the engine's flush times, and
//! checks that Redis holds exactly chunks × 20 ms in both modes (exit status 1 if not). Each mode
//! writes under its own key prefix with a run id; the run's keys are deleted at the end.
//!
//! Redis: `--redis URL`, else `REDIS_URL`, else a private `redis-server` from `PATH` (127.0.0.1,
//! a free port, nothing on disk, stopped at the end), else shardmeter mode alone on a
//! `MemorySink`. See `docs/sim.md`.
//!
//! ```text
//! cargo run --release --features sim --bin shardmeter-sim -- --sessions 1000 --seconds 20
//! ```

mod histogram;
mod load;
mod modes;
mod monitor;
mod redis;
mod redis_server;
mod report;

use clap::{Parser, ValueEnum};
use fred::prelude::ClientLike;
use modes::{Context, EngineSettings, Mode, Store};
use redis_server::PrivateRedis;
use report::{RedisTarget, Report, Settings};
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Simulates a realtime speech gateway and compares per-chunk Redis writes with shardmeter.
#[derive(Debug, Parser)]
#[command(name = "shardmeter-sim", version, about, long_about = None)]
struct Args {
    /// Concurrent sessions (each streams 20 ms chunks at 50/s).
    #[arg(long, default_value_t = 100, value_parser = sessions_range())]
    sessions: u64,

    /// Seconds of streaming per mode (e.g. `10`, `2.5`, `500ms`).
    #[arg(long, default_value = "10", value_parser = parse_duration)]
    seconds: Duration,

    /// Spread session starts over this long at the beginning of each mode.
    #[arg(long, default_value = "0", value_parser = parse_duration)]
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

    /// Shardmeter mode: how often the engine flushes (10ms to 24h).
    #[arg(long, default_value = "5", value_parser = parse_duration)]
    flush_interval: Duration,

    /// Shardmeter mode: flush delay after a session ends (capped at the flush interval).
    #[arg(long, default_value = "200ms", value_parser = parse_duration)]
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

    /// Sessions driven by one task, one interval timer per task [default: 1 in per-chunk mode,
    /// a task per session like the old gateway's handler; 50 in shardmeter mode].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    sessions_per_task: Option<u64>,

    /// Seed for `--churn` lifetimes (default: from the run id).
    #[arg(long)]
    seed: Option<u64>,

    /// No live status line, even on a terminal.
    #[arg(long)]
    no_live: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ModeArg {
    Both,
    PerChunk,
    Shardmeter,
}

impl ModeArg {
    fn name(self) -> &'static str {
        match self {
            ModeArg::Both => "both",
            ModeArg::PerChunk => "per-chunk",
            ModeArg::Shardmeter => "shardmeter",
        }
    }
}

fn sessions_range() -> clap::builder::RangedU64ValueParser {
    clap::value_parser!(u64).range(1..=1_000_000)
}

/// `10`, `2.5`, `10s`, `500ms`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, scale) = if let Some(ms) = text.strip_suffix("ms") {
        (ms, 1e-3)
    } else if let Some(s) = text.strip_suffix('s') {
        (s, 1.0)
    } else {
        (text, 1.0)
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (try 10, 2.5, 10s or 500ms)"))?;
    let seconds = value * scale;
    if !(0.0..=86_400.0).contains(&seconds) {
        return Err(format!("{text:?} is out of range (0 to 24 h)"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.seconds < Duration::from_millis(100) {
        eprintln!("error: --seconds must be at least 0.1");
        return ExitCode::from(2);
    }
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
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the tokio runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(run(args, workers));
    // Driver tasks are all joined by now; don't wait for idle blocking threads.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

async fn run(args: Args, workers: usize) -> ExitCode {
    let run_id = run_id();
    let live = !args.no_live && std::io::stderr().is_terminal();

    // Where totals go.
    let mut private = None;
    let mut notes = Vec::new();
    let url = match &args.redis {
        Some(url) => Some(url.clone()),
        None => match PrivateRedis::find_binary() {
            Some(binary) => match PrivateRedis::start(&binary) {
                Ok(server) => {
                    let url = server.url();
                    private = Some(server);
                    Some(url)
                }
                Err(error) => {
                    eprintln!("error: {error}");
                    return ExitCode::FAILURE;
                }
            },
            None => None,
        },
    };
    let (store, redis_target) = match &url {
        Some(url) => {
            let admin = match redis::connect(url).await {
                Ok(admin) => admin,
                Err(error) => {
                    eprintln!("error: {error}");
                    return ExitCode::FAILURE;
                }
            };
            let version = redis::version(&admin)
                .await
                .unwrap_or_else(|_| "unknown".into());
            let target = RedisTarget {
                url: redis::redact(url),
                version,
                private: private.is_some(),
            };
            (
                Store::Redis {
                    url: url.clone(),
                    admin,
                },
                Some(target),
            )
        }
        None => (Store::Memory, None),
    };

    let modes: Vec<Mode> = match (args.mode, &store) {
        (ModeArg::Both, Store::Redis { .. }) => vec![Mode::PerChunk, Mode::Shardmeter],
        (ModeArg::PerChunk, Store::Redis { .. }) => vec![Mode::PerChunk],
        (ModeArg::Shardmeter, _) => vec![Mode::Shardmeter],
        (ModeArg::Both, Store::Memory) => {
            let note = "no Redis (no --redis, no REDIS_URL, no redis-server on PATH): \
                        shardmeter mode ran on a MemorySink; the per-chunk comparison needs Redis";
            eprintln!("note: {note}");
            notes.push(note.to_owned());
            vec![Mode::Shardmeter]
        }
        (ModeArg::PerChunk, Store::Memory) => {
            eprintln!(
                "error: per-chunk mode needs Redis: pass --redis URL, set REDIS_URL, or put \
                 redis-server on PATH"
            );
            return ExitCode::from(2);
        }
    };

    let seed = args
        .seed
        .unwrap_or_else(|| u64::from_str_radix(&run_id, 16).unwrap_or(1));
    let settings = load::LoadSettings {
        sessions: args.sessions as usize,
        duration: args.seconds,
        ramp_up: args.ramp_up,
        churn: args.churn,
        channels: args.channels,
        seed,
    };
    let plan = Arc::new(load::Plan::new(&settings));
    let context = Context {
        plan: plan.clone(),
        duration: args.seconds,
        run_id: run_id.clone(),
        store: store.clone(),
        engine: EngineSettings {
            flush_interval: args.flush_interval,
            session_end_delay: args.session_end_delay.min(args.flush_interval),
            worker_threads: workers,
        },
        per_task: args.sessions_per_task.map(|n| n as usize),
        live,
    };

    // Run the modes; Ctrl-C stops them, and the keys are deleted all the same.
    let outcome = tokio::select! {
        outcome = run_modes(&context, &modes) => outcome,
        _ = tokio::signal::ctrl_c() => Err("interrupted".to_owned()),
    };
    let keys_deleted = match &store {
        Store::Redis { admin, .. } => {
            let pattern = format!("{}:*", context.run_prefix());
            match redis::delete_matching(admin, &pattern).await {
                Ok(deleted) => Some(deleted),
                Err(error) => {
                    eprintln!("warning: could not delete this run's keys ({pattern}): {error}");
                    None
                }
            }
        }
        Store::Memory => None,
    };
    if let Store::Redis { admin, .. } = &store {
        let _ = admin.quit().await;
    }
    drop(private); // stops a private redis-server

    let reports = match outcome {
        Ok(reports) => reports,
        Err(error) if error == "interrupted" => {
            eprintln!("\ninterrupted; this run's keys were deleted");
            return ExitCode::from(130);
        }
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };

    let report = Report {
        run_id,
        settings: Settings {
            sessions: settings.sessions,
            seconds: args.seconds.as_secs_f64(),
            ramp_up_seconds: args.ramp_up.as_secs_f64(),
            churn: args.churn,
            channels: args.channels,
            flush_interval: args.flush_interval,
            session_end_delay: context.engine.session_end_delay,
            worker_threads: workers,
            mode: args.mode.name(),
            seed,
        },
        redis: redis_target,
        notes,
        session_count: plan.session_count,
        planned_chunks: plan.planned_chunks,
        clock_read_ns: clock_read_ns(),
        modes: reports,
        keys_deleted,
    };
    let table = report.table();
    match args.json.as_deref() {
        Some("-") => {
            eprint!("{table}");
            println!("{:#}", report.json());
        }
        Some(path) => {
            print!("{table}");
            let text = format!("{:#}\n", report.json());
            if let Err(error) = std::fs::write(path, text) {
                eprintln!("error: cannot write {path}: {error}");
                return ExitCode::FAILURE;
            }
        }
        None => print!("{table}"),
    }
    if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn run_modes(context: &Context, modes: &[Mode]) -> Result<Vec<modes::ModeReport>, String> {
    let mut reports = Vec::new();
    for &mode in modes {
        if context.live {
            eprintln!("running {} mode for {:?}…", mode.name(), context.duration);
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

/// The median cost of one `Instant::now()`, over 101 batches of 1,000 reads.
fn clock_read_ns() -> f64 {
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
