//! The run's figures: one list per mode (JSON pointer, value, table row) from which both the
//! JSON document (`--json`) and the table for people are drawn, so both show the same figures.

use crate::modes::{EngineFigures, Mode, ModeReport};
use serde_json::{json, Map, Value};
use std::fmt::Write as _;

/// How the figures were taken, printed under the table (docs/sim.md says more).
const FOOTNOTES: &str = "\
figures: Redis' own INFO deltas over each mode's window (first tick to last write; for
  shardmeter, to the end of engine.shutdown()), minus the sim's own INFO calls. Redis 7 counts
  the commands a script runs too: 'calls incl. script-internal' is total_commands_processed;
  'client-issued' leaves out the SET/INCRBY/EXPIRE run inside RedisSink's script.
evalsha: one per batch written, plus RedisSink's first one, which met NOSCRIPT and was sent
  again after SCRIPT LOAD.
hot path: per-chunk = each chunk's INCRBY+EXPIRE pipeline round trip; shardmeter = each driver
  task's per-tick loop of session.add(20) over its sessions, divided by the adds in it (a mean
  over the batch, the clock reads included).
flush time: every write round (periodic, session end, shutdown), timed around the sink's write.
";

/// The run's JSON document and its table: `settings` as `main` describes them, the URL of the
/// server the sim started (a given URL may carry a password: not shown), and each mode's figures.
pub(crate) fn render(
    run_id: &str,
    settings: Value,
    private_url: Option<&str>,
    reports: &[ModeReport],
    keys_deleted: Option<u64>,
) -> (Value, String) {
    let figures: Vec<Vec<Figure>> = reports.iter().map(figures).collect();
    let modes: Map<String, Value> = (reports.iter().zip(&figures))
        .map(|(r, figures)| {
            let mut mode = json!({});
            for (path, value, _, _) in figures {
                let at = path
                    .split('/')
                    .skip(1)
                    .fold(&mut mode, |at, part| &mut at[part]);
                *at = value.clone();
            }
            (r.mode.name().replace('-', "_"), mode)
        })
        .collect();
    // per-chunk ÷ shardmeter (`null` if shardmeter's is 0: "∞"); per chunk sent stays
    // meaningful when per-chunk mode fell behind.
    let reduction = (modes.get("per_chunk").zip(modes.get("shardmeter"))).map(|(x, y)| {
        let ratio = |field: &str| {
            let (x, y) = (x["redis"][field].as_f64()?, y["redis"][field].as_f64()?);
            (y > 0.0).then(|| x / y)
        };
        let fields = [
            "commands_per_second",
            "calls_including_script_internal_per_second",
        ];
        let fields = fields.iter().chain(&["commands_per_chunk"]);
        Map::from_iter(fields.map(|&field| (field.to_owned(), json!(ratio(field)))))
    });
    let document = json!({
        "run_id": run_id,
        "ok": !reports.is_empty() && reports.iter().all(ModeReport::ok),
        "settings": settings,
        "redis": {"private": private_url.is_some(), "url": private_url},
        "modes": modes,
        "reduction": reduction,
        "keys_deleted": keys_deleted,
    });
    let table = table(&document, &figures);
    (document, table)
}

/// One figure of a mode: its JSON pointer in the mode's object, its value, and its table row
/// (label and format).
type Figure = (&'static str, Value, &'static str, Show);

/// How a table cell shows a figure.
#[derive(Clone, Copy)]
enum Show {
    /// Not in the table.
    Json,
    /// A string as it is.
    Text,
    Count,
    /// Two decimals below 100, else a count.
    Number,
    /// Six decimals.
    Fine,
    /// A duration given in units of this many nanoseconds.
    Time(f64),
}

use Show::*;

/// One mode's figures, in table order; each mode has the same list (`null` where a figure does
/// not apply).
fn figures(r: &ModeReport) -> Vec<Figure> {
    let hot = &r.load.hot_path();
    let ns = |picos: u64| picos as f64 / 1000.0;
    let q = |q: f64| (!hot.is_empty()).then(|| ns(hot.value_at_quantile(q)));
    let seconds = r.window.as_secs_f64();
    let (c, t, l) = (&r.commands, &r.totals, &r.load);
    let writes_to = match r.mode {
        Mode::PerChunk => "INCRBY+EXPIRE",
        Mode::Shardmeter => "RedisSink",
    };
    let check = match t.ok() {
        true => "equal".to_owned(),
        false => format!("WRONG ({} uids)", t.wrong.len()),
    };
    let engine = |f: &dyn Fn(&EngineFigures) -> Value| r.engine.as_ref().map_or(Value::Null, f);
    let flush = |e: &EngineFigures, q: f64| {
        let micros = &e.flush_micros;
        json!((!micros.is_empty()).then(|| micros.value_at_quantile(q)))
    };
    #[rustfmt::skip]
    let figures = vec![
        ("/mode", json!(r.mode.name()), "", Text),
        ("/writes_to", json!(writes_to), "writes to", Text),
        ("/ok", json!(r.ok()), "", Json),
        ("/sessions_per_task", json!(r.mode.sessions_per_task()), "sessions per driver task", Count),
        ("/sessions_started", json!(l.sessions_started), "sessions started", Count),
        ("/sessions_refused", json!(l.sessions_refused), "", Json),
        ("/chunks_sent", json!(l.chunks), "chunks sent", Count),
        ("/chunks_behind", json!(l.chunks_behind), "", Json),
        ("/write_errors", json!(l.write_errors), "", Json),
        ("/first_error", json!(l.first_error), "", Json),
        ("/totals/ok", json!(t.ok()), "", Json),
        ("/totals/sent_ms", json!(t.expected_ms), "audio sent (ms)", Count),
        ("/totals/stored_ms", json!(t.found_ms), "audio stored (ms)", Count),
        ("/totals/check", json!(check), "totals check", Text),
        ("/totals/wrong_uids", json!(t.wrong.len()), "", Json),
        ("/totals/examples", json!(t.wrong.iter().take(5).collect::<Vec<_>>()), "", Json),
        ("/window_seconds", json!(seconds), "measured window (s)", Number),
        ("/redis/commands", json!(c.client_commands()), "Redis commands (client-issued)", Count),
        ("/redis/commands_per_second", json!(c.client_commands() as f64 / seconds), "  per second", Number),
        ("/redis/calls_including_script_internal", json!(c.total_commands_processed), "Redis calls incl. script-internal", Count),
        ("/redis/calls_including_script_internal_per_second", json!(c.total_commands_processed as f64 / seconds), "  per second", Number),
        ("/redis/commands_per_chunk", json!(c.client_commands() as f64 / l.chunks.max(1) as f64), "commands per chunk", Fine),
        ("/redis/by_command", json!(c.by_command), "", Json),
        ("/redis/inside_scripts", json!(c.inside_scripts), "", Json),
        ("/hot_path_ns/p50", json!(q(0.5)), "hot path p50", Time(1.0)),
        ("/hot_path_ns/p99", json!(q(0.99)), "hot path p99", Time(1.0)),
        ("/hot_path_ns/max", json!((!hot.is_empty()).then(|| ns(hot.max()))), "hot path max", Time(1.0)),
        ("/hot_path_ns/samples", json!(hot.len()), "hot path samples", Count),
        ("/max_tick_lag_ms", json!(l.max_lag.as_secs_f64() * 1e3), "max tick lag", Time(1e6)),
        ("/engine/longest_flusher_poll_micros", engine(&|e| json!(e.stats.longest_flusher_poll_micros)), "flusher's longest poll", Time(1e3)),
        ("/engine/longest_flusher_poll_cpu_micros", engine(&|e| json!(e.stats.longest_flusher_poll_cpu_micros)), "  of which CPU, most in one poll", Time(1e3)),
        ("/engine/long_flusher_polls", engine(&|e| json!(e.stats.long_flusher_polls)), "flusher polls over 1 ms of CPU", Count),
        ("/engine/flusher_polls", engine(&|e| json!(e.stats.flusher_polls)), "  flusher polls in all", Count),
        ("/engine/flushes", engine(&|e| json!(e.stats.flushes)), "flush writes", Count),
        ("/engine/batches_written", engine(&|e| json!(e.stats.batches_written)), "batches written", Count),
        ("/engine/flush_micros/p50", engine(&|e| flush(e, 0.5)), "flush time p50 (every round)", Time(1e3)),
        ("/engine/flush_micros/max", engine(&|e| flush(e, 1.0)), "flush time max", Time(1e3)),
        ("/engine/shutdown_micros", engine(&|e| json!(e.shutdown.as_micros() as u64)), "final flush (shutdown)", Time(1e3)),
        ("/engine/keys_written", engine(&|e| json!(e.stats.keys_written)), "", Json),
        ("/engine/sessions_ended", engine(&|e| json!(e.stats.sessions_ended)), "", Json),
        ("/engine/write_failures", engine(&|e| json!(e.stats.write_failures)), "", Json),
        ("/engine/shutdown_complete", engine(&|e| json!(e.report.is_complete())), "", Json),
        ("/engine/unwritten_ms", engine(&|e| json!(e.report.unwritten_amount() as u64)), "", Json),
    ];
    figures
}

/// The table for people: the modes' figures side by side, then notes drawn from the document.
fn table(report: &Value, figures: &[Vec<Figure>]) -> String {
    let s = &report["settings"];
    let mut out = format!(
        "shardmeter-sim  run {}: {} sessions, 20 ms chunks at 50/s, {} s per mode\n\
         engine: flush every {} ms; {} tokio workers (registered)\nredis: {}\n\n",
        text(&report["run_id"]),
        s["sessions"],
        s["seconds"],
        s["flush_interval_ms"],
        s["worker_threads"],
        match report["redis"]["url"].as_str() {
            Some(url) => format!("private redis-server (started for this run) at {url}"),
            None => "given (--redis or REDIS_URL)".to_owned(),
        },
    );
    for (i, &(_, _, label, show)) in figures.first().into_iter().flatten().enumerate() {
        if matches!(show, Json) {
            continue;
        }
        let _ = write!(out, "{label:<38}");
        for mode in figures {
            let (value, number) = (&mode[i].1, mode[i].1.as_f64());
            let cell = || -> Option<String> {
                Some(match show {
                    Json | Text => value.as_str()?.to_owned(),
                    Count => thousands(number? as u64),
                    Number if number? >= 100.0 => thousands(number?.round() as u64),
                    Number => format!("{:.2}", number?),
                    Fine => format!("{:.6}", number?),
                    Time(unit) => time_ns(number? * unit),
                })
            };
            let _ = write!(out, "{:>20}", cell().unwrap_or_else(|| "-".into()));
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(out);

    for (name, m) in report["modes"].as_object().into_iter().flatten() {
        let name = name.replace('_', "-");
        let (all, inside) = (&m["redis"]["by_command"], &m["redis"]["inside_scripts"]);
        let calls = |only: &Value, not: &Value| {
            (only.as_object().into_iter().flatten())
                .filter(|(n, _)| not.get(n.as_str()).is_none())
                .map(|(n, calls)| format!("{n} {}", thousands(calls.as_u64().unwrap_or(0))))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut notes = vec![format!("commands: {}", calls(all, inside))];
        if inside.as_object().is_some_and(|inside| !inside.is_empty()) {
            notes[0] += &format!(" (inside scripts: {})", calls(inside, &Value::Null));
        }
        if m["chunks_behind"].as_u64() > Some(0) {
            let behind = &m["chunks_behind"];
            notes.push(format!("fell behind: {behind} chunks unsent at the end"));
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
            let unwritten = &m["engine"]["unwritten_ms"];
            notes.push(format!("shutdown left {unwritten} ms unwritten"));
        }
        for note in notes {
            let _ = writeln!(out, "{name:<11} {note}");
        }
    }
    let reduction = &report["reduction"];
    if !reduction.is_null() {
        let factor = |field: &str| {
            (reduction[field].as_f64()).map_or("∞".into(), |v| {
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
        "\n{FOOTNOTES}result: {}",
        match report["ok"] == true {
            true => "OK: Redis holds exactly the audio sent, in every mode",
            false => "FAILED (see above)",
        }
    );
    out
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
