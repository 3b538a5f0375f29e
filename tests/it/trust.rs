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

// ---------------------------------------------------------------------------------
// Journals
// ---------------------------------------------------------------------------------

fn add(total: &mut u64, n: u64, _: instastate::Timestamp) -> u64 {
    *total += n;
    *total
}

/// The journal files of the directory `dir`, in order.
fn journal_files(dir: &std::path::Path) -> TestResult<Vec<std::path::PathBuf>> {
    let mut files: Vec<_> = fs::read_dir(dir)?
        .map(|entry| entry.map(|entry| entry.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|path| path.extension().is_some_and(|it| it == "log"));
    files.sort();
    Ok(files)
}

/// Forgets that the journal in `dir` was closed cleanly, as a process that died
/// with it open would have left it.
fn as_if_crashed(dir: &std::path::Path) -> TestResult {
    fs::remove_file(dir.join("instastate.lock"))?;
    Ok(())
}

fn is_corrupt(res: &instastate::Result<instastate::Prevayler<u64, u64, u64>>) -> bool {
    matches!(res, Err(instastate::Error::JournalCorrupt { .. }))
}

#[test]
fn a_deleted_newest_journal_file_is_found_out_after_a_clean_close_or_a_crash() -> TestResult {
    for crash in [false, true] {
        let dir = tempfile::tempdir()?;
        {
            let sum = instastate::Prevayler::open(dir.path(), 0u64, add)?;
            for n in 1..=7 {
                sum.handle(n)?;
                if n == 3 || n == 5 {
                    sum.snapshot()?;
                }
            }
        }
        let files = journal_files(dir.path())?;
        assert!(files.len() >= 2, "{files:?}");
        if crash {
            as_if_crashed(dir.path())?;
        }
        fs::remove_file(files.last().ok_or("no journal file")?)?;
        let res = instastate::Prevayler::open(dir.path(), 0u64, add);
        assert!(is_corrupt(&res), "crash {crash}: {res:?}");
    }
    Ok(())
}

#[test]
fn a_journal_whose_every_file_is_gone_is_found_out() -> TestResult {
    let dir = tempfile::tempdir()?;
    {
        let sum = instastate::Prevayler::open(dir.path(), 0u64, add)?;
        sum.handle(5)?;
    }
    for file in journal_files(dir.path())? {
        fs::remove_file(file)?;
    }
    let res = instastate::Prevayler::open(dir.path(), 0u64, add);
    assert!(is_corrupt(&res), "{res:?}");
    Ok(())
}

#[test]
fn damage_to_the_last_event_is_damage_not_a_torn_write() -> TestResult {
    // A flipped byte in the last frame, after a clean close or a crash; and the file
    // cut by a byte after a clean close (after a crash that is a torn write).
    for (crash, cut) in [(false, false), (true, false), (false, true)] {
        let dir = tempfile::tempdir()?;
        {
            let sum = instastate::Prevayler::open(dir.path(), 0u64, add)?;
            for n in 1..=3 {
                sum.handle(n)?;
            }
        }
        let last = journal_files(dir.path())?.pop().ok_or("no journal file")?;
        let mut bytes = fs::read(&last)?;
        if cut {
            bytes.pop();
        } else {
            let end = bytes.len() - 2;
            *bytes.get_mut(end).ok_or("empty journal")? ^= 0x01;
        }
        fs::write(&last, bytes)?;
        if crash {
            as_if_crashed(dir.path())?;
        }
        let res = instastate::Prevayler::open(dir.path(), 0u64, add);
        assert!(is_corrupt(&res), "crash {crash}, cut {cut}: {res:?}");
    }
    Ok(())
}

#[test]
fn a_damaged_version_field_is_damage_and_a_damaged_snapshot_falls_back() -> TestResult {
    let dir = tempfile::tempdir()?;
    {
        let sum = instastate::Prevayler::open(dir.path(), 0u64, add)?;
        for n in 1..=6 {
            sum.handle(n)?;
            if n % 3 == 0 {
                sum.snapshot()?;
            }
        }
    }
    let mut snapshots: Vec<_> = fs::read_dir(dir.path())?
        .map(|entry| entry.map(|entry| entry.path()))
        .collect::<Result<_, _>>()?;
    snapshots.retain(|path| path.extension().is_some_and(|it| it == "snap"));
    snapshots.sort();
    let newest = snapshots.last().ok_or("no snapshot")?;
    for at in 8..12 {
        let mut bytes = fs::read(newest)?;
        *bytes.get_mut(at).ok_or("short snapshot")? ^= 0xfe;
        let copy = tempfile::tempdir()?;
        for entry in fs::read_dir(dir.path())? {
            let entry = entry?;
            fs::copy(entry.path(), copy.path().join(entry.file_name()))?;
        }
        fs::write(copy.path().join(newest.file_name().ok_or("no name")?), bytes)?;
        for recovery in
            [instastate::prevalence::Recovery::Strict, instastate::prevalence::Recovery::Salvage]
        {
            let sum =
                instastate::Prevayler::builder().recovery(recovery).open(copy.path(), 0u64, add)?;
            assert_eq!(sum.read(|total| *total), 21, "byte {at}, {recovery:?}");
            assert_eq!(sum.recovered().unsound_snapshots().len(), 1);
        }
    }
    // The same damage in a journal file's header is damage, not another format.
    let last = journal_files(dir.path())?.pop().ok_or("no journal file")?;
    let mut bytes = fs::read(&last)?;
    *bytes.get_mut(9).ok_or("short journal")? ^= 0xfe;
    fs::write(&last, bytes)?;
    let res = instastate::Prevayler::open(dir.path(), 0u64, add);
    assert!(is_corrupt(&res), "{res:?}");
    Ok(())
}

// ---------------------------------------------------------------------------------
// Exclusivity
// ---------------------------------------------------------------------------------

#[test]
fn one_lock_keeps_a_store_and_a_journal_out_of_each_others_directory() -> TestResult {
    let (store_dir, journal_dir) = (tempfile::tempdir()?, tempfile::tempdir()?);
    {
        let store = Store::builder().open(store_dir.path())?;
        // Open, it is refused to a journal, and locked against another store.
        let res = instastate::Prevayler::open(store_dir.path(), 0u64, add);
        assert!(matches!(res, Err(instastate::Error::WrongDirectory { .. })), "{res:?}");
        let res = Store::builder().open(store_dir.path());
        assert!(matches!(res, Err(instastate::Error::Locked { .. })), "{res:?}");
        drop(store);
    }
    let res = instastate::Prevayler::open(store_dir.path(), 0u64, add);
    assert!(matches!(res, Err(instastate::Error::WrongDirectory { .. })), "{res:?}");
    {
        let sum = instastate::Prevayler::open(journal_dir.path(), 0u64, add)?;
        sum.handle(1)?;
        let res = Store::builder().open(journal_dir.path());
        assert!(matches!(res, Err(instastate::Error::WrongDirectory { .. })), "{res:?}");
        let res = instastate::Prevayler::open(journal_dir.path(), 0u64, add);
        assert!(matches!(res, Err(instastate::Error::Locked { .. })), "{res:?}");
    }
    let res = Store::builder().open(journal_dir.path());
    assert!(matches!(res, Err(instastate::Error::WrongDirectory { .. })), "{res:?}");
    Ok(())
}

#[test]
fn the_empty_path_a_file_and_a_directory_of_other_files_are_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("notes.txt");
    fs::write(&file, b"mine")?;
    let wrong = |res: instastate::Result<Store>| {
        matches!(res, Err(instastate::Error::WrongDirectory { .. }))
    };
    assert!(wrong(Store::builder().open("")));
    assert!(wrong(Store::builder().open(&file)));
    // A directory holding something else does not quietly become a store, and is
    // left as it was.
    assert!(wrong(Store::builder().open(dir.path())));
    let left: Vec<_> = fs::read_dir(dir.path())?.collect::<Result<_, _>>()?;
    assert_eq!(left.len(), 1, "a refused open changed the directory: {left:?}");
    let res = instastate::Prevayler::open(dir.path(), 0u64, add);
    assert!(matches!(res, Err(instastate::Error::WrongDirectory { .. })), "{res:?}");
    // An empty directory becomes one.
    let empty = tempfile::tempdir()?;
    drop(Store::builder().open(empty.path())?);
    Ok(())
}

#[test]
fn a_cell_is_open_in_one_store_at_a_time() -> TestResult {
    static SHARED: StateCell<u32> = StateCell::new("trust::in_use::SHARED", || 0);
    let first = Store::builder().cell(&SHARED).in_memory()?;
    let dir = tempfile::tempdir()?;
    let res = Store::builder().cell(&SHARED).open(dir.path());
    assert!(
        matches!(res, Err(instastate::Error::CellInUse { ref cell, .. }) if cell == SHARED.name())
    );
    // The refused open left the directory unlocked and made no store there.
    assert!(!Store::exists(dir.path()));
    drop(first);
    drop(Store::builder().cell(&SHARED).open(dir.path())?);
    Ok(())
}

// ---------------------------------------------------------------------------------
// Types whose structure changed under the same name
// ---------------------------------------------------------------------------------

mod before {
    #[derive(serde::Serialize, serde::Deserialize, Default)]
    pub(crate) struct S {
        pub(crate) offset: i32,
    }
}

mod after {
    #[derive(serde::Serialize, serde::Deserialize, Default)]
    pub(crate) struct S {
        pub(crate) offset: u32,
    }
}

/// Renames the state type of the journal file or snapshot `bytes` (whose layout
/// ARCHITECTURE.md gives) from `from` to `to`, and mends its header's checksum: what
/// the file would hold had the program's type kept its name and changed its fields.
fn rename_state_type(bytes: &[u8], snapshot: bool, to: &str) -> TestResult<Vec<u8>> {
    let take = |at: usize, n: usize| bytes.get(at..at + n).ok_or("short header");
    let u16_at = |at: usize| -> TestResult<usize> {
        Ok(usize::from(u16::from_le_bytes(take(at, 2)?.try_into()?)))
    };
    let u32_at = |at: usize| -> TestResult<usize> {
        Ok(usize::try_from(u32::from_le_bytes(take(at, 4)?.try_into()?))?)
    };
    let name_at = 8 + 4 + 1 + 8 + 8;
    let state_len = u16_at(name_at)?;
    let after_state = name_at + 2 + state_len;
    let event_len = u16_at(after_state)?;
    // The state's and the events' schema versions (format 3).
    let mut at = after_state + 2 + event_len + 4 + 4;
    at += if snapshot { 8 + 4 } else { 4 + u32_at(at)? };
    at += 4 + u32_at(at)?;
    at += 4 + u32_at(at)?;
    let mut out = take(0, name_at)?.to_vec();
    out.extend_from_slice(&u16::try_from(to.len())?.to_le_bytes());
    out.extend_from_slice(to.as_bytes());
    out.extend_from_slice(take(after_state, at - after_state)?);
    out.extend_from_slice(&crc32fast::hash(&out).to_le_bytes());
    out.extend_from_slice(bytes.get(at + 4..).ok_or("short file")?);
    Ok(out)
}

#[test]
fn a_journal_of_a_type_whose_fields_changed_under_the_same_name_is_refused() -> TestResult {
    let apply = |state: &mut before::S, by: i32, _: instastate::Timestamp| state.offset += by;
    let dir = tempfile::tempdir()?;
    {
        let journal = instastate::Prevayler::open(dir.path(), before::S::default(), apply)?;
        journal.handle(-1)?;
        journal.snapshot()?;
        journal.handle(-1)?;
    }
    for entry in fs::read_dir(dir.path())? {
        let path = entry?.path();
        let snapshot = path.extension().is_some_and(|it| it == "snap");
        if snapshot || path.extension().is_some_and(|it| it == "log") {
            let renamed =
                rename_state_type(&fs::read(&path)?, snapshot, std::any::type_name::<after::S>())?;
            fs::write(&path, renamed)?;
        }
    }
    let apply = |state: &mut after::S, by: i32, _: instastate::Timestamp| {
        state.offset = state.offset.wrapping_add_signed(by);
    };
    let err = instastate::Prevayler::open(dir.path(), after::S::default(), apply)
        .err()
        .ok_or("a changed field went unnoticed")?;
    let instastate::Error::JournalType { changes, .. } = &err else {
        return Err(format!("wrong error: {err:?}").into());
    };
    assert!(
        changes.iter().any(|it| it.contains("offset") && it.contains("i32") && it.contains("u32")),
        "{err}"
    );
    assert!(err.to_string().contains("offset"), "{err}");
    Ok(())
}

// ---------------------------------------------------------------------------------
// Saving a journaled cell from any thread at any time
// ---------------------------------------------------------------------------------

#[derive(Default, serde::Serialize, serde::Deserialize)]
struct Tally(u64);

impl instastate::Prevalent for Tally {
    type Event = u64;
    type Output = u64;
    fn apply(&mut self, by: u64, _: instastate::Timestamp) -> u64 {
        self.0 += by;
        self.0
    }
}

#[test]
fn concurrent_saves_of_a_journaled_cell_all_succeed() -> TestResult {
    static TALLY: StateCell<Tally> = StateCell::with_options(
        "trust::concurrent::TALLY",
        Tally::default,
        instastate::CellOptions::new().journaled(),
    );
    let dir = tempfile::tempdir()?;
    let store = Store::builder().cell(&TALLY).open(dir.path())?;
    let failures = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| {
                for _ in 0..100 {
                    if let Err(err) = TALLY.handle(1) {
                        failures
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .push(err.to_string());
                    }
                }
            });
            scope.spawn(|| {
                for _ in 0..40 {
                    if let Err(err) = store.save_all() {
                        failures
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .push(err.to_string());
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
    assert!(failures.is_empty(), "{} failed: {:?}", failures.len(), failures.first());
    drop(store);
    TALLY.set(Tally::default());
    let _store = Store::builder().cell(&TALLY).open(dir.path())?;
    assert_eq!(TALLY.with(|it| it.0), 200);
    Ok(())
}

#[test]
fn saving_while_holding_a_journaled_cells_read_guard_does_not_deadlock() -> TestResult {
    static HELD: StateCell<Tally> = StateCell::with_options(
        "trust::guard::HELD",
        Tally::default,
        instastate::CellOptions::new().journaled(),
    );
    let dir = tempfile::tempdir()?;
    let store = Store::builder().cell(&HELD).open(dir.path())?;
    HELD.handle(1)?;
    let (done, finished) = std::sync::mpsc::channel();
    // Not scoped: if it deadlocks, the test fails and the stuck thread is left.
    std::thread::spawn(move || {
        let guard = HELD.read();
        // A writer queues behind the guard; a non-recursive read by this thread would
        // queue behind the writer, which waits for this thread's guard.
        let writer = std::thread::spawn(|| HELD.handle(1).map(drop).map_err(|err| err.to_string()));
        std::thread::sleep(std::time::Duration::from_millis(50));
        let saved = store.save_all().map_err(|err| err.to_string());
        drop(guard);
        let handled = writer.join().map_err(|_| "the writer panicked".to_owned()).and_then(|it| it);
        let _ = done.send(saved.and(handled));
    });
    let res = finished
        .recv_timeout(std::time::Duration::from_secs(10))
        .map_err(|_| "save_all deadlocked on a read guard its own thread holds")?;
    res?;
    assert_eq!(HELD.with(|it| it.0), 2);
    Ok(())
}

/// Renames the type of the record `bytes` (an unsealed record of format 3, whose
/// layout ARCHITECTURE.md gives) to `to`, and mends its checksum.
fn rename_record_type(bytes: &[u8], to: &str) -> TestResult<Vec<u8>> {
    let at = 2 + 2 + 4 + 8 + 8;
    let len = usize::from(u16::from_be_bytes(bytes.get(at..at + 2).ok_or("short")?.try_into()?));
    let mut out = bytes.get(..at).ok_or("short")?.to_vec();
    out.extend_from_slice(&u16::try_from(to.len())?.to_be_bytes());
    out.extend_from_slice(to.as_bytes());
    out.extend_from_slice(bytes.get(at + 2 + len..bytes.len() - 4).ok_or("short")?);
    out.extend_from_slice(&crc32fast::hash(&out).to_be_bytes());
    Ok(out)
}

#[test]
fn a_cell_whose_type_changed_its_fields_under_the_same_name_is_refused() -> TestResult {
    static BEFORE: StateCell<before::S> = StateCell::new("trust::shape::S", before::S::default);
    static AFTER: StateCell<after::S> = StateCell::new("trust::shape::S", after::S::default);
    let dir = tempfile::tempdir()?;
    {
        let store = Store::builder().cell(&BEFORE).open(dir.path())?;
        BEFORE.set(before::S { offset: -1 });
        store.save_all()?;
    }
    // What the store holds once the program keeps the type's name and changes its
    // field from `i32` to `u32`: the same record, under the new type's name.
    {
        let db = crate::bad_input::engine(dir.path())?;
        let key = "cell/trust::shape::S";
        let record = db.get(key)?.ok_or("no record")?;
        db.insert(key, rename_record_type(&record, std::any::type_name::<after::S>())?)?;
        db.flush()?;
    }
    let err = Store::builder().cell(&AFTER).open(dir.path()).err().ok_or("misread as 1")?;
    let instastate::Error::TypeMismatch { changes, .. } = &err else {
        return Err(format!("wrong error: {err:?}").into());
    };
    assert!(changes.iter().any(|it| it.contains("offset") && it.contains("i32")), "{err}");
    let message = err.to_string();
    assert!(message.contains("migrat") && message.contains("version"), "{message}");
    assert_eq!(AFTER.read().offset, 0, "a refused open changes no cell");
    Ok(())
}

#[test]
fn unreasonable_cell_names_are_refused_at_open() {
    static EMPTY: StateCell<u8> = StateCell::new("", || 0);
    static NUL: StateCell<u8> = StateCell::new("trust\0names::NUL", || 0);
    let long: &'static StateCell<u8> =
        Box::leak(Box::new(StateCell::new("x".repeat(70_000).leak(), || 0)));
    for res in [
        Store::builder().cell(&EMPTY).in_memory(),
        Store::builder().cell(&NUL).in_memory(),
        Store::builder().cell(long).in_memory(),
    ] {
        assert!(matches!(res, Err(instastate::Error::InvalidName { .. })), "{res:?}");
    }
}

#[test]
fn a_journaled_cell_whose_journal_directory_name_would_be_too_long_is_refused() -> TestResult {
    // 104 bytes as a plain name, 292 escaped: no file system takes that as a file name.
    static DOTTED: StateCell<Tally> = StateCell::with_options(
        "trust::names::..........................................................................................",
        Tally::default,
        instastate::CellOptions::new().journaled(),
    );
    let dir = tempfile::tempdir()?;
    let res = Store::builder().cell(&DOTTED).open(dir.path());
    let Err(instastate::Error::InvalidName { reason, .. }) = &res else {
        return Err(format!("expected InvalidName, got {res:?}").into());
    };
    assert!(reason.contains("journal directory") && reason.contains("255"), "{reason}");
    assert!(!dir.path().join("journals").exists(), "a refused open made a journal directory");
    Ok(())
}

// ---------------------------------------------------------------------------------
// Inspecting a journal without its types, and without changing it
// ---------------------------------------------------------------------------------

/// A journal of 10 events, a snapshot after the 6th, closed cleanly.
fn counted(dir: &std::path::Path) -> TestResult {
    let counter = instastate::Prevayler::open(dir, 0u64, add)?;
    for by in 1..=6 {
        counter.handle(by)?;
    }
    counter.snapshot()?;
    for by in 7..=10 {
        counter.handle(by)?;
    }
    counter.close()?;
    Ok(())
}

fn inspect(dir: &std::path::Path) -> instastate::Result<instastate::prevalence::JournalReport> {
    instastate::Prevayler::builder::<u64>().inspect(dir)
}

#[test]
fn inspecting_a_journal_reports_it_as_opening_would_and_changes_nothing() -> TestResult {
    let dir = tempfile::tempdir()?;
    counted(dir.path())?;
    let before = crate::save_reload::file_bytes(dir.path())?;
    let report = inspect(dir.path())?;
    assert_eq!((report.state_type.as_str(), report.event_type.as_str()), ("u64", "u64"));
    assert_eq!((report.events, report.snapshot, report.replayed), (10, Some(6), 4));
    assert!(report.closed_cleanly && report.torn_bytes == 0 && !report.encrypted);
    assert_eq!(inspect(dir.path())?, report, "a second look saw something else");
    assert_eq!(crate::save_reload::file_bytes(dir.path())?, before, "inspecting wrote");

    // While the journal is open, nobody inspects it; while inspected, nobody opens it.
    let open = instastate::Prevayler::open(dir.path(), 0u64, add)?;
    assert!(matches!(inspect(dir.path()), Err(instastate::Error::Locked { .. })));
    drop(open);
    Ok(())
}

#[test]
fn inspecting_finds_what_opening_refuses_and_leaves_a_torn_tail_in_place() -> TestResult {
    let dir = tempfile::tempdir()?;
    counted(dir.path())?;
    let journal = journal_files(dir.path())?.pop().ok_or("no journal file")?;
    // A clean close recorded where the journal ended: bytes after it are damage.
    let sound = fs::read(&journal)?;
    fs::write(&journal, [&sound[..], &[0x17, 0, 0]].concat())?;
    let inspected = inspect(dir.path());
    let opened = instastate::Prevayler::open(dir.path(), 0u64, add).map(drop);
    assert!(
        matches!(inspected, Err(instastate::Error::JournalCorrupt { .. })),
        "inspect: {inspected:?}"
    );
    assert!(matches!(opened, Err(instastate::Error::JournalCorrupt { .. })), "open: {opened:?}");

    // Without that record (a crash), the same bytes are a torn write: reported, not cut.
    fs::write(dir.path().join("instastate.lock"), b"")?;
    let torn = fs::read(&journal)?;
    let report = inspect(dir.path())?;
    assert_eq!((report.torn_bytes, report.events, report.closed_cleanly), (3, 10, false));
    assert_eq!(fs::read(&journal)?, torn, "inspecting cut the torn write");

    // A flipped byte in the middle of an event is damage either way.
    let mut flipped = sound.clone();
    let at = sound.len() - 12;
    if let Some(byte) = flipped.get_mut(at) {
        *byte ^= 0x40;
    }
    fs::write(&journal, flipped)?;
    assert!(matches!(inspect(dir.path()), Err(instastate::Error::JournalCorrupt { .. })));
    Ok(())
}

#[test]
fn inspecting_refuses_what_holds_no_journal_and_creates_nothing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let missing = dir.path().join("missing");
    assert!(matches!(inspect(&missing), Err(instastate::Error::WrongDirectory { .. })));
    assert!(!missing.exists(), "inspecting created the directory");
    assert!(matches!(inspect(dir.path()), Err(instastate::Error::WrongDirectory { .. })));
    drop(Store::builder().open(dir.path().join("store"))?);
    let store = inspect(&dir.path().join("store"));
    assert!(matches!(store, Err(instastate::Error::WrongDirectory { .. })), "{store:?}");
    Ok(())
}

#[test]
fn two_crashes_in_a_row_between_a_commit_and_its_witness_lose_nothing() -> TestResult {
    static LAST: StateCell<u32> = StateCell::new("trust::witness_behind::LAST", || 0);
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("store");
    let witness = dir.join("witness");
    let save = |value: u32| -> TestResult {
        let store = Store::builder().cell(&LAST).open(&dir)?;
        assert_eq!(LAST.get(), value - 1, "the last acknowledged save");
        LAST.set(value);
        store.save_all()?;
        Ok(())
    };
    for value in 1..=2 {
        save(value)?;
    }
    // Save 3 is committed, and the process dies before its witness is written.
    let before = fs::read(&witness)?;
    save(3)?;
    fs::write(&witness, &before)?;
    // The next run opens at save 3, commits save 4, and dies the same way.
    {
        let _store = Store::builder().cell(&LAST).open(&dir)?;
    }
    let before = fs::read(&witness)?;
    save(4)?;
    fs::write(&witness, &before)?;
    let _store = Store::builder().cell(&LAST).open(&dir)?;
    assert_eq!(LAST.get(), 4);
    Ok(())
}
