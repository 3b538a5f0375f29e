//! The event store on PostgreSQL, where what files cannot do is the point: several
//! stores (as several processes would) on one namespace at once, a subscription
//! woken by the commits of another, and a projection of a database's events into
//! a cell saved in files. The behaviours every engine shares are in `contract/`.

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::Duration,
};

use instastate::{
    Error, StateCell, Store,
    events::{Delivery, EventStore, Expected, Position, Projected},
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
    let refused = [events.backup_to(tempfile::tempdir()?.path().join("copy"))];
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

#[test]
fn an_effect_replays_the_aggregates_of_its_trigger_to_a_subscription_of_another_store() -> TestResult
{
    use instastate::events::NewEvent;
    let location = crate::server::address("pg-events-effects");
    let writer = EventStore::<u64>::open(&location)?;
    let reader = EventStore::<u64>::open(&location)?;
    let linked = NewEvent::new(1).tagged(["cart-1"]).linked_to(["key:1"]);
    writer.append("cart-1", Expected::NoStream, [linked, NewEvent::new(2).tagged(["cart-1"])])?;
    writer.append("cart-2", Expected::NoStream, [NewEvent::new(3).tagged(["cart-2"])])?;
    let mut all = reader.subscribe_all().from(Position::START)?;
    let mut seen = Vec::new();
    loop {
        match all.next_timeout(PATIENCE)? {
            Some(Delivery::Event(event)) => seen.push(event.data),
            Some(Delivery::CaughtUp) => break,
            other => return Err(format!("unexpected {other:?}").into()),
        }
    }
    assert_eq!(seen, [1, 2, 3]);
    writer.append_effect("key:1", "expired")?;
    writer.append("cart-1", Expected::Exact(1), [NewEvent::new(4).tagged(["cart-1"])])?;
    let Some(Delivery::Effect(effect)) = all.next_timeout(PATIENCE)? else {
        return Err("no effect".into());
    };
    assert_eq!(
        (effect.trigger.as_str(), effect.reason.as_str(), effect.aggregates.as_slice()),
        ("key:1", "expired", ["cart-1".to_owned()].as_slice())
    );
    assert_eq!((effect.position, effect.number), (Position::new(3), 0));
    // The aggregate's events again, then what came after the effect.
    let mut after = Vec::new();
    for _ in 0..3 {
        match all.next_timeout(PATIENCE)? {
            Some(Delivery::Replayed(event)) => after.push(("replayed", event.data)),
            Some(Delivery::Event(event)) => after.push(("event", event.data)),
            other => return Err(format!("unexpected {other:?}").into()),
        }
    }
    assert_eq!(after, [("replayed", 1), ("replayed", 2), ("event", 4)]);
    // A subscription from the effect's place gets it; from after, not.
    let mut at = reader.subscribe_all().from(Position::new(3))?;
    let first = at.next_timeout(PATIENCE)?;
    assert!(matches!(&first, Some(Delivery::Effect(effect)) if effect.number == 0), "{first:?}");
    let mut late = reader.subscribe_all().from(Position::new(4))?;
    assert!(matches!(late.next_timeout(PATIENCE)?, Some(Delivery::CaughtUp)));
    let refused = writer.append_effect("", "no trigger");
    assert!(matches!(refused, Err(Error::InvalidAppend { .. })), "{refused:?}");
    Ok(())
}

#[cfg(feature = "encryption")]
mod shredding {
    use std::collections::BTreeMap;

    use instastate::events::{
        Delivery, EventStore, Expected, FORGOTTEN, NewEvent, Position, Sealed,
    };

    use super::PATIENCE;
    use crate::TestResult;

    #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
    enum Account {
        Opened { owner: Sealed<String> },
        Deposited { amount: i64 },
    }

    fn open_account(events: &EventStore<Account>, stream: &str, owner: &str) -> TestResult {
        let opened = Account::Opened { owner: Sealed::new(owner.to_lowercase(), owner.to_owned()) };
        let event = NewEvent::new(opened).tagged([stream.to_owned()]);
        events.append(stream, Expected::NoStream, [event])?;
        let deposit = NewEvent::new(Account::Deposited { amount: 100 }).tagged([stream.to_owned()]);
        events.append(stream, Expected::Exact(0), [deposit])?;
        Ok(())
    }

    /// The owner of each account, as a reader sees it: `None` once shredded.
    fn owners(events: &EventStore<Account>) -> TestResult<BTreeMap<String, Option<String>>> {
        let mut owners = BTreeMap::new();
        for event in events.read_all() {
            let event = event?;
            if let Account::Opened { owner } = &event.data {
                owners.insert(event.stream.clone(), owner.value().cloned());
            }
        }
        Ok(owners)
    }

    fn owned(pairs: &[(&str, Option<&str>)]) -> BTreeMap<String, Option<String>> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), v.map(str::to_owned))).collect()
    }

    #[test]
    fn a_subject_forgotten_by_one_process_reads_as_shredded_in_every_other_and_its_keys_are_gone()
    -> TestResult {
        let location = crate::server::address("pg-events-shred");
        let (one, other) =
            (EventStore::<Account>::open(&location)?, EventStore::<Account>::open(&location)?);
        open_account(&one, "account-1", "Alice")?;
        open_account(&one, "account-2", "Bob")?;
        let both = owned(&[("account-1", Some("Alice")), ("account-2", Some("Bob"))]);
        // The other process reads with the keys the first one made.
        assert_eq!(owners(&other)?, both);
        let mut subscription = other.subscribe_all().from(Position::START)?;
        while !matches!(subscription.next_timeout(PATIENCE)?, Some(Delivery::CaughtUp)) {}

        one.forget_subject("alice")?;
        let without = owned(&[("account-1", None), ("account-2", Some("Bob"))]);
        assert_eq!(owners(&other)?, without, "the other process's cached key is forgotten too");
        assert_eq!(owners(&one)?, without);
        let Some(Delivery::Effect(effect)) = subscription.next_timeout(PATIENCE)? else {
            return Err("no effect".into());
        };
        assert_eq!((effect.trigger.as_str(), effect.reason.as_str()), ("alice", FORGOTTEN));
        assert_eq!(effect.aggregates, ["account-1"]);
        for _ in 0..2 {
            let Some(Delivery::Replayed(event)) = subscription.next_timeout(PATIENCE)? else {
                return Err("no replay".into());
            };
            assert_eq!(event.stream, "account-1");
        }
        // The key's bytes are gone from the table.
        let mut client = postgres::Client::connect(crate::server::url(), postgres::NoTls)?;
        let namespace = location.rsplit_once("namespace=").map(|it| it.1).ok_or("no namespace")?;
        let live: i64 = client
            .query_one(
                "SELECT count(*) FROM instastate.subject_keys
                  WHERE namespace = $1 AND subject = 'alice' AND key IS NOT NULL",
                &[&namespace],
            )?
            .get(0);
        assert_eq!(live, 0);

        // Sealing for her again, from the other process (whose cache knew her old
        // key), takes a new key that both read.
        open_account(&other, "account-3", "Alice")?;
        assert_eq!(owners(&one)?.get("account-3"), Some(&Some("Alice".to_owned())));
        drop((one, other, subscription));
        let reopened = EventStore::<Account>::open(&location)?;
        let after =
            owned(&[("account-1", None), ("account-2", Some("Bob")), ("account-3", Some("Alice"))]);
        assert_eq!(owners(&reopened)?, after);
        Ok(())
    }

    /// Two processes append sealed events while a third forgets their subjects
    /// over and over: an event is shredded only if a forget of its subject came
    /// after it; every event appended after a forget reads.
    #[test]
    fn appends_racing_forgets_in_other_processes_are_sealed_with_a_live_key() -> TestResult {
        let location = crate::server::address("pg-events-shred-race");
        let forgetter = EventStore::<Sealed<u64>>::open(&location)?;
        let open = || EventStore::<Sealed<u64>>::open(&location);
        let (read, forgets) =
            crate::shredding::race_appends_and_forgets(&open, &forgetter, 150, 60)?;
        assert_eq!(forgets, 60);
        assert_eq!(read, 300);
        Ok(())
    }
}

/// A writer appending with exact expectations while another store deletes its
/// stream at a random moment: once the delete is in, no append of the writer's
/// goes in after it (each one checked its expectation against the stream as the
/// delete left it), so the stream reads empty.
#[test]
fn no_append_planned_before_a_concurrent_delete_goes_in_after_it() -> TestResult {
    const ROUNDS: u64 = 20;
    let location = crate::server::address("pg-events-delete-race");
    let writer = EventStore::<u64>::open(&location)?;
    let remover = EventStore::<u64>::open(&location)?;
    for round in 0..ROUNDS {
        let stream = format!("cart-{round}");
        writer.append(&stream, Expected::NoStream, [0])?;
        let deleted = AtomicBool::new(false);
        let appended = thread::scope(|scope| -> TestResult<u64> {
            let appends = scope.spawn(|| -> Result<u64, String> {
                let mut last = 0;
                loop {
                    let after = deleted.load(Ordering::SeqCst);
                    match writer.append(&stream, Expected::Exact(last), [last + 1]) {
                        Ok(_) if after => {
                            return Err(format!("version {} went in after the delete", last + 1));
                        }
                        Ok(_) => last += 1,
                        Err(Error::WrongExpectedVersion { actual: None, .. }) => return Ok(last),
                        Err(err) => return Err(err.to_string()),
                    }
                }
            });
            thread::sleep(Duration::from_millis(round % 7 * 3));
            remover.delete_stream(&stream, Expected::Any)?;
            deleted.store(true, Ordering::SeqCst);
            Ok(appends.join().map_err(|_| "the writer panicked")??)
        })?;
        let left: Vec<u64> = writer
            .read_stream(&stream)
            .into_iter()
            .map(|event| event.map(|it| it.data))
            .collect::<Result<_, _>>()?;
        assert!(left.is_empty(), "round {round}: {left:?} went in after the delete");
        assert_eq!(writer.stream_version(&stream)?, None);
        let again = writer.append(&stream, Expected::NoStream, [99])?;
        assert_eq!(again.versions.start, appended + 1, "round {round}");
    }
    Ok(())
}

/// An event store in a database opened with a key: no event's data is in the
/// clear in the table, it opens only with its key, and sealed data moved to
/// another event does not open there.
#[cfg(feature = "encryption")]
#[test]
fn a_store_key_seals_each_events_data_and_the_store_opens_only_with_it() -> TestResult {
    use instastate::EncryptionKey;

    const SECRET: &str = "a secret only the key shows";
    let location = crate::server::address("pg-events-key");
    let key = EncryptionKey::from_bytes([7; 32]);
    let open = |key: Option<&EncryptionKey>| {
        let builder = EventStore::<String>::builder();
        match key {
            Some(key) => builder.encryption_key(key.clone()).open(&location),
            None => builder.open(&location),
        }
    };
    let events = open(Some(&key))?;
    let first = events.append("notes", Expected::NoStream, [format!("{SECRET} 1")])?;
    events.append("notes", Expected::Exact(0), [format!("{SECRET} 2")])?;
    drop(events);

    let mut client = postgres::Client::connect(crate::server::url(), postgres::NoTls)?;
    let namespace = location.rsplit_once("namespace=").map(|it| it.1).ok_or("no namespace")?;
    let rows =
        client.query("SELECT data FROM instastate.events WHERE namespace = $1", &[&namespace])?;
    assert_eq!(rows.len(), 2);
    for row in &rows {
        let data: Vec<u8> = row.get(0);
        let clear = data.windows(SECRET.len()).any(|window| window == SECRET.as_bytes());
        assert!(!clear, "an event's data is in the clear");
    }

    let without = open(None).err();
    assert!(matches!(without, Some(Error::Encryption { encrypted: true, .. })), "{without:?}");
    let wrong = open(Some(&EncryptionKey::from_bytes([8; 32]))).err();
    assert!(matches!(wrong, Some(Error::WrongKey { .. })), "{wrong:?}");

    let events = open(Some(&key))?;
    let read: Vec<String> = events
        .read_stream("notes")
        .into_iter()
        .map(|event| event.map(|it| it.data))
        .collect::<Result<_, _>>()?;
    assert_eq!(read, [format!("{SECRET} 1"), format!("{SECRET} 2")]);

    // The first event's sealed data, moved over the second's, does not open there.
    client.execute(
        "UPDATE instastate.events SET data = (SELECT data FROM instastate.events
                                               WHERE namespace = $1 AND position = $2::bigint)
          WHERE namespace = $1 AND position = $2::bigint + 1",
        &[&namespace, &i64::try_from(first.positions.start)?],
    )?;
    let moved = events.event("notes", 1);
    assert!(matches!(moved, Err(Error::DatabaseCorrupt { .. })), "{moved:?}");
    assert_eq!(events.event("notes", 0)?.map(|it| it.data), Some(format!("{SECRET} 1")));

    // A store written without a key does not open with one.
    let plain = crate::server::address("pg-events-plain");
    EventStore::<String>::open(&plain)?.append("notes", Expected::Any, ["clear".to_owned()])?;
    let keyed = EventStore::<String>::builder().encryption_key(key).open(&plain).err();
    assert!(matches!(keyed, Some(Error::Encryption { encrypted: false, .. })), "{keyed:?}");
    Ok(())
}

#[test]
fn a_long_read_goes_on_through_connections_the_server_ends_and_reads_each_event_once() -> TestResult
{
    // Long enough for a read to go on in windows, several read at once; the
    // server ends every connection of the store (as a restart does) while the
    // read is half way, and again once more.
    const EVENTS: u64 = 60_000;
    let name = crate::server::unique("pg-events-ended");
    let location = format!("{}&application_name={name}", crate::server::address("pg-events-ended"));
    let events = EventStore::<u64>::open(&location)?;
    for batch in 0..EVENTS / 2_000 {
        let first = batch * 2_000;
        events.append(
            &format!("s-{}", batch % 3),
            Expected::Any,
            (first..first + 2_000).collect::<Vec<_>>(),
        )?;
    }
    let mut admin = postgres::Client::connect(crate::server::url(), postgres::NoTls)?;
    let mut end_connections = || -> TestResult<usize> {
        let ended = admin.query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            &[&name],
        )?;
        Ok(ended.len())
    };
    let mut read = events.read_all().into_iter();
    let mut seen = Vec::new();
    for stop in [15_000, 35_000] {
        while (seen.len() as u64) < stop {
            seen.push(read.next().ok_or("the read ended early")??.data);
        }
        assert!(0 < end_connections()?, "no connection of the store was found at {stop}");
    }
    for event in read {
        seen.push(event?.data);
    }
    assert!(
        seen == (0..EVENTS).collect::<Vec<_>>(),
        "{} events read, in another order",
        seen.len()
    );
    Ok(())
}

/// A removal takes a connection from a pool, where the server may have closed it
/// meanwhile (a restart, an idle timeout): nothing was asked on it yet, and the
/// removal runs on a new one rather than failing.
#[test]
fn removals_go_on_past_pooled_connections_the_server_closed() -> TestResult {
    let name = crate::server::unique("pg-events-stale");
    let location = format!("{}&application_name={name}", crate::server::address("pg-events-stale"));
    let events = EventStore::<u64>::open(&location)?;
    events.append("s", Expected::Any, [0, 1, 2, 3, 4])?;
    let mut admin = postgres::Client::connect(crate::server::url(), postgres::NoTls)?;
    for before in 1..=3 {
        events.truncate_stream("s", before)?;
        let ended = admin.query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            &[&name],
        )?;
        assert!(!ended.is_empty(), "no connection of the store was found");
        // Gone for sure before the next removal takes one from its pool.
        let started = std::time::Instant::now();
        while admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                &[&name],
            )?
            .get::<_, i64>(0)
            != 0
        {
            assert!(started.elapsed() < PATIENCE, "the ended connections stayed");
            thread::sleep(Duration::from_millis(10));
        }
    }
    events.delete_stream("s", Expected::Exact(4))?;
    let read: Vec<u64> =
        events.read_all().into_iter().map(|it| it.map(|it| it.data)).collect::<Result<_, _>>()?;
    assert_eq!(read, Vec::<u64>::new(), "the stream is deleted");
    assert_eq!(events.stream_version("s")?, None);
    Ok(())
}

/// An error of the database says the database's reason, not only that it failed.
#[test]
fn a_database_error_says_the_database_s_reason() -> TestResult {
    let base = crate::server::url();
    let (server, _) = base.rsplit_once('/').ok_or("the server's URL names no database")?;
    let missing = crate::server::unique("no_such_database");
    let location = format!("{server}/{missing}?namespace=n");
    match EventStore::<u64>::open(&location) {
        Err(err @ Error::Database { .. }) => {
            let text = err.to_string();
            assert!(text.contains(&missing) && text.contains("does not exist"), "{text}");
        }
        other => return Err(format!("expected Error::Database, got {other:?}").into()),
    }
    Ok(())
}
