//! The trust issue: every promise holds under faults, damaged bytes and
//! concurrency. Each test here failed before its fix.

use std::fs;

use instastate::{StateCell, Store};

use crate::TestResult;

#[test]
fn an_interrupted_engine_snapshot_does_not_make_the_store_unopenable() -> TestResult {
    static KEPT: StateCell<String> = StateCell::new("trust::generating::KEPT", String::new);
    let dir = tempfile::tempdir()?;
    {
        let store = Store::builder().cell(&KEPT).open(dir.path())?;
        KEPT.set("saved".into());
        store.save_all()?;
    }
    // What a crash leaves when it interrupts the engine writing its snapshot at
    // open: a part of the file (here, nothing but a few bytes).
    fs::write(dir.path().join("sled/snap.00000000FFFFFFFF.generating"), b"torn")?;
    KEPT.set(String::new());
    let _store = Store::builder().cell(&KEPT).open(dir.path())?;
    assert_eq!(KEPT.get(), "saved");
    Ok(())
}
