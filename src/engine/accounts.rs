//! The read side: what each account has used in the current time bucket and whether it is over
//! its budget, answered in process, so that a per-chunk budget check never reads Redis.
//!
//! # Where the numbers come from
//!
//! An account's usage in the current bucket is `global + local pending`:
//!
//! - **global** is the key's total in the sink, all gateway processes included, as last seen by
//!   this engine. Every acknowledged write carries the key's new total (`INCRBY`'s reply). An
//!   account the engine has not seen in this bucket is read once when its first session opens
//!   (the reads of sessions that open together share one pipelined round), and an account with
//!   nothing to write at a full sweep is read again then, so that other processes' usage shows
//!   up. If a read fails the global part stays unknown and the account is not held back (fail
//!   open, as the deployment's readers do).
//! - **local pending** is what this process swept and the sink has not acknowledged yet.
//!
//! So this process's own usage is seen within one sweep (adds not yet swept are not counted),
//! and other processes' within their flush interval plus this engine's.
//!
//! # Synchronization
//!
//! The flusher is the only writer of every [`AccountState`]: it keeps the numbers in its private
//! [`AccountBook`] and publishes them through a sequence lock (`seqlock.rs`: a consistent
//! snapshot of a few words, no allocation), then the `exhausted` and `synced` flags, then wakes
//! waiters when a flag became true. Readers (sessions, the engine, any thread) load the view
//! without a lock; the per-chunk check [`AccountState::is_exhausted`] is one atomic load.
//! Accounts are found by name in a [`Registry`] of a few mutex-guarded maps, touched when a
//! session opens and by the flusher, never per chunk.

use super::blocks::{BlockQueue, BlockVec};
use super::keys::{BucketSpan, KeyScheme};
use super::names::NameIndex;
use super::pending::{Counted, Owner};
use super::prefetch::prefetch;
use crate::ledger::Account;
use crate::seqlock::SeqLock;
use crate::sink::Key;
use std::collections::hash_map::{Entry, RandomState};
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, Notify};

/// Budget limits, in the unit of `add`, per account per time bucket (per UTC day for
/// [`KeyScheme::daily_utc`]). An account's limit is its override, else what the lookup says,
/// else the default; without any, it has no limit and is never exhausted.
///
/// ```
/// use shardmeter::Budgets;
///
/// let budgets = Budgets::per_bucket(1_800_000) // 30 min of audio a day
///     .limit_for("uid-vip", 7_200_000)
///     .lookup(|account| account.starts_with("trial-").then_some(300_000));
/// assert_eq!(budgets.limit_of("uid-42"), Some(1_800_000));
/// assert_eq!(budgets.limit_of("uid-vip"), Some(7_200_000));
/// assert_eq!(budgets.limit_of("trial-7"), Some(300_000));
/// ```
#[derive(Clone, Default)]
pub struct Budgets {
    default_limit: Option<u64>,
    overrides: HashMap<String, u64>,
    lookup: Option<BudgetLookup>,
}

/// A gateway's own source of limits; see [`Budgets::lookup`].
type BudgetLookup = Arc<dyn Fn(&str) -> Option<u64> + Send + Sync>;

impl Budgets {
    /// No limits: usage is tracked, nothing is ever exhausted.
    pub fn unlimited() -> Self {
        Self::default()
    }

    /// The same limit for every account.
    pub fn per_bucket(limit: u64) -> Self {
        Self {
            default_limit: Some(limit),
            ..Self::default()
        }
    }

    /// A limit for one account, over the lookup and the default.
    pub fn limit_for(mut self, account: impl Into<String>, limit: u64) -> Self {
        self.overrides.insert(account.into(), limit);
        self
    }

    /// A lookup the gateway provides (say, from the user's plan), asked for accounts without an
    /// override; `None` falls back to the default. The flusher calls it when it starts tracking
    /// an account and again for every tracked account at each full sweep, so a changed answer
    /// takes effect within one flush interval. It runs on the flusher task: it must be quick and
    /// must not block (read a map the gateway keeps up to date, not a database).
    pub fn lookup(mut self, lookup: impl Fn(&str) -> Option<u64> + Send + Sync + 'static) -> Self {
        self.lookup = Some(Arc::new(lookup));
        self
    }

    /// The limit of `account`.
    pub fn limit_of(&self, account: &str) -> Option<u64> {
        if let Some(&limit) = self.overrides.get(account) {
            return Some(limit);
        }
        self.lookup
            .as_ref()
            .and_then(|lookup| lookup(account))
            .or(self.default_limit)
    }

    /// The limit of every account, when it does not depend on the account (no override, no
    /// lookup): then a review need not read the account's name, which lives in its state, a
    /// cache miss per account.
    fn limit_of_all(&self) -> Option<Option<u64>> {
        (self.overrides.is_empty() && self.lookup.is_none()).then_some(self.default_limit)
    }
}

impl std::fmt::Debug for Budgets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budgets")
            .field("default_limit", &self.default_limit)
            .field("overrides", &self.overrides.len())
            .field("lookup", &self.lookup.is_some())
            .finish()
    }
}

/// An account's usage in the current time bucket, as this engine knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AccountUsage {
    /// `global` (0 while unknown) plus `local_pending`.
    pub used: u64,
    /// The account's total in the sink, all processes included, as last seen; `None` until a
    /// write or a read has told it (or when that read failed).
    pub global: Option<u64>,
    /// When `global` was seen (the engine's clock): its age bounds how stale it is. Published
    /// with nanosecond precision between 1970 and 2554 (earlier reads as 1970).
    pub global_as_of: Option<SystemTime>,
    /// Swept by this process, not yet acknowledged by the sink.
    pub local_pending: u64,
    /// When the current bucket ends (the budget resets); `None` for a scheme without buckets.
    /// Published as `global_as_of` is.
    pub bucket_end: Option<SystemTime>,
}

/// An account against its budget: the deployment's `get_dg_budget_status`, answered locally.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BudgetStatus {
    /// The limit for the current bucket.
    pub limit: u64,
    /// [`AccountUsage::used`].
    pub used: u64,
    /// `limit - used`, never negative.
    pub remaining: u64,
    /// `used >= limit`.
    pub exhausted: bool,
    /// When the bucket ends and the budget resets; `None` for a scheme without buckets.
    pub resets_at: Option<SystemTime>,
}

/// What the flusher publishes for one account.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct AccountView {
    usage: AccountUsage,
    limit: Option<u64>,
}

impl AccountView {
    /// The view from the words of its sequence lock (see [`view_words`]).
    fn from_words(words: [u64; VIEW_WORDS]) -> Self {
        let [flags, global, global_as_of, local_pending, bucket_end, limit] = words;
        let present = |flag: u64, value: u64| (flags & flag != 0).then_some(value);
        let time = |nanos: u64| UNIX_EPOCH + Duration::from_nanos(nanos);
        let global = present(HAS_GLOBAL, global);
        Self {
            usage: AccountUsage {
                used: global.unwrap_or(0).saturating_add(local_pending),
                global,
                global_as_of: present(HAS_GLOBAL_AS_OF, global_as_of).map(time),
                local_pending,
                bucket_end: present(HAS_BUCKET_END, bucket_end).map(time),
            },
            limit: present(HAS_LIMIT, limit),
        }
    }
}

/// Whether the view in `words` is at or over its limit: `used >= limit`, as in
/// [`AccountView::from_words`].
fn exhausted_in(words: &[u64; VIEW_WORDS]) -> bool {
    let [flags, global, _, local_pending, _, limit] = *words;
    let global = if flags & HAS_GLOBAL != 0 { global } else { 0 };
    flags & HAS_LIMIT != 0 && global.saturating_add(local_pending) >= limit
}

const VIEW_WORDS: usize = 6;
const HAS_GLOBAL: u64 = 1;
const HAS_GLOBAL_AS_OF: u64 = 2;
const HAS_BUCKET_END: u64 = 4;
const HAS_LIMIT: u64 = 8;

fn nanos_since_1970(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |since| {
        u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
    })
}

/// One account's published state, shared by its sessions, the registry and the flusher.
pub(crate) struct AccountState {
    account: Account,
    /// The flusher's numbers for the account (an [`AccountView`]), written by the flusher only.
    view: SeqLock<VIEW_WORDS>,
    /// A copy of the view's exhaustion, so the per-chunk check is one load.
    exhausted: AtomicBool,
    /// The global part has been read, or its read has failed: nothing more will come soon.
    synced: AtomicBool,
    /// Notified when `exhausted` or `synced` becomes true, what [`AccountState::wait_until`]
    /// waits for.
    changed: Notify,
}

impl AccountState {
    fn new(account: Account) -> Self {
        Self {
            account,
            // Flags 0: every optional number absent, the default view.
            view: SeqLock::new([0; VIEW_WORDS]),
            exhausted: AtomicBool::new(false),
            synced: AtomicBool::new(false),
            changed: Notify::new(),
        }
    }

    pub(crate) fn account(&self) -> &str {
        &self.account
    }

    pub(crate) fn is_exhausted(&self) -> bool {
        // Acquire pairs with `publish`'s Release store: a caller that sees `true` and then reads
        // `status()` sees the view that made it true. On x86 and ARMv8 it costs a plain load.
        // (No wake-up depends on it: `wait_until` relies on `Notify`, see there.)
        self.exhausted.load(Ordering::Acquire)
    }

    fn is_synced(&self) -> bool {
        // Acquire: as for `exhausted`.
        self.synced.load(Ordering::Acquire)
    }

    fn view(&self) -> AccountView {
        AccountView::from_words(self.view.read())
    }

    pub(crate) fn usage(&self) -> AccountUsage {
        self.view().usage
    }

    pub(crate) fn status(&self) -> Option<BudgetStatus> {
        let view = self.view();
        let limit = view.limit?;
        let used = view.usage.used;
        Some(BudgetStatus {
            limit,
            used,
            remaining: limit.saturating_sub(used),
            exhausted: used >= limit,
            resets_at: view.usage.bucket_end,
        })
    }

    /// Resolves once the account is exhausted (at once if it is).
    pub(crate) async fn wait_exhausted(&self) {
        self.wait_until(Self::is_exhausted).await;
    }

    /// Resolves once the global part is known or could not be read.
    pub(crate) async fn wait_synced(&self) {
        self.wait_until(Self::is_synced).await;
    }

    async fn wait_until(&self, done: impl Fn(&Self) -> bool) {
        loop {
            // A `Notified` receives every `notify_waiters` issued after its creation, even
            // before it is polled (tokio's documented guarantee): create it, then check, so a
            // publication between the check and the await is not missed.
            let notified = self.changed.notified();
            if done(self) {
                return;
            }
            notified.await;
        }
    }

    /// Replaces the view; only the flusher calls this (the sequence lock's single writer).
    fn publish(&self, words: [u64; VIEW_WORDS], synced: bool) {
        self.view.publish(words);
        let exhausted = exhausted_in(&words);
        // Relaxed loads: the flusher reads back its own last stores.
        let woken = (exhausted && !self.exhausted.load(Ordering::Relaxed))
            || (synced && !self.synced.load(Ordering::Relaxed));
        // Release: a reader that sees a flag sees the view published before it.
        self.exhausted.store(exhausted, Ordering::Release);
        self.synced.store(synced, Ordering::Release);
        // Waiters only wait for a flag to become true: no wake-up for anything else, which
        // spares a lock in `notify_waiters` for almost every publication.
        if woken {
            self.changed.notify_waiters();
        }
    }
}

impl std::fmt::Debug for AccountState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccountState")
            .field("account", &self.account)
            .field("view", &self.view())
            .field("synced", &self.is_synced())
            .finish()
    }
}

/// Most totals one read asks for: a pipeline of this many `GET`s, and as many answers applied in
/// one poll of the flusher. ~1 µs each taken and ~0.7 µs each applied at a million accounts on
/// one machine, but 4-8 µs on another (a fresh KVM guest: 256 were single steps of 1-2 ms), so
/// 64; one read is in flight at a time, and the reads after a burst of new accounts take ~4x the
/// round trips.
const MAX_READS_PER_REQUEST: usize = 64;

/// Bits of a hash that pick the shard of the read side's indices by account and by key: 1,024
/// shards, ~1,000 accounts each at a million. They grow as accounts are tracked, one shard at a
/// time: with 256 shards, when a growth still hashed every name again, it took up to ~1 ms at a
/// million, and opening a million sessions made 65 inserts over 0.5 ms (traced; 1 with 1,024 on
/// that machine, but 5–6 polls over 1 ms on an AMD EPYC guest, 0–2 once [`NameIndex`] kept the
/// hashes). 4,096 shards cost the engine ~15% more CPU per account at 100,000
/// accounts: a lookup first reads its shard's header, and 4,096 of them no longer stay in cache.
const BOOK_SHARD_BITS: u32 = 10;

/// Shards of the registry: enough that sessions opening on many threads rarely meet.
const REGISTRY_SHARDS: usize = 64;

type RegistryShard = HashMap<Account, Arc<AccountState>>;

/// Finds an account's state by name; creates it (and tells the flusher) for a first session.
pub(crate) struct Registry {
    shards: Box<[Mutex<RegistryShard>]>,
    hasher: RandomState,
    announce: mpsc::UnboundedSender<Arc<AccountState>>,
}

impl Registry {
    pub(crate) fn new() -> (Self, mpsc::UnboundedReceiver<Arc<AccountState>>) {
        let (announce, announced) = mpsc::unbounded_channel();
        let registry = Self {
            shards: (0..REGISTRY_SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            announce,
        };
        (registry, announced)
    }

    /// `open` run with `account`'s id as the registry holds it, then the account's state; a
    /// state is created (and announced to the flusher) for an account that has none, unless
    /// `open` fails. The engine opens the ledger's slot in `open`, under the shard's lock: the
    /// slot shares the state's allocation of the id, so a session allocates nothing of its own
    /// and the sweeper's records name the allocation the flusher's index compares first.
    pub(crate) fn open<T, E>(
        &self,
        account: &str,
        open: impl FnOnce(Account) -> Result<T, E>,
    ) -> Result<(T, Arc<AccountState>), E> {
        let mut shard = self.shard(account);
        if let Some(state) = shard.get(account) {
            return Ok((open(state.account.clone())?, state.clone()));
        }
        let account: Account = account.into();
        let opened = open(account.clone())?;
        let state = Arc::new(AccountState::new(account.clone()));
        shard.insert(account, state.clone());
        // Err: the flusher has stopped (shutdown); the state then simply stays at zero.
        let _ = self.announce.send(state.clone());
        Ok((opened, state))
    }

    pub(crate) fn get(&self, account: &str) -> Option<Arc<AccountState>> {
        self.shard(account).get(account).cloned()
    }

    /// Forgets `state` if nothing but the registry and the caller's reference hold it (no
    /// session). Under the shard's lock nobody can take a new reference from the registry, so
    /// the count cannot grow between the check and the removal.
    fn retire(&self, state: &Arc<AccountState>) -> bool {
        // A session holds a reference: no lock, no hash while one does (the usual case). The
        // count may fall right after this load; the next review retires the account then.
        if Arc::strong_count(state) > 2 {
            return false;
        }
        let mut shard = self.shard(&state.account);
        match shard.entry(state.account.clone()) {
            Entry::Occupied(entry)
                if Arc::ptr_eq(entry.get(), state) && Arc::strong_count(state) == 2 =>
            {
                entry.remove();
                true
            }
            _ => false,
        }
    }

    fn shard(&self, account: &str) -> MutexGuard<'_, RegistryShard> {
        let index = self.hasher.hash_one(account) as usize % REGISTRY_SHARDS;
        // A panic under this lock cannot leave a map half-updated in a way that matters.
        self.shards[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

/// How many increments ahead [`AccountBook::prefetch_acknowledged`] asks for an account's
/// entry, then for its view: far enough for a load from memory to be done when the increment
/// comes, near enough for the line to stay in cache until then (16 and 8 were no faster on an
/// AMD EPYC guest). The view's address is in the entry, which must be loaded first: hence half
/// the distance.
const ENTRY_AHEAD: usize = 32;
const VIEW_AHEAD: usize = 16;

/// How many swept records ahead of [`AccountBook::locate`] the flusher calls
/// [`AccountBook::prefetch_locate`]: `locate` itself runs one record ahead of the record counted,
/// and waits for what this asks for.
pub(crate) const LOCATE_AHEAD: usize = 8;

/// A tracked account's entry, as [`AccountBook::locate`] found it for a sweep's amount, in the
/// sweep's bucket. Valid until the book next tracks, forgets, rolls or rekeys accounts: the
/// flusher uses it at once, and [`AccountBook::swept`] takes it by value.
#[derive(Debug)]
pub(crate) struct Located(usize);

/// The flusher's private numbers for one tracked account, in the current bucket.
#[derive(Debug)]
struct Tracked {
    state: Arc<AccountState>,
    /// The account's key in the current bucket, built once per bucket and shared with every
    /// flush of it.
    key: Key,
    global: Option<u64>,
    /// When `global` was seen, in nanoseconds since 1970 (as published).
    global_as_of: Option<u64>,
    pending: u128,
    limit: Option<u64>,
    synced: bool,
    read_wanted: bool,
}

/// A read of global totals: which accounts, and their keys in the same order.
#[derive(Debug, Default)]
pub(crate) struct ReadRequest {
    accounts: Vec<Account>,
    pub(crate) keys: Vec<String>,
}

/// The flusher's side of the read side: synchronous, so it is tested without tokio.
///
/// Tracked accounts live in a slab (`entries`), found by name through `by_account` (a sweep
/// names the account: one lookup). An acknowledgement names the index the sweep gave
/// (`Counted`), so it needs no lookup; `by_key` finds the account of an amount swept before the
/// account was tracked. An index stays its account's until the account is forgotten, which it
/// is not while amounts counted for it are unacknowledged, unless a new bucket reset it: an
/// acknowledgement then sees that the entry's key is another.
pub(crate) struct AccountBook {
    keys: KeyScheme,
    budgets: Budgets,
    bucket: BucketSpan,
    /// `bucket`'s end as published: nanoseconds since 1970.
    bucket_end: Option<u64>,
    entries: BlockVec<Option<Tracked>>,
    /// Indices of `entries` that hold `None`.
    free: BlockQueue<usize>,
    by_account: NameIndex,
    by_key: NameIndex,
    /// Accounts whose global total should be read; each at most once (`read_wanted`).
    wanted: BlockQueue<Account>,
    /// Entries below this index have the limits of the last `set_budgets`.
    budgets_applied: usize,
}

impl AccountBook {
    pub(crate) fn new(keys: KeyScheme, budgets: Budgets, now: SystemTime) -> Self {
        let bucket = keys.span(now);
        Self {
            bucket_end: bucket.end().map(nanos_since_1970),
            bucket,
            keys,
            budgets,
            entries: BlockVec::new(),
            free: BlockQueue::new(),
            by_account: NameIndex::new(BOOK_SHARD_BITS),
            by_key: NameIndex::new(BOOK_SHARD_BITS),
            wanted: BlockQueue::new(),
            budgets_applied: 0,
        }
    }

    /// Accounts tracked now (each has an open session, or had one and awaits clean-up).
    pub(crate) fn len(&self) -> usize {
        self.entries.len() - self.free.len()
    }

    /// The index of `account`, if it is tracked.
    fn index_of_account(&self, account: &str) -> Option<usize> {
        let entries = &self.entries;
        self.by_account.find(account, |index| {
            entries
                .get(index)
                .as_ref()
                .map(|tracked| tracked.state.account())
        })
    }

    /// The index of the account whose key in the current bucket is `key`, if it is tracked.
    fn index_of_key(&self, key: &str) -> Option<usize> {
        let entries = &self.entries;
        self.by_key.find(key, |index| {
            entries.get(index).as_ref().map(|tracked| &*tracked.key)
        })
    }

    fn entry(&mut self, account: &str) -> Option<&mut Tracked> {
        let index = self.index_of_account(account)?;
        self.entries.get_mut(index).as_mut()
    }

    /// Starts tracking an account whose first session just opened; its global total is read.
    pub(crate) fn track(&mut self, state: Arc<AccountState>) {
        let account = state.account.clone();
        // The registry announces an account only when it has no state for it, and forgets one
        // only together with the book (`review`): an account is never announced twice.
        if self.index_of_account(&account).is_some() {
            debug_assert!(false, "account {account} announced while tracked");
            return;
        }
        let key: Key = self.keys.key(&account, &self.bucket).into();
        let limit = self.budgets.limit_of(&account);
        let mut tracked = Tracked {
            state,
            key: key.clone(),
            global: None,
            global_as_of: None,
            pending: 0,
            limit,
            synced: false,
            read_wanted: false,
        };
        want_read(&mut self.wanted, &mut tracked);
        publish(&tracked, self.bucket_end);
        let index = match self.free.pop_front() {
            Some(index) => {
                *self.entries.get_mut(index) = Some(tracked);
                index
            }
            None => self.entries.push(Some(tracked)),
        };
        self.by_key.insert(&key, index);
        self.by_account.insert(&account, index);
    }

    /// Starts loading, without waiting for it, what [`AccountBook::locate`] reads first to find
    /// `account`: its entry in the index by name. Called [`LOCATE_AHEAD`] records ahead of
    /// `locate`.
    pub(crate) fn prefetch_locate(&self, account: &str, span: &BucketSpan) {
        if *span == self.bucket {
            self.by_account.prefetch(account);
        }
    }

    /// Where a sweep's amount of `account`, charged to bucket `span`, is counted: the account's
    /// entry, if it is tracked in that bucket (give it to [`AccountBook::swept`]). Also starts
    /// loading, without waiting for them, what `swept` and the flusher then touch: the account's
    /// view and its key's text. Locating one record ahead of the one `swept` takes lets those
    /// loads overlap with that one's work.
    pub(crate) fn locate(&self, account: &str, span: &BucketSpan) -> Option<Located> {
        if *span != self.bucket {
            return None;
        }
        let index = self.index_of_account(account)?;
        if let Some(tracked) = self.entries.get(index) {
            prefetch(&tracked.state.view);
            prefetch(tracked.key.as_bytes());
        }
        Some(Located(index))
    }

    /// A sweep collected `amount` of the usage of the account `located` found; counts it as
    /// pending there. Then returns the key that amount goes to (built once per bucket, so the
    /// flusher builds none for it) and the account's number, to give back to
    /// [`AccountBook::acknowledged`] with the amount.
    pub(crate) fn swept(&mut self, located: Located, amount: u64) -> Option<(&Key, Owner)> {
        // Four billion tracked accounts would take terabytes: never `None` in practice, and
        // then merely uncounted.
        let owner = Owner::try_from(located.0).ok()?;
        let tracked = self.entries.get_mut(located.0).as_mut()?;
        tracked.pending += u128::from(amount);
        publish(tracked, self.bucket_end);
        Some((&tracked.key, owner))
    }

    /// Starts loading, without waiting for them, what [`AccountBook::acknowledged`] will touch
    /// for the increments to come (`upcoming`: their counts, in order): the entry of the one
    /// [`ENTRY_AHEAD`] on, and the view of the one [`VIEW_AHEAD`] on, whose entry an earlier call
    /// asked for. Called once per increment, so that the cache misses of many increments overlap
    /// where `acknowledged` alone waits for two at a time (`docs/benchmarks.md`).
    pub(crate) fn prefetch_acknowledged(&self, upcoming: &[Option<Counted>]) {
        let entry_ahead = |ahead: usize| {
            let owner = upcoming.get(ahead - 1).copied().flatten()?.owner as usize;
            (owner < self.entries.len()).then(|| self.entries.get(owner))
        };
        if let Some(entry) = entry_ahead(ENTRY_AHEAD) {
            prefetch(entry);
        }
        if let Some(Some(tracked)) = entry_ahead(VIEW_AHEAD) {
            prefetch(&tracked.state.view);
        }
    }

    /// The sink acknowledged an increment of `key`; `counted` is the part of it
    /// [`AccountBook::swept`] counted, and for which account, and `total` the key's new value
    /// when the sink said it (not for a batch it had already applied, nor for a refused
    /// increment).
    pub(crate) fn acknowledged(
        &mut self,
        counted: Option<Counted>,
        key: &Key,
        total: Option<i64>,
        now: SystemTime,
    ) {
        let (index, counted) = match counted {
            // The owner's entry is its account's while the amount is pending there, unless a
            // new bucket reset the account since (it may be forgotten and its entry reused
            // then); its key then is another, which the check below sees.
            Some(counted) => (counted.owner as usize, u128::from(counted.amount)),
            // Swept while the account was not tracked (or in another bucket): not in its
            // pending part, but the total is news if it is tracked now.
            None => match self.index_of_key(key) {
                Some(index) => (index, 0),
                None => return,
            },
        };
        // The key `swept` gave is shared: the same allocation, unless uncounted amounts of the
        // key, built apart, came first.
        let Some(tracked) = self
            .entries
            .get_mut(index)
            .as_mut()
            .filter(|tracked| Arc::ptr_eq(&tracked.key, key) || tracked.key == *key)
        else {
            return;
        };
        tracked.pending = tracked.pending.saturating_sub(counted);
        if let Some(total) = total {
            observe(tracked, total, now);
        }
        // Published now: the flusher settles a round in slices (`SETTLE_SLICE_KEYS`), so a round
        // of a million keys is not one long poll. (A pass of its own after settling, from a
        // queue of indices, cost the same CPU and more code.)
        publish(tracked, self.bucket_end);
    }

    /// The accounts whose global total should be read now, if any, at most
    /// [`MAX_READS_PER_REQUEST`] (taken: the next call returns the others, then accounts wanted
    /// since).
    pub(crate) fn take_reads(&mut self) -> Option<ReadRequest> {
        if self.wanted.is_empty() {
            return None;
        }
        let mut request = ReadRequest::default();
        let taken = self.wanted.len().min(MAX_READS_PER_REQUEST);
        for _ in 0..taken {
            let Some(account) = self.wanted.pop_front() else {
                break;
            };
            if let Some(tracked) = self.entry(&account) {
                tracked.read_wanted = false;
                request.keys.push(tracked.key.to_string());
                request.accounts.push(account);
            }
        }
        (!request.keys.is_empty()).then_some(request)
    }

    /// The answer to a [`ReadRequest`]: one value per key (`None` for a missing key), or the
    /// error that left every global part as it was.
    pub(crate) fn read_done<E>(
        &mut self,
        request: ReadRequest,
        values: Result<Vec<Option<i64>>, E>,
        now: SystemTime,
    ) {
        let values = values.ok();
        for (i, (account, key)) in request.accounts.iter().zip(&request.keys).enumerate() {
            let Some(index) = self.index_of_account(account) else {
                continue;
            };
            let Some(tracked) = self.entries.get_mut(index).as_mut() else {
                continue;
            };
            if *tracked.key != **key {
                continue; // read in a bucket that has passed since
            }
            if let Some(values) = &values {
                observe(tracked, values.get(i).copied().flatten().unwrap_or(0), now);
            }
            // A failed read still settles the wait: the session opens, fail-open.
            tracked.synced = true;
            publish(tracked, self.bucket_end);
        }
    }

    /// One past the highest index an account may hold: [`AccountBook::rekey`] and
    /// [`AccountBook::review`] take the indices below it a range at a time, so that the flusher
    /// can yield between ranges. In index order, the entries are read one after another.
    pub(crate) fn extent(&self) -> usize {
        self.entries.len()
    }

    /// Before a full sweep at `now`: moves to a new bucket if one began (usage starts from zero,
    /// every account's total is read again); returns whether one did. The accounts still carry
    /// the old bucket's key until [`AccountBook::rekey`] has seen every index, which the caller
    /// does before anything else touches the book.
    pub(crate) fn roll_bucket(&mut self, now: SystemTime) -> bool {
        let bucket = self.keys.span(now);
        if bucket == self.bucket {
            return false;
        }
        self.bucket_end = bucket.end().map(nanos_since_1970);
        self.bucket = bucket;
        true
    }

    /// After a [`AccountBook::roll_bucket`]: gives the accounts at `indices` their key in the
    /// new bucket and starts them from zero.
    pub(crate) fn rekey(&mut self, indices: Range<usize>) {
        for index in indices.start..indices.end.min(self.entries.len()) {
            let Some(tracked) = self.entries.get_mut(index).as_mut() else {
                continue;
            };
            let account = &tracked.state.account;
            let key: Key = self.keys.key(account, &self.bucket).into();
            let old = std::mem::replace(&mut tracked.key, key.clone());
            self.by_key.remove(&old, index);
            self.by_key.insert(&key, index);
            tracked.global = None;
            tracked.global_as_of = None;
            tracked.pending = 0;
            tracked.synced = false;
            want_read(&mut self.wanted, tracked);
            publish(tracked, self.bucket_end);
        }
    }

    /// After a full sweep, for the accounts at `indices`: forgets those without a session and
    /// with nothing pending, re-reads those that have nothing to write (so other processes'
    /// usage shows), and refreshes limits (a lookup's answer may have changed).
    pub(crate) fn review(&mut self, indices: Range<usize>, registry: &Registry) {
        let limit_of_all = self.budgets.limit_of_all();
        for index in indices.start..indices.end.min(self.entries.len()) {
            let entry = self.entries.get_mut(index);
            let Some(tracked) = entry.as_mut() else {
                continue;
            };
            if tracked.pending == 0 && registry.retire(&tracked.state) {
                if let Some(tracked) = entry.take() {
                    let (key, account) = (&tracked.key, tracked.state.account());
                    self.by_key.remove(key, index);
                    self.by_account.remove(account, index);
                    self.free.push_back(index);
                }
                continue;
            }
            if tracked.pending == 0 {
                want_read(&mut self.wanted, tracked);
            }
            let limit =
                limit_of_all.unwrap_or_else(|| self.budgets.limit_of(tracked.state.account()));
            if limit != tracked.limit {
                tracked.limit = limit;
                publish(tracked, self.bucket_end);
            }
        }
    }

    /// New limits: accounts tracked from now on get them at once, those tracked already from
    /// [`AccountBook::apply_budgets`], a slice at a time.
    pub(crate) fn set_budgets(&mut self, budgets: Budgets) {
        self.budgets = budgets;
        self.budgets_applied = 0;
    }

    /// Applies the limits of the last [`AccountBook::set_budgets`] to up to `most` more tracked
    /// accounts (a lookup each, which may be the gateway's own); returns whether some remain.
    pub(crate) fn apply_budgets(&mut self, most: usize) -> bool {
        let end = self.entries.len().min(self.budgets_applied + most);
        for index in self.budgets_applied..end {
            if let Some(tracked) = self.entries.get_mut(index).as_mut() {
                tracked.limit = self.budgets.limit_of(tracked.state.account());
                publish(tracked, self.bucket_end);
            }
        }
        self.budgets_applied = end;
        end < self.entries.len()
    }
}

impl std::fmt::Debug for AccountBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccountBook")
            .field("tracked", &self.len())
            .field("budgets", &self.budgets)
            .finish_non_exhaustive()
    }
}

fn want_read(wanted: &mut BlockQueue<Account>, tracked: &mut Tracked) {
    if !tracked.read_wanted {
        tracked.read_wanted = true;
        wanted.push_back(tracked.state.account.clone());
    }
}

/// A total seen in the sink. Counters only grow within a bucket, so the largest total seen is the
/// freshest, whichever reply (a read or a write) arrives last.
fn observe(tracked: &mut Tracked, total: i64, now: SystemTime) {
    let total = u64::try_from(total).unwrap_or(0);
    tracked.global = Some(tracked.global.map_or(total, |seen| seen.max(total)));
    tracked.global_as_of = Some(nanos_since_1970(now));
    tracked.synced = true;
}

/// Publishes `tracked`'s numbers; `bucket_end` is [`AccountBook::bucket_end`].
fn publish(tracked: &Tracked, bucket_end: Option<u64>) {
    tracked
        .state
        .publish(view_words(tracked, bucket_end), tracked.synced);
}

/// The words of `tracked`'s view (read back by [`AccountView::from_words`]): presence flags,
/// then one word per number; times are nanoseconds since 1970, a time before 1970 reads back as
/// 1970.
fn view_words(tracked: &Tracked, bucket_end: Option<u64>) -> [u64; VIEW_WORDS] {
    let flag = |present: bool, flag: u64| if present { flag } else { 0 };
    let flags = flag(tracked.global.is_some(), HAS_GLOBAL)
        | flag(tracked.global_as_of.is_some(), HAS_GLOBAL_AS_OF)
        | flag(bucket_end.is_some(), HAS_BUCKET_END)
        | flag(tracked.limit.is_some(), HAS_LIMIT);
    [
        flags,
        tracked.global.unwrap_or(0),
        tracked.global_as_of.unwrap_or(0),
        u64::try_from(tracked.pending).unwrap_or(u64::MAX),
        bucket_end.unwrap_or(0),
        tracked.limit.unwrap_or(0),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    /// 2026-11-29T12:00:00Z.
    const NOON: u64 = 1_795_953_600;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    /// `account`'s state, as a session's opening finds or creates it (no ledger here).
    fn open(registry: &Registry, account: &str) -> Arc<AccountState> {
        let opened = registry.open(account, |_| Ok::<_, std::convert::Infallible>(()));
        let Ok(((), state)) = opened;
        state
    }

    fn setup(budgets: Budgets) -> (Registry, AccountBook, Arc<AccountState>) {
        let (registry, mut announced) = Registry::new();
        let mut book = AccountBook::new(KeyScheme::daily_utc("b"), budgets, at(NOON));
        let state = open(&registry, "u");
        book.track(announced.try_recv().expect("announced"));
        (registry, book, state)
    }

    #[test]
    fn an_opening_shares_the_state_s_id_and_one_that_fails_creates_nothing() {
        let (registry, mut announced) = Registry::new();
        let failed = registry.open("u", |_| Err::<(), _>("full"));
        assert_eq!(failed.err(), Some("full"));
        assert!(registry.get("u").is_none(), "no state");
        assert!(announced.try_recv().is_err(), "nothing announced");

        let (id, state) = registry.open("u", Ok::<_, ()>).unwrap();
        assert!(
            Arc::ptr_eq(&id, &state.account),
            "the state's own allocation"
        );
        let (again, _) = registry.open("u", Ok::<_, ()>).unwrap();
        assert!(
            Arc::ptr_eq(&again, &state.account),
            "a second session's too"
        );
        assert!(announced.try_recv().is_ok() && announced.try_recv().is_err());
    }

    #[test]
    fn a_sweep_is_located_only_for_accounts_tracked_in_its_bucket() {
        let (_registry, book, _state) = setup(Budgets::per_bucket(100));
        let today = book.keys.span(at(NOON));
        assert!(book.locate("u", &today).is_some());
        assert!(book.locate("v", &today).is_none(), "not tracked");
        let yesterday = book.keys.span(at(NOON - 86_400));
        assert!(book.locate("u", &yesterday).is_none(), "another bucket");
    }

    #[test]
    fn counts_naming_no_entry_are_passed_over_when_prefetching() {
        let (_registry, book, _state) = setup(Budgets::per_bucket(100));
        let unknown = Some(Counted {
            owner: Owner::MAX,
            amount: 1,
        });
        book.prefetch_acknowledged(&[unknown; ENTRY_AHEAD]);
        book.prefetch_acknowledged(&[None; ENTRY_AHEAD]);
    }

    #[test]
    fn usage_is_global_plus_pending_and_exhaustion_is_at_the_limit() {
        let (_registry, mut book, state) = setup(Budgets::per_bucket(100));
        let span = book.keys.span(at(NOON));
        let reads = book.take_reads().expect("a first read");
        assert_eq!(reads.keys, ["b:u:20261129"]);
        book.read_done::<()>(reads, Ok(vec![Some(60)]), at(NOON + 1));
        assert_eq!(state.usage().used, 60);
        assert_eq!(state.usage().global_as_of, Some(at(NOON + 1)));

        let (key, owner) = book
            .swept(book.locate("u", &span).unwrap(), 39)
            .expect("tracked");
        let key = key.clone();
        assert_eq!(&*key, "b:u:20261129");
        assert!(!state.is_exhausted(), "99 of 100");
        book.swept(book.locate("u", &span).unwrap(), 1);
        assert!(state.is_exhausted(), "100 of 100: used >= limit");
        let status = state.status().unwrap();
        assert_eq!(
            (status.used, status.remaining, status.exhausted),
            (100, 0, true)
        );
        assert_eq!(status.resets_at, Some(at(1_795_996_800)));

        // The write is acknowledged: the reply's total replaces the pending part.
        let counted = Counted { owner, amount: 40 };
        book.acknowledged(Some(counted), &key, Some(101), at(NOON + 2));
        let usage = state.usage();
        assert_eq!(
            (usage.used, usage.global, usage.local_pending),
            (101, Some(101), 0)
        );
        assert_eq!(state.status().unwrap().remaining, 0, "never negative");
    }

    #[test]
    fn an_amount_swept_before_tracking_moves_the_global_part_only() {
        let (_registry, mut book, state) = setup(Budgets::unlimited());
        let span = book.keys.span(at(NOON));
        let reads = book.take_reads().unwrap();
        book.read_done::<()>(reads, Ok(vec![Some(60)]), at(NOON));
        book.swept(book.locate("u", &span).unwrap(), 10);
        // 5 swept before the account was tracked (not in its pending part) is acknowledged
        // under the same key, built apart: the total counts it, the pending part stays.
        book.acknowledged(None, &"b:u:20261129".into(), Some(65), at(NOON + 1));
        let usage = state.usage();
        assert_eq!(
            (usage.global, usage.local_pending, usage.used),
            (Some(65), 10, 75)
        );
    }

    #[test]
    fn a_failed_read_opens_the_session_without_a_global_part() {
        let (_registry, mut book, state) = setup(Budgets::per_bucket(10));
        let reads = book.take_reads().unwrap();
        book.read_done(reads, Err("connection refused"), at(NOON));
        assert!(state.is_synced());
        assert_eq!(state.usage().global, None);
        assert!(!state.is_exhausted());
    }

    #[test]
    fn a_new_bucket_starts_from_zero_and_is_read_again() {
        let (_registry, mut book, state) = setup(Budgets::per_bucket(10));
        let reads = book.take_reads().unwrap();
        book.read_done::<()>(reads, Ok(vec![Some(50)]), at(NOON));
        let (key, owner) = book
            .swept(book.locate("u", &book.keys.span(at(NOON))).unwrap(), 5)
            .unwrap();
        let yesterdays = key.clone();
        assert!(state.is_exhausted());
        assert!(book.roll_bucket(at(NOON + 43_200)), "midnight");
        assert!(!book.roll_bucket(at(NOON + 43_201)), "the same bucket");
        book.rekey(0..book.extent());
        assert!(!state.is_exhausted());
        assert_eq!(state.usage().global, None);
        assert_eq!(state.usage().bucket_end, Some(at(1_795_996_800 + 86_400)));
        assert_eq!(book.take_reads().unwrap().keys, ["b:u:20261130"]);
        // An acknowledgement for yesterday's key no longer moves today's usage.
        let counted = Counted { owner, amount: 5 };
        book.acknowledged(Some(counted), &yesterdays, Some(55), at(NOON + 43_201));
        book.acknowledged(None, &yesterdays, Some(55), at(NOON + 43_201));
        assert_eq!(state.usage().used, 0);
    }

    #[test]
    fn accounts_without_sessions_are_forgotten() {
        let (registry, mut book, state) = setup(Budgets::unlimited());
        let review = |book: &mut AccountBook| book.review(0..book.extent(), &registry);
        review(&mut book);
        assert_eq!(book.len(), 1, "a session holds it");
        drop(state);
        review(&mut book);
        assert_eq!(book.len(), 0);
        assert_eq!(book.by_key.len(), 0, "its key is forgotten too");
        assert_eq!(book.by_account.len(), 0);
        assert!(registry.get("u").is_none());
    }

    #[test]
    fn a_new_bucket_rekeys_every_account_a_range_at_a_time_and_forgets_the_old_keys() {
        let (registry, mut announced) = Registry::new();
        let mut book = AccountBook::new(KeyScheme::daily_utc("b"), Budgets::unlimited(), at(NOON));
        let states: Vec<_> = (0..1_000)
            .map(|i| open(&registry, &format!("u{i}")))
            .collect();
        while let Ok(state) = announced.try_recv() {
            book.track(state);
        }
        assert_eq!(book.len(), 1_000);
        assert!(
            book.by_account.shards_used() > 200,
            "accounts spread over the shards"
        );
        assert!(book.roll_bucket(at(NOON + 43_200)));
        for start in (0..book.extent()).step_by(7) {
            book.rekey(start..start + 7);
        }
        assert_eq!(
            book.by_key.len(),
            1_000,
            "one key per account, the old ones gone"
        );
        let span = book.keys.span(at(NOON + 43_200));
        for state in &states {
            let located = book.locate(state.account(), &span).expect("tracked");
            let key = book.swept(located, 1).expect("tracked").0.clone();
            assert!(key.ends_with(":20261130"), "{key}");
            let index = book.index_of_key(&key);
            let entry = index.and_then(|index| book.entries.get_mut(index).as_ref());
            assert_eq!(
                entry.map(|tracked| tracked.state.account()),
                Some(state.account())
            );
        }
    }

    #[test]
    fn new_budgets_reach_every_tracked_account_a_slice_at_a_time() {
        let (registry, mut announced) = Registry::new();
        let mut book =
            AccountBook::new(KeyScheme::daily_utc("b"), Budgets::per_bucket(10), at(NOON));
        let states: Vec<_> = (0..1_000)
            .map(|i| open(&registry, &format!("u{i}")))
            .collect();
        while let Ok(state) = announced.try_recv() {
            book.track(state);
        }
        book.set_budgets(Budgets::per_bucket(20));
        let mut slices = 1;
        while book.apply_budgets(256) {
            slices += 1;
        }
        assert_eq!(slices, 4, "1,000 accounts in slices of 256");
        assert!(states
            .iter()
            .all(|state| state.status().unwrap().limit == 20));
        // An account tracked after the change gets the new limit at once.
        let late = open(&registry, "late");
        book.track(announced.try_recv().unwrap());
        assert_eq!(late.status().unwrap().limit, 20);
        assert!(!book.apply_budgets(256), "nothing left to apply");
    }

    #[test]
    fn budgets_resolve_override_then_lookup_then_default() {
        let budgets = Budgets::per_bucket(1)
            .limit_for("a", 2)
            .lookup(|account| (account != "c").then_some(3));
        assert_eq!(budgets.limit_of("a"), Some(2));
        assert_eq!(budgets.limit_of("b"), Some(3));
        assert_eq!(budgets.limit_of("c"), Some(1));
        assert_eq!(Budgets::unlimited().limit_of("a"), None);
    }

    #[test]
    fn a_review_asks_the_lookup_again() {
        let plan = Arc::new(std::sync::atomic::AtomicU64::new(10));
        let lookup = {
            let plan = plan.clone();
            move |_: &str| Some(plan.load(Ordering::Relaxed))
        };
        let (registry, mut book, state) = setup(Budgets::unlimited().lookup(lookup));
        assert_eq!(state.status().map(|status| status.limit), Some(10));
        plan.store(20, Ordering::Relaxed);
        book.review(0..book.extent(), &registry);
        assert_eq!(state.status().map(|status| status.limit), Some(20));
    }

    #[test]
    fn a_limit_is_the_same_for_all_only_without_overrides_and_lookup() {
        assert_eq!(Budgets::per_bucket(5).limit_of_all(), Some(Some(5)));
        assert_eq!(Budgets::unlimited().limit_of_all(), Some(None));
        assert_eq!(
            Budgets::per_bucket(5).limit_for("a", 2).limit_of_all(),
            None
        );
        assert_eq!(
            Budgets::unlimited().lookup(|_| Some(3)).limit_of_all(),
            None
        );
    }
}
