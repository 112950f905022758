//! The synchronization types the primitives are written against: `std::sync` in every normal
//! build, `loom::sync` under `--cfg loom`, so that the loom models check the very code the driver
//! runs.

#[cfg(loom)]
pub use loom::sync::{atomic, Arc, Condvar, Mutex, MutexGuard};
#[cfg(not(loom))]
pub use std::sync::{atomic, Arc, Condvar, Mutex, MutexGuard};

/// Locks `mutex`. A poisoned lock means a thread panicked inside one of these primitives, which
/// is a bug in Sabot: this panics too.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().expect("a primitive's lock is poisoned: a thread panicked holding it")
}
