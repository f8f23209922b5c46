//! The one place that switches between std and loom primitives.
//!
//! The ledger is built on these names only, so the loom models in `loom-tests/` (compiled with
//! `RUSTFLAGS="--cfg shardmeter_loom"`) explore exactly the code that ships. The cfg has a name of
//! our own: a global `--cfg loom` would also change tokio and break fred (`docs/facts.md`, *Loom*).

#[cfg(not(shardmeter_loom))]
mod imp {
    pub(crate) use std::sync::atomic::{
        fence, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, Ordering,
    };
    pub(crate) use std::sync::Arc;

    /// Waits a little before a retry: a spin hint for the first `attempt`s, then a yield of the
    /// thread (whoever holds us up may be descheduled).
    #[cfg(feature = "engine")]
    pub(crate) fn back_off(attempt: u32) {
        if attempt < 64 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }

    /// A queue that never allocates after construction; crossbeam's is lock-free.
    pub(crate) type BoundedQueue<T> = crossbeam_queue::ArrayQueue<T>;

    /// `std::cell::UnsafeCell` with loom's closure API, so both sides read the same.
    #[derive(Debug)]
    pub(crate) struct UnsafeCell<T>(std::cell::UnsafeCell<T>);

    impl<T> UnsafeCell<T> {
        pub(crate) const fn new(value: T) -> Self {
            Self(std::cell::UnsafeCell::new(value))
        }

        pub(crate) fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
            f(self.0.get())
        }

        pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
            f(self.0.get())
        }
    }

    /// Declares a `const`-initialised thread-local: reading one is an `fs:`-relative load with
    /// no lazy-init check (loom's `thread_local!` has no `const` form, hence the macro).
    macro_rules! thread_local_const {
        ($(#[$attr:meta])* static $name:ident: $t:ty = $init:expr;) => {
            std::thread_local! {
                $(#[$attr])* static $name: $t = const { $init };
            }
        };
    }

    /// Declares a process-wide static, built on first use.
    macro_rules! global {
        ($(#[$attr:meta])* static $name:ident: $t:ty = $init:expr;) => {
            $(#[$attr])* static $name: std::sync::LazyLock<$t> = std::sync::LazyLock::new(|| $init);
        };
    }

    pub(crate) use {global, thread_local_const};
}

#[cfg(shardmeter_loom)]
mod imp {
    pub(crate) use loom::cell::UnsafeCell;
    pub(crate) use loom::sync::atomic::{
        fence, AtomicPtr, AtomicU32, AtomicU64, AtomicU8, Ordering,
    };
    pub(crate) use loom::sync::{Arc, Mutex};

    /// A retry loop must yield to loom's scheduler, or the model never ends.
    pub(crate) fn back_off(_attempt: u32) {
        loom::thread::yield_now();
    }

    /// crossbeam's `ArrayQueue` is not loom-aware; a loom mutex around a deque stands in for it.
    /// The models then check our use of the queue (push happens-before pop), not crossbeam itself.
    #[derive(Debug)]
    pub(crate) struct BoundedQueue<T> {
        items: Mutex<std::collections::VecDeque<T>>,
        capacity: usize,
    }

    impl<T> BoundedQueue<T> {
        pub(crate) fn new(capacity: usize) -> Self {
            Self {
                items: Mutex::new(std::collections::VecDeque::with_capacity(capacity)),
                capacity,
            }
        }

        pub(crate) fn push(&self, value: T) -> Result<(), T> {
            let mut items = self.items.lock().unwrap();
            if items.len() == self.capacity {
                return Err(value);
            }
            items.push_back(value);
            Ok(())
        }

        pub(crate) fn pop(&self) -> Option<T> {
            self.items.lock().unwrap().pop_front()
        }

        pub(crate) fn len(&self) -> usize {
            self.items.lock().unwrap().len()
        }
    }

    macro_rules! thread_local_const {
        ($(#[$attr:meta])* static $name:ident: $t:ty = $init:expr;) => {
            loom::thread_local! {
                $(#[$attr])* static $name: $t = $init;
            }
        };
    }

    macro_rules! global {
        ($(#[$attr:meta])* static $name:ident: $t:ty = $init:expr;) => {
            loom::lazy_static! {
                $(#[$attr])* static ref $name: $t = $init;
            }
        };
    }

    pub(crate) use {global, thread_local_const};
}

pub(crate) use imp::*;
