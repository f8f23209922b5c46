//! `shardmeter-sim`: a simulated realtime speech gateway that measures what shardmeter saves.
//!
//! N sessions each stream 20 ms audio chunks at 50 chunks/s for T seconds, on a multi-thread
//! tokio runtime whose workers are registered with shardmeter. The same plan runs in two modes,
//! one after the other, against the same Redis: **per-chunk** (every chunk sends `INCRBY` +
//! `EXPIRE`, as the old gateway did) and **shardmeter** (`session.add(20)`; the engine flushes
//! through `RedisSink`). It reports Redis' own command counts per mode (`INFO`), the reduction,
//! hot-path percentiles and flush times, and checks that Redis holds exactly chunks × 20 ms in
//! both modes. Redis: `--redis URL`, else `REDIS_URL`, else a private `redis-server` started
//! from `PATH`. See `docs/sim.md`.
//!
//! Modules, each using only those listed before it: `redis_process` (a private server, `INFO`
//! parsing), `redis` (the sim's own Redis client and command counts), `load` (the plan and its
//! drivers), `modes` (one measured run of a mode), `report` (the JSON figures and the table
//! drawn from them).

mod load;
mod modes;
mod redis;
mod redis_process;
mod report;

use clap::{Parser, ValueEnum};
use fred::interfaces::ClientLike;
use modes::{Context, Mode};
use std::process::ExitCode;
use std::time::Duration;

/// Simulates a realtime speech gateway and compares per-chunk Redis writes with shardmeter.
#[derive(Debug, Parser)]
#[command(name = "shardmeter-sim", version, about, long_about = None)]
struct Args {
    /// Concurrent sessions (each streams 20 ms chunks at 50/s).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    sessions: u64,
    /// Streaming per mode: seconds (`10`, `2.5`) or a duration (`500ms`, `1m`); at least 0.1 s.
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

fn main() -> ExitCode {
    let args = Args::parse();
    if args.seconds < Duration::from_millis(100) {
        eprintln!("error: --seconds must be at least 0.1");
        return ExitCode::from(2);
    }
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
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
        Err(error) => Err(format!("cannot start tokio: {error}")),
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the modes and writes the report; `Ok(passed)`.
async fn run(args: Args, workers: usize) -> Result<bool, String> {
    let run_id = run_id();
    let modes = match args.mode {
        ModeArg::Both => &[Mode::PerChunk, Mode::Shardmeter][..],
        ModeArg::PerChunk => &[Mode::PerChunk],
        ModeArg::Shardmeter => &[Mode::Shardmeter],
    };
    // A private server stops when dropped.
    let private = match args.redis {
        Some(_) => None,
        None => Some(redis::PrivateRedis::start()?),
    };
    let url = match &private {
        Some(server) => server.url(),
        None => args.redis.clone().unwrap_or_default(),
    };
    let context = Context {
        plan: load::Plan::new(
            args.sessions as usize,
            args.seconds,
            args.ramp_up,
            args.churn,
            args.channels,
        ),
        run_prefix: format!("shardmeter_sim:{run_id}"),
        admin: redis::connect(&url).await?,
        url,
        flush_interval: args.flush_interval,
        session_end_delay: args.session_end_delay.min(args.flush_interval),
        worker_threads: workers,
    };

    // Ctrl-C stops the modes; the run's keys are deleted all the same.
    let outcome = tokio::select! {
        outcome = run_modes(&context, modes) => outcome,
        _ = tokio::signal::ctrl_c() => Err("interrupted; this run's keys were deleted".into()),
    };
    let pattern = format!("{}:*", context.run_prefix);
    let keys_deleted = (redis::delete_matching(&context.admin, &pattern).await)
        .inspect_err(|e| eprintln!("warning: could not delete this run's keys ({pattern}): {e}"))
        .ok();
    let _ = context.admin.quit().await;
    let private = private.map(drop).is_some(); // stops a private redis-server
    let settings = serde_json::json!({
        "sessions": args.sessions,
        "seconds": args.seconds.as_secs_f64(),
        "ramp_up_seconds": args.ramp_up.as_secs_f64(),
        "churn": args.churn,
        "channels": args.channels,
        "chunk_ms": load::CHUNK_MS,
        "flush_interval_ms": args.flush_interval.as_millis() as u64,
        "session_end_delay_ms": context.session_end_delay.as_millis() as u64,
        "worker_threads": workers,
    });
    let (json, table) = report::render(
        &run_id,
        settings,
        &context,
        private,
        &outcome?,
        keys_deleted,
    );
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

async fn run_modes(context: &Context, modes: &[Mode]) -> Result<Vec<modes::ModeReport>, String> {
    let mut reports = Vec::new();
    for &mode in modes {
        eprintln!(
            "running {} mode for {:?}…",
            mode.name(),
            context.plan.duration
        );
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
