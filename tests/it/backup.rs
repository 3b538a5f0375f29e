//! Backups, export and import, pruning orphans and compaction.

use std::{
    fs,
    sync::atomic::{AtomicBool, Ordering},
    thread,
};

use instastate::{Error, StateCell, Store};

use crate::TestResult;

#[test]
fn a_backup_taken_during_concurrent_writes_and_saves_reopens_consistent() -> TestResult {
    // The invariant: every cell holds the same number, written in one `atomically`.
    static CELLS: [StateCell<u64>; 4] = [
        StateCell::new("backup::live::A", || 0),
        StateCell::new("backup::live::B", || 0),
        StateCell::new("backup::live::C", || 0),
        StateCell::new("backup::live::D", || 0),
    ];
    static BIG: StateCell<Vec<u64>> = StateCell::new("backup::live::BIG", Vec::new);
    fn builder() -> instastate::StoreBuilder {
        CELLS.iter().fold(Store::builder().cell(&BIG), instastate::StoreBuilder::cell)
    }
    fn consistent() -> Result<u64, String> {
        let first = CELLS.first().map_or(0, StateCell::get);
        for cell in &CELLS {
            if cell.get() != first {
                return Err(format!("{} = {}, A = {first}", cell.name(), cell.get()));
            }
        }
        if BIG.with(|big| big.len() != 6_000 || big.iter().any(|&it| it != first)) {
            return Err(format!("BIG does not hold {first}"));
        }
        Ok(first)
    }
    let dir = tempfile::tempdir()?;
    let store = builder().open(dir.path().join("live"))?;
    BIG.set(vec![0; 6_000]);
    store.save_all()?;
    let stop = AtomicBool::new(false);
    let backups = thread::scope(|scope| -> TestResult<Vec<std::path::PathBuf>> {
        scope.spawn(|| {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                instastate::atomically(|| {
                    for cell in &CELLS {
                        cell.set(n);
                    }
                    BIG.set(vec![n; 6_000]);
                });
            }
        });
        let saver = scope.spawn(|| -> instastate::Result<()> {
            while !stop.load(Ordering::Relaxed) {
                store.save_all()?;
            }
            Ok(())
        });
        let mut backups = Vec::new();
        for idx in 0..8 {
            let path = dir.path().join(format!("backup-{idx}"));
            store.backup_to(&path)?;
            backups.push(path);
        }
        stop.store(true, Ordering::Relaxed);
        saver.join().map_err(|_| "the saver panicked")??;
        Ok(backups)
    })?;
    drop(store);
    let mut seen = Vec::new();
    for path in &backups {
        let copy = builder().open(path)?;
        let number = consistent().map_err(|err| format!("{}: {err}", path.display()))?;
        assert!(copy.verify()?.is_empty(), "{} is not sound", path.display());
        assert!(!copy.history().is_empty(), "the history was not copied");
        seen.push(number);
    }
    assert!(seen.windows(2).all(|pair| pair.first() <= pair.get(1)), "{seen:?}");
    // A backup will not overwrite anything.
    let err = Store::builder().in_memory()?.backup_to(backups.first().ok_or("none")?).err();
    assert!(matches!(err, Some(Error::Io { .. })), "{err:?}");
    Ok(())
}

#[test]
fn export_and_import_move_a_snapshot_between_stores() -> TestResult {
    static TEXT: StateCell<String> = StateCell::new("backup::export::TEXT", String::new);
    static BIG: StateCell<Vec<u32>> = StateCell::new("backup::export::BIG", Vec::new);
    static UNTOUCHED: StateCell<u8> = StateCell::new("backup::export::UNTOUCHED", || 0);
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("snapshot.export");
    {
        let store = Store::builder().cell(&TEXT).cell(&BIG).open(dir.path().join("from"))?;
        TEXT.set("exported".into());
        BIG.set((0..50_000).collect());
        store.save_all()?;
        store.export_to(&file)?;
    }
    TEXT.set(String::new());
    BIG.set(Vec::new());
    UNTOUCHED.set(9);
    let store =
        Store::builder().cell(&TEXT).cell(&BIG).cell(&UNTOUCHED).open(dir.path().join("to"))?;
    store.save_all()?;
    store.import_from(&file)?;
    assert_eq!(TEXT.get(), "exported");
    assert_eq!(BIG.read().len(), 50_000);
    assert_eq!(UNTOUCHED.get(), 9, "a cell not in the file keeps its value");
    assert!(!store.has_unsaved_changes(), "an import is a save");
    assert!(store.verify()?.is_empty());
    // An import is a save like any other, so it can be undone.
    store.revert_to(1)?;
    assert_eq!(TEXT.get(), "");
    Ok(())
}

/// An export file whose checksum holds but whose content an export never has: a
/// cell named twice (which would leave the store two records for one save), bytes
/// after the last entry, an unknown encryption flag. Each is refused, naming what
/// is wrong, and the store is left as it was.
#[test]
fn a_well_formed_export_that_no_export_writes_is_refused_and_changes_nothing() -> TestResult {
    static DOUBLE: StateCell<u64> = StateCell::new("backup::double::DOUBLE", || 7);
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("double.export");
    let store = Store::builder().cell(&DOUBLE).open(dir.path().join("store"))?;
    store.save_all()?;
    store.export_to(&file)?;
    let good = fs::read(&file)?;
    // Magic (17 bytes), version (2), flag (1), generation (8), time (8), count
    // (4), the entries, and a CRC-32 of all that.
    let (head, rest) = good.split_at(36);
    let entries = rest.get(4..rest.len() - 4).ok_or("a short export")?;
    let sealed = |head: &[u8], count: u32, entries: &[&[u8]]| {
        let mut bytes = head.to_vec();
        bytes.extend_from_slice(&count.to_be_bytes());
        for entry in entries {
            bytes.extend_from_slice(entry);
        }
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_be_bytes());
        bytes
    };
    let mut flagged = head.to_vec();
    if let Some(flag) = flagged.get_mut(19) {
        *flag = 7;
    }
    let cases = [
        (sealed(head, 2, &[entries, entries]), "comes twice"),
        (sealed(head, 0, &[entries]), "follow its last entry"),
        (sealed(&flagged, 1, &[entries]), "encryption flag is 7"),
    ];
    DOUBLE.set(8);
    for (bytes, reason) in cases {
        fs::write(&file, bytes)?;
        match store.import_from(&file) {
            Err(err @ Error::BadExport { .. }) => {
                assert!(err.to_string().contains(reason), "{reason}: {err}");
            }
            other => return Err(format!("{reason}: expected BadExport, got {other:?}").into()),
        }
        assert_eq!((DOUBLE.get(), store.generation()), (8, 1), "{reason}: the store changed");
    }
    drop(store);
    let store = Store::builder().cell(&DOUBLE).open(dir.path().join("store"))?;
    assert_eq!((DOUBLE.get(), store.generation()), (7, 1));
    Ok(())
}

#[test]
fn a_damaged_or_foreign_export_file_is_refused_and_changes_nothing() -> TestResult {
    static VALUE: StateCell<u64> = StateCell::new("backup::bad_export::VALUE", || 1);
    static OTHER: StateCell<String> = StateCell::new("backup::bad_export::VALUE", String::new);
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("value.export");
    let store = Store::builder().cell(&VALUE).in_memory()?;
    store.save_all()?;
    store.export_to(&file)?;
    let good = fs::read(&file)?;

    VALUE.set(2);
    for offset in [0, 20, good.len() / 2, good.len() - 1] {
        let mut bad = good.clone();
        if let Some(byte) = bad.get_mut(offset) {
            *byte ^= 0x01;
        }
        fs::write(&file, &bad)?;
        let err = store.import_from(&file).err();
        assert!(matches!(err, Some(Error::BadExport { .. })), "offset {offset}: {err:?}");
    }
    fs::write(&file, good.get(..good.len() - 9).unwrap_or_default())?;
    assert!(matches!(store.import_from(&file), Err(Error::BadExport { .. })));
    fs::write(&file, b"not an export at all")?;
    let err = store.import_from(&file).err().ok_or("imported garbage")?;
    assert!(err.to_string().contains("not an instastate export"), "{err}");
    assert_eq!((VALUE.get(), store.generation()), (2, 1), "a refused import changed something");

    // A sound file whose value does not fit the cell is refused whole.
    fs::write(&file, &good)?;
    let other = Store::builder().cell(&OTHER).in_memory()?;
    let err = other.import_from(&file).err();
    assert!(matches!(err, Some(Error::TypeMismatch { .. })), "{err:?}");
    assert_eq!(other.generation(), 0);
    store.import_from(&file)?;
    assert_eq!(VALUE.get(), 1);
    Ok(())
}

#[test]
fn prune_orphans_deletes_unclaimed_values_as_an_undoable_save() -> TestResult {
    static KEPT: StateCell<u8> = StateCell::new("backup::orphans::KEPT", || 1);
    static GONE: StateCell<Vec<u64>> = StateCell::new("backup::orphans::GONE", Vec::new);
    let dir = tempfile::tempdir()?;
    {
        let store = Store::builder().cell(&KEPT).cell(&GONE).open(dir.path())?;
        GONE.set((0..10_000).collect());
        store.save_all()?;
    }
    let store = Store::builder().cell(&KEPT).open(dir.path())?;
    assert_eq!(store.orphans(), ["backup::orphans::GONE"]);
    assert_eq!(store.prune_orphans()?, ["backup::orphans::GONE"]);
    assert!(store.orphans().is_empty());
    assert_eq!(store.stored_cells().len(), 1);
    assert!(store.prune_orphans()?.is_empty());
    drop(store);
    // The pruned value survives in the history until that save is pruned.
    let store = Store::builder().cell(&KEPT).cell(&GONE).open(dir.path())?;
    GONE.set(Vec::new());
    store.revert_to(1)?;
    assert_eq!(GONE.read().len(), 10_000);
    Ok(())
}

#[test]
fn compaction_keeps_every_value_and_an_interrupted_one_is_finished_or_undone() -> TestResult {
    static N: StateCell<u64> = StateCell::new("backup::compact::N", || 0);
    let dir = tempfile::tempdir()?;
    {
        let store = Store::builder().cell(&N).open(dir.path())?;
        for n in 1..=500 {
            N.set(n);
            store.save_all()?;
        }
        store.compact()?;
        assert_eq!(store.stored_cells().len(), 1);
        N.set(501);
        store.save_all()?;
        assert!(store.verify()?.is_empty());
    }
    N.set(0);
    drop(Store::builder().cell(&N).open(dir.path())?);
    assert_eq!(N.get(), 501);

    // A crash while the new engine was being built: its directory is discarded.
    let engine = dir.path().join("sled");
    copy_tree(&engine, &dir.path().join("sled.new"))?;
    fs::write(dir.path().join("sled.new").join("db"), b"half written")?;
    N.set(0);
    drop(Store::builder().cell(&N).open(dir.path())?);
    assert_eq!(N.get(), 501);
    assert!(!dir.path().join("sled.new").exists());

    // A crash after the old engine moved away: the complete new one is put in place.
    fs::rename(&engine, dir.path().join("sled.new"))?;
    N.set(0);
    drop(Store::builder().cell(&N).open(dir.path())?);
    assert_eq!(N.get(), 501);
    Ok(())
}

fn copy_tree(from: &std::path::Path, to: &std::path::Path) -> TestResult {
    crate::compat::copy_dir(from, to)
}

#[test]
fn a_store_opened_over_fewer_cells_keeps_the_others_claimed() -> TestResult {
    static A: StateCell<u8> = StateCell::new("backup::subset::A", || 1);
    static B: StateCell<u8> = StateCell::new("backup::subset::B", || 2);
    let dir = tempfile::tempdir()?;
    {
        let store = Store::builder().cell(&A).cell(&B).open(dir.path())?;
        store.save_all()?;
    }
    {
        let store = Store::builder().cell(&A).open(dir.path())?;
        A.set(3);
        store.save_all()?;
    }
    // A tool opens the store without cells: B is someone's, not an orphan.
    let tool = Store::builder().open(dir.path())?;
    assert!(tool.prune_orphans()?.is_empty());
    assert!(tool.stored_cells().iter().all(|cell| cell.claimed));
    Ok(())
}

#[test]
fn export_refuses_a_damaged_value_and_a_half_compacted_store_still_exists() -> TestResult {
    static BIG: StateCell<Vec<u64>> = StateCell::new("backup::damaged_export::BIG", Vec::new);
    let dir = tempfile::tempdir()?;
    let store = Store::builder().cell(&BIG).open(dir.path().join("store"))?;
    BIG.set((0..10_000).collect());
    store.save_all()?;
    let file =
        fs::read_dir(dir.path().join("store/values"))?.next().ok_or("no value file")??.path();
    let mut bytes = fs::read(&file)?;
    if let Some(byte) = bytes.get_mut(100) {
        *byte ^= 1;
    }
    fs::write(&file, bytes)?;
    let err = store.export_to(dir.path().join("out.export")).err();
    assert!(matches!(err, Some(Error::Corrupt { .. })), "{err:?}");
    assert!(!dir.path().join("out.export").exists());
    drop(store);

    // Between the two renames of a compaction there is only `sled.new`.
    let root = dir.path().join("store");
    fs::rename(root.join("sled"), root.join("sled.new"))?;
    assert!(Store::exists(&root));
    Ok(())
}
