//! A `redis-server` process on a loopback port, and the parsing of `INFO` replies.
//!
//! One file for both users: `shardmeter-sim` starts its private server with it, and the
//! integration tests' fixture (`tests/support`, which includes this file with `#[path]`) builds
//! its `RedisServer` on it. The few items only the fixture uses say so.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a freshly started server may take to answer `PING`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// `REDIS_SERVER_BIN` if set, else `redis-server` from `PATH`, if there is one.
pub(crate) fn binary() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("REDIS_SERVER_BIN") {
        return Some(bin.into());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("redis-server"))
        .find(|candidate| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(candidate)
                .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        })
}

/// A loopback port nothing listens on right now (another process may still take it first).
pub(crate) fn free_port() -> std::io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

/// Starts `binary` on 127.0.0.1:`port` with nothing on disk (`--save "" --appendonly no`),
/// in the foreground, then `args` (which override those), and waits until it answers `PING`.
/// On failure the process is killed and reaped, and the error says why.
pub(crate) fn spawn(binary: &Path, port: u16, args: &[String]) -> Result<Child, String> {
    let mut child = Command::new(binary)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| {
            format!(
                "cannot run {} (set REDIS_SERVER_BIN?): {e}",
                binary.display()
            )
        })?;
    let deadline = Instant::now() + READY_TIMEOUT;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "redis-server on port {port} exited with {status} (port taken?)"
            ));
        }
        if answers_ping(port) {
            return Ok(child);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    Err(format!(
        "redis-server on port {port} did not answer PING within {READY_TIMEOUT:?}"
    ))
}

/// Whether a server on `port` is up: `+PONG`, or `-NOAUTH` (`requirepass`); not `-LOADING`.
pub(crate) fn answers_ping(port: u16) -> bool {
    let addr = (Ipv4Addr::LOCALHOST, port).into();
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut reply = [0u8; 64];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read(&mut reply).is_ok_and(|n| n > 0)
        && (reply.starts_with(b"+PONG") || reply.starts_with(b"-NOAUTH"))
}

/// The `field:value` lines of an `INFO` reply (section headers and blank lines left out).
pub(crate) fn info_fields(info: &str) -> HashMap<String, String> {
    info.lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(field, value)| (field.to_owned(), value.trim().to_owned()))
        .collect()
}

/// One command's line of `INFO commandstats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CommandStat {
    /// Executions (including those that failed while running).
    pub(crate) calls: u64,
    /// Refused before running (unknown command, wrong arity, OOM...).
    #[allow(dead_code)] // read by the tests' fixture only
    pub(crate) rejected_calls: u64,
    /// Ran and returned an error (e.g. `EVALSHA` of a script not loaded: `NOSCRIPT`).
    pub(crate) failed_calls: u64,
}

/// `INFO commandstats` by lower-case command name (`evalsha`, `script|load`, `incrby`...).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct CommandStats(pub(crate) HashMap<String, CommandStat>);

impl CommandStats {
    /// Parses lines like `cmdstat_evalsha:calls=2,usec=9,...,rejected_calls=0,failed_calls=0`.
    pub(crate) fn parse(info: &str) -> Self {
        let mut stats = HashMap::new();
        for (field, fields) in info_fields(info) {
            let Some(name) = field.strip_prefix("cmdstat_") else {
                continue;
            };
            let mut stat = CommandStat::default();
            for (key, value) in fields.split(',').filter_map(|f| f.split_once('=')) {
                let value = value.parse().unwrap_or(0);
                match key {
                    "calls" => stat.calls = value,
                    "rejected_calls" => stat.rejected_calls = value,
                    "failed_calls" => stat.failed_calls = value,
                    _ => {}
                }
            }
            stats.insert(name.to_ascii_lowercase(), stat);
        }
        Self(stats)
    }

    /// The line of `command` (zero if it never ran).
    pub(crate) fn get(&self, command: &str) -> CommandStat {
        self.0.get(command).copied().unwrap_or_default()
    }

    /// Executions of `command`.
    pub(crate) fn calls(&self, command: &str) -> u64 {
        self.get(command).calls
    }

    /// Every time `command` reached the server: executed or refused.
    #[allow(dead_code)] // used by the tests' fixture only
    pub(crate) fn received(&self, command: &str) -> u64 {
        let stat = self.get(command);
        stat.calls + stat.rejected_calls
    }
}
