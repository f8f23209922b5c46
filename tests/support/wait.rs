//! Waiting for a condition that becomes true in the background.

use std::time::Duration;

/// Polls `done` (through [`until_ok`](super::until_ok), on tokio's clock) until it holds, for
/// up to 10 s; panics naming `what` if it never does.
pub async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    super::until_ok(what, Duration::from_secs(10), || {
        let ready = done();
        async move { ready.then_some(()).ok_or("not yet") }
    })
    .await;
}
