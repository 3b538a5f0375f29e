//! The database restarted (`pg_ctl restart -m fast`: every connection ends, and
//! the server is gone for a moment) twice under a writer of each front door: a
//! prevalent system, an event store and a store of cells. Each writer goes on as
//! a user would, retrying an append with the same ids, or reopening a system or
//! store whose write failed, and checks that nothing acknowledged was lost and
//! nothing was doubled.
//!
//! The server is a cluster of this test's own (`.ci/postgres`), since restarting
//! it ends every other test's connections: it needs PostgreSQL's server binaries,
//! and fails saying so without them.

use std::{
    path::Path,
    process::Command,
    sync::atomic::{AtomicBool, AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use instastate::{
    Prevayler, StateCell, Store, Timestamp,
    events::{EventId, EventStore, Expected, NewEvent},
};

type TestResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// How long a writer keeps trying before the test fails.
const PATIENCE: Duration = Duration::from_mins(1);

/// How many writes each writer makes once the restarts are over, to show it goes
/// on.
const AFTER: u32 = 10;

/// Starts a cluster of this test's own; its URL.
fn own_cluster() -> TestResult<String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/postgres");
    let out = Command::new("bash").arg(script).arg(std::process::id().to_string()).output()?;
    if !out.status.success() {
        return Err(format!(
            "this test starts a PostgreSQL cluster of its own with {script}, which failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Restarts the server at `url` (`-m fast`: sessions are ended, as a crash or an
/// upgrade would end them), and waits until it accepts connections again.
fn restart(url: &str) -> TestResult {
    let mut client = postgres::Client::connect(url, postgres::NoTls)?;
    let started = started_at(&mut client)?;
    let data: String = client.query_one("SHOW data_directory", &[])?.get(0);
    let bin: String =
        client.query_one("SELECT setting FROM pg_config WHERE name = 'BINDIR'", &[])?.get(0);
    drop(client);
    let log = Path::new(&data).with_file_name("server.log");
    let pg_ctl = Path::new(&bin).join("pg_ctl");
    let mut command = if is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(pg_ctl);
        command
    } else {
        Command::new(pg_ctl)
    };
    let out = command
        .arg("-D")
        .arg(&data)
        .arg("-l")
        .arg(&log)
        .args(["-m", "fast", "-w", "-t", "60", "restart"])
        .output()?;
    if !out.status.success() {
        return Err(
            format!("pg_ctl restart failed: {}", String::from_utf8_lossy(&out.stderr)).into()
        );
    }
    let mut client = postgres::Client::connect(url, postgres::NoTls)?;
    assert_ne!(started_at(&mut client)?, started, "the server did not restart");
    Ok(())
}

/// When the server last started, as it says.
fn started_at(client: &mut postgres::Client) -> TestResult<String> {
    Ok(client.query_one("SELECT pg_postmaster_start_time()::text", &[])?.get(0))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}

/// `base` with namespace `namespace`.
fn at(base: &str, namespace: &str) -> String {
    format!("{base}?namespace={namespace}")
}

/// Runs `attempt` until it succeeds, for at most [`PATIENCE`].
fn retry<T>(what: &str, mut attempt: impl FnMut() -> instastate::Result<T>) -> TestResult<T> {
    let started = Instant::now();
    loop {
        match attempt() {
            Ok(done) => return Ok(done),
            Err(_) if started.elapsed() < PATIENCE => thread::sleep(Duration::from_millis(20)),
            Err(err) => {
                return Err(format!("{what}: still failing after {PATIENCE:?}: {err}").into());
            }
        }
    }
}

#[test]
fn writers_of_every_front_door_lose_and_double_nothing_when_the_database_restarts() -> TestResult {
    let base = own_cluster()?;
    let restarts_done = AtomicBool::new(false);
    let ready = AtomicU32::new(0);
    thread::scope(|scope| -> TestResult {
        let writers = [
            scope.spawn(|| prevalence(&at(&base, "restart-prevalence"), &restarts_done, &ready)),
            scope.spawn(|| events(&at(&base, "restart-events"), &restarts_done, &ready)),
            scope.spawn(|| cells(&at(&base, "restart-cells"), &restarts_done, &ready)),
        ];
        let restarter = scope.spawn(|| -> TestResult {
            // Once every writer has begun.
            while ready.load(Ordering::Acquire) < 3 {
                thread::sleep(Duration::from_millis(10));
            }
            for _ in 0..2 {
                thread::sleep(Duration::from_millis(300));
                restart(&base)?;
            }
            Ok(())
        });
        let outcome = restarter.join().map_err(|_| "the restarter panicked")?;
        restarts_done.store(true, Ordering::Release);
        outcome?;
        for writer in writers {
            writer.join().map_err(|_| "a writer panicked")??;
        }
        Ok(())
    })
}

/// What the prevalent system's state is: every event it applied, in order.
fn log(events: &mut Vec<u32>, event: u32, _: Timestamp) -> usize {
    events.push(event);
    events.len()
}

fn open_log(url: &str) -> TestResult<Prevayler<Vec<u32>, u32, usize>> {
    retry("opening the prevalent system", || {
        Prevayler::builder::<Vec<u32>>()
            .lease_time(Duration::from_secs(1))
            .wait_for_lease(PATIENCE, Duration::from_millis(20))
            .open(url, Vec::new(), log)
    })
}

fn prevalence(url: &str, done: &AtomicBool, ready: &AtomicU32) -> TestResult {
    let mut system = open_log(url)?;
    ready.fetch_add(1, Ordering::AcqRel);
    let (mut acknowledged, mut failed, mut after) = (Vec::new(), 0, 0);
    let mut next = 0;
    while after < AFTER {
        next += 1;
        if let Ok(count) = system.handle(next) {
            acknowledged.push(next);
            assert_eq!(count, acknowledged.len(), "event {next} applied once");
        } else {
            // The system is poisoned: opened again, it holds every event
            // acknowledged, and the failed one or not.
            failed += 1;
            drop(system);
            system = open_log(url)?;
            let found = system.read(Clone::clone);
            if found.last() == Some(&next) {
                acknowledged.push(next);
            }
            assert_eq!(found, acknowledged, "after event {next} failed");
        }
        if done.load(Ordering::Acquire) {
            after += 1;
        }
    }
    system.close()?;
    let system = open_log(url)?;
    assert_eq!(system.read(Clone::clone), acknowledged, "{failed} writes failed");
    eprintln!(
        "prevalence: {} events acknowledged, {failed} failed and reopened",
        acknowledged.len()
    );
    Ok(())
}

fn events(url: &str, done: &AtomicBool, ready: &AtomicU32) -> TestResult {
    let store = retry("opening the event store", || EventStore::<u32>::open(url))?;
    ready.fetch_add(1, Ordering::AcqRel);
    let (mut k, mut after, mut retried) = (0u32, 0, 0);
    while after < AFTER {
        // The same id at each try: a retry of an append that committed returns
        // its earlier result.
        let mut id = [0u8; 16];
        id[..4].copy_from_slice(&k.to_be_bytes());
        id[15] = 1;
        let expected = if k == 0 { Expected::NoStream } else { Expected::Exact(u64::from(k) - 1) };
        let appended = retry("an append", || {
            let appended = store.append(
                "restart",
                expected,
                [NewEvent::new(k).with_id(EventId::from_bytes(id))],
            );
            retried += usize::from(appended.is_err());
            appended
        })?;
        assert_eq!(appended.versions, u64::from(k)..u64::from(k) + 1);
        k += 1;
        if done.load(Ordering::Acquire) {
            after += 1;
        }
    }
    let read: Vec<(u64, u32)> = store
        .read_stream("restart")
        .forward()
        .into_iter()
        .map(|event| event.map(|it| (it.position.get(), it.data)))
        .collect::<instastate::Result<_>>()?;
    let expected: Vec<(u64, u32)> = (0..k).map(|k| (u64::from(k), k)).collect();
    assert_eq!(read, expected, "every event once, in order, at gap-free positions");
    eprintln!("events: {k} appends acknowledged, {retried} tries failed and were retried");
    Ok(())
}

static COUNTER: StateCell<u32> = StateCell::new("pg_restart::COUNTER", || 0);

fn open_cells(url: &str) -> TestResult<Store> {
    retry("opening the store", || {
        Store::builder()
            .cell(&COUNTER)
            .lease_time(Duration::from_secs(1))
            .wait_for_lease(PATIENCE, Duration::from_millis(20))
            .open(url)
    })
}

fn cells(url: &str, done: &AtomicBool, ready: &AtomicU32) -> TestResult {
    let mut store = open_cells(url)?;
    ready.fetch_add(1, Ordering::AcqRel);
    let (mut acknowledged, mut failed, mut after) = (0, 0, 0);
    let mut next = 0;
    while after < AFTER {
        next += 1;
        COUNTER.set(next);
        if store.save_all().is_ok() {
            acknowledged = next;
        } else {
            // The store is poisoned: opened again, it holds the last save
            // acknowledged, or the failed one.
            failed += 1;
            drop(store);
            store = open_cells(url)?;
            let found = COUNTER.get();
            assert!(
                found == acknowledged || found == next,
                "save {next} failed after {acknowledged} was acknowledged, and {found} came back"
            );
            acknowledged = found;
        }
        if done.load(Ordering::Acquire) {
            after += 1;
        }
    }
    store.close()?;
    COUNTER.set(0);
    let _store = open_cells(url)?;
    assert_eq!(COUNTER.get(), acknowledged, "{failed} saves failed");
    eprintln!("cells: {next} saves, {failed} failed and reopened");
    Ok(())
}
