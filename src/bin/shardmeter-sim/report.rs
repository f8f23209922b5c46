//! The run's figures as one JSON document (`--json`), and the table for people, drawn from that
//! document, so both always show the same figures.

use crate::modes::{Mode, ModeReport};
use serde_json::{json, Value};
use std::fmt::Write as _;

/// How the figures were taken, printed under the table.
const FOOTNOTES: &str = "\
figures: Redis' own INFO deltas over each mode's window (first tick to last write; for
  shardmeter, to the end of engine.shutdown()), minus the sim's own INFO calls. Redis 7
  counts commands that scripts run in total_commands_processed and commandstats too, so
  'calls incl. script-internal' is that counter, and 'client-issued' leaves out the
  SET/INCRBY/EXPIRE run inside RedisSink's script.
evalsha: one per batch written, plus one per failed try: RedisSink's first EVALSHA meets
  NOSCRIPT (the script is not loaded yet), loads it (SCRIPT LOAD) and sends it again.
hot path: per-chunk = each chunk's INCRBY+EXPIRE pipeline, timed on its own with Instant
  (a round trip); shardmeter = session.add(20) on a registered tokio worker: Instant read
  before and after each driver task's per-tick loop of adds, divided by the adds in it (one
  sample per task and tick: a mean over the batch, the clock read included).
flush time: every write round (periodic, session end, shutdown), timed around the sink's write.
";

/// One mode's figures.
pub(crate) fn mode_json(r: &ModeReport, worker_threads: usize) -> Value {
    let hot = &r.load.hot_path();
    let ns = |picos: u64| picos as f64 / 1000.0;
    let q = |q: f64| (!hot.is_empty()).then(|| ns(hot.value_at_quantile(q)));
    let seconds = r.window.as_secs_f64();
    let shards: Vec<u32> = (0..64)
        .filter(|i| r.load.worker_indices & (1u64 << i) != 0)
        .collect();
    json!({
        "mode": r.mode.name(),
        "ok": r.ok(),
        "sink": r.sink,
        "writes_to": match (r.mode, r.sink) {
            (Mode::PerChunk, _) => "INCRBY+EXPIRE",
            (Mode::Shardmeter, "memory") => "MemorySink",
            (Mode::Shardmeter, _) => "RedisSink",
        },
        "key_prefix": r.key_prefix,
        "sessions_per_task": r.sessions_per_task,
        "window_seconds": seconds,
        "sessions_started": r.load.sessions_started,
        "sessions_refused": r.load.sessions_refused,
        "chunks_sent": r.load.chunks,
        "chunks_behind": r.load.chunks_behind,
        "tasks_behind": r.load.tasks_behind,
        "write_errors": r.load.write_errors,
        "first_error": r.load.first_error,
        "max_tick_lag_ms": r.load.max_lag.as_secs_f64() * 1e3,
        "worker_shards": (r.mode == Mode::Shardmeter).then_some(&shards),
        "fast_path": r.load.worker_indices >> worker_threads.min(63) == 0,
        "interference": interference(r),
        "totals": {
            "ok": r.totals.ok(),
            "check": match r.totals.wrong_uids {
                _ if r.totals.ok() => "equal".to_owned(),
                uids => format!("WRONG ({uids} uids)"),
            },
            "sent_ms": r.totals.expected_ms,
            "stored_ms": r.totals.found_ms,
            "keys": r.totals.keys,
            "wrong_uids": r.totals.wrong_uids,
            "examples": r.totals.examples,
        },
        "redis": r.commands.as_ref().map(|c| json!({
            "commands": c.client_commands(),
            "commands_per_second": c.client_commands() as f64 / seconds,
            "commands_per_chunk": c.client_commands() as f64 / r.load.chunks.max(1) as f64,
            "calls_including_script_internal": c.total_commands_processed,
            "calls_including_script_internal_per_second": c.total_commands_processed as f64 / seconds,
            "script_internal_calls": c.script_internal_calls(),
            "commandstats_calls": c.all_calls(),
            "by_command": c.by_command,
            "inside_scripts": (c.by_command.iter())
                .filter(|(name, _)| !c.is_client_command(name))
                .collect::<std::collections::BTreeMap<_, _>>(),
            "failed_calls": c.failed,
        })),
        "hot_path_ns": {
            "what": match r.mode {
                Mode::PerChunk => "INCRBY+EXPIRE pipeline round trip, each chunk timed",
                Mode::Shardmeter => "session.add(20), mean per add over one driver task's tick batch",
            },
            "p50": q(0.5),
            "p99": q(0.99),
            "p999": q(0.999),
            "max": (!hot.is_empty()).then(|| ns(hot.max())),
            "samples": hot.len(),
        },
        "engine": r.engine.as_ref().map(|e| json!({
            "flushes": e.stats.flushes,
            "batches_written": e.stats.batches_written,
            "keys_written": e.stats.keys_written,
            "amount_written": e.stats.amount_written,
            "sessions_ended": e.stats.sessions_ended,
            "sink_commands": e.stats.sink_commands,
            "write_failures": e.stats.write_failures,
            "flush_micros": {
                "rounds": e.flush_micros.len(),
                "p50": (!e.flush_micros.is_empty()).then(|| e.flush_micros.value_at_quantile(0.5)),
                "max": (!e.flush_micros.is_empty()).then(|| e.flush_micros.max()),
            },
            "longest_flusher_poll_micros": e.stats.longest_flusher_poll_micros,
            "shutdown_micros": e.shutdown.as_micros() as u64,
            "shutdown_complete": e.report.is_complete(),
            "unwritten_ms": e.report.unwritten_amount() as u64,
            "in_doubt_ms": e.report.in_doubt_amount() as u64,
            "rejected": e.report.rejected.len(),
        })),
    })
}

/// Signs that other clients used the Redis during `r`'s window, which makes its counts include
/// theirs: commands the mode never sends, or counts that disagree with what the mode did.
fn interference(r: &ModeReport) -> Option<String> {
    let commands = r.commands.as_ref()?;
    let (own, expected): (&[&str], _) = match (r.mode, &r.engine) {
        (Mode::PerChunk, _) if r.load.write_errors > 0 => (&["incrby", "expire"][..], vec![]),
        (Mode::PerChunk, _) => (
            &["incrby", "expire"][..],
            vec![("incrby", r.load.chunks), ("expire", r.load.chunks)],
        ),
        (Mode::Shardmeter, Some(e)) => (
            &[
                "evalsha", "eval", "script", "set", "incrby", "expire", "quit", "get",
            ][..],
            vec![
                ("incrby", e.stats.keys_written + e.stats.keys_rejected),
                ("get", e.stats.account_reads),
            ],
        ),
        (Mode::Shardmeter, None) => return None,
    };
    let mut signs: Vec<String> = (commands.by_command.iter())
        .filter(|(name, _)| !own.contains(&name.split('|').next().unwrap_or(name)))
        .map(|(name, calls)| format!("{name} {}", thousands(*calls)))
        .collect();
    for (name, want) in expected {
        let calls = commands.by_command.get(name).copied().unwrap_or(0);
        if calls != want {
            signs.push(format!("{name} {calls} where this mode ran {want}"));
        }
    }
    (!signs.is_empty()).then(|| {
        format!(
            "other clients used this Redis during the {} window ({}): its counts include theirs; \
             leave out --redis/REDIS_URL for a private server",
            r.mode.name(),
            signs.join(", ")
        )
    })
}

/// per-chunk ÷ shardmeter: client commands/s, calls incl. script-internal/s, and client
/// commands per chunk sent (still meaningful when per-chunk mode fell behind).
pub(crate) fn reduction(modes: &Value) -> Value {
    let ratio = |field: &str| {
        let (a, b) = (&modes["per_chunk"]["redis"], &modes["shardmeter"]["redis"]);
        let (x, y) = (a[field].as_f64()?, b[field].as_f64()?);
        (y > 0.0).then(|| x / y)
    };
    match ratio("commands_per_second") {
        None => Value::Null,
        Some(commands) => json!({
            "commands_per_second": commands,
            "calls_including_script_internal_per_second":
                ratio("calls_including_script_internal_per_second"),
            "commands_per_chunk": ratio("commands_per_chunk"),
        }),
    }
}

/// How a table cell shows a JSON number.
#[derive(Clone, Copy)]
enum Show {
    /// A string as it is.
    Text,
    Count,
    Rate,
    /// Six decimals.
    Fine,
    Nanos,
    Micros,
    Millis,
    Seconds,
}

/// The table's rows: label, JSON pointer in each mode's object, how to show it.
const ROWS: &[(&str, &str, Show)] = &[
    (
        "sessions per driver task",
        "/sessions_per_task",
        Show::Count,
    ),
    ("sessions started", "/sessions_started", Show::Count),
    ("chunks sent", "/chunks_sent", Show::Count),
    ("audio sent (ms)", "/totals/sent_ms", Show::Count),
    ("audio stored (ms)", "/totals/stored_ms", Show::Count),
    ("totals check", "/totals/check", Show::Text),
    ("measured window (s)", "/window_seconds", Show::Seconds),
    (
        "Redis commands (client-issued)",
        "/redis/commands",
        Show::Count,
    ),
    ("  per second", "/redis/commands_per_second", Show::Rate),
    (
        "Redis calls incl. script-internal",
        "/redis/calls_including_script_internal",
        Show::Count,
    ),
    (
        "  per second",
        "/redis/calls_including_script_internal_per_second",
        Show::Rate,
    ),
    (
        "commands per chunk",
        "/redis/commands_per_chunk",
        Show::Fine,
    ),
    ("hot path p50", "/hot_path_ns/p50", Show::Nanos),
    ("hot path p99", "/hot_path_ns/p99", Show::Nanos),
    ("hot path p999", "/hot_path_ns/p999", Show::Nanos),
    ("hot path max", "/hot_path_ns/max", Show::Nanos),
    ("hot path samples", "/hot_path_ns/samples", Show::Count),
    ("max tick lag", "/max_tick_lag_ms", Show::Millis),
    (
        "flusher's longest poll",
        "/engine/longest_flusher_poll_micros",
        Show::Micros,
    ),
    ("flush rounds", "/engine/flushes", Show::Count),
    ("batches written", "/engine/batches_written", Show::Count),
    (
        "flush time p50 (every round)",
        "/engine/flush_micros/p50",
        Show::Micros,
    ),
    ("flush time max", "/engine/flush_micros/max", Show::Micros),
    (
        "final flush (shutdown)",
        "/engine/shutdown_micros",
        Show::Micros,
    ),
];

/// The table for people, drawn from the run's JSON document (built in `main`).
pub(crate) fn table(report: &Value) -> String {
    let s = &report["settings"];
    let mut out = format!(
        "shardmeter-sim  run {}: {} sessions × {} channel(s), 20 ms chunks at 50/s, {} s per \
         mode{}{}\nengine: flush every {} ms, session end within {} ms; {} tokio \
         workers (registered)\n",
        text(&report["run_id"]),
        s["sessions"],
        s["channels"],
        s["seconds"].as_f64().unwrap_or(0.0),
        match s["ramp_up_seconds"].as_f64() {
            Some(ramp_up) if ramp_up > 0.0 => format!(", ramp-up {ramp_up} s"),
            _ => String::new(),
        },
        if s["churn"] == true { ", churn" } else { "" },
        s["flush_interval_ms"],
        s["session_end_delay_ms"],
        s["worker_threads"],
    );
    let redis = &report["redis"];
    let _ = match redis["private"].as_bool() {
        Some(true) => writeln!(
            out,
            "redis: private redis-server (started for this run) at {} (Redis {})",
            text(&redis["url"]),
            text(&redis["version"])
        ),
        Some(false) => writeln!(
            out,
            "redis: given, {} (Redis {})",
            text(&redis["url"]),
            text(&redis["version"])
        ),
        None => writeln!(out, "redis: none (shardmeter mode writes to a MemorySink)"),
    };
    for note in report["notes"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "note: {}", text(note));
    }

    let modes: Vec<(&str, &Value)> = ["per-chunk", "shardmeter"]
        .into_iter()
        .filter_map(|name| Some((name, report["modes"].get(name.replace('-', "_"))?)))
        .collect();
    out.push('\n');
    let mut row = |label: &str, cell: &dyn Fn(&Value) -> Option<String>| {
        let _ = write!(out, "{label:<38}");
        for (_, mode) in &modes {
            let _ = write!(out, "{:>20}", cell(mode).unwrap_or_else(|| "-".into()));
        }
        let _ = writeln!(out);
    };
    row("", &|m| Some(text(&m["mode"]).to_owned()));
    row("writes to", &|m| Some(text(&m["writes_to"]).to_owned()));
    for &(label, pointer, show) in ROWS {
        row(label, &|m| {
            let value = m.pointer(pointer)?;
            let number = value.as_f64();
            Some(match show {
                Show::Text => value.as_str()?.to_owned(),
                Show::Count => thousands(number? as u64),
                Show::Rate if number? >= 100.0 => thousands(number?.round() as u64),
                Show::Rate => format!("{:.2}", number?),
                Show::Fine => format!("{:.6}", number?),
                Show::Nanos => time_ns(number?),
                Show::Micros => time_ns(number? * 1e3),
                Show::Millis => format!("{:.0} ms", number?),
                Show::Seconds => format!("{:.2}", number?),
            })
        });
    }
    let _ = writeln!(out);

    for (name, m) in &modes {
        let mut notes = Vec::new();
        if let Some(by_command) = m["redis"]["by_command"].as_object() {
            let (inside, failed) = (&m["redis"]["inside_scripts"], &m["redis"]["failed_calls"]);
            let list = |script: bool| {
                let names =
                    (by_command.iter()).filter(|(n, _)| inside.get(n.as_str()).is_some() == script);
                let show = |(n, calls): (&String, &Value)| match failed.get(n) {
                    Some(failed) => format!("{n} {} ({failed} failed)", count(calls)),
                    None => format!("{n} {}", count(calls)),
                };
                names.map(show).collect::<Vec<_>>().join(", ")
            };
            let script = list(true);
            let script = match script.is_empty() {
                true => script,
                false => format!(" (inside scripts: {script})"),
            };
            notes.push(format!("commands: {}{script}", list(false)));
        }
        if let Some(shards) = m["worker_shards"].as_array() {
            let fast = m["fast_path"] == true;
            notes.push(format!(
                "adds ran on worker shards [{}]: {}",
                shards
                    .iter()
                    .map(Value::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                if fast {
                    "all private (single-writer fast path)"
                } else {
                    "some beyond the engine's worker shards (striped fallback)"
                }
            ));
        }
        if m["tasks_behind"].as_u64() > Some(0) {
            notes.push(format!(
                "fell behind: {} driver tasks stopped with {} chunks unsent",
                m["tasks_behind"], m["chunks_behind"]
            ));
        }
        if let Some(error) = m["first_error"].as_str() {
            notes.push(format!(
                "errors: {} failed writes, {} sessions refused; first: {error}",
                m["write_errors"], m["sessions_refused"]
            ));
        }
        let examples = m["totals"]["examples"].as_array().into_iter().flatten();
        notes.extend(examples.map(|e| format!("wrong total: {}", text(e))));
        if m["engine"]["shutdown_complete"] == false {
            notes.push(format!(
                "shutdown left {} ms unwritten",
                m["engine"]["unwritten_ms"]
            ));
        }
        notes.extend(
            m["interference"]
                .as_str()
                .map(|note| format!("note: {note}")),
        );
        for note in notes {
            let _ = writeln!(out, "{name:<11} {note}");
        }
    }
    let reduction = &report["reduction"];
    if !reduction.is_null() {
        let factor = |field: &str| {
            reduction[field].as_f64().map_or("∞".into(), |v| {
                format!("{}x", thousands(v.round() as u64))
            })
        };
        let _ = writeln!(
            out,
            "reduction: {} fewer Redis commands/s (client-issued), {} fewer calls/s including \
             script-internal\n           {} fewer client-issued commands per chunk sent",
            factor("commands_per_second"),
            factor("calls_including_script_internal_per_second"),
            factor("commands_per_chunk"),
        );
    }
    let _ = writeln!(
        out,
        "\n{FOOTNOTES}  (one clock read costs {:.0} ns here)\nresult: {}",
        report["clock_read_ns"].as_f64().unwrap_or(0.0),
        if report["ok"] == true {
            "OK: the store holds exactly the audio sent, in every mode"
        } else {
            "FAILED (see above)"
        }
    );
    out
}

fn count(value: &Value) -> String {
    thousands(value.as_u64().unwrap_or(0))
}

fn text(value: &Value) -> &str {
    value.as_str().unwrap_or("")
}

/// A duration given in nanoseconds, in the unit that suits it.
fn time_ns(ns: f64) -> String {
    if ns < 1e3 {
        format!("{ns:.2} ns")
    } else if ns < 1e6 {
        format!("{:.1} µs", ns / 1e3)
    } else {
        format!("{:.2} ms", ns / 1e6)
    }
}

/// `1234567` → `1,234,567`.
fn thousands(value: u64) -> String {
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
        assert_eq!(time_ns(1.4), "1.40 ns");
        assert_eq!(time_ns(95_300.0), "95.3 µs");
        assert_eq!(time_ns(2_500_000.0), "2.50 ms");
    }
}
