//! Which cells' guards each thread holds, and which cells threads inside
//! [`atomically`](crate::atomically) wait for: what lets a save or a reload that
//! would wait forever for an `atomically` block say so instead.
//!
//! The cycle it finds: this thread holds a cell's guard and waits for every
//! `atomically` block to end (as a save does), while a block on another thread
//! waits for that cell.

use std::{cell::RefCell, marker::PhantomData};

use parking_lot::Mutex;

/// A cell, by its address (its identity) and name (for errors).
type CellId = (usize, &'static str);

thread_local! {
    /// The cells whose guards this thread holds, once per guard.
    static HELD: RefCell<Vec<CellId>> = const { RefCell::new(Vec::new()) };
}

/// The cells that threads inside `atomically` wait for, once per waiting thread.
static WAITED: Mutex<Vec<CellId>> = Mutex::new(Vec::new());

/// Counts a guard of a cell as held by this thread until dropped. Never sent to
/// another thread (whatever features `parking_lot` is built with), so that it
/// is dropped where it was counted.
pub(crate) struct Holding(usize, PhantomData<std::sync::MutexGuard<'static, ()>>);

impl Holding {
    pub(crate) fn new(cell: usize, name: &'static str) -> Holding {
        // Not counted by a thread whose locals are gone (a guard taken while
        // they are dropped, at its exit): it saves nothing after that.
        let _ = HELD.try_with(|held| held.borrow_mut().push((cell, name)));
        Holding(cell, PhantomData)
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        let _ = HELD.try_with(|held| {
            let mut held = held.borrow_mut();
            if let Some(at) = held.iter().rposition(|(cell, _)| *cell == self.0) {
                held.swap_remove(at);
            }
        });
    }
}

/// Runs `lock`, which waits for cell `cell` (named `name`), counted as waited
/// for by a thread inside `atomically` meanwhile.
pub(crate) fn waiting<R>(cell: usize, name: &'static str, lock: impl FnOnce() -> R) -> R {
    struct Waiting(usize);
    impl Drop for Waiting {
        fn drop(&mut self) {
            let mut waited = WAITED.lock();
            if let Some(at) = waited.iter().position(|(cell, _)| *cell == self.0) {
                waited.swap_remove(at);
            }
        }
    }
    WAITED.lock().push((cell, name));
    let _waiting = Waiting(cell);
    lock()
}

/// Whether this thread holds the guard of any cell.
pub(crate) fn holds_any() -> bool {
    HELD.try_with(|held| !held.borrow().is_empty()).unwrap_or(false)
}

/// The name of a cell whose guard this thread holds and that a thread inside
/// `atomically` waits for, if any.
pub(crate) fn held_and_waited_for() -> Option<&'static str> {
    let waited = WAITED.lock();
    HELD.try_with(|held| {
        held.borrow()
            .iter()
            .find(|(cell, _)| waited.iter().any(|(it, _)| it == cell))
            .map(|(_, name)| *name)
    })
    .ok()
    .flatten()
}
