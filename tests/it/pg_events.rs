//! The event store on PostgreSQL, where what files cannot do is the point: several
//! stores (as several processes would) on one namespace at once, a subscription
//! woken by the commits of another, and a projection of a database's events into
//! a cell saved in files. The behaviours every engine shares are in `contract/`.

use std::{collections::BTreeMap, thread, time::Duration};

use instastate::{
    Error, StateCell, Store,
    events::{Delivery, EventStore, Expected, Position, Projected, Retention},
};

use crate::TestResult;

/// How long a test waits for a delivery before it fails.
const PATIENCE: Duration = Duration::from_secs(30);

#[test]
fn stores_on_one_namespace_append_at_once_and_another_one_subscribed_sees_each_event_once()
-> TestResult {
    const WRITERS: u64 = 3;
    const EACH: u64 = 60;
    let location = crate::server::address("pg-events-share");
    let reader = EventStore::<u64>::open(&location)?;
    let mut all = reader.subscribe_all().from(Position::START)?;
    assert_eq!(all.next_timeout(PATIENCE)?, Some(Delivery::CaughtUp));
    thread::scope(|scope| -> TestResult {
        let writers: Vec<_> = (0..WRITERS)
            .map(|writer| {
                let location = location.clone();
                scope.spawn(move || -> instastate::Result<()> {
                    // Each writer a store of its own, as another process has.
                    let events = EventStore::<u64>::open(&location)?;
                    for k in 0..EACH {
                        let stream = format!("writer-{writer}");
                        let expected = k.checked_sub(1).map_or(Expected::NoStream, Expected::Exact);
                        events.append(&stream, expected, [writer * 1_000 + k])?;
                    }
                    Ok(())
                })
            })
            .collect();
        let mut seen = Vec::new();
        while (seen.len() as u64) < WRITERS * EACH {
            match all.next_timeout(PATIENCE)?.ok_or("a commit of another store never came")? {
                Delivery::Event(event) => seen.push((event.position.get(), event.data)),
                Delivery::CaughtUp | Delivery::FellBehind { .. } => {}
                other => return Err(format!("unexpected {other:?}").into()),
            }
        }
        for writer in writers {
            writer.join().map_err(|_| "a writer panicked")??;
        }
        let positions: Vec<u64> = seen.iter().map(|it| it.0).collect();
        assert_eq!(positions, (0..WRITERS * EACH).collect::<Vec<_>>());
        // Each writer's events in its order.
        for writer in 0..WRITERS {
            let mine: Vec<u64> =
                seen.iter().map(|it| it.1).filter(|it| it / 1_000 == writer).collect();
            assert_eq!(mine, (0..EACH).map(|k| writer * 1_000 + k).collect::<Vec<_>>());
        }
        Ok(())
    })?;
    assert_eq!(reader.head()?, Position::new(WRITERS * EACH));
    assert_eq!(reader.streams()?.len() as u64, WRITERS);
    Ok(())
}

type Balances = Projected<BTreeMap<String, u64>>;

const fn fresh() -> Balances {
    Projected::new(BTreeMap::new())
}

#[test]
fn a_projection_of_a_database_store_saved_in_files_resumes_from_its_saved_position() -> TestResult {
    static BALANCES: StateCell<Balances> = StateCell::new("it::pg_events::BALANCES", fresh);
    let location = crate::server::address("pg-events-project");
    let dir = tempfile::tempdir()?;
    let cells = dir.path().join("cells");
    let events = EventStore::<u64>::open(&location)?;
    events.append("alice", Expected::NoStream, [100, 20])?;
    let add = |balances: &mut BTreeMap<String, u64>,
               event: &instastate::events::RecordedEvent<u64>| {
        *balances.entry(event.stream.clone()).or_default() += event.data;
        Ok(())
    };
    {
        let store = Store::builder().cell(&BALANCES).open(&cells)?;
        let projection = events.project(&BALANCES, add)?;
        // Appended by another store on the namespace: the projection wakes for it.
        EventStore::<u64>::open(&location)?.append("bob", Expected::NoStream, [7])?;
        assert!(projection.wait_for_timeout(Position::new(3), PATIENCE)?, "never applied");
        store.save_all()?;
        // Applied, never saved: what a crash loses.
        events.append("alice", Expected::Exact(1), [1])?;
        assert!(projection.wait_for_timeout(Position::new(4), PATIENCE)?, "never applied");
        projection.stop()?;
    }
    BALANCES.set(fresh());
    let _store = Store::builder().cell(&BALANCES).open(&cells)?;
    assert_eq!(BALANCES.read().position(), Position::new(3));
    let projection = events.project(&BALANCES, add)?;
    assert_eq!(projection.catch_up()?, Position::new(4));
    let balances = BALANCES.read().state().clone();
    assert_eq!(balances, BTreeMap::from([("alice".to_owned(), 121), ("bob".to_owned(), 7)]));
    projection.stop()?;
    Ok(())
}

#[test]
fn what_the_database_does_not_offer_yet_is_a_typed_error_that_changes_nothing() -> TestResult {
    let location = crate::server::address("pg-events-unsupported");
    let events = EventStore::<u64>::open(&location)?;
    events.append("cart", Expected::NoStream, [1, 2])?;
    let refused = [
        events.delete_stream("cart", Expected::Any),
        events.tombstone_stream("cart", Expected::Any),
        events.truncate_stream("cart", 1),
        events.set_retention("cart", Retention::default().max_count(1)),
        events.compact().map(drop),
        events.append_effect("key:1", "expired"),
        events.backup_to(tempfile::tempdir()?.path().join("copy")),
    ];
    for res in refused {
        let Err(Error::Unsupported { location: at, operation, .. }) = &res else {
            return Err(format!("{res:?}").into());
        };
        assert!(at.starts_with("postgres://") && !operation.is_empty(), "{res:?}");
    }
    assert_eq!(events.stream_version("cart")?, Some(1));
    assert_eq!(events.read_stream("cart").into_iter().count(), 2);
    Ok(())
}
