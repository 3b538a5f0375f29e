//! [`atomically`]: multi-cell updates that no save splits.

use std::cell::Cell;

use parking_lot::{RwLock, RwLockWriteGuard};

use crate::{Error, Result};

// Held shared by `atomically` and exclusively by a save while it encodes (and by a
// load while it installs), so a save sees every `atomically` block whole or not at all.
static GATE: RwLock<()> = RwLock::new(());

thread_local! {
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// Runs `f` so that no save or reload sees only part of what it changes.
///
/// Cells changed inside one `atomically` call are saved together: every snapshot has
/// all of the changes or none of them, so an invariant that holds between
/// `atomically` calls (say `A + B == 100`) holds in every snapshot too.
/// Saves wait while `atomically` blocks run, and `atomically` blocks wait while a
/// save encodes; blocks on different threads run at the same time, and nest.
///
/// Do not enter `atomically` while holding a cell's guard from
/// [`read`](crate::StateCell::read) or [`write`](crate::StateCell::write): a save
/// waiting for that cell would then wait for you, and you for it. For the same
/// reason, do not wait inside `atomically` for another thread that enters
/// `atomically` or saves.
///
/// # Example
/// ```
/// # use instastate::StateCell;
/// # static A: StateCell<i64> = StateCell::new("docs::A", || 100);
/// # static B: StateCell<i64> = StateCell::new("docs::B", || 0);
/// instastate::atomically(|| {
///     A.update(|a| *a -= 10);
///     B.update(|b| *b += 10);
/// });
/// assert_eq!(A.get() + B.get(), 100);
/// ```
pub fn atomically<R>(f: impl FnOnce() -> R) -> R {
    let depth = DEPTH.with(Cell::get);
    // An outermost call queues behind a waiting save, so that a stream of
    // overlapping blocks cannot starve saves. A nested call must not: its thread
    // already holds the gate, and the waiting save waits for it.
    let _shared = if depth == 0 { GATE.read() } else { GATE.read_recursive() };
    DEPTH.with(|it| it.set(depth + 1));
    let _depth = DepthGuard;
    f()
}

struct DepthGuard;

impl Drop for DepthGuard {
    fn drop(&mut self) {
        DEPTH.with(|depth| depth.set(depth.get().saturating_sub(1)));
    }
}

/// Excludes every `atomically` block until dropped.
pub(crate) fn exclusive() -> RwLockWriteGuard<'static, ()> {
    GATE.write()
}

/// Refuses `operation` on a thread inside `atomically`, where it would deadlock.
/// Whether this thread is inside an `atomically` block, where saves cannot run.
pub(crate) fn inside() -> bool {
    DEPTH.with(Cell::get) > 0
}

pub(crate) fn ensure_outside(operation: &'static str) -> Result<()> {
    if DEPTH.with(Cell::get) == 0 { Ok(()) } else { Err(Error::InsideAtomically { operation }) }
}
