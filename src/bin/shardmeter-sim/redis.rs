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

use crate::orphans;
use crate::redis_process::{self, CommandStats};
use fred::prelude::*;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Child;
use std::time::Duration;

/// Commands a client sends that start scripts (`RedisSink` sends these two).
const SCRIPT_RUNNERS: &[&str] = &["eval", "evalsha"];
/// Commands that never run inside a script: those, connection and script management, and `get`
/// (the engine's read side; the script's own `GET` runs only for totals beyond 2^53, never in a
/// simulation).
const CLIENT_ONLY: &[&str] = &[
    "eval", "evalsha", "script", "function", "ping", "hello", "auth", "client", "select",
    "command", "quit", "get",
];

/// A `redis-server` started for this run (127.0.0.1, a free port, nothing on disk); killed and
/// reaped when dropped. It works in `<temp>/shardmeter-redis-<pid>-sim-<port>`, named after
/// this process, so that if the sim is killed (and drops nothing) the next sim or test process
/// kills the server it left behind (`orphans.rs`).
#[derive(Debug)]
pub(crate) struct PrivateRedis {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl PrivateRedis {
    /// Starts one from `REDIS_SERVER_BIN` or `PATH`, after killing the servers that ended
    /// processes left behind. Retries with a new port if the one picked was taken in the
    /// meantime.
    pub(crate) fn start() -> Result<Self, String> {
        let binary = redis_process::binary().ok_or(
            "no redis-server on PATH: install Redis, set REDIS_SERVER_BIN, or pass --redis URL",
        )?;
        orphans::reap_once();
        let mut last_error = String::new();
        for _ in 0..3 {
            let port = redis_process::free_port().map_err(|e| format!("no free port: {e}"))?;
            let dir = std::env::temp_dir().join(format!(
                "shardmeter-redis-{}-sim-{port}",
                std::process::id()
            ));
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            let args = [
                "--dir".into(),
                dir.to_string_lossy().into_owned(),
                "--protected-mode".into(),
                "yes".into(),
            ];
            match redis_process::spawn(&binary, port, &args) {
                Ok(child) => return Ok(Self { child, port, dir }),
                Err(error) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    last_error = error;
                }
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
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What Redis executed between two `INFO stats commandstats` replies, the sim's `INFO` calls
/// removed.
#[derive(Debug, Clone, Default)]
pub(crate) struct CommandDelta {
    /// `total_commands_processed` delta: client commands and script-internal calls.
    pub(crate) total_commands_processed: u64,
    /// Per-command `calls` deltas (sub-commands apart: `script|load`).
    pub(crate) by_command: BTreeMap<String, u64>,
    /// Of those, the calls taken as made inside scripts (see the module docs).
    pub(crate) inside_scripts: BTreeMap<String, u64>,
}

impl CommandDelta {
    pub(crate) fn between(before: &str, after: &str) -> Result<Self, String> {
        let total = |info: &str| {
            let fields = redis_process::info_fields(info);
            let total = fields.get("total_commands_processed");
            (total.and_then(|v| v.parse::<u64>().ok()))
                .ok_or("INFO has no total_commands_processed")
        };
        let (before_stats, after_stats) = (CommandStats::parse(before), CommandStats::parse(after));
        let mut delta = Self::default();
        for (name, stat) in &after_stats.0 {
            let calls = stat.calls.saturating_sub(before_stats.calls(name));
            if name != "info" && calls > 0 {
                delta.by_command.insert(name.clone(), calls);
            }
        }
        if SCRIPT_RUNNERS
            .iter()
            .any(|s| delta.by_command.contains_key(*s))
        {
            let command = |name: &str| name.split('|').next().unwrap_or(name).to_owned();
            (delta.inside_scripts).extend(
                (delta.by_command.iter())
                    .filter(|(name, _)| !CLIENT_ONLY.contains(&command(name).as_str()))
                    .map(|(name, calls)| (name.clone(), *calls)),
            );
        }
        let info = after_stats.calls("info") - before_stats.calls("info");
        let processed = total(after)?.saturating_sub(total(before)?);
        delta.total_commands_processed = processed.saturating_sub(info);
        Ok(delta)
    }

    /// Commands clients sent.
    pub(crate) fn client_commands(&self) -> u64 {
        self.by_command.values().sum::<u64>() - self.inside_scripts.values().sum::<u64>()
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

/// `INFO stats commandstats`.
pub(crate) async fn counters(client: &Client) -> Result<String, String> {
    let info = client.custom(fred::cmd!("INFO"), vec!["stats", "commandstats"]);
    info.await.map_err(|e| format!("INFO failed: {e}"))
}

/// Every key matching `pattern`, by `SCAN` (a given Redis may be shared: no `KEYS`).
async fn scan_keys(client: &Client, pattern: &str) -> Result<Vec<String>, String> {
    let (mut keys, mut cursor) = (Vec::new(), "0".to_owned());
    loop {
        let (next, page): (String, Vec<String>) =
            (client.scan_page(cursor, pattern, Some(1000), None).await)
                .map_err(|e| format!("SCAN {pattern} failed: {e}"))?;
        keys.extend(page);
        if next == "0" {
            keys.sort();
            keys.dedup(); // SCAN may return a key twice
            return Ok(keys);
        }
        cursor = next;
    }
}

/// The totals per uid of the keys `<prefix>:<uid>:<day>`, summed over days.
pub(crate) async fn totals(client: &Client, prefix: &str) -> Result<BTreeMap<String, u64>, String> {
    let keys = scan_keys(client, &format!("{prefix}:*")).await?;
    let mut per_uid = BTreeMap::new();
    for chunk in keys.chunks(500) {
        let values: Vec<Option<i64>> =
            (client.mget(chunk.to_vec()).await).map_err(|e| format!("MGET failed: {e}"))?;
        for (key, value) in chunk.iter().zip(values) {
            let uid = (key.strip_prefix(prefix).and_then(|k| k.strip_prefix(':')))
                .and_then(|k| Some(k.rsplit_once(':')?.0))
                .ok_or_else(|| format!("unexpected key {key:?}"))?;
            let value =
                u64::try_from(value.unwrap_or(0)).map_err(|_| format!("{key} holds {value:?}"))?;
            *per_uid.entry(uid.to_owned()).or_default() += value;
        }
    }
    Ok(per_uid)
}

/// Deletes every key matching `pattern`; returns how many were deleted.
pub(crate) async fn delete_matching(client: &Client, pattern: &str) -> Result<u64, String> {
    let mut deleted = 0;
    for chunk in scan_keys(client, pattern).await?.chunks(500) {
        let n: u64 =
            (client.unlink(chunk.to_vec()).await).map_err(|e| format!("UNLINK failed: {e}"))?;
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
        let before = "total_commands_processed:0\r\n";
        let delta = CommandDelta::between(before, SAMPLE).unwrap();
        assert_eq!(delta.total_commands_processed, 118);
        assert_eq!(delta.by_command.values().sum::<u64>(), 103);
        assert_eq!(delta.client_commands(), 3);
        assert_eq!(Vec::from_iter(delta.inside_scripts.keys()), ["incrby"]);
        assert!(CommandDelta::between("# Stats\r\n", SAMPLE).is_err());

        let plain = SAMPLE.replace("cmdstat_evalsha", "cmdstat_ping");
        let delta = CommandDelta::between(before, &plain).unwrap();
        assert_eq!(delta.client_commands(), 103); // no script ran: every command is a client's
    }
}
