//! The cells that `defstate!` registers before `main`, for [`open`](crate::open).
//!
//! **Invariant:** registration only pushes a pointer. It does no I/O, takes no lock
//! that anything else could hold before `main`, cannot panic, and assumes nothing
//! about the order constructors run in. Duplicate names are found at open.

use parking_lot::Mutex;

use crate::cell::ErasedCell;

// A mutex rather than an intrusive lock-free list (as inventory has): it needs no
// `unsafe`, and before `main` nothing contends for it.
static CELLS: Mutex<Vec<&'static dyn ErasedCell>> = Mutex::new(Vec::new());

pub(crate) fn register(cell: &'static dyn ErasedCell) {
    CELLS.lock().push(cell);
}

pub(crate) fn registered() -> Vec<&'static dyn ErasedCell> {
    CELLS.lock().clone()
}
