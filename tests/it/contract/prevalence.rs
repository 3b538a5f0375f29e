//! The contract of prevalence (see `mod.rs`).

use std::{panic, thread};

use instastate::{
    Error, Prevayler, Timestamp,
    prevalence::{Durability, PrevaylerBuilder},
};

use super::{Place, contract};
use crate::TestResult;

contract!(
    reopening_gives_the_state_of_every_acknowledged_event_with_its_timestamp,
    rejected_events_are_journaled_and_rejected_again,
    recovery_starts_from_the_newest_snapshot,
    concurrent_callers_lose_and_repeat_nothing_in_every_durability_mode,
    a_panicking_event_is_voided_and_later_calls_are_refused,
    another_type_is_refused_and_changes_nothing,
    an_older_event_version_is_read_through_its_migration_and_a_newer_one_refused,
    the_replay_check_passes_a_deterministic_system,
);

/// Every change, with its timestamp: what replay must reproduce.
type Log = Vec<(i64, u64)>;

fn log(entries: &mut Log, n: i64, at: Timestamp) -> Result<usize, String> {
    if n < 0 {
        return Err(format!("{n} is negative"));
    }
    entries.push((n, at.as_micros()));
    Ok(entries.len())
}

fn open_log(place: &Place) -> instastate::Result<Prevayler<Log, i64, Result<usize, String>>> {
    Prevayler::open(&place.location, Vec::new(), log)
}

fn reopening_gives_the_state_of_every_acknowledged_event_with_its_timestamp(
    place: &Place,
) -> TestResult {
    let system = open_log(place)?;
    for n in 0..20 {
        system.handle(n)??;
    }
    let before = system.read(Clone::clone);
    let stamps: Vec<u64> = before.iter().map(|it| it.1).collect();
    assert!(stamps.is_sorted(), "timestamps never go back");
    system.close()?;
    let system = open_log(place)?;
    assert_eq!(system.read(Clone::clone), before);
    assert_eq!((system.events(), system.recovered().replayed()), (20, 20));
    Ok(())
}

fn rejected_events_are_journaled_and_rejected_again(place: &Place) -> TestResult {
    let system = open_log(place)?;
    system.handle(1)??;
    assert_eq!(system.handle(-1)?, Err("-1 is negative".to_owned()));
    system.handle(2)??;
    assert_eq!(system.events(), 3, "a rejected event is journaled");
    drop(system);
    let system = open_log(place)?;
    assert_eq!(system.read(|log| log.iter().map(|it| it.0).collect::<Vec<_>>()), [1, 2]);
    assert_eq!(system.events(), 3);
    Ok(())
}

fn recovery_starts_from_the_newest_snapshot(place: &Place) -> TestResult {
    let system = open_log(place)?;
    for n in 0..10 {
        system.handle(n)??;
    }
    assert_eq!(system.snapshot()?, 10);
    for n in 10..13 {
        system.handle(n)??;
    }
    assert_eq!(system.snapshot()?, 13);
    system.handle(13)??;
    let before = system.read(Clone::clone);
    drop(system);
    let system = open_log(place)?;
    assert_eq!(system.read(Clone::clone), before);
    assert_eq!((system.recovered().snapshot(), system.recovered().replayed()), (Some(13), 1));
    Ok(())
}

fn concurrent_callers_lose_and_repeat_nothing_in_every_durability_mode(
    place: &Place,
) -> TestResult {
    let modes = [Durability::SyncEach, Durability::GroupCommit, Durability::Unsynced];
    let mut expected = 0;
    for (round, mode) in modes.into_iter().enumerate() {
        let system = PrevaylerBuilder::new().durability(mode).open(
            &place.location,
            0u64,
            |total: &mut u64, n: u64, _: Timestamp| *total += n,
        )?;
        assert_eq!(system.read(|total| *total), expected, "round {round}");
        thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| -> instastate::Result<()> {
                    for n in 1..=25 {
                        system.handle(n)?;
                    }
                    Ok(())
                });
            }
        });
        expected += 8 * (25 * 26 / 2);
        assert_eq!(system.read(|total| *total), expected, "{mode:?}");
        system.close()?;
    }
    let system = Prevayler::open(&place.location, 0u64, |total: &mut u64, n: u64, _| *total += n)?;
    assert_eq!((system.read(|total| *total), system.events()), (expected, 3 * 200));
    Ok(())
}

fn a_panicking_event_is_voided_and_later_calls_are_refused(place: &Place) -> TestResult {
    fn touchy(numbers: &mut Vec<u64>, n: u64, _: Timestamp) {
        numbers.push(n);
        assert!(n != 13, "unlucky");
    }
    {
        let system = Prevayler::open(&place.location, Vec::new(), touchy)?;
        system.handle(1)?;
        let panicked = panic::catch_unwind(panic::AssertUnwindSafe(|| system.handle(13)));
        assert!(panicked.is_err(), "the panic reaches the caller");
        let refused = system.handle(2);
        assert!(matches!(refused, Err(Error::Poisoned { .. })), "{refused:?}");
        assert!(matches!(system.snapshot(), Err(Error::Poisoned { .. })));
    }
    let system = Prevayler::open(&place.location, Vec::new(), touchy)?;
    assert_eq!(system.read(Clone::clone), [1]);
    assert_eq!(system.recovered().voided(), 1);
    system.handle(3)?;
    drop(system);
    let system = Prevayler::open(&place.location, Vec::new(), touchy)?;
    assert_eq!(system.read(Clone::clone), [1, 3]);
    Ok(())
}

fn another_type_is_refused_and_changes_nothing(place: &Place) -> TestResult {
    let system = open_log(place)?;
    system.handle(7)??;
    drop(system);
    let other =
        Prevayler::open(&place.location, Vec::<u64>::new(), |log: &mut Vec<u64>, n: u32, _| {
            log.push(n.into());
        });
    assert!(matches!(other, Err(Error::JournalType { .. })), "{other:?}");
    let system = open_log(place)?;
    assert_eq!((system.events(), system.read(Vec::len)), (1, 1));
    Ok(())
}

mod v1 {
    /// The event as version 1 had it.
    #[derive(serde::Serialize, serde::Deserialize)]
    pub(super) struct Deposit {
        pub(super) amount: i64,
    }
}

/// The event as version 2 has it.
#[derive(serde::Serialize, serde::Deserialize)]
struct Deposit {
    amount: i64,
    memo: String,
}

fn an_older_event_version_is_read_through_its_migration_and_a_newer_one_refused(
    place: &Place,
) -> TestResult {
    {
        let old = Prevayler::open(&place.location, 0i64, |total: &mut i64, d: v1::Deposit, _| {
            *total += d.amount;
        })?;
        old.handle(v1::Deposit { amount: 5 })?;
    }
    let apply = |total: &mut i64, d: Deposit, _: Timestamp| {
        *total += d.amount + i64::try_from(d.memo.len()).unwrap_or(i64::MAX);
    };
    {
        let new = PrevaylerBuilder::new()
            .event_version(2)
            .migrate_event(1, |old: v1::Deposit| Deposit {
                amount: old.amount,
                memo: String::new(),
            })
            .open(&place.location, 0i64, apply)?;
        assert_eq!(new.read(|total| *total), 5);
        new.handle(Deposit { amount: 1, memo: "ab".into() })?;
    }
    // Written with version 2: a build that knows only version 1 refuses it.
    let older = Prevayler::open(&place.location, 0i64, |total: &mut i64, d: v1::Deposit, _| {
        *total += d.amount;
    });
    assert!(matches!(older, Err(Error::JournalSchema { .. })), "{older:?}");
    let new = PrevaylerBuilder::new()
        .event_version(2)
        .migrate_event(1, |old: v1::Deposit| Deposit { amount: old.amount, memo: String::new() })
        .open(&place.location, 0i64, apply)?;
    assert_eq!(new.read(|total| *total), 8);
    Ok(())
}

fn the_replay_check_passes_a_deterministic_system(place: &Place) -> TestResult {
    let open = || {
        PrevaylerBuilder::new().replay_check(|total: &u64| *total).open(
            &place.location,
            0u64,
            |total: &mut u64, n: u64, _: Timestamp| *total = total.wrapping_mul(31).wrapping_add(n),
        )
    };
    let system = open()?;
    for n in 0..30 {
        system.handle(n)?;
    }
    let before = system.read(|total| *total);
    drop(system);
    let system = open()?;
    assert_eq!(system.read(|total| *total), before);
    Ok(())
}
