//! Checkpointed projections of the event store into cells: the position saved with
//! the state, resuming from it, several projections side by side, failures, reloads
//! and blue/green rebuilds under concurrent appends.

// Tests index what they just read: a panic is a failed test, as an assertion is.
#![allow(clippy::indexing_slicing)]

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::Duration,
};

use instastate::{
    Error, StateCell, Store,
    events::{EventStore, Expected, Position, Projected, Projection, RecordedEvent},
};
use serde::{Deserialize, Serialize};

use crate::TestResult;

/// How long a test waits for a projection before it fails.
const PATIENCE: Duration = Duration::from_mins(1);

/// A state that shows how it was built: how many events it applied (which must be
/// its position), their sum, and which handler built it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Tally {
    count: u64,
    sum: i64,
    per_stream: BTreeMap<String, i64>,
    version: u8,
}

type Cell = StateCell<Projected<Tally>>;

const fn fresh() -> Projected<Tally> {
    Projected::new(Tally { count: 0, sum: 0, per_stream: BTreeMap::new(), version: 0 })
}

/// The handler of version `version`: version 2 counts amounts twice.
fn tally(
    version: u8,
) -> impl FnMut(&mut Tally, &RecordedEvent<i64>) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
+ Send
+ 'static {
    move |tally, event| {
        let amount = event.data * i64::from(version);
        tally.count += 1;
        tally.sum += amount;
        *tally.per_stream.entry(event.stream.clone()).or_default() += amount;
        tally.version = version;
        Ok(())
    }
}

/// The fold of the store's first `upto` events by handler `version`.
fn fold(events: &EventStore<i64>, upto: Position, version: u8) -> TestResult<Tally> {
    let mut state = Tally::default();
    let mut handler = tally(version);
    for event in events.read_all().limit(upto.get()) {
        handler(&mut state, &event?).map_err(|err| err.to_string())?;
    }
    Ok(state)
}

/// Waits until `projection` has applied every event appended so far.
fn caught_up(events: &EventStore<i64>, projection: &Projection) -> TestResult<Position> {
    let head = events.head()?;
    if !projection.wait_for_timeout(head, PATIENCE)? {
        return Err(format!("{} did not reach {head} in {PATIENCE:?}", projection.cell()).into());
    }
    Ok(head)
}

fn append(events: &EventStore<i64>, stream: &str, amounts: &[i64]) -> instastate::Result<()> {
    events.append(stream, Expected::Any, amounts.iter().copied())?;
    Ok(())
}

#[test]
fn a_projection_folds_every_event_once_and_resumes_from_its_saved_position() -> TestResult {
    static BALANCES: Cell = StateCell::new("it::projections::resume::BALANCES", fresh);
    let dir = tempfile::tempdir()?;
    let cells = dir.path().join("cells");
    let events = EventStore::<i64>::open(dir.path().join("events"))?;
    append(&events, "alice", &[100, 20])?;
    let saved_at = {
        let store = Store::builder().cell(&BALANCES).open(&cells)?;
        let projection = events.project(&BALANCES, tally(1))?;
        append(&events, "bob", &[7])?;
        let saved_at = caught_up(&events, &projection)?;
        store.save_all()?;
        // Applied in memory, never saved: what a crash loses.
        append(&events, "alice", &[-50, 3])?;
        caught_up(&events, &projection)?;
        assert_eq!(BALANCES.read().position(), Position::new(5));
        projection.stop()?;
        saved_at
    };
    assert_eq!(saved_at, Position::new(3));
    append(&events, "carol", &[1])?;

    // The store loads the state with the position it was saved at, and the
    // projection applies exactly the events after it.
    BALANCES.set(fresh());
    let store = Store::builder().cell(&BALANCES).open(&cells)?;
    assert_eq!(BALANCES.read().position(), saved_at);
    assert_eq!(**BALANCES.read(), fold(&events, saved_at, 1)?);
    let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let mut handler = tally(1);
    let projection = events.project(&BALANCES, {
        let seen = Arc::clone(&seen);
        move |state, event| {
            seen.lock().push(event.position.get());
            handler(state, event)
        }
    })?;
    let head = caught_up(&events, &projection)?;
    assert_eq!(*seen.lock(), [3, 4, 5]);
    assert_eq!(BALANCES.read().position(), head);
    assert_eq!(**BALANCES.read(), fold(&events, head, 1)?);
    assert_eq!(BALANCES.read().per_stream["alice"], 73);
    projection.stop()?;
    drop(store);
    Ok(())
}

#[test]
fn a_projection_saves_its_cell_through_its_store() -> TestResult {
    static SAVED: Cell = StateCell::new("it::projections::saves::SAVED", fresh);
    let dir = tempfile::tempdir()?;
    let cells = dir.path().join("cells");
    let events = EventStore::<i64>::open(dir.path().join("events"))?;
    {
        let store = Store::builder().cell(&SAVED).open(&cells)?;
        let projection =
            events.projection(&SAVED).save_with(&store).save_every(3).start(tally(1))?;
        for amount in 1..=10 {
            append(&events, "a", &[amount])?;
        }
        caught_up(&events, &projection)?;
        // Once it has applied everything there is, it saves without being asked.
        let waited = std::time::Instant::now();
        while store.has_unsaved_changes() {
            if PATIENCE < waited.elapsed() {
                return Err("the projection did not save what it applied".into());
            }
            thread::sleep(Duration::from_millis(5));
        }
        append(&events, "a", &[11])?;
        caught_up(&events, &projection)?;
        // Its last save, as it stops.
        projection.stop()?;
    }
    SAVED.set(fresh());
    let _store = Store::builder().cell(&SAVED).open(&cells)?;
    assert_eq!(SAVED.read().position(), Position::new(11));
    assert_eq!(SAVED.read().sum, 66);
    Ok(())
}

#[test]
fn projections_run_independently_and_a_failing_one_stops_alone() -> TestResult {
    static SUMS: Cell = StateCell::new("it::projections::independent::SUMS", fresh);
    static DOUBLED: Cell = StateCell::new("it::projections::independent::DOUBLED", fresh);
    static PICKY: Cell = StateCell::new("it::projections::independent::PICKY", fresh);
    static PANICKY: Cell = StateCell::new("it::projections::independent::PANICKY", fresh);
    let dir = tempfile::tempdir()?;
    let events = EventStore::<i64>::open(dir.path())?;
    let reported = Arc::new(AtomicUsize::new(0));
    let sums = events.project(&SUMS, tally(1))?;
    let doubled = events.project(&DOUBLED, tally(2))?;
    let mut inner = tally(1);
    let picky = events
        .projection(&PICKY)
        .on_error({
            let reported = Arc::clone(&reported);
            move |err| {
                assert!(matches!(err, Error::ProjectionFailed { .. }), "{err}");
                reported.fetch_add(1, Ordering::Relaxed);
            }
        })
        .start(move |state, event| {
            // Checks first, then changes: a refused event leaves the state as it was.
            if event.data == 13 {
                return Err(format!("13 is unlucky (stream {})", event.stream).into());
            }
            inner(state, event)
        })?;
    let mut inner = tally(1);
    let panicky = events.projection(&PANICKY).on_error(|_| {}).start(move |state, event| {
        assert!(event.data != 13, "cannot take 13");
        inner(state, event)
    })?;
    for amount in 1..=12 {
        append(&events, "s", &[amount])?;
    }
    append(&events, "t", &[13, 14])?;
    // Appends go on after the failure, and the others project them.
    for amount in 15..=30 {
        append(&events, "s", &[amount])?;
    }
    let head = caught_up(&events, &sums)?;
    caught_up(&events, &doubled)?;
    assert_eq!(**SUMS.read(), fold(&events, head, 1)?);
    assert_eq!(**DOUBLED.read(), fold(&events, head, 2)?);
    assert_eq!(SUMS.read().sum, 465);

    for (projection, cell) in [(&picky, &PICKY), (&panicky, &PANICKY)] {
        match projection.wait_for(head) {
            Err(Error::ProjectionFailed { cell: name, position, .. }) => {
                assert_eq!((name.as_str(), position), (cell.name(), Position::new(12)));
            }
            other => {
                return Err(format!("{}: expected a failure, got {other:?}", cell.name()).into());
            }
        }
        assert!(!projection.is_running());
        assert_eq!(cell.read().position(), Position::new(12));
        assert_eq!(**cell.read(), fold(&events, Position::new(12), 1)?);
    }
    let Some(Error::ProjectionFailed { source, .. }) = panicky.error() else {
        return Err("the panicking projection reports no failure".into());
    };
    assert!(source.to_string().contains("cannot take 13"), "{source}");
    assert_eq!(reported.load(Ordering::Relaxed), 1);
    assert!(picky.error().is_some_and(|err| err.to_string().contains("13 is unlucky")));
    assert!(matches!(picky.stop(), Err(Error::ProjectionFailed { .. })));
    drop(panicky);

    // The others still follow new events.
    append(&events, "s", &[1000])?;
    let head = caught_up(&events, &sums)?;
    caught_up(&events, &doubled)?;
    assert!(sums.is_running() && doubled.is_running());
    assert_eq!(**SUMS.read(), fold(&events, head, 1)?);
    assert_eq!(DOUBLED.read().sum, 2 * SUMS.read().sum);
    sums.stop()?;
    doubled.stop()?;
    Ok(())
}

#[test]
fn one_projection_at_a_time_projects_into_a_cell() -> TestResult {
    static ONLY: Cell = StateCell::new("it::projections::only::ONLY", fresh);
    static OTHER: Cell = StateCell::new("it::projections::only::OTHER", fresh);
    let dir = tempfile::tempdir()?;
    let events = EventStore::<i64>::open(dir.path())?;
    append(&events, "a", &[1, 2, 3])?;
    let first = events.project(&ONLY, tally(1))?;
    match events.project(&ONLY, tally(1)) {
        Err(Error::ProjectionRunning { cell, .. }) => assert_eq!(cell, ONLY.name()),
        other => return Err(format!("expected ProjectionRunning, got {other:?}").into()),
    }
    // A rebuild in a cell that has a projection is refused too, and so is a rebuild
    // of a cell in itself.
    assert!(matches!(
        events.projection(&OTHER).rebuild_in(&ONLY).start(tally(1)),
        Err(Error::ProjectionRunning { .. })
    ));
    assert!(matches!(
        events.projection(&OTHER).rebuild_in(&OTHER).start(tally(1)),
        Err(Error::InvalidProjection { .. })
    ));
    caught_up(&events, &first)?;
    first.stop()?;
    // Stopped, it lets go of the cell: the next one goes on where it stopped.
    let second = events.project(&ONLY, tally(1))?;
    append(&events, "a", &[4])?;
    let head = caught_up(&events, &second)?;
    assert_eq!(**ONLY.read(), fold(&events, head, 1)?);
    assert_eq!(second.position(), head);
    drop(second);
    Ok(())
}

#[test]
fn a_projection_follows_its_cell_back_to_an_older_save() -> TestResult {
    static RELOADED: Cell = StateCell::new("it::projections::reload::RELOADED", fresh);
    let dir = tempfile::tempdir()?;
    let events = EventStore::<i64>::open(dir.path().join("events"))?;
    let store = Store::builder().cell(&RELOADED).open(dir.path().join("cells"))?;
    append(&events, "a", &[1, 2])?;
    let projection = events.project(&RELOADED, tally(1))?;
    caught_up(&events, &projection)?;
    store.save_all()?;
    append(&events, "a", &[3, 4, 5])?;
    caught_up(&events, &projection)?;
    // The cell goes back to its save, at position 2: the projection applies the
    // events after it again, to the state saved without them.
    store.reload_all()?;
    append(&events, "a", &[6])?;
    let head = caught_up(&events, &projection)?;
    assert_eq!(**RELOADED.read(), fold(&events, head, 1)?);
    assert_eq!(RELOADED.read().count, 6);
    projection.stop()?;
    Ok(())
}

#[test]
fn a_cell_ahead_of_its_store_is_refused_and_a_rebuild_repairs_it() -> TestResult {
    static AHEAD: Cell = StateCell::new("it::projections::ahead::AHEAD", fresh);
    static AHEAD_SPARE: Cell = StateCell::new("it::projections::ahead::AHEAD_SPARE", fresh);
    let dir = tempfile::tempdir()?;
    let events = EventStore::<i64>::open(dir.path().join("one"))?;
    append(&events, "a", &[1, 2, 3])?;
    let projection = events.project(&AHEAD, tally(1))?;
    caught_up(&events, &projection)?;
    projection.stop()?;
    let other = EventStore::<i64>::open(dir.path().join("other"))?;
    append(&other, "b", &[10])?;
    match other.project(&AHEAD, tally(1)) {
        Err(Error::ProjectionAhead { cell, position, head, .. }) => {
            assert_eq!(
                (cell.as_str(), position, head),
                (AHEAD.name(), Position::new(3), Position::new(1))
            );
        }
        other => return Err(format!("expected ProjectionAhead, got {other:?}").into()),
    }
    assert_eq!(AHEAD.read().position(), Position::new(3));
    let rebuild = other.projection(&AHEAD).rebuild_in(&AHEAD_SPARE).start(tally(1))?;
    let head = caught_up(&other, &rebuild)?;
    assert_eq!(**AHEAD.read(), fold(&other, head, 1)?);
    assert_eq!(AHEAD.read().position(), Position::new(1));
    rebuild.stop()?;
    Ok(())
}

#[test]
fn a_save_through_a_store_without_the_cell_is_refused() -> TestResult {
    static HOMELESS: Cell = StateCell::new("it::projections::homeless::HOMELESS", fresh);
    let dir = tempfile::tempdir()?;
    let events = EventStore::<i64>::open(dir.path())?;
    let store = Store::builder().in_memory()?;
    match events.projection(&HOMELESS).save_with(&store).start(tally(1)) {
        Err(Error::InvalidProjection { cell, reason, .. }) => {
            assert_eq!(cell, HOMELESS.name());
            assert!(reason.contains("does not hold it"), "{reason}");
        }
        other => return Err(format!("expected InvalidProjection, got {other:?}").into()),
    }
    // Nothing was started: the cell is free.
    events.project(&HOMELESS, tally(1))?.stop()?;
    Ok(())
}

#[test]
fn a_rebuild_swaps_in_whole_while_appends_and_the_live_projection_go_on() -> TestResult {
    static LIVE: Cell = StateCell::new("it::projections::rebuild::LIVE", fresh);
    static SPARE: Cell = StateCell::new("it::projections::rebuild::SPARE", fresh);
    let dir = tempfile::tempdir()?;
    let cells = dir.path().join("cells");
    let events = EventStore::<i64>::open(dir.path().join("events"))?;
    let store = Store::builder().cell(&LIVE).cell(&SPARE).open(&cells)?;
    for round in 0..40 {
        append(&events, &format!("s{}", round % 4), &[round, 1, 2])?;
    }
    let live = events.projection(&LIVE).save_with(&store).save_every(50).start(tally(1))?;
    caught_up(&events, &live)?;

    let done = AtomicBool::new(false);
    let reads = [AtomicUsize::new(0), AtomicUsize::new(0), AtomicUsize::new(0)];
    let rebuild = thread::scope(|scope| -> TestResult<Projection> {
        // The writers and the reader stop however this scope ends, or it would wait
        // for them forever.
        let _stop = Stop(&done);
        let writers: Vec<_> = (0..2)
            .map(|writer| {
                let (events, done) = (&events, &done);
                scope.spawn(move || -> instastate::Result<()> {
                    let mut n = 0;
                    while !done.load(Ordering::Relaxed) {
                        append(events, &format!("w{writer}"), &[n % 7 - 3, n])?;
                        n += 1;
                    }
                    Ok(())
                })
            })
            .collect();
        // A reader of the live cell sees a whole state at each position: every event
        // below the position counted once, never a position going back, never the
        // old handler's state after the new one's. It counts what it read of each.
        let (reads, done) = (&reads, &done);
        let reader = scope.spawn(move || -> Result<(), String> {
            let (mut last, mut version) = (0u64, 0u8);
            while !done.load(Ordering::Relaxed) {
                let cell = LIVE.read();
                let position = cell.position().get();
                if cell.count != position || position < last || cell.version < version {
                    return Err(format!(
                        "read {cell:?} at position {position} after {last}, version {version}"
                    ));
                }
                (last, version) = (position, cell.version);
                reads[usize::from(version)].fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        });
        let read = |version: usize| -> TestResult {
            let waited = std::time::Instant::now();
            while reads[version].load(Ordering::Relaxed) == 0 {
                if PATIENCE < waited.elapsed() {
                    return Err(format!("the reader saw no state of version {version}").into());
                }
                thread::yield_now();
            }
            Ok(())
        };
        read(1)?;
        let rebuild =
            events.projection(&LIVE).rebuild_in(&SPARE).save_with(&store).start(tally(2))?;
        let swapped = rebuild.wait_for_timeout(events.head()?, PATIENCE)?;
        assert!(swapped, "the rebuild did not swap in");
        read(2)?;
        done.store(true, Ordering::Relaxed);
        for writer in writers {
            writer.join().map_err(|_| "a writer panicked")??;
        }
        reader.join().map_err(|_| "the reader panicked")??;
        Ok(rebuild)
    })?;
    let head = caught_up(&events, &rebuild)?;
    assert!(!rebuild.is_rebuilding());
    // The live projection was replaced, without an error; the rebuild follows the
    // live cell now, with its own handler.
    assert!(!live.is_running());
    assert!(live.error().is_none());
    assert!(live.stop().is_ok());
    assert_eq!(**LIVE.read(), fold(&events, head, 2)?);
    assert_eq!(*SPARE.read(), fresh());
    append(&events, "after", &[5])?;
    let head = caught_up(&events, &rebuild)?;
    assert_eq!(**LIVE.read(), fold(&events, head, 2)?);
    rebuild.stop()?;

    // What was saved is the rebuilt state with its position.
    drop(store);
    LIVE.set(fresh());
    let _store = Store::builder().cell(&LIVE).cell(&SPARE).open(&cells)?;
    assert_eq!(LIVE.read().position(), head);
    assert_eq!(**LIVE.read(), fold(&events, head, 2)?);
    Ok(())
}

/// Sets its flag when dropped.
struct Stop<'a>(&'a AtomicBool);

impl Drop for Stop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[test]
fn dropping_the_store_stops_its_projections() -> TestResult {
    static CLOSING: Cell = StateCell::new("it::projections::closing::CLOSING", fresh);
    let dir = tempfile::tempdir()?;
    let events = EventStore::<i64>::open(dir.path())?;
    append(&events, "a", &[1])?;
    let projection = events.project(&CLOSING, tally(1))?;
    caught_up(&events, &projection)?;
    drop(events);
    match projection.wait_for(Position::new(2)) {
        Err(Error::ProjectionStopped { cell, position, .. }) => {
            assert_eq!((cell.as_str(), position), (CLOSING.name(), Position::new(1)));
        }
        other => return Err(format!("expected ProjectionStopped, got {other:?}").into()),
    }
    assert!(!projection.is_running());
    // The directory is free again: the projection kept no handle of the store.
    let events = EventStore::<i64>::open(dir.path())?;
    assert_eq!(events.head()?, Position::new(1));
    projection.stop()?;
    Ok(())
}

/// Removed events (a deleted stream, a truncation) are passed over: a projection,
/// a rebuild and a restart all reach the head, with a state folded from what the
/// store reads.
#[test]
fn a_projection_passes_over_removed_events_to_the_head() -> TestResult {
    static LIVE: Cell = StateCell::new("it::projections::removed::LIVE", fresh);
    static SPARE: Cell = StateCell::new("it::projections::removed::SPARE", fresh);
    let dir = tempfile::tempdir()?;
    let events = EventStore::<i64>::open(dir.path())?;
    append(&events, "a", &[1, 2])?;
    append(&events, "b", &[3])?;
    events.delete_stream("a", Expected::Any)?;
    let live = events.project(&LIVE, tally(1))?;
    let head = caught_up(&events, &live)?;
    assert_eq!((head, LIVE.read().state().sum), (Position::new(3), 3));
    append(&events, "c", &[4])?;
    append(&events, "a", &[5])?;
    // Applied before the truncation removes it (a projection that had not read
    // it yet would pass over it).
    caught_up(&events, &live)?;
    events.truncate_stream("c", 1)?;
    append(&events, "b", &[6])?;
    let head = caught_up(&events, &live)?;
    assert_eq!(head, events.head()?);
    // The live state counts what it applied when it applied it (4, before the
    // truncation); a rebuild folds what the store reads now.
    assert_eq!(LIVE.read().state().sum, 3 + 4 + 5 + 6);
    let rebuild = events.projection(&LIVE).rebuild_in(&SPARE).start(tally(1))?;
    let start = std::time::Instant::now();
    while rebuild.is_rebuilding() {
        assert!(start.elapsed() < PATIENCE, "the rebuild did not swap in");
        thread::sleep(Duration::from_millis(5));
    }
    caught_up(&events, &rebuild)?;
    assert_eq!(LIVE.read().state().sum, 3 + 5 + 6);
    assert_eq!(LIVE.read().position(), events.head()?);
    drop((live, rebuild));
    Ok(())
}
