//! The tests' own fixture: servers that a test process leaves behind are killed by the next.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use support::orphans::{self, is_running};

/// Run by `a_server_left_behind_is_killed_by_the_next_test_process` in a process of its own:
/// starts a server and ends the process without dropping it, as `process::exit` or an abort
/// does.
#[test]
#[ignore = "a helper: run in a child process by a_server_left_behind_is_killed_by_the_next_test_process"]
fn leave_a_server_behind() {
    let server = support::RedisServer::start();
    let pid = server.pid().expect("running");
    println!("left behind: {pid} {}", server.dir().display());
    std::process::exit(0);
}

#[test]
fn a_server_left_behind_is_killed_by_the_next_test_process() {
    let helper = Command::new(std::env::current_exe().expect("this test binary"))
        .args([
            "--ignored",
            "--exact",
            "leave_a_server_behind",
            "--nocapture",
        ])
        .output()
        .expect("run the helper");
    let stdout = String::from_utf8_lossy(&helper.stdout);
    let (pid, dir) = stdout
        .lines()
        .find_map(|line| line.strip_prefix("left behind: ")?.split_once(' '))
        .unwrap_or_else(|| panic!("the helper said: {stdout}"));
    let (pid, dir): (u32, PathBuf) = (pid.parse().expect("a pid"), dir.into());
    // Another test of this process may start a server, and so reap, first: whoever kills it.
    orphans::reap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while is_running(pid) {
        assert!(Instant::now() < deadline, "{pid} still runs");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!dir.exists(), "{} not removed", dir.display());
}

#[test]
fn a_live_process_s_server_is_left_alone() {
    let server = support::RedisServer::start();
    let pid = server.pid().expect("running");
    assert!(!orphans::reap().contains(&pid));
    assert!(is_running(pid) && server.dir().exists());
}

#[test]
fn a_directory_names_its_owner() {
    let temp = Path::new("/tmp");
    let owner = |dir: &str| orphans::owner_of(Path::new(dir), temp);
    assert_eq!(owner("/tmp/shardmeter-redis-4242-3-123456"), Some(4242));
    assert_eq!(
        owner("/tmp/shardmeter-redis-4242-3-123456 (deleted)"),
        Some(4242)
    );
    assert_eq!(owner("/tmp/shardmeter-cluster-77-0-5/7001"), Some(77));
    assert_eq!(owner("/tmp/shardmeter-cluster-77-0-5"), Some(77));
    assert_eq!(owner("/var/lib/redis"), None);
    assert_eq!(owner("/tmp/elsewhere/shardmeter-redis-1-2-3"), None);
    assert_eq!(owner("/tmp/shardmeter-redis-x-2-3"), None);
}
