//! A local Redis Cluster of six `redis-server` processes (three primaries, three replicas) on
//! free ports, for the tests that need a real Cluster: failover, resharding, routing.
//!
//! [`RedisCluster::start`] runs the recipe measured in `docs/operations.md` (*Redis Cluster*):
//! six servers with `--cluster-enabled yes --cluster-node-timeout 2000`, then
//! `redis-cli --cluster create … --cluster-replicas 1 --cluster-yes`, then waits until every
//! node reports `cluster_state:ok` and knows all six nodes and all 16,384 slots. redis-cli's
//! exit code alone proves nothing (without `--cluster-yes` and no terminal it exits 0 and leaves
//! no cluster), so only the nodes' own state counts.
//!
//! Every process is a child of the test, killed (SIGKILL) by its pid when the cluster is
//! dropped, also when the test panics. One cluster runs at a time per test binary: `start`
//! waits for the previous one to be dropped (2 cores do not run two well).

use super::{free_port, unique_suffix, Reply, RespClient};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long the cluster may take to form, fail over or settle after a reshard.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether a cluster of this test binary is running, and its end's signal.
static RUNNING: Mutex<bool> = Mutex::new(false);
static ENDED: Condvar = Condvar::new();

/// The right to run a cluster; given back on drop. (A `MutexGuard` would do, but a cluster
/// moves between threads, e.g. into `spawn_blocking`.)
#[derive(Debug)]
struct Turn;

impl Turn {
    fn take() -> Self {
        let mut running = RUNNING.lock().unwrap_or_else(|p| p.into_inner());
        while *running {
            running = ENDED.wait(running).unwrap_or_else(|p| p.into_inner());
        }
        *running = true;
        Turn
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        *RUNNING.lock().unwrap_or_else(|p| p.into_inner()) = false;
        ENDED.notify_one();
    }
}

/// One `redis-server` of the cluster.
#[derive(Debug)]
pub struct Node {
    /// Client port.
    pub port: u16,
    /// Cluster bus port.
    pub bus_port: u16,
    child: Option<Child>,
}

impl Node {
    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Whether the process runs (it has not been killed).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// A blocking client.
    pub fn client(&self) -> RespClient {
        RespClient::connect(self.addr()).expect("connect to a cluster node")
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `((first slot, last slot), primary port)`, a line of `CLUSTER SLOTS`.
type SlotOwner = ((u16, u16), u16);

/// Six `redis-server` processes forming a cluster; see the module docs.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<Node>,
    dir: PathBuf,
    _turn: Turn,
}

impl RedisCluster {
    /// Starts six servers, creates the cluster and waits until it is healthy.
    pub fn start() -> Self {
        super::orphans::reap_once();
        let turn = Turn::take();
        let dir = std::env::temp_dir().join(format!("shardmeter-cluster-{}", unique_suffix()));
        let mut cluster = Self {
            nodes: Vec::new(),
            dir,
            _turn: turn,
        };
        for _ in 0..6 {
            let node = cluster.spawn_node();
            cluster.nodes.push(node);
        }
        let mut create = Command::new(redis_cli());
        create.arg("--cluster").arg("create");
        for node in &cluster.nodes {
            create.arg(node.addr().to_string());
        }
        let output = create
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        // The exit code is not trusted (see the module docs): the nodes' state is.
        let formed = cluster.wait_healthy();
        assert!(
            formed.is_ok(),
            "the cluster did not form: {formed:?}; redis-cli said: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        cluster
    }

    fn spawn_node(&self) -> Node {
        let (port, bus_port) = (free_port(), free_port());
        let dir = self.dir.join(port.to_string());
        std::fs::create_dir_all(&dir).expect("create the node's directory");
        let child = Command::new(redis_server())
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                &bus_port.to_string(),
            ])
            .args(["--cluster-config-file", "nodes.conf"])
            .args(["--cluster-node-timeout", "2000"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&dir)
            .arg("--logfile")
            .arg(dir.join("redis.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run redis-server (set REDIS_SERVER_BIN?)");
        let node = Node {
            port,
            bus_port,
            child: Some(child),
        };
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        while !matches!(
            RespClient::connect(node.addr()).and_then(|mut c| c.command(&["PING"])),
            Ok(Reply::Status(ref pong)) if pong == "PONG"
        ) {
            assert!(Instant::now() < deadline, "node {port} did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        node
    }

    /// Waits until every running node says `cluster_state:ok`, knows every running node and has
    /// all slots assigned, and the running primaries own all slots.
    pub fn wait_healthy(&self) -> Result<(), String> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        let mut last = String::new();
        while Instant::now() < deadline {
            match self.check_health() {
                Ok(()) => return Ok(()),
                Err(why) => last = why,
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(last)
    }

    fn check_health(&self) -> Result<(), String> {
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            let mut client = RespClient::connect(node.addr()).map_err(|e| e.to_string())?;
            let info = match client.command(&["CLUSTER", "INFO"]) {
                Ok(Reply::Bulk(Some(text))) => String::from_utf8_lossy(&text).into_owned(),
                other => return Err(format!("{}: CLUSTER INFO: {other:?}", node.port)),
            };
            for expected in ["cluster_state:ok", "cluster_slots_assigned:16384"] {
                if !info.contains(expected) {
                    return Err(format!("{}: no {expected}", node.port));
                }
            }
            // Every primary that serves slots must be a running node.
            for (_, port) in self.slot_owners_seen_by(node)? {
                if !self.nodes.iter().any(|n| n.port == port && n.is_running()) {
                    return Err(format!("{}: slots still on dead node {port}", node.port));
                }
            }
        }
        Ok(())
    }

    /// `(first slot, last slot)` → primary port, as `node` sees it (`CLUSTER SLOTS`).
    fn slot_owners_seen_by(&self, node: &Node) -> Result<Vec<SlotOwner>, String> {
        let mut client = RespClient::connect(node.addr()).map_err(|e| e.to_string())?;
        let Ok(Reply::Array(Some(ranges))) = client.command(&["CLUSTER", "SLOTS"]) else {
            return Err(format!("{}: CLUSTER SLOTS failed", node.port));
        };
        let mut owners = Vec::new();
        for range in ranges {
            let Reply::Array(Some(parts)) = range else {
                return Err("bad CLUSTER SLOTS".into());
            };
            match parts.as_slice() {
                [Reply::Integer(first), Reply::Integer(last), Reply::Array(Some(primary)), ..] => {
                    let Some(Reply::Integer(port)) = primary.get(1) else {
                        return Err("bad CLUSTER SLOTS primary".into());
                    };
                    owners.push(((*first as u16, *last as u16), *port as u16));
                }
                _ => return Err("bad CLUSTER SLOTS range".into()),
            }
        }
        Ok(owners)
    }

    /// The nodes (killed ones included: check [`Node::is_running`]).
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// A running node's view of who owns `slot`: the owner's port (announced port included).
    pub fn primary_port_of(&self, slot: u16) -> u16 {
        let node = self.nodes.iter().find(|n| n.is_running()).expect("a node");
        self.slot_owners_seen_by(node)
            .expect("CLUSTER SLOTS")
            .into_iter()
            .find(|((first, last), _)| (*first..=*last).contains(&slot))
            .map(|(_, port)| port)
            .expect("every slot has an owner")
    }

    /// The running primaries.
    pub fn primaries(&self) -> Vec<&Node> {
        self.nodes
            .iter()
            .filter(|n| n.is_running())
            .filter(|n| {
                n.client()
                    .info("replication")
                    .get("role")
                    .map(String::as_str)
                    == Some("master")
            })
            .collect()
    }

    /// `redis-cluster://127.0.0.1:<p1>?node=127.0.0.1:<p2>&…` over the running nodes.
    pub fn url(&self) -> String {
        let mut running = self.nodes.iter().filter(|n| n.is_running());
        let first = running.next().expect("a running node");
        let mut url = format!("redis-cluster://{}", first.addr());
        for (i, node) in running.enumerate() {
            url.push(if i == 0 { '?' } else { '&' });
            url.push_str(&format!("node={}", node.addr()));
        }
        url
    }

    /// `kill -9` of the primary that owns `slot`, at a moment when its replica has every write
    /// it acknowledged (writes are paused for a moment and the replication offsets compared):
    /// Redis replicates asynchronously, and an acknowledged write lost with a primary is a
    /// loss no client can repair. Returns once the replica is promoted and the cluster is ok.
    pub fn kill_primary_of(&mut self, slot: u16) {
        let port = self.primary_port_of(slot);
        let index = self
            .nodes
            .iter()
            .position(|n| n.port == port)
            .expect("the owner is one of ours");
        let mut primary = self.nodes[index].client();
        let paused = primary.command(&["CLIENT", "PAUSE", "10000", "WRITE"]);
        assert_eq!(paused.unwrap(), Reply::Status("OK".into()));
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            let info = primary.info("replication");
            let offset = &info["master_repl_offset"];
            let synced = info
                .get("slave0")
                .is_some_and(|replica| replica.contains(&format!("offset={offset},")));
            if synced {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the replica never caught up: {info:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        self.nodes[index].kill();
        self.wait_healthy()
            .unwrap_or_else(|why| panic!("no failover after killing {port}: {why}"));
    }

    /// Moves `slots` slots from the primary owning `from_slot` to another primary with
    /// `redis-cli --cluster reshard` (MIGRATE key by key: clients see `MOVED` and `ASK`), then
    /// waits until every node agrees again.
    pub fn reshard(&self, from_slot: u16, slots: u32) {
        let source_port = self.primary_port_of(from_slot);
        let id_of = |port: u16| -> String {
            let node = self.nodes.iter().find(|n| n.port == port).expect("ours");
            match node.client().command(&["CLUSTER", "MYID"]) {
                Ok(Reply::Bulk(Some(id))) => String::from_utf8_lossy(&id).into_owned(),
                other => panic!("CLUSTER MYID: {other:?}"),
            }
        };
        let target_port = self
            .primaries()
            .into_iter()
            .map(|n| n.port)
            .find(|&p| p != source_port)
            .expect("another primary");
        let output = Command::new(redis_cli())
            .args(["--cluster", "reshard", &format!("127.0.0.1:{source_port}")])
            .args(["--cluster-from", &id_of(source_port)])
            .args(["--cluster-to", &id_of(target_port)])
            .args(["--cluster-slots", &slots.to_string()])
            .args(["--cluster-pipeline", "10", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster reshard");
        assert!(
            output.status.success(),
            "reshard failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        self.wait_healthy()
            .unwrap_or_else(|why| panic!("not healthy after the reshard: {why}"));
    }

    /// Makes the node on `port` announce `announced` as its client port (as behind a proxy or
    /// NAT): the cluster, its replicas and clients then reach it there. Waits until every
    /// running node's `CLUSTER SLOTS` shows it.
    pub fn announce_port(&self, port: u16, announced: u16) {
        let node = self.nodes.iter().find(|n| n.port == port).expect("ours");
        let set = node.client().command(&[
            "CONFIG",
            "SET",
            "cluster-announce-port",
            &announced.to_string(),
        ]);
        assert_eq!(set.unwrap(), Reply::Status("OK".into()));
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        while !self.nodes.iter().filter(|n| n.is_running()).all(|n| {
            self.slot_owners_seen_by(n)
                .map(|owners| owners.iter().any(|(_, p)| *p == announced))
                .unwrap_or(false)
        }) {
            assert!(
                Instant::now() < deadline,
                "the announced port did not spread"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The values of `keys`, each asked of the primary that owns its slot.
    pub fn get_all(&self, keys: &[String]) -> Vec<Option<String>> {
        let mut clients = self.owner_clients();
        keys.iter()
            .map(|key| clients.client_for(key).get(key))
            .collect()
    }

    /// A client per primary, picked by a key's slot.
    fn owner_clients(&self) -> OwnerClients {
        let node = self.nodes.iter().find(|n| n.is_running()).expect("a node");
        OwnerClients {
            owners: self.slot_owners_seen_by(node).expect("CLUSTER SLOTS"),
            clients: Default::default(),
        }
    }

    /// The sum of `calls` over the primaries' `INFO commandstats` (the test's own `INFO`,
    /// `CLUSTER`, `PING`, `SCAN` and `CONFIG` left out). Replicas are not counted: they run
    /// what their primary replicates, not what clients ask.
    pub fn server_calls(&self) -> u64 {
        self.primaries()
            .into_iter()
            .map(|n| {
                n.client()
                    .commandstats()
                    .0
                    .iter()
                    .filter(|(name, _)| {
                        !(name.starts_with("cluster")
                            || name.starts_with("config")
                            || matches!(name.as_str(), "info" | "ping" | "scan" | "command"))
                    })
                    .map(|(_, stat)| stat.calls)
                    .sum::<u64>()
            })
            .sum()
    }

    /// `CONFIG RESETSTAT` on every running node.
    pub fn reset_stats(&self) {
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            assert_eq!(
                node.client().command(&["CONFIG", "RESETSTAT"]).unwrap(),
                Reply::Status("OK".into())
            );
        }
    }

    /// Every key matching `pattern` on the running primaries.
    pub fn scan(&self, pattern: &str) -> Vec<String> {
        self.primaries()
            .into_iter()
            .flat_map(|n| n.client().scan(pattern))
            .collect()
    }

    /// `used_memory` summed over the running primaries.
    pub fn used_memory(&self) -> u64 {
        self.primaries()
            .into_iter()
            .map(|n| {
                n.client().info("memory")["used_memory"]
                    .parse::<u64>()
                    .unwrap()
            })
            .sum()
    }

    /// The sum of `MEMORY USAGE` over `keys` (each asked of the primary that owns it).
    pub fn memory_usage(&self, keys: &[String]) -> u64 {
        let mut clients = self.owner_clients();
        keys.iter()
            .map(
                |key| match clients.client_for(key).command(&["MEMORY", "USAGE", key]) {
                    Ok(Reply::Integer(bytes)) => bytes as u64,
                    other => panic!("MEMORY USAGE {key}: {other:?}"),
                },
            )
            .sum()
    }

    /// Deletes `keys` (each on the primary that owns it); returns how many existed.
    pub fn delete(&self, keys: &[String]) -> u64 {
        let mut clients = self.owner_clients();
        let mut deleted = 0;
        for key in keys {
            match clients.client_for(key).command(&["DEL", key]) {
                Ok(Reply::Integer(n)) => deleted += n as u64,
                other => panic!("DEL {key}: {other:?}"),
            }
        }
        deleted
    }
}

/// Clients to the primaries, by slot ranges read once.
struct OwnerClients {
    owners: Vec<SlotOwner>,
    clients: std::collections::HashMap<u16, RespClient>,
}

impl OwnerClients {
    fn client_for(&mut self, key: &str) -> &mut RespClient {
        let slot = slot_of(key);
        let (_, port) = self
            .owners
            .iter()
            .find(|((first, last), _)| (*first..=*last).contains(&slot))
            .expect("every slot has an owner");
        self.clients.entry(*port).or_insert_with(|| {
            RespClient::connect(SocketAddr::from(([127, 0, 0, 1], *port))).expect("connect")
        })
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
        if std::env::var_os("SHARDMETER_KEEP_REDIS_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A key's hash slot (CRC16 of its hash tag or of the whole key, modulo 16,384), computed
/// here independently of fred.
pub fn slot_of(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let hashed = match bytes.iter().position(|&b| b == b'{') {
        Some(open) => match bytes[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &bytes[open + 1..open + 1 + len],
            _ => bytes,
        },
        None => bytes,
    };
    let mut crc: u16 = 0;
    for &byte in hashed {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16_384
}

fn redis_server() -> String {
    std::env::var("REDIS_SERVER_BIN").unwrap_or_else(|_| "redis-server".to_owned())
}

/// `redis-cli`, next to `REDIS_SERVER_BIN` if that is set, else from `PATH`.
fn redis_cli() -> PathBuf {
    std::env::var_os("REDIS_SERVER_BIN")
        .map(PathBuf::from)
        .and_then(|server| server.parent().map(|dir| dir.join("redis-cli")))
        .filter(|cli| cli.exists())
        .unwrap_or_else(|| PathBuf::from("redis-cli"))
}
