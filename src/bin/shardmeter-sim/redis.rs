//! What the sim asks Redis: its own command counters (`INFO stats` + `INFO commandstats`), the
//! totals under a key prefix, and the deletion of a run's keys.
//!
//! # Which figure is which
//!
//! Redis 7.0 counts a command run by a Lua script (`redis.call('INCRBY', …)`) like one sent by a
//! client: both in `cmdstat_<name>` and in `total_commands_processed` (checked on 7.0.15: one
//! `EVAL` running ten `INCRBY`s adds 11 to `total_commands_processed`). Neither counter alone says
//! how many commands the clients sent. So the sim reports, per mode:
//!
//! - **calls including script-internal**: the `total_commands_processed` delta (the sum of the
//!   `commandstats` deltas is shown beside it as a cross-check);
//! - **commands** (client-issued): the `commandstats` deltas of the commands a client sends. In
//!   a window in which Redis ran scripts (`EVAL`/`EVALSHA`/`FCALL` calls > 0), every data command
//!   (`SET`, `INCRBY`, `EXPIRE`, …) is taken as script-internal: valid when nothing but the sim
//!   writes to this Redis during the run, which holds for the private server.
//!
//! The sim's own `INFO` calls (for the live display and the window's two readings) are
//! subtracted from both figures.

use fred::prelude::*;
use std::collections::BTreeMap;
use std::time::Duration;

/// Commands a client sends that start scripts.
const SCRIPT_RUNNERS: &[&str] = &[
    "eval",
    "evalsha",
    "eval_ro",
    "evalsha_ro",
    "fcall",
    "fcall_ro",
];
/// Commands that are never run inside a script (connection and script management).
const CLIENT_ONLY: &[&str] = &[
    "script", "function", "ping", "hello", "auth", "client", "select", "command", "quit",
];

/// One reading of Redis' counters.
#[derive(Debug, Clone, Default)]
pub(crate) struct Counters {
    /// `total_commands_processed`.
    pub(crate) total_commands: u64,
    /// `cmdstat_<name>` → `calls`, with lowercase names (`config|get` style sub-commands kept).
    pub(crate) calls: BTreeMap<String, u64>,
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
    /// The change from `before` to `after`.
    pub(crate) fn between(before: &Counters, after: &Counters) -> Self {
        let delta = |name: &str| {
            let calls = |counters: &Counters| counters.calls.get(name).copied().unwrap_or(0);
            calls(after).saturating_sub(calls(before))
        };
        let info = delta("info");
        let by_command = after
            .calls
            .keys()
            .filter(|name| name.as_str() != "info")
            .map(|name| (name.clone(), delta(name)))
            .filter(|(_, calls)| *calls > 0)
            .collect();
        Self {
            total_commands_processed: after
                .total_commands
                .saturating_sub(before.total_commands)
                .saturating_sub(info),
            by_command,
        }
    }

    /// Sum of the per-command deltas (should equal `total_commands_processed`).
    pub(crate) fn all_calls(&self) -> u64 {
        self.by_command.values().sum()
    }

    /// Whether Redis ran scripts in this window.
    pub(crate) fn ran_scripts(&self) -> bool {
        SCRIPT_RUNNERS
            .iter()
            .any(|name| self.by_command.get(*name).is_some_and(|&n| n > 0))
    }

    /// Whether `name`'s calls count as sent by a client (see the module docs).
    /// Sub-commands (`script|load`, `client|setname`) count as their command.
    pub(crate) fn is_client_command(&self, name: &str) -> bool {
        let command = name.split('|').next().unwrap_or(name);
        !self.ran_scripts() || SCRIPT_RUNNERS.contains(&command) || CLIENT_ONLY.contains(&command)
    }

    /// Commands sent by clients.
    pub(crate) fn client_commands(&self) -> u64 {
        self.by_command
            .iter()
            .filter(|(name, _)| self.is_client_command(name))
            .map(|(_, calls)| calls)
            .sum()
    }

    /// Calls made by scripts.
    pub(crate) fn script_internal_calls(&self) -> u64 {
        self.all_calls() - self.client_commands()
    }
}

/// A connected client for the sim's own use (not the one under measurement).
pub(crate) async fn connect(url: &str) -> Result<Client, String> {
    let config = Config::from_url(url).map_err(|e| format!("bad Redis URL: {}", e.details()))?;
    let client = Builder::from_config(config)
        .with_connection_config(|connection| {
            connection.connection_timeout = Duration::from_secs(5);
        })
        .with_performance_config(|performance| {
            performance.default_command_timeout = Duration::from_secs(10);
        })
        .build()
        .map_err(|e| format!("cannot set up a Redis client: {e}"))?;
    tokio::time::timeout(Duration::from_secs(10), client.init())
        .await
        .map_err(|_| format!("no connection to Redis at {} within 10 s", redact(url)))?
        .map_err(|e| format!("cannot connect to Redis at {}: {e}", redact(url)))?;
    Ok(client)
}

/// Reads `INFO stats commandstats`.
pub(crate) async fn counters(client: &Client) -> Result<Counters, String> {
    let text: String = client
        .custom(fred::cmd!("INFO"), vec!["stats", "commandstats"])
        .await
        .map_err(|e| format!("INFO failed: {e}"))?;
    parse_counters(&text)
}

/// The server's version, from `INFO server`.
pub(crate) async fn version(client: &Client) -> Result<String, String> {
    let text: String = client
        .custom(fred::cmd!("INFO"), vec!["server"])
        .await
        .map_err(|e| format!("INFO failed: {e}"))?;
    Ok(text
        .lines()
        .find_map(|line| line.strip_prefix("redis_version:"))
        .unwrap_or("unknown")
        .trim()
        .to_owned())
}

fn parse_counters(text: &str) -> Result<Counters, String> {
    let mut counters = Counters::default();
    let mut found_total = false;
    for line in text.lines().map(str::trim) {
        if let Some(value) = line.strip_prefix("total_commands_processed:") {
            counters.total_commands = value
                .parse()
                .map_err(|_| format!("bad total_commands_processed {value:?}"))?;
            found_total = true;
        } else if let Some(rest) = line.strip_prefix("cmdstat_") {
            let Some((name, fields)) = rest.split_once(':') else {
                continue;
            };
            let calls = fields
                .split(',')
                .find_map(|field| field.strip_prefix("calls="))
                .and_then(|calls| calls.parse().ok())
                .ok_or_else(|| format!("no calls= in {line:?}"))?;
            counters.calls.insert(name.to_ascii_lowercase(), calls);
        }
    }
    if found_total {
        Ok(counters)
    } else {
        Err("INFO has no total_commands_processed".into())
    }
}

/// Every key matching `pattern`, by `SCAN` (bounded: at most `max_pages` pages of 1,000).
pub(crate) async fn scan_keys(
    client: &Client,
    pattern: &str,
    max_pages: usize,
) -> Result<Vec<String>, String> {
    let mut keys = Vec::new();
    let mut cursor = "0".to_owned();
    for _ in 0..max_pages {
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
    Err(format!(
        "SCAN {pattern} did not finish within {max_pages} pages"
    ))
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
    let keys = scan_keys(client, pattern, 100_000).await?;
    let mut deleted = 0;
    for chunk in keys.chunks(500) {
        let n: u64 = client
            .unlink(chunk.to_vec())
            .await
            .map_err(|e| format!("UNLINK failed: {e}"))?;
        deleted += n;
    }
    Ok(deleted)
}

/// `url` without its password, for messages.
pub(crate) fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://***@{}", &url[..scheme_end], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
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
        cmdstat_evalsha:calls=1,usec=9,usec_per_call=9.0,rejected_calls=0,failed_calls=0\r\n\
        cmdstat_script|load:calls=1,usec=9,usec_per_call=9.0,rejected_calls=0,failed_calls=0\r\n";

    #[test]
    fn parses_totals_and_calls() {
        let counters = parse_counters(SAMPLE).unwrap();
        assert_eq!(counters.total_commands, 120);
        assert_eq!(counters.calls["incrby"], 100);
        assert_eq!(counters.calls["evalsha"], 1);
        assert!(parse_counters("# Stats\r\n").is_err());
    }

    #[test]
    fn script_internal_calls_are_split_out_and_info_is_dropped() {
        let before = Counters::default();
        let after = parse_counters(SAMPLE).unwrap();
        let delta = CommandDelta::between(&before, &after);
        assert_eq!(delta.total_commands_processed, 118);
        assert_eq!(delta.all_calls(), 102);
        assert_eq!(delta.client_commands(), 2);
        assert_eq!(delta.script_internal_calls(), 100);

        let mut plain = after.clone();
        plain.calls.remove("evalsha");
        let delta = CommandDelta::between(&before, &plain);
        assert_eq!(delta.client_commands(), 101);
        assert_eq!(delta.script_internal_calls(), 0);
    }

    #[test]
    fn passwords_are_not_shown() {
        assert_eq!(
            redact("redis://u:secret@host:6379/0"),
            "redis://***@host:6379/0"
        );
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
