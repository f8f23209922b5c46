//! The driver that `scripts/hot-path-guard.sh` measures: `Session::add` on a registered worker
//! thread, in the release build, behind one non-inlined function with a fixed symbol name.
//!
//! `hot-path-driver N` calls [`shardmeter_hot_path_add`] `N` times on one session, then checks
//! through a sweep that every add arrived, so the function measured is the one that counts. The
//! script runs it under callgrind for two values of `N` and divides the difference of the counts
//! by the difference of the calls: what is left is the cost of one `add` (plus this function's
//! own return), whatever the set-up costs.

use shardmeter::ledger::{Ledger, Session, Usage};
use std::hint::black_box;
use std::process::ExitCode;

/// One registered-worker `add`. `#[no_mangle]` gives callgrind's `--toggle-collect` and
/// objdump a name that does not depend on the compiler's mangling.
#[no_mangle]
#[inline(never)]
pub fn shardmeter_hot_path_add(session: &Session, amount: u64) {
    session.add(amount);
}

fn main() -> ExitCode {
    let calls: u64 = match std::env::args().nth(1).map(|arg| arg.parse()) {
        Some(Ok(calls)) => calls,
        _ => {
            eprintln!("usage: hot-path-driver CALLS");
            return ExitCode::from(2);
        }
    };
    let index = match shardmeter::register_worker_thread() {
        Ok(index) => index,
        Err(error) => {
            eprintln!("cannot register the driver thread: {error}");
            return ExitCode::FAILURE;
        }
    };
    let worker_shards = 4;
    if index >= worker_shards {
        eprintln!("worker index {index} has no worker shard: this would measure the striped path");
        return ExitCode::FAILURE;
    }
    let (ledger, mut sweeper) = match Ledger::builder()
        .capacity(64)
        .worker_shards(worker_shards)
        .striped_shards(1)
        .build()
    {
        Ok(built) => built,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::FAILURE;
        }
    };
    let session = match ledger.open_session("guard") {
        Ok(session) => session,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::FAILURE;
        }
    };
    for _ in 0..calls {
        shardmeter_hot_path_add(black_box(&session), black_box(1));
    }
    let mut usage: Vec<Usage> = Vec::new();
    sweeper.sweep(&mut usage);
    let total: u64 = usage.iter().map(|record| record.amount).sum();
    if total != calls {
        eprintln!("swept {total} after {calls} adds");
        return ExitCode::FAILURE;
    }
    println!("{calls} adds on worker index {index}");
    ExitCode::SUCCESS
}
