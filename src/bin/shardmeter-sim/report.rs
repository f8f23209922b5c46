//! The end-of-run table (for people) and the `--json` document (for scripts and tests). Both
//! show the same figures.

use crate::modes::{Mode, ModeReport};
use crate::redis::CommandDelta;
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::time::Duration;

/// How the figures were taken, printed under the table.
const FOOTNOTES: &[&str] = &[
    "figures: Redis' own INFO deltas over each mode's window (first tick to last write; for",
    "  shardmeter, to the end of engine.shutdown()), minus the sim's own INFO calls. Redis 7",
    "  counts commands that scripts run in total_commands_processed and commandstats too, so",
    "  'calls incl. script-internal' is that counter, and 'client-issued' leaves out the",
    "  SET/INCRBY/EXPIRE run inside RedisSink's script.",
    "hot path: per-chunk = each chunk's INCRBY+EXPIRE pipeline, timed on its own with Instant",
    "  (a round trip); shardmeter = session.add(20) on a registered tokio worker: Instant read",
    "  before and after each driver task's per-tick loop of adds, divided by the adds in it (one",
    "  sample per task and tick: a mean over the batch, the clock read included).",
];

/// The settings a run used, echoed in the report.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) sessions: usize,
    pub(crate) seconds: f64,
    pub(crate) ramp_up_seconds: f64,
    pub(crate) churn: bool,
    pub(crate) channels: u32,
    pub(crate) flush_interval: Duration,
    pub(crate) session_end_delay: Duration,
    pub(crate) worker_threads: usize,
    pub(crate) mode: &'static str,
    pub(crate) seed: u64,
}

/// Where the run's Redis was.
#[derive(Debug, Clone)]
pub(crate) struct RedisTarget {
    /// URL without password.
    pub(crate) url: String,
    pub(crate) version: String,
    /// Started by the sim for this run.
    pub(crate) private: bool,
}

/// Everything the run found.
#[derive(Debug)]
pub(crate) struct Report {
    pub(crate) run_id: String,
    pub(crate) settings: Settings,
    pub(crate) redis: Option<RedisTarget>,
    /// Why a mode did not run, if one did not.
    pub(crate) notes: Vec<String>,
    pub(crate) session_count: usize,
    pub(crate) planned_chunks: u64,
    /// Cost of one `Instant::now()`, measured at start.
    pub(crate) clock_read_ns: f64,
    pub(crate) modes: Vec<ModeReport>,
    /// Keys of this run deleted at the end.
    pub(crate) keys_deleted: Option<u64>,
}

impl Report {
    /// Every mode's checks passed.
    pub(crate) fn ok(&self) -> bool {
        !self.modes.is_empty() && self.modes.iter().all(ModeReport::ok)
    }

    fn mode(&self, mode: Mode) -> Option<&ModeReport> {
        self.modes.iter().find(|report| report.mode == mode)
    }

    /// per-chunk ÷ shardmeter, in client commands per chunk sent: the same ratio as the rates
    /// when both modes sent every chunk, and still meaningful when per-chunk fell behind.
    pub(crate) fn reduction_per_chunk(&self) -> Option<f64> {
        let per_chunk = self.mode(Mode::PerChunk)?;
        let shardmeter = self.mode(Mode::Shardmeter)?;
        let per = |r: &ModeReport| {
            r.commands
                .as_ref()
                .map(|c| c.client_commands() as f64 / r.load.chunks.max(1) as f64)
        };
        let (a, b) = (per(per_chunk)?, per(shardmeter)?);
        Some(if b > 0.0 { a / b } else { f64::INFINITY })
    }

    /// per-chunk ÷ shardmeter, for (client commands/s, calls incl. script-internal/s).
    pub(crate) fn reduction(&self) -> Option<(f64, f64)> {
        let per_chunk = self.mode(Mode::PerChunk)?;
        let shardmeter = self.mode(Mode::Shardmeter)?;
        let (a, b) = (per_chunk.commands.as_ref()?, shardmeter.commands.as_ref()?);
        let ratio = |x: f64, y: f64| if y > 0.0 { x / y } else { f64::INFINITY };
        Some((
            ratio(
                rate(a.client_commands(), per_chunk.window),
                rate(b.client_commands(), shardmeter.window),
            ),
            ratio(
                rate(a.total_commands_processed, per_chunk.window),
                rate(b.total_commands_processed, shardmeter.window),
            ),
        ))
    }

    /// The human-readable table.
    pub(crate) fn table(&self) -> String {
        let mut out = String::new();
        let s = &self.settings;
        let ramp_up = if s.ramp_up_seconds > 0.0 {
            format!(", ramp-up {} s", s.ramp_up_seconds)
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "shardmeter-sim  run {}: {} sessions × {} channel(s), 20 ms chunks at 50/s, {} s per \
             mode{ramp_up}{}",
            self.run_id,
            s.sessions,
            s.channels,
            s.seconds,
            if s.churn { ", churn" } else { "" },
        );
        let _ = writeln!(
            out,
            "engine: flush every {:?}, session end within {:?}; {} tokio workers (registered)",
            s.flush_interval, s.session_end_delay, s.worker_threads
        );
        match &self.redis {
            Some(redis) => {
                let whose = if redis.private {
                    "private redis-server (started for this run) at"
                } else {
                    "given,"
                };
                let _ = writeln!(
                    out,
                    "redis: {whose} {} (Redis {})",
                    redis.url, redis.version
                );
            }
            None => {
                let _ = writeln!(out, "redis: none (shardmeter mode writes to a MemorySink)");
            }
        }
        for note in &self.notes {
            let _ = writeln!(out, "note: {note}");
        }
        let _ = writeln!(out);

        self.write_rows(&mut out);
        let _ = writeln!(out);

        for report in &self.modes {
            if let Some(commands) = &report.commands {
                let _ = writeln!(
                    out,
                    "{:<11} commands: {}",
                    report.mode.name(),
                    by_name(commands)
                );
            }
            if let Some(note) = interference(report) {
                let _ = writeln!(out, "{:<11} note: {note}", report.mode.name());
            }
            if report.mode == Mode::Shardmeter {
                let indices: Vec<String> = (0..64)
                    .filter(|i| report.load.worker_indices & (1u64 << i) != 0)
                    .map(|i| i.to_string())
                    .collect();
                let fast = report.load.worker_indices >> self.settings.worker_threads.min(63) == 0;
                let _ = writeln!(
                    out,
                    "{:<11} adds ran on worker shards [{}]: {}",
                    report.mode.name(),
                    indices.join(", "),
                    if fast {
                        "all private (single-writer fast path)"
                    } else {
                        "some beyond the engine's worker shards (striped fallback)"
                    }
                );
            }
            if report.load.tasks_behind > 0 {
                let _ = writeln!(
                    out,
                    "{:<11} fell behind: {} driver tasks stopped with {} chunks unsent",
                    report.mode.name(),
                    report.load.tasks_behind,
                    thousands(report.load.chunks_behind)
                );
            }
            if let Some(error) = &report.load.first_error {
                let _ = writeln!(
                    out,
                    "{:<11} errors: {} failed writes, {} sessions refused; first: {error}",
                    report.mode.name(),
                    report.load.write_errors,
                    report.load.sessions_refused
                );
            }
            for example in &report.totals.examples {
                let _ = writeln!(out, "{:<11} wrong total: {example}", report.mode.name());
            }
            if let Some(engine) = &report.engine {
                if !engine.report.is_complete() {
                    let _ = writeln!(
                        out,
                        "{:<11} shutdown left {} ms unwritten and {} increments rejected",
                        report.mode.name(),
                        engine.report.unwritten_amount(),
                        engine.report.rejected.len()
                    );
                }
            }
        }
        if let Some((commands, calls)) = self.reduction() {
            let _ = writeln!(
                out,
                "reduction: {} fewer Redis commands/s (client-issued), \
                 {} fewer calls/s including script-internal",
                factor(commands),
                factor(calls)
            );
        }
        if let Some(per_chunk) = self.reduction_per_chunk() {
            let _ = writeln!(
                out,
                "           {} fewer client-issued commands per chunk sent",
                factor(per_chunk)
            );
        }
        let _ = writeln!(out);
        for line in FOOTNOTES {
            let _ = writeln!(out, "{line}");
        }
        let _ = writeln!(
            out,
            "  (one clock read costs {:.0} ns here)",
            self.clock_read_ns
        );
        let _ = writeln!(
            out,
            "result: {}",
            if self.ok() {
                "OK: the store holds exactly the audio sent, in every mode"
            } else {
                "FAILED (see above)"
            }
        );
        out
    }

    /// One column per mode.
    fn write_rows(&self, out: &mut String) {
        let cols: Vec<&ModeReport> = self.modes.iter().collect();
        let mut row = |label: &str, cell: &dyn Fn(&ModeReport) -> String| {
            let _ = write!(out, "{label:<38}");
            for report in &cols {
                let _ = write!(out, "{:>20}", cell(report));
            }
            let _ = writeln!(out);
        };
        row("", &|r| r.mode.name().to_owned());
        row("writes to", &|r| match (r.mode, r.sink) {
            (Mode::PerChunk, _) => "INCRBY+EXPIRE".into(),
            (Mode::Shardmeter, "redis") => "RedisSink".into(),
            (Mode::Shardmeter, _) => "MemorySink".into(),
        });
        row("sessions per driver task", &|r| {
            thousands(r.sessions_per_task as u64)
        });
        row("sessions started", &|r| thousands(r.load.sessions_started));
        row("chunks sent", &|r| thousands(r.load.chunks));
        row("audio sent (ms)", &|r| thousands(r.totals.expected_ms));
        row("audio stored (ms)", &|r| thousands(r.totals.found_ms));
        row("totals check", &|r| {
            if r.totals.ok() {
                "equal".into()
            } else {
                format!("WRONG ({} uids)", r.totals.wrong_uids)
            }
        });
        row("measured window (s)", &|r| {
            format!("{:.2}", r.window.as_secs_f64())
        });
        row("Redis commands (client-issued)", &|r| {
            opt(r.commands.as_ref(), |c| thousands(c.client_commands()))
        });
        row("  per second", &|r| {
            opt(r.commands.as_ref(), |c| {
                per_second(c.client_commands(), r.window)
            })
        });
        row("Redis calls incl. script-internal", &|r| {
            opt(r.commands.as_ref(), |c| {
                thousands(c.total_commands_processed)
            })
        });
        row("  per second", &|r| {
            opt(r.commands.as_ref(), |c| {
                per_second(c.total_commands_processed, r.window)
            })
        });
        row("commands per chunk", &|r| {
            opt(r.commands.as_ref(), |c| {
                format!(
                    "{:.6}",
                    c.client_commands() as f64 / r.load.chunks.max(1) as f64
                )
            })
        });
        for (label, q) in [
            ("hot path p50", 0.5),
            ("hot path p99", 0.99),
            ("hot path p999", 0.999),
        ] {
            row(label, &|r| {
                r.load.hot_path.quantile(q).map_or("-".into(), picos)
            });
        }
        row("hot path max", &|r| picos(r.load.hot_path.max()));
        row("hot path samples", &|r| thousands(r.load.hot_path.count()));
        row("max tick lag", &|r| {
            format!("{} ms", r.load.max_lag.as_millis())
        });
        row("flush rounds", &|r| {
            opt(r.engine.as_ref(), |e| thousands(e.stats.flushes))
        });
        row("flush time p50 / max (sampled)", &|r| {
            opt(r.engine.as_ref(), |e| {
                let micros =
                    |v: Option<u64>| v.map_or("-".into(), |v| picos(v.saturating_mul(1_000_000)));
                format!(
                    "{} / {}",
                    micros(e.samples.micros.quantile(0.5)),
                    micros(Some(e.samples.micros.max()))
                )
            })
        });
        row("final flush (shutdown)", &|r| {
            opt(r.engine.as_ref(), |e| picos(duration_picos(e.shutdown)))
        });
    }

    /// The same figures as JSON.
    pub(crate) fn json(&self) -> Value {
        let s = &self.settings;
        let modes: serde_json::Map<String, Value> = self
            .modes
            .iter()
            .map(|r| (r.mode.name().replace('-', "_"), mode_json(r)))
            .collect();
        json!({
            "run_id": self.run_id,
            "ok": self.ok(),
            "settings": {
                "sessions": s.sessions,
                "seconds": s.seconds,
                "ramp_up_seconds": s.ramp_up_seconds,
                "churn": s.churn,
                "channels": s.channels,
                "chunk_ms": crate::load::CHUNK_MS,
                "flush_interval_ms": s.flush_interval.as_millis() as u64,
                "session_end_delay_ms": s.session_end_delay.as_millis() as u64,
                "worker_threads": s.worker_threads,
                "mode": s.mode,
                "seed": s.seed,
            },
            "redis": self.redis.as_ref().map(|r| json!({
                "url": r.url, "version": r.version, "private": r.private,
            })),
            "notes": self.notes,
            "sessions_planned": self.session_count,
            "chunks_planned": self.planned_chunks,
            "clock_read_ns": self.clock_read_ns,
            "modes": modes,
            "reduction": self.reduction().map(|(commands, calls)| json!({
                "commands_per_second": finite(commands),
                "calls_including_script_internal_per_second": finite(calls),
                "commands_per_chunk": self.reduction_per_chunk().map(finite),
            })),
            "keys_deleted": self.keys_deleted,
        })
    }
}

fn mode_json(r: &ModeReport) -> Value {
    let q = |q: f64| r.load.hot_path.quantile(q).map(ns);
    json!({
        "ok": r.ok(),
        "sink": r.sink,
        "key_prefix": r.key_prefix,
        "sessions_per_task": r.sessions_per_task,
        "window_seconds": r.window.as_secs_f64(),
        "sessions_started": r.load.sessions_started,
        "sessions_refused": r.load.sessions_refused,
        "chunks_sent": r.load.chunks,
        "chunks_behind": r.load.chunks_behind,
        "tasks_behind": r.load.tasks_behind,
        "write_errors": r.load.write_errors,
        "first_error": r.load.first_error,
        "max_tick_lag_ms": r.load.max_lag.as_secs_f64() * 1e3,
        "worker_indices_mask": r.load.worker_indices,
        "interference": interference(r),
        "totals": {
            "ok": r.totals.ok(),
            "sent_ms": r.totals.expected_ms,
            "stored_ms": r.totals.found_ms,
            "keys": r.totals.keys,
            "wrong_uids": r.totals.wrong_uids,
            "examples": r.totals.examples,
        },
        "redis": r.commands.as_ref().map(|c| json!({
            "commands": c.client_commands(),
            "commands_per_second": c.client_commands() as f64 / r.window.as_secs_f64(),
            "calls_including_script_internal": c.total_commands_processed,
            "calls_including_script_internal_per_second":
                c.total_commands_processed as f64 / r.window.as_secs_f64(),
            "script_internal_calls": c.script_internal_calls(),
            "commandstats_calls": c.all_calls(),
            "by_command": c.by_command,
        })),
        "hot_path_ns": {
            "what": match r.mode {
                Mode::PerChunk => "INCRBY+EXPIRE pipeline round trip, each chunk timed",
                Mode::Shardmeter => "session.add(20), mean per add over one driver task's tick batch",
            },
            "p50": q(0.5),
            "p99": q(0.99),
            "p999": q(0.999),
            "max": ns(r.load.hot_path.max()),
            "samples": r.load.hot_path.count(),
        },
        "engine": r.engine.as_ref().map(|e| json!({
            "flushes": e.stats.flushes,
            "batches_written": e.stats.batches_written,
            "keys_written": e.stats.keys_written,
            "amount_written": e.stats.amount_written,
            "sessions_ended": e.stats.sessions_ended,
            "sink_commands": e.stats.sink_commands,
            "write_failures": e.stats.write_failures,
            "flush_micros_sampled": {
                "samples": e.samples.micros.count(),
                "p50": e.samples.micros.quantile(0.5),
                "max": e.samples.micros.max(),
            },
            "shutdown_micros": e.shutdown.as_micros() as u64,
            "shutdown_complete": e.report.is_complete(),
            "unwritten_ms": e.report.unwritten_amount() as u64,
        })),
    })
}

/// Signs that other clients used the Redis during `r`'s window, which makes its counts include
/// theirs: commands the mode never sends, or counts that disagree with what the mode did.
fn interference(r: &ModeReport) -> Option<String> {
    let commands = r.commands.as_ref()?;
    let calls = |name: &str| commands.by_command.get(name).copied().unwrap_or(0);
    let mut signs = Vec::new();
    let (own, expected): (&[&str], Vec<(&str, u64)>) = match (r.mode, &r.engine) {
        (Mode::PerChunk, _) => (
            &["incrby", "expire"],
            if r.load.write_errors == 0 {
                vec![("incrby", r.load.chunks), ("expire", r.load.chunks)]
            } else {
                Vec::new()
            },
        ),
        (Mode::Shardmeter, Some(engine)) => (
            &[
                "evalsha", "eval", "script", "set", "incrby", "expire", "quit",
            ],
            vec![(
                "incrby",
                engine.stats.keys_written + engine.stats.keys_rejected,
            )],
        ),
        (Mode::Shardmeter, None) => return None,
    };
    for (name, calls) in &commands.by_command {
        let command = name.split('|').next().unwrap_or(name);
        if !own.contains(&command) {
            signs.push(format!("{name} {}", thousands(*calls)));
        }
    }
    for (name, want) in expected {
        if calls(name) != want {
            signs.push(format!(
                "{name} {} where this mode ran {}",
                thousands(calls(name)),
                thousands(want)
            ));
        }
    }
    if signs.is_empty() {
        None
    } else {
        Some(format!(
            "other clients used this Redis during the {} window ({}): its counts include theirs; \
             leave out --redis/REDIS_URL for a private server",
            r.mode.name(),
            signs.join(", ")
        ))
    }
}

fn finite(value: f64) -> Value {
    if value.is_finite() {
        json!(value)
    } else {
        Value::Null
    }
}

fn rate(count: u64, window: Duration) -> f64 {
    count as f64 / window.as_secs_f64().max(1e-9)
}

fn per_second(count: u64, window: Duration) -> String {
    let rate = rate(count, window);
    if rate >= 100.0 {
        thousands(rate.round() as u64)
    } else {
        format!("{rate:.2}")
    }
}

fn factor(value: f64) -> String {
    if value.is_finite() {
        format!("{}x", thousands(value.round() as u64))
    } else {
        "∞".into()
    }
}

fn opt<T>(value: Option<&T>, show: impl Fn(&T) -> String) -> String {
    value.map_or_else(|| "-".into(), show)
}

fn by_name(commands: &CommandDelta) -> String {
    let (client, script): (Vec<_>, Vec<_>) = commands
        .by_command
        .iter()
        .partition(|(name, _)| commands.is_client_command(name));
    let list = |items: &[(&String, &u64)]| {
        items
            .iter()
            .map(|(name, calls)| format!("{name} {}", thousands(**calls)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut text = list(&client);
    if !script.is_empty() {
        let _ = write!(text, " (inside scripts: {})", list(&script));
    }
    text
}

fn duration_picos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos().saturating_mul(1000)).unwrap_or(u64::MAX)
}

fn ns(picos: u64) -> f64 {
    picos as f64 / 1000.0
}

/// A duration given in picoseconds, in the unit that suits it.
pub(crate) fn picos(picos: u64) -> String {
    let value = picos as f64;
    if value < 1e6 {
        format!("{:.2} ns", value / 1e3)
    } else if value < 1e9 {
        format!("{:.1} µs", value / 1e6)
    } else {
        format!("{:.2} ms", value / 1e9)
    }
}

/// `1234567` → `1,234,567`.
pub(crate) fn thousands(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(picos(1_400), "1.40 ns");
        assert_eq!(picos(95_300_000), "95.3 µs");
        assert_eq!(picos(2_500_000_000), "2.50 ms");
    }
}
