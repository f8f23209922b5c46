//! `shardmeter-sim`: a simulated realtime speech gateway that measures what shardmeter saves.
//!
//! N sessions each stream 20 ms audio chunks at 50 chunks/s for T seconds, on a multi-thread
//! tokio runtime whose workers are registered with shardmeter. The same load runs in two modes,
//! one after the other, against the same Redis: **per-chunk** (every chunk sends `INCRBY` +
//! `EXPIRE`, as the old gateway did) and **shardmeter** (`session.add(20)`; the engine flushes
//! through `RedisSink`). It reports Redis' own command counts per mode (`INFO`), the reduction,
//! hot-path percentiles and flush times, and checks that Redis holds exactly chunks × 20 ms in
//! both modes. Redis: `--redis URL`, else `REDIS_URL`, else a private `redis-server` started
//! from `PATH`. See `docs/sim.md`.
//!
//! Modules, each using only those listed before it: `redis_process` (a private server, `INFO`
//! parsing), `orphans` (servers that killed sims and tests left behind), `redis` (the sim's own
//! Redis client and command counts), `load` (the driver tasks), `modes` (one measured run of a
//! mode), `report` (the JSON figures and the table drawn from them).

mod load;
mod modes;
mod orphans;
mod redis;
mod redis_process;
mod report;

use clap::{Parser, ValueEnum};
use fred::interfaces::ClientLike;
use modes::{Context, Mode};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

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
    /// Which modes to run.
    #[arg(long, value_enum, default_value_t = ModeArg::Both)]
    mode: ModeArg,
    /// Shardmeter mode: how often the engine flushes.
    #[arg(long, default_value = "5", value_parser = duration)]
    flush_interval: Duration,
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

/// A plain number is seconds; anything else is a `humantime` duration. 0.1 s to 24 h.
fn duration(text: &str) -> Result<Duration, String> {
    let parsed = match text.trim().parse::<f64>() {
        Ok(seconds) => Duration::try_from_secs_f64(seconds).map_err(|e| e.to_string()),
        Err(_) => humantime::parse_duration(text.trim()).map_err(|e| e.to_string()),
    };
    match parsed {
        Ok(value) if (0.1..=86_400.0).contains(&value.as_secs_f64()) => Ok(value),
        Ok(_) => Err("not within 0.1 s to 24 h".into()),
        Err(error) => Err(format!("{error} (try 10, 2.5, 10s or 500ms)")),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
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
    let outcome = (runtime.map_err(|e| format!("cannot start tokio: {e}"))).and_then(|runtime| {
        let outcome = runtime.block_on(run(args, workers));
        // Driver tasks are all joined by now; don't wait for idle blocking threads.
        runtime.shutdown_timeout(Duration::from_secs(1));
        outcome
    });
    match outcome {
        Ok(passed) => ExitCode::from(u8::from(!passed)),
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the modes and writes the report; `Ok(passed)`.
async fn run(args: Args, workers: usize) -> Result<bool, String> {
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
    let url = private
        .as_ref()
        .map_or(args.redis.unwrap_or_default(), |p| p.url());
    // Eight hex digits, different for every run.
    let since_epoch = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH);
    let nanos = since_epoch.unwrap_or_default().as_nanos() as u32;
    let run_id = format!("{:08x}", nanos ^ std::process::id().rotate_left(16));
    let context = Context {
        sessions: args.sessions as usize,
        duration: args.seconds,
        run_prefix: format!("shardmeter_sim:{run_id}"),
        admin: redis::connect(&url).await?,
        url,
        flush_interval: args.flush_interval,
        worker_threads: workers,
    };

    // Ctrl-C stops the modes; the run's keys are deleted all the same.
    let outcome = tokio::select! {
        outcome = async {
            let mut reports = Vec::new();
            for &mode in modes {
                eprintln!("running {} mode for {:?}…", mode.name(), args.seconds);
                reports.push(modes::run(&context, mode).await?);
            }
            Ok(reports)
        } => outcome,
        _ = tokio::signal::ctrl_c() => Err("interrupted; this run's keys were deleted".to_owned()),
    };
    let pattern = format!("{}:*", context.run_prefix);
    let keys_deleted = (redis::delete_matching(&context.admin, &pattern).await)
        .inspect_err(|e| eprintln!("warning: could not delete this run's keys ({pattern}): {e}"))
        .ok();
    let _ = context.admin.quit().await;
    let private_url = private.map(|server| server.url()); // and stops a private redis-server
    let settings = serde_json::json!({
        "sessions": args.sessions,
        "seconds": args.seconds.as_secs_f64(),
        "chunk_ms": load::CHUNK_MS,
        "flush_interval_ms": args.flush_interval.as_millis() as u64,
        "worker_threads": workers,
    });
    let (json, table) = report::render(
        &run_id,
        settings,
        private_url.as_deref(),
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
