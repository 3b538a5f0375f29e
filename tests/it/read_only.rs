//! `StoreBuilder::open_read_only`: a store opened to be read loads what `open`
//! loads, refuses every change, and leaves every byte of its directory alone.

use std::{fs, time::Duration};

use instastate::{CellOptions, Error, StateCell, Store, Timestamp};
use serde::{Deserialize, Serialize};

use crate::{TestResult, tree::tree};

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct Tally(u64);

impl instastate::Prevalent for Tally {
    type Event = u64;
    type Output = u64;

    fn apply(&mut self, by: u64, _: Timestamp) -> u64 {
        self.0 += by;
        self.0
    }
}

/// Expects `res` to be [`Error::ReadOnly`] for `operation`.
fn refused<T: std::fmt::Debug>(res: instastate::Result<T>, operation: &str) -> TestResult {
    match res {
        Err(Error::ReadOnly { operation: refused, .. }) if refused == operation => Ok(()),
        other => Err(format!("{operation} on a read-only store gave {other:?}").into()),
    }
}

#[test]
fn a_read_only_store_loads_everything_and_changes_nothing() -> TestResult {
    static NOTE: StateCell<String> = StateCell::new("it::read_only::NOTE", String::new);
    static BIG: StateCell<Vec<u8>> = StateCell::new("it::read_only::BIG", Vec::new);
    static TALLY: StateCell<Tally> = StateCell::with_options(
        "it::read_only::TALLY",
        Tally::default,
        CellOptions::new().journaled(),
    );
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("store");
    let open = || Store::builder().cell(&NOTE).cell(&BIG).cell(&TALLY);
    {
        let store = open().open(&dir)?;
        for save in 1..=3u8 {
            NOTE.set(format!("save {save}"));
            // Large enough to live in a value file of its own.
            BIG.set(vec![save; 200_000]);
            TALLY.handle(u64::from(save))?;
            store.save_all()?;
        }
        TALLY.handle(10)?;
    }
    // What opening to write would clean up: a half-written engine snapshot and a
    // value file no save points at.
    fs::write(dir.join("sled/snap.00000000FFFFFFFF.generating"), b"torn")?;
    fs::write(dir.join("values/00000000000fffff.val"), b"stray")?;
    let before = tree(&dir)?;

    NOTE.set(String::new());
    BIG.set(Vec::new());
    TALLY.set(Tally::default());
    {
        let store = open().open_read_only(&dir)?;
        assert_eq!(
            (NOTE.get(), BIG.get(), TALLY.get()),
            ("save 3".into(), vec![3; 200_000], Tally(16))
        );
        assert_eq!((store.generation(), store.history().len()), (3, 3));
        assert!(store.verify()?.is_empty(), "{:?}", store.verify());
        store.revert_to(1)?;
        assert_eq!(NOTE.get(), "save 1", "reverting changes the cells");
        store.reload_all()?;
        assert_eq!(NOTE.get(), "save 3");

        // Copies go elsewhere, and are full stores.
        store.backup_to(tmp.path().join("backup"))?;
        store.export_to(tmp.path().join("export"))?;

        NOTE.set("changed".into());
        refused(store.save_all(), "save_all")?;
        refused(store.import_from(tmp.path().join("export")), "import_from")?;
        refused(store.prune_orphans(), "prune_orphans")?;
        refused(store.compact(), "compact")?;
        refused(store.autosave(Duration::from_millis(1)), "autosave")?;
        refused(TALLY.handle(1), "handle")?;
        assert_eq!(TALLY.get(), Tally(16), "a refused event is not applied");
        store.close()?;
    }
    assert!(tree(&dir)? == before, "a read-only store changed its directory");

    NOTE.set(String::new());
    TALLY.set(Tally::default());
    {
        let _backup = open().open(tmp.path().join("backup"))?;
        assert_eq!((NOTE.get(), TALLY.get()), ("save 3".into(), Tally(16)));
    }
    let _store = open().open(&dir)?;
    assert_eq!(
        (NOTE.get(), BIG.get(), TALLY.get()),
        ("save 3".into(), vec![3; 200_000], Tally(16))
    );
    Ok(())
}

#[test]
fn readers_share_a_store_and_exclude_its_writer() -> TestResult {
    static A: StateCell<u8> = StateCell::new("it::read_only::shared::A", || 0);
    static B: StateCell<u8> = StateCell::new("it::read_only::shared::B", || 0);
    static W: StateCell<u8> = StateCell::new("it::read_only::shared::W", || 0);
    let dir = tempfile::tempdir()?;
    {
        let writer = Store::builder().cell(&W).open(dir.path())?;
        W.set(7);
        writer.save_all()?;
        let res = Store::builder().cell(&A).open_read_only(dir.path()).map(drop);
        assert!(matches!(res, Err(Error::Locked { .. })), "read while written: {res:?}");
    }
    let first = Store::builder().cell(&A).open_read_only(dir.path())?;
    let second = Store::builder().cell(&B).open_read_only(dir.path())?;
    assert_eq!((first.generation(), second.generation()), (1, 1));
    let res = Store::builder().cell(&W).open(dir.path()).map(drop);
    assert!(matches!(res, Err(Error::Locked { .. })), "written while read: {res:?}");
    drop((first, second));
    let _writer = Store::builder().cell(&W).open(dir.path())?;
    assert_eq!(W.get(), 7);
    Ok(())
}

#[test]
fn read_only_refuses_what_holds_no_store_and_creates_nothing() -> TestResult {
    static C: StateCell<u8> = StateCell::new("it::read_only::none::C", || 0);
    let tmp = tempfile::tempdir()?;
    let missing = tmp.path().join("missing");
    let foreign = tmp.path().join("foreign");
    fs::create_dir(&foreign)?;
    fs::write(foreign.join("notes.txt"), b"mine")?;
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty)?;
    for dir in [&missing, &foreign, &empty] {
        let res = Store::builder().cell(&C).open_read_only(dir).map(drop);
        assert!(matches!(res, Err(Error::WrongDirectory { .. })), "{}: {res:?}", dir.display());
    }
    assert!(!missing.exists());
    assert_eq!(fs::read_dir(&empty)?.count(), 0);
    assert_eq!(fs::read_dir(&foreign)?.count(), 1);
    Ok(())
}

#[test]
fn a_lost_save_is_refused_read_only_as_it_is_read_write() -> TestResult {
    static DRAFT: StateCell<u32> = StateCell::new("it::read_only::lost::DRAFT", || 0);
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("store");
    {
        let store = Store::builder().cell(&DRAFT).open(&dir)?;
        DRAFT.set(1);
        store.save_all()?;
    }
    crate::compat::copy_dir(&dir.join("sled"), &tmp.path().join("sled-at-1"))?;
    {
        let store = Store::builder().cell(&DRAFT).open(&dir)?;
        DRAFT.set(2);
        store.save_all()?;
    }
    fs::remove_dir_all(dir.join("sled"))?;
    crate::compat::copy_dir(&tmp.path().join("sled-at-1"), &dir.join("sled"))?;
    let before = tree(&dir)?;
    let res = Store::builder().cell(&DRAFT).open_read_only(&dir).map(drop);
    match res {
        Err(Error::Corrupt { reason, .. }) => assert!(reason.contains("save 2"), "{reason}"),
        other => return Err(format!("a lost save read read-only gave {other:?}").into()),
    }
    assert!(tree(&dir)? == before, "a refused read-only open changed its directory");
    Ok(())
}

#[test]
fn a_journaled_cell_without_a_journal_yet_reads_as_its_initial_value() -> TestResult {
    static PLAIN: StateCell<u8> = StateCell::new("it::read_only::fresh::PLAIN", || 0);
    static FRESH: StateCell<Tally> = StateCell::with_options(
        "it::read_only::fresh::FRESH",
        || Tally(5),
        CellOptions::new().journaled(),
    );
    let dir = tempfile::tempdir()?;
    {
        let store = Store::builder().cell(&PLAIN).open(dir.path())?;
        PLAIN.set(1);
        store.save_all()?;
    }
    let before = tree(dir.path())?;
    let store = Store::builder().cell(&PLAIN).cell(&FRESH).open_read_only(dir.path())?;
    assert_eq!((PLAIN.get(), FRESH.get()), (1, Tally(5)));
    refused(FRESH.handle(1), "handle")?;
    refused(store.save_all(), "save_all")?;
    drop(store);
    assert!(tree(dir.path())? == before, "a read-only store made a journal");
    Ok(())
}

#[test]
fn a_directory_without_a_lock_file_still_keeps_readers_and_writers_apart() -> TestResult {
    static KEPT: StateCell<u8> = StateCell::new("it::read_only::nolock::KEPT", || 0);
    static R: StateCell<u8> = StateCell::new("it::read_only::nolock::R", || 0);
    let tmp = tempfile::tempdir()?;
    {
        let store = Store::builder().cell(&KEPT).open(tmp.path().join("live"))?;
        KEPT.set(3);
        store.save_all()?;
        store.backup_to(tmp.path().join("copy"))?;
    }
    // A copy of a store, as `backup_to` or a file copy makes it: no lock file yet.
    let copy = tmp.path().join("copy");
    let _ = fs::remove_file(copy.join("instastate.lock"));
    let reader = Store::builder().cell(&R).open_read_only(&copy)?;
    let res = Store::builder().cell(&KEPT).open(&copy).map(drop);
    assert!(matches!(res, Err(Error::Locked { .. })), "written while read: {res:?}");
    drop(reader);
    let writer = Store::builder().cell(&KEPT).open(&copy)?;
    assert_eq!(KEPT.get(), 3);
    fs::remove_file(copy.join("instastate.lock"))?;
    let res = Store::builder().cell(&R).open_read_only(&copy).map(drop);
    assert!(matches!(res, Err(Error::Locked { .. })), "read while written: {res:?}");
    drop(writer);
    Ok(())
}
