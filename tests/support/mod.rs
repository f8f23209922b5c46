//! Shared support for the integration tests that need a real Redis.
//!
//! Include it from a test file with `mod support;`. It provides:
//!
//! - [`RedisServer`]: a `redis-server` process of the test's own, on a free port, in a
//!   temporary directory, killed and removed on drop (or, if the process ends without unwinding,
//!   by the next test process: [`orphans`]). For tests that kill, restart or pause
//!   Redis, need `requirepass`, or count commands with `INFO commandstats`.
//! - [`shared_redis`]: the machine's shared Redis on 127.0.0.1:6379, for tests that only read
//!   and write their own keys. Other tests use it concurrently: put every key under a
//!   [`Keyspace`] prefix and never flush it.
//! - [`Proxy`]: a TCP proxy between a client and a Redis that can lose replies (forward a
//!   request, let Redis execute it, then cut both connections before the reply reaches the
//!   client) or cut and refuse every connection (network loss).
//! - [`RespClient`]: a tiny blocking RESP2 client to check what Redis holds (GET, TTL,
//!   commandstats), independent of the client under test and of any async runtime.
//! - [`until_ok`]: retries an async operation until it succeeds, with a deadline.
//!
//! Everything waits with a timeout: a broken or missing server fails the test, never hangs it.
//! `redis-server` is looked up in `PATH`, or set `REDIS_SERVER_BIN`.

// Each test crate compiles this module privately and uses part of it.
#![allow(dead_code, unreachable_pub)]

#[path = "../../src/bin/shardmeter-sim/orphans.rs"]
pub mod orphans;
#[path = "../../src/bin/shardmeter-sim/redis_process.rs"]
pub mod redis_process;

pub mod cluster;
pub mod load;
pub mod logs;
pub mod rng;
pub mod wait;

pub(crate) use redis_process::CommandStats;
use rng::Rng;

use std::collections::HashMap;
use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a server may take to start answering PING.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Socket timeout of [`RespClient`].
const RESP_TIMEOUT: Duration = Duration::from_secs(10);

static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// A string unique to this process and call: `<pid>-<counter>-<nanos>`.
pub fn unique_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
    format!("{}-{n}-{}", std::process::id(), nanos % 1_000_000_000_000)
}

/// A random-enough 64-bit number (time, pid, counter), for `BatchId::writer`.
pub fn unique_u64() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
    rng::splitmix64(nanos ^ (u64::from(std::process::id()) << 32) ^ n.rotate_left(17))
}

/// A current-thread tokio runtime with its timers and I/O, for tests that build an engine
/// outside `#[tokio::test]` (enter it with `runtime.enter()` before `build()`).
pub fn current_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A port that was free a moment ago (bound to :0, then released). Another process may take it
/// before it is used; [`RedisServer::start_with`] retries with a new one if so.
pub fn free_port() -> u16 {
    redis_process::free_port().expect("bind 127.0.0.1:0")
}

// ---------------------------------------------------------------------------------------------
// The shared Redis
// ---------------------------------------------------------------------------------------------

/// Address of the machine's shared Redis.
pub const SHARED_REDIS: &str = "127.0.0.1:6379";

/// The shared Redis' address, after checking that it answers; panics with a clear message if
/// it does not (these tests need it; CI runs one).
pub fn shared_redis() -> SocketAddr {
    let addr: SocketAddr = SHARED_REDIS.parse().expect("address");
    match RespClient::connect(addr).and_then(|mut c| c.command(&["PING"])) {
        Ok(Reply::Status(pong)) if pong == "PONG" => addr,
        other => panic!(
            "these tests need a redis-server on {SHARED_REDIS} (start one with \
             `redis-server --save '' --appendonly no`); PING gave {other:?}"
        ),
    }
}

/// The shared Redis as a URL.
pub fn shared_redis_url() -> String {
    format!("redis://{}", shared_redis())
}

/// A key prefix of a test's own on a shared Redis; deletes every key under it when dropped.
#[derive(Debug)]
pub struct Keyspace {
    prefix: String,
    addr: SocketAddr,
}

impl Keyspace {
    /// A prefix `smtest-<name>-<unique>` on the Redis at `addr`. `name` should hold no glob
    /// characters (`*?[]\`) and no braces.
    pub fn new(addr: SocketAddr, name: &str) -> Self {
        Self {
            prefix: format!("smtest-{name}-{}", unique_suffix()),
            addr,
        }
    }

    /// The prefix (no trailing `:`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<prefix>:<rest>`.
    pub fn key(&self, rest: &str) -> String {
        format!("{}:{rest}", self.prefix)
    }

    /// Every key under the prefix.
    pub fn keys(&self) -> Vec<String> {
        RespClient::connect(self.addr)
            .map(|mut c| c.scan(&format!("{}*", self.prefix)))
            .unwrap_or_default()
    }
}

impl Drop for Keyspace {
    fn drop(&mut self) {
        if let Ok(mut client) = RespClient::connect(self.addr) {
            let keys = client.scan(&format!("{}*", self.prefix));
            for chunk in keys.chunks(500) {
                let mut args = vec!["DEL".to_owned()];
                args.extend(chunk.iter().cloned());
                let _ = client.command(&args);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// RedisServer
// ---------------------------------------------------------------------------------------------

/// A `redis-server` of the test's own: 127.0.0.1, a free port, a temporary `--dir`, no RDB
/// snapshots, no AOF unless asked. Killed (SIGKILL) and its directory removed on drop.
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    args: Vec<String>,
    password: Option<String>,
    child: Option<Child>,
}

impl fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisServer")
            .field("port", &self.port)
            .field("dir", &self.dir)
            .field("args", &self.args)
            .field("pid", &self.child.as_ref().map(Child::id))
            .finish()
    }
}

impl RedisServer {
    /// Starts a server with the default arguments.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a server with extra `redis-server` arguments, which override the defaults: e.g.
    /// `&["--appendonly", "yes"]` (the AOF goes to the server's temporary directory) or
    /// `&["--requirepass", "secret"]` ([`client`](Self::client) then authenticates).
    pub fn start_with(args: &[&str]) -> Self {
        let mut last_error = String::new();
        for _ in 0..5 {
            match Self::try_start(free_port(), args) {
                Ok(server) => return server,
                // Most likely the port was taken between `free_port` and the bind: try another.
                Err(error) => last_error = error,
            }
        }
        panic!("could not start redis-server: {last_error}");
    }

    /// Starts a server on `port` (e.g. one a client was already pointed at).
    pub fn start_on(port: u16, args: &[&str]) -> Self {
        Self::try_start(port, args).unwrap_or_else(|error| panic!("{error}"))
    }

    fn try_start(port: u16, args: &[&str]) -> Result<Self, String> {
        orphans::reap_once();
        let dir = std::env::temp_dir().join(format!("shardmeter-redis-{}", unique_suffix()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        let password = args
            .iter()
            .position(|a| a == "--requirepass")
            .and_then(|i| args.get(i + 1).cloned());
        let mut server = Self {
            port,
            dir,
            args,
            password,
            child: None,
        };
        match server.spawn() {
            Ok(()) => Ok(server),
            Err(error) => Err(error), // `server` drops: its directory is removed
        }
    }

    fn spawn(&mut self) -> Result<(), String> {
        let bin = redis_process::binary().unwrap_or_else(|| "redis-server".into());
        let log = self.dir.join("redis.log");
        let mut args = vec![
            "--dir".to_owned(),
            self.dir.to_string_lossy().into_owned(),
            "--logfile".to_owned(),
            log.to_string_lossy().into_owned(),
        ];
        args.extend(self.args.iter().cloned());
        match redis_process::spawn(&bin, self.port, &args) {
            Ok(child) => {
                self.child = Some(child);
                Ok(())
            }
            Err(error) => Err(format!("{error}: {}", tail(&log))),
        }
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `redis://127.0.0.1:<port>` (no credentials, even with `--requirepass`).
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr())
    }

    /// The server's working directory (AOF, log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is running (it may be paused).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(_) => {
                self.child = None;
                false
            }
            None => false,
        }
    }

    /// Kills the server at once (SIGKILL): no shutdown, no final save. Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A paused process dies of SIGKILL too.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server if it runs, then starts it again on the same port with the same
    /// directory and arguments (so it reloads its AOF if it had one).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn()
            .unwrap_or_else(|error| panic!("restart: {error}"));
    }

    /// Stops the process (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Resumes a paused process (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.pid().expect("the server is not running");
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {pid} failed");
    }

    /// A blocking client, authenticated if the server was started with `--requirepass`.
    pub fn client(&self) -> RespClient {
        let mut client = RespClient::connect(self.addr()).expect("connect to redis-server");
        if let Some(password) = &self.password {
            match client.command(&["AUTH", password]) {
                Ok(Reply::Status(_)) => {}
                other => panic!("AUTH failed: {other:?}"),
            }
        }
        client
    }

    /// `INFO commandstats`.
    pub fn commandstats(&self) -> CommandStats {
        self.client().commandstats()
    }

    /// `GET key` as text.
    pub fn get(&self, key: &str) -> Option<String> {
        self.client().get(key)
    }

    /// `TTL key`.
    pub fn ttl(&self, key: &str) -> i64 {
        self.client().ttl(key)
    }

    /// The server's log so far (all of its runs: [`restart`](Self::restart) appends).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }

    /// Rewrites the AOF from memory (`BGREWRITEAOF`) and waits until the rewrite is done.
    ///
    /// Needed after restarting a server whose AOF a kill cut inside a `MULTI`/`EXEC` block (how
    /// a script's effects are logged): Redis 7.0 with `aof-load-truncated yes` (the default)
    /// truncates such a file at the last complete command rather than before the `MULTI`, and
    /// the dangling `MULTI` swallows the next transaction at the following load, replaying the
    /// cut one (Valkey fixed this in valkey-io/valkey#4342). A rewrite replaces that file with
    /// one made from memory: same data, no dangling `MULTI`.
    pub fn rewrite_aof(&self) {
        let mut client = self.client();
        let deadline = Instant::now() + START_TIMEOUT;
        let rewrites = |client: &mut RespClient| client.info("persistence")["aof_rewrites"].clone();
        let before = rewrites(&mut client);
        loop {
            assert!(Instant::now() < deadline, "BGREWRITEAOF did not start");
            match client.command(&["BGREWRITEAOF"]) {
                Ok(Reply::Status(_)) => break,
                // One already running may have started before the data it must cover: wait for
                // it to end, then ask again.
                Ok(Reply::Error(error)) if error.contains("in progress") => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                other => panic!("BGREWRITEAOF: {other:?}"),
            }
        }
        loop {
            let info = client.info("persistence");
            if info["aof_rewrites"] != before
                && info["aof_rewrite_in_progress"] == "0"
                && info["aof_rewrite_scheduled"] == "0"
            {
                assert_eq!(info["aof_last_bgrewrite_status"], "ok", "{info:?}");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "BGREWRITEAOF did not finish: {info:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        if std::env::var_os("SHARDMETER_KEEP_REDIS_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The last lines of a log file, for error messages.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

// ---------------------------------------------------------------------------------------------
// RespClient
// ---------------------------------------------------------------------------------------------

/// The URL of the ACL user [`RespClient::set_meter_acl`] defines, on 127.0.0.1 at `port`.
pub fn meter_user_url(port: u16) -> String {
    format!("redis://meter:pw@127.0.0.1:{port}")
}

/// A RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK`
    Status(String),
    /// `-ERR ...`
    Error(String),
    /// `:42`
    Integer(i64),
    /// `$...`; `None` for nil.
    Bulk(Option<Vec<u8>>),
    /// `*...`; `None` for a nil array.
    Array(Option<Vec<Reply>>),
}

/// A minimal blocking Redis client (RESP2), to check what a server holds.
#[derive(Debug)]
pub struct RespClient {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl RespClient {
    /// Connects, with a 5 s connect timeout and 10 s read/write timeouts.
    pub fn connect(addr: SocketAddr) -> io::Result<Self> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(RESP_TIMEOUT))?;
        stream.set_write_timeout(Some(RESP_TIMEOUT))?;
        let writer = stream.try_clone()?;
        Ok(Self {
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// Sends one command and reads its reply (an error reply is `Ok(Reply::Error)`).
    pub fn command<S: AsRef<[u8]>>(&mut self, args: &[S]) -> io::Result<Reply> {
        let mut request = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            let arg = arg.as_ref();
            request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            request.extend_from_slice(arg);
            request.extend_from_slice(b"\r\n");
        }
        self.writer.write_all(&request)?;
        self.read_reply()
    }

    /// (Re)defines the ACL user the permission tests connect as ([`meter_user_url`]): password
    /// `pw`, every key and command, then `rule` (`-expire`, `+evalsha`...).
    pub fn set_meter_acl(&mut self, rule: &str) {
        let reply = self
            .command(&["ACL", "SETUSER", "meter", "on", ">pw", "~*", "+@all", rule])
            .unwrap();
        assert_eq!(
            reply,
            Reply::Status("OK".into()),
            "ACL SETUSER meter {rule}"
        );
    }

    fn read_reply(&mut self) -> io::Result<Reply> {
        let mut line = Vec::new();
        self.reader.read_until(b'\n', &mut line)?;
        if line.len() < 3 || !line.ends_with(b"\r\n") {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "truncated reply",
            ));
        }
        let text = String::from_utf8_lossy(&line[1..line.len() - 2]).into_owned();
        let number = || {
            text.parse::<i64>().map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidData, format!("bad length {text:?}"))
            })
        };
        Ok(match line[0] {
            b'+' => Reply::Status(text.clone()),
            b'-' => Reply::Error(text.clone()),
            b':' => Reply::Integer(number()?),
            b'$' => match number()? {
                -1 => Reply::Bulk(None),
                len => {
                    let mut data = vec![0; len as usize + 2];
                    self.reader.read_exact(&mut data)?;
                    data.truncate(len as usize);
                    Reply::Bulk(Some(data))
                }
            },
            b'*' => match number()? {
                -1 => Reply::Array(None),
                len => Reply::Array(Some(
                    (0..len)
                        .map(|_| self.read_reply())
                        .collect::<io::Result<_>>()?,
                )),
            },
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unknown reply type {:?}", other as char),
                ))
            }
        })
    }

    fn expect(&mut self, args: &[&str]) -> Reply {
        match self.command(args) {
            Ok(Reply::Error(error)) => panic!("{args:?} failed: {error}"),
            Ok(reply) => reply,
            Err(error) => panic!("{args:?}: {error}"),
        }
    }

    /// `GET key` as text; `None` if the key does not exist.
    pub fn get(&mut self, key: &str) -> Option<String> {
        match self.expect(&["GET", key]) {
            Reply::Bulk(value) => value.map(|v| String::from_utf8_lossy(&v).into_owned()),
            other => panic!("GET {key}: {other:?}"),
        }
    }

    /// `GET key` as an integer; `None` if the key does not exist.
    pub fn get_i64(&mut self, key: &str) -> Option<i64> {
        self.get(key)
            .map(|v| v.parse().unwrap_or_else(|_| panic!("{key} holds {v:?}")))
    }

    /// `SET key value`.
    pub fn set(&mut self, key: &str, value: &str) {
        self.expect(&["SET", key, value]);
    }

    /// `TTL key`: seconds left, -1 without expiry, -2 if missing.
    pub fn ttl(&mut self, key: &str) -> i64 {
        match self.expect(&["TTL", key]) {
            Reply::Integer(ttl) => ttl,
            other => panic!("TTL {key}: {other:?}"),
        }
    }

    /// `EXISTS key`.
    pub fn exists(&mut self, key: &str) -> bool {
        self.expect(&["EXISTS", key]) == Reply::Integer(1)
    }

    /// Every key matching `pattern` (SCAN).
    pub fn scan(&mut self, pattern: &str) -> Vec<String> {
        let mut cursor = "0".to_owned();
        let mut keys = Vec::new();
        loop {
            let reply = self.expect(&["SCAN", &cursor, "MATCH", pattern, "COUNT", "1000"]);
            let Reply::Array(Some(parts)) = reply else {
                panic!("SCAN: {reply:?}")
            };
            match parts.as_slice() {
                [Reply::Bulk(Some(next)), Reply::Array(Some(found))] => {
                    keys.extend(found.iter().filter_map(|k| match k {
                        Reply::Bulk(Some(k)) => Some(String::from_utf8_lossy(k).into_owned()),
                        _ => None,
                    }));
                    cursor = String::from_utf8_lossy(next).into_owned();
                }
                _ => panic!("SCAN: {parts:?}"),
            }
            if cursor == "0" {
                return keys;
            }
        }
    }

    /// `INFO <section>` as its `field:value` lines.
    pub fn info(&mut self, section: &str) -> HashMap<String, String> {
        match self.expect(&["INFO", section]) {
            Reply::Bulk(Some(text)) => redis_process::info_fields(&String::from_utf8_lossy(&text)),
            other => panic!("INFO {section}: {other:?}"),
        }
    }

    /// `INFO commandstats`, parsed.
    pub fn commandstats(&mut self) -> CommandStats {
        match self.expect(&["INFO", "commandstats"]) {
            Reply::Bulk(Some(text)) => CommandStats::parse(&String::from_utf8_lossy(&text)),
            other => panic!("INFO commandstats: {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// until_ok
// ---------------------------------------------------------------------------------------------

/// Runs `attempt` until it returns `Ok`, every 50 ms, for at most `limit`; panics with the last
/// error after that. Returns the value and the number of failed attempts.
pub async fn until_ok<T, E, F, Fut>(what: &str, limit: Duration, mut attempt: F) -> (T, u32)
where
    E: fmt::Debug,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    let mut failures = 0;
    loop {
        match tokio::time::timeout_at(deadline, attempt()).await {
            Ok(Ok(value)) => return (value, failures),
            Ok(Err(error)) if tokio::time::Instant::now() >= deadline => {
                panic!("{what}: still failing after {limit:?}: {error:?}")
            }
            Ok(Err(_)) => failures += 1,
            Err(_) => panic!("{what}: an attempt was still running after {limit:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Proxy
// ---------------------------------------------------------------------------------------------

/// What the proxy does to requests.
#[derive(Debug)]
enum Fault {
    /// Pass everything.
    None,
    /// The next `remaining` requests containing `needle` lose their reply.
    Times { needle: Vec<u8>, remaining: u32 },
    /// Each request containing `needle` loses its reply with `probability` (a seeded
    /// generator, so a run is reproducible).
    Probability {
        needle: Vec<u8>,
        probability: f64,
        rng: Rng,
    },
}

#[derive(Debug)]
struct ProxyShared {
    upstream: SocketAddr,
    fault: Mutex<Fault>,
    faults_fired: AtomicU64,
    accepted: AtomicU64,
    refusing: AtomicBool,
    /// Bumped to cut every open connection.
    cut: tokio::sync::watch::Sender<u64>,
}

impl ProxyShared {
    /// Whether the client data in `window` (the end of the previous read plus this one) holds a
    /// request that must lose its reply. Counts the fault when it fires.
    fn should_fault(&self, window: &[u8]) -> bool {
        let mut fault = self.fault.lock().unwrap_or_else(|p| p.into_inner());
        let fire = match &mut *fault {
            Fault::None => false,
            Fault::Times { needle, remaining } => {
                if *remaining > 0 && contains(window, needle) {
                    *remaining -= 1;
                    true
                } else {
                    false
                }
            }
            Fault::Probability {
                needle,
                probability,
                rng,
            } => {
                if contains(window, needle) {
                    rng.chance(*probability)
                } else {
                    false
                }
            }
        };
        if fire {
            self.faults_fired.fetch_add(1, Ordering::SeqCst);
        }
        fire
    }

    fn needle_len(&self) -> usize {
        match &*self.fault.lock().unwrap_or_else(|p| p.into_inner()) {
            Fault::None => 0,
            Fault::Times { needle, .. } | Fault::Probability { needle, .. } => needle.len(),
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// A TCP proxy in front of a Redis, with faults. Runs on the current tokio runtime; stops (and
/// cuts its connections) when dropped.
///
/// The "lost reply" fault forwards a request that contains a given string (say `EVALSHA`) to
/// Redis, waits for Redis' answer — so the command has run — and then closes both connections
/// without passing the answer on: the client sees a dropped connection and cannot know whether
/// its command ran. Answers that arrive in the same moment for earlier pipelined requests are
/// lost with it.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<ProxyShared>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy on a free port of 127.0.0.1, forwarding to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let shared = Arc::new(ProxyShared {
            upstream,
            fault: Mutex::new(Fault::None),
            faults_fired: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            refusing: AtomicBool::new(false),
            cut,
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Self {
            addr,
            shared,
            accept,
        }
    }

    /// The proxy's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `redis://<proxy address>`.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// The next `times` requests containing `needle` (e.g. `"EVALSHA"`, `"EXEC"`, `"INCRBY"`;
    /// clients send command names in upper case) run in Redis but lose their reply: both
    /// connections are cut once Redis has been quiet for 50 ms after it (at most 1 s after it).
    /// The requests sent meanwhile run too and lose their replies as well.
    pub fn lose_replies_to(&self, needle: &str, times: u32) {
        *self.shared.fault.lock().unwrap() = Fault::Times {
            needle: needle.as_bytes().to_vec(),
            remaining: times,
        };
    }

    /// Each request containing `needle` loses its reply with `probability`, drawn from a
    /// generator seeded with `seed` (non-zero), so a failing run can be replayed.
    pub fn lose_replies_randomly(&self, needle: &str, probability: f64, seed: u64) {
        *self.shared.fault.lock().unwrap() = Fault::Probability {
            needle: needle.as_bytes().to_vec(),
            probability,
            rng: Rng::new(seed),
        };
    }

    /// Stops injecting lost replies.
    pub fn clear_faults(&self) {
        *self.shared.fault.lock().unwrap() = Fault::None;
    }

    /// How many replies were lost on purpose so far.
    pub fn faults_fired(&self) -> u64 {
        self.shared.faults_fired.load(Ordering::SeqCst)
    }

    /// Connections accepted so far (refused ones included).
    pub fn connections_accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Network loss: cuts every open connection and closes new ones at once, until
    /// `set_network_down(false)`.
    pub fn set_network_down(&self, down: bool) {
        self.shared.refusing.store(down, Ordering::SeqCst);
        if down {
            self.cut_all();
        }
    }

    /// Cuts every open connection (clients may reconnect at once).
    pub fn cut_all(&self) {
        self.shared.cut.send_modify(|generation| *generation += 1);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut_all();
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, shared: Arc<ProxyShared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        if shared.refusing.load(Ordering::SeqCst) {
            drop(client);
            continue;
        }
        let cut = shared.cut.subscribe();
        tokio::spawn(relay(client, shared.clone(), cut));
    }
}

/// Copies bytes both ways until either side closes, the proxy cuts, or a fault fires.
async fn relay(
    client: tokio::net::TcpStream,
    shared: Arc<ProxyShared>,
    mut cut: tokio::sync::watch::Receiver<u64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let connect = tokio::net::TcpStream::connect(shared.upstream);
    let Ok(Ok(server)) = tokio::time::timeout(Duration::from_secs(5), connect).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let mut from_client = vec![0u8; 64 * 1024];
    let mut from_server = vec![0u8; 64 * 1024];
    // The last bytes of the previous client read, so a needle split over two reads is found.
    let mut carry: Vec<u8> = Vec::new();
    // Once a request is doomed: when to cut (the server quiet for `QUIET`, at most `LAST` after
    // the request). Until then the client's bytes still go through, so that the doomed request
    // reaches Redis whole (it may span reads) and runs, and every reply is swallowed: the doomed
    // request's and those of the requests after it, which run too. Cutting at the first reply
    // after the request, as this did before, could cut a request sent behind earlier ones
    // before Redis had all of it: it then never ran, and the test that wanted a lost reply of an
    // applied request saw none.
    const QUIET: Duration = Duration::from_millis(50);
    const LAST: Duration = Duration::from_secs(1);
    let mut doomed: Option<(tokio::time::Instant, tokio::time::Instant)> = None;

    loop {
        let cut_at = doomed.map(|(since, quiet_until)| quiet_until.min(since + LAST));
        tokio::select! {
            _ = cut.changed() => return,
            _ = tokio::time::sleep_until(cut_at.unwrap_or_else(tokio::time::Instant::now)), if cut_at.is_some() => return,
            read = client_read.read(&mut from_client) => {
                let n = match read { Ok(0) | Err(_) => return, Ok(n) => n };
                let chunk = &from_client[..n];
                if doomed.is_none() {
                    carry.extend_from_slice(chunk);
                    if shared.should_fault(&carry) {
                        let now = tokio::time::Instant::now();
                        doomed = Some((now, now + QUIET));
                    }
                    let keep = shared.needle_len().saturating_sub(1);
                    let drop_until = carry.len().saturating_sub(keep);
                    carry.drain(..drop_until);
                }
                if server_write.write_all(chunk).await.is_err() {
                    return;
                }
            }
            read = server_read.read(&mut from_server) => {
                let n = match read { Ok(0) | Err(_) => return, Ok(n) => n };
                if let Some((_, quiet_until)) = &mut doomed {
                    *quiet_until = tokio::time::Instant::now() + QUIET;
                    continue;
                }
                if client_write.write_all(&from_server[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}
