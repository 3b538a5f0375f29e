//! Saving, reloading and reopening: the everyday contract.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use instastate::{Error, StateCell, Store};

use crate::TestResult;

#[test]
fn saved_values_come_back_after_reopen() -> TestResult {
    static COUNT: StateCell<u64> = StateCell::new("save_reload::reopen::COUNT", || 150);
    static NAME: StateCell<String> = StateCell::new("save_reload::reopen::NAME", String::new);
    let dir = tempfile::tempdir()?;
    {
        let store = Store::builder().cell(&COUNT).cell(&NAME).open(dir.path())?;
        assert_eq!(COUNT.get(), 150, "a never-saved cell keeps its initial value");
        COUNT.set(1000);
        NAME.set("saved".into());
        store.save_all()?;
        COUNT.set(7);
        NAME.set("not saved".into());
    }
    let _store = Store::builder().cell(&COUNT).cell(&NAME).open(dir.path())?;
    assert_eq!(COUNT.get(), 1000);
    assert_eq!(NAME.get(), "saved");
    Ok(())
}

#[test]
fn reload_reverts_every_cell_to_the_last_save() -> TestResult {
    static A: StateCell<Vec<u32>> = StateCell::new("save_reload::revert::A", Vec::new);
    static B: StateCell<Option<String>> = StateCell::new("save_reload::revert::B", || None);
    let store = Store::builder().cell(&A).cell(&B).in_memory()?;
    A.set(vec![1, 2, 3]);
    B.set(Some("b".into()));
    store.save_all()?;
    A.write().push(4);
    B.set(None);
    store.reload_all()?;
    assert_eq!(A.get(), [1, 2, 3]);
    assert_eq!(B.get().as_deref(), Some("b"));
    Ok(())
}

#[test]
fn reload_with_a_never_saved_cell_fails_and_changes_nothing() -> TestResult {
    static SAVED: StateCell<u8> = StateCell::new("save_reload::strict::SAVED", || 1);
    static LATE: StateCell<u8> = StateCell::new("save_reload::strict::LATE", || 2);
    let dir = tempfile::tempdir()?;
    {
        let store = Store::builder().cell(&SAVED).open(dir.path())?;
        store.save_all()?;
    }
    let store = Store::builder().cell(&SAVED).cell(&LATE).open(dir.path())?;
    SAVED.set(10);
    LATE.set(20);
    let err = store.reload_all().err().ok_or("reload of a never-saved cell succeeded")?;
    assert!(
        matches!(&err, Error::NeverSaved { cell, .. } if cell == "save_reload::strict::LATE"),
        "{err:?}"
    );
    assert!(err.to_string().contains("save_reload::strict::LATE"), "{err}");
    assert_eq!((SAVED.get(), LATE.get()), (10, 20), "a failed reload changed a cell");
    store.save_all()?;
    store.reload_all()?;
    assert_eq!((SAVED.get(), LATE.get()), (10, 20));
    Ok(())
}

#[test]
fn a_save_writes_only_what_changed() -> TestResult {
    static BIG: StateCell<Vec<u64>> = StateCell::new("save_reload::incremental::BIG", Vec::new);
    static SMALL: StateCell<u64> = StateCell::new("save_reload::incremental::SMALL", || 0);
    let dir = tempfile::tempdir()?;
    let values = dir.path().join("values");
    let value_files = || -> TestResult<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&values)? {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    };
    let store = Store::builder().cell(&BIG).cell(&SMALL).keep_history(1).open(dir.path())?;
    BIG.set((0..100_000).collect());
    store.save_all()?;
    let first = value_files()?;
    assert_eq!(first.len(), 1, "the large value has a value file of its own: {first:?}");

    SMALL.set(5);
    store.save_all()?;
    assert_eq!(value_files()?, first, "an unchanged large cell was written again");

    BIG.write().push(1);
    store.save_all()?;
    let second = value_files()?;
    assert_eq!(second.len(), 2, "the kept save holds the replaced value: {second:?}");
    assert!(second.iter().any(|name| first.contains(name)), "the old value file is gone");
    assert!(
        second.iter().any(|name| !first.contains(name)),
        "a changed large cell was not written"
    );

    // The next save prunes the save that replaced it, and with it the old file.
    SMALL.set(6);
    store.save_all()?;
    let third = value_files()?;
    assert_eq!(third.len(), 1, "the pruned value file was not deleted: {third:?}");
    assert_ne!(third, first, "the new value file was deleted instead of the old one");
    SMALL.set(5);
    store.save_all()?;
    drop(store);

    BIG.set(Vec::new());
    let _store = Store::builder().cell(&BIG).cell(&SMALL).open(dir.path())?;
    assert_eq!(BIG.read().len(), 100_001);
    assert_eq!(SMALL.get(), 5);
    Ok(())
}

/// The bytes of every file under `dir`, by path.
pub(crate) fn file_bytes(dir: &Path) -> TestResult<BTreeMap<PathBuf, Vec<u8>>> {
    let mut files = BTreeMap::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                let bytes = fs::read(&path)?;
                files.insert(path, bytes);
            }
        }
    }
    Ok(files)
}

#[test]
fn a_save_with_nothing_changed_writes_nothing() -> TestResult {
    static VALUE: StateCell<u64> = StateCell::new("save_reload::idle::VALUE", || 3);
    let dir = tempfile::tempdir()?;
    let store = Store::builder().cell(&VALUE).open(dir.path())?;
    store.save_all()?;
    // Every byte of every file, so that any write shows, whatever the clock says.
    let files = file_bytes(dir.path())?;
    let (generation, kept) = (store.generation(), store.history().len());
    store.save_all()?;
    let _read = VALUE.get();
    store.save_all()?;
    assert_eq!(
        (store.generation(), store.history().len()),
        (generation, kept),
        "an idle save made a generation"
    );
    let after = file_bytes(dir.path())?;
    let changed: BTreeSet<&PathBuf> = files
        .keys()
        .chain(after.keys())
        .filter(|path| files.get(*path) != after.get(*path))
        .collect();
    assert!(changed.is_empty(), "an idle save wrote, created or deleted {changed:?}");
    Ok(())
}

#[test]
fn orphaned_values_are_kept_and_listed() -> TestResult {
    static OLD: StateCell<String> = StateCell::new("save_reload::orphans::OLD", String::new);
    static BIG_OLD: StateCell<Vec<u8>> = StateCell::new("save_reload::orphans::BIG", Vec::new);
    static NEW: StateCell<String> = StateCell::new("save_reload::orphans::NEW", String::new);
    let dir = tempfile::tempdir()?;
    {
        let store = Store::builder().cell(&OLD).cell(&BIG_OLD).open(dir.path())?;
        OLD.set("keep me".into());
        BIG_OLD.set(vec![9; 64 * 1024]);
        store.save_all()?;
    }
    {
        let store = Store::builder().cell(&NEW).open(dir.path())?;
        assert_eq!(store.orphans(), ["save_reload::orphans::BIG", "save_reload::orphans::OLD"]);
        store.save_all()?;
    }
    OLD.set(String::new());
    BIG_OLD.set(Vec::new());
    let store = Store::builder().cell(&OLD).cell(&BIG_OLD).cell(&NEW).open(dir.path())?;
    assert!(store.orphans().is_empty());
    assert_eq!(OLD.get(), "keep me", "an orphan's value was lost");
    assert_eq!(BIG_OLD.read().len(), 64 * 1024, "an orphan's value file was deleted");
    Ok(())
}

#[test]
fn two_cells_with_one_name_are_refused_naming_both() -> TestResult {
    static FIRST: StateCell<u32> = StateCell::new("save_reload::same", || 1);
    static SECOND: StateCell<String> = StateCell::new("save_reload::same", String::new);
    let err = Store::builder().cell(&FIRST).cell(&SECOND).in_memory().err().ok_or("accepted")?;
    let Error::DuplicateName { name, first, second, .. } = &err else { panic!("{err:?}") };
    assert_eq!(name, "save_reload::same");
    assert!(first.contains("u32") && second.contains("String"), "{err}");
    // The same cell listed twice is one cell, not a duplicate.
    let store = Store::builder().cell(&FIRST).cell(&FIRST).in_memory()?;
    store.save_all()?;
    Ok(())
}

#[test]
fn save_and_reload_inside_atomically_are_refused() -> TestResult {
    static CELL: StateCell<u8> = StateCell::new("save_reload::nested::CELL", || 0);
    let store = Store::builder().cell(&CELL).in_memory()?;
    let (saved, reloaded) = instastate::atomically(|| (store.save_all(), store.reload_all()));
    assert!(
        matches!(saved, Err(Error::InsideAtomically { operation: "save_all", .. })),
        "{saved:?}"
    );
    assert!(
        matches!(reloaded, Err(Error::InsideAtomically { operation: "reload_all", .. })),
        "{reloaded:?}"
    );
    store.save_all()?;
    Ok(())
}

#[test]
fn many_kinds_of_values_round_trip() -> TestResult {
    #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
    enum Shape {
        Circle { radius: f64 },
        Polygon(Vec<(i32, i32)>),
        Nothing,
    }
    static MAP: StateCell<BTreeMap<String, Shape>> =
        StateCell::new("save_reload::kinds::MAP", BTreeMap::new);
    static TEXT: StateCell<String> = StateCell::new("save_reload::kinds::TEXT", String::new);
    static NEGATIVE: StateCell<i128> = StateCell::new("save_reload::kinds::NEGATIVE", || 0);
    let dir = tempfile::tempdir()?;
    let map = BTreeMap::from([
        ("c".to_owned(), Shape::Circle { radius: 1.5 }),
        ("p".to_owned(), Shape::Polygon(vec![(0, 0), (-1, 5)])),
        ("n".to_owned(), Shape::Nothing),
    ]);
    {
        let store = Store::builder().cell(&MAP).cell(&TEXT).cell(&NEGATIVE).open(dir.path())?;
        MAP.set(map.clone());
        TEXT.set("ünïcødé ✓".repeat(1000));
        NEGATIVE.set(i128::MIN);
        store.save_all()?;
    }
    MAP.set(BTreeMap::new());
    TEXT.set(String::new());
    NEGATIVE.set(0);
    let _store = Store::builder().cell(&MAP).cell(&TEXT).cell(&NEGATIVE).open(dir.path())?;
    assert_eq!(MAP.get(), map);
    assert_eq!(TEXT.get(), "ünïcødé ✓".repeat(1000));
    assert_eq!(NEGATIVE.get(), i128::MIN);
    Ok(())
}

#[test]
fn stores_in_memory_are_independent_of_each_other() -> TestResult {
    static ONE: StateCell<u8> = StateCell::new("save_reload::independent::ONE", || 0);
    static TWO: StateCell<u8> = StateCell::new("save_reload::independent::TWO", || 0);
    let first = Store::builder().cell(&ONE).in_memory()?;
    let second = Store::builder().cell(&TWO).in_memory()?;
    ONE.set(1);
    TWO.set(2);
    first.save_all()?;
    second.save_all()?;
    ONE.set(10);
    TWO.set(20);
    first.reload_all()?;
    assert_eq!((ONE.get(), TWO.get()), (1, 20), "reloading one store touched the other's cell");
    Ok(())
}

#[test]
fn a_loaded_cell_never_runs_its_initializer() -> TestResult {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    fn init() -> String {
        RUNS.fetch_add(1, Ordering::Relaxed);
        "initial".to_owned()
    }
    static WRITER: StateCell<String> = StateCell::new("save_reload::lazy", String::new);
    static LAZY: StateCell<String> = StateCell::new("save_reload::lazy", init);
    let dir = tempfile::tempdir()?;
    {
        let store = Store::builder().cell(&WRITER).open(dir.path())?;
        WRITER.set("saved".into());
        store.save_all()?;
    }
    let _store = Store::builder().cell(&LAZY).open(dir.path())?;
    assert_eq!(LAZY.get(), "saved");
    assert_eq!(RUNS.load(Ordering::Relaxed), 0, "the initializer ran although a value was loaded");
    Ok(())
}

#[test]
fn a_save_may_run_while_its_thread_holds_a_read_guard() -> TestResult {
    static CELL: StateCell<u64> = StateCell::new("save_reload::guard::CELL", || 1);
    let store = Store::builder().cell(&CELL).in_memory()?;
    std::thread::scope(|scope| -> TestResult {
        let guard = CELL.read();
        // A writer queues for the lock; the save must not queue behind it.
        let writer = scope.spawn(|| CELL.set(2));
        std::thread::sleep(std::time::Duration::from_millis(50));
        store.save_all()?;
        assert_eq!(*guard, 1);
        drop(guard);
        writer.join().map_err(|_| "writer panicked")?;
        Ok(())
    })?;
    store.reload_all()?;
    assert_eq!(CELL.get(), 1, "the save did not take the value seen under the guard");
    Ok(())
}

/// A reload (or a revert) waits for a cell that a thread reads, without holding
/// what that thread may wait for next: the store (a save) or the gate (an
/// `atomically` block). Both orders finish; before, the reload held both while
/// it waited for the cell, and every store of the process stopped with them.
#[test]
fn a_reload_waits_for_a_read_guard_whose_thread_saves_or_runs_atomically() -> TestResult {
    const PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);
    static FIRST: StateCell<u64> = StateCell::new("save_reload::reload_guard::FIRST", || 1);
    static SECOND: StateCell<u64> = StateCell::new("save_reload::reload_guard::SECOND", || 1);
    let store = Store::builder().cell(&FIRST).cell(&SECOND).in_memory()?;
    store.save_all()?;
    for atomic in [false, true] {
        SECOND.set(5);
        let (done, finished) = std::sync::mpsc::channel();
        let (held, guarded) = std::sync::mpsc::channel();
        // A thread reads `FIRST`, then saves (or runs `atomically`) with the
        // guard still held; meanwhile another reloads.
        let saving = store.clone();
        let reader_done = done.clone();
        let reader = std::thread::spawn(move || {
            let guard = FIRST.read();
            let _ = held.send(());
            // Time for the reload to find the cell held (the test passes either way).
            std::thread::sleep(std::time::Duration::from_millis(50));
            let saved = if atomic {
                instastate::atomically(|| SECOND.update(|it| *it += 1));
                Ok(())
            } else {
                saving.save_all()
            };
            drop(guard);
            let _ = reader_done.send(saved);
        });
        guarded.recv_timeout(PATIENCE).map_err(|_| "the reader did not start")?;
        let reloading = store.clone();
        let reload = std::thread::spawn(move || {
            let _ = done.send(reloading.reload_all());
        });
        for _ in 0..2 {
            let finished = finished
                .recv_timeout(PATIENCE)
                .map_err(|_| format!("the reload and the save are stuck (atomically: {atomic})"))?;
            finished?;
        }
        reader.join().map_err(|_| "the reader panicked")?;
        reload.join().map_err(|_| "the reload panicked")?;
        // A save ran first (it took what `SECOND` held) or the reload did (it
        // brought back the last save's value).
        let second = SECOND.get();
        assert!([1, 5, 6].contains(&second), "atomically: {atomic}, second: {second}");
    }
    Ok(())
}

/// A save on a thread holding a read guard that an `atomically` block on another
/// thread waits for would wait for that block forever (the block waits for the
/// guard): it is refused, naming the cell, and saves nothing. Without a save of
/// its own, the guard's thread can still use the store while another thread's
/// save waits for the block: that save waits without holding the store.
#[test]
fn a_save_that_would_wait_for_a_block_that_waits_for_its_guard_is_refused() -> TestResult {
    use std::{sync::mpsc, thread, time::Duration};
    const PATIENCE: Duration = Duration::from_secs(30);
    static HELD: StateCell<u64> = StateCell::new("save_reload::guard_held::HELD", || 1);
    static OTHER: StateCell<u64> = StateCell::new("save_reload::guard_held::OTHER", || 1);
    let store = Store::builder().cell(&HELD).cell(&OTHER).in_memory()?;
    store.save_all()?;
    let before = store.generation();

    // Starts a block that changes `OTHER`, then waits for `HELD`.
    let start_block = || -> Result<thread::JoinHandle<()>, String> {
        let (entered, inside) = mpsc::channel();
        let block = thread::spawn(move || {
            instastate::atomically(|| {
                OTHER.update(|it| *it += 1);
                let _ = entered.send(());
                HELD.update(|it| *it += 1);
            });
        });
        inside.recv_timeout(PATIENCE).map_err(|_| "the block did not start")?;
        Ok(block)
    };

    // The guard's own thread saves: refused rather than stuck.
    let (done, finished) = mpsc::channel();
    let saving = store.clone();
    let holder = thread::spawn(move || -> Result<thread::JoinHandle<()>, String> {
        let guard = HELD.read();
        let block = start_block()?;
        let _ = done.send(saving.save_all());
        drop(guard);
        Ok(block)
    });
    let refused = finished.recv_timeout(PATIENCE).map_err(|_| "the save is stuck")?;
    match refused {
        Err(Error::GuardHeld { cell, operation: "save_all", .. }) => {
            assert_eq!(cell, "save_reload::guard_held::HELD");
        }
        other => return Err(format!("the save was not refused: {other:?}").into()),
    }
    let block = holder.join().map_err(|_| "the holder panicked")??;
    block.join().map_err(|_| "the block panicked")?;
    assert_eq!(store.generation(), before, "the refused save saved something");
    assert_eq!((HELD.get(), OTHER.get()), (2, 2));

    // Another thread's save waits for the block; the guard's thread reads the
    // store's history meanwhile, then lets the guard go, and both go on.
    let (done, finished) = mpsc::channel();
    let (reading, read) = mpsc::channel();
    let (saving, looking) = (store.clone(), store.clone());
    let holder = thread::spawn(move || -> Result<thread::JoinHandle<()>, String> {
        let guard = HELD.read();
        let block = start_block()?;
        let saver = thread::spawn(move || {
            let _ = done.send(saving.save_all());
        });
        // Time for the save to wait for the block (the test passes either way).
        thread::sleep(Duration::from_millis(100));
        let _ = reading.send(looking.history().len());
        drop(guard);
        saver.join().map_err(|_| "the saver panicked")?;
        Ok(block)
    });
    read.recv_timeout(PATIENCE).map_err(|_| "the history is stuck behind the save")?;
    finished.recv_timeout(PATIENCE).map_err(|_| "the save is stuck")??;
    let block = holder.join().map_err(|_| "the holder panicked")??;
    block.join().map_err(|_| "the block panicked")?;
    store.save_all()?;
    store.reload_all()?;
    assert_eq!((HELD.get(), OTHER.get()), (3, 3), "a save split the block");
    Ok(())
}
