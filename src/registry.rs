//! The cells that `defstate!` registers before `main`, for [`open`](crate::open).
//!
//! **Invariant:** registration only pushes a pointer. It does no I/O, takes no lock
//! that anything else could hold before `main`, cannot panic, and assumes nothing
//! about the order constructors run in. Duplicate names are found at open.

use parking_lot::Mutex;

use crate::{StateCell, Value, store::Member};

// A mutex rather than an intrusive lock-free list (as inventory has): it needs no
// `unsafe`, and before `main` nothing contends for it.
static CELLS: Mutex<Vec<Member>> = Mutex::new(Vec::new());

pub(crate) fn register<T: Value>(cell: &'static StateCell<T>) {
    CELLS.lock().push(Member::of(cell));
}

pub(crate) fn registered() -> Vec<Member> {
    CELLS.lock().clone()
}
