//! Servers that a test process left behind, found and killed by the next one.
//!
//! [`RedisServer`](super::RedisServer) and [`RedisCluster`](super::cluster::RedisCluster) kill
//! their servers on drop, but a process that ends without unwinding (`process::exit`, an abort, a
//! kill, a harness's timeout) drops nothing: its servers run on, reparented, until someone kills
//! them. One session's scratch benchmark left 141 behind, and they skewed every figure taken
//! beside them (`docs/benchmarks.md`, session 10).
//!
//! A fixture's server works in a directory named after the process that started it:
//! `<temp>/shardmeter-redis-<pid>-…`, or `<temp>/shardmeter-cluster-<pid>-…/<port>` for a
//! cluster's node. Redis makes its `--dir` its working directory, so a `redis-server` whose
//! working directory is one of those, while process `<pid>` is gone, is an orphan. (Redis writes
//! its title over its command line, so the directory is read from `/proc/<pid>/cwd`.) A pid that
//! another process took since hides that owner's orphans until that process ends too.

use std::path::Path;
use std::process::Command;
use std::sync::Once;

/// The names of the fixture's server directories begin with one of these, then the owner's pid.
pub const DIR_PREFIXES: [&str; 2] = ["shardmeter-redis-", "shardmeter-cluster-"];

/// [`reap`], once per process: called before a fixture starts its first server.
pub fn reap_once() {
    static REAPED: Once = Once::new();
    REAPED.call_once(|| {
        let killed = reap();
        if !killed.is_empty() {
            eprintln!("killed redis-servers left behind by ended test processes: {killed:?}");
        }
    });
}

/// Kills (SIGKILL) every orphaned server, and removes the directories of ended owners unless
/// `SHARDMETER_KEEP_REDIS_DIRS` is set; returns the pids killed.
pub fn reap() -> Vec<u32> {
    let temp = std::env::temp_dir();
    let mut killed = Vec::new();
    for pid in processes() {
        let proc_dir = Path::new("/proc").join(pid.to_string());
        let is_server = std::fs::read_to_string(proc_dir.join("comm"))
            .is_ok_and(|comm| comm.trim_end() == "redis-server");
        // A zombie or another user's process has no readable working directory.
        let Ok(cwd) = std::fs::read_link(proc_dir.join("cwd")) else {
            continue;
        };
        if is_server && owner_of(&cwd, &temp).is_some_and(|owner| !is_alive(owner)) {
            let status = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            if status.is_ok_and(|status| status.success()) {
                killed.push(pid);
            }
        }
    }
    if std::env::var_os("SHARDMETER_KEEP_REDIS_DIRS").is_none() {
        for dir in std::fs::read_dir(&temp).into_iter().flatten().flatten() {
            let dir = dir.path();
            if owner_of(&dir, &temp).is_some_and(|owner| !is_alive(owner)) {
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
    }
    killed
}

/// The pid in the name of the fixture's directory that `dir` is (or, for a cluster's node, is
/// in) under `temp`. A deleted directory reads as `<path> (deleted)`: the name still begins so.
pub fn owner_of(dir: &Path, temp: &Path) -> Option<u32> {
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

fn is_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// The pids of the running processes.
fn processes() -> impl Iterator<Item = u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
}
