//! The contract of removing events (see `mod.rs`): soft deletes, tombstones,
//! truncation and retention rules, each with its expected version, seen the same
//! way after a reopening, whatever the engine.

use std::{path::Path, thread, time::Duration};

use instastate::{
    Error,
    events::{Delivery, EventId, EventStore, Expected, NewEvent, Position, Retention},
};

use super::{Place, contract};
use crate::{TestResult, tree};

contract!(
    a_soft_deleted_stream_is_hidden_and_comes_back_with_its_versions_going_on,
    a_tombstoned_stream_refuses_appends_deletes_and_reads_for_good,
    truncation_and_a_max_count_pass_over_the_first_versions,
    a_max_age_passes_over_events_older_than_it,
    a_subscription_from_the_start_passes_over_removed_events,
    a_subscription_to_a_tombstoned_stream_stops_and_truncation_stays_within_the_stream,
    an_effect_names_the_aggregates_of_removed_linked_events,
    a_removal_made_by_another_opening_is_seen_by_the_next_append,
    compaction_drops_what_is_removed_for_good_and_every_read_stays,
    streams_are_listed_in_the_order_of_their_first_event,
);

fn open(place: &Place) -> instastate::Result<EventStore<u32>> {
    EventStore::open(&place.location)
}

fn versions(events: &EventStore<u32>, stream: &str) -> TestResult<Vec<(u64, u32)>> {
    Ok(events
        .read_stream(stream)
        .into_iter()
        .map(|it| it.map(|it| (it.version, it.data)))
        .collect::<Result<_, _>>()?)
}

fn all(events: &EventStore<u32>) -> TestResult<Vec<(String, u64)>> {
    Ok(events
        .read_all()
        .into_iter()
        .map(|it| it.map(|it| (it.stream, it.version)))
        .collect::<Result<_, _>>()?)
}

fn backward(events: &EventStore<u32>, stream: &str) -> TestResult<Vec<u64>> {
    Ok(events
        .read_stream(stream)
        .backward()
        .into_iter()
        .map(|it| it.map(|it| it.version))
        .collect::<Result<_, _>>()?)
}

fn wrong_version(res: instastate::Result<()>) -> TestResult<Option<u64>> {
    match res {
        Err(Error::WrongExpectedVersion { actual, .. }) => Ok(actual),
        other => Err(format!("expected WrongExpectedVersion, got {other:?}").into()),
    }
}

fn tombstoned<T: std::fmt::Debug>(res: instastate::Result<T>) -> TestResult {
    match res {
        Err(Error::StreamTombstoned { stream, .. }) if stream == "gone" => Ok(()),
        other => Err(format!("expected StreamTombstoned, got {other:?}").into()),
    }
}

/// What a store in a directory holds on disk (nothing for a database): a
/// refused removal must leave it as it was.
fn stored(place: &Place) -> TestResult<Option<tree::Tree>> {
    let path = Path::new(&place.location);
    if place.location.starts_with("postgres") {
        return Ok(None);
    }
    Ok(Some(tree::tree(path)?))
}

/// Opens the store again twice, the second time from a checkpoint (in files);
/// `check` must hold for each.
fn each_reopen(place: &Place, check: impl Fn(&EventStore<u32>) -> TestResult) -> TestResult {
    {
        let events = open(place)?;
        check(&events)?;
        events.checkpoint()?;
    }
    let events = open(place)?;
    check(&events)
}

fn a_soft_deleted_stream_is_hidden_and_comes_back_with_its_versions_going_on(
    place: &Place,
) -> TestResult {
    let events = open(place)?;
    events.append("cart", Expected::NoStream, [1, 2, 3])?;
    events.append("other", Expected::NoStream, [9])?;

    // A wrong expectation is refused, naming the actual version, and writes nothing.
    let before = stored(place)?;
    assert_eq!(wrong_version(events.delete_stream("cart", Expected::Exact(1)))?, Some(2));
    assert_eq!(wrong_version(events.delete_stream("cart", Expected::NoStream))?, Some(2));
    assert_eq!(stored(place)?, before);
    assert_eq!(versions(&events, "cart")?.len(), 3);
    events.delete_stream("cart", Expected::Exact(2))?;

    assert_eq!(versions(&events, "cart")?, []);
    assert!(backward(&events, "cart")?.is_empty());
    assert_eq!(all(&events)?, [("other".to_owned(), 0)]);
    assert_eq!(events.stream_version("cart")?, None);
    assert_eq!(events.streams()?, [("other".to_owned(), 0)]);
    assert_eq!(events.event("cart", 0)?, None);
    assert_eq!(events.event_at(Position::START)?, None);
    // It counts as a stream with no event; deleting it again writes nothing.
    assert_eq!(wrong_version(events.delete_stream("cart", Expected::StreamExists))?, None);
    events.delete_stream("cart", Expected::NoStream)?;
    let err = events.append("cart", Expected::Exact(2), [4]).err();
    assert!(matches!(err, Some(Error::WrongExpectedVersion { actual: None, .. })), "{err:?}");
    drop(events);

    each_reopen(place, |events| {
        assert_eq!(versions(events, "cart")?, []);
        assert_eq!(events.stream_version("cart")?, None);
        Ok(())
    })?;
    let events = open(place)?;
    let again = events.append("cart", Expected::NoStream, [4, 5])?;
    assert_eq!(again.versions, 3..5, "versions go on where they were");
    drop(events);
    each_reopen(place, |events| {
        assert_eq!(versions(events, "cart")?, [(3, 4), (4, 5)]);
        assert_eq!(backward(events, "cart")?, [4, 3]);
        assert_eq!(events.stream_version("cart")?, Some(4));
        assert_eq!(
            all(events)?,
            [("other".to_owned(), 0), ("cart".to_owned(), 3), ("cart".to_owned(), 4)]
        );
        assert_eq!(events.streams()?, [("cart".to_owned(), 4), ("other".to_owned(), 0)]);
        Ok(())
    })
}

fn a_tombstoned_stream_refuses_appends_deletes_and_reads_for_good(place: &Place) -> TestResult {
    let events = open(place)?;
    events.append("gone", Expected::NoStream, [1, 2])?;
    events.append("kept", Expected::NoStream, [3])?;
    assert_eq!(wrong_version(events.tombstone_stream("gone", Expected::Exact(0)))?, Some(1));
    events.tombstone_stream("gone", Expected::Exact(1))?;
    drop(events);
    each_reopen(place, |events| {
        for expected in [Expected::Any, Expected::NoStream, Expected::Exact(1)] {
            tombstoned(events.append("gone", expected, [7]))?;
        }
        tombstoned(events.delete_stream("gone", Expected::Any))?;
        tombstoned(events.tombstone_stream("gone", Expected::Any))?;
        tombstoned(events.truncate_stream("gone", 1))?;
        tombstoned(events.set_retention("gone", Retention::default().max_count(1)))?;
        tombstoned(events.read_stream("gone").into_iter().next().transpose())?;
        tombstoned(events.event("gone", 0))?;
        assert_eq!(events.stream_version("gone")?, None);
        assert_eq!(all(events)?, [("kept".to_owned(), 0)]);
        assert_eq!(events.streams()?, [("kept".to_owned(), 0)]);
        Ok(())
    })?;
    // A stream that never existed can be tombstoned, so that it never will.
    let events = open(place)?;
    events.tombstone_stream("never", Expected::NoStream)?;
    let err = events.append("never", Expected::Any, [1]).err();
    assert!(matches!(err, Some(Error::StreamTombstoned { .. })), "{err:?}");
    // Appends to other streams go on.
    events.append("kept", Expected::Exact(0), [4])?;
    assert_eq!(versions(&events, "kept")?, [(0, 3), (1, 4)]);
    Ok(())
}

fn truncation_and_a_max_count_pass_over_the_first_versions(place: &Place) -> TestResult {
    let events = open(place)?;
    events.append("log", Expected::NoStream, [0, 1, 2, 3, 4])?;
    events.truncate_stream("log", 2)?;
    assert_eq!(versions(&events, "log")?, [(2, 2), (3, 3), (4, 4)]);
    // A lower truncation brings nothing back.
    events.truncate_stream("log", 1)?;
    assert_eq!(backward(&events, "log")?, [4, 3, 2]);
    assert_eq!(events.event("log", 1)?, None);
    assert_eq!(events.stream_version("log")?, Some(4), "its versions stay");
    events.append("log", Expected::Exact(4), [5])?;

    assert_eq!(events.retention("log")?, Retention::default());
    events.set_retention("log", Retention::default().max_count(2))?;
    assert_eq!(events.retention("log")?.count(), Some(2));
    drop(events);
    each_reopen(place, |events| {
        assert_eq!(versions(events, "log")?, [(4, 4), (5, 5)]);
        assert_eq!(events.read_stream("log").from(0).limit(1).into_iter().count(), 1);
        assert_eq!(events.retention("log")?.count(), Some(2));
        Ok(())
    })?;
    let events = open(place)?;
    events.append("log", Expected::Any, [6])?;
    assert_eq!(versions(&events, "log")?, [(5, 5), (6, 6)], "the window moves");
    // Lifting the rule shows what only the rule hid, not what was truncated.
    events.set_retention("log", Retention::default())?;
    assert_eq!(versions(&events, "log")?.first(), Some(&(2, 2)));
    Ok(())
}

fn a_max_age_passes_over_events_older_than_it(place: &Place) -> TestResult {
    let events = open(place)?;
    events.set_retention("short", Retention::default().max_age(Duration::from_millis(20)))?;
    events.set_retention("long", Retention::default().max_age(Duration::from_hours(1)))?;
    assert_eq!(events.retention("short")?.age(), Some(Duration::from_millis(20)));
    events.append("short", Expected::Any, [1])?;
    events.append("long", Expected::Any, [2])?;
    thread::sleep(Duration::from_millis(50));
    assert_eq!(versions(&events, "short")?, []);
    assert_eq!(versions(&events, "long")?, [(0, 2)]);
    assert_eq!(all(&events)?, [("long".to_owned(), 0)]);
    Ok(())
}

fn a_subscription_from_the_start_passes_over_removed_events(place: &Place) -> TestResult {
    let events = open(place)?;
    events.append("a", Expected::Any, [1, 2])?;
    events.append("b", Expected::Any, [3])?;
    events.delete_stream("a", Expected::Any)?;
    events.append("a", Expected::Any, [4])?;
    let mut subscription = events.subscribe_all().from(Position::START)?;
    let mut seen = Vec::new();
    loop {
        match subscription.next_timeout(Duration::from_secs(10))? {
            Some(Delivery::Event(event)) => seen.push((event.stream, event.version, event.data)),
            Some(Delivery::CaughtUp) => break,
            other => return Err(format!("unexpected delivery {other:?}").into()),
        }
    }
    assert_eq!(seen, [("b".to_owned(), 0, 3), ("a".to_owned(), 2, 4)]);
    Ok(())
}

fn a_subscription_to_a_tombstoned_stream_stops_and_truncation_stays_within_the_stream(
    place: &Place,
) -> TestResult {
    let events = open(place)?;
    events.append("gone", Expected::NoStream, [1])?;
    events.tombstone_stream("gone", Expected::Any)?;
    let mut subscription = events.subscribe_stream("gone").from(0)?;
    let delivery = subscription.next_timeout(Duration::from_secs(10))?;
    assert!(matches!(delivery, Some(Delivery::Stopped)), "{delivery:?}");

    // A truncation past the end hides no version appended after it.
    events.truncate_stream("later", 10)?;
    events.append("later", Expected::NoStream, [1, 2, 3])?;
    assert_eq!(versions(&events, "later")?, [(0, 1), (1, 2), (2, 3)]);

    // A retried first append is recognised after a truncation moved the floor.
    let first = NewEvent::new(7).with_id(EventId::new());
    let appended = events.append("retry", Expected::NoStream, [first.clone()])?;
    events.append("retry", Expected::Exact(0), [8])?;
    events.truncate_stream("retry", 1)?;
    assert_eq!(events.append("retry", Expected::NoStream, [first])?, appended);
    Ok(())
}

/// An effect names the aggregates of its linked events even when those events
/// were removed since: what was built from them must go too.
fn an_effect_names_the_aggregates_of_removed_linked_events(place: &Place) -> TestResult {
    let events = open(place)?;
    let linked = NewEvent::new(1).tagged(["user-1"]).linked_to(["key-1"]);
    events.append("s", Expected::NoStream, [linked])?;
    events.delete_stream("s", Expected::Any)?;
    let mut subscription = events.subscribe_all().from_end()?;
    assert!(matches!(
        subscription.next_timeout(Duration::from_secs(10))?,
        Some(Delivery::CaughtUp)
    ));
    events.append_effect("key-1", "expired")?;
    match subscription.next_timeout(Duration::from_secs(10))? {
        Some(Delivery::Effect(effect)) => assert_eq!(effect.aggregates, ["user-1"]),
        other => return Err(format!("expected the effect, got {other:?}").into()),
    }
    Ok(())
}

/// A writer that planned against a stream before another opening removed it
/// (in a database, another process) sees the removal at its next append.
fn a_removal_made_by_another_opening_is_seen_by_the_next_append(place: &Place) -> TestResult {
    let writer = open(place)?;
    writer.append("cart", Expected::NoStream, [1, 2])?;
    writer.append("cart", Expected::Exact(1), [3])?;
    // In files, one store per directory: the removal is made by the same one.
    let other = if place.location.starts_with("postgres") { Some(open(place)?) } else { None };
    let remover = other.as_ref().unwrap_or(&writer);
    remover.delete_stream("cart", Expected::Exact(2))?;
    let err = writer.append("cart", Expected::Exact(2), [4]).err();
    assert!(matches!(err, Some(Error::WrongExpectedVersion { actual: None, .. })), "{err:?}");
    assert_eq!(writer.append("cart", Expected::NoStream, [4])?.versions, 3..4);
    remover.tombstone_stream("cart", Expected::Exact(3))?;
    let err = writer.append("cart", Expected::Any, [5]).err();
    assert!(matches!(err, Some(Error::StreamTombstoned { .. })), "{err:?}");
    let read = writer.read_stream("cart").into_iter().next();
    assert!(matches!(read, Some(Err(Error::StreamTombstoned { .. }))), "{read:?}");
    Ok(())
}

/// Compaction drops the data of tombstoned, truncated and (once it made them
/// permanent) retention-hidden events, and every read gives what it gave before.
fn compaction_drops_what_is_removed_for_good_and_every_read_stays(place: &Place) -> TestResult {
    let events = open(place)?;
    events.append("gone", Expected::NoStream, [1, 2])?;
    events.append("cut", Expected::NoStream, [3, 4, 5])?;
    events.append("window", Expected::NoStream, [6, 7, 8, 9])?;
    events.append("kept", Expected::NoStream, [10])?;
    events.tombstone_stream("gone", Expected::Any)?;
    events.truncate_stream("cut", 1)?;
    events.set_retention("window", Retention::default().max_count(1))?;
    let before = all(&events)?;
    // In files, only the journal files before the last one are compacted: the
    // next append starts a new one.
    events.checkpoint()?;
    events.append("kept", Expected::Exact(0), [11])?;

    let compacted = events.compact()?;
    assert_eq!((compacted.events_dropped, compacted.streams_truncated), (6, 1), "{compacted:?}");
    assert!(0 < compacted.bytes_reclaimed(), "{compacted:?}");
    let check = |events: &EventStore<u32>| -> TestResult {
        let mut expected = before.clone();
        expected.push(("kept".to_owned(), 1));
        assert_eq!(all(events)?, expected);
        assert_eq!(versions(events, "cut")?, [(1, 4), (2, 5)]);
        assert_eq!(backward(events, "window")?, [3]);
        assert_eq!(versions(events, "kept")?, [(0, 10), (1, 11)]);
        tombstoned(events.read_stream("gone").into_iter().next().transpose())?;
        Ok(())
    };
    check(&events)?;
    // Lifting the rule does not show what compaction dropped.
    events.set_retention("window", Retention::default())?;
    check(&events)?;
    assert_eq!(events.compact()?.events_dropped, 0, "nothing more to drop");
    drop(events);
    each_reopen(place, check)
}

/// A stream is created by its first event: rules set on it before, an append
/// that only expected it, a delete and an append that brings it back do not move
/// it in the list of streams.
fn streams_are_listed_in_the_order_of_their_first_event(place: &Place) -> TestResult {
    let events = open(place)?;
    events.set_retention("later", Retention::default().max_count(5))?;
    events.set_retention("gone", Retention::default().max_count(5))?;
    assert_eq!(events.streams()?, []);
    events.append("first", Expected::NoStream, [1])?;
    events.append("later", Expected::NoStream, [2])?;
    events.append("back", Expected::NoStream, [3])?;
    events.delete_stream("back", Expected::Exact(0))?;
    events.append_all([
        instastate::events::Append::new("one", Expected::NoStream, [4]),
        instastate::events::Append::new("two", Expected::NoStream, [5]),
    ])?;
    events.append("back", Expected::Any, [6])?;
    // A part that only states an expectation begins no stream either.
    events.append_all([
        instastate::events::Append::new("y", Expected::NoStream, Vec::<u32>::new()),
        instastate::events::Append::new("z", Expected::NoStream, [7]),
    ])?;
    events.append_all([
        instastate::events::Append::new("x", Expected::NoStream, [8]),
        instastate::events::Append::new("y", Expected::NoStream, [9]),
        instastate::events::Append::new("gone", Expected::NoStream, [10]),
    ])?;
    let names = |events: &EventStore<u32>| -> TestResult<Vec<String>> {
        Ok(events.streams()?.into_iter().map(|(name, _)| name).collect())
    };
    let order = ["first", "later", "back", "one", "two", "z", "x", "y", "gone"];
    assert_eq!(names(&events)?, order);
    drop(events);
    assert_eq!(names(&open(place)?)?, order);
    Ok(())
}
