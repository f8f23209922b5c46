//! A session as the engine hands it out: the ledger's session (the hot path) plus its account's
//! published usage and budget (the read side).

use super::accounts::{AccountState, AccountUsage, BudgetStatus};
use crate::ledger;
use std::sync::Arc;
use std::time::Duration;

/// One metered session of an [`Engine`](super::Engine). Clones are channels of the same session;
/// when the last clone drops, the session ends and its remainder is flushed.
///
/// [`Session::add`] is the ledger's hot path, unchanged. The budget checks read what the flusher
/// publishes for the session's account, shared by all of its sessions: no lock, no allocation,
/// no Redis read.
#[derive(Clone)]
pub struct Session {
    session: ledger::Session,
    account: Arc<AccountState>,
}

impl Session {
    pub(crate) fn new(session: ledger::Session, account: Arc<AccountState>) -> Self {
        Self { session, account }
    }

    /// Adds `amount` to this session: see [`ledger::Session::add`]. No lock, no allocation, no
    /// syscall.
    #[inline]
    pub fn add(&self, amount: u64) {
        self.session.add(amount);
    }

    /// The account this session charges.
    pub fn account(&self) -> &str {
        self.account.account()
    }

    /// Whether the account has used its budget for the current bucket (`used >= limit`), as of
    /// the flusher's last update: one atomic load, cheap enough to ask per chunk. `false`
    /// without a limit, and while the account's global total is unknown (fail open).
    #[inline]
    pub fn is_exhausted(&self) -> bool {
        self.account.is_exhausted()
    }

    /// The account's usage in the current bucket, all processes included, as this engine knows
    /// it (see [`AccountUsage`] for how fresh each part is).
    pub fn usage(&self) -> AccountUsage {
        self.account.usage()
    }

    /// The account against its limit; `None` when it has no limit.
    pub fn status(&self) -> Option<BudgetStatus> {
        self.account.status()
    }

    /// Resolves when the account becomes exhausted (at once if it is): `select!` on it beside
    /// the connection's reads to end the session when its user runs out of budget.
    pub async fn exhausted(&self) {
        self.account.wait_exhausted().await;
    }

    /// Waits, at most `timeout`, until the account's global total has been read (or its read
    /// has failed), so that [`Session::is_exhausted`] also counts other processes' usage.
    /// Returns whether that happened in time. A gateway awaits it once, when a session opens,
    /// before it admits the user; the first session of an account costs one `GET`, pipelined
    /// with those of other sessions opening at the same time.
    pub async fn synced(&self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.account.wait_synced())
            .await
            .is_ok()
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("session", &self.session)
            .field("exhausted", &self.is_exhausted())
            .finish()
    }
}
