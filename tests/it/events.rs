//! The third front door: the event store. Streams, versions, positions,
//! expectations, idempotent and multi-stream appends, reads, reopening.

// Tests index what they just read, and count with small numbers: a panic or a
// wrong cast is a failed test, which is what the assertions would report anyway.
#![allow(clippy::indexing_slicing, clippy::cast_possible_wrap, clippy::cast_possible_truncation)]

use std::{
    collections::BTreeMap,
    fs,
    sync::{Arc, Barrier},
    thread,
};

use instastate::{
    Error,
    events::{
        Append, Condition, Delivery, Durability, EventId, EventStore, Expected, NewEvent, Position,
        RawEvents, RecordedEvent, Subscription,
    },
};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};

use crate::TestResult;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Bank {
    Opened { owner: String },
    Deposited { amount: i64 },
    Withdrew { amount: i64 },
}

fn deposit(amount: i64) -> Bank {
    Bank::Deposited { amount }
}

fn collect<E>(
    events: impl IntoIterator<Item = instastate::Result<RecordedEvent<E>>>,
) -> TestResult<Vec<RecordedEvent<E>>> {
    Ok(events.into_iter().collect::<Result<Vec<_>, _>>()?)
}

/// `(stream, version, position)` of each event.
fn places<E>(events: &[RecordedEvent<E>]) -> Vec<(String, u64, u64)> {
    events.iter().map(|it| (it.stream.clone(), it.version, it.position.get())).collect()
}

fn wrong_version<T: std::fmt::Debug>(res: instastate::Result<T>) -> TestResult<Option<u64>> {
    match res {
        Err(Error::WrongExpectedVersion { actual, .. }) => Ok(actual),
        other => Err(format!("expected WrongExpectedVersion, got {other:?}").into()),
    }
}

#[test]
fn appends_get_versions_and_positions_and_read_back_every_way() -> TestResult {
    let dir = tempfile::tempdir()?;
    let events = EventStore::<Bank>::open(dir.path())?;
    let opened =
        events.append("a", Expected::NoStream, [Bank::Opened { owner: "alice".into() }])?;
    assert_eq!((opened.last_version(), opened.versions, opened.positions), (Some(0), 0..1, 0..1));
    events.append("b", Expected::Any, [deposit(1), deposit(2)])?;
    let more =
        events.append("a", Expected::Exact(0), [deposit(10), Bank::Withdrew { amount: 3 }])?;
    assert_eq!((more.versions, more.positions), (1..3, 3..5));
    assert_eq!(
        (events.stream_version("a")?, events.stream_version("b")?, events.stream_version("c")?),
        (Some(2), Some(1), None)
    );
    assert_eq!(events.head()?, Position::new(5));
    assert_eq!(events.streams()?, [("a".to_owned(), 2), ("b".to_owned(), 1)]);

    let all = collect(events.read_all())?;
    let expected: Vec<(String, u64, u64)> =
        [("a", 0, 0), ("b", 0, 1), ("b", 1, 2), ("a", 1, 3), ("a", 2, 4)]
            .map(|(s, v, p)| (s.to_owned(), v, p))
            .to_vec();
    assert_eq!(places(&all), expected);
    assert_eq!(all[1].data, deposit(1));
    assert_eq!((all[1].event_type.as_str(), all[4].event_type.as_str()), ("Deposited", "Withdrew"));
    assert!(all[0].at <= all[1].at && all[1].at == all[2].at, "one timestamp per batch, in order");

    let backward = collect(events.read_all().backward())?;
    assert_eq!(places(&backward), expected.iter().rev().cloned().collect::<Vec<_>>());
    let window = collect(events.read_all().from(Position::new(1)).limit(2))?;
    assert_eq!(places(&window), expected[1..3]);
    let back_from = collect(events.read_all().from(Position::new(2)).backward())?;
    assert_eq!(back_from.iter().map(|it| it.position.get()).collect::<Vec<_>>(), [2, 1, 0]);
    let deposits = collect(events.read_all().of_type("Deposited"))?;
    assert_eq!(deposits.iter().map(|it| it.position.get()).collect::<Vec<_>>(), [1, 2, 3]);
    let of_b = collect(events.read_all().stream_prefix("b").backward().limit(1))?;
    assert_eq!(places(&of_b), [("b".to_owned(), 1, 2)]);

    let a = collect(events.read_stream("a"))?;
    assert_eq!(a.iter().map(|it| it.version).collect::<Vec<_>>(), [0, 1, 2]);
    let a_back = collect(events.read_stream("a").backward().limit(2))?;
    assert_eq!(a_back.iter().map(|it| it.version).collect::<Vec<_>>(), [2, 1]);
    let a_from = collect(events.read_stream("a").from(1).backward())?;
    assert_eq!(a_from.iter().map(|it| it.version).collect::<Vec<_>>(), [1, 0]);
    assert!(collect(events.read_stream("nothing"))?.is_empty());
    assert!(collect(events.read_stream("a").from(7))?.is_empty());

    assert_eq!(events.event_at(Position::new(3))?.map(|it| it.data), Some(deposit(10)));
    assert!(events.event_at(Position::new(5))?.is_none());
    assert_eq!(events.event("b", 1)?.map(|it| it.position), Some(Position::new(2)));
    assert!(events.event("b", 2)?.is_none());
    Ok(())
}

#[test]
fn every_expectation_is_checked_and_a_refused_append_writes_nothing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let events = EventStore::<Bank>::open(dir.path())?;
    assert_eq!(wrong_version(events.append("s", Expected::StreamExists, [deposit(1)]))?, None);
    assert_eq!(wrong_version(events.append("s", Expected::Exact(0), [deposit(1)]))?, None);
    events.append("s", Expected::NoStream, [deposit(1)])?;
    assert_eq!(wrong_version(events.append("s", Expected::NoStream, [deposit(2)]))?, Some(0));
    assert_eq!(wrong_version(events.append("s", Expected::Exact(3), [deposit(2)]))?, Some(0));
    events.append("s", Expected::StreamExists, [deposit(2)])?;
    events.append("s", Expected::Any, [deposit(3)])?;
    events.append("s", Expected::Exact(2), [deposit(4)])?;
    let err = events
        .append("s", Expected::Exact(1), [deposit(5)])
        .err()
        .ok_or("a stale append was taken")?;
    assert_eq!(err.to_string(), "stream `s`: expected version 1, but it is at version 3");
    let amounts: Vec<Bank> =
        collect(events.read_stream("s"))?.into_iter().map(|it| it.data).collect();
    assert_eq!(amounts, (1..=4).map(deposit).collect::<Vec<_>>());
    // An append of no event checks the expectation and writes nothing.
    let checked = events.append("s", Expected::Exact(3), Vec::<Bank>::new())?;
    assert_eq!((checked.last_version(), checked.versions), (Some(3), 4..4));
    assert_eq!(wrong_version(events.append("s", Expected::Exact(2), Vec::<Bank>::new()))?, Some(3));
    assert_eq!(events.head()?, Position::new(4));
    Ok(())
}

#[test]
fn racing_writers_each_win_one_version_and_the_others_learn_the_actual_one() -> TestResult {
    const THREADS: usize = 8;
    const ROUNDS: usize = 25;
    let dir = tempfile::tempdir()?;
    let events =
        EventStore::<i64>::builder().durability(Durability::GroupCommit).open(dir.path())?;
    // Concurrent creates of one stream: exactly one wins.
    let barrier = Arc::new(Barrier::new(THREADS));
    let created: Vec<bool> = thread::scope(|scope| {
        let handles: Vec<_> = (0..THREADS)
            .map(|n| {
                let (events, barrier) = (events.clone(), Arc::clone(&barrier));
                scope.spawn(move || {
                    barrier.wait();
                    match events.append("race", Expected::NoStream, [n as i64]) {
                        Ok(_) => true,
                        Err(Error::WrongExpectedVersion { actual: Some(0), .. }) => false,
                        Err(err) => panic!("an unexpected error: {err}"),
                    }
                })
            })
            .collect();
        handles.into_iter().map(|handle| handle.join().expect("a writer panicked")).collect()
    });
    assert_eq!(created.iter().filter(|won| **won).count(), 1);
    // Then each round, every writer appends with the version it read: one wins.
    let wins: Vec<usize> = thread::scope(|scope| {
        let handles: Vec<_> = (0..THREADS)
            .map(|n| {
                let events = events.clone();
                scope.spawn(move || {
                    let mut won = 0;
                    for round in 0..ROUNDS {
                        loop {
                            let read = events
                                .stream_version("race")
                                .expect("the version is read")
                                .expect("the stream exists");
                            match events.append(
                                "race",
                                Expected::Exact(read),
                                [(n * 1000 + round) as i64],
                            ) {
                                Ok(appended) => {
                                    assert_eq!(appended.versions.start, read + 1);
                                    won += 1;
                                    break;
                                }
                                Err(Error::WrongExpectedVersion {
                                    actual: Some(actual), ..
                                }) => {
                                    assert!(read < actual, "told {actual} after reading {read}");
                                }
                                Err(err) => panic!("an unexpected error: {err}"),
                            }
                        }
                    }
                    won
                })
            })
            .collect();
        handles.into_iter().map(|handle| handle.join().expect("a writer panicked")).collect()
    });
    assert_eq!(wins, vec![ROUNDS; THREADS]);
    let stream = collect(events.read_stream("race"))?;
    assert_eq!(stream.len(), 1 + THREADS * ROUNDS);
    assert!(
        stream
            .iter()
            .enumerate()
            .all(|(k, it)| it.version == k as u64 && it.position.get() == k as u64)
    );
    Ok(())
}

#[test]
fn a_retried_append_returns_the_earlier_result_and_writes_nothing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let events = EventStore::<Bank>::open(dir.path())?;
    let ids: Vec<EventId> = (0..3).map(|_| EventId::new()).collect();
    let batch = |ids: &[EventId]| -> Vec<NewEvent<Bank>> {
        ids.iter()
            .enumerate()
            .map(|(k, id)| NewEvent::new(deposit(k as i64)).with_id(*id))
            .collect()
    };
    let first = events.append("acc", Expected::NoStream, batch(&ids[..2]))?;
    // The reply was lost; the retry must not duplicate, with any expectation.
    assert_eq!(events.append("acc", Expected::NoStream, batch(&ids[..2]))?, first);
    assert_eq!(events.append("acc", Expected::Any, batch(&ids[..2]))?, first);
    assert_eq!(events.append("acc", Expected::StreamExists, batch(&ids[..2]))?, first);
    let second = events.append("acc", Expected::Exact(1), batch(&ids[2..]))?;
    assert_eq!(events.append("acc", Expected::Exact(1), batch(&ids[2..]))?, second);
    assert_eq!(events.head()?, Position::new(3));
    // Reopened, a retry is still recognised.
    drop(events);
    let events = EventStore::<Bank>::open(dir.path())?;
    assert_eq!(events.append("acc", Expected::Exact(1), batch(&ids[2..]))?, second);
    // Not a retry: the same ids somewhere else, or only some of them.
    let moved = events.append("other", Expected::Any, batch(&ids[..1]));
    assert!(matches!(moved, Err(Error::DuplicateEventId { .. })), "{moved:?}");
    let partly = events.append(
        "acc",
        Expected::Any,
        vec![NewEvent::new(deposit(0)).with_id(ids[0]), NewEvent::new(deposit(9))],
    );
    assert!(matches!(partly, Err(Error::DuplicateEventId { .. })), "{partly:?}");
    assert_eq!(events.head()?, Position::new(3));
    let ids_read: Vec<EventId> = collect(events.read_all())?.into_iter().map(|it| it.id).collect();
    assert_eq!(ids_read, ids);
    Ok(())
}

#[test]
fn an_append_of_several_streams_is_all_or_nothing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let events = EventStore::<Bank>::open(dir.path())?;
    events.append("from", Expected::Any, [deposit(100)])?;
    let transfer = |expected_from| {
        [
            Append::new("from", expected_from, [Bank::Withdrew { amount: 30 }]),
            Append::new("to", Expected::NoStream, [deposit(30)]),
        ]
    };
    assert_eq!(wrong_version(events.append_all(transfer(Expected::Exact(5))))?, Some(0));
    assert_eq!(
        (events.head()?, events.stream_version("to")?),
        (Position::new(1), None),
        "nothing written"
    );
    let done = events.append_all(transfer(Expected::Exact(0)))?;
    assert_eq!(
        done.iter().map(|it| (it.stream.as_str(), it.positions.clone())).collect::<Vec<_>>(),
        [("from", 1..2), ("to", 2..3)]
    );
    let twice = events.append_all([
        Append::new("x", Expected::Any, [deposit(1)]),
        Append::new("x", Expected::Any, [deposit(2)]),
    ]);
    assert!(matches!(twice, Err(Error::InvalidAppend { .. })), "{twice:?}");
    let bad = events.append_all([
        Append::new("ok", Expected::Any, [deposit(1)]),
        Append::new("$all", Expected::Any, [deposit(2)]),
    ]);
    assert!(matches!(bad, Err(Error::InvalidStreamId { .. })), "{bad:?}");
    assert_eq!(events.head()?, Position::new(3));
    Ok(())
}

#[test]
fn a_stream_read_again_reads_what_its_events_in_all_read() -> TestResult {
    // A stream read keeps the stream's events parsed, by chunks of versions, and
    // reads them from there again; `$all` reads the batches. At every step each
    // way of reading the stream must give what `$all` gives of it, field for
    // field, as the stream grows (one by one, by a batch across chunks, in
    // appends of several streams), and as its events are removed and compacted;
    // with a read cache, and without (every read from the batches).
    for cache in [None, Some(0)] {
        stream_reads_against_all(cache)?;
    }
    Ok(())
}

/// Which reads of a stream a check makes first: which reads find its chunks
/// made, which make them (whole, partial, going forward or backward).
#[derive(Clone, Copy, Debug)]
enum First {
    Forward,
    Backward,
    Pieces,
}

fn stream_reads_against_all(cache: Option<u64>) -> TestResult {
    let dir = tempfile::tempdir()?;
    let open = || {
        let builder = EventStore::<Bank>::builder();
        match cache {
            Some(bytes) => builder.read_cache(bytes),
            None => builder,
        }
        .open(dir.path())
    };
    // After each step: the live store (its chunks made by the reads before, the
    // last versions' chunk going on), then reopened stores (no chunk made yet).
    let check = |events: EventStore<Bank>, when: &str| -> TestResult<EventStore<Bank>> {
        check_stream(&events, &format!("{when}, read on"), First::Forward)?;
        drop(events);
        let events = open()?;
        check_stream(&events, &format!("{when}, reopened"), First::Backward)?;
        drop(events);
        let events = open()?;
        check_stream(&events, &format!("{when}, reopened"), First::Pieces)?;
        Ok(events)
    };
    let mut events = open()?;
    let cause = EventId::new();
    for n in 0..70 {
        let event = NewEvent::new(deposit(n)).tagged([format!("tag-{}", n % 3)]).caused_by(cause);
        events.append("a", Expected::Any, [event])?;
        events.append("b", Expected::Any, [Bank::Withdrew { amount: n }])?;
        if n % 20 == 0 {
            events = check(events, &format!("after {n} appends"))?;
        }
    }
    events = check(events, "after 70 appends")?;
    events.append("a", Expected::Any, (0..100).map(|n| Bank::Withdrew { amount: n }))?;
    events = check(events, "after a batch across chunks")?;
    events.append_all([
        Append::new("b", Expected::Any, [deposit(1)]),
        Append::new("a", Expected::Any, [deposit(2), deposit(3)]),
        Append::new("c", Expected::Any, [deposit(4)]),
    ])?;
    events = check(events, "after an append of three streams")?;
    events.truncate_stream("a", 60)?;
    events = check(events, "after a truncation")?;
    events.compact()?;
    events = check(events, "after a compaction")?;
    events.append("a", Expected::Any, [deposit(5)])?;
    events = check(events, "after one more append")?;
    // Removed while a read goes on, through versions it holds parsed already:
    // passed over from there on.
    let mut reading = events.read_stream("a").into_iter();
    let first = reading.next().ok_or("the stream reads empty")??.version;
    events.truncate_stream("a", first + 50)?;
    let rest: Vec<u64> = collect(reading)?.iter().map(|it| it.version).collect();
    assert!(
        rest.first() == Some(&(first + 50)),
        "read on from {:?} after the truncation",
        rest.first()
    );
    events = check(events, "after a truncation during a read")?;
    events.delete_stream("a", Expected::Any)?;
    events = check(events, "after a delete")?;
    assert!(collect(events.read_stream("a"))?.is_empty(), "a deleted stream reads empty");
    events.append("a", Expected::Any, [deposit(6), deposit(7)])?;
    events = check(events, "recreated")?;
    events.tombstone_stream("a", Expected::Any)?;
    let read: instastate::Result<Vec<_>> = events.read_stream("a").into_iter().collect();
    assert!(matches!(read, Err(Error::StreamTombstoned { .. })), "tombstoned: {read:?}");
    Ok(())
}

/// Reads stream `a` of `events` every way, `order` first, and checks each read
/// against what `$all` reads of it.
fn check_stream(events: &EventStore<Bank>, when: &str, order: First) -> TestResult {
    let want: Vec<RecordedEvent<Bank>> =
        collect(events.read_all())?.into_iter().filter(|it| it.stream == "a").collect();
    let whole = |backward: bool| -> TestResult {
        let read = events.read_stream("a");
        let mut got = collect(if backward { read.backward() } else { read })?;
        if backward {
            got.reverse();
        }
        assert!(got == want, "{when} ({order:?}): the stream (backward: {backward}) differs");
        Ok(())
    };
    let pieces = || -> TestResult {
        for event in want.iter().step_by(5) {
            let one = events.event("a", event.version)?;
            assert!(one.as_ref() == Some(event), "{when}: version {} alone differs", event.version);
            let few = collect(events.read_stream("a").from(event.version).limit(3))?;
            let expected = want.iter().filter(|it| event.version <= it.version).take(3);
            assert!(few.iter().eq(expected), "{when}: three from {} differ", event.version);
            let back = collect(events.read_stream("a").from(event.version).backward().limit(2))?;
            let expected = want.iter().rev().filter(|it| it.version <= event.version).take(2);
            assert!(back.iter().eq(expected), "{when}: two back from {} differ", event.version);
        }
        let deposits = collect(events.read_stream("a").of_type("Deposited").limit(4))?;
        let expected = want.iter().filter(|it| it.event_type == "Deposited").take(4);
        assert!(deposits.iter().eq(expected), "{when}: the first deposits differ");
        let withdrawals = collect(events.read_stream("a").of_type("Withdrew").backward())?;
        let expected = want.iter().rev().filter(|it| it.event_type == "Withdrew");
        assert!(withdrawals.iter().eq(expected), "{when}: the withdrawals differ");
        Ok(())
    };
    match order {
        First::Forward => {
            whole(false)?;
            whole(true)?;
            pieces()
        }
        First::Backward => {
            whole(true)?;
            pieces()?;
            whole(false)
        }
        First::Pieces => {
            pieces()?;
            whole(false)?;
            whole(true)
        }
    }
}

#[test]
fn a_damaged_batch_in_a_stream_ends_its_reads_where_it_is_and_not_before() -> TestResult {
    // One frame per event; the frame of version 40 damaged while the store is
    // open. Forward, the read yields versions 0 to 39, then the error naming the
    // journal file; backward, versions 99 down to 41, then the error; with the
    // read cache and without, and a second time alike.
    for cache in [None, Some(0)] {
        let dir = tempfile::tempdir()?;
        {
            let events = EventStore::<String>::open(dir.path())?;
            for n in 0..100 {
                events.append("n", Expected::Any, [format!("marker-{n:03}-payload")])?;
            }
        }
        let builder = EventStore::<String>::builder();
        let events = match cache {
            Some(bytes) => builder.read_cache(bytes),
            None => builder,
        }
        .open(dir.path())?;
        let mut logs: Vec<_> = fs::read_dir(dir.path())?
            .map(|entry| entry.map(|it| it.path()))
            .collect::<Result<Vec<_>, _>>()?;
        logs.retain(|path| path.extension().is_some_and(|it| it == "log"));
        let damaged = logs.iter().find_map(|path| {
            let mut bytes = fs::read(path).ok()?;
            let at = bytes.windows(10).position(|it| it == b"marker-040")?;
            *bytes.get_mut(at + 12)? ^= 0x10;
            fs::write(path, &bytes).ok().map(|()| path.clone())
        });
        let damaged = damaged.ok_or("no journal file holds version 40")?;
        for round in 0..2 {
            for backward in [false, true] {
                let read = events.read_stream("n");
                let read = if backward { read.backward() } else { read };
                let mut versions = Vec::new();
                let mut error = None;
                for event in read {
                    match event {
                        Ok(event) => versions.push(event.version),
                        Err(err) => {
                            error = Some(err);
                            break;
                        }
                    }
                }
                let want: Vec<u64> =
                    if backward { (41..100).rev().collect() } else { (0..40).collect() };
                let what = format!("cache {cache:?}, round {round}, backward {backward}");
                assert!(
                    versions == want,
                    "{what}: read {} versions before the damage",
                    versions.len()
                );
                match error {
                    Some(Error::JournalCorrupt { path, .. }) => {
                        assert!(path == damaged, "{what}: the error names {path:?}");
                    }
                    other => return Err(format!("{what}: ended with {other:?}").into()),
                }
            }
        }
    }
    Ok(())
}

#[test]
fn invalid_stream_ids_are_refused_naming_the_reason() -> TestResult {
    let dir = tempfile::tempdir()?;
    let events = EventStore::<Bank>::open(dir.path())?;
    for bad in ["", "$all", "new\nline", " lead", &"x".repeat(600)] {
        match events.append(bad, Expected::Any, [deposit(1)]) {
            Err(Error::InvalidStreamId { reason, .. }) => assert!(!reason.is_empty()),
            other => return Err(format!("{bad:?}: {other:?}").into()),
        }
    }
    assert_eq!(events.head()?, Position::START);
    Ok(())
}

#[test]
fn a_reopened_store_holds_every_event_from_its_checkpoint_and_journal() -> TestResult {
    let dir = tempfile::tempdir()?;
    let open = || EventStore::<Bank>::builder().checkpoint_every(7).open(dir.path());
    let mut model: BTreeMap<String, Vec<Bank>> = BTreeMap::new();
    {
        let events = open()?;
        for n in 0..40i64 {
            let stream = format!("s{}", n % 3);
            let batch: Vec<Bank> = (0..=(n % 4)).map(|k| deposit(n * 10 + k)).collect();
            events.append(&stream, Expected::Any, batch.clone())?;
            model.entry(stream).or_default().extend(batch);
        }
        events.checkpoint()?;
        events.append("late", Expected::NoStream, [deposit(-1)])?;
        model.entry("late".into()).or_default().push(deposit(-1));
    }
    let events = open()?;
    assert!(events.recovered().snapshot().is_some(), "opened from a checkpoint");
    assert_eq!(events.recovered().replayed(), 1, "only the append after it replayed");
    for (stream, expected) in &model {
        let read: Vec<Bank> =
            collect(events.read_stream(stream))?.into_iter().map(|it| it.data).collect();
        assert_eq!(&read, expected, "{stream}");
    }
    let all = collect(events.read_all())?;
    assert!(all.iter().enumerate().all(|(k, it)| it.position.get() == k as u64));
    assert_eq!(all.len(), model.values().map(Vec::len).sum::<usize>());
    // Appends go on from where the store was.
    let next = events.append("late", Expected::Exact(0), [deposit(-2)])?;
    assert_eq!(next.positions.start, all.len() as u64);
    Ok(())
}

#[test]
fn buffered_modes_let_readers_see_what_they_hold() -> TestResult {
    for durability in
        [Durability::Unsynced, Durability::Periodic(std::time::Duration::from_hours(1))]
    {
        let dir = tempfile::tempdir()?;
        {
            let events = EventStore::<i64>::builder().durability(durability).open(dir.path())?;
            for n in 0..50 {
                events.append("n", Expected::Any, [n])?;
            }
            let read: Vec<i64> =
                collect(events.read_stream("n"))?.into_iter().map(|it| it.data).collect();
            assert_eq!(read, (0..50).collect::<Vec<_>>(), "{durability:?}");
            events.sync()?;
        }
        let events = EventStore::<i64>::open(dir.path())?;
        assert_eq!(events.stream_version("n")?, Some(49), "{durability:?}");
    }
    Ok(())
}

#[test]
fn a_store_of_another_event_type_or_damaged_is_refused_at_open() -> TestResult {
    let dir = tempfile::tempdir()?;
    {
        let events = EventStore::<Bank>::open(dir.path())?;
        events.append("a", Expected::Any, [deposit(1), deposit(2)])?;
        events.append("a", Expected::Any, [deposit(3)])?;
    }
    let other = EventStore::<String>::open(dir.path()).map(drop);
    assert!(matches!(other, Err(Error::JournalType { .. })), "{other:?}");
    // A flipped byte inside the first batch: damage, not a torn write.
    let journal = fs::read_dir(dir.path())?
        .map(|entry| entry.map(|it| it.path()))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .find(|path| path.extension().is_some_and(|it| it == "log"))
        .ok_or("no journal file")?;
    let mut bytes = fs::read(&journal)?;
    let at = bytes.len() - 60;
    bytes[at] ^= 0x10;
    fs::write(&journal, &bytes)?;
    let damaged = EventStore::<Bank>::open(dir.path()).map(drop);
    assert!(matches!(damaged, Err(Error::JournalCorrupt { .. })), "{damaged:?}");
    assert_eq!(fs::read(&journal)?, bytes, "a refused open changed the journal");
    Ok(())
}

#[test]
fn a_second_open_of_the_directory_is_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let _events = EventStore::<Bank>::open(dir.path())?;
    let second = EventStore::<Bank>::open(dir.path()).map(drop);
    assert!(matches!(second, Err(Error::Locked { .. })), "{second:?}");
    let prevayler =
        instastate::Prevayler::open(dir.path(), 0u64, |n: &mut u64, by: u64, _| *n += by).map(drop);
    assert!(matches!(prevayler, Err(Error::Locked { .. })), "{prevayler:?}");
    Ok(())
}

#[derive(Debug, Clone)]
enum Op {
    Append {
        stream: u8,
        expect: Option<u64>,
        values: Vec<i16>,
        tag: u8,
    },
    /// A conditional append on tag `tag`, with a base `back` events behind the head.
    AppendIf {
        stream: u8,
        back: u8,
        values: Vec<i16>,
        tag: u8,
    },
    Delete {
        stream: u8,
        expect: Option<u64>,
    },
    Truncate {
        stream: u8,
        before: u64,
    },
    Reopen,
    Checkpoint,
    /// A compaction: of the journal files before the last, which the checkpoints
    /// (every 5 appends, and `Checkpoint`) start.
    Compact,
}

fn op() -> impl Strategy<Value = Op> {
    let values = || proptest::collection::vec(any::<i16>(), 0..4);
    prop_oneof![
        8 => (0u8..4, proptest::option::of(0u64..6), values(), 0u8..3)
            .prop_map(|(stream, expect, values, tag)| Op::Append { stream, expect, values, tag }),
        3 => (0u8..4, 0u8..6, values(), 0u8..3)
            .prop_map(|(stream, back, values, tag)| Op::AppendIf { stream, back, values, tag }),
        1 => (0u8..4, proptest::option::of(0u64..6))
            .prop_map(|(stream, expect)| Op::Delete { stream, expect }),
        1 => (0u8..4, 0u64..6).prop_map(|(stream, before)| Op::Truncate { stream, before }),
        1 => Just(Op::Reopen),
        1 => Just(Op::Checkpoint),
        2 => Just(Op::Compact),
    ]
}

/// The store as a model: every event appended, and each stream's next version,
/// first version still read, and whether it is deleted.
#[derive(Default)]
struct Model {
    events: Vec<(String, u64, i16, u8)>,
    streams: BTreeMap<String, (u64, u64, bool)>,
}

impl Model {
    fn last(&self, stream: &str) -> Option<u64> {
        let (next, _, deleted) = self.streams.get(stream).copied().unwrap_or_default();
        next.checked_sub(1).filter(|_| !deleted)
    }

    fn append(&mut self, stream: &str, values: &[i16], tag: u8) {
        let entry = self.streams.entry(stream.to_owned()).or_default();
        for value in values {
            self.events.push((stream.to_owned(), entry.0, *value, tag));
            entry.0 += 1;
            entry.2 = false;
        }
    }

    fn visible(&self, stream: &str, version: u64) -> bool {
        self.streams.get(stream).is_some_and(|(_, floor, _)| *floor <= version)
    }
}

/// Compacts the store at `location`: only the data of removed events may go (in a
/// directory, every checkpoint must still agree with the journal).
fn compacted_soundly(events: &EventStore<i16>, location: &str) -> Result<(), TestCaseError> {
    let fail = |err: Error| TestCaseError::fail(err.to_string());
    events.compact().map_err(fail)?;
    if !location.starts_with("postgres://") {
        let verified = RawEvents::builder().verify(location).map_err(fail)?;
        prop_assert!(verified.is_sound(), "{:?}", verified);
    }
    Ok(())
}

/// Runs `ops` on the store at `location` (a directory, or a database's
/// namespace) and on the model, checking after each that every read agrees.
fn run_model(ops: &[Op], location: &str) -> Result<(), TestCaseError> {
    let fail = |err: Error| TestCaseError::fail(err.to_string());
    let open = || EventStore::<i16>::builder().checkpoint_every(5).open(location).map_err(fail);
    let mut events = open()?;
    let mut model = Model::default();
    for op in ops {
        match op {
            Op::Append { stream, expect, values, tag } => {
                let name = format!("s{stream}");
                let last = model.last(&name);
                let expected = expect.map_or(Expected::Any, Expected::Exact);
                let ok = expect.is_none_or(|v| last == Some(v));
                let tagged =
                    values.iter().map(|value| NewEvent::new(*value).tagged([format!("t{tag}")]));
                let res = events.append(&name, expected, tagged);
                prop_assert_eq!(res.is_ok(), ok, "{:?} on a stream at {:?}: {:?}", op, last, res);
                if ok {
                    model.append(&name, values, *tag);
                }
            }
            Op::AppendIf { stream, back, values, tag } => {
                let name = format!("s{stream}");
                let base = (model.events.len() as u64).saturating_sub(u64::from(*back));
                let conflict =
                    model.events.iter().skip(base as usize).any(|(_, _, _, other)| other == tag)
                        && !values.is_empty();
                let tagged =
                    values.iter().map(|value| NewEvent::new(*value).tagged([format!("t{tag}")]));
                let append = Append::new(&name, Expected::Any, tagged);
                let condition = Condition::since(Position::new(base));
                let dry = events.check_append_if(&condition, [append.clone()]);
                let res = events.append_if(&condition, [append]);
                prop_assert_eq!(res.is_err(), conflict, "{:?}: {:?}", op, res);
                prop_assert_eq!(dry.ok(), res.as_ref().ok().cloned(), "the dry run agrees");
                if let Err(err) = res {
                    prop_assert!(matches!(err, Error::Conflict { .. }), "{}", err);
                } else {
                    model.append(&name, values, *tag);
                }
            }
            Op::Delete { stream, expect } => {
                let name = format!("s{stream}");
                let last = model.last(&name);
                let expected = expect.map_or(Expected::Any, Expected::Exact);
                let ok = expect.is_none_or(|v| last == Some(v));
                let res = events.delete_stream(&name, expected);
                prop_assert_eq!(res.is_ok(), ok, "{:?} on a stream at {:?}: {:?}", op, last, res);
                if ok && last.is_some() {
                    let entry = model.streams.entry(name).or_default();
                    entry.1 = entry.1.max(entry.0);
                    entry.2 = true;
                }
            }
            Op::Truncate { stream, before } => {
                let name = format!("s{stream}");
                events.truncate_stream(&name, *before).map_err(fail)?;
                // A truncation never reaches past the stream's end.
                let entry = model.streams.entry(name).or_default();
                entry.1 = entry.1.max((*before).min(entry.0));
            }
            Op::Reopen => {
                drop(events);
                events = open()?;
            }
            Op::Checkpoint => events.checkpoint().map_err(fail)?,
            Op::Compact => compacted_soundly(&events, location)?,
        }
        let all: Vec<(String, i16)> = events
            .read_all()
            .into_iter()
            .map(|it| it.map(|it| (it.stream, it.data)))
            .collect::<Result<_, _>>()
            .map_err(fail)?;
        let expected: Vec<(String, i16)> = model
            .events
            .iter()
            .filter(|(stream, version, _, _)| model.visible(stream, *version))
            .map(|(stream, _, value, _)| (stream.clone(), *value))
            .collect();
        prop_assert_eq!(&all, &expected);
        for stream in 0..4u8 {
            let name = format!("s{stream}");
            let read: Vec<(u64, i16)> = events
                .read_stream(&name)
                .backward()
                .into_iter()
                .map(|it| it.map(|it| (it.version, it.data)))
                .collect::<Result<_, _>>()
                .map_err(fail)?;
            let mut expected: Vec<(u64, i16)> = model
                .events
                .iter()
                .filter(|(s, version, _, _)| *s == name && model.visible(s, *version))
                .map(|(_, version, value, _)| (*version, *value))
                .collect();
            expected.reverse();
            prop_assert_eq!(read, expected);
            prop_assert_eq!(events.stream_version(&name)?, model.last(&name));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]
    #[test]
    fn the_store_behaves_as_a_list_of_events(ops in proptest::collection::vec(op(), 1..30)) {
        let dir = tempfile::tempdir().map_err(|err| TestCaseError::fail(err.to_string()))?;
        let location = dir.path().to_str().ok_or_else(|| TestCaseError::fail("a path that is not UTF-8"))?;
        run_model(&ops, location)?;
    }

    /// The same model, against an event store in a database.
    #[cfg(feature = "postgres")]
    #[test]
    fn the_store_in_a_database_behaves_as_a_list_of_events(
        ops in proptest::collection::vec(op(), 1..30),
    ) {
        run_model(&ops, &crate::server::address("events-model"))?;
    }
}

#[test]
fn a_retried_append_of_several_streams_with_an_empty_part_returns_the_earlier_result() -> TestResult
{
    let dir = tempfile::tempdir()?;
    let events = EventStore::<Bank>::open(dir.path())?;
    events.append("b", Expected::Any, [deposit(1)])?;
    let id = EventId::new();
    let batch = || {
        [
            Append::new("a", Expected::NoStream, [NewEvent::new(deposit(5)).with_id(id)]),
            Append::new("b", Expected::Exact(0), Vec::<Bank>::new()),
        ]
    };
    let first = events.append_all(batch())?;
    assert_eq!(events.append_all(batch())?, first, "a retry returns the earlier result");
    assert_eq!(events.head()?, Position::new(2));
    Ok(())
}

#[test]
fn an_id_twice_in_one_append_is_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let events = EventStore::<Bank>::open(dir.path())?;
    let id = EventId::new();
    let twice = events.append(
        "a",
        Expected::Any,
        [NewEvent::new(deposit(1)).with_id(id), NewEvent::new(deposit(2)).with_id(id)],
    );
    assert!(matches!(twice, Err(Error::InvalidAppend { .. })), "{twice:?}");
    let across = events.append_all([
        Append::new("a", Expected::Any, [NewEvent::new(deposit(1)).with_id(id)]),
        Append::new("b", Expected::Any, [NewEvent::new(deposit(2)).with_id(id)]),
    ]);
    assert!(matches!(across, Err(Error::InvalidAppend { .. })), "{across:?}");
    assert_eq!(events.head()?, Position::START);
    Ok(())
}

#[test]
fn a_stream_read_of_one_type_passes_over_the_others() -> TestResult {
    let dir = tempfile::tempdir()?;
    let events = EventStore::<Bank>::open(dir.path())?;
    events.append("a", Expected::NoStream, [Bank::Opened { owner: "alice".into() }, deposit(1)])?;
    events.append("a", Expected::Any, [Bank::Withdrew { amount: 1 }, deposit(2)])?;
    let deposits = collect(events.read_stream("a").of_type("Deposited"))?;
    assert_eq!(deposits.iter().map(|it| it.version).collect::<Vec<_>>(), [1, 3]);
    let back = collect(events.read_stream("a").of_type("Deposited").backward().limit(1))?;
    assert_eq!(back.iter().map(|it| it.version).collect::<Vec<_>>(), [3]);
    Ok(())
}

/// Takes deliveries until `until` says stop, or fails when none comes for a
/// minute (a patience that only bounds the wait of a slow machine).
fn deliveries<E: Serialize + serde::de::DeserializeOwned>(
    subscription: &mut instastate::events::Subscription<E>,
    mut until: impl FnMut(&Delivery<E>) -> bool,
) -> TestResult<Vec<Delivery<E>>> {
    let mut got = Vec::new();
    while let Some(delivery) = subscription.next_timeout(std::time::Duration::from_mins(1))? {
        let stop = until(&delivery);
        got.push(delivery);
        if stop {
            return Ok(got);
        }
    }
    Err(format!("no delivery for a minute after {} deliveries", got.len()).into())
}

#[test]
fn a_subscription_catches_up_then_follows_new_events() -> TestResult {
    let dir = tempfile::tempdir()?;
    let events = EventStore::<Bank>::open(dir.path())?;
    events.append("a", Expected::Any, [deposit(1), deposit(2)])?;
    events.append("b", Expected::Any, [Bank::Opened { owner: "bob".into() }])?;
    let mut all = events.subscribe_all().from(Position::START)?;
    let mut only_a = events.subscribe_stream("a").from(1)?;
    let mut deposits = events.subscribe_all().of_type("Deposited").from(Position::START)?;
    let mut fresh = events.subscribe_all().from_end()?;
    let caught = deliveries(&mut all, |it| matches!(it, Delivery::CaughtUp))?;
    assert_eq!(caught.len(), 4, "three events, then caught up: {caught:?}");
    let writer = {
        let events = events.clone();
        thread::spawn(move || events.append("a", Expected::Exact(1), [deposit(3)]).map(drop))
    };
    let live = deliveries(&mut all, |it| matches!(it, Delivery::Event(_)))?;
    writer.join().map_err(|_| "the writer panicked")??;
    let Some(Delivery::Event(event)) = live.last() else { return Err(format!("{live:?}").into()) };
    assert_eq!((event.position, event.data.clone()), (Position::new(3), deposit(3)));
    let a: Vec<u64> =
        deliveries(&mut only_a, |it| matches!(it, Delivery::Event(event) if event.version == 2))?
            .into_iter()
            .filter_map(
                |it| if let Delivery::Event(event) = it { Some(event.version) } else { None },
            )
            .collect();
    assert_eq!(a, [1, 2]);
    let d: Vec<u64> = deliveries(
        &mut deposits,
        |it| matches!(it, Delivery::Event(event) if event.position.get() == 3),
    )?
    .into_iter()
    .filter_map(
        |it| if let Delivery::Event(event) = it { Some(event.position.get()) } else { None },
    )
    .collect();
    assert_eq!(d, [0, 1, 3], "the Opened event is passed over");
    // It started at the head of its time: the append after is all it delivers.
    let f = deliveries(&mut fresh, |it| matches!(it, Delivery::CaughtUp))?;
    assert!(
        matches!(f.as_slice(), [Delivery::Event(event), Delivery::CaughtUp] if event.position.get() == 3),
        "{f:?}"
    );
    // The store's last handle goes: the subscription stops.
    drop(events);
    let stopped = deliveries(&mut all, |it| matches!(it, Delivery::Stopped))?;
    assert!(matches!(stopped.as_slice(), [Delivery::Stopped]), "{stopped:?}");
    assert!(all.next_timeout(std::time::Duration::ZERO)?.is_none());
    Ok(())
}

/// Follows `subscription` until it delivered `total` events; returns their
/// positions and whether it said it fell behind. `pause` after each event makes it
/// a slow subscriber.
fn follow(
    subscription: &mut Subscription<u64>,
    total: u64,
    pause: bool,
) -> Result<(Vec<u64>, bool), String> {
    let mut positions = Vec::new();
    let mut fell_behind = false;
    while (positions.len() as u64) < total {
        match subscription
            .next_timeout(std::time::Duration::from_secs(10))
            .map_err(|err| err.to_string())?
        {
            Some(Delivery::Event(event)) => {
                positions.push(event.position.get());
                if pause {
                    thread::sleep(std::time::Duration::from_micros(300));
                }
            }
            Some(Delivery::FellBehind { .. }) => fell_behind = true,
            Some(Delivery::CaughtUp) => {}
            other => return Err(format!("{other:?} after {} events", positions.len())),
        }
    }
    Ok((positions, fell_behind))
}

#[test]
fn subscriptions_under_concurrent_writers_skip_and_repeat_nothing_and_a_slow_one_holds_nobody_back()
-> TestResult {
    const WRITERS: u64 = 8;
    const APPENDS: u64 = 150;
    let dir = tempfile::tempdir()?;
    let events =
        EventStore::<u64>::builder().durability(Durability::GroupCommit).open(dir.path())?;
    let total = WRITERS * APPENDS * 2;
    let mut fast = events.subscribe_all().from(Position::START)?;
    let mut slow = events.subscribe_all().max_lag(50).from(Position::START)?;
    // Caught up on the empty store, before any writer starts.
    let first = slow.next_timeout(std::time::Duration::from_secs(10))?;
    assert!(matches!(first, Some(Delivery::CaughtUp)), "{first:?}");
    let writers_done = std::sync::atomic::AtomicBool::new(false);
    let (fast, slow) = thread::scope(|scope| -> Result<_, String> {
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let events = events.clone();
                scope.spawn(move || -> instastate::Result<()> {
                    for k in 0..APPENDS {
                        events.append(
                            &format!("w{w}"),
                            Expected::Any,
                            [w * 1000 + k, w * 1000 + k],
                        )?;
                    }
                    Ok(())
                })
            })
            .collect();
        let fast = scope.spawn(|| follow(&mut fast, total, false));
        let slow = scope.spawn(|| {
            // It stalls until the writers are done: they must not wait for it.
            let stalled = std::time::Instant::now();
            while !writers_done.load(std::sync::atomic::Ordering::SeqCst) {
                if std::time::Duration::from_mins(1) < stalled.elapsed() {
                    return Err("the writers did not finish while a subscriber stalled".into());
                }
                thread::sleep(std::time::Duration::from_millis(5));
            }
            follow(&mut slow, total, true)
        });
        for writer in writers {
            writer.join().map_err(|_| "a writer panicked")?.map_err(|err| err.to_string())?;
        }
        writers_done.store(true, std::sync::atomic::Ordering::SeqCst);
        let fast = fast.join().map_err(|_| "the fast subscriber panicked")??;
        let slow = slow.join().map_err(|_| "the slow subscriber panicked")??;
        Ok((fast, slow))
    })?;
    let expected: Vec<u64> = (0..total).collect();
    assert_eq!(fast.0, expected, "the fast subscriber got every position once, in order");
    let (slow_positions, fell_behind) = slow;
    assert_eq!(slow_positions, expected, "so did the stalled one");
    assert!(fell_behind, "the stalled subscriber never said it fell behind");
    Ok(())
}

/// Events written as JSON (feature `json`) read back, are plain JSON in the
/// journal for other tools, and mix with postcard ones when the codec changes.
#[cfg(feature = "json")]
#[test]
fn json_events_read_back_are_readable_by_other_tools_and_mix_with_postcard() -> TestResult {
    use instastate::events::{Codec, RawEvents};
    let dir = tempfile::tempdir()?;
    {
        let events = EventStore::<Bank>::builder().codec(Codec::Json).open(dir.path())?;
        events.append("account-1", Expected::NoStream, [deposit(100)])?;
    }
    let journal: Vec<u8> = fs::read_dir(dir.path())?
        .filter_map(Result::ok)
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("journal-"))
        .map(|entry| fs::read(entry.path()))
        .collect::<Result<Vec<_>, _>>()?
        .concat();
    let text = br#"{"Deposited":{"amount":100}}"#;
    assert!(journal.windows(text.len()).any(|it| it == text), "the data is plain JSON");
    // Reopened with the default codec: the JSON event reads, a new one is postcard.
    let events = EventStore::<Bank>::open(dir.path())?;
    events.append("account-1", Expected::Exact(0), [deposit(5)])?;
    let read = collect(events.read_stream("account-1"))?;
    assert_eq!(
        read.iter().map(|it| it.data.clone()).collect::<Vec<_>>(),
        [deposit(100), deposit(5)]
    );
    drop(events);
    // The raw view, which has no Rust type, reads both.
    let raw = RawEvents::open(dir.path())?;
    let shown: Vec<String> = raw
        .read_all()
        .into_iter()
        .map(|event| Ok(raw.decode(&event?)?.to_string()))
        .collect::<instastate::Result<_>>()?;
    assert_eq!(shown.len(), 2);
    assert!(shown.iter().all(|it| it.contains("100") || it.contains('5')), "{shown:?}");
    Ok(())
}

mod v1 {
    /// The bank's events as a first version of the program wrote them.
    #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
    pub(crate) enum Bank {
        Opened { owner: String },
        Deposited { amount: i64 },
    }
}

/// The bank's events as the next version writes them: a deposit has a memo.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum BankV2 {
    Opened { owner: String },
    Deposited { amount: i64, memo: String },
}

fn upcast(old: v1::Bank) -> BankV2 {
    match old {
        v1::Bank::Opened { owner } => BankV2::Opened { owner },
        v1::Bank::Deposited { amount } => BankV2::Deposited { amount, memo: "(v1)".to_owned() },
    }
}

/// Events written by version 1 of the event type read as version 2 through the
/// migration, everywhere (reads, subscriptions, the raw view); new ones are
/// written with version 2; a program that knows only version 1 is refused then,
/// and so is version 2 without the migration, changing nothing.
#[test]
fn older_events_are_upcast_on_read_and_newer_ones_are_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    {
        let events = EventStore::<v1::Bank>::open(dir.path())?;
        events.append("a", Expected::NoStream, [v1::Bank::Opened { owner: "ann".into() }])?;
        events.append("a", Expected::Exact(0), [v1::Bank::Deposited { amount: 7 }])?;
        events.checkpoint()?;
        events.append("a", Expected::Exact(1), [v1::Bank::Deposited { amount: 8 }])?;
    }
    let before = crate::tree::tree(dir.path())?;
    let refused = EventStore::<BankV2>::builder().event_version(2).open(dir.path());
    assert!(
        matches!(refused, Err(Error::JournalSchema { found: 1, current: 2, .. })),
        "{refused:?}"
    );
    let refused = EventStore::<BankV2>::open(dir.path());
    assert!(refused.is_err(), "a changed type at the same version");
    assert_eq!(crate::tree::tree(dir.path())?, before, "refusals change nothing");

    let open = || {
        EventStore::<BankV2>::builder().event_version(2).migrate_event(1, upcast).open(dir.path())
    };
    let events = open()?;
    events.append(
        "a",
        Expected::Exact(2),
        [BankV2::Deposited { amount: 9, memo: "new".into() }],
    )?;
    let expected = [
        BankV2::Opened { owner: "ann".into() },
        BankV2::Deposited { amount: 7, memo: "(v1)".into() },
        BankV2::Deposited { amount: 8, memo: "(v1)".into() },
        BankV2::Deposited { amount: 9, memo: "new".into() },
    ];
    let read = collect(events.read_all())?;
    assert_eq!(read.iter().map(|it| it.data.clone()).collect::<Vec<_>>(), expected);
    let mut subscription = events.subscribe_all().from(Position::START)?;
    let delivered: Vec<BankV2> =
        deliveries(&mut subscription, |it| matches!(it, Delivery::CaughtUp))?
            .into_iter()
            .filter_map(|it| match it {
                Delivery::Event(event) => Some(event.data),
                _ => None,
            })
            .collect();
    assert_eq!(delivered, expected);
    drop(subscription);
    drop(events);
    // Reopened: the same, from the checkpoint and both kinds of files.
    let events = open()?;
    assert_eq!(collect(events.read_stream("a").backward())?.len(), 4);
    drop(events);
    // The raw view decodes each event with the structure of its version.
    let raw = instastate::events::RawEvents::open(dir.path())?;
    let shown: Vec<String> = raw
        .read_all()
        .into_iter()
        .map(|event| Ok(raw.decode(&event?)?.to_string()))
        .collect::<instastate::Result<_>>()?;
    assert!(shown[1].contains('7') && !shown[1].contains("memo"), "{shown:?}");
    assert!(shown[3].contains("memo"), "{shown:?}");
    drop(raw);
    // A program that knows only version 1 is refused now.
    let before = crate::tree::tree(dir.path())?;
    let refused = EventStore::<v1::Bank>::open(dir.path());
    assert!(
        matches!(refused, Err(Error::JournalSchema { found: 2, current: 1, .. })),
        "{refused:?}"
    );
    assert_eq!(crate::tree::tree(dir.path())?, before);
    Ok(())
}

/// Flips a bit in the middle of the first journal file in `dir`; returns the file
/// and the flipped byte's offset.
fn flip_in_first_journal(dir: &std::path::Path) -> TestResult<(std::path::PathBuf, usize)> {
    let journal = fs::read_dir(dir)?
        .map(|entry| entry.map(|it| it.path()))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter(|path| path.extension().is_some_and(|it| it == "log"))
        .min()
        .ok_or("no journal file")?;
    let mut bytes = fs::read(&journal)?;
    let at = bytes.len() / 2;
    bytes[at] ^= 0x10;
    fs::write(&journal, &bytes)?;
    Ok((journal, at))
}

#[test]
fn damage_found_by_a_read_names_its_journal_file_and_offset() -> TestResult {
    let dir = tempfile::tempdir()?;
    {
        let events = EventStore::<i64>::open(dir.path())?;
        for n in 0..100 {
            events.append("n", Expected::Any, [n])?;
        }
    }
    // Damage that comes while the store is open is found by the read that meets it.
    let events = EventStore::<i64>::open(dir.path())?;
    let (journal, at) = flip_in_first_journal(dir.path())?;
    let res: Result<Vec<_>, _> = events.read_all().into_iter().collect();
    let Err(Error::JournalCorrupt { path, offset, .. }) = &res else {
        return Err(format!("a damaged frame was read: {res:?}").into());
    };
    assert_eq!(path, &journal, "{res:?}");
    // The damaged frame's start: before the flipped byte, by less than a frame.
    assert!(*offset <= at as u64 && at as u64 - *offset < 200, "{res:?}");
    let res: Result<Vec<_>, _> = events.read_stream("n").into_iter().collect();
    assert!(matches!(&res, Err(Error::JournalCorrupt { path, .. }) if path == &journal), "{res:?}");
    Ok(())
}

/// Damage in what a checkpoint covers is not read at open: the read that meets it
/// names its journal file and the damaged frame's offset too (it named the
/// directory, at byte 0, and took the damage for the file's end).
#[test]
fn damage_a_checkpoint_covers_is_named_by_the_read_that_meets_it() -> TestResult {
    let dir = tempfile::tempdir()?;
    {
        let events = EventStore::<i64>::open(dir.path())?;
        for n in 0..100 {
            events.append("n", Expected::Any, [n])?;
        }
        events.checkpoint()?;
        // In a new file: the damaged one is not the last, which opening reads.
        events.append("n", Expected::Any, [100])?;
    }
    let (journal, at) = flip_in_first_journal(dir.path())?;
    let events = EventStore::<i64>::open(dir.path())?;
    for res in [
        events.read_all().into_iter().collect::<Result<Vec<_>, _>>(),
        events.read_stream("n").into_iter().collect::<Result<Vec<_>, _>>(),
    ] {
        let Err(Error::JournalCorrupt { path, offset, .. }) = &res else {
            return Err(format!("a damaged frame was read: {res:?}").into());
        };
        assert_eq!(path, &journal, "{res:?}");
        assert!(*offset <= at as u64 && at as u64 - *offset < 200, "{res:?}");
    }
    Ok(())
}
