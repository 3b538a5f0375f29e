//! The PostgreSQL event engine against a real server (`test_server`).

use std::{collections::BTreeSet, sync::Barrier, thread};

use crate::postgres::Location;

use super::*;
use crate::postgres::test_server;

fn event(id: EventId, data: &[u8]) -> Encoded {
    Encoded {
        id,
        event_type: "Test".to_owned(),
        causation: None,
        correlation: None,
        tags: vec!["tag-a".to_owned()],
        triggers: Vec::new(),
        json: false,
        schema: 1,
        sealed_with: Vec::new(),
        data: data.to_vec(),
    }
}

fn request(stream: &str, expected: Expected, events: Vec<Encoded>) -> Vec<Request> {
    vec![Request { stream: stream.to_owned(), expected, events }]
}

/// The one part of an append's result.
fn one(appended: &[Appended]) -> &Appended {
    appended.first().expect("one part")
}

fn open(prefix: &str) -> Result<PgEvents> {
    PgEvents::open(&test_server::location(prefix)?)
}

#[test]
fn appends_are_checked_against_their_expectation_and_read_back() -> Result<()> {
    let events = open("events-basic")?;
    let first =
        events.append(request("a", Expected::NoStream, vec![event(EventId::new(), b"1")]))?;
    assert_eq!((one(&first).versions.clone(), one(&first).positions.clone()), (0..1, 0..1));
    let second = events.append(request(
        "a",
        Expected::Exact(0),
        vec![event(EventId::new(), b"2"), event(EventId::new(), b"3")],
    ))?;
    assert_eq!((one(&second).versions.clone(), one(&second).positions.clone()), (1..3, 1..3));
    for (expected, actual) in [(Expected::NoStream, Some(2)), (Expected::Exact(1), Some(2))] {
        let res = events.append(request("a", expected, vec![event(EventId::new(), b"x")]));
        assert!(
            matches!(&res, Err(Error::WrongExpectedVersion { stream, actual: a, .. }) if stream == "a" && *a == actual),
            "{res:?}"
        );
    }
    let res =
        events.append(request("b", Expected::StreamExists, vec![event(EventId::new(), b"x")]));
    assert!(matches!(res, Err(Error::WrongExpectedVersion { actual: None, .. })), "{res:?}");
    assert_eq!(events.stream_version("a")?, Some(2));
    assert_eq!(events.stream_version("b")?, None);
    assert_eq!(events.head()?, Position::new(3));
    let all = events.read_all(0, 10, false)?;
    let data: Vec<&[u8]> = all.iter().map(|it| it.data.as_slice()).collect();
    assert_eq!(data, [b"1", b"2", b"3"]);
    assert_eq!(all.get(1).map(|it| it.tags.clone()), Some(vec!["tag-a".to_owned()]));
    assert!(all.iter().zip(all.iter().skip(1)).all(|(a, b)| a.at <= b.at));
    let back = events.read_stream("a", 1, 10, true)?;
    assert_eq!(back.iter().map(|it| it.version).collect::<Vec<_>>(), [1, 0]);
    Ok(())
}

#[test]
fn a_retried_append_returns_its_earlier_result_and_an_id_used_elsewhere_is_refused() -> Result<()> {
    let events = open("events-retry")?;
    let ids = [EventId::new(), EventId::new()];
    let append = || {
        vec![
            Request {
                stream: "s".to_owned(),
                expected: Expected::NoStream,
                events: vec![event(ids[0], b"1")],
            },
            Request {
                stream: "t".to_owned(),
                expected: Expected::Any,
                events: vec![event(ids[1], b"2")],
            },
        ]
    };
    let first = events.append(append())?;
    events.append(request("s", Expected::Any, vec![event(EventId::new(), b"later")]))?;
    let again = events.append(append())?;
    assert_eq!(again, first);
    assert_eq!(events.head()?, Position::new(3), "a retry wrote");
    let res = events.append(request("u", Expected::Any, vec![event(ids[0], b"1")]));
    assert!(matches!(res, Err(Error::DuplicateEventId { .. })), "{res:?}");
    Ok(())
}

#[test]
fn writers_racing_on_one_stream_win_one_version_each() -> Result<()> {
    let location = test_server::location("events-race")?;
    let engines = (0..4).map(|_| PgEvents::open(&location)).collect::<Result<Vec<_>>>()?;
    let barrier = Barrier::new(8);
    let won: Vec<Vec<u64>> = thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|k| {
                let (events, barrier) = (engines.get(k % 4).expect("an engine"), &barrier);
                scope.spawn(move || -> Result<Vec<u64>> {
                    barrier.wait();
                    let mut won = Vec::new();
                    for _ in 0..15 {
                        let seen = events.stream_version("one")?;
                        let expected = seen.map_or(Expected::NoStream, Expected::Exact);
                        match events.append(request(
                            "one",
                            expected,
                            vec![event(EventId::new(), b"")],
                        )) {
                            Ok(appended) => won.push(one(&appended).versions.start),
                            // Refused only over a version newer than the one read (a
                            // stream's versions only grow): never over a stale one.
                            Err(Error::WrongExpectedVersion { actual, .. }) => {
                                assert!(seen < actual, "refused at {actual:?}, read {seen:?}");
                            }
                            Err(err) => return Err(err),
                        }
                    }
                    Ok(won)
                })
            })
            .collect();
        handles.into_iter().map(|it| it.join().expect("a writer")).collect::<Result<_>>()
    })?;
    let mut versions: Vec<u64> = won.into_iter().flatten().collect();
    versions.sort_unstable();
    let last = reader_of(&engines).stream_version("one")?.expect("appended");
    assert_eq!(versions, (0..=last).collect::<Vec<_>>(), "a version was won twice, or by none");
    Ok(())
}

fn reader_of(engines: &[PgEvents]) -> &PgEvents {
    engines.first().expect("an engine")
}

/// Many writers (four engines, as four processes would have, four threads each)
/// while a reader follows `$all` from where it got to: it sees every position once,
/// in order, never one after a gap that fills later.
#[test]
fn a_reader_following_many_writers_never_skips_an_event_that_commits_late() -> Result<()> {
    const APPENDS: u64 = 40;
    let location = test_server::location("events-follow")?;
    let engines = (0..4).map(|_| PgEvents::open(&location)).collect::<Result<Vec<_>>>()?;
    let reader = PgEvents::open(&location)?;
    let acked: Vec<Vec<EventId>> = thread::scope(|scope| -> Result<Vec<Vec<EventId>>> {
        let writers: Vec<_> = (0..16u64)
            .map(|k| {
                let events = engines.get(usize::try_from(k % 4).unwrap_or(0)).expect("an engine");
                scope.spawn(move || -> Result<Vec<EventId>> {
                    let mut acked = Vec::new();
                    for n in 0..APPENDS {
                        let batch: Vec<Encoded> =
                            (0..=n % 3).map(|_| event(EventId::new(), b"w")).collect();
                        let ids: Vec<EventId> = batch.iter().map(|it| it.id).collect();
                        events.append(request(&format!("w{k}-{}", n % 3), Expected::Any, batch))?;
                        acked.extend(ids);
                    }
                    Ok(acked)
                })
            })
            .collect();
        let follower = scope.spawn(|| -> Result<Vec<RawEvent>> {
            let mut seen = Vec::new();
            let total = 16 * (0..APPENDS).map(|n| n % 3 + 1).sum::<u64>();
            while (seen.len() as u64) < total {
                let next = seen.len() as u64;
                for event in reader.read_all(next, 500, false)? {
                    let expected = seen.len() as u64;
                    assert_eq!(event.position.get(), expected, "the reader skipped or repeated");
                    seen.push(event);
                }
            }
            Ok(seen)
        });
        let acked =
            writers.into_iter().map(|it| it.join().expect("a writer")).collect::<Result<_>>()?;
        let seen = follower.join().expect("the follower")?;
        let ids: BTreeSet<[u8; 16]> = seen.iter().map(|it| *it.id.as_bytes()).collect();
        assert_eq!(ids.len(), seen.len(), "an event twice");
        Ok(acked)
    })?;
    let stored: BTreeSet<[u8; 16]> =
        reader.read_all(0, 100_000, false)?.iter().map(|it| *it.id.as_bytes()).collect();
    for id in acked.iter().flatten() {
        assert!(stored.contains(id.as_bytes()), "acknowledged event {id} is missing");
    }
    Ok(())
}

fn tagged(tag: &str, data: &[u8]) -> Encoded {
    Encoded { tags: vec![tag.to_owned(), tag.to_owned()], ..event(EventId::new(), data) }
}

/// coherence's walkthrough, as `tests/it/conflicts.rs` has it for the embedded
/// engine: Alice and Bob read the store at one head; Alice's edit goes in, Bob's
/// is refused naming hers, and goes in once he resolves it.
#[test]
fn a_conditional_append_is_refused_over_a_change_it_did_not_see_until_resolved() -> Result<()> {
    let events = open("events-if")?;
    events.append(request("setup", Expected::Any, vec![tagged("book:1", b"created")]))?;
    let base = events.head()?;
    let since = || Condition::since(base);
    let alice = events
        .append_if(request("alice", Expected::Any, vec![tagged("book:1", b"a")]), Some(since()))?;
    let alice_at = one(&alice).positions.start;
    let res = events
        .append_if(request("bob", Expected::Any, vec![tagged("book:1", b"b")]), Some(since()));
    let Err(Error::Conflict { tag, ours, theirs, .. }) = &res else { panic!("{res:?}") };
    assert_eq!(tag, "book:1");
    assert_eq!(theirs.stream, "alice");
    assert_eq!(theirs.position, Position::new(alice_at));
    assert_eq!(ours.as_ref().map(|it| it.stream.as_str()), Some("bob"));
    // Another aggregate does not conflict; a tag the condition names does.
    events
        .append_if(request("carol", Expected::Any, vec![tagged("book:2", b"c")]), Some(since()))?;
    let res = events.append_if(
        request("dave", Expected::Any, vec![event(EventId::new(), b"d")]),
        Some(since().tags(["book:2"])),
    );
    assert!(matches!(&res, Err(Error::Conflict { ours: None, .. })), "{res:?}");
    let resolved = since().resolved([Position::new(alice_at)]);
    events
        .append_if(request("bob", Expected::Any, vec![tagged("book:1", b"b")]), Some(resolved))?;
    Ok(())
}

/// Conditional appends racing in one group and across engines: of those with
/// one base and tag, exactly one goes in.
#[test]
fn racing_conditional_appends_on_one_tag_let_exactly_one_in() -> Result<()> {
    let location = test_server::location("events-if-race")?;
    let engines = (0..2).map(|_| PgEvents::open(&location)).collect::<Result<Vec<_>>>()?;
    let base = reader_of(&engines).head()?;
    let barrier = Barrier::new(8);
    let outcomes: Vec<bool> = thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|k| {
                let (events, barrier) = (engines.get(k % 2).expect("an engine"), &barrier);
                scope.spawn(move || -> Result<bool> {
                    barrier.wait();
                    let append =
                        request(&format!("actor-{k}"), Expected::Any, vec![tagged("hot", b"x")]);
                    match events.append_if(append, Some(Condition::since(base))) {
                        Ok(_) => Ok(true),
                        Err(Error::Conflict { .. }) => Ok(false),
                        Err(err) => Err(err),
                    }
                })
            })
            .collect();
        handles.into_iter().map(|it| it.join().expect("an actor")).collect::<Result<_>>()
    })?;
    assert_eq!(outcomes.iter().filter(|won| **won).count(), 1, "{outcomes:?}");
    Ok(())
}

/// A follower gets every event once, in order, as writers in other engines commit
/// them, woken by their notifications.
#[test]
fn a_follower_gets_each_event_as_it_commits() -> Result<()> {
    const APPENDS: u64 = 30;
    let location = test_server::location("events-live")?;
    let engines = (0..4).map(|_| PgEvents::open(&location)).collect::<Result<Vec<_>>>()?;
    let mut follower = reader_of(&engines).follow(0, Duration::from_secs(1))?;
    assert!(follower.next_batch(10, Duration::from_millis(50))?.is_empty());
    let seen = thread::scope(|scope| -> Result<Vec<RawEvent>> {
        let mut writers = Vec::new();
        for (k, events) in engines.iter().enumerate() {
            writers.push(scope.spawn(move || -> Result<()> {
                for n in 0..APPENDS {
                    events.append(request(
                        &format!("live-{k}"),
                        Expected::Any,
                        vec![event(EventId::new(), b"")],
                    ))?;
                    if n % 5 == 0 {
                        thread::sleep(Duration::from_millis(5));
                    }
                }
                Ok(())
            }));
        }
        let mut seen = Vec::new();
        while (seen.len() as u64) < 4 * APPENDS {
            let batch = follower.next_batch(7, Duration::from_secs(10))?;
            if batch.is_empty() {
                break; // the writers' errors, if any, say why
            }
            for event in batch {
                assert_eq!(event.position.get(), seen.len() as u64, "skipped or repeated");
                seen.push(event);
            }
        }
        for writer in writers {
            writer.join().expect("a writer")?;
        }
        assert_eq!(seen.len() as u64, 4 * APPENDS, "events stopped coming for 10 s");
        Ok(seen)
    })?;
    assert_eq!(follower.position(), seen.len() as u64);
    assert!(follower.next_batch(10, Duration::from_millis(50))?.is_empty());
    // Polling every minute, and waiting 30 s: only the commit's notification can
    // bring the next event back.
    let mut follower = reader_of(&engines).follow(follower.position(), Duration::from_mins(1))?;
    let woken = thread::scope(|scope| -> Result<Vec<RawEvent>> {
        let writer = scope.spawn(|| -> Result<()> {
            thread::sleep(Duration::from_millis(200));
            reader_of(&engines).append(request(
                "late",
                Expected::Any,
                vec![event(EventId::new(), b"")],
            ))?;
            Ok(())
        });
        let woken = follower.next_batch(10, Duration::from_secs(30))?;
        writer.join().expect("the writer")?;
        Ok(woken)
    })?;
    assert_eq!(woken.len(), 1, "the notification did not wake the follower");
    Ok(())
}

#[test]
fn appends_whose_connections_are_ended_reconnect_and_retries_with_their_ids_double_nothing()
-> Result<()> {
    const WRITERS: u8 = 4;
    const EACH: u8 = 25;
    // Its connections carry a name of their own, so that only they are ended.
    let name = test_server::unique("events_dropped");
    let url = format!("{}&application_name={name}", test_server::address("events-dropped"));
    let location = Location::parse(&url)?;
    let events = PgEvents::open(&location)?;
    let done = std::sync::atomic::AtomicBool::new(false);
    let mut acknowledged = Vec::new();
    let (ended, retried) = thread::scope(|scope| -> Result<(u64, usize)> {
        let killer = scope.spawn(|| test_server::end_connections(&name, &done));
        let writers: Vec<_> = (0..WRITERS)
            .map(|writer| {
                let events = &events;
                scope.spawn(move || -> Result<(usize, Vec<(u64, u64)>)> {
                    let mut retried = 0;
                    // What each append said it got: version and position.
                    let mut got = Vec::new();
                    for k in 0..EACH {
                        let id = EventId::from_bytes([
                            writer, k, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14,
                        ]);
                        let stream = format!("s-{writer}");
                        // A failed append's outcome is unknown: it is tried again with
                        // the same id, as a user would.
                        // Half the writers expect exact versions: a retry of an
                        // append that committed must find it where it expects.
                        let expected = match (writer % 2, k.checked_sub(1)) {
                            (0, _) => Expected::Any,
                            (_, None) => Expected::NoStream,
                            (_, Some(last)) => Expected::Exact(u64::from(last)),
                        };
                        loop {
                            match events.append(request(&stream, expected, vec![event(id, &[k])])) {
                                Ok(appended) => {
                                    let part = one(&appended);
                                    assert_eq!(part.versions, u64::from(k)..u64::from(k) + 1);
                                    got.push((part.versions.start, part.positions.start));
                                    break;
                                }
                                // Not forever: a server gone for good fails the test.
                                Err(Error::Database { .. }) if retried < 1_000 => retried += 1,
                                Err(other) => return Err(other),
                            }
                        }
                    }
                    Ok((retried, got))
                })
            })
            .collect();
        let mut retried = 0;
        for (writer, handle) in writers.into_iter().enumerate() {
            let (tries, got) = handle.join().expect("a writer panicked")?;
            retried += tries;
            acknowledged.push((writer, got));
        }
        done.store(true, Ordering::Release);
        Ok((killer.join().expect("the killer panicked")?, retried))
    })?;
    assert!(0 < ended, "no connection of the writer was ended");
    let all = events.read_all(0, 10_000, false)?;
    let positions: Vec<u64> = all.iter().map(|it| it.position.get()).collect();
    let total = u64::from(WRITERS) * u64::from(EACH);
    assert_eq!(positions, (0..total).collect::<Vec<_>>(), "{ended} ended, {retried} retried");
    for (writer, got) in acknowledged {
        let stream = format!("s-{writer}");
        let stored = events.read_stream(&stream, 0, 1_000, false)?;
        let data: Vec<Vec<u8>> = stored.iter().map(|it| it.data.clone()).collect();
        assert_eq!(data, (0..EACH).map(|k| vec![k]).collect::<Vec<_>>(), "stream {stream}");
        // Each append acknowledged the place its event is stored at.
        let places: Vec<(u64, u64)> =
            stored.iter().map(|it| (it.version, it.position.get())).collect();
        assert_eq!(got, places, "stream {stream}: acknowledged places differ from stored ones");
    }
    Ok(())
}

#[test]
fn a_writer_whose_streams_another_moved_without_moving_what_it_knows_is_not_fooled() -> Result<()> {
    // A remembers stream `s` at version 0; B appends to `s`; A then appends to `t`
    // (so the head it knows is current again), and to `s`: what it remembers of
    // `s` is stale though the head matches, and the write must find it out.
    let location = test_server::location("events-stale")?;
    let (a, b) = (PgEvents::open(&location)?, PgEvents::open(&location)?);
    a.append(request("s", Expected::NoStream, vec![event(EventId::new(), b"a0")]))?;
    b.append(request("s", Expected::Exact(0), vec![event(EventId::new(), b"b1")]))?;
    a.append(request("t", Expected::NoStream, vec![event(EventId::new(), b"a-t")]))?;
    let stale = a.append(request("s", Expected::Exact(0), vec![event(EventId::new(), b"no")]));
    assert!(
        matches!(&stale, Err(Error::WrongExpectedVersion { actual: Some(1), .. })),
        "{stale:?}"
    );
    let next = a.append(request("s", Expected::Exact(1), vec![event(EventId::new(), b"a2")]))?;
    assert_eq!((one(&next).versions.clone(), one(&next).positions.clone()), (2..3, 3..4));
    let data: Vec<Vec<u8>> =
        a.read_stream("s", 0, 10, false)?.into_iter().map(|it| it.data).collect();
    assert_eq!(data, [b"a0".to_vec(), b"b1".to_vec(), b"a2".to_vec()]);
    Ok(())
}

/// The plan of `sql` with `params`, as the database would run it on `client`.
fn plan(
    client: &mut Client,
    location: &Location,
    sql: &str,
    params: &[&(dyn postgres::types::ToSql + Sync)],
) -> Result<String> {
    let rows =
        client.query(&format!("EXPLAIN {sql}"), params).map_err(failed(location, "explain"))?;
    Ok(rows.iter().map(|row| row.get::<_, String>(0)).collect::<Vec<_>>().join("\n"))
}

#[test]
fn reads_walk_an_index_in_their_order_and_never_sort() -> Result<()> {
    // A namespace that grew since the events' table was last analyzed can look
    // nearly empty to the planner, which may then sort every event from a page's
    // start on, for each page: a read of `$all` quadratic in the store (seen on a
    // benchmark's fresh namespace of 200,000 events). Every read walks an index
    // in its order instead, and stops at the page's end. The plans are checked
    // with this server's statistics, whatever they are: on a reading connection
    // no sort is chosen, and the index that holds the read's order is walked.
    let location = test_server::location("events-plans")?;
    let events = PgEvents::open(&location)?;
    for batch in 0..10u8 {
        let part: Vec<Encoded> = (0..500).map(|_| event(EventId::new(), &[batch])).collect();
        events.append(request(&format!("s-{}", batch % 2), Expected::Any, part))?;
    }
    let mut client = connect_pager(&location)?;
    let namespace = location.namespace();
    let limit = 10_000i64;
    let (all, stream) = ("events_pkey on events", "events_namespace_stream_version_key on events");
    for (what, query, walk) in [
        ("$all forward", Query { from: 10, ..Query::default() }, format!("Index Scan using {all}")),
        (
            "$all backward",
            Query { from: 4_000, backward: true, ..Query::default() },
            format!("Index Scan Backward using {all}"),
        ),
        (
            "$all by type",
            Query { from: 10, event_type: Some("Test"), ..Query::default() },
            format!("Index Scan using {all}"),
        ),
        (
            "$all by prefix",
            Query { from: 10, prefix: Some("s-"), ..Query::default() },
            format!("Index Scan using {all}"),
        ),
        (
            "a stream forward",
            Query { stream: Some("s-1"), from: 10, ..Query::default() },
            format!("Index Scan using {stream}"),
        ),
        (
            "a stream backward",
            Query { stream: Some("s-1"), from: 2_000, backward: true, ..Query::default() },
            format!("Index Scan Backward using {stream}"),
        ),
    ] {
        let params: [&(dyn postgres::types::ToSql + Sync); 7] = [
            &namespace,
            &query.stream,
            &i64_of(query.from),
            &None::<i64>,
            &query.event_type,
            &query.prefix,
            &limit,
        ];
        let plan = plan(&mut client, &location, &read_sql(&query), &params)?;
        assert!(!plan.contains("Sort") && plan.contains(&walk), "a read of {what}:\n{plan}");
    }
    let plan = plan(&mut client, &location, &follow_sql(), &[&namespace, &10i64, &limit])?;
    let walk = format!("Index Scan using {all}");
    assert!(!plan.contains("Sort") && plan.contains(&walk), "a follower's read:\n{plan}");
    // Nor is a page's plan compiled (JIT), which its estimated cost alone could
    // bring about once the table is analyzed: 40 ms a page, against 3.6 ms.
    let jit: String = client.query_one("SHOW jit", &[]).map_err(failed(&location, "jit"))?.get(0);
    assert_eq!(jit, "off", "a reading connection compiles no statement");
    Ok(())
}

#[test]
fn an_append_probes_each_id_it_checks_by_its_key() -> Result<()> {
    // Before the events' table was first analyzed, the planner took it for nearly
    // empty and checked a group's ids by reading every id of the namespace into a
    // hash: each append cost what the namespace held (3,600 appends a second from
    // 16 threads on a fresh server, 14,000 once probed by key). A plan that joins
    // (nested loops off) shows whether the statement leaves the planner that
    // choice, whatever this server's statistics are: each id must be looked up by
    // the namespace and the id, in the index of both.
    let location = test_server::location("events-write-plan")?;
    let events = PgEvents::open(&location)?;
    events.append(request("s", Expected::Any, vec![event(EventId::new(), b"a")]))?;
    let mut client = location.connect()?;
    client.batch_execute("SET enable_nestloop = off").map_err(failed(&location, "plan"))?;
    let sql = format!("{WRITE}{LOOKUP}) l WHERE NOT (SELECT ok FROM state)");
    // One value of each type the statement takes, for all of its parameters.
    let text: Vec<&str> = vec!["s"];
    let ids: Vec<&[u8]> = vec![&[7u8; 16]];
    let bigints: Vec<i64> = vec![1];
    let counts: Vec<i32> = vec![1];
    let flags: Vec<bool> = vec![false];
    let params: [&(dyn postgres::types::ToSql + Sync); 29] = [
        &location.namespace(),
        &text,
        &ids,
        &1i64,
        &bigints,
        &ids,
        &text,
        &text,
        &bigints,
        &text,
        &bigints,
        &ids,
        &text,
        &ids,
        &ids,
        &counts,
        &counts,
        &counts,
        &counts,
        &bigints,
        &flags,
        &ids,
        &text,
        &bigints,
        &text,
        &bigints,
        &2i64,
        &"channel",
        &"2",
    ];
    let plan = plan(&mut client, &location, &sql, &params)?;
    let lines: Vec<&str> = plan.lines().collect();
    for (k, line) in lines.iter().enumerate() {
        if line.contains(" on events ") && !line.contains("Insert on") {
            let cond = lines.get(k + 1).copied().unwrap_or_default();
            assert!(
                line.contains("events_namespace_id_key")
                    && cond.contains("Index Cond")
                    && cond.contains("id = "),
                "each id is looked up by its key:\n{plan}"
            );
        }
    }
    assert!(plan.contains("events_namespace_id_key"), "the ids are looked up:\n{plan}");
    Ok(())
}
