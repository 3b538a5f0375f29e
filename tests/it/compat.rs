//! Stores written by released format versions still load.
//!
//! `tests/fixtures/v1` was written by format v1: `fixture::NUMBER` saved twice
//! (`0xfeed_beef`, then 42), a `String`, a `Vec<u32>` large enough for a value file,
//! and `fixture::RETIRED`, which no cell claims here.
//! `tests/fixtures/journal-v2` holds journals of format v2 (see its README).

use std::{fs, path::Path};

use instastate::{CellOptions, Migration, Prevalent, Prevayler, StateCell, Store, Timestamp};
use serde::{Deserialize, Serialize};

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

/// Copies the journal fixture `name` of format v2 into a new temporary directory.
fn journal_v2(name: &str) -> TestResult<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/journal-v2").join(name);
    copy_dir(&fixture, dir.path())?;
    Ok(dir)
}

fn push(numbers: &mut Vec<u64>, n: u64, _: Timestamp) -> usize {
    numbers.push(n);
    numbers.len()
}

#[test]
fn a_format_v2_journal_loads_keeps_working_and_upgrades_its_events() -> TestResult {
    let expected: Vec<u64> = (0..8).map(|n| n * 11).collect();
    let dir = journal_v2("prevayler")?;
    {
        let numbers = Prevayler::open(dir.path(), Vec::new(), push)?;
        assert_eq!(numbers.read(Clone::clone), expected);
        assert_eq!((numbers.recovered().snapshot(), numbers.recovered().replayed()), (Some(5), 3));
        assert_eq!(numbers.handle(88)?, 9);
    }
    let report = Prevayler::builder::<Vec<u64>>().inspect(dir.path())?;
    assert_eq!((report.schema, report.event_schema, report.events), (1, 1, 9));
    // Version 2 of the events reads the files of format v2 through a migration.
    let doubled = |numbers: &mut Vec<u64>, n: (u64, bool), _: Timestamp| {
        numbers.push(if n.1 { n.0 * 2 } else { n.0 });
    };
    let numbers = Prevayler::builder()
        .event_version(2)
        .migrate_event(1, |n: u64| (n, false))
        .open(dir.path(), Vec::new(), doubled)?;
    numbers.handle((50, true))?;
    let mut all = expected;
    all.extend([88, 100]);
    assert_eq!(numbers.read(Clone::clone), all);
    Ok(())
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Tally {
    seen: Vec<u64>,
}

impl Prevalent for Tally {
    type Event = u64;
    type Output = usize;
    fn apply(&mut self, n: u64, _: Timestamp) -> usize {
        self.seen.push(n);
        self.seen.len()
    }
}

/// The fixture's state type was `mkfixture::Tally`: a migration from its version,
/// which trusts the version and not the name, reads it as this one.
fn moved(old: Tally) -> Tally {
    old
}

#[test]
fn a_journaled_cell_of_format_v2_loads_with_its_cells_version() -> TestResult {
    static TALLY: StateCell<Tally> = StateCell::with_options(
        "fixture::TALLY",
        Tally::default,
        CellOptions::new().version(3).migrations(&[&Migration::new(2, moved)]).journaled(),
    );
    let dir = journal_v2("cell")?;
    {
        let _store = Store::builder().cell(&TALLY).open(dir.path())?;
        assert_eq!(TALLY.with(|it| it.seen.clone()), [0, 7, 14, 21, 28]);
        assert_eq!(TALLY.handle(35)?, 6);
    }
    TALLY.set(Tally::default());
    let _store = Store::builder().cell(&TALLY).open(dir.path())?;
    assert_eq!(TALLY.with(|it| it.seen.len()), 6);
    Ok(())
}
