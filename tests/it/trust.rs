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

/// Copies the directory tree `from` to `to`.
fn copy_tree(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

#[test]
fn a_store_whose_engine_lost_its_last_save_is_refused_until_the_loss_is_accepted() -> TestResult {
    static DRAFT: StateCell<u32> = StateCell::new("trust::rollback::DRAFT", || 0);
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("store");
    {
        let store = Store::builder().cell(&DRAFT).open(&dir)?;
        for draft in 1..=2 {
            DRAFT.set(draft);
            store.save_all()?;
        }
    }
    // The engine as it was after save 2...
    copy_tree(&dir.join("sled"), &tmp.path().join("sled-at-2"))?;
    {
        let store = Store::builder().cell(&DRAFT).open(&dir)?;
        DRAFT.set(3);
        store.save_all()?;
    }
    // ... comes back, as a damaged log would make it: save 3 is gone.
    fs::remove_dir_all(dir.join("sled"))?;
    copy_tree(&tmp.path().join("sled-at-2"), &dir.join("sled"))?;
    DRAFT.set(0);
    let err = Store::builder().cell(&DRAFT).open(&dir).err().ok_or("a lost save went unnoticed")?;
    let instastate::Error::Corrupt { reason, .. } = &err else {
        return Err(format!("wrong error: {err:?}").into());
    };
    assert!(reason.contains("save 3"), "{err}");
    assert_eq!(DRAFT.get(), 0, "a refused open changes no cell");
    // Refused again: the refusal changed nothing on disk.
    assert!(Store::builder().cell(&DRAFT).open(&dir).is_err());
    {
        let store = Store::builder().cell(&DRAFT).accept_older_save().open(&dir)?;
        assert_eq!((DRAFT.get(), store.generation()), (2, 2));
        DRAFT.set(4);
        store.save_all()?;
    }
    let store = Store::builder().cell(&DRAFT).open(&dir)?;
    assert_eq!((DRAFT.get(), store.generation()), (4, 3));
    Ok(())
}

#[test]
fn a_store_whose_engine_holds_other_records_than_its_last_save_left_is_refused() -> TestResult {
    static NOTE: StateCell<String> = StateCell::new("trust::digest::NOTE", String::new);
    let tmp = tempfile::tempdir()?;
    let (ours, theirs) = (tmp.path().join("ours"), tmp.path().join("theirs"));
    for (dir, note) in [(&ours, "ours"), (&theirs, "theirs")] {
        let store = Store::builder().cell(&NOTE).open(dir)?;
        NOTE.set(note.into());
        store.save_all()?;
    }
    // Same generation, other records.
    fs::remove_dir_all(ours.join("sled"))?;
    copy_tree(&theirs.join("sled"), &ours.join("sled"))?;
    let err =
        Store::builder().cell(&NOTE).open(&ours).err().ok_or("other records went unnoticed")?;
    assert!(matches!(err, instastate::Error::Corrupt { .. }), "{err:?}");
    Ok(())
}

#[test]
fn a_crash_between_the_commit_and_the_witness_loses_nothing_and_refuses_nothing() -> TestResult {
    static COUNT: StateCell<u32> = StateCell::new("trust::lagging::COUNT", || 0);
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("store");
    {
        let store = Store::builder().cell(&COUNT).open(&dir)?;
        COUNT.set(1);
        store.save_all()?;
    }
    let witness = fs::read(dir.join("witness"))?;
    {
        let store = Store::builder().cell(&COUNT).open(&dir)?;
        COUNT.set(2);
        store.save_all()?;
    }
    // The witness as it was before save 2 was recorded in it.
    fs::write(dir.join("witness"), witness)?;
    let store = Store::builder().cell(&COUNT).open(&dir)?;
    assert_eq!((COUNT.get(), store.generation()), (2, 2));
    Ok(())
}

#[test]
fn a_missing_witness_is_refused_until_accepted() -> TestResult {
    static FLAG: StateCell<bool> = StateCell::new("trust::witness::FLAG", || false);
    let dir = tempfile::tempdir()?;
    {
        let store = Store::builder().cell(&FLAG).open(dir.path())?;
        FLAG.set(true);
        store.save_all()?;
    }
    fs::remove_file(dir.path().join("witness"))?;
    let res = Store::builder().cell(&FLAG).open(dir.path());
    assert!(matches!(res, Err(instastate::Error::Corrupt { .. })), "{res:?}");
    drop(Store::builder().cell(&FLAG).accept_older_save().open(dir.path())?);
    drop(Store::builder().cell(&FLAG).open(dir.path())?);
    Ok(())
}

#[test]
fn claims_of_many_cells_stay_small_keys_and_the_legacy_list_turns_into_them() -> TestResult {
    static KEPT: StateCell<u8> = StateCell::new("trust::claims::KEPT", || 1);
    let dir = tempfile::tempdir()?;
    {
        let store = Store::builder().cell(&KEPT).open(dir.path())?;
        store.save_all()?;
    }
    // What a store of format 2 held: one list of the names some program claimed,
    // among them one whose value is stored under no cell of this test.
    {
        let db = crate::bad_input::engine(dir.path())?;
        let mut list = b"IC".to_vec();
        list.extend_from_slice(&2u32.to_be_bytes());
        for name in ["trust::claims::KEPT", "trust::claims::ELSEWHERE"] {
            list.extend_from_slice(&u16::try_from(name.len())?.to_be_bytes());
            list.extend_from_slice(name.as_bytes());
        }
        let crc = crc32fast::hash(&list);
        list.extend_from_slice(&crc.to_be_bytes());
        db.insert("meta/claimed", list)?;
        db.remove("claim/trust::claims::KEPT")?;
        db.flush()?;
    }
    // The witness does not cover the claims: the store opens as it is.
    let tool = Store::builder().open(dir.path())?;
    assert!(tool.stored_cells().iter().all(|cell| cell.claimed));
    drop(tool);
    // Many cells: every claim is a key of its own, so no engine value grows with them.
    let many: Vec<&'static StateCell<u8>> = (0..6_000)
        .map(|n| {
            let name: &'static str = format!("trust::claims::MANY{n}").leak();
            &*Box::leak(Box::new(StateCell::new(name, || 0)))
        })
        .collect();
    let store = many.iter().fold(Store::builder().cell(&KEPT), |it, cell| it.cell(*cell));
    let store = store.open(dir.path())?;
    store.save_all()?;
    drop(store);
    let blobs = dir.path().join("sled/blobs");
    let n_blobs = if blobs.exists() { fs::read_dir(&blobs)?.count() } else { 0 };
    assert_eq!(n_blobs, 0, "an engine value grew past what sled keeps in its log");
    // The tool still sees every name some program claimed, the legacy ones too.
    let tool = Store::builder().open(dir.path())?;
    let stored = tool.stored_cells();
    assert_eq!(stored.len(), 6_001);
    assert!(stored.iter().all(|cell| cell.claimed));
    assert!(tool.verify()?.is_empty());
    Ok(())
}
