//! [`atomically`]: multi-cell updates that no save splits.

use std::{
    cell::{Cell, RefCell},
    time::Duration,
};

use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::{Error, Result, held};

// Held shared by `atomically` and exclusively by a save while it encodes (and by a
// load while it installs), so a save sees every `atomically` block whole or not at all.
static GATE: RwLock<()> = RwLock::new(());

thread_local! {
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    static DEFERRED: RefCell<Vec<Box<dyn FnOnce()>>> = const { RefCell::new(Vec::new()) };
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
    let shared = if depth == 0 { GATE.read() } else { GATE.read_recursive() };
    DEPTH.with(|it| it.set(depth + 1));
    let _exit = Exit { gate: Some(shared), outermost: depth == 0 };
    f()
}

/// Leaves an `atomically` block, also when it unwinds: releases the gate, then,
/// for the outermost block, runs what was deferred to its end.
struct Exit {
    gate: Option<RwLockReadGuard<'static, ()>>,
    outermost: bool,
}

impl Drop for Exit {
    fn drop(&mut self) {
        DEPTH.with(|depth| depth.set(depth.get().saturating_sub(1)));
        drop(self.gate.take());
        if self.outermost {
            let deferred = DEFERRED.with(|it| std::mem::take(&mut *it.borrow_mut()));
            for run in deferred {
                run();
            }
        }
    }
}

/// Runs `f` on this thread when its outermost `atomically` block has ended: for
/// work that needs a save, which cannot run inside the block.
pub(crate) fn defer(f: impl FnOnce() + 'static) {
    DEFERRED.with(|it| it.borrow_mut().push(Box::new(f)));
}

/// Excludes every `atomically` block until dropped.
pub(crate) fn exclusive() -> RwLockWriteGuard<'static, ()> {
    GATE.write()
}

/// Excludes every `atomically` block until dropped, once the blocks that run end
/// within `wait` (new ones wait meanwhile), or `None`.
pub(crate) fn try_exclusive_for(wait: Duration) -> Option<RwLockWriteGuard<'static, ()>> {
    GATE.try_write_for(wait)
}

/// Waits for every `atomically` block to end, then excludes them until dropped;
/// [`Error::GuardHeld`] when one waits for a cell whose guard this thread holds,
/// and so would never end.
pub(crate) fn exclusive_for(operation: &'static str) -> Result<RwLockWriteGuard<'static, ()>> {
    if !held::holds_any() {
        return Ok(GATE.write());
    }
    loop {
        if let Some(gate) = GATE.try_write_for(CHECK_EVERY) {
            return Ok(gate);
        }
        if let Some(cell) = held::held_and_waited_for() {
            return Err(Error::GuardHeld { cell: cell.to_owned(), operation });
        }
    }
}

/// How long [`exclusive_for`] waits for the gate between two looks for a block
/// that waits for this thread.
const CHECK_EVERY: Duration = Duration::from_millis(2);

/// Refuses `operation` on a thread inside `atomically`, where it would deadlock.
/// Whether this thread is inside an `atomically` block, where saves cannot run.
pub(crate) fn inside() -> bool {
    DEPTH.with(Cell::get) > 0
}

pub(crate) fn ensure_outside(operation: &'static str) -> Result<()> {
    if DEPTH.with(Cell::get) == 0 { Ok(()) } else { Err(Error::InsideAtomically { operation }) }
}
