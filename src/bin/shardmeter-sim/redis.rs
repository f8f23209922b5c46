//! The sim's own use of Redis: a private server, an admin connection, Redis' command counters
//! (`INFO stats commandstats`), the totals under a key prefix, and the deletion of a run's keys.
//!
//! # Which figure is which
//!
//! Redis 7 counts a command run by a Lua script (`redis.call('INCRBY', …)`) like one a client
//! sent, in `cmdstat_<name>` *and* in `total_commands_processed` (checked on 7.0.15: one `EVAL`
//! running ten `INCRBY`s adds 11). So, per mode: **calls including script-internal** is the
//! `total_commands_processed` delta; **commands** (client-issued) are the `commandstats` deltas
//! of what clients send. In a window in which Redis ran scripts, every data command (`SET`,
//! `INCRBY`, `EXPIRE`, …) is taken as script-internal: true when only the sim writes to this
//! Redis, as with the private server. The sim's own `INFO` calls are subtracted from both.

use crate::redis_process::{self, CommandStats};
use fred::prelude::*;
use std::collections::BTreeMap;
use std::process::Child;
use std::time::Duration;

/// Commands a client sends that start scripts (`RedisSink` sends these two).
const SCRIPT_RUNNERS: &[&str] = &["eval", "evalsha"];
/// Commands that never run inside a script (connection and script management).
/// `get` is the engine's read side (one per account's first session and per idle account per
/// flush); the script's own `GET` runs only for totals beyond 2^53, never in a simulation.
const CLIENT_ONLY: &[&str] = &[
    "script", "function", "ping", "hello", "auth", "client", "select", "command", "quit", "get",
];

/// A `redis-server` started for this run (127.0.0.1, a free port, nothing on disk); killed and
/// reaped when dropped.
#[derive(Debug)]
pub(crate) struct PrivateRedis {
    child: Child,
    port: u16,
}

impl PrivateRedis {
    /// Starts one from `REDIS_SERVER_BIN` or `PATH`. Retries with a new port if the one picked
    /// was taken in the meantime.
    pub(crate) fn start() -> Result<Self, String> {
        let binary = redis_process::binary().ok_or(
            "no redis-server on PATH: install Redis, set REDIS_SERVER_BIN, or pass --redis URL",
        )?;
        let mut last_error = String::new();
        for _ in 0..3 {
            let port = redis_process::free_port().map_err(|e| format!("no free port: {e}"))?;
            match redis_process::spawn(&binary, port, &["--protected-mode".into(), "yes".into()]) {
                Ok(child) => return Ok(Self { child, port }),
                Err(error) => last_error = error,
            }
        }
        Err(last_error)
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One reading of Redis' counters.
#[derive(Debug, Clone, Default)]
pub(crate) struct Counters {
    /// `total_commands_processed`.
    pub(crate) total_commands: u64,
    pub(crate) commands: CommandStats,
}

impl Counters {
    fn parse(info: &str) -> Result<Self, String> {
        let total = redis_process::info_fields(info)
            .get("total_commands_processed")
            .and_then(|value| value.parse().ok())
            .ok_or("INFO has no total_commands_processed")?;
        Ok(Self {
            total_commands: total,
            commands: CommandStats::parse(info),
        })
    }
}

/// What Redis executed between two readings, the sim's `INFO` calls removed.
#[derive(Debug, Clone, Default)]
pub(crate) struct CommandDelta {
    /// `total_commands_processed` delta: client commands and script-internal calls.
    pub(crate) total_commands_processed: u64,
    /// Per-command `calls` deltas (no `info`).
    pub(crate) by_command: BTreeMap<String, u64>,
}

impl CommandDelta {
    pub(crate) fn between(before: &Counters, after: &Counters) -> Self {
        let mut delta = Self::default();
        for (name, stat) in &after.commands.0 {
            let calls = stat.calls.saturating_sub(before.commands.calls(name));
            if name != "info" && calls > 0 {
                delta.by_command.insert(name.clone(), calls);
            }
        }
        let info = after.commands.calls("info") - before.commands.calls("info");
        delta.total_commands_processed = (after.total_commands)
            .saturating_sub(before.total_commands)
            .saturating_sub(info);
        delta
    }

    /// Whether `name`'s calls count as sent by a client (see the module docs). Sub-commands
    /// (`script|load`) count as their command.
    pub(crate) fn is_client_command(&self, name: &str) -> bool {
        let command = name.split('|').next().unwrap_or(name);
        let ran_scripts = SCRIPT_RUNNERS
            .iter()
            .any(|s| self.by_command.contains_key(*s));
        !ran_scripts || SCRIPT_RUNNERS.contains(&command) || CLIENT_ONLY.contains(&command)
    }

    pub(crate) fn client_commands(&self) -> u64 {
        let client = self
            .by_command
            .iter()
            .filter(|(n, _)| self.is_client_command(n));
        client.map(|(_, calls)| calls).sum()
    }
}

/// A connected client for the sim's own use (not the one under measurement).
pub(crate) async fn connect(url: &str) -> Result<Client, String> {
    let config = Config::from_url(url).map_err(|e| format!("bad Redis URL: {}", e.details()))?;
    let client = Builder::from_config(config)
        .with_connection_config(|c| c.connection_timeout = Duration::from_secs(5))
        .with_performance_config(|p| p.default_command_timeout = Duration::from_secs(10))
        .build()
        .map_err(|e| format!("cannot set up a Redis client: {e}"))?;
    tokio::time::timeout(Duration::from_secs(10), client.init())
        .await
        .map_err(|_| "no connection to Redis within 10 s".to_owned())?
        .map_err(|e| format!("cannot connect to Redis: {e}"))?;
    Ok(client)
}

/// Reads `INFO stats commandstats`.
pub(crate) async fn counters(client: &Client) -> Result<Counters, String> {
    let info: String = (client
        .custom(fred::cmd!("INFO"), vec!["stats", "commandstats"])
        .await)
        .map_err(|e| format!("INFO failed: {e}"))?;
    Counters::parse(&info)
}

/// Every key matching `pattern`, by `SCAN`.
pub(crate) async fn scan_keys(client: &Client, pattern: &str) -> Result<Vec<String>, String> {
    let mut keys = Vec::new();
    let mut cursor = "0".to_owned();
    loop {
        let (next, page): (String, Vec<String>) = client
            .scan_page(cursor, pattern.to_owned(), Some(1000), None)
            .await
            .map_err(|e| format!("SCAN {pattern} failed: {e}"))?;
        keys.extend(page);
        if next == "0" {
            keys.sort();
            keys.dedup();
            return Ok(keys);
        }
        cursor = next;
    }
}

/// The integer values of `keys` (`MGET` in chunks); a missing key is 0.
pub(crate) async fn values(client: &Client, keys: &[String]) -> Result<Vec<i64>, String> {
    let mut values = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(500) {
        let got: Vec<Option<i64>> = client
            .mget(chunk.to_vec())
            .await
            .map_err(|e| format!("MGET failed: {e}"))?;
        values.extend(got.into_iter().map(Option::unwrap_or_default));
    }
    Ok(values)
}

/// Deletes every key matching `pattern`; returns how many were deleted.
pub(crate) async fn delete_matching(client: &Client, pattern: &str) -> Result<u64, String> {
    let mut deleted = 0;
    for chunk in scan_keys(client, pattern).await?.chunks(500) {
        let n: u64 = client
            .unlink(chunk.to_vec())
            .await
            .map_err(|e| format!("UNLINK failed: {e}"))?;
        deleted += n;
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "# Stats\r\n\
        total_connections_received:3\r\n\
        total_commands_processed:120\r\n\
        # Commandstats\r\n\
        cmdstat_incrby:calls=100,usec=40,usec_per_call=0.40,rejected_calls=0,failed_calls=0\r\n\
        cmdstat_info:calls=2,usec=81,usec_per_call=40.50,rejected_calls=0,failed_calls=0\r\n\
        cmdstat_evalsha:calls=2,usec=9,usec_per_call=9.0,rejected_calls=0,failed_calls=1\r\n\
        cmdstat_script|load:calls=1,usec=9,usec_per_call=9.0,rejected_calls=0,failed_calls=0\r\n";

    #[test]
    fn script_internal_calls_are_split_out_and_info_is_dropped() {
        let before = Counters::default();
        let after = Counters::parse(SAMPLE).unwrap();
        assert_eq!(after.total_commands, 120);
        assert!(Counters::parse("# Stats\r\n").is_err());
        let delta = CommandDelta::between(&before, &after);
        assert_eq!(delta.total_commands_processed, 118);
        assert_eq!(delta.by_command.values().sum::<u64>(), 103);
        assert_eq!(delta.client_commands(), 3);
        assert!(!delta.is_client_command("incrby") && delta.is_client_command("script|load"));

        let mut plain = after.clone();
        plain.commands.0.remove("evalsha");
        let delta = CommandDelta::between(&before, &plain);
        assert_eq!(delta.client_commands(), 101); // no script ran: every command is a client's
    }
}
