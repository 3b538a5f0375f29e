//! A prevalent system kept in PostgreSQL (feature `postgres`), side by side with
//! the same work written by hand with the `postgres` crate, in one run:
//!
//! 1. durable events from 1 client: `Prevayler::handle` (a transaction per write
//!    that checks the writer's lease, stores the frame and notifies followers)
//!    against a loop of one transaction per event inserting its row, as a user
//!    would write it;
//! 2. the same from 16 threads: ours share transactions (group commit), the
//!    hand-written loop runs 16 connections;
//! 3. a follower's lag while the writer handles 500 events/s: from the writer's
//!    timestamp of an event to the follower applying it, p50 and p99;
//! 4. takeover: a writer process killed with `SIGKILL`, until a standby that waits
//!    for the lease (1 s) has handled its first event.
//!
//! And the event store in PostgreSQL:
//!
//! 5. appends with an expected version from 1 client: `EventStore::append` (one
//!    statement that locks the head row, checks that the stream's version and the
//!    ids are as planned, writes the event, moves the stream and the head on, and
//!    notifies) against a loop of one
//!    transaction per event as a user would write it: lock the stream's row, check
//!    its version, insert the event (its position from a `bigserial`), move the
//!    stream on, commit;
//! 6. the same from 16 threads, each on a stream of its own: ours share
//!    transactions, the hand-written loop runs 16 connections; and row 6b, its
//!    ceiling: one thread appending to the 16 streams at once, one `append_all`
//!    (one transaction) per round, so that no caller is waited for, against the
//!    same 16 hand-written connections;
//! 7. reading `$all` (forward, every event decoded) against a hand-written
//!    `SELECT` of the same rows.
//!
//! Rows 1, 2, 5, 6 and 6b alternate which side goes first, round by round, and report
//! medians. The server is the one `INSTASTATE_TEST_POSTGRES` names, or a
//! throwaway cluster on loopback started with `.ci/postgres`: `cargo bench --bench
//! postgres --features postgres` (`-- 5 7` runs rows 5 and 7 only).

#![allow(clippy::cast_precision_loss)] // Rates and lags in f64.

#[allow(dead_code)] // The mount is the other benchmarks'.
mod common;
#[path = "../tests/common/postgres.rs"]
#[allow(dead_code)]
mod server;

use std::{
    env,
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use instastate::{
    Prevayler, Timestamp,
    events::{Append, EventStore, Expected},
    prevalence::PrevaylerBuilder,
};
use postgres::{Client, NoTls};

use crate::common::{Res, interleave, median, percentile};

/// Events per run of row 1, per thread per run of row 2, and rounds of each.
const EVENTS: u64 = 300;
const THREAD_EVENTS: u64 = 60;
const THREADS: u64 = 16;
const ROUNDS: u32 = 5;
/// Row 7: the events read.
const READ_EVENTS: u64 = 200_000;
/// Row 3: the writer's rate and how long it runs.
const RATE: u64 = 500;
const LAG_RUN: Duration = Duration::from_secs(4);
/// Row 4: the lease, and how many takeovers.
const LEASE: Duration = Duration::from_secs(1);
const TAKEOVERS: usize = 5;

/// A new namespace of the server, connected without TLS as the hand-written side
/// is (`NoTls`): the comparison is of the work, not of the encryption.
fn address(prefix: &str) -> String {
    format!("{}&sslmode=disable", server::address(prefix))
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |it| u64::try_from(it.as_micros()).unwrap_or(u64::MAX))
}

/// The event: its payload, as a small command would be.
type Event = (u64, String);

/// The state: how many events, and (for row 3) the lag of each, in µs.
#[derive(Default, serde::Serialize, serde::Deserialize)]
struct Seen {
    events: u64,
    lags: Vec<u64>,
}

fn apply(seen: &mut Seen, _: Event, at: Timestamp) {
    seen.events += 1;
    seen.lags.push(now_micros().saturating_sub(at.as_micros()));
}

fn builder() -> PrevaylerBuilder<Seen> {
    Prevayler::builder::<Seen>()
        .lease_time(LEASE)
        .wait_for_lease(Duration::from_mins(1), Duration::from_millis(20))
}

fn event(n: u64) -> Event {
    (n, format!("deposit {n} into account-{}", n % 100))
}

fn rate(events: u64, secs: f64) -> f64 {
    events as f64 / secs
}

/// A table like the one a user would write for a journal of their own.
fn hand_table(client: &mut Client, table: &str) -> Res {
    client.batch_execute(&format!(
        "CREATE TABLE \"{table}\" (seq bigint PRIMARY KEY, at_us bigint NOT NULL, data bytea NOT NULL)"
    ))?;
    Ok(())
}

/// One transaction per event: insert its row, commit.
fn hand_loop(client: &mut Client, table: &str, from: u64, events: u64) -> Res {
    let insert = client.prepare(&format!("INSERT INTO \"{table}\" VALUES ($1, $2, $3)"))?;
    for n in from..from + events {
        let data = postcard::to_stdvec(&event(n))?;
        let mut tx = client.transaction()?;
        tx.execute(&insert, &[&n.cast_signed(), &now_micros().cast_signed(), &data])?;
        tx.commit()?;
    }
    Ok(())
}

/// Times `ROUNDS` rounds of `events` events each side, after a warm-up round,
/// alternating which side goes first; each side gets the number of its round's
/// first event. The median rates.
fn rounds(
    events: u64,
    mut ours: impl FnMut(u64) -> Res,
    mut hand: impl FnMut(u64) -> Res,
) -> Res<(f64, f64)> {
    let timed = |run: &mut dyn FnMut(u64) -> Res, from: u64| -> Res<f64> {
        let started = Instant::now();
        run(from)?;
        Ok(rate(events, started.elapsed().as_secs_f64()))
    };
    let (mut ours_rates, mut hand_rates) = (Vec::new(), Vec::new());
    for round in 0..=ROUNDS {
        let from = u64::from(round) * events;
        let (a, b) = interleave(round, || timed(&mut ours, from), || timed(&mut hand, from))?;
        // Round 0 warms up.
        if 0 < round {
            ours_rates.push(a);
            hand_rates.push(b);
        }
    }
    Ok((median(&ours_rates), median(&hand_rates)))
}

fn row_one(base: &str) -> Res<(f64, f64)> {
    let system = builder().open(address("bench-one"), Seen::default(), apply)?;
    let mut client = Client::connect(base, NoTls)?;
    let table = server::unique("hand_one");
    hand_table(&mut client, &table)?;
    rounds(
        EVENTS,
        |from| {
            for n in from..from + EVENTS {
                system.handle(event(n))?;
            }
            Ok(())
        },
        |from| hand_loop(&mut client, &table, from, EVENTS),
    )
}

fn row_threads(base: &str) -> Res<(f64, f64)> {
    let system = builder().open(address("bench-many"), Seen::default(), apply)?;
    let table = server::unique("hand_many");
    hand_table(&mut Client::connect(base, NoTls)?, &table)?;
    let mut clients =
        (0..THREADS).map(|_| Client::connect(base, NoTls)).collect::<Result<Vec<_>, _>>()?;
    rounds(
        THREADS * THREAD_EVENTS,
        |from| {
            on_each(&mut (0..THREADS).map(|_| ()).collect::<Vec<()>>(), |k, ()| {
                let first = from + k * THREAD_EVENTS;
                for n in first..first + THREAD_EVENTS {
                    system.handle(event(n))?;
                }
                Ok(())
            })
        },
        |from| {
            on_each(&mut clients, |k, client| {
                hand_loop(client, &table, from + k * THREAD_EVENTS, THREAD_EVENTS)
            })
        },
    )
}

/// Runs `run` on a thread per item of `items`, with its number and the item; the
/// first error of any.
fn on_each<T: Send>(items: &mut [T], run: impl Fn(u64, &mut T) -> Res + Sync) -> Res {
    thread::scope(|scope| {
        let handles: Vec<_> = items
            .iter_mut()
            .zip(0..)
            .map(|(item, k)| {
                let run = &run;
                scope.spawn(move || run(k, item))
            })
            .collect();
        joined(handles.into_iter().map(std::thread::ScopedJoinHandle::join))
    })
}

/// The first error of the threads `results` says, or of one that panicked.
fn joined(results: impl Iterator<Item = thread::Result<Res>>) -> Res {
    for result in results {
        result.map_err(|_| "a thread panicked")??;
    }
    Ok(())
}

/// Row 3: the lags (µs) a follower saw while the writer handled `RATE` events a
/// second.
fn row_lag() -> Res<Vec<f64>> {
    let url = address("bench-lag");
    let writer = builder().open(&url, Seen::default(), apply)?;
    let follower = builder().follow(&url, Seen::default(), apply, Duration::from_millis(100))?;
    let started = Instant::now();
    let mut n = 0;
    while started.elapsed() < LAG_RUN {
        writer.handle(event(n))?;
        n += 1;
        let due = Duration::from_micros(n * 1_000_000 / RATE);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            thread::sleep(wait);
        }
    }
    if !follower.wait_for(n, Duration::from_secs(30))? {
        return Err("the follower did not catch up".into());
    }
    Ok(follower.read(|seen| seen.lags.iter().map(|it| *it as f64).collect()))
}

/// Row 4: takeovers (ms) after a writer process is killed.
fn row_takeover() -> Res<Vec<f64>> {
    let url = address("bench-takeover");
    let mut times = Vec::new();
    for _ in 0..TAKEOVERS {
        let mut child = Command::new(env::current_exe()?)
            .env("BENCH_POSTGRES_WRITER", &url)
            .stdout(Stdio::piped())
            .spawn()?;
        let mut lines = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
        lines.next().ok_or("the writer printed nothing")??;
        child.kill()?;
        child.wait()?;
        let killed = Instant::now();
        let standby = builder().open(&url, Seen::default(), apply)?;
        standby.handle(event(0))?;
        times.push(killed.elapsed().as_secs_f64() * 1e3);
        // Closed, it hands the lease to the next writer at once.
        standby.close()?;
    }
    Ok(times)
}

/// The tables a user would write for an event store of their own.
fn hand_event_tables(client: &mut Client, prefix: &str) -> Res {
    client.batch_execute(&format!(
        "CREATE TABLE \"{prefix}_streams\" (stream text PRIMARY KEY, version bigint NOT NULL);
         CREATE TABLE \"{prefix}_events\" (position bigserial PRIMARY KEY, stream text NOT NULL,
             version bigint NOT NULL, at_us bigint NOT NULL, data bytea NOT NULL,
             UNIQUE (stream, version))"
    ))?;
    Ok(())
}

/// One transaction per event, with its stream's expected version checked: lock the
/// stream's row, check, insert the event, move the stream on, commit.
fn hand_appends(client: &mut Client, prefix: &str, stream: &str, from: u64, events: u64) -> Res {
    let version = client.prepare(&format!(
        "SELECT version FROM \"{prefix}_streams\" WHERE stream = $1 FOR UPDATE"
    ))?;
    let insert = client.prepare(&format!(
        "INSERT INTO \"{prefix}_events\" (stream, version, at_us, data) VALUES ($1, $2, $3, $4)"
    ))?;
    let moved = client.prepare(&format!(
        "INSERT INTO \"{prefix}_streams\" VALUES ($1, $2)
         ON CONFLICT (stream) DO UPDATE SET version = EXCLUDED.version"
    ))?;
    for n in from..from + events {
        let data = postcard::to_stdvec(&event(n))?;
        let mut tx = client.transaction()?;
        let last: Option<i64> = tx.query_opt(&version, &[&stream])?.map(|row| row.get(0));
        let expected = n.checked_sub(1).map(u64::cast_signed);
        if last != expected {
            return Err(format!("stream {stream} is at {last:?}, not {expected:?}").into());
        }
        let next = n.cast_signed();
        tx.execute(&insert, &[&stream, &next, &now_micros().cast_signed(), &data])?;
        tx.execute(&moved, &[&stream, &next])?;
        tx.commit()?;
    }
    Ok(())
}

/// Ours: `events` appends to `stream`, each expecting the version before it.
fn our_appends(store: &EventStore<Event>, stream: &str, from: u64, events: u64) -> Res {
    for n in from..from + events {
        let expected = n.checked_sub(1).map_or(Expected::NoStream, Expected::Exact);
        store.append(stream, expected, [event(n)])?;
    }
    Ok(())
}

fn row_event_one(base: &str) -> Res<(f64, f64)> {
    let store = EventStore::<Event>::open(address("bench-events-one"))?;
    let mut client = Client::connect(base, NoTls)?;
    let prefix = server::unique("hand_events_one");
    hand_event_tables(&mut client, &prefix)?;
    rounds(
        EVENTS,
        |from| our_appends(&store, "account", from, EVENTS),
        |from| hand_appends(&mut client, &prefix, "account", from, EVENTS),
    )
}

fn row_event_threads(base: &str) -> Res<(f64, f64)> {
    against_hand_threads(base, "many", |store, from| {
        on_each(&mut (0..THREADS).map(|_| ()).collect::<Vec<()>>(), |k, ()| {
            our_appends(store, &format!("account-{k}"), from / THREADS, THREAD_EVENTS)
        })
    })
}

/// Row 6b: what row 6's appends come to when no caller is waited for: one thread
/// appends to the 16 streams at once, each with its expected version, in one
/// transaction per round of 16 events.
fn row_event_groups(base: &str) -> Res<(f64, f64)> {
    against_hand_threads(base, "groups", |store, from| {
        for n in from / THREADS..from / THREADS + THREAD_EVENTS {
            let expected = n.checked_sub(1).map_or(Expected::NoStream, Expected::Exact);
            store.append_all(
                (0..THREADS).map(|k| Append::new(format!("account-{k}"), expected, [event(n)])),
            )?;
        }
        Ok(())
    })
}

/// Rows 6 and 6b: `ours` (a store of its own, and a round's first event number)
/// against `THREADS` hand-written connections, each appending to a stream of its
/// own. Each round goes on in each stream from where the last one ended.
fn against_hand_threads(
    base: &str,
    name: &str,
    mut ours: impl FnMut(&EventStore<Event>, u64) -> Res,
) -> Res<(f64, f64)> {
    let store = EventStore::<Event>::open(address(&format!("bench-events-{name}")))?;
    let prefix = server::unique(&format!("hand_events_{name}"));
    hand_event_tables(&mut Client::connect(base, NoTls)?, &prefix)?;
    let mut clients =
        (0..THREADS).map(|_| Client::connect(base, NoTls)).collect::<Result<Vec<_>, _>>()?;
    rounds(
        THREADS * THREAD_EVENTS,
        |from| ours(&store, from),
        |from| {
            on_each(&mut clients, |k, client| {
                let stream = format!("account-{k}");
                hand_appends(client, &prefix, &stream, from / THREADS, THREAD_EVENTS)
            })
        },
    )
}

/// Row 7: `READ_EVENTS` events read from `$all`, ours and by hand, in ev/s.
fn row_event_reads(base: &str) -> Res<(f64, f64)> {
    let store = EventStore::<Event>::open(address("bench-events-read"))?;
    let mut client = Client::connect(base, NoTls)?;
    let prefix = server::unique("hand_events_read");
    hand_event_tables(&mut client, &prefix)?;
    // Written in batches of 1,000, both.
    for batch in 0..READ_EVENTS / 1_000 {
        let events: Vec<Event> = (batch * 1_000..(batch + 1) * 1_000).map(event).collect();
        store.append(&format!("account-{}", batch % 100), Expected::Any, events)?;
        client.execute(
            &format!(
                "INSERT INTO \"{prefix}_events\" (stream, version, at_us, data)
                 SELECT 'account-' || ($1::bigint % 100), n, 0, $2 FROM generate_series($1::bigint, $1::bigint + 999) n"
            ),
            &[&(batch * 1_000).cast_signed(), &postcard::to_stdvec(&event(batch))?],
        )?;
    }
    let (mut ours, mut hand) = (Vec::new(), Vec::new());
    for round in 0..=ROUNDS {
        let (a, b) = interleave(
            round,
            || {
                let started = Instant::now();
                let mut read = 0;
                for event in store.read_all() {
                    std::hint::black_box(event?);
                    read += 1;
                }
                if read != READ_EVENTS {
                    return Err(format!("read {read} events of {READ_EVENTS}").into());
                }
                Ok(rate(read, started.elapsed().as_secs_f64()))
            },
            || {
                let started = Instant::now();
                let rows = client
                    .query(&format!("SELECT * FROM \"{prefix}_events\" ORDER BY position"), &[])?;
                for row in &rows {
                    let data: &[u8] = row.try_get("data")?;
                    let stream: String = row.try_get("stream")?;
                    std::hint::black_box((postcard::from_bytes::<Event>(data)?, stream));
                }
                Ok(rate(rows.len() as u64, started.elapsed().as_secs_f64()))
            },
        )?;
        if 0 < round {
            ours.push(a);
            hand.push(b);
        }
    }
    Ok((median(&ours), median(&hand)))
}

/// The writer process of row 4: handles events until killed.
fn writer(url: &str) -> Res {
    let system = builder().open(url, Seen::default(), apply)?;
    system.handle(event(0))?;
    println!("ready");
    loop {
        system.handle(event(1))?;
        thread::sleep(Duration::from_millis(5));
    }
}

fn main() -> Res {
    if let Ok(url) = env::var("BENCH_POSTGRES_WRITER") {
        return writer(&url);
    }
    // `cargo bench` passes `--bench`; numbers after `--` choose rows (all without).
    let chosen: Vec<String> = env::args().skip(1).filter(|arg| !arg.starts_with('-')).collect();
    let row = |n: &str| chosen.is_empty() || chosen.iter().any(|arg| arg == n);
    let base = server::url().to_owned();
    let mut client = Client::connect(&base, NoTls)?;
    let version: String = client.query_one("SHOW server_version", &[])?.get(0);
    let sync: String = client.query_one("SHOW synchronous_commit", &[])?.get(0);
    println!(
        "PostgreSQL {version} on loopback, synchronous_commit {sync}; {ROUNDS} rounds after a warm-up, medians"
    );
    if row("1") {
        let (ours, hand) = row_one(&base)?;
        println!(
            "(1) durable events, 1 client: ours {ours:.0} ev/s, by hand {hand:.0} ev/s: {:.2}x",
            ours / hand
        );
    }
    if row("2") {
        let (ours, hand) = row_threads(&base)?;
        println!(
            "(2) durable events, {THREADS} threads: ours {ours:.0} ev/s, by hand ({THREADS} connections) {hand:.0} ev/s: {:.2}x",
            ours / hand
        );
    }
    if row("3") {
        let lags = row_lag()?;
        println!(
            "(3) follower lag at {RATE} ev/s: p50 {:.1} ms, p99 {:.1} ms ({} events)",
            percentile(&lags, 50) / 1e3,
            percentile(&lags, 99) / 1e3,
            lags.len()
        );
    }
    if row("5") {
        let (ours, hand) = row_event_one(&base)?;
        println!(
            "(5) event store appends with an expected version, 1 client: ours {ours:.0} ev/s, by hand {hand:.0} ev/s: {:.2}x",
            ours / hand
        );
    }
    if row("6") {
        let (ours, hand) = row_event_threads(&base)?;
        println!(
            "(6) event store appends with an expected version, {THREADS} threads: ours {ours:.0} ev/s, by hand ({THREADS} connections) {hand:.0} ev/s: {:.2}x",
            ours / hand
        );
    }
    if row("6b") {
        let (ours, hand) = row_event_groups(&base)?;
        println!(
            "(6b) the same, {THREADS} streams appended at once by one thread (one transaction each): ours {ours:.0} ev/s, by hand ({THREADS} connections) {hand:.0} ev/s: {:.2}x",
            ours / hand
        );
    }
    if row("7") {
        let (ours, hand) = row_event_reads(&base)?;
        println!(
            "(7) reading $all ({READ_EVENTS} events, decoded): ours {:.2} M ev/s, by hand (one SELECT) {:.2} M ev/s: {:.2}x",
            ours / 1e6,
            hand / 1e6,
            ours / hand
        );
    }
    if row("4") {
        let times = row_takeover()?;
        println!(
            "(4) takeover after SIGKILL with a {} ms lease: median {:.0} ms, slowest {:.0} ms ({TAKEOVERS} kills)",
            LEASE.as_millis(),
            median(&times),
            times.iter().copied().fold(0.0, f64::max)
        );
    }
    Ok(())
}
