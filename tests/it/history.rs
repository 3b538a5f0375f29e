//! The history of saves: `history`, `revert_to`, and pruning.

use std::{fs, path::Path};

use instastate::{Error, StateCell, Store};

use crate::TestResult;

#[test]
fn revert_to_restores_every_cell_as_each_save_left_it() -> TestResult {
    static A: StateCell<u32> = StateCell::new("history::each::A", || 0);
    static B: StateCell<String> = StateCell::new("history::each::B", String::new);
    static BIG: StateCell<Vec<u64>> = StateCell::new("history::each::BIG", Vec::new);
    let dir = tempfile::tempdir()?;
    let store = Store::builder().cell(&A).cell(&B).cell(&BIG).open(dir.path())?;
    // Each save changes a different subset of the cells.
    let mut expected = Vec::new();
    for step in 0..6u32 {
        if step % 2 == 0 || step == 5 {
            A.set(step);
        }
        if step % 3 == 0 {
            B.set(format!("step {step}"));
        }
        if step == 1 || step == 4 {
            BIG.set((0..20_000).map(|n| n * u64::from(step)).collect());
        }
        store.save_all()?;
        expected.push((store.generation(), A.get(), B.get(), BIG.get()));
    }
    let history = store.history();
    assert_eq!(history.len(), 6);
    let changed: Vec<usize> = history.iter().map(|saved| saved.changed.len()).collect();
    assert_eq!(changed, [3, 1, 1, 1, 2, 1], "cells written by each save");

    for (generation, a, b, big) in expected.iter().rev().chain(expected.iter()) {
        store.revert_to(*generation)?;
        assert_eq!((&A.get(), &B.get()), (a, b), "generation {generation}");
        assert!(BIG.with(|it| it == big), "generation {generation}: the large cell differs");
    }

    // After a reopen the history is still there.
    drop(store);
    let store = Store::builder().cell(&A).cell(&B).cell(&BIG).open(dir.path())?;
    assert_eq!(store.history().len(), 6);
    let (generation, a, b, _) = expected.first().ok_or("no saves")?;
    store.revert_to(*generation)?;
    assert_eq!((&A.get(), &B.get()), (a, b));
    Ok(())
}

#[test]
fn a_reverted_state_is_saved_as_a_new_generation_and_reload_returns_to_the_last_save() -> TestResult
{
    static DOC: StateCell<String> = StateCell::new("history::new_gen::DOC", String::new);
    static OTHER: StateCell<u8> = StateCell::new("history::new_gen::OTHER", || 1);
    let store = Store::builder().cell(&DOC).cell(&OTHER).in_memory()?;
    DOC.set("v1".into());
    store.save_all()?;
    DOC.set("v2".into());
    store.save_all()?;

    store.revert_to(1)?;
    assert_eq!(DOC.get(), "v1");
    assert!(store.has_unsaved_changes(), "a reverted cell must be saved again");
    store.reload_all()?;
    assert_eq!(DOC.get(), "v2", "reload_all is a revert to the last save");
    assert!(!store.has_unsaved_changes());

    store.revert_to(1)?;
    store.save_all()?;
    assert_eq!(store.generation(), 3);
    let last = store.history().pop().ok_or("no history")?;
    assert_eq!(last.changed, ["history::new_gen::DOC"], "only the reverted cell is written");
    DOC.set("scratch".into());
    store.reload_all()?;
    assert_eq!(DOC.get(), "v1");
    Ok(())
}

#[test]
fn reverting_to_a_generation_the_history_does_not_hold_changes_nothing() -> TestResult {
    static N: StateCell<u64> = StateCell::new("history::unknown::N", || 0);
    let store = Store::builder().cell(&N).keep_history(2).in_memory()?;
    let err = store.revert_to(1).err().ok_or("reverted an empty history")?;
    assert!(matches!(err, Error::UnknownGeneration { oldest: None, .. }), "{err:?}");
    for n in 1..=4 {
        N.set(n);
        store.save_all()?;
    }
    N.set(99);
    for generation in [0, 1, 2, 5] {
        let err = store.revert_to(generation).err().ok_or("reverted a pruned save")?;
        assert!(
            matches!(
                err,
                Error::UnknownGeneration { oldest: Some(3), newest: Some(4), generation: g, .. }
                    if g == generation
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("3 to 4"), "{err}");
    }
    assert_eq!(N.get(), 99, "a refused revert changed a cell");
    store.revert_to(3)?;
    assert_eq!(N.get(), 3);
    Ok(())
}

#[test]
fn a_cell_without_a_value_in_the_target_save_fails_the_whole_revert() -> TestResult {
    static EARLY: StateCell<u8> = StateCell::new("history::late::EARLY", || 1);
    static LATE: StateCell<u8> = StateCell::new("history::late::LATE", || 1);
    let dir = tempfile::tempdir()?;
    {
        let store = Store::builder().cell(&EARLY).open(dir.path())?;
        store.save_all()?;
    }
    let store = Store::builder().cell(&EARLY).cell(&LATE).open(dir.path())?;
    EARLY.set(2);
    store.save_all()?;
    EARLY.set(3);
    LATE.set(3);
    let err = store.revert_to(1).err().ok_or("reverted a cell to a save before it existed")?;
    assert!(
        matches!(&err, Error::NeverSaved { cell, .. } if cell == "history::late::LATE"),
        "{err:?}"
    );
    assert_eq!((EARLY.get(), LATE.get()), (3, 3), "a failed revert changed a cell");
    store.revert_to(2)?;
    assert_eq!((EARLY.get(), LATE.get()), (2, 1));
    Ok(())
}

#[test]
fn pruning_bounds_the_history_and_its_value_files() -> TestResult {
    static SMALL: StateCell<u64> = StateCell::new("history::prune::SMALL", || 0);
    static BIG: StateCell<Vec<u64>> = StateCell::new("history::prune::BIG", Vec::new);
    const KEEP: usize = 4;
    let dir = tempfile::tempdir()?;
    let store = Store::builder().cell(&SMALL).cell(&BIG).keep_history(KEEP).open(dir.path())?;
    let mut sizes = Vec::new();
    for n in 1..=1_000u64 {
        SMALL.set(n);
        if n % 10 == 0 {
            BIG.set(vec![n; 5_000]);
        }
        store.save_all()?;
        let history = store.history();
        assert!(history.len() <= KEEP, "{} saves kept", history.len());
        // One file for the current large value, and at most one per kept save.
        let files = fs::read_dir(dir.path().join("values"))?.count();
        assert!(files <= 1 + KEEP, "{files} value files after save {n}");
        if n % 250 == 0 {
            sizes.push(dir_size(dir.path())?);
        }
    }
    let numbers: Vec<u64> = store.history().iter().map(|saved| saved.number).collect();
    assert_eq!(numbers, [997, 998, 999, 1000]);
    // sled reuses its log (at most a few 512 KiB segments): the directory levels
    // off rather than growing per save. 100,000 saves measured 2.5 MiB at most.
    let largest = sizes.iter().max().ok_or("no sizes")?;
    assert!(*largest <= 4 * 1024 * 1024, "directory grew to {largest} bytes: {sizes:?}");
    Ok(())
}

#[test]
fn history_lists_generations_with_time_and_changed_cells() -> TestResult {
    static X: StateCell<u8> = StateCell::new("history::list::X", || 0);
    static Y: StateCell<u8> = StateCell::new("history::list::Y", || 0);
    let before = std::time::SystemTime::now();
    let store = Store::builder().cell(&X).cell(&Y).in_memory()?;
    store.save_all()?;
    Y.set(1);
    store.save_all()?;
    store.save_all()?; // nothing changed: no new generation
    let history = store.history();
    assert_eq!(history.len(), 2);
    let (first, second) = (history.first().ok_or("empty")?, history.get(1).ok_or("short")?);
    assert_eq!((first.number, second.number), (1, 2));
    assert_eq!(first.changed, ["history::list::X", "history::list::Y"]);
    assert_eq!(second.changed, ["history::list::Y"]);
    // Times are stored in milliseconds.
    let floor = before - std::time::Duration::from_millis(1);
    assert!(first.saved_at >= floor && second.saved_at >= first.saved_at);
    Ok(())
}

pub(crate) fn dir_size(path: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(path)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() { dir_size(&entry.path())? } else { meta.len() };
    }
    Ok(total)
}

/// An array of cells named `history::wide::0`, `history::wide::1`, ...
macro_rules! wide_cells {
    ($($n:literal)*) => { [$(StateCell::new(concat!("history::wide::", $n), Vec::new)),*] };
}

#[test]
fn large_saves_keep_every_engine_value_small_enough_for_the_log() -> TestResult {
    // 40 values just under the inline limit: one save's history entry holds 160 KiB
    // of earlier values. As one engine value, sled would put it in a blob file,
    // which it never fsyncs; split into chunks, everything stays in the log.
    static CELLS: [StateCell<Vec<u8>>; 40] = wide_cells!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32 33 34 35 36 37 38 39);
    let dir = tempfile::tempdir()?;
    let store =
        CELLS.iter().fold(Store::builder(), instastate::StoreBuilder::cell).open(dir.path())?;
    for round in 0..3u8 {
        for cell in &CELLS {
            cell.set(vec![round; 4_000]);
        }
        store.save_all()?;
    }
    store.compact()?;
    let blobs = fs::read_dir(dir.path().join("sled").join("blobs"))?.count();
    assert_eq!(blobs, 0, "sled wrote {blobs} blob files");
    store.revert_to(1)?;
    assert!(CELLS.iter().all(|cell| cell.with(|it| it == &vec![0; 4_000])));
    assert!(store.verify()?.is_empty());
    Ok(())
}

#[test]
fn the_byte_budget_prunes_saves_that_hold_large_earlier_values() -> TestResult {
    static LARGE: StateCell<Vec<u8>> = StateCell::new("history::budget::LARGE", Vec::new);
    static SMALL: StateCell<u32> = StateCell::new("history::budget::SMALL", || 0);
    let dir = tempfile::tempdir()?;
    let store =
        Store::builder().cell(&LARGE).cell(&SMALL).history_bytes(250_000).open(dir.path())?;
    for round in 1..=10u8 {
        LARGE.set(vec![round; 100_000]);
        store.save_all()?;
        // Small saves cost next to nothing and stay within the budget.
        SMALL.set(u32::from(round));
        store.save_all()?;
    }
    let kept: Vec<u64> = store.history().iter().map(|saved| saved.number).collect();
    // Odd saves wrote LARGE, keeping its earlier 100,000 bytes; besides the newest
    // save's, two of them fit in 250,000 bytes (saves 17 and 19), a third does not.
    assert_eq!(kept, [16, 17, 18, 19, 20], "{kept:?}");
    let files = fs::read_dir(dir.path().join("values"))?.count();
    assert_eq!(files, 3, "the current value and the two kept earlier ones");
    store.revert_to(16)?;
    assert_eq!((LARGE.read().first().copied(), SMALL.get()), (Some(8), 8));
    Ok(())
}
