//! Servers that an ended process left behind, found and killed by the next one.
//!
//! One file for both users, as `redis_process.rs` is: `shardmeter-sim`'s private server, and the
//! integration tests' fixture (`tests/support`, which includes this file with `#[path]`):
//! `RedisServer` and `RedisCluster`. Each kills its servers when dropped, but a process that
//! ends without unwinding (`process::exit`, an abort, a kill, a harness's timeout) drops
//! nothing: its servers run on, reparented, until someone kills them. One session's scratch
//! benchmark left 141 behind, and they skewed every figure taken beside them
//! (`docs/benchmarks.md`, session 10).
//!
//! Such a server works in a directory named after the process that started it:
//! `<temp>/shardmeter-redis-<pid>-…` (the sim's: `…-<pid>-sim-<port>`), or
//! `<temp>/shardmeter-cluster-<pid>-…/<port>` for a cluster's node. Redis makes its `--dir` its
//! working directory, so a `redis-server` whose working directory is one of those, while process
//! `<pid>` has ended, is an orphan. (Redis writes its title over its command line, so the
//! directory is read from `/proc/<pid>/cwd`.) A pid that another process took since hides that
//! owner's orphans until that process ends too.

use std::path::Path;
use std::process::Command;
use std::sync::Once;

/// The names of the servers' directories begin with one of these, then the owner's pid.
const DIR_PREFIXES: [&str; 2] = ["shardmeter-redis-", "shardmeter-cluster-"];

/// [`reap`], once per process: called before the process starts its first server.
pub(crate) fn reap_once() {
    static REAPED: Once = Once::new();
    REAPED.call_once(|| {
        let killed = reap();
        if !killed.is_empty() {
            eprintln!("killed redis-servers left behind by ended processes: {killed:?}");
        }
    });
}

/// Kills (SIGKILL) every orphaned server, and removes the directories of ended owners unless
/// `SHARDMETER_KEEP_REDIS_DIRS` is set; returns the pids killed.
pub(crate) fn reap() -> Vec<u32> {
    let temp = std::env::temp_dir();
    let mut killed = Vec::new();
    for server in servers().filter(|server| !is_running(server.owner)) {
        let status = Command::new("kill")
            .args(["-KILL", &server.pid.to_string()])
            .status();
        if status.is_ok_and(|status| status.success()) {
            killed.push(server.pid);
        }
    }
    if std::env::var_os("SHARDMETER_KEEP_REDIS_DIRS").is_none() {
        for dir in std::fs::read_dir(&temp).into_iter().flatten().flatten() {
            let dir = dir.path();
            if owner_of(&dir, &temp).is_some_and(|owner| !is_running(owner)) {
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
    }
    killed
}

/// A running `redis-server` in one of the directories above.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Server {
    pub(crate) pid: u32,
    /// The process that started it (its directory's name says).
    pub(crate) owner: u32,
}

/// The running servers whose working directory names an owner, ended or not.
pub(crate) fn servers() -> impl Iterator<Item = Server> {
    let temp = std::env::temp_dir();
    processes().filter_map(move |pid| {
        let proc_dir = Path::new("/proc").join(pid.to_string());
        let comm = std::fs::read_to_string(proc_dir.join("comm")).ok()?;
        // A zombie or another user's process has no readable working directory.
        let cwd = std::fs::read_link(proc_dir.join("cwd")).ok()?;
        let owner = owner_of(&cwd, &temp)?;
        (comm.trim_end() == "redis-server").then_some(Server { pid, owner })
    })
}

/// The pid in the name of the fixture's directory that `dir` is (or, for a cluster's node, is
/// in) under `temp`. A deleted directory reads as `<path> (deleted)`: the name still begins so.
pub(crate) fn owner_of(dir: &Path, temp: &Path) -> Option<u32> {
    let fixture_dir = [Some(dir), dir.parent()]
        .into_iter()
        .flatten()
        .find(|candidate| candidate.parent() == Some(temp))?;
    let name = fixture_dir.file_name()?.to_str()?;
    let rest = DIR_PREFIXES
        .iter()
        .find_map(|prefix| name.strip_prefix(prefix))?;
    rest.split('-').next()?.parse().ok()
}

/// Whether process `pid` runs: it exists and is not a zombie (an ended process whose parent has
/// not collected its status yet; this sandbox's pid 1 never does).
pub(crate) fn is_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

/// The pids of the running processes.
fn processes() -> impl Iterator<Item = u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
}
