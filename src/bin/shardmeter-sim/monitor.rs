//! Watches a running mode: samples the engine's flush timings and, when stderr is a terminal,
//! redraws one status line on it four times a second.

use crate::histogram::Histogram;
use crate::load::Progress;
use fred::prelude::Client;
use shardmeter::Engine;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// How often the engine's counters are read.
const SAMPLE_EVERY: Duration = Duration::from_millis(20);
/// How often the live line is redrawn (and Redis' counters read for it).
const REDRAW_EVERY: Duration = Duration::from_millis(250);

/// What the monitor saw of the engine's flushes.
#[derive(Debug, Default)]
pub(crate) struct FlushSamples {
    /// Write rounds seen (`stats().flushes` at the end).
    pub(crate) flushes: u64,
    /// `stats().last_flush_micros` each time `flushes` moved (rounds that completed between two
    /// samples 20 ms apart show as one).
    pub(crate) micros: Histogram,
}

/// What the monitor watches.
#[derive(Debug)]
pub(crate) struct Watch {
    pub(crate) label: &'static str,
    pub(crate) engine: Option<Engine>,
    pub(crate) redis: Option<Client>,
    pub(crate) progress: Arc<Progress>,
    pub(crate) start: Instant,
    pub(crate) duration: Duration,
    pub(crate) live: bool,
}

/// Runs until `stop` turns true (or, as a bound, the run's length plus ten minutes).
pub(crate) async fn run(watch: Watch, mut stop: watch::Receiver<bool>) -> FlushSamples {
    let mut samples = FlushSamples::default();
    let mut seen_flushes = 0;
    let mut last_redraw = Instant::now();
    let mut last_commands: Option<(Instant, u64)> = None;
    let mut rate = None;
    let limit = (watch.duration + Duration::from_secs(600)).as_millis() / SAMPLE_EVERY.as_millis();
    for _ in 0..limit {
        if *stop.borrow() {
            break;
        }
        if let Some(engine) = &watch.engine {
            let stats = engine.stats();
            if stats.flushes != seen_flushes {
                seen_flushes = stats.flushes;
                samples.micros.record(stats.last_flush_micros);
            }
        }
        if watch.live && last_redraw.elapsed() >= REDRAW_EVERY {
            last_redraw = Instant::now();
            if let Some(client) = &watch.redis {
                if let Ok(counters) = crate::redis::counters(client).await {
                    let now = Instant::now();
                    if let Some((at, before)) = last_commands {
                        let secs = (now - at).as_secs_f64().max(1e-3);
                        // Minus the one INFO call this reading itself made.
                        let calls = counters.total_commands.saturating_sub(before + 1);
                        rate = Some(calls as f64 / secs);
                    }
                    last_commands = Some((now, counters.total_commands));
                }
            }
            draw(&watch, rate, seen_flushes);
        }
        tokio::select! {
            _ = tokio::time::sleep(SAMPLE_EVERY) => {}
            _ = stop.changed() => {}
        }
    }
    if let Some(engine) = &watch.engine {
        samples.flushes = engine.stats().flushes;
    }
    if watch.live {
        eprint!("\r\x1b[2K");
        let _ = std::io::stderr().flush();
    }
    samples
}

fn draw(watch: &Watch, redis_rate: Option<f64>, flushes: u64) {
    use std::sync::atomic::Ordering::Relaxed;
    let elapsed = watch
        .start
        .elapsed()
        .as_secs_f64()
        .min(watch.duration.as_secs_f64());
    let mut line = format!(
        "[{}] {:>5.1}/{:.1} s  sessions {:>6}  chunks {:>10}",
        watch.label,
        elapsed,
        watch.duration.as_secs_f64(),
        watch.progress.active_sessions.load(Relaxed),
        crate::report::thousands(watch.progress.chunks.load(Relaxed)),
    );
    if let Some(rate) = redis_rate {
        line.push_str(&format!("  redis {rate:>9.0} calls/s"));
    }
    if let Some(engine) = &watch.engine {
        let stats = engine.stats();
        line.push_str(&format!(
            "  flushes {flushes}  last {} µs  pending {} ms",
            stats.last_flush_micros, stats.pending_amount
        ));
    }
    let behind = watch.progress.behind_tasks.load(Relaxed);
    if behind > 0 {
        line.push_str(&format!("  {behind} tasks behind"));
    }
    eprint!("\r\x1b[2K{line}");
    let _ = std::io::stderr().flush();
}
