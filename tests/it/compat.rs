//! Stores written by released format versions still load.
//!
//! `tests/fixtures/v1` was written by format v1: `fixture::NUMBER` saved twice
//! (`0xfeed_beef`, then 42), a `String`, a `Vec<u32>` large enough for a value file,
//! and `fixture::RETIRED`, which no cell claims here.

use std::{fs, path::Path};

use instastate::{StateCell, Store};

use crate::TestResult;

static NUMBER: StateCell<u64> = StateCell::new("fixture::NUMBER", || 0);
static TEXT: StateCell<String> = StateCell::new("fixture::TEXT", String::new);
static BIG: StateCell<Vec<u32>> = StateCell::new("fixture::BIG", Vec::new);

/// Copies a fixture, since opening a store writes to it.
pub(crate) fn copy_dir(from: &Path, to: &Path) -> TestResult {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

#[test]
fn a_format_v1_store_loads_and_keeps_working() -> TestResult {
    let dir = tempfile::tempdir()?;
    copy_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1"), dir.path())?;
    {
        let store = Store::builder().cell(&NUMBER).cell(&TEXT).cell(&BIG).open(dir.path())?;
        assert_eq!(NUMBER.get(), 42);
        assert_eq!(TEXT.get(), "written by format v1");
        assert_eq!(BIG.get(), (0..10_000).collect::<Vec<u32>>());
        assert_eq!(store.orphans(), ["fixture::RETIRED"]);
        NUMBER.set(43);
        store.save_all()?;
    }
    NUMBER.set(0);
    let _store = Store::builder().cell(&NUMBER).open(dir.path())?;
    assert_eq!(NUMBER.get(), 43);
    Ok(())
}
