//! End-to-end runs of the `shardmeter-sim` binary (feature `sim`), checked through its `--json`
//! output: both modes against a private `redis-server` the sim starts itself from `PATH` (so
//! `REDIS_URL` and `REDIS_SERVER_BIN` are removed from its environment), and bad requests.
//!
//! The assertions are on counts — chunks, milliseconds, Redis' own command counters — never on
//! how long anything took.

mod support;

use serde_json::Value;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use support::orphans::{self, is_running};

const SIM: &str = env!("CARGO_BIN_EXE_shardmeter-sim");

/// Runs the sim with `args` plus `--json -`; returns its output.
fn sim(args: &[&str], configure: impl FnOnce(&mut Command)) -> Output {
    let mut command = Command::new(SIM);
    command
        .args(args)
        .args(["--json", "-"])
        .env_remove("REDIS_URL")
        .env_remove("REDIS_SERVER_BIN");
    configure(&mut command);
    command.output().expect("run shardmeter-sim")
}

fn json_of(output: &Output) -> Value {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "shardmeter-sim failed ({}):\n{stderr}",
        output.status
    );
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}); stderr:\n{stderr}"))
}

fn u64_at(value: &Value, pointer: &str) -> u64 {
    value
        .pointer(pointer)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no integer at {pointer} in {value:#}"))
}

/// Totals in the store equal chunks × 20 ms, and the chunks are those planned.
fn assert_totals_exact(report: &Value, mode: &str) {
    let base = format!("/modes/{mode}");
    let chunks = u64_at(report, &format!("{base}/chunks_sent"));
    assert!(chunks > 0, "{mode}: no chunks sent");
    assert_eq!(
        u64_at(report, &format!("{base}/totals/sent_ms")),
        chunks * 20
    );
    assert_eq!(
        u64_at(report, &format!("{base}/totals/stored_ms")),
        chunks * 20,
        "{mode}: the store does not hold the audio sent"
    );
    assert_eq!(u64_at(report, &format!("{base}/totals/wrong_uids")), 0);
    assert_eq!(
        report.pointer(&format!("{base}/ok")),
        Some(&Value::Bool(true))
    );
}

#[test]
fn both_modes_store_exactly_the_audio_and_shardmeter_sends_far_fewer_commands() {
    let output = sim(
        &[
            "--sessions",
            "20",
            "--seconds",
            "3",
            "--flush-interval",
            "1",
        ],
        |_| {},
    );
    let report = json_of(&output);
    assert_eq!(report["ok"], Value::Bool(true));
    assert_eq!(report["redis"]["private"], Value::Bool(true), "{report:#}");
    assert_totals_exact(&report, "per_chunk");
    assert_totals_exact(&report, "shardmeter");

    // Per-chunk: exactly one INCRBY and one EXPIRE per chunk reached this private Redis (so it
    // saw nothing but this run).
    let chunks = u64_at(&report, "/modes/per_chunk/chunks_sent");
    assert_eq!(
        u64_at(&report, "/modes/per_chunk/redis/by_command/incrby"),
        chunks
    );
    assert_eq!(
        u64_at(&report, "/modes/per_chunk/redis/by_command/expire"),
        chunks
    );
    let per_chunk_commands = u64_at(&report, "/modes/per_chunk/redis/commands");
    assert_eq!(per_chunk_commands, 2 * chunks);

    // Shardmeter: a few EVALSHAs, and inside them one INCRBY per key the engine wrote.
    let shardmeter_commands = u64_at(&report, "/modes/shardmeter/redis/commands");
    assert!(shardmeter_commands >= 1);
    assert_eq!(
        u64_at(&report, "/modes/shardmeter/redis/by_command/incrby"),
        u64_at(&report, "/modes/shardmeter/engine/keys_written"),
        "Redis ran a different number of INCRBYs than the engine wrote keys"
    );
    // One EVALSHA per batch, plus the first one if it met NOSCRIPT (then re-sent after a
    // SCRIPT LOAD).
    let evalsha = u64_at(&report, "/modes/shardmeter/redis/by_command/evalsha");
    let batches = u64_at(&report, "/modes/shardmeter/engine/batches_written");
    let loads = report
        .pointer("/modes/shardmeter/redis/by_command/script|load")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    assert!(
        (batches..=batches + loads).contains(&evalsha),
        "{evalsha} EVALSHA for {batches} batches and {loads} SCRIPT LOADs"
    );
    // Same load, same length of run: compare Redis' own counts directly. 20 sessions × 3 s
    // × 50 chunks × 2 = 6,000 commands against one EVALSHA per flush (about five).
    assert!(
        per_chunk_commands >= 100 * shardmeter_commands,
        "per-chunk sent {per_chunk_commands} commands, shardmeter {shardmeter_commands}"
    );
    let per_chunk_calls = u64_at(
        &report,
        "/modes/per_chunk/redis/calls_including_script_internal",
    );
    let shardmeter_calls = u64_at(
        &report,
        "/modes/shardmeter/redis/calls_including_script_internal",
    );
    assert!(
        per_chunk_calls >= 10 * shardmeter_calls,
        "calls incl. script-internal: per-chunk {per_chunk_calls}, shardmeter {shardmeter_calls}"
    );
    assert!(report["reduction"]["commands_per_second"].as_f64().unwrap() > 1.0);
    assert!(report["reduction"]["commands_per_chunk"].as_f64().unwrap() >= 100.0);

    // Both modes' keys (20 uids each, one day) and the batch markers were deleted.
    assert!(u64_at(&report, "/keys_deleted") >= 40);
    // The hot path was measured in both modes.
    assert!(u64_at(&report, "/modes/per_chunk/hot_path_ns/samples") == chunks);
    assert!(u64_at(&report, "/modes/shardmeter/hot_path_ns/samples") > 0);
    // The table went to stderr beside the JSON.
    let table = String::from_utf8_lossy(&output.stderr);
    assert!(
        table.contains("reduction:") && table.contains("result: OK"),
        "{table}"
    );
}

#[test]
fn shardmeter_mode_alone_flushes_at_the_interval_and_ends_every_session() {
    let report = json_of(&sim(
        &[
            "--mode",
            "shardmeter",
            "--sessions",
            "30",
            "--seconds",
            "3",
            "--flush-interval",
            "500ms",
        ],
        |_| {},
    ));
    assert_totals_exact(&report, "shardmeter");
    assert!(report["modes"].get("per_chunk").is_none());
    assert!(report["reduction"].is_null());
    // Every session streamed, ended at the end of the run, and the engine collected each end.
    assert_eq!(u64_at(&report, "/modes/shardmeter/sessions_started"), 30);
    assert_eq!(
        u64_at(&report, "/modes/shardmeter/engine/sessions_ended"),
        30
    );
    // Rounds every 500 ms over 3 s (the default 5 s interval would leave only the shutdown's
    // and perhaps a session-end round).
    let flushes = u64_at(&report, "/modes/shardmeter/engine/flushes");
    assert!(flushes >= 4, "{flushes} flush rounds");
    // The figures the stall measurements read.
    assert!(report
        .pointer("/modes/shardmeter/max_tick_lag_ms")
        .is_some_and(Value::is_f64));
    u64_at(
        &report,
        "/modes/shardmeter/engine/longest_flusher_poll_micros",
    );
    let polls = u64_at(&report, "/modes/shardmeter/engine/flusher_polls");
    assert!(polls >= flushes, "{polls} polls, a poll at least per flush");
    assert!(polls >= u64_at(&report, "/modes/shardmeter/engine/long_flusher_polls"));
}

#[test]
fn bad_requests_fail_with_a_message() {
    let empty = std::env::temp_dir().join(format!("shardmeter-sim-none-{}", std::process::id()));
    std::fs::create_dir_all(&empty).expect("temp dir");
    // No Redis given and no redis-server to start: the run needs one.
    let output = sim(&["--mode", "shardmeter", "--seconds", "1"], |command| {
        command.env("PATH", &empty);
    });
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("no redis-server on PATH"));
    let _ = std::fs::remove_dir(&empty);

    for args in [
        &["--sessions", "0"][..],
        &["--seconds", "soon"],
        &["--seconds", "0.05"],
        &["--mode", "sideways"],
    ] {
        let output = sim(args, |_| {});
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(!output.stderr.is_empty(), "{args:?}: no message");
    }
}

/// A sim that is killed (it drops nothing) leaves its private server running; the next sim
/// kills it when it starts its own.
#[test]
fn the_server_a_killed_sim_left_behind_is_killed_by_the_next_sim() {
    /// Kills the sim if the test ends first (it would stream for ten minutes).
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut first = Killed(
        Command::new(SIM)
            .args([
                "--mode",
                "shardmeter",
                "--sessions",
                "1",
                "--seconds",
                "600",
            ])
            .env_remove("REDIS_URL")
            .env_remove("REDIS_SERVER_BIN")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run shardmeter-sim"),
    );
    let owner = first.0.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    // The one that answers: a server that found its port taken exits by itself.
    let server = loop {
        let answering = orphans::servers().find(|server| {
            server.owner == owner && {
                let port = std::fs::read_to_string(format!("/proc/{}/cmdline", server.pid))
                    .unwrap_or_default();
                port.split(':')
                    .next_back()
                    .and_then(|port| port.trim_end_matches('\0').parse().ok())
                    .is_some_and(support::redis_process::answers_ping)
            }
        });
        if let Some(server) = answering {
            break server;
        }
        if let Ok(Some(status)) = first.0.try_wait() {
            panic!("the sim ended ({status}) before its server answered");
        }
        assert!(Instant::now() < deadline, "the sim started no server");
        std::thread::sleep(Duration::from_millis(10));
    };
    drop(first); // killed: nothing of it runs to stop its server
                 // The next sim reaps as it starts (as every test of this binary's sims may, first).
    json_of(&sim(
        &[
            "--mode",
            "shardmeter",
            "--sessions",
            "1",
            "--seconds",
            "0.1",
        ],
        |_| {},
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    while is_running(server.pid) {
        assert!(Instant::now() < deadline, "{} still runs", server.pid);
        std::thread::sleep(Duration::from_millis(10));
    }
    if std::env::var_os("SHARDMETER_KEEP_REDIS_DIRS").is_none() {
        let dir = format!("shardmeter-redis-{owner}-sim-");
        let left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
            .expect("the temporary directory")
            .flatten()
            .filter(|entry| entry.file_name().to_string_lossy().starts_with(&dir))
            .collect();
        assert!(left.is_empty(), "not removed: {left:?}");
    }
}
