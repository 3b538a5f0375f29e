//! The contract of a store of cells (see `mod.rs`).
//!
//! A cell is open in one store at a time, and a behaviour runs once per engine:
//! each behaviour declares its own cells and holds its own gate, so that its
//! runs on the engines take turns while different behaviours run in parallel.

use std::{
    collections::BTreeMap,
    sync::{Mutex, MutexGuard, PoisonError},
};

use instastate::{CellOptions, Error, Prevalent, StateCell, Store, StoreBuilder, Timestamp};

use super::{Place, contract};
use crate::TestResult;

contract!(
    a_save_is_what_the_next_open_loads_whatever_its_size,
    a_save_writes_only_what_changed_and_the_history_reverts_across_reopens,
    a_value_of_another_type_is_refused_at_open_and_nothing_changes,
    a_failed_encode_saves_nothing,
    a_second_writer_is_refused_while_the_first_is_open,
    a_read_only_open_loads_the_last_save_and_changes_nothing,
    an_export_imports_back_and_a_backup_opens_as_a_store_on_disk,
    a_journaled_cell_keeps_every_handled_event_with_and_without_snapshots,
    concurrent_handlers_of_a_journaled_cell_lose_nothing,
);

/// Takes `gate`, a behaviour's own: its runs on the engines take turns.
fn turn(gate: &'static Mutex<()>) -> MutexGuard<'static, ()> {
    gate.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A builder whose open waits at most a second for a database's lease.
fn builder() -> StoreBuilder {
    let builder = Store::builder();
    #[cfg(feature = "postgres")]
    let builder = builder
        .wait_for_lease(std::time::Duration::from_secs(1), std::time::Duration::from_millis(50));
    builder
}

fn a_save_is_what_the_next_open_loads_whatever_its_size(place: &Place) -> TestResult {
    static GATE: Mutex<()> = Mutex::new(());
    static SMALL: StateCell<u64> = StateCell::new("contract::size::SMALL", || 0);
    // Larger than a database row's part (1 MiB): stored in several.
    static LARGE: StateCell<Vec<u8>> = StateCell::new("contract::size::LARGE", Vec::new);
    static EMPTY: StateCell<String> = StateCell::new("contract::size::EMPTY", || "x".into());
    let _turn = turn(&GATE);
    let large: Vec<u8> = (0..3_500_000u32).map(|it| (it % 251) as u8).collect();
    {
        let store = builder().cell(&SMALL).cell(&LARGE).cell(&EMPTY).open(&place.location)?;
        SMALL.set(7);
        LARGE.set(large.clone());
        EMPTY.set(String::new());
        store.save_all()?;
        assert_eq!(store.generation(), 1);
        assert!(!store.has_unsaved_changes());
        store.close()?;
    }
    SMALL.set(0);
    LARGE.set(Vec::new());
    EMPTY.set("x".into());
    let store = builder().cell(&SMALL).cell(&LARGE).cell(&EMPTY).open(&place.location)?;
    assert_eq!((SMALL.get(), EMPTY.get()), (7, String::new()));
    assert!(*LARGE.read() == large, "the large value comes back whole");
    assert_eq!(store.generation(), 1);
    assert_eq!(store.verify()?, Vec::new());
    Ok(())
}

fn a_save_writes_only_what_changed_and_the_history_reverts_across_reopens(
    place: &Place,
) -> TestResult {
    static GATE: Mutex<()> = Mutex::new(());
    static A: StateCell<u32> = StateCell::new("contract::history::A", || 0);
    static B: StateCell<BTreeMap<String, u32>> =
        StateCell::new("contract::history::B", BTreeMap::new);
    let _turn = turn(&GATE);
    A.set(0);
    B.set(BTreeMap::new());
    {
        let store = builder().cell(&A).cell(&B).open(&place.location)?;
        store.save_all()?;
        A.set(1);
        store.save_all()?;
        B.update(|b| b.insert("k".into(), 2));
        store.save_all()?;
        // Nothing changed: no new save.
        store.save_all()?;
        let changed: Vec<(u64, Vec<String>)> =
            store.history().into_iter().map(|it| (it.number, it.changed)).collect();
        assert_eq!(
            changed,
            [
                (1, vec!["contract::history::A".to_owned(), "contract::history::B".to_owned()]),
                (2, vec!["contract::history::A".to_owned()]),
                (3, vec!["contract::history::B".to_owned()]),
            ]
        );
    }
    A.set(99);
    let store = builder().cell(&A).cell(&B).open(&place.location)?;
    assert_eq!((A.get(), B.read().get("k").copied()), (1, Some(2)));
    store.revert_to(1)?;
    assert_eq!((A.get(), B.read().len()), (0, 0));
    store.reload_all()?;
    assert_eq!(A.get(), 1);
    let unknown = store.revert_to(9);
    assert!(matches!(unknown, Err(Error::UnknownGeneration { generation: 9, .. })), "{unknown:?}");
    store.revert_to(2)?;
    store.save_all()?;
    drop(store);
    let store = builder().cell(&A).cell(&B).open(&place.location)?;
    assert_eq!((store.generation(), A.get(), B.read().len()), (4, 1, 0));
    Ok(())
}

fn a_value_of_another_type_is_refused_at_open_and_nothing_changes(place: &Place) -> TestResult {
    static GATE: Mutex<()> = Mutex::new(());
    static NUMBER: StateCell<u64> = StateCell::new("contract::types::VALUE", || 0);
    static TEXT: StateCell<String> = StateCell::new("contract::types::VALUE", String::new);
    let _turn = turn(&GATE);
    {
        let store = builder().cell(&NUMBER).open(&place.location)?;
        NUMBER.set(41);
        store.save_all()?;
    }
    TEXT.set("untouched".into());
    let refused = builder().cell(&TEXT).open(&place.location);
    assert!(matches!(refused, Err(Error::TypeMismatch { .. })), "{refused:?}");
    assert_eq!(TEXT.get(), "untouched");
    NUMBER.set(0);
    let store = builder().cell(&NUMBER).open(&place.location)?;
    assert_eq!((NUMBER.get(), store.generation()), (41, 1));
    Ok(())
}

/// A value whose encoding fails while `FAIL` is set.
#[derive(Default, Clone, serde::Deserialize)]
struct Fragile(u32);

static FAIL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl serde::Serialize for Fragile {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if FAIL.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(serde::ser::Error::custom("refused on purpose"));
        }
        serializer.serialize_newtype_struct("Fragile", &self.0)
    }
}

fn a_failed_encode_saves_nothing(place: &Place) -> TestResult {
    static GATE: Mutex<()> = Mutex::new(());
    static PLAIN: StateCell<u32> = StateCell::new("contract::encode::PLAIN", || 0);
    static FRAGILE: StateCell<Fragile> =
        StateCell::new("contract::encode::FRAGILE", Fragile::default);
    let _turn = turn(&GATE);
    let guard = Reset;
    {
        let store = builder().cell(&PLAIN).cell(&FRAGILE).open(&place.location)?;
        PLAIN.set(1);
        FRAGILE.set(Fragile(1));
        store.save_all()?;
        PLAIN.set(2);
        FRAGILE.set(Fragile(2));
        FAIL.store(true, std::sync::atomic::Ordering::SeqCst);
        let failed = store.save_all();
        assert!(
            matches!(&failed, Err(Error::Encode { cell, .. }) if cell == "contract::encode::FRAGILE"),
            "{failed:?}"
        );
        FAIL.store(false, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(store.generation(), 1);
    }
    drop(guard);
    let store = builder().cell(&PLAIN).cell(&FRAGILE).open(&place.location)?;
    assert_eq!((PLAIN.get(), FRAGILE.get().0, store.generation()), (1, 1, 1));
    Ok(())
}

/// Lets `Fragile` encode again, whatever happens.
struct Reset;

impl Drop for Reset {
    fn drop(&mut self) {
        FAIL.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

fn a_second_writer_is_refused_while_the_first_is_open(place: &Place) -> TestResult {
    static GATE: Mutex<()> = Mutex::new(());
    static FIRST: StateCell<u8> = StateCell::new("contract::writers::FIRST", || 0);
    static SECOND: StateCell<u8> = StateCell::new("contract::writers::SECOND", || 0);
    let _turn = turn(&GATE);
    let first = builder().cell(&FIRST).open(&place.location)?;
    FIRST.set(1);
    first.save_all()?;
    let second = builder().cell(&SECOND).open(&place.location);
    assert!(matches!(second, Err(Error::Locked { .. } | Error::LeaseHeld { .. })), "{second:?}");
    first.close()?;
    // Closed: the next writer opens at once, and finds the first one's save.
    let second = builder().cell(&FIRST).cell(&SECOND).open(&place.location)?;
    assert_eq!((FIRST.get(), second.generation()), (1, 1));
    Ok(())
}

fn a_read_only_open_loads_the_last_save_and_changes_nothing(place: &Place) -> TestResult {
    static GATE: Mutex<()> = Mutex::new(());
    static NOTE: StateCell<String> = StateCell::new("contract::read_only::NOTE", String::new);
    let _turn = turn(&GATE);
    let none = builder().cell(&NOTE).open_read_only(&place.location);
    assert!(
        matches!(none, Err(Error::WrongDirectory { .. } | Error::InvalidLocation { .. })),
        "a read-only open creates nothing: {none:?}"
    );
    {
        let store = builder().cell(&NOTE).open(&place.location)?;
        NOTE.set("kept".into());
        store.save_all()?;
    }
    NOTE.set(String::new());
    let store = builder().cell(&NOTE).open_read_only(&place.location)?;
    assert_eq!(NOTE.get(), "kept");
    NOTE.set("changed".into());
    assert!(matches!(store.save_all(), Err(Error::ReadOnly { .. })));
    drop(store);
    let store = builder().cell(&NOTE).open(&place.location)?;
    assert_eq!((NOTE.get(), store.generation()), ("kept".to_owned(), 1));
    Ok(())
}

fn an_export_imports_back_and_a_backup_opens_as_a_store_on_disk(place: &Place) -> TestResult {
    static GATE: Mutex<()> = Mutex::new(());
    static LIST: StateCell<Vec<String>> = StateCell::new("contract::backup::LIST", Vec::new);
    let _turn = turn(&GATE);
    let files = tempfile::tempdir()?;
    let (export, backup) = (files.path().join("export.json"), files.path().join("backup"));
    let store = builder().cell(&LIST).open(&place.location)?;
    LIST.set(vec!["a".into(), "b".into()]);
    store.save_all()?;
    store.export_to(&export)?;
    store.backup_to(&backup)?;
    LIST.set(vec!["later".into()]);
    store.save_all()?;
    store.import_from(&export)?;
    assert_eq!((LIST.get(), store.generation()), (vec!["a".to_owned(), "b".to_owned()], 3));
    store.close()?;
    LIST.set(Vec::new());
    let copy = builder().cell(&LIST).open(&backup)?;
    assert_eq!((LIST.get(), copy.generation()), (vec!["a".to_owned(), "b".to_owned()], 1));
    Ok(())
}

/// A journaled cell's state: every amount added, with its timestamp.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Tally {
    entries: Vec<(u32, u64)>,
    total: u64,
}

impl Prevalent for Tally {
    type Event = u32;
    type Output = Result<u64, String>;

    fn apply(&mut self, amount: u32, at: Timestamp) -> Result<u64, String> {
        if amount == 0 {
            return Err("nothing to add".to_owned());
        }
        self.entries.push((amount, at.as_micros()));
        self.total += u64::from(amount);
        Ok(self.total)
    }
}

fn a_journaled_cell_keeps_every_handled_event_with_and_without_snapshots(
    place: &Place,
) -> TestResult {
    static GATE: Mutex<()> = Mutex::new(());
    static TALLY: StateCell<Tally> = StateCell::with_options(
        "contract::journaled::TALLY",
        Tally::default,
        CellOptions::new().journaled(),
    );
    static PLAIN: StateCell<u8> = StateCell::new("contract::journaled::PLAIN", || 0);
    let _turn = turn(&GATE);
    TALLY.set(Tally::default());
    let before = {
        let store = builder().cell(&TALLY).cell(&PLAIN).open(&place.location)?;
        for amount in 1..=5 {
            TALLY.handle(amount)??;
        }
        assert_eq!(TALLY.handle(0)?, Err("nothing to add".to_owned()));
        PLAIN.set(1);
        // A snapshot of the cell, then events after it.
        store.save_all()?;
        for amount in 6..=8 {
            TALLY.handle(amount)??;
        }
        let before = TALLY.get();
        // No save: the events after the snapshot are replayed.
        drop(store);
        before
    };
    assert!(matches!(TALLY.handle(1), Err(Error::NotJournaled { .. })));
    TALLY.set(Tally::default());
    PLAIN.set(0);
    let store = builder().cell(&TALLY).cell(&PLAIN).open(&place.location)?;
    assert_eq!((TALLY.get(), PLAIN.get()), (before.clone(), 1));
    assert_eq!(TALLY.get().total, 36);
    assert_eq!(TALLY.handle(9)?, Ok(45));
    store.save_all()?;
    store.close()?;
    TALLY.set(Tally::default());
    let store = builder().cell(&TALLY).open(&place.location)?;
    assert_eq!(TALLY.get().total, 45);
    assert_eq!(TALLY.get().entries.get(..8), before.entries.get(..8));
    // An event after the last snapshot, and no save: a read-only opening replays
    // it too, and refuses new ones.
    assert_eq!(TALLY.handle(10)?, Ok(55));
    drop(store);
    TALLY.set(Tally::default());
    let _read = builder().cell(&TALLY).open_read_only(&place.location)?;
    assert_eq!(TALLY.get().total, 55);
    let refused = TALLY.handle(1);
    assert!(matches!(refused, Err(Error::ReadOnly { .. })), "{refused:?}");
    assert_eq!(TALLY.get().total, 55);
    Ok(())
}

fn concurrent_handlers_of_a_journaled_cell_lose_nothing(place: &Place) -> TestResult {
    static GATE: Mutex<()> = Mutex::new(());
    static SHARED: StateCell<Tally> = StateCell::with_options(
        "contract::journaled::SHARED",
        Tally::default,
        CellOptions::new().journaled(),
    );
    const THREADS: u32 = 4;
    const EACH: u32 = 50;
    let _turn = turn(&GATE);
    SHARED.set(Tally::default());
    {
        let store = builder().cell(&SHARED).open(&place.location)?;
        std::thread::scope(|scope| -> TestResult {
            let handles: Vec<_> = (0..THREADS)
                .map(|thread| {
                    scope.spawn(move || -> Result<(), String> {
                        for k in 1..=EACH {
                            SHARED.handle(thread * 1_000 + k).map_err(|err| err.to_string())??;
                        }
                        Ok(())
                    })
                })
                .collect();
            for handle in handles {
                handle.join().map_err(|_| "a handler panicked")??;
            }
            Ok(())
        })?;
        store.save_all()?;
        for k in 1..=EACH {
            SHARED.handle(10_000 + k)??;
        }
    }
    let before = SHARED.get();
    assert_eq!(before.entries.len(), ((THREADS + 1) * EACH) as usize);
    SHARED.set(Tally::default());
    let _store = builder().cell(&SHARED).open(&place.location)?;
    assert_eq!(SHARED.get(), before, "every handled event, in the order applied");
    Ok(())
}
