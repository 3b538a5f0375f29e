//! `cfg` attributes apply to the cell and to its registration.
#![deny(warnings)]

use instastate::{Store, defstate};

defstate! {
    #[cfg(all())]
    KEPT: u32 = 1;

    #[cfg(any())]
    GONE: u32 = 2;

    #[cfg(any())]
    GONE_TOO: NotEvenAType = unreachable_code();

    ALWAYS: u32 = 3;
}

fn main() {
    assert_eq!(KEPT.get(), 1);
    assert_eq!(ALWAYS.get(), 3);

    // Save every registered cell, then reopen the store without cells: the names
    // it lists as orphans are exactly those that were registered.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::builder().registered_cells().open(dir.path()).unwrap();
    store.save_all().unwrap();
    drop(store);
    let store = Store::builder().open(dir.path()).unwrap();
    let mut names = store.orphans();
    names.sort();
    assert_eq!(names, [concat!(module_path!(), "::ALWAYS"), concat!(module_path!(), "::KEPT")]);
}
