//! The contract of the event store (see `mod.rs`): what a user of one process sees,
//! whatever the engine. What only a database offers (several processes writing)
//! is tested in `src/postgres/events/tests.rs` and `tests/it/pg_events.rs`.

use std::{
    collections::BTreeSet,
    sync::{Arc, Barrier},
    thread,
    time::Duration,
};

use instastate::{
    Error,
    events::{
        Append, Condition, Delivery, EventId, EventStore, Expected, NewEvent, Position,
        RecordedEvent,
    },
};
use serde::{Deserialize, Serialize};

use super::{Place, contract};
use crate::TestResult;

contract!(
    appends_read_back_by_stream_and_position_forward_and_backward,
    appends_survive_a_reopening,
    metadata_tags_and_triggers_read_back_as_appended,
    a_wrong_expectation_is_refused_with_the_actual_version_and_writes_nothing,
    of_concurrent_creates_of_one_stream_exactly_one_wins,
    a_retried_append_returns_the_earlier_result_and_writes_nothing,
    an_append_to_several_streams_is_all_or_nothing,
    a_conditional_append_conflicts_unless_resolved_and_a_dry_run_writes_nothing,
    reads_filter_by_type_and_stream_prefix_and_limit,
    long_reads_go_through_every_event_once_forward_and_backward,
    reads_of_many_pages_pass_over_removed_events_and_end_where_the_store_ended,
    bad_stream_ids_are_refused,
    a_subscription_catches_up_then_delivers_concurrent_appends_once_each_in_order,
    another_event_type_is_refused_and_an_older_version_is_migrated,
    data_whose_encoding_looks_sealed_reads_back_from_a_store_without_a_key,
);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Bank {
    Opened { owner: String },
    Deposited { amount: i64 },
    Withdrew { amount: i64 },
}

fn opened(owner: &str) -> Bank {
    Bank::Opened { owner: owner.to_owned() }
}

fn open(place: &Place) -> instastate::Result<EventStore<Bank>> {
    EventStore::open(&place.location)
}

fn data(
    read: impl IntoIterator<Item = instastate::Result<RecordedEvent<Bank>>>,
) -> TestResult<Vec<Bank>> {
    Ok(read.into_iter().map(|event| event.map(|it| it.data)).collect::<Result<_, _>>()?)
}

fn positions(
    read: impl IntoIterator<Item = instastate::Result<RecordedEvent<Bank>>>,
) -> TestResult<Vec<u64>> {
    Ok(read.into_iter().map(|event| event.map(|it| it.position.get())).collect::<Result<_, _>>()?)
}

/// Four events in two streams: `account-1` (versions 0 to 2, positions 0, 1, 3)
/// and `account-2` (version 0, position 2).
fn fill(events: &EventStore<Bank>) -> TestResult {
    let first = events.append(
        "account-1",
        Expected::NoStream,
        [opened("alice"), Bank::Deposited { amount: 100 }],
    )?;
    assert_eq!((first.versions, first.positions), (0..2, 0..2));
    let second = events.append("account-2", Expected::NoStream, [opened("bob")])?;
    assert_eq!((second.versions, second.positions), (0..1, 2..3));
    let third = events.append("account-1", Expected::Exact(1), [Bank::Withdrew { amount: 30 }])?;
    assert_eq!((third.versions, third.positions), (2..3, 3..4));
    Ok(())
}

/// What `fill` wrote, read every way.
fn check_filled(events: &EventStore<Bank>) -> TestResult {
    assert_eq!(events.head()?, Position::new(4));
    assert_eq!(events.stream_version("account-1")?, Some(2));
    assert_eq!(events.stream_version("account-2")?, Some(0));
    assert_eq!(events.stream_version("account-3")?, None);
    assert_eq!(events.streams()?, [("account-1".to_owned(), 2), ("account-2".to_owned(), 0)]);
    assert_eq!(
        data(events.read_stream("account-1"))?,
        [opened("alice"), Bank::Deposited { amount: 100 }, Bank::Withdrew { amount: 30 }]
    );
    assert_eq!(
        data(events.read_stream("account-1").backward().limit(2))?,
        [Bank::Withdrew { amount: 30 }, Bank::Deposited { amount: 100 }]
    );
    assert_eq!(
        data(events.read_stream("account-1").from(1).backward())?,
        [Bank::Deposited { amount: 100 }, opened("alice")]
    );
    assert_eq!(data(events.read_stream("account-1").from(2))?, [Bank::Withdrew { amount: 30 }]);
    assert!(data(events.read_stream("account-3"))?.is_empty());
    assert_eq!(positions(events.read_all())?, [0, 1, 2, 3]);
    assert_eq!(positions(events.read_all().backward())?, [3, 2, 1, 0]);
    assert_eq!(positions(events.read_all().from(Position::new(2)).backward())?, [2, 1, 0]);
    assert_eq!(positions(events.read_all().from(Position::new(1)).limit(2))?, [1, 2]);
    assert!(positions(events.read_all().from(Position::new(9)))?.is_empty());
    let all: Vec<RecordedEvent<Bank>> = events.read_all().into_iter().collect::<Result<_, _>>()?;
    let streams: Vec<(&str, u64)> = all.iter().map(|it| (it.stream.as_str(), it.version)).collect();
    assert_eq!(streams, [("account-1", 0), ("account-1", 1), ("account-2", 0), ("account-1", 2)]);
    let stamps: Vec<_> = all.iter().map(|it| it.at).collect();
    assert!(stamps.is_sorted(), "timestamps go back: {stamps:?}");
    let ids: BTreeSet<EventId> = all.iter().map(|it| it.id).collect();
    assert_eq!(ids.len(), 4, "ids are not unique");
    let last = all.last().ok_or("no event")?;
    assert_eq!(last.event_type, "Withdrew");
    let third = events.event_at(Position::new(3))?.ok_or("no event at position 3")?;
    assert_eq!(&third, last);
    assert_eq!(events.event_at(Position::new(4))?, None);
    assert_eq!(events.event("account-2", 0)?.map(|it| it.position), Some(Position::new(2)));
    assert_eq!(events.event("account-2", 1)?, None);
    Ok(())
}

fn appends_read_back_by_stream_and_position_forward_and_backward(place: &Place) -> TestResult {
    let events = open(place)?;
    fill(&events)?;
    check_filled(&events)
}

fn appends_survive_a_reopening(place: &Place) -> TestResult {
    let events = open(place)?;
    fill(&events)?;
    let before: Vec<RecordedEvent<Bank>> =
        events.read_all().into_iter().collect::<Result<_, _>>()?;
    events.close()?;
    let events = open(place)?;
    check_filled(&events)?;
    let after: Vec<RecordedEvent<Bank>> =
        events.read_all().into_iter().collect::<Result<_, _>>()?;
    assert_eq!(after, before);
    // Versions and positions go on where they were.
    let next = events.append("account-2", Expected::Exact(0), [Bank::Deposited { amount: 7 }])?;
    assert_eq!((next.versions, next.positions), (1..2, 4..5));
    Ok(())
}

fn metadata_tags_and_triggers_read_back_as_appended(place: &Place) -> TestResult {
    let events = open(place)?;
    let cause = EventId::from_bytes([7; 16]);
    let correlation = EventId::from_bytes([8; 16]);
    let rich = NewEvent::new(opened("ann"))
        .caused_by(cause)
        .correlated_with(correlation)
        .tagged(["account:1", "customer:ann", "account:1"])
        .linked_to(["key:ann"]);
    let plain = NewEvent::new(Bank::Deposited { amount: 1 });
    let linked = NewEvent::new(Bank::Deposited { amount: 2 }).linked_to(["key:ann", "key:bob"]);
    let ids = [rich.id(), plain.id(), linked.id()];
    events.append("ann", Expected::NoStream, [rich, plain, linked])?;
    let read: Vec<RecordedEvent<Bank>> =
        events.read_stream("ann").into_iter().collect::<Result<_, _>>()?;
    let seen: Vec<_> = read
        .iter()
        .map(|it| {
            (
                it.id,
                it.metadata.causation,
                it.metadata.correlation,
                it.tags.clone(),
                it.triggers.clone(),
            )
        })
        .collect();
    let strings = |it: &[&str]| it.iter().map(|it| (*it).to_owned()).collect::<Vec<_>>();
    assert_eq!(
        seen,
        [
            (
                ids[0],
                Some(cause),
                Some(correlation),
                strings(&["account:1", "customer:ann", "account:1"]),
                strings(&["key:ann"])
            ),
            (ids[1], None, None, Vec::new(), Vec::new()),
            (ids[2], None, None, Vec::new(), strings(&["key:ann", "key:bob"])),
        ]
    );
    Ok(())
}

fn a_wrong_expectation_is_refused_with_the_actual_version_and_writes_nothing(
    place: &Place,
) -> TestResult {
    let events = open(place)?;
    let refused = |result: instastate::Result<_>, actual: Option<u64>| match result {
        Err(Error::WrongExpectedVersion { stream, actual: found, .. }) => {
            assert_eq!((stream.as_str(), found), ("acc", actual));
        }
        other => panic!("expected a wrong expected version, got {other:?}"),
    };
    refused(events.append("acc", Expected::Exact(0), [opened("a")]), None);
    refused(events.append("acc", Expected::StreamExists, [opened("a")]), None);
    events.append("acc", Expected::NoStream, [opened("a")])?;
    refused(events.append("acc", Expected::NoStream, [opened("a")]), Some(0));
    refused(events.append("acc", Expected::Exact(3), [opened("a")]), Some(0));
    assert_eq!(events.head()?, Position::new(1), "a refused append wrote");
    events.append("acc", Expected::StreamExists, [Bank::Deposited { amount: 1 }])?;
    events.append("acc", Expected::Any, [Bank::Deposited { amount: 2 }])?;
    assert_eq!(events.stream_version("acc")?, Some(2));
    Ok(())
}

fn of_concurrent_creates_of_one_stream_exactly_one_wins(place: &Place) -> TestResult {
    const WRITERS: usize = 8;
    let events = open(place)?;
    let barrier = Arc::new(Barrier::new(WRITERS));
    let results: Vec<instastate::Result<_>> = thread::scope(|scope| {
        let handles: Vec<_> = (0..WRITERS)
            .map(|k| {
                let (events, barrier) = (events.clone(), Arc::clone(&barrier));
                scope.spawn(move || {
                    barrier.wait();
                    events.append("race", Expected::NoStream, [opened(&format!("writer {k}"))])
                })
            })
            .collect();
        handles.into_iter().map(|it| it.join().expect("a writer panicked")).collect()
    });
    let won = results.iter().filter(|it| it.is_ok()).count();
    assert_eq!(won, 1, "{results:?}");
    for result in &results {
        if let Err(err) = result {
            assert!(
                matches!(err, Error::WrongExpectedVersion { actual: Some(0), .. }),
                "a loser got {err}"
            );
        }
    }
    assert_eq!(events.head()?, Position::new(1));
    Ok(())
}

fn a_retried_append_returns_the_earlier_result_and_writes_nothing(place: &Place) -> TestResult {
    let events = open(place)?;
    events.append("other", Expected::Any, [opened("x")])?;
    let batch = || {
        [
            NewEvent::new(opened("ann")).with_id(EventId::from_bytes([1; 16])),
            NewEvent::new(Bank::Deposited { amount: 5 }).with_id(EventId::from_bytes([2; 16])),
        ]
    };
    let first = events.append("ann", Expected::NoStream, batch())?;
    for expected in [Expected::NoStream, Expected::Any, Expected::Exact(u64::MAX)] {
        let again = events.append("ann", expected, batch());
        match expected {
            // Exact(MAX) puts them elsewhere: not a retry.
            Expected::Exact(_) => {
                assert!(matches!(again, Err(Error::WrongExpectedVersion { .. })), "{again:?}");
            }
            _ => assert_eq!(again?, first, "{expected:?}"),
        }
    }
    assert_eq!(events.head()?, Position::new(3), "a retry wrote");
    let elsewhere = NewEvent::new(opened("eve")).with_id(EventId::from_bytes([1; 16]));
    let refused = events.append("eve", Expected::Any, [elsewhere]);
    assert!(matches!(refused, Err(Error::DuplicateEventId { .. })), "{refused:?}");
    assert_eq!(events.head()?, Position::new(3));

    // An append of several streams, one of which only states an expectation, is
    // recognised as a retry after that stream moved on.
    let transfer = || {
        [
            Append::new("ann", Expected::Exact(1), Vec::<NewEvent<Bank>>::new()),
            Append::new(
                "bob",
                Expected::NoStream,
                [NewEvent::new(opened("bob")).with_id(EventId::from_bytes([3; 16]))],
            ),
        ]
    };
    let first = events.append_all(transfer())?;
    events.append("ann", Expected::Exact(1), [Bank::Withdrew { amount: 1 }])?;
    let again = events.append_all(transfer())?;
    assert_eq!(again.get(1), first.get(1), "the earlier result of the stored part");
    let empty = again.first().ok_or("no result for the part without events")?;
    assert_eq!((empty.versions.clone(), empty.positions.clone()), (3..3, 5..5));
    assert_eq!(events.head()?, Position::new(5), "a retry wrote");
    // Its stream tombstoned since, a part with events is no retry: the append is
    // checked as a new one, and refused at its first part.
    events.tombstone_stream("bob", Expected::Any)?;
    let refused = events.append_all(transfer());
    assert!(
        matches!(&refused, Err(Error::WrongExpectedVersion { stream, .. }) if stream == "ann"),
        "{refused:?}"
    );
    assert_eq!(events.head()?, Position::new(5));
    Ok(())
}

fn an_append_to_several_streams_is_all_or_nothing(place: &Place) -> TestResult {
    let events = open(place)?;
    let transfer = |expected_b| {
        [
            Append::new("a", Expected::NoStream, [Bank::Withdrew { amount: 5 }]),
            Append::new("b", expected_b, [Bank::Deposited { amount: 5 }]),
        ]
    };
    let refused = events.append_all(transfer(Expected::Exact(5)));
    assert!(
        matches!(&refused, Err(Error::WrongExpectedVersion { stream, .. }) if stream == "b"),
        "{refused:?}"
    );
    assert_eq!((events.head()?, events.stream_version("a")?), (Position::START, None));
    let done = events.append_all(transfer(Expected::NoStream))?;
    let placed: Vec<_> = done.iter().map(|it| (it.stream.as_str(), it.positions.clone())).collect();
    assert_eq!(placed, [("a", 0..1), ("b", 1..2)]);
    let twice = events.append_all([
        Append::new("c", Expected::Any, [opened("c")]),
        Append::new("c", Expected::Any, [opened("c")]),
    ]);
    assert!(matches!(twice, Err(Error::InvalidAppend { .. })), "{twice:?}");
    assert_eq!(events.head()?, Position::new(2));
    Ok(())
}

/// coherence's walkthrough: Alice and Bob both read the store, then edit one book.
fn a_conditional_append_conflicts_unless_resolved_and_a_dry_run_writes_nothing(
    place: &Place,
) -> TestResult {
    let events = EventStore::<String>::open(&place.location)?;
    events.append("catalog", Expected::Any, ["the catalog opens".to_owned()])?;
    let base = events.head()?;
    let edit = |text: &str| NewEvent::new(text.to_owned()).tagged(["book:neuromancer"]);
    let alice = [Append::new("alice", Expected::Any, [edit("genre: SciFi")])];
    events.append_if(&Condition::since(base), alice)?;
    let bob = || [Append::new("bob", Expected::Any, [edit("genre: Cyberpunk")])];
    let dry = events.check_append_if(&Condition::since(base), bob());
    let Err(Error::Conflict { theirs, .. }) = dry else { panic!("no conflict: {dry:?}") };
    assert_eq!((theirs.stream.as_str(), theirs.position), ("alice", Position::new(1)));
    let refused = events.append_if(&Condition::since(base), bob());
    assert!(matches!(refused, Err(Error::Conflict { .. })), "{refused:?}");
    assert_eq!(events.head()?, Position::new(2), "a refused append wrote");
    // Bob read Alice's change and resolves it: a dry run says where it would go,
    // and writes nothing.
    let resolved = Condition::since(base).resolved([theirs.position]);
    let planned = events.check_append_if(&resolved, bob())?;
    let places: Vec<_> = planned.iter().map(|it| (it.positions.start, it.positions.end)).collect();
    assert_eq!(places, [(2, 3)]);
    assert_eq!(events.head()?, Position::new(2), "a dry run wrote");
    assert_eq!(events.append_if(&resolved, bob())?, planned);
    // Another tag does not conflict.
    let other = [Append::new(
        "carol",
        Expected::Any,
        [NewEvent::new("x".to_owned()).tagged(["book:dune"])],
    )];
    events.append_if(&Condition::since(base), other)?;
    Ok(())
}

fn reads_filter_by_type_and_stream_prefix_and_limit(place: &Place) -> TestResult {
    let events = open(place)?;
    for k in 0..30_i64 {
        let stream = if k % 3 == 0 { format!("account-{k}") } else { format!("card-{k}") };
        events.append(&stream, Expected::Any, [opened("x"), Bank::Deposited { amount: k }])?;
    }
    let deposits = events.read_all().of_type("Deposited");
    let amounts: Vec<Bank> = data(deposits)?;
    assert_eq!(amounts, (0..30).map(|amount| Bank::Deposited { amount }).collect::<Vec<_>>());
    let accounts = positions(events.read_all().stream_prefix("account-"))?;
    assert_eq!(accounts.len(), 20);
    let last_accounts = positions(events.read_all().stream_prefix("account-").backward().limit(3))?;
    assert_eq!(last_accounts, [55, 54, 49]);
    let both = positions(events.read_all().stream_prefix("card-").of_type("Opened").limit(2))?;
    assert_eq!(both, [2, 4]);
    let stream = data(events.read_stream("card-1").of_type("Deposited"))?;
    assert_eq!(stream, [Bank::Deposited { amount: 1 }]);
    Ok(())
}

/// Reads longer than a database page (10,000 events), with and without filters.
fn long_reads_go_through_every_event_once_forward_and_backward(place: &Place) -> TestResult {
    const EVENTS: u64 = 14_000;
    // Batches of 1,000: every fifth to a stream of its own, the others to `long`
    // (12,000 events, more than a page too).
    let is_other = |n: &u64| (n / 1_000) % 5 == 4;
    let events = EventStore::<u64>::open(&place.location)?;
    for batch in 0..EVENTS / 1_000 {
        let first = batch * 1_000;
        let stream = if is_other(&first) { format!("other-{batch}") } else { "long".to_owned() };
        events.append(&stream, Expected::Any, (first..first + 1_000).collect::<Vec<_>>())?;
    }
    let read = |read: instastate::events::Events<'_, u64>| -> TestResult<Vec<u64>> {
        Ok(read.map(|event| event.map(|it| it.data)).collect::<Result<_, _>>()?)
    };
    let reversed = |mut list: Vec<u64>| {
        list.reverse();
        list
    };
    let all: Vec<u64> = (0..EVENTS).collect();
    assert_eq!(read(events.read_all().into_iter())?, all);
    assert_eq!(read(events.read_all().backward().into_iter())?, reversed(all.clone()));
    let long: Vec<u64> = (0..EVENTS).filter(|n| !is_other(n)).collect();
    assert_eq!(read(events.read_stream("long").into_iter())?, long);
    assert_eq!(read(events.read_stream("long").backward().into_iter())?, reversed(long.clone()));
    let others: Vec<u64> = (0..EVENTS).filter(is_other).collect();
    assert_eq!(read(events.read_all().stream_prefix("other-").into_iter())?, others);
    let from = read(events.read_all().from(Position::new(1_234)).limit(11_000).into_iter())?;
    assert_eq!(from, (1_234..12_234).collect::<Vec<_>>());
    let page = read(events.read_all().limit(10_000).into_iter())?;
    assert_eq!(page, (0..10_000).collect::<Vec<_>>());
    // Reads left before the page after the one at hand is read, while it is
    // read, and just after.
    for taken in [5, 6_000, 10_001] {
        let first: Vec<u64> = events
            .read_all()
            .into_iter()
            .take(taken)
            .map(|event| event.map(|it| it.data))
            .collect::<Result<_, _>>()?;
        assert_eq!(first, (0..taken as u64).collect::<Vec<_>>());
    }
    let from_back = read(events.read_stream("long").from(10_500).backward().into_iter())?;
    let expected: Vec<u64> = long.iter().take(10_501).rev().copied().collect();
    assert_eq!(from_back, expected);
    Ok(())
}

/// Reads of many database pages (which a database reads several at a time, in
/// windows of positions or versions, after a first page of 10,000 events): the
/// events removed are passed over, a window of nothing but them too, and a read
/// ends where the store ended when it began.
fn reads_of_many_pages_pass_over_removed_events_and_end_where_the_store_ended(
    place: &Place,
) -> TestResult {
    // Batches of 1,000 events (the last of 500, so that the end is no window's
    // edge): 0 to 9 to `main` (a first page with nothing removed), 10 and 11 to
    // `side`, 12 to 33 each to a stream deleted since (positions 12,000 to
    // 33,999: the window from 20,000 holds nothing else), then `main` and
    // `side` in turn. `side` is truncated below its version 1,000 (positions
    // 10,000 to 10,999).
    const BATCHES: u64 = 58;
    let length = |batch: u64| if batch == BATCHES - 1 { 500 } else { 1_000 };
    let gone = |batch: u64| (12..=33).contains(&batch);
    let stream_of = |batch: u64| match batch {
        _ if gone(batch) => format!("gone-{batch}"),
        0..=9 => "main".to_owned(),
        10 | 11 => "side".to_owned(),
        _ if batch.is_multiple_of(2) => "main".to_owned(),
        _ => "side".to_owned(),
    };
    let events = EventStore::<u64>::open(&place.location)?;
    let (mut all, mut main, mut side) = (Vec::new(), Vec::new(), Vec::new());
    for batch in 0..BATCHES {
        let numbers: Vec<u64> = (batch * 1_000..).take(length(batch)).collect();
        let stream = stream_of(batch);
        events.append(&stream, Expected::Any, numbers.clone())?;
        if gone(batch) {
            events.delete_stream(&stream, Expected::Any)?;
            continue;
        }
        let list = if stream == "main" { &mut main } else { &mut side };
        list.extend(&numbers);
        all.extend(numbers.into_iter().filter(|n| stream == "main" || 11_000 <= *n));
    }
    events.truncate_stream("side", 1_000)?;
    side.drain(..1_000);
    let read = |read: instastate::events::Events<'_, u64>| -> TestResult<Vec<u64>> {
        Ok(read.map(|event| event.map(|it| it.data)).collect::<Result<_, _>>()?)
    };
    same(&read(events.read_all().into_iter())?, &all, "$all");
    same(&read(events.read_stream("main").into_iter())?, &main, "main");
    same(&read(events.read_stream("side").into_iter())?, &side, "side");
    let from_gone = read(events.read_all().from(Position::new(15_000)).into_iter())?;
    let after: Vec<u64> = all.iter().copied().filter(|n| 15_000 <= *n).collect();
    same(&from_gone, &after, "$all from a removed event");
    for taken in [5_000, 12_000, 17_001] {
        let first = read_some(&mut events.read_all().into_iter(), taken)?;
        same(&first, all.get(..taken).unwrap_or_default(), &format!("the first {taken}"));
    }
    // An append made while a read goes on, before it asked for any window, is
    // not read by it; nor one made later.
    let mut reading = events.read_all().into_iter();
    let mut seen = read_some(&mut reading, 4_000)?;
    events.append("main", Expected::Any, [BATCHES * 1_000])?;
    seen.extend(read_some(&mut reading, 30_000)?);
    events.append("main", Expected::Any, [BATCHES * 1_000 + 1])?;
    seen.extend(read_some(&mut reading, usize::MAX)?);
    same(&seen, &all, "$all read across appends");
    Ok(())
}

/// Asserts that `got` is `want`, naming the first difference (not every event).
fn same(got: &[u64], want: &[u64], what: &str) {
    let differ = got.iter().zip(want).position(|(a, b)| a != b);
    assert!(
        got == want,
        "{what}: {} events read, {} expected; the first difference at {differ:?}",
        got.len(),
        want.len()
    );
}

/// The data of up to `n` more events of `read`.
fn read_some(read: &mut instastate::events::Events<'_, u64>, n: usize) -> TestResult<Vec<u64>> {
    Ok(read.take(n).map(|event| event.map(|it| it.data)).collect::<Result<_, _>>()?)
}

fn bad_stream_ids_are_refused(place: &Place) -> TestResult {
    let events = open(place)?;
    events.append("account", Expected::Any, [opened("x")])?;
    for bad in ["", "line\nbreak", &"x".repeat(10_000), "account ", "$all"] {
        let refused = events.append(bad, Expected::Any, [opened("x")]);
        assert!(matches!(refused, Err(Error::InvalidStreamId { .. })), "{bad:?}: {refused:?}");
        // Reading one is refused too, not read as a stream with no event yet:
        // a typo is not taken for an empty stream.
        let read: Vec<_> = events.read_stream(bad).into_iter().collect();
        assert!(
            matches!(read.as_slice(), [Err(Error::InvalidStreamId { .. })]),
            "a read of {bad:?}: {read:?}"
        );
        let backward: Vec<_> = events.read_stream(bad).backward().into_iter().collect();
        assert!(matches!(backward.as_slice(), [Err(Error::InvalidStreamId { .. })]), "{bad:?}");
        let version = events.stream_version(bad);
        assert!(matches!(version, Err(Error::InvalidStreamId { .. })), "{bad:?}: {version:?}");
        let event = events.event(bad, 0);
        assert!(matches!(event, Err(Error::InvalidStreamId { .. })), "{bad:?}: {event:?}");
        let retention = events.retention(bad);
        assert!(matches!(retention, Err(Error::InvalidStreamId { .. })), "{bad:?}");
    }
    assert_eq!(events.head()?, Position::new(1));
    Ok(())
}

fn a_subscription_catches_up_then_delivers_concurrent_appends_once_each_in_order(
    place: &Place,
) -> TestResult {
    const WRITERS: u64 = 4;
    const EACH: u64 = 40;
    let events = open(place)?;
    for k in 0..10 {
        events.append(&format!("early-{k}"), Expected::NoStream, [opened("e")])?;
    }
    let mut all = events.subscribe_all().from(Position::START)?;
    let mut one = events.subscribe_stream("w-0").from(0)?;
    let mut seen = Vec::new();
    loop {
        match all.next_timeout(Duration::from_secs(10))?.ok_or("no delivery")? {
            Delivery::Event(event) => seen.push(event.position.get()),
            Delivery::CaughtUp => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, (0..10).collect::<Vec<_>>());
    thread::scope(|scope| {
        for writer in 0..WRITERS {
            let events = events.clone();
            scope.spawn(move || {
                for k in 0..EACH {
                    let amount = i64::try_from(k).expect("small");
                    events
                        .append(&format!("w-{writer}"), Expected::Any, [Bank::Deposited { amount }])
                        .expect("an append failed");
                }
            });
        }
    });
    let total = 10 + WRITERS * EACH;
    while (seen.len() as u64) < total {
        match all.next_timeout(Duration::from_secs(10))?.ok_or("a live event never came")? {
            Delivery::Event(event) => seen.push(event.position.get()),
            Delivery::CaughtUp | Delivery::FellBehind { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, (0..total).collect::<Vec<_>>(), "skipped, repeated or out of order");
    let mut versions = Vec::new();
    while (versions.len() as u64) < EACH {
        match one.next_timeout(Duration::from_secs(10))?.ok_or("a stream event never came")? {
            Delivery::Event(event) => versions.push(event.version),
            Delivery::CaughtUp | Delivery::FellBehind { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(versions, (0..EACH).collect::<Vec<_>>());
    Ok(())
}

mod v1 {
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub(crate) enum Bank {
        Opened { owner: String },
        Deposited { amount: i64 },
    }
}

fn another_event_type_is_refused_and_an_older_version_is_migrated(place: &Place) -> TestResult {
    let old = EventStore::<v1::Bank>::open(&place.location)?;
    old.append("acc", Expected::NoStream, [v1::Bank::Deposited { amount: 3 }])?;
    old.close()?;
    let other = EventStore::<String>::open(&place.location);
    assert!(matches!(other, Err(Error::JournalType { .. })), "{other:?}");
    // Version 2 of the type, read through its migration from version 1.
    let migrate = |old: v1::Bank| match old {
        v1::Bank::Opened { owner } => Bank::Opened { owner },
        v1::Bank::Deposited { amount } => Bank::Deposited { amount },
    };
    let new = EventStore::<Bank>::builder().event_version(2).migrate_event(1, migrate);
    let new = new.open(&place.location)?;
    new.append("acc", Expected::Exact(0), [Bank::Withdrew { amount: 1 }])?;
    assert_eq!(
        data(new.read_stream("acc"))?,
        [Bank::Deposited { amount: 3 }, Bank::Withdrew { amount: 1 }]
    );
    new.close()?;
    // The old program no longer reads what the new one wrote.
    let refused = EventStore::<v1::Bank>::open(&place.location);
    assert!(
        matches!(refused, Err(Error::JournalSchema { found: 2, current: 1, .. })),
        "{refused:?}"
    );
    Ok(())
}

/// A store without a key takes its data as it is, even when its encoding starts as
/// sealed bytes do (postcard writes this string's length, 73, as `I`).
fn data_whose_encoding_looks_sealed_reads_back_from_a_store_without_a_key(
    place: &Place,
) -> TestResult {
    let events = EventStore::<String>::open(&place.location)?;
    let looks_sealed = "E".repeat(73);
    events.append("notes", Expected::NoStream, [looks_sealed.clone()])?;
    let read: Vec<String> = events
        .read_stream("notes")
        .into_iter()
        .map(|event| event.map(|it| it.data))
        .collect::<Result<_, _>>()?;
    assert_eq!(read, [looks_sealed]);
    Ok(())
}
