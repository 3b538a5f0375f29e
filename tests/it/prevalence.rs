//! Prevalence through [`Prevayler`]: journal first, replay, snapshots, damage,
//! type checks, the replay check, failures and panics.

use std::{
    collections::BTreeMap,
    fs,
    path::Path,
    sync::atomic::{AtomicU64, Ordering},
    thread,
};

use instastate::{
    Error, Prevayler, Timestamp,
    prevalence::{Durability, Recovery},
};
use serde::{Deserialize, Serialize};

use crate::{Immutable, TestResult, compat::copy_dir};

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct Bank {
    balances: BTreeMap<String, i64>,
    /// Every change, in order, with its timestamp: what replay must reproduce.
    log: Vec<(String, i64, u64)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum Command {
    Deposit {
        who: String,
        amount: i64,
    },
    Withdraw {
        who: String,
        amount: i64,
    },
    /// Changes the state, then rejects itself: the documented pitfall.
    SloppyWithdraw {
        who: String,
        amount: i64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum BankError {
    Overdrawn { balance: i64 },
}

fn apply(bank: &mut Bank, command: Command, at: Timestamp) -> Result<i64, BankError> {
    match command {
        Command::Deposit { who, amount } => {
            bank.log.push((who.clone(), amount, at.as_micros()));
            let balance = bank.balances.entry(who).or_default();
            *balance += amount;
            Ok(*balance)
        }
        Command::Withdraw { who, amount } => {
            let balance = bank.balances.get(&who).copied().unwrap_or(0);
            if balance < amount {
                return Err(BankError::Overdrawn { balance });
            }
            bank.log.push((who.clone(), -amount, at.as_micros()));
            bank.balances.insert(who, balance - amount);
            Ok(balance - amount)
        }
        Command::SloppyWithdraw { who, amount } => {
            let balance = bank.balances.entry(who).or_default();
            *balance -= amount;
            if *balance < 0 {
                Err(BankError::Overdrawn { balance: *balance })
            } else {
                Ok(*balance)
            }
        }
    }
}

type BankSystem = Prevayler<Bank, Command, Result<i64, BankError>>;

fn open_bank(dir: &Path) -> instastate::Result<BankSystem> {
    Prevayler::open(dir, Bank::default(), apply)
}

fn deposit(who: &str, amount: i64) -> Command {
    Command::Deposit { who: who.to_owned(), amount }
}

#[test]
fn reopening_replays_every_event_with_its_timestamp() -> TestResult {
    let dir = tempfile::tempdir()?;
    let before = {
        let bank = open_bank(dir.path())?;
        assert_eq!(bank.handle(deposit("alice", 100))?, Ok(100));
        assert_eq!(bank.handle(deposit("bob", 5))?, Ok(5));
        assert_eq!(bank.handle(deposit("alice", 20))?, Ok(120));
        assert_eq!(bank.events(), 3);
        bank.read(Clone::clone)
    };
    let bank = open_bank(dir.path())?;
    assert_eq!(bank.read(Clone::clone), before, "replay gives the same state, timestamps included");
    assert_eq!(bank.recovered().replayed(), 3);
    assert_eq!(bank.recovered().snapshot(), None);
    assert_eq!(bank.events(), 3);
    let stamps: Vec<u64> = before.log.iter().map(|it| it.2).collect();
    assert!(stamps.is_sorted(), "timestamps never go back: {stamps:?}");
    Ok(())
}

#[test]
fn rejected_events_are_journaled_and_rejected_again_on_replay() -> TestResult {
    let dir = tempfile::tempdir()?;
    let before = {
        let bank = open_bank(dir.path())?;
        bank.handle(deposit("alice", 10))?.map_err(|err| format!("{err:?}"))?;
        let rejected = bank.handle(Command::Withdraw { who: "alice".into(), amount: 50 })?;
        assert_eq!(rejected, Err(BankError::Overdrawn { balance: 10 }));
        // The pitfall the docs warn of: a function that changes the state and then
        // rejects the event keeps the change, and replay reproduces it exactly.
        let sloppy = bank.handle(Command::SloppyWithdraw { who: "alice".into(), amount: 30 })?;
        assert_eq!(sloppy, Err(BankError::Overdrawn { balance: -20 }));
        assert_eq!(bank.events(), 3, "rejected events are journaled too");
        bank.read(Clone::clone)
    };
    let bank = open_bank(dir.path())?;
    assert_eq!(bank.recovered().replayed(), 3);
    assert_eq!(bank.read(Clone::clone), before);
    assert_eq!(bank.read(|bank| bank.balances.get("alice").copied()), Some(-20));
    Ok(())
}

#[test]
fn every_durability_mode_keeps_what_it_promises_across_a_clean_close() -> TestResult {
    for durability in [
        Durability::SyncEach,
        Durability::GroupCommit,
        Durability::Periodic(std::time::Duration::from_millis(5)),
        Durability::Unsynced,
    ] {
        let dir = tempfile::tempdir()?;
        {
            let bank = Prevayler::builder().durability(durability).open(
                dir.path(),
                Bank::default(),
                apply,
            )?;
            thread::scope(|scope| {
                for who in ["a", "b", "c", "d"] {
                    let bank = &bank;
                    scope.spawn(move || {
                        for _ in 0..50 {
                            bank.handle(deposit(who, 1)).expect("journaled").expect("accepted");
                        }
                    });
                }
            });
            bank.close()?;
        }
        let bank = open_bank(dir.path())?;
        let balances = bank.read(|bank| bank.balances.clone());
        assert_eq!(balances.values().sum::<i64>(), 200, "{durability:?}");
        assert!(balances.values().all(|&it| it == 50), "{durability:?}: {balances:?}");
        assert_eq!(bank.events(), 200);
    }
    Ok(())
}

#[test]
fn a_second_open_of_the_directory_is_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let _bank = open_bank(dir.path())?;
    let Err(Error::Locked { path, .. }) = open_bank(dir.path()) else {
        return Err("a second open succeeded".into());
    };
    assert_eq!(path, dir.path());
    Ok(())
}

#[test]
fn snapshots_shorten_the_journal_and_recovery_starts_from_the_newest() -> TestResult {
    let dir = tempfile::tempdir()?;
    let before = {
        let bank =
            Prevayler::builder().keep_snapshots(2).open(dir.path(), Bank::default(), apply)?;
        for round in 0..4 {
            for _ in 0..10 {
                bank.handle(deposit("alice", 1))?.map_err(|err| format!("{err:?}"))?;
            }
            assert_eq!(bank.snapshot()?, (round + 1) * 10);
        }
        bank.handle(deposit("bob", 7))?.map_err(|err| format!("{err:?}"))?;
        bank.read(Clone::clone)
    };
    let names = file_names(dir.path())?;
    let snapshots: Vec<_> = names.iter().filter(|it| it.starts_with("snapshot-")).collect();
    assert_eq!(
        snapshots,
        ["snapshot-00000000000000000030.snap", "snapshot-00000000000000000040.snap"],
        "{names:?}"
    );
    let journals: Vec<_> = names.iter().filter(|it| it.starts_with("journal-")).collect();
    assert_eq!(
        journals,
        ["journal-00000000000000000030.log", "journal-00000000000000000040.log"],
        "the journal is kept back to the oldest snapshot kept: {names:?}"
    );
    let bank = open_bank(dir.path())?;
    assert_eq!(bank.recovered().snapshot(), Some(40));
    assert_eq!(bank.recovered().replayed(), 1);
    assert_eq!(bank.read(Clone::clone), before);
    Ok(())
}

#[test]
fn a_damaged_newest_snapshot_falls_back_to_the_one_before() -> TestResult {
    let dir = tempfile::tempdir()?;
    let before = {
        let bank = open_bank(dir.path())?;
        for amount in 1..=5 {
            bank.handle(deposit("alice", amount))?.map_err(|err| format!("{err:?}"))?;
            bank.snapshot()?;
        }
        bank.read(Clone::clone)
    };
    let newest = dir.path().join("snapshot-00000000000000000005.snap");
    let mut bytes = fs::read(&newest)?;
    if let Some(byte) = bytes.last_mut() {
        *byte ^= 1;
    }
    fs::write(&newest, bytes)?;
    let bank = open_bank(dir.path())?;
    assert_eq!(bank.recovered().snapshot(), Some(4));
    assert_eq!(bank.recovered().unsound_snapshots(), [newest]);
    assert_eq!(bank.recovered().replayed(), 1);
    assert_eq!(bank.read(Clone::clone), before);
    Ok(())
}

#[test]
fn a_directory_left_with_nothing_but_a_damaged_snapshot_is_refused_not_started_afresh() -> TestResult
{
    // Found by the fuzz target `snapshot`: with no sound snapshot, no journal file
    // and no lock file saying the directory held a journal, opening started from
    // the initial state, and the events the snapshot covered were gone unnoticed.
    let dir = tempfile::tempdir()?;
    {
        let bank = open_bank(dir.path())?;
        bank.handle(deposit("alice", 5))?.map_err(|err| format!("{err:?}"))?;
        bank.snapshot()?;
    }
    for entry in fs::read_dir(dir.path())? {
        let path = entry?.path();
        if path.extension().is_none_or(|it| it != "snap") {
            fs::remove_file(path)?;
        }
    }
    let snapshot = dir.path().join("snapshot-00000000000000000001.snap");
    let mut bytes = fs::read(&snapshot)?;
    if let Some(byte) = bytes.last_mut() {
        *byte ^= 1;
    }
    fs::write(&snapshot, &bytes)?;
    let res = open_bank(dir.path()).map(drop);
    assert!(matches!(res, Err(Error::JournalCorrupt { .. })), "{res:?}");
    let inspected = Prevayler::builder::<Bank>().inspect(dir.path());
    assert!(matches!(inspected, Err(Error::JournalCorrupt { .. })), "{inspected:?}");
    assert_eq!(fs::read(&snapshot)?, bytes, "a refused open changed the snapshot");
    // Salvage goes on from what is left, and says what it passed over.
    let bank = Prevayler::builder().recovery(Recovery::Salvage).open(
        dir.path(),
        Bank::default(),
        apply,
    )?;
    assert_eq!(bank.recovered().unsound_snapshots(), [snapshot]);
    assert_eq!(bank.read(Clone::clone), Bank::default());
    Ok(())
}

#[test]
fn events_missing_before_the_first_journal_file_are_damage_even_when_it_holds_none() -> TestResult {
    // Found by the fuzz target `snapshot`: with the only snapshot damaged and the
    // only journal file starting after it, but holding no event yet, opening went on
    // from the initial state, the snapshot's events gone without a word.
    let dir = tempfile::tempdir()?;
    {
        let bank = open_bank(dir.path())?;
        for amount in 1..=3 {
            bank.handle(deposit("alice", amount))?.map_err(|err| format!("{err:?}"))?;
        }
        bank.snapshot()?;
    }
    // The events are all in the snapshot: without the journal file that held them,
    // the next opening starts an empty one after the snapshot.
    fs::remove_file(dir.path().join("journal-00000000000000000000.log"))?;
    let salvage = Prevayler::builder().recovery(Recovery::Salvage);
    drop(salvage.open(dir.path(), Bank::default(), apply)?);
    assert!(dir.path().join("journal-00000000000000000003.log").is_file());
    let snapshot = dir.path().join("snapshot-00000000000000000003.snap");
    let mut bytes = fs::read(&snapshot)?;
    if let Some(byte) = bytes.last_mut() {
        *byte ^= 1;
    }
    fs::write(&snapshot, bytes)?;
    let res = open_bank(dir.path()).map(|bank| bank.read(|bank| bank.balances.clone()));
    assert!(matches!(res, Err(Error::JournalCorrupt { .. })), "events 0 to 2 are gone: {res:?}");
    let inspected = Prevayler::builder::<Bank>().inspect(dir.path());
    assert!(matches!(inspected, Err(Error::JournalCorrupt { .. })), "{inspected:?}");
    Ok(())
}

#[test]
fn snapshots_taken_during_concurrent_handling_lose_and_repeat_nothing() -> TestResult {
    const THREADS: i64 = 4;
    const EACH: i64 = 300;
    let dir = tempfile::tempdir()?;
    {
        let bank = Prevayler::builder()
            .durability(Durability::GroupCommit)
            .snapshot_every(97)
            .keep_snapshots(3)
            .open(dir.path(), Bank::default(), apply)?;
        thread::scope(|scope| -> TestResult {
            for idx in 0..THREADS {
                let bank = &bank;
                scope.spawn(move || {
                    for n in 1..=EACH {
                        bank.handle(deposit(&format!("t{idx}"), n))
                            .expect("journaled")
                            .expect("accepted");
                    }
                });
            }
            let bank = &bank;
            let snapshots = scope.spawn(move || -> instastate::Result<Vec<u64>> {
                (0..20).map(|_| bank.snapshot()).collect()
            });
            let covered = snapshots.join().map_err(|_| "snapshot thread panicked")??;
            assert!(covered.is_sorted(), "{covered:?}");
            Ok(())
        })?;
        bank.close()?;
    }
    let bank = open_bank(dir.path())?;
    assert!(bank.recovered().snapshot().is_some());
    let expected: i64 = (1..=EACH).sum();
    bank.read(|bank| {
        for idx in 0..THREADS {
            let who = format!("t{idx}");
            assert_eq!(bank.balances.get(&who), Some(&expected), "{who}");
            // Each thread's deposits appear once each, in the order it made them.
            let amounts: Vec<i64> =
                bank.log.iter().filter(|it| it.0 == who).map(|it| it.1).collect();
            assert_eq!(amounts, (1..=EACH).collect::<Vec<_>>(), "{who}");
        }
    });
    assert_eq!(bank.events(), (THREADS * EACH) as u64);
    Ok(())
}

fn fixture(name: &str) -> TestResult<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/journal-v1").join(name);
    copy_dir(&from, dir.path())?;
    Ok(dir)
}

type Numbers = Prevayler<Vec<u64>, u64, usize>;

fn open_numbers(dir: &Path, recovery: Recovery) -> instastate::Result<Numbers> {
    Prevayler::builder().recovery(recovery).open(
        dir,
        Vec::new(),
        |numbers: &mut Vec<u64>, n: u64, _| {
            numbers.push(n);
            numbers.len()
        },
    )
}

#[test]
fn a_torn_last_write_is_cut_off_on_open() -> TestResult {
    let dir = fixture("torn-tail")?;
    let numbers = open_numbers(dir.path(), Recovery::Strict)?;
    assert_eq!(numbers.read(Clone::clone), (0..9).map(|n| n * 11).collect::<Vec<u64>>());
    assert_eq!(numbers.recovered().torn_bytes(), 21);
    assert_eq!(numbers.events(), 9);
    // Appending goes on after the cut, and the result reads back whole.
    assert_eq!(numbers.handle(1000)?, 10);
    drop(numbers);
    let numbers = open_numbers(dir.path(), Recovery::Strict)?;
    assert_eq!(numbers.recovered().torn_bytes(), 0);
    assert_eq!(numbers.read(|it| it.last().copied()), Some(1000));
    assert_eq!(numbers.events(), 10);
    Ok(())
}

#[test]
fn damage_in_the_middle_is_an_error_naming_the_position_and_changes_nothing() -> TestResult {
    let dir = fixture("mid-file-corruption")?;
    let journal = dir.path().join("journal-00000000000000000000.log");
    let before = fs::read(&journal)?;
    let err = open_numbers(dir.path(), Recovery::Strict).err().ok_or("damage went unnoticed")?;
    let Error::JournalCorrupt { path, offset, .. } = &err else {
        return Err(format!("wrong error: {err}").into());
    };
    assert_eq!((path, *offset), (&journal, 176));
    assert!(err.to_string().contains("byte 176"), "{err}");
    assert!(err.to_string().contains("Recovery::Salvage"), "{err}");
    assert_eq!(fs::read(&journal)?, before, "a failed open changes nothing");
    Ok(())
}

#[test]
fn salvage_keeps_the_events_before_the_damage_and_moves_the_rest_aside() -> TestResult {
    let dir = fixture("mid-file-corruption")?;
    let journal = dir.path().join("journal-00000000000000000000.log");
    let before = fs::read(&journal)?;
    let numbers = open_numbers(dir.path(), Recovery::Salvage)?;
    assert_eq!(numbers.read(Clone::clone), [0, 11, 22, 33]);
    let aside = numbers.recovered().salvaged().ok_or("nothing salvaged")?.to_path_buf();
    assert_eq!(
        fs::read(aside.join("journal-00000000000000000000.log"))?,
        before,
        "the damaged bytes are kept"
    );
    assert_eq!(numbers.handle(44)?, 5);
    drop(numbers);
    let numbers = open_numbers(dir.path(), Recovery::Strict)?;
    assert_eq!(numbers.read(Clone::clone), [0, 11, 22, 33, 44]);
    Ok(())
}

#[test]
fn a_journal_of_another_type_is_refused_and_left_alone() -> TestResult {
    let dir = fixture("torn-tail")?;
    let journal = dir.path().join("journal-00000000000000000000.log");
    let before = fs::read(&journal)?;
    let opened =
        Prevayler::open(dir.path(), Vec::<u64>::new(), |numbers: &mut Vec<u64>, n: u32, _| {
            numbers.push(n.into());
        });
    let Err(err @ Error::JournalType { .. }) = opened else {
        return Err("a journal of `u64` events opened for `u32`".into());
    };
    let message = err.to_string();
    assert!(message.contains("events `u64`") && message.contains("events `u32`"), "{message}");
    assert_eq!(fs::read(&journal)?, before, "not even the torn tail is cut");
    let opened =
        Prevayler::open(dir.path(), Vec::<i64>::new(), |numbers: &mut Vec<i64>, n: u64, _| {
            numbers.push(n.cast_signed());
        });
    assert!(matches!(opened, Err(Error::JournalType { .. })), "another state type");
    Ok(())
}

#[test]
fn the_replay_check_names_the_first_event_that_diverged() -> TestResult {
    // Not deterministic: event 2's effect depends on something outside the state.
    static SALT: AtomicU64 = AtomicU64::new(0);
    fn flaky(total: &mut u64, n: u64, _: Timestamp) {
        *total += if n == 2 { n + SALT.load(Ordering::SeqCst) } else { n };
    }
    let dir = tempfile::tempdir()?;
    let builder = || Prevayler::builder().replay_check(|total: &u64| *total);
    {
        let system = builder().open(dir.path(), 0, flaky)?;
        for n in 0..5 {
            system.handle(n)?;
        }
    }
    {
        let system = builder().open(dir.path(), 0, flaky)?;
        assert_eq!(system.read(|total| *total), 10, "deterministic so far");
    }
    SALT.store(100, Ordering::SeqCst);
    let err = builder().open(dir.path(), 0, flaky).err().ok_or("divergence went unnoticed")?;
    let Error::ReplayDiverged { event, stored, replayed, .. } = err else {
        return Err(format!("wrong error: {err}").into());
    };
    assert_eq!((event, stored, replayed), (2, 3, 103));
    // Without the check, the same journal opens (into the diverged state).
    let system = Prevayler::open(dir.path(), 0, flaky)?;
    assert_eq!(system.read(|total| *total), 110);
    Ok(())
}

#[test]
fn a_failed_journal_write_applies_nothing_and_refuses_later_events() -> TestResult {
    let dir = tempfile::tempdir()?;
    let bank = open_bank(dir.path())?;
    bank.handle(deposit("alice", 1))?.map_err(|err| format!("{err:?}"))?;
    // An immutable journal file refuses the next write.
    let mut files: Vec<_> = std::fs::read_dir(dir.path())?
        .map(|entry| entry.map(|entry| entry.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|path| path.extension().is_some_and(|it| it == "log"));
    files.sort();
    let newest = files.last().ok_or("no journal file")?;
    let failed = {
        let _frozen = Immutable::new(newest)?;
        bank.handle(deposit("alice", 2))
    };
    assert!(matches!(failed, Err(Error::JournalWrite { .. })), "{failed:?}");
    assert_eq!(
        bank.read(|bank| bank.balances.get("alice").copied().unwrap_or_default()),
        1,
        "memory never runs ahead of the journal"
    );
    let refused = bank.handle(deposit("alice", 3));
    assert!(matches!(refused, Err(Error::Poisoned { .. })), "{refused:?}");
    drop(bank);
    let bank = open_bank(dir.path())?;
    assert_eq!(bank.read(|bank| bank.balances.get("alice").copied().unwrap_or_default()), 1);
    assert_eq!(bank.handle(deposit("alice", 4))?, Ok(5));
    Ok(())
}

#[test]
fn a_panicking_event_is_voided_and_the_rest_survives() -> TestResult {
    fn touchy(numbers: &mut Vec<u64>, n: u64, _: Timestamp) {
        numbers.push(n);
        assert!(n != 13, "unlucky");
    }
    for durability in [Durability::SyncEach, Durability::GroupCommit, Durability::Unsynced] {
        let dir = tempfile::tempdir()?;
        {
            let system =
                Prevayler::builder().durability(durability).open(dir.path(), Vec::new(), touchy)?;
            system.handle(1)?;
            let panicked =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| system.handle(13)));
            assert!(panicked.is_err(), "{durability:?}: the panic reaches the caller");
            assert!(matches!(system.handle(2), Err(Error::Poisoned { .. })), "{durability:?}");
        }
        let system = Prevayler::open(dir.path(), Vec::new(), touchy)?;
        assert_eq!(system.read(Clone::clone), [1], "{durability:?}");
        assert_eq!(system.recovered().voided(), 1, "{durability:?}");
        system.handle(3)?;
        drop(system);
        let system = Prevayler::open(dir.path(), Vec::new(), touchy)?;
        assert_eq!(system.read(Clone::clone), [1, 3], "{durability:?}");
    }
    Ok(())
}

#[test]
fn a_transient_system_writes_nothing_and_still_refuses_unencodable_events() -> TestResult {
    #[derive(Deserialize)]
    struct Unencodable;
    impl Serialize for Unencodable {
        fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
            Err(serde::ser::Error::custom("no"))
        }
    }
    let bank = Prevayler::builder().transient(Bank::default(), apply);
    assert_eq!(bank.handle(deposit("alice", 3))?, Ok(3));
    assert_eq!(bank.snapshot()?, 1);
    assert_eq!(bank.path(), None);
    let odd = Prevayler::builder().transient(0u8, |_: &mut u8, _: Unencodable, _| ());
    assert!(matches!(odd.handle(Unencodable), Err(Error::EventEncode { .. })));
    assert_eq!(odd.events(), 0);
    Ok(())
}

#[test]
fn an_automatic_snapshot_policy_by_bytes_takes_snapshots() -> TestResult {
    let dir = tempfile::tempdir()?;
    {
        let numbers = Prevayler::builder().snapshot_every_bytes(1000).open(
            dir.path(),
            Vec::new(),
            |v: &mut Vec<u64>, n: u64, _| v.push(n),
        )?;
        for n in 0..200 {
            numbers.handle(n)?;
        }
        numbers.close()?;
    }
    let numbers = Prevayler::open(dir.path(), Vec::new(), |v: &mut Vec<u64>, n: u64, _| v.push(n))?;
    assert!(numbers.recovered().snapshot().is_some_and(|it| it > 0), "{:?}", numbers.recovered());
    assert_eq!(numbers.read(Clone::clone), (0..200).collect::<Vec<u64>>());
    Ok(())
}

fn file_names(dir: &Path) -> TestResult<Vec<String>> {
    let mut names: Vec<String> = fs::read_dir(dir)?
        .map(|entry| Ok(entry?.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    names.sort();
    Ok(names)
}

#[cfg(feature = "encryption")]
#[test]
fn an_encrypted_journal_needs_its_key_and_shows_no_plaintext() -> TestResult {
    use instastate::EncryptionKey;
    let dir = tempfile::tempdir()?;
    let open = |key: Option<[u8; 32]>| {
        let builder = Prevayler::builder();
        let builder = match key {
            Some(key) => builder.encryption_key(EncryptionKey::from_bytes(key)),
            None => builder,
        };
        builder.open(dir.path(), Bank::default(), apply)
    };
    {
        let bank = open(Some([7; 32]))?;
        bank.handle(deposit("secret-account-name", 1))?.map_err(|err| format!("{err:?}"))?;
        bank.snapshot()?;
        bank.handle(deposit("secret-account-name", 2))?.map_err(|err| format!("{err:?}"))?;
    }
    for name in file_names(dir.path())? {
        let bytes = fs::read(dir.path().join(&name))?;
        assert!(!bytes.windows(14).any(|it| it == b"secret-account"), "{name} holds plaintext");
    }
    assert!(matches!(open(None), Err(Error::Encryption { encrypted: true, .. })));
    assert!(matches!(open(Some([8; 32])), Err(Error::WrongKey { .. })));
    let bank = open(Some([7; 32]))?;
    assert_eq!(bank.read(|bank| bank.balances.get("secret-account-name").copied()), Some(3));
    assert_eq!(bank.recovered().snapshot(), Some(1));
    Ok(())
}

#[test]
fn salvage_skips_an_event_that_panics_on_replay_and_voids_it() -> TestResult {
    // An event that did not panic when handled, but panics on replay: what a process
    // killed between journaling an event and voiding it (or built with
    // `panic = "abort"`) leaves behind.
    static ARMED: AtomicU64 = AtomicU64::new(0);
    fn touchy(numbers: &mut Vec<u64>, n: u64, _: Timestamp) {
        assert!(!(n == 13 && ARMED.load(Ordering::SeqCst) == 1), "unlucky on replay");
        numbers.push(n);
    }
    let dir = tempfile::tempdir()?;
    {
        let system = Prevayler::open(dir.path(), Vec::new(), touchy)?;
        for n in [1, 13, 2] {
            system.handle(n)?;
        }
    }
    ARMED.store(1, Ordering::SeqCst);
    let strict = Prevayler::open(dir.path(), Vec::new(), touchy);
    assert!(matches!(strict, Err(Error::ReplayPanicked { event: 1, .. })), "{strict:?}");
    {
        let system =
            Prevayler::builder().recovery(Recovery::Salvage).open(dir.path(), vec![0], touchy)?;
        assert_eq!(system.read(Clone::clone), [0, 1, 2], "starts again from the initial state");
        assert_eq!(system.recovered().skipped(), [1]);
        system.handle(3)?;
    }
    let system = Prevayler::open(dir.path(), Vec::new(), touchy)?;
    assert_eq!(system.read(Clone::clone), [1, 2, 3], "the skipped event is voided for good");
    assert_eq!(system.recovered().voided(), 1);
    Ok(())
}

#[test]
fn damage_in_journal_files_a_snapshot_covers_does_not_matter() -> TestResult {
    let dir = tempfile::tempdir()?;
    {
        let numbers = Prevayler::builder().keep_snapshots(2).open(
            dir.path(),
            Vec::new(),
            |v: &mut Vec<u64>, n: u64, _| v.push(n),
        )?;
        for n in 0..30 {
            numbers.handle(n)?;
            if n == 9 || n == 19 {
                numbers.snapshot()?;
            }
        }
    }
    let covered = dir.path().join("journal-00000000000000000010.log");
    let mut bytes = fs::read(&covered)?;
    let middle = bytes.len() / 2;
    if let Some(byte) = bytes.get_mut(middle) {
        *byte ^= 0x55;
    }
    fs::write(&covered, bytes)?;
    let numbers = Prevayler::open(dir.path(), Vec::new(), |v: &mut Vec<u64>, n: u64, _| v.push(n))?;
    assert_eq!(numbers.read(Clone::clone), (0..30).collect::<Vec<u64>>());
    assert_eq!(numbers.recovered().snapshot(), Some(20));
    Ok(())
}

#[test]
fn a_half_applied_state_is_never_snapshotted() -> TestResult {
    fn half(numbers: &mut Vec<u64>, n: u64, _: Timestamp) {
        numbers.push(n);
        assert!(n != 7, "half done");
        numbers.push(n);
    }
    for durability in [Durability::SyncEach, Durability::GroupCommit] {
        let dir = tempfile::tempdir()?;
        let system =
            Prevayler::builder().durability(durability).open(dir.path(), Vec::new(), half)?;
        system.handle(1)?;
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| system.handle(7)));
        assert!(panicked.is_err());
        assert!(matches!(system.snapshot(), Err(Error::Poisoned { .. })), "{durability:?}");
        drop(system);
        let system = Prevayler::open(dir.path(), Vec::new(), half)?;
        assert_eq!(system.read(Clone::clone), [1, 1], "{durability:?}");
    }
    Ok(())
}
