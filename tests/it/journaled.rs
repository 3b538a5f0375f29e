//! The second front door: journaled cells, changed by `CELL.handle(event)` through
//! the same journal engine as `Prevayler`.

use std::fs;

use instastate::{
    CellOptions, Error, Prevalent, StateCell, Store, Timestamp, prevalence::Durability,
};
use serde::{Deserialize, Serialize};

use crate::TestResult;

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct Ledger {
    entries: Vec<(i64, u64)>,
    total: i64,
}

impl Prevalent for Ledger {
    type Event = i64;
    type Output = Result<i64, String>;

    fn apply(&mut self, amount: i64, at: Timestamp) -> Result<i64, String> {
        if self.total + amount < 0 {
            return Err(format!("{amount} would overdraw {}", self.total));
        }
        self.entries.push((amount, at.as_micros()));
        self.total += amount;
        Ok(self.total)
    }
}

// Not `defstate!`: that would register it for the global store of `global.rs`.
// The macro's `#[journaled]` is shown by the doctest of `Prevalent`.
static REOPEN: StateCell<Ledger> = StateCell::with_options(
    "it::journaled::REOPEN",
    Ledger::default,
    CellOptions::new().journaled(),
);

#[test]
fn handled_events_survive_without_any_save() -> TestResult {
    let dir = tempfile::tempdir()?;
    {
        let _store = Store::builder().cell(&REOPEN).open(dir.path())?;
        assert_eq!(REOPEN.handle(10)?, Ok(10));
        assert_eq!(REOPEN.handle(-30)?, Err("-30 would overdraw 10".to_owned()));
        assert_eq!(REOPEN.handle(5)?, Ok(15));
    }
    assert!(
        matches!(REOPEN.handle(1), Err(Error::NotJournaled { .. })),
        "a closed store detaches the journal"
    );
    REOPEN.set(Ledger::default());
    let _store = Store::builder().cell(&REOPEN).open(dir.path())?;
    assert_eq!(REOPEN.with(|it| it.total), 15);
    assert_eq!(REOPEN.with(|it| it.entries.len()), 2);
    assert!(dir.path().join("journals/it%3A%3Ajournaled%3A%3AREOPEN").is_dir());
    Ok(())
}

#[test]
fn save_all_snapshots_journaled_cells_and_reload_all_leaves_them_alone() -> TestResult {
    static LEDGER: StateCell<Ledger> = StateCell::with_options(
        "it::journaled::SAVED",
        Ledger::default,
        CellOptions::new().journaled(),
    );
    static PLAIN: StateCell<u32> = StateCell::new("it::journaled::PLAIN", || 0);
    let dir = tempfile::tempdir()?;
    let journal_dir = dir.path().join("journals/it%3A%3Ajournaled%3A%3ASAVED");
    {
        let store = Store::builder().cell(&LEDGER).cell(&PLAIN).open(dir.path())?;
        for amount in 1..=5 {
            LEDGER.handle(amount)??;
        }
        PLAIN.set(1);
        store.save_all()?;
        assert!(journal_dir.join("snapshot-00000000000000000005.snap").is_file());
        LEDGER.handle(100)??;
        PLAIN.set(2);
        // Undo reverts the plain cell; the journaled one holds only durable events,
        // so there is nothing to revert.
        store.reload_all()?;
        assert_eq!((PLAIN.get(), LEDGER.with(|it| it.total)), (1, 115));
        store.save_all()?;
    }
    let names: Vec<String> = fs::read_dir(&journal_dir)?
        .map(|it| Ok(it?.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    assert!(names.iter().any(|it| it == "snapshot-00000000000000000006.snap"), "{names:?}");
    LEDGER.set(Ledger::default());
    let _store = Store::builder().cell(&LEDGER).cell(&PLAIN).open(dir.path())?;
    assert_eq!(LEDGER.with(|it| it.total), 115);
    assert_eq!(LEDGER.with(|it| it.entries.len()), 6);
    Ok(())
}

#[test]
fn a_journaled_cell_outside_an_open_store_refuses_events() {
    static LONELY: StateCell<Ledger> = StateCell::with_options(
        "it::journaled::LONELY",
        Ledger::default,
        CellOptions::new().journaled(),
    );
    let Err(err) = LONELY.handle(1) else { panic!("an event was handled without a journal") };
    assert!(matches!(err, Error::NotJournaled { .. }));
    assert!(err.to_string().contains("it::journaled::LONELY"), "{err}");
}

#[test]
fn in_memory_stores_journal_nothing_and_group_commit_serves_many_threads() -> TestResult {
    static MEMORY: StateCell<Ledger> = StateCell::with_options(
        "it::journaled::MEMORY",
        Ledger::default,
        CellOptions::new().journaled(),
    );
    static GROUPED: StateCell<Ledger> = StateCell::with_options(
        "it::journaled::GROUPED",
        Ledger::default,
        CellOptions::new().journaled(),
    );
    {
        let _store = Store::builder().cell(&MEMORY).in_memory()?;
        assert_eq!(MEMORY.handle(3)?, Ok(3));
    }
    let dir = tempfile::tempdir()?;
    {
        let _store = Store::builder()
            .cell(&GROUPED)
            .journal_durability(Durability::GroupCommit)
            .open(dir.path())?;
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    for _ in 0..25 {
                        GROUPED.handle(1).expect("journaled").expect("accepted");
                    }
                });
            }
        });
    }
    GROUPED.set(Ledger::default());
    let _store = Store::builder().cell(&GROUPED).open(dir.path())?;
    assert_eq!(GROUPED.with(|it| it.total), 200);
    Ok(())
}

#[test]
fn a_journal_written_for_another_event_type_is_refused_at_open() -> TestResult {
    #[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
    struct Words(Vec<String>);
    impl Prevalent for Words {
        type Event = String;
        type Output = ();
        fn apply(&mut self, word: String, _: Timestamp) {
            self.0.push(word);
        }
    }
    static BEFORE: StateCell<Ledger> = StateCell::with_options(
        "it::journaled::RETYPED",
        Ledger::default,
        CellOptions::new().journaled(),
    );
    static AFTER: StateCell<Words> = StateCell::with_options(
        "it::journaled::RETYPED",
        Words::default,
        CellOptions::new().journaled(),
    );
    let dir = tempfile::tempdir()?;
    {
        let _store = Store::builder().cell(&BEFORE).open(dir.path())?;
        BEFORE.handle(7)??;
    }
    let err = Store::builder()
        .cell(&AFTER)
        .open(dir.path())
        .err()
        .ok_or("a journal of `i64` events opened for `String`")?;
    assert!(matches!(err, Error::JournalType { .. }), "{err}");
    assert!(AFTER.read().0.is_empty(), "a failed open changes no cell");
    let _store = Store::builder().cell(&BEFORE).open(dir.path())?;
    assert_eq!(BEFORE.with(|it| it.total), 7);
    Ok(())
}

#[test]
fn a_backup_holds_journaled_cells_with_every_handled_event() -> TestResult {
    static BACKED: StateCell<Ledger> = StateCell::with_options(
        "it::journaled::BACKED",
        Ledger::default,
        CellOptions::new().journaled(),
    );
    let dir = tempfile::tempdir()?;
    let copy = dir.path().join("copy");
    {
        let store = Store::builder().cell(&BACKED).open(dir.path().join("live"))?;
        BACKED.handle(4)??;
        BACKED.handle(6)??;
        store.backup_to(&copy)?;
        BACKED.handle(100)??;
    }
    BACKED.set(Ledger::default());
    let _store = Store::builder().cell(&BACKED).open(&copy)?;
    assert_eq!(BACKED.with(|it| it.total), 10);
    assert_eq!(BACKED.handle(1)?, Ok(11), "the copy's journal goes on from its snapshot");
    Ok(())
}

#[test]
fn a_journaled_cell_cannot_be_open_in_two_stores() -> TestResult {
    static SHARED: StateCell<Ledger> = StateCell::with_options(
        "it::journaled::SHARED",
        Ledger::default,
        CellOptions::new().journaled(),
    );
    let (first, second) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let store = Store::builder()
        .cell(&SHARED)
        .journal_durability(Durability::Unsynced)
        .open(first.path())?;
    SHARED.handle(7)??;
    let err = Store::builder()
        .cell(&SHARED)
        .open(second.path())
        .err()
        .ok_or("a second store took the cell")?;
    assert!(matches!(err, Error::CellInUse { .. }), "{err}");
    assert_eq!(SHARED.handle(1)?, Ok(8), "the first store still has it");
    drop(store);
    SHARED.set(Ledger::default());
    let _store = Store::builder().cell(&SHARED).open(first.path())?;
    assert_eq!(SHARED.with(|it| it.total), 8, "closing synced the buffered events");
    Ok(())
}

#[test]
fn save_all_keeps_a_direct_write_to_a_journaled_cell() -> TestResult {
    static DIRECT: StateCell<Ledger> = StateCell::with_options(
        "it::journaled::DIRECT",
        Ledger::default,
        CellOptions::new().journaled(),
    );
    let dir = tempfile::tempdir()?;
    {
        let store = Store::builder().cell(&DIRECT).open(dir.path())?;
        DIRECT.handle(1)??;
        store.save_all()?;
        DIRECT.update(|it| it.total = 500);
        assert!(store.has_unsaved_changes(), "a direct write makes the store dirty");
        store.save_all()?;
    }
    DIRECT.set(Ledger::default());
    let _store = Store::builder().cell(&DIRECT).open(dir.path())?;
    assert_eq!(DIRECT.with(|it| it.total), 500);
    Ok(())
}

#[test]
fn periodic_journals_of_cells_are_written_by_their_timer() -> TestResult {
    static TIMED: StateCell<Ledger> = StateCell::with_options(
        "it::journaled::TIMED",
        Ledger::default,
        CellOptions::new().journaled(),
    );
    let dir = tempfile::tempdir()?;
    let journal =
        dir.path().join("journals/it%3A%3Ajournaled%3A%3ATIMED/journal-00000000000000000000.log");
    let _store = Store::builder()
        .cell(&TIMED)
        .journal_durability(Durability::Periodic(std::time::Duration::from_millis(10)))
        .open(dir.path())?;
    for _ in 0..10 {
        TIMED.handle(1)??;
    }
    // A header of about 70 bytes, then 27 bytes per event.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !journal.is_file() || fs::metadata(&journal)?.len() < 300 {
        assert!(std::time::Instant::now() < deadline, "the timer never wrote the journal");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    Ok(())
}

#[test]
fn a_backup_refuses_a_cell_whose_event_panicked_half_way() -> TestResult {
    #[derive(Debug, Default, Clone, Serialize, Deserialize)]
    struct Fragile(Vec<u8>);
    impl Prevalent for Fragile {
        type Event = u8;
        type Output = ();
        fn apply(&mut self, n: u8, _: Timestamp) {
            self.0.push(n);
            assert!(n != 0, "zero");
        }
    }
    static FRAGILE: StateCell<Fragile> = StateCell::with_options(
        "it::journaled::FRAGILE",
        Fragile::default,
        CellOptions::new().journaled(),
    );
    let dir = tempfile::tempdir()?;
    let store = Store::builder().cell(&FRAGILE).open(dir.path().join("live"))?;
    FRAGILE.handle(1)?;
    assert!(std::panic::catch_unwind(|| FRAGILE.handle(0)).is_err());
    let err = store
        .backup_to(dir.path().join("copy"))
        .err()
        .ok_or("a half-applied value was backed up")?;
    assert!(matches!(err, Error::Poisoned { .. }), "{err}");
    Ok(())
}

/// The journaled cells are named by the store, also when it is opened without
/// them (as the tool opens one): an export does not hold them.
#[test]
fn a_store_names_its_journaled_cells_which_an_export_leaves_to_their_journals() -> TestResult {
    static LISTED: StateCell<Ledger> = StateCell::with_options(
        "it::journaled::LISTED",
        Ledger::default,
        CellOptions::new().journaled(),
    );
    static BESIDE: StateCell<u8> = StateCell::new("it::journaled::LISTED_BESIDE", || 4);
    let dir = tempfile::tempdir()?;
    {
        let store = Store::builder().cell(&LISTED).cell(&BESIDE).open(dir.path())?;
        LISTED.handle(7)??;
        store.save_all()?;
        assert_eq!(store.journaled_cells(), ["it::journaled::LISTED"]);
    }
    let store = Store::builder().cell(&BESIDE).open(dir.path())?;
    assert_eq!(store.journaled_cells(), ["it::journaled::LISTED"]);
    let names: Vec<String> = store.stored_cells().into_iter().map(|it| it.name).collect();
    assert_eq!(names, ["it::journaled::LISTED_BESIDE"]);
    Ok(())
}
