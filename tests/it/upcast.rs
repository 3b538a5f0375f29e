//! Schema versions of a journal's state and events: a program writes a journal
//! with version 1 of its types, the next version of the program reads it through
//! migrations (upcasters), and what no migration reads is refused, changing nothing.
//! For `Prevayler` and for journaled cells.

use std::{collections::BTreeMap, fs, path::Path};

use instastate::{
    CellOptions, Error, Migrate, Migration, Prevalent, Prevayler, StateCell, Store, Timestamp,
    prevalence::{EventMigrations, PrevaylerBuilder},
};
use serde::{Deserialize, Serialize};

use crate::{TestResult, tree::tree};

/// The types as version 1 of the program had them.
mod v1 {
    use std::collections::BTreeMap;

    use instastate::Timestamp;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
    pub(crate) struct Bank {
        pub(crate) balances: BTreeMap<String, i64>,
    }

    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub(crate) enum Command {
        Deposit { who: String, amount: i64 },
        Withdraw { who: String, amount: i64 },
    }

    pub(crate) fn apply(bank: &mut Bank, command: Command, _: Timestamp) -> Result<i64, String> {
        let (who, change) = match command {
            Command::Deposit { who, amount } => (who, amount),
            Command::Withdraw { who, amount } => (who, -amount),
        };
        let balance = bank.balances.entry(who).or_default();
        if *balance + change < 0 {
            return Err(format!("{change} would overdraw {balance}"));
        }
        *balance += change;
        Ok(*balance)
    }
}

/// The state now: accounts instead of bare balances, and a total.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct Bank {
    accounts: BTreeMap<String, Account>,
    total: i64,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct Account {
    balance: i64,
    memos: Vec<String>,
}

/// The events now: a deposit carries a memo, and accounts can be closed.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum Command {
    Deposit { who: String, amount: i64, memo: String },
    Withdraw { who: String, amount: i64 },
    Close { who: String },
}

impl From<v1::Bank> for Bank {
    fn from(old: v1::Bank) -> Bank {
        let total = old.balances.values().sum();
        let accounts = old
            .balances
            .into_iter()
            .map(|(who, balance)| (who, Account { balance, memos: Vec::new() }))
            .collect();
        Bank { accounts, total }
    }
}

impl From<v1::Command> for Command {
    fn from(old: v1::Command) -> Command {
        match old {
            v1::Command::Deposit { who, amount } => {
                Command::Deposit { who, amount, memo: String::new() }
            }
            v1::Command::Withdraw { who, amount } => Command::Withdraw { who, amount },
        }
    }
}

fn apply(bank: &mut Bank, command: Command, _: Timestamp) -> Result<i64, String> {
    let (who, change, memo) = match command {
        Command::Deposit { who, amount, memo } => (who, amount, Some(memo)),
        Command::Withdraw { who, amount } => (who, -amount, None),
        Command::Close { who } => {
            let account = bank.accounts.remove(&who).ok_or(format!("no account `{who}`"))?;
            bank.total -= account.balance;
            return Ok(account.balance);
        }
    };
    let account = bank.accounts.entry(who).or_default();
    if account.balance + change < 0 {
        return Err(format!("{change} would overdraw {}", account.balance));
    }
    account.balance += change;
    account.memos.extend(memo.filter(|it| !it.is_empty()));
    bank.total += change;
    Ok(account.balance)
}

/// Version 2 of the program: both types bumped, with a migration from version 1.
fn v2() -> PrevaylerBuilder<Bank, EventMigrations<Command>> {
    Prevayler::builder()
        .state_version(2)
        .migrate_state(1, |old: v1::Bank| Bank::from(old))
        .event_version(2)
        .migrate_event(1, |old: v1::Command| Command::from(old))
}

fn deposit(who: &str, amount: i64) -> v1::Command {
    v1::Command::Deposit { who: who.to_owned(), amount }
}

fn withdraw(who: &str, amount: i64) -> v1::Command {
    v1::Command::Withdraw { who: who.to_owned(), amount }
}

/// The events version 1 of the program handles: the first `snapshot_after` of
/// them, then a snapshot, then the rest (the one withdrawal is refused).
fn v1_events() -> Vec<v1::Command> {
    vec![
        deposit("ann", 10),
        deposit("bob", 5),
        withdraw("bob", 7),
        deposit("bob", 3),
        withdraw("ann", 4),
    ]
}

/// Runs version 1 of the program in `dir`: handles `events`, with a snapshot after
/// the first `snapshot_after` of them when given.
fn run_v1(dir: &Path, events: &[v1::Command], snapshot_after: Option<usize>) -> TestResult {
    let bank = Prevayler::open(dir, v1::Bank::default(), v1::apply)?;
    for (idx, event) in events.iter().enumerate() {
        if snapshot_after == Some(idx) {
            bank.snapshot()?;
        }
        // The one overdrawing withdrawal is refused, and journaled all the same.
        let _ = bank.handle(event.clone())?;
    }
    if snapshot_after == Some(events.len()) {
        bank.snapshot()?;
    }
    bank.close()?;
    Ok(())
}

/// The state version 2 of the program reaches from the start with `events`
/// upcast, as if it had been used throughout.
fn v2_throughout(events: &[v1::Command]) -> TestResult<Bank> {
    let bank = Prevayler::builder().transient(Bank::default(), apply);
    for event in events {
        let _ = bank.handle(Command::from(event.clone()))?;
    }
    Ok(bank.read(Clone::clone))
}

fn journal_files(dir: &Path) -> TestResult<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|it| it == "log" || it == "snap") {
            names.push(path.file_name().unwrap_or_default().to_string_lossy().into_owned());
        }
    }
    names.sort();
    Ok(names)
}

#[test]
fn a_v1_journal_and_snapshot_are_read_through_migrations_as_if_v2_had_run_throughout() -> TestResult
{
    let dir = tempfile::tempdir()?;
    let events = v1_events();
    run_v1(dir.path(), &events, Some(3))?;
    let expected = v2_throughout(&events)?;
    assert_eq!(expected.total, 14);
    {
        let bank = v2().open(dir.path(), Bank::default(), apply)?;
        assert_eq!(bank.read(Clone::clone), expected);
        assert_eq!((bank.recovered().snapshot(), bank.recovered().replayed()), (Some(3), 2));
        // New events are journaled with version 2, in a file of their own.
        assert_eq!(bank.handle(Command::Close { who: "bob".into() })?, Ok(8));
        let memo = "gift".to_owned();
        assert_eq!(bank.handle(Command::Deposit { who: "ann".into(), amount: 1, memo })?, Ok(7));
    }
    assert_eq!(
        journal_files(dir.path())?,
        [
            "journal-00000000000000000000.log",
            "journal-00000000000000000003.log",
            "journal-00000000000000000005.log",
            "snapshot-00000000000000000003.snap",
        ]
    );
    let report = Prevayler::builder::<Bank>().inspect(dir.path())?;
    assert_eq!((report.schema, report.event_schema), (2, 2), "the newest file is of version 2");
    // Files of both versions are read, each with its own.
    let bank = v2().keep_snapshots(1).open(dir.path(), Bank::default(), apply)?;
    let mut after = expected;
    after.accounts.remove("bob");
    let ann = after.accounts.entry("ann".into()).or_default();
    ann.balance += 1;
    ann.memos.push("gift".into());
    after.total = 7;
    assert_eq!(bank.read(Clone::clone), after);
    // A snapshot is written with version 2 and retires the files of version 1:
    // version 2 of the program needs its migrations no more.
    assert_eq!(bank.snapshot()?, 7);
    drop(bank);
    assert_eq!(
        journal_files(dir.path())?,
        ["journal-00000000000000000005.log", "snapshot-00000000000000000007.snap"]
    );
    let bank = Prevayler::builder().state_version(2).event_version(2).open(
        dir.path(),
        Bank::default(),
        apply,
    )?;
    assert_eq!(bank.read(Clone::clone), after);
    Ok(())
}

#[test]
fn a_v2_program_reads_a_v1_snapshot_with_no_event_after_it() -> TestResult {
    let dir = tempfile::tempdir()?;
    let events = v1_events();
    run_v1(dir.path(), &events, Some(events.len()))?;
    let bank = v2().open(dir.path(), Bank::default(), apply)?;
    assert_eq!(bank.read(Clone::clone), v2_throughout(&events)?);
    assert_eq!((bank.recovered().snapshot(), bank.recovered().replayed()), (Some(5), 0));
    bank.handle(Command::Deposit { who: "cy".into(), amount: 2, memo: "first".into() })??;
    drop(bank);
    let bank = v2().open(dir.path(), Bank::default(), apply)?;
    assert_eq!(
        bank.read(|bank| bank.accounts.get("cy").cloned()).map(|it| it.memos),
        Some(vec!["first".to_owned()])
    );
    Ok(())
}

#[test]
fn a_v1_journal_without_a_snapshot_replays_from_the_initial_state_of_v2() -> TestResult {
    let dir = tempfile::tempdir()?;
    let events = v1_events();
    run_v1(dir.path(), &events, None)?;
    // No snapshot holds a state of version 1: the state needs no migration.
    let bank = Prevayler::builder()
        .state_version(2)
        .event_version(2)
        .migrate_event(1, |old: v1::Command| Command::from(old))
        .replay_check(|bank: &Bank| bank.total.cast_unsigned())
        .open(dir.path(), Bank::default(), apply)?;
    assert_eq!(bank.read(Clone::clone), v2_throughout(&events)?);
    assert_eq!(bank.recovered().replayed(), 5);
    bank.handle(Command::Close { who: "ann".into() })??;
    bank.snapshot()?;
    Ok(())
}

#[test]
fn a_newer_version_is_refused_and_nothing_on_disk_changes() -> TestResult {
    // A journal of version 2 with no snapshot, then one with a snapshot.
    let events = v1_events().into_iter().map(Command::from).collect::<Vec<_>>();
    for snapshot in [false, true] {
        let dir = tempfile::tempdir()?;
        {
            let bank = v2().open(dir.path(), Bank::default(), apply)?;
            for event in &events {
                let _ = bank.handle(event.clone())?;
            }
            if snapshot {
                bank.snapshot()?;
            }
        }
        let before = tree(dir.path())?;
        // Version 1 of the program knows neither version 2.
        let err = Prevayler::open(dir.path(), v1::Bank::default(), v1::apply)
            .err()
            .ok_or("a journal of version 2 opened in version 1")?;
        let Error::JournalSchema { path, found, current, .. } = &err else {
            return Err(format!("wrong error: {err:?}").into());
        };
        assert_eq!((*found, *current), (2, 1), "{err}");
        let file = if snapshot {
            "snapshot-00000000000000000005.snap"
        } else {
            "journal-00000000000000000000.log"
        };
        assert_eq!(path, &dir.path().join(file));
        assert!(err.to_string().contains("newer than this program's v1"), "{err}");
        // Nor does one that bumped the events' version alone, to 2 with the other
        // types: the state's version 2 is newer than its 1.
        let err = Prevayler::builder()
            .event_version(2)
            .open(dir.path(), Bank::default(), apply)
            .err()
            .ok_or("a state of version 2 opened as version 1")?;
        assert!(matches!(err, Error::JournalSchema { found: 2, current: 1, .. }), "{err}");
        assert!(tree(dir.path())? == before, "a refused open changed the directory");
    }
    Ok(())
}

#[test]
fn an_older_version_without_a_migration_is_refused_naming_the_version() -> TestResult {
    let dir = tempfile::tempdir()?;
    run_v1(dir.path(), &v1_events(), Some(3))?;
    let before = tree(dir.path())?;
    // The events bumped without a migration from version 1.
    let err = Prevayler::builder()
        .state_version(2)
        .migrate_state(1, |old: v1::Bank| Bank::from(old))
        .event_version(2)
        .open(dir.path(), Bank::default(), apply)
        .err()
        .ok_or("events of version 1 read without a migration")?;
    let Error::JournalSchema { path, what, found: 1, current: 2, .. } = &err else {
        return Err(format!("wrong error: {err:?}").into());
    };
    assert_eq!(path, &dir.path().join("journal-00000000000000000003.log"));
    assert!(what.starts_with("the events"), "{what}");
    assert!(err.to_string().contains("no migration from v1"), "{err}");
    // The state bumped without one: the snapshot is refused.
    let err = Prevayler::builder()
        .state_version(2)
        .event_version(2)
        .migrate_event(1, |old: v1::Command| Command::from(old))
        .open(dir.path(), Bank::default(), apply)
        .err()
        .ok_or("a state of version 1 read without a migration")?;
    let Error::JournalSchema { path, what, found: 1, current: 2, .. } = &err else {
        return Err(format!("wrong error: {err:?}").into());
    };
    assert_eq!(path, &dir.path().join("snapshot-00000000000000000003.snap"));
    assert!(what.starts_with("the state"), "{what}");
    assert!(tree(dir.path())? == before, "a refused open changed the directory");
    // The files are still those of version 1.
    let bank = Prevayler::open(dir.path(), v1::Bank::default(), v1::apply)?;
    assert_eq!(bank.read(|bank| bank.balances.values().sum::<i64>()), 14);
    Ok(())
}

#[test]
fn a_changed_old_type_is_refused_naming_the_file_the_version_and_the_difference() -> TestResult {
    /// Version 1's events as a careless version 2 kept them: an amount of another type.
    #[derive(Serialize, Deserialize)]
    enum Drifted {
        Deposit { who: String, amount: u32 },
        Withdraw { who: String, amount: i64 },
    }
    fn from_drifted(old: Drifted) -> Command {
        match old {
            Drifted::Deposit { who, amount } => {
                Command::Deposit { who, amount: amount.into(), memo: String::new() }
            }
            Drifted::Withdraw { who, amount } => Command::Withdraw { who, amount },
        }
    }
    let dir = tempfile::tempdir()?;
    run_v1(dir.path(), &v1_events(), None)?;
    let before = tree(dir.path())?;
    let err = Prevayler::builder()
        .state_version(2)
        .event_version(2)
        .migrate_event(1, from_drifted)
        .open(dir.path(), Bank::default(), apply)
        .err()
        .ok_or("events read as a changed old type")?;
    let Error::JournalType { path, changes, .. } = &err else {
        return Err(format!("wrong error: {err:?}").into());
    };
    assert_eq!(path, &dir.path().join("journal-00000000000000000000.log"));
    assert!(
        changes.iter().any(|it| it.contains("schema v1") && it.contains("amount")),
        "{changes:?}"
    );
    assert!(err.to_string().contains("(schema v1)"), "{err}");
    assert!(tree(dir.path())? == before, "a refused open changed the directory");
    Ok(())
}

#[test]
fn a_panicking_migration_is_a_typed_error_and_writes_nothing() -> TestResult {
    fn refuse(old: v1::Command) -> Command {
        match old {
            v1::Command::Withdraw { .. } => panic!("this migration cannot read withdrawals"),
            deposit @ v1::Command::Deposit { .. } => Command::from(deposit),
        }
    }
    let dir = tempfile::tempdir()?;
    run_v1(dir.path(), &v1_events(), None)?;
    let before = tree(dir.path())?;
    let err = Prevayler::builder()
        .state_version(2)
        .event_version(2)
        .migrate_event(1, refuse)
        .open(dir.path(), Bank::default(), apply)
        .err()
        .ok_or("a panicking migration went unnoticed")?;
    let Error::MigrationPanicked { what, from: 1, .. } = &err else {
        return Err(format!("wrong error: {err:?}").into());
    };
    assert_eq!(what, "event 2", "the first withdrawal");
    assert!(tree(dir.path())? == before, "a refused open changed the directory");
    Ok(())
}

// ---------------------------------------------------------------------------------
// Journaled cells
// ---------------------------------------------------------------------------------

/// A journaled cell's value as version 1 of the program had it: amounts as `u32`.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct TallyV1 {
    amounts: Vec<u32>,
}

impl Prevalent for TallyV1 {
    type Event = u32;
    type Output = usize;

    fn apply(&mut self, amount: u32, _: Timestamp) -> usize {
        self.amounts.push(amount);
        self.amounts.len()
    }
}

/// The value now: entries with a note, and a sum.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct Tally {
    entries: Vec<Entry>,
    sum: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Entry {
    amount: u64,
    note: String,
}

fn tally_from_v1(old: TallyV1) -> Tally {
    let entries: Vec<Entry> = old.amounts.into_iter().map(entry_from_v1).collect();
    let sum = entries.iter().map(|it| it.amount).sum();
    Tally { entries, sum }
}

fn entry_from_v1(amount: u32) -> Entry {
    Entry { amount: amount.into(), note: String::new() }
}

impl Prevalent for Tally {
    type Event = Entry;
    type Output = u64;
    const EVENT_VERSION: u32 = 2;
    const EVENT_MIGRATIONS: &'static [&'static dyn Migrate<Entry>] =
        &[&Migration::new(1, entry_from_v1)];

    fn apply(&mut self, entry: Entry, _: Timestamp) -> u64 {
        self.sum += entry.amount;
        self.entries.push(entry);
        self.sum
    }
}

#[test]
fn a_journaled_cell_reads_its_v1_snapshot_and_events_through_migrations() -> TestResult {
    static V1: StateCell<TallyV1> = StateCell::with_options(
        "it::upcast::TALLY",
        TallyV1::default,
        CellOptions::new().journaled(),
    );
    static V2: StateCell<Tally> = StateCell::with_options(
        "it::upcast::TALLY",
        Tally::default,
        CellOptions::new().version(2).migrations(&[&Migration::new(1, tally_from_v1)]).journaled(),
    );
    let dir = tempfile::tempdir()?;
    let journal = dir.path().join("journals/it%3A%3Aupcast%3A%3ATALLY");
    {
        let store = Store::builder().cell(&V1).open(dir.path())?;
        V1.handle(3)?;
        V1.handle(4)?;
        store.save_all()?;
        V1.handle(5)?;
    }
    // As if version 2 had run throughout.
    let mut expected = Tally::default();
    for amount in [3, 4, 5] {
        expected.apply(entry_from_v1(amount), Timestamp::from_micros(0));
    }
    {
        let _store = Store::builder().cell(&V2).open(dir.path())?;
        assert_eq!(V2.get(), expected);
        assert_eq!(V2.handle(Entry { amount: 10, note: "v2".into() })?, 22);
    }
    V2.set(Tally::default());
    {
        let store = Store::builder().cell(&V2).open(dir.path())?;
        assert_eq!((V2.with(|it| it.sum), V2.with(|it| it.entries.len())), (22, 4));
        // Version 1 of the program cannot read what version 2 wrote.
        drop(store);
        let before = tree(&journal)?;
        let err = Store::builder()
            .cell(&V1)
            .open(dir.path())
            .err()
            .ok_or("a journal of version 2 opened in version 1")?;
        assert!(matches!(err, Error::JournalSchema { found: 2, current: 1, .. }), "{err}");
        assert!(tree(&journal)? == before, "a refused open changed the cell's journal");
    }
    // After a snapshot of version 2, only the files of version 2 are left.
    {
        let store = Store::builder().cell(&V2).open(dir.path())?;
        store.save_all()?;
        V2.handle(Entry { amount: 1, note: String::new() })?;
        store.save_all()?;
    }
    let report = Prevayler::builder::<Tally>().inspect(&journal)?;
    assert_eq!((report.schema, report.event_schema, report.events), (2, 2, 5));
    let _store = Store::builder().cell(&V2).open(dir.path())?;
    assert_eq!(V2.with(|it| it.sum), 23);
    Ok(())
}

#[test]
fn a_journaled_cell_without_an_event_migration_is_refused_naming_the_version() -> TestResult {
    /// Version 2 of the events, bumped without a migration from version 1.
    #[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
    struct Careless(Vec<Entry>);
    impl Prevalent for Careless {
        type Event = Entry;
        type Output = ();
        const EVENT_VERSION: u32 = 2;
        fn apply(&mut self, entry: Entry, _: Timestamp) {
            self.0.push(entry);
        }
    }
    static V1: StateCell<TallyV1> = StateCell::with_options(
        "it::upcast::CARELESS",
        TallyV1::default,
        CellOptions::new().journaled(),
    );
    static V2: StateCell<Careless> = StateCell::with_options(
        "it::upcast::CARELESS",
        Careless::default,
        CellOptions::new().journaled(),
    );
    let dir = tempfile::tempdir()?;
    {
        let _store = Store::builder().cell(&V1).open(dir.path())?;
        V1.handle(7)?;
    }
    let journal = dir.path().join("journals/it%3A%3Aupcast%3A%3ACARELESS");
    let before = tree(&journal)?;
    let err = Store::builder()
        .cell(&V2)
        .open(dir.path())
        .err()
        .ok_or("events of version 1 read without a migration")?;
    let Error::JournalSchema { path, found: 1, current: 2, .. } = &err else {
        return Err(format!("wrong error: {err:?}").into());
    };
    assert_eq!(path, &journal.join("journal-00000000000000000000.log"));
    assert!(err.to_string().contains("no migration from v1"), "{err}");
    assert!(V2.read().0.is_empty(), "a failed open changes no cell");
    assert!(tree(&journal)? == before, "a refused open changed the cell's journal");
    Ok(())
}

#[test]
fn an_empty_v1_journal_file_is_replaced_by_one_of_v2() -> TestResult {
    let dir = tempfile::tempdir()?;
    run_v1(dir.path(), &[], None)?;
    assert_eq!(journal_files(dir.path())?, ["journal-00000000000000000000.log"]);
    {
        let bank = v2().open(dir.path(), Bank::default(), apply)?;
        bank.handle(Command::Deposit { who: "ann".into(), amount: 3, memo: String::new() })??;
    }
    // The file of version 1 held no event: the one of version 2 took its name, and
    // no link points from a file to itself.
    assert_eq!(journal_files(dir.path())?, ["journal-00000000000000000000.log"]);
    let report = Prevayler::builder::<Bank>().inspect(dir.path())?;
    assert_eq!((report.schema, report.event_schema, report.events), (2, 2, 1));
    let bank = Prevayler::builder().state_version(2).event_version(2).open(
        dir.path(),
        Bank::default(),
        apply,
    )?;
    assert_eq!(bank.read(|bank| bank.total), 3);
    Ok(())
}
