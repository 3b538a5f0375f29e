//! Prevalent systems kept in a real PostgreSQL server (`test_server`), through
//! the public API.

use std::{thread, time::Duration};

use crate::{
    Error, Prevayler, Result,
    postgres::{failed, test_server},
};

type Counter = Prevayler<u64, u64, u64>;

fn add(n: &mut u64, by: u64, _: crate::Timestamp) -> u64 {
    *n += by;
    *n
}

fn open(url: &str) -> Result<Counter> {
    Prevayler::builder::<u64>()
        .lease_time(Duration::from_secs(5))
        .wait_for_lease(Duration::from_secs(10), Duration::from_millis(20))
        .open(url, 0, add)
}

#[test]
fn a_system_in_a_database_comes_back_from_its_snapshot_and_journal() -> Result<()> {
    let url = test_server::address("prevalence-back");
    let counter = open(&url)?;
    for n in 1..=10 {
        counter.handle(n)?;
    }
    assert_eq!(counter.snapshot()?, 10);
    for n in 11..=15 {
        counter.handle(n)?;
    }
    assert_eq!(counter.read(|n| *n), 120);
    counter.close()?;
    let counter = open(&url)?;
    assert_eq!(counter.read(|n| *n), 120);
    assert_eq!(counter.events(), 15);
    assert_eq!((counter.recovered().snapshot, counter.recovered().replayed), (Some(10), 5));
    assert_eq!(counter.path(), None);
    // Concurrent callers share transactions, and nothing is lost.
    thread::scope(|scope| {
        for _ in 0..8 {
            scope.spawn(|| -> Result<()> {
                for _ in 0..25 {
                    counter.handle(1)?;
                }
                Ok(())
            });
        }
    });
    assert_eq!(counter.read(|n| *n), 320);
    drop(counter);
    let counter = open(&url)?;
    assert_eq!((counter.read(|n| *n), counter.events()), (320, 215));
    Ok(())
}

#[test]
fn a_second_writer_waits_for_the_lease_and_a_closed_one_hands_over() -> Result<()> {
    let url = test_server::address("prevalence-lease");
    let first = open(&url)?;
    first.handle(7)?;
    let second = Prevayler::builder::<u64>()
        .wait_for_lease(Duration::from_millis(300), Duration::from_millis(20))
        .open(&url, 0, add);
    assert!(matches!(second, Err(Error::LeaseHeld { .. })), "{second:?}");
    first.close()?;
    let second = open(&url)?;
    assert_eq!(second.read(|n| *n), 7);
    Ok(())
}

#[test]
fn a_writer_whose_lease_was_taken_over_is_fenced_and_its_writes_are_not_stored() -> Result<()> {
    let url = test_server::address("prevalence-fenced");
    let location = crate::postgres::Location::parse(&url)?;
    let old = open(&url)?;
    old.handle(1)?;
    // As if the old writer had been paused past its lease: the lease runs out.
    let mut client = location.connect()?;
    client
        .execute(
            "UPDATE instastate.leases SET expires = clock_timestamp() WHERE namespace = $1",
            &[&location.namespace()],
        )
        .map_err(failed(&location, "test"))?;
    let new = open(&url)?;
    new.handle(10)?;
    for _ in 0..2 {
        let res = old.handle(100);
        assert!(matches!(res, Err(Error::Fenced { epoch: 1, current: Some(2), .. })), "{res:?}");
    }
    new.handle(10)?;
    new.close()?;
    drop(old);
    let again = open(&url)?;
    assert_eq!(again.read(|n| *n), 21, "a fenced write was stored");
    Ok(())
}

#[test]
fn automatic_snapshots_run_beside_concurrent_writers_and_keep_what_they_cover() -> Result<()> {
    let url = test_server::address("prevalence-auto");
    let counter = Prevayler::builder::<u64>().snapshot_every(7).open(&url, 0, add)?;
    thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| -> Result<()> {
                for _ in 0..40 {
                    counter.handle(1)?;
                }
                Ok(())
            });
        }
    });
    counter.snapshot()?;
    counter.close()?;
    let counter = open(&url)?;
    assert_eq!((counter.read(|n| *n), counter.events()), (160, 160));
    assert_eq!(counter.recovered().snapshot, Some(160));
    Ok(())
}

#[test]
fn a_writer_whose_connections_are_dropped_reconnects_and_loses_or_doubles_nothing() -> Result<()> {
    // Its connections carry a name of their own, so that only they are ended.
    let name = test_server::unique("dropped");
    let url = format!("{}&application_name={name}", test_server::address("prevalence-dropped"));
    let location = crate::postgres::Location::parse(&url)?;
    let counter = open(&url)?;
    let mut admin = test_server::location("admin")?.connect()?;
    let mut expected = 0;
    for round in 1..=4 {
        for n in 1..=5 {
            counter.handle(n)?;
            expected += n;
        }
        // As a restart of the database does: every connection of the writer ends.
        let ended = admin
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
                &[&name],
            )
            .map_err(failed(&location, "test"))?;
        assert!(!ended.is_empty(), "round {round}: no connection of the writer was found");
        if round == 2 {
            assert_eq!(counter.snapshot()?, 10);
        }
    }
    counter.handle(100)?;
    assert_eq!(counter.read(|n| *n), expected + 100);
    drop(counter);
    let again = open(&url)?;
    assert_eq!((again.read(|n| *n), again.events()), (expected + 100, 21));
    Ok(())
}

fn follow(url: &str, wait: Duration) -> Result<crate::prevalence::Follower<u64, u64, u64>> {
    Prevayler::builder::<u64>()
        .lease_time(Duration::from_secs(5))
        .wait_for_lease(wait, Duration::from_millis(20))
        .follow(url, 0, add, Duration::from_millis(50))
}

#[test]
fn a_follower_applies_the_writers_events_as_they_commit_and_reports_its_lag() -> Result<()> {
    let url = test_server::address("prevalence-follow");
    let writer = open(&url)?;
    for n in 1..=10 {
        writer.handle(n)?;
    }
    let follower = follow(&url, Duration::from_secs(10))?;
    assert_eq!((follower.applied(), follower.read(|n| *n)), (10, 55));
    for n in 11..=15 {
        writer.handle(n)?;
    }
    assert!(follower.wait_for(15, Duration::from_secs(10))?, "the follower fell behind");
    assert_eq!(follower.read(|n| *n), 120);
    let lag = follower.lag()?;
    assert_eq!((lag.applied, lag.head, lag.events()), (15, 15, 0));
    // Snapshots retire the frames they hold: the follower goes on.
    writer.snapshot()?;
    writer.handle(1)?;
    writer.snapshot()?;
    writer.handle(1)?;
    assert!(follower.wait_for(17, Duration::from_secs(10))?);
    assert_eq!(follower.read(|n| *n), 122);
    // A follower that starts after them loads the newest snapshot.
    let late = follow(&url, Duration::from_secs(10))?;
    assert_eq!((late.applied(), late.read(|n| *n)), (17, 122));
    Ok(())
}

#[test]
fn a_follower_is_promoted_once_the_writer_is_gone_and_goes_on_from_its_state() -> Result<()> {
    let url = test_server::address("prevalence-promote");
    let writer = open(&url)?;
    for n in 1..=5 {
        writer.handle(n)?;
    }
    let follower = follow(&url, Duration::from_millis(300))?;
    let refused = follow(&url, Duration::from_millis(300))?.promote();
    assert!(matches!(refused, Err(Error::LeaseHeld { .. })), "{refused:?}");
    writer.handle(6)?;
    writer.close()?;
    let promoted = follower.promote()?;
    assert_eq!((promoted.events(), promoted.read(|n| *n)), (6, 21));
    promoted.handle(100)?;
    drop(promoted);
    let again = open(&url)?;
    assert_eq!((again.events(), again.read(|n| *n)), (7, 121));
    Ok(())
}

#[test]
fn a_writer_whose_connection_broke_after_a_takeover_is_fenced_not_told_it_wrote() -> Result<()> {
    // Found by `tests/failover.rs`: the successor numbers its events from where the
    // old writer stopped, so that reading back "is event N stored?" found the
    // successor's event N, and the old writer took it for its own.
    let name = test_server::unique("taken");
    let url = format!("{}&application_name={name}", test_server::address("prevalence-taken"));
    let location = crate::postgres::Location::parse(&url)?;
    let old = open(&url)?;
    old.handle(1)?;
    let mut admin = test_server::location("admin")?.connect()?;
    admin
        .execute(
            "UPDATE instastate.leases SET expires = clock_timestamp() WHERE namespace = $1",
            &[&location.namespace()],
        )
        .map_err(failed(&location, "test"))?;
    let new = Prevayler::builder::<u64>()
        .wait_for_lease(Duration::from_secs(10), Duration::from_millis(20))
        .open(url.replace(&name, "successor"), 0, add)?;
    new.handle(10)?;
    // The old writer's connections break (its next write's outcome is unknown).
    admin
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            &[&name],
        )
        .map_err(failed(&location, "test"))?;
    let res = old.handle(100);
    assert!(matches!(res, Err(Error::Fenced { .. })), "{res:?}");
    assert_eq!(new.handle(10)?, 21);
    Ok(())
}

#[test]
fn a_follower_behind_frames_a_snapshot_retired_loads_that_snapshot_and_goes_on() -> Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    // Only the follower's thread waits at the gate: the writer runs on.
    static GATE: AtomicBool = AtomicBool::new(false);
    fn gated(n: &mut u64, by: u64, _: crate::Timestamp) -> u64 {
        while GATE.load(Ordering::Acquire)
            && thread::current().name() == Some("instastate-follower")
        {
            thread::sleep(Duration::from_millis(5));
        }
        *n += by;
        *n
    }
    let url = test_server::address("prevalence-retired");
    let builder = || {
        Prevayler::builder::<u64>()
            .keep_snapshots(1)
            .wait_for_lease(Duration::from_secs(10), Duration::from_millis(20))
    };
    let writer = builder().open(&url, 0, gated)?;
    writer.handle(1)?;
    let follower = builder().follow(&url, 0, gated, Duration::from_millis(20))?;
    GATE.store(true, Ordering::Release);
    // The follower is held at its next event while the writer goes on, and a
    // snapshot that keeps no other retires the frames it would need.
    for n in 2..=20 {
        writer.handle(n)?;
    }
    writer.snapshot()?;
    writer.handle(100)?;
    GATE.store(false, Ordering::Release);
    assert!(follower.wait_for(21, Duration::from_secs(10))?, "the follower stopped");
    assert_eq!(follower.read(|n| *n), 310);
    Ok(())
}
