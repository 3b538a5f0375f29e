//! The event store against a raw append + `fdatasync` loop and against SQLite, the
//! embedded store a Rust user would pick instead.
//!
//! SQLite is set up as such a user would: rusqlite (bundled SQLite), WAL,
//! `synchronous=FULL`, a table with `UNIQUE(stream, version)`, and an append that
//! checks the expected version inside its transaction (`BEGIN IMMEDIATE`, read the
//! stream's last version, insert). The raw loop appends the same records, framed
//! with a length and a CRC-32, and `fdatasync`s each; it checks nothing.
//!
//! Rows, each measured in rounds that alternate which side goes first:
//! 1. durable appends of one event, one thread;
//! 2. the same from 16 threads, each to its own streams (ours with group commit);
//! 3. reading every one of 1,000,000 events in order (`$all` forward), decoding each;
//! 4. reading one 100-event stream among those 1,000,000 events;
//! 5. opening the store of 1,000,000 events, against reading and decoding the raw file;
//! 6. the memory the index takes, per event.
//!
//! Run with `cargo bench --bench events`; about half a minute.

// A benchmark: its counts convert to floating point for rates (far below 2^52),
// it indexes arrays it sized itself, and names the tools it compares in prose.
#![allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::indexing_slicing,
    clippy::doc_markdown
)]

// Shared with the other benchmarks, which use what this one does not.
#[allow(dead_code)]
mod common;

use std::{
    fs::{self, File},
    io::Write,
    path::{Path, PathBuf},
    sync::Arc,
    thread,
    time::Instant,
};

use instastate::events::{Durability, EventStore, Expected};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::common::{Res, median, mount_of};

/// Appends per run of row 1.
const APPENDS: u64 = 400;
const SYNC_RUNS: u32 = 7;
const THREADS: u64 = 16;
/// Appends per thread per run of row 2.
const THREAD_APPENDS: u64 = 100;
const THREAD_RUNS: u32 = 5;
/// Events of the store the read rows read.
const EVENTS: u64 = 1_000_000;
const STREAMS: u64 = 10_000;
const READ_RUNS: u32 = 5;
/// Stream reads per run of row 4.
const STREAM_READS: u64 = 200;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Bank {
    Deposited { account: u32, amount: i64 },
    Withdrew { account: u32, amount: i64 },
}

fn event(n: u64) -> Bank {
    let account = u32::try_from(n % STREAMS).unwrap_or(0);
    let amount = i64::try_from(n % 1000).unwrap_or(0);
    if n.is_multiple_of(3) {
        Bank::Withdrew { account, amount }
    } else {
        Bank::Deposited { account, amount }
    }
}

fn stream(n: u64) -> String {
    format!("account-{}", n % STREAMS)
}

/// A record as the raw loop and SQLite keep it.
#[derive(Serialize, Deserialize)]
struct Record {
    stream: String,
    version: u64,
    event_type: String,
    data: Vec<u8>,
}

fn event_type(bank: &Bank) -> &'static str {
    match bank {
        Bank::Deposited { .. } => "Deposited",
        Bank::Withdrew { .. } => "Withdrew",
    }
}

// ----------------------------------------------------------------------------
// The three sides' appends.

fn ours_open(dir: &Path, durability: Durability) -> Res<EventStore<Bank>> {
    Ok(EventStore::<Bank>::builder().durability(durability).open(dir)?)
}

/// Appends events `from..to`, each to its stream with its expected version.
fn ours_append(events: &EventStore<Bank>, from: u64, to: u64) -> Res {
    for n in from..to {
        let name = stream(n);
        let expected = events.stream_version(&name)?.map_or(Expected::NoStream, Expected::Exact);
        events.append(&name, expected, [event(n)])?;
    }
    Ok(())
}

/// Appends event `n` to `out` as the raw loop frames it: length, CRC-32, record.
fn raw_frame(
    out: &mut Vec<u8>,
    versions: &mut std::collections::HashMap<String, u64>,
    n: u64,
) -> Res {
    let name = stream(n);
    let version = versions.entry(name.clone()).or_default();
    let bank = event(n);
    let record = Record {
        stream: name,
        version: *version,
        event_type: event_type(&bank).into(),
        data: postcard::to_stdvec(&bank)?,
    };
    *version += 1;
    let payload = postcard::to_stdvec(&record)?;
    out.extend_from_slice(&u32::try_from(payload.len())?.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(())
}

fn raw_append(
    file: &mut File,
    versions: &mut std::collections::HashMap<String, u64>,
    from: u64,
    to: u64,
) -> Res {
    let mut frame = Vec::new();
    for n in from..to {
        frame.clear();
        raw_frame(&mut frame, versions, n)?;
        file.write_all(&frame)?;
        file.sync_data()?;
    }
    Ok(())
}

fn sqlite_open(path: &Path) -> Res<Connection> {
    let db = Connection::open(path)?;
    db.pragma_update(None, "journal_mode", "WAL")?;
    db.pragma_update(None, "synchronous", "FULL")?;
    db.busy_timeout(std::time::Duration::from_secs(30))?;
    db.execute_batch(
        "CREATE TABLE IF NOT EXISTS events (
            position INTEGER PRIMARY KEY,
            stream TEXT NOT NULL,
            version INTEGER NOT NULL,
            event_type TEXT NOT NULL,
            at INTEGER NOT NULL,
            data BLOB NOT NULL,
            UNIQUE (stream, version)
        )",
    )?;
    Ok(db)
}

/// One append with the expected-version check in its transaction.
fn sqlite_append_one(db: &mut Connection, n: u64) -> Res {
    let name = stream(n);
    let bank = event(n);
    let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let last: Option<i64> = tx
        .query_row("SELECT MAX(version) FROM events WHERE stream = ?1", params![name], |row| {
            row.get(0)
        })
        .optional()?
        .flatten();
    let next = last.map_or(0, |last| last + 1);
    tx.execute(
        "INSERT INTO events (stream, version, event_type, at, data) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![name, next, event_type(&bank), 0i64, postcard::to_stdvec(&bank)?],
    )?;
    tx.commit()?;
    Ok(())
}

// ----------------------------------------------------------------------------
// Rows 1 and 2: durable appends.

struct Rates {
    ours: Vec<f64>,
    raw: Vec<f64>,
    sqlite: Vec<f64>,
}

fn rate(events: u64, secs: f64) -> f64 {
    events as f64 / secs
}

fn timed(run: impl FnOnce() -> Res) -> Res<f64> {
    let started = Instant::now();
    run()?;
    Ok(started.elapsed().as_secs_f64())
}

fn row_one_thread(root: &Path) -> Res<Rates> {
    let mut rates = Rates { ours: Vec::new(), raw: Vec::new(), sqlite: Vec::new() };
    for round in 0..=SYNC_RUNS {
        let dir = tempfile::tempdir_in(root)?;
        let mut sides: Vec<(u8, f64)> = Vec::new();
        for k in 0..3 {
            let side = ((k + round) % 3) as u8;
            let secs = match side {
                0 => {
                    let events = ours_open(&dir.path().join("ours"), Durability::SyncEach)?;
                    timed(|| ours_append(&events, 0, APPENDS))?
                }
                1 => {
                    let mut file = File::create(dir.path().join("raw"))?;
                    let mut versions = std::collections::HashMap::new();
                    timed(|| raw_append(&mut file, &mut versions, 0, APPENDS))?
                }
                _ => {
                    let mut db = sqlite_open(&dir.path().join("sqlite.db"))?;
                    timed(|| (0..APPENDS).try_for_each(|n| sqlite_append_one(&mut db, n)))?
                }
            };
            sides.push((side, rate(APPENDS, secs)));
        }
        // The first round warms up.
        if round > 0 {
            for (side, per_sec) in sides {
                match side {
                    0 => rates.ours.push(per_sec),
                    1 => rates.raw.push(per_sec),
                    _ => rates.sqlite.push(per_sec),
                }
            }
        }
    }
    Ok(rates)
}

fn row_threads(root: &Path) -> Res<Rates> {
    let mut rates = Rates { ours: Vec::new(), raw: Vec::new(), sqlite: Vec::new() };
    let total = THREADS * THREAD_APPENDS;
    for round in 0..=THREAD_RUNS {
        let dir = tempfile::tempdir_in(root)?;
        let run_ours = || -> Res<f64> {
            let events = Arc::new(ours_open(&dir.path().join("ours"), Durability::GroupCommit)?);
            timed(|| {
                thread::scope(|scope| {
                    let handles: Vec<_> = (0..THREADS)
                        .map(|t| {
                            let events = Arc::clone(&events);
                            // Thread t appends to the streams n with n % THREADS == t.
                            scope.spawn(move || -> Res {
                                for k in 0..THREAD_APPENDS {
                                    let n = k * THREADS + t;
                                    ours_append(&events, n, n + 1)?;
                                }
                                Ok(())
                            })
                        })
                        .collect();
                    handles
                        .into_iter()
                        .try_for_each(|handle| handle.join().map_err(|_| "a thread panicked")?)
                })
            })
        };
        let run_sqlite = || -> Res<f64> {
            let path = dir.path().join("sqlite.db");
            drop(sqlite_open(&path)?);
            timed(|| {
                thread::scope(|scope| {
                    let handles: Vec<_> = (0..THREADS)
                        .map(|t| {
                            let path = path.clone();
                            scope.spawn(move || -> Res {
                                let mut db = sqlite_open(&path)?;
                                for k in 0..THREAD_APPENDS {
                                    sqlite_append_one(&mut db, k * THREADS + t)?;
                                }
                                Ok(())
                            })
                        })
                        .collect();
                    handles
                        .into_iter()
                        .try_for_each(|handle| handle.join().map_err(|_| "a thread panicked")?)
                })
            })
        };
        let (ours, sqlite) = if round % 2 == 0 {
            let ours = run_ours()?;
            (ours, run_sqlite()?)
        } else {
            let sqlite = run_sqlite()?;
            (run_ours()?, sqlite)
        };
        if round > 0 {
            rates.ours.push(rate(total, ours));
            rates.sqlite.push(rate(total, sqlite));
        }
    }
    Ok(rates)
}

// ----------------------------------------------------------------------------
// Rows 3 to 6: a store of a million events.

struct Million {
    _dir: tempfile::TempDir,
    ours: PathBuf,
    raw: PathBuf,
    sqlite: PathBuf,
}

fn build_million(root: &Path) -> Res<Million> {
    let dir = tempfile::tempdir_in(root)?;
    let (ours, raw, sqlite) =
        (dir.path().join("ours"), dir.path().join("raw"), dir.path().join("sqlite.db"));
    {
        let events = ours_open(&ours, Durability::Unsynced)?;
        for n in 0..EVENTS {
            events.append(&stream(n), Expected::Any, [event(n)])?;
        }
        events.close()?;
    }
    {
        let mut out = Vec::new();
        let mut versions = std::collections::HashMap::<String, u64>::new();
        for n in 0..EVENTS {
            raw_frame(&mut out, &mut versions, n)?;
        }
        fs::write(&raw, out)?;
    }
    {
        let mut db = sqlite_open(&sqlite)?;
        let tx = db.transaction()?;
        {
            let mut insert = tx.prepare("INSERT INTO events (stream, version, event_type, at, data) VALUES (?1, ?2, ?3, ?4, ?5)")?;
            let mut versions = std::collections::HashMap::<String, i64>::new();
            for n in 0..EVENTS {
                let name = stream(n);
                let version = versions.entry(name.clone()).or_default();
                let bank = event(n);
                insert.execute(params![
                    name,
                    *version,
                    event_type(&bank),
                    0i64,
                    postcard::to_stdvec(&bank)?
                ])?;
                *version += 1;
            }
        }
        tx.commit()?;
    }
    Ok(Million { _dir: dir, ours, raw, sqlite })
}

/// Reads and decodes every event of the raw file; returns how many.
fn raw_read(path: &Path) -> Res<u64> {
    let bytes = fs::read(path)?;
    let mut at = 0;
    let mut count = 0;
    while let Some(head) = bytes.get(at..at + 8) {
        let len = u32::from_le_bytes(head.get(..4).ok_or("head")?.try_into()?) as usize;
        let crc = u32::from_le_bytes(head.get(4..).ok_or("head")?.try_into()?);
        let payload = bytes.get(at + 8..at + 8 + len).ok_or("cut short")?;
        if crc32fast::hash(payload) != crc {
            return Err("bad crc".into());
        }
        let record: Record = postcard::from_bytes(payload)?;
        let bank: Bank = postcard::from_bytes(&record.data)?;
        std::hint::black_box((record.stream, record.version, record.event_type, bank));
        count += 1;
        at += 8 + len;
    }
    Ok(count)
}

fn ours_read_all(events: &EventStore<Bank>) -> Res<u64> {
    let mut count = 0;
    for event in events.read_all() {
        std::hint::black_box(event?);
        count += 1;
    }
    Ok(count)
}

fn sqlite_read_all(db: &Connection) -> Res<u64> {
    let mut query = db.prepare_cached(
        "SELECT stream, version, position, event_type, data FROM events ORDER BY position",
    )?;
    decode_rows(query.query([])?)
}

/// Reads and decodes every row of `rows`, as a user would; returns how many.
fn decode_rows(mut rows: rusqlite::Rows<'_>) -> Res<u64> {
    let mut count = 0;
    while let Some(row) = rows.next()? {
        let stream: String = row.get(0)?;
        let version: i64 = row.get(1)?;
        let position: i64 = row.get(2)?;
        let event_type: String = row.get(3)?;
        let data: Vec<u8> = row.get(4)?;
        let bank: Bank = postcard::from_bytes(&data)?;
        std::hint::black_box((stream, version, position, event_type, bank));
        count += 1;
    }
    Ok(count)
}

fn ours_read_stream(events: &EventStore<Bank>, name: &str) -> Res<u64> {
    let mut count = 0;
    for event in events.read_stream(name) {
        std::hint::black_box(event?);
        count += 1;
    }
    Ok(count)
}

fn sqlite_read_stream(db: &Connection, name: &str) -> Res<u64> {
    let mut query = db.prepare_cached(
        "SELECT stream, version, position, event_type, data FROM events WHERE stream = ?1 ORDER BY version",
    )?;
    decode_rows(query.query(params![name])?)
}

/// The resident set size of this process, in bytes.
fn rss() -> Res<u64> {
    let status = fs::read_to_string("/proc/self/status")?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:")).ok_or("no VmRSS")?;
    let kib: u64 = line.split_whitespace().nth(1).ok_or("no number")?.parse()?;
    Ok(kib * 1024)
}

struct Million3 {
    read_all: Rates,
    read_stream: Rates,
    read_stream_warm: Rates,
    open: Rates,
    index_bytes_per_event: f64,
}

fn rows_million(root: &Path) -> Res<Million3> {
    let million = build_million(root)?;
    // Measured in a fresh process: this one's allocator keeps the memory that
    // building the store freed, and an open here would reuse it unseen.
    let index_bytes_per_event = open_rss_in_child(&million.ours)? as f64 / EVENTS as f64;
    let events = ours_open(&million.ours, Durability::SyncEach)?;
    let db = sqlite_open(&million.sqlite)?;
    let mut read_all = Rates { ours: Vec::new(), raw: Vec::new(), sqlite: Vec::new() };
    for round in 0..=READ_RUNS {
        let mut sides = [0.0f64; 3];
        for k in 0..3 {
            let side = (k + round) % 3;
            let (secs, count) = match side {
                0 => {
                    let started = Instant::now();
                    let count = ours_read_all(&events)?;
                    (started.elapsed().as_secs_f64(), count)
                }
                1 => {
                    let started = Instant::now();
                    let count = raw_read(&million.raw)?;
                    (started.elapsed().as_secs_f64(), count)
                }
                _ => {
                    let started = Instant::now();
                    let count = sqlite_read_all(&db)?;
                    (started.elapsed().as_secs_f64(), count)
                }
            };
            if count != EVENTS {
                return Err(format!("side {side} read {count} events").into());
            }
            sides[side as usize] = rate(EVENTS, secs);
        }
        if round > 0 {
            read_all.ours.push(sides[0]);
            read_all.raw.push(sides[1]);
            read_all.sqlite.push(sides[2]);
        }
    }
    // Each round reads streams no round read before (cold: from the files, or
    // SQLite's pages), then the same streams again (warm: our cache, SQLite's
    // cache); the operating system's page cache holds every file throughout.
    let mut read_stream = Rates { ours: Vec::new(), raw: Vec::new(), sqlite: Vec::new() };
    let mut read_stream_warm = Rates { ours: Vec::new(), raw: Vec::new(), sqlite: Vec::new() };
    for round in 0..=READ_RUNS {
        let names: Vec<String> = (0..STREAM_READS)
            .map(|k| stream((u64::from(round) * STREAM_READS + k) * 7919))
            .collect();
        let mut cold = [0.0; 2];
        let mut warm = [0.0; 2];
        for side in [round % 2, 1 - round % 2] {
            let read = |name: &String| -> Res {
                if side == 0 {
                    ours_read_stream(&events, name).map(drop)
                } else {
                    sqlite_read_stream(&db, name).map(drop)
                }
            };
            cold[side as usize] = timed(|| names.iter().try_for_each(read))? / STREAM_READS as f64;
            warm[side as usize] = timed(|| names.iter().try_for_each(read))? / STREAM_READS as f64;
        }
        if round > 0 {
            read_stream.ours.push(cold[0]);
            read_stream.sqlite.push(cold[1]);
            read_stream_warm.ours.push(warm[0]);
            read_stream_warm.sqlite.push(warm[1]);
        }
    }
    drop(events);
    let mut open = Rates { ours: Vec::new(), raw: Vec::new(), sqlite: Vec::new() };
    for round in 0..=READ_RUNS {
        let ours = timed(|| ours_open(&million.ours, Durability::SyncEach).map(drop))?;
        let raw = timed(|| raw_read(&million.raw).map(drop))?;
        if round > 0 {
            open.ours.push(ours);
            open.raw.push(raw);
        }
    }
    Ok(Million3 { read_all, read_stream, read_stream_warm, open, index_bytes_per_event })
}

// ----------------------------------------------------------------------------
// Row 7: how long a live subscription takes to deliver an event.

/// Appends per second while the lag is measured, and for how long.
const LAG_RATE: u64 = 10_000;
const LAG_EVENTS: u64 = 20_000;
const LAG_WRITERS: u64 = 4;

/// Microseconds since the Unix epoch, as the store stamps events.
fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |it| u64::try_from(it.as_micros()).unwrap_or(u64::MAX))
}

/// Delivery lags in seconds: from the store's timestamp of an event (taken when
/// its append is planned, so the wait for its fsync counts) to its delivery to a
/// live subscription, with `LAG_WRITERS` threads appending `LAG_RATE` events a
/// second in all (group commit).
fn row_lag(root: &Path) -> Res<Vec<f64>> {
    let dir = tempfile::tempdir_in(root)?;
    let events = ours_open(dir.path(), Durability::GroupCommit)?;
    let mut subscription = events.subscribe_all().from_end()?;
    let per_writer = LAG_EVENTS / LAG_WRITERS;
    let interval = std::time::Duration::from_secs_f64(LAG_WRITERS as f64 / LAG_RATE as f64);
    thread::scope(|scope| -> Res<Vec<f64>> {
        let writers: Vec<_> = (0..LAG_WRITERS)
            .map(|t| {
                let events = events.clone();
                scope.spawn(move || -> Res {
                    let started = Instant::now();
                    for k in 0..per_writer {
                        // Paced: each append at its own time, late ones at once.
                        let due = started + interval * u32::try_from(k)?;
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            thread::sleep(wait);
                        }
                        events.append(&stream(k * LAG_WRITERS + t), Expected::Any, [event(k)])?;
                    }
                    Ok(())
                })
            })
            .collect();
        let mut lags = Vec::with_capacity(usize::try_from(LAG_EVENTS)?);
        while (lags.len() as u64) < LAG_EVENTS {
            match subscription.next_timeout(std::time::Duration::from_secs(10))? {
                Some(instastate::events::Delivery::Event(event)) => {
                    let lag = now_micros().saturating_sub(event.at.as_micros());
                    lags.push(lag as f64 / 1e6);
                }
                Some(_) => {}
                None => return Err("no event for 10 s".into()),
            }
        }
        for writer in writers {
            writer.join().map_err(|_| "a writer panicked")??;
        }
        Ok(lags)
    })
}

// ----------------------------------------------------------------------------
// Output.

fn fmt_rate(per_sec: f64) -> String {
    if per_sec >= 1e6 {
        format!("{:.2} M ev/s", per_sec / 1e6)
    } else {
        format!("{per_sec:.0} ev/s")
    }
}

fn fmt_secs(secs: f64) -> String {
    if secs < 1e-3 { format!("{:.0} µs", secs * 1e6) } else { format!("{:.1} ms", secs * 1e3) }
}

/// Set in the child that measures the memory of an open: the store to open.
const OPEN_RSS: &str = "INSTASTATE_BENCH_OPEN_RSS";

/// The RSS growth of opening the store in `dir`, in a child process of this
/// benchmark.
fn open_rss_in_child(dir: &Path) -> Res<u64> {
    let output =
        std::process::Command::new(std::env::current_exe()?).env(OPEN_RSS, dir).output()?;
    if !output.status.success() {
        return Err(format!("the child measuring an open failed: {output:?}").into());
    }
    Ok(String::from_utf8(output.stdout)?.trim().parse()?)
}

/// Prints what the benchmark runs on, and how many times.
fn print_setup(root: &Path) {
    println!("# instastate event store benchmarks: medians of interleaved runs");
    println!();
    println!(
        "Machine: nproc {}, temp dirs under {} ({}).",
        thread::available_parallelism().map_or(0, std::num::NonZero::get),
        root.display(),
        mount_of(root).unwrap_or_else(|| "unknown".into())
    );
    println!(
        "Runs: {SYNC_RUNS} of {APPENDS} appends for row 1; {THREAD_RUNS} of {THREADS} threads x {THREAD_APPENDS} appends for row 2; \
         {READ_RUNS} for rows 3 to 5 over {EVENTS} events in {STREAMS} streams ({STREAM_READS} stream reads a run for row 4); one warm-up round each."
    );
    println!();
}

/// The child's work: opens the store in `dir` and prints the RSS growth.
fn measure_open(dir: &Path) -> Res {
    let before = rss()?;
    let events = ours_open(dir, Durability::SyncEach)?;
    println!("{}", rss()?.saturating_sub(before));
    drop(events);
    Ok(())
}

fn main() -> Res {
    if let Some(dir) = std::env::var_os(OPEN_RSS) {
        return measure_open(Path::new(&dir));
    }
    let started = Instant::now();
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    fs::create_dir_all(&root)?;
    print_setup(&root);
    let one = row_one_thread(&root)?;
    eprintln!("row 1 done at {:.1} s", started.elapsed().as_secs_f64());
    let many = row_threads(&root)?;
    eprintln!("row 2 done at {:.1} s", started.elapsed().as_secs_f64());
    let million = rows_million(&root)?;
    eprintln!("rows 3 to 6 done at {:.1} s", started.elapsed().as_secs_f64());
    let lags = row_lag(&root)?;
    eprintln!("row 7 done at {:.1} s", started.elapsed().as_secs_f64());

    let (o1, r1, s1) = (median(&one.ours), median(&one.raw), median(&one.sqlite));
    let (o2, s2) = (median(&many.ours), median(&many.sqlite));
    let (o3, r3, s3) = (
        median(&million.read_all.ours),
        median(&million.read_all.raw),
        median(&million.read_all.sqlite),
    );
    let (o4, s4) = (median(&million.read_stream.ours), median(&million.read_stream.sqlite));
    let (o4w, s4w) =
        (median(&million.read_stream_warm.ours), median(&million.read_stream_warm.sqlite));
    let (o5, r5) = (median(&million.open.ours), median(&million.open.raw));
    println!("| row | ours | raw | SQLite | ratios | target | met? |");
    println!("|---|---|---|---|---|---|---|");
    let met = |ok: bool| if ok { "yes" } else { "NO" };
    println!(
        "| (1) durable append, 1 thread | {} | {} | {} | {:.2}x raw, {:.2}x SQLite | >= 0.8x raw, >= 1.3x SQLite | {} |",
        fmt_rate(o1),
        fmt_rate(r1),
        fmt_rate(s1),
        o1 / r1,
        o1 / s1,
        met(o1 / r1 >= 0.8 && o1 / s1 >= 1.3)
    );
    println!(
        "| (2) durable append, {THREADS} threads (group commit) | {} | | {} | {:.2}x our row 1, {:.2}x SQLite | >= 4x our row 1, >= 8x SQLite | {} |",
        fmt_rate(o2),
        fmt_rate(s2),
        o2 / o1,
        o2 / s2,
        met(o2 / o1 >= 4.0 && o2 / s2 >= 8.0)
    );
    println!(
        "| (3) read `$all` forward, decoded | {} | {} | {} | {:.2}x raw, {:.2}x SQLite | >= 0.5x raw, >= 1.5x SQLite | {} |",
        fmt_rate(o3),
        fmt_rate(r3),
        fmt_rate(s3),
        o3 / r3,
        o3 / s3,
        met(o3 / r3 >= 0.5 && o3 / s3 >= 1.5)
    );
    println!(
        "| (4) read one 100-event stream among {EVENTS}, first time | {} | | {} | {:.1}x faster than SQLite | >= 10x faster | {} |",
        fmt_secs(o4),
        fmt_secs(s4),
        s4 / o4,
        met(s4 / o4 >= 10.0)
    );
    println!(
        "| (4b) the same stream read again | {} | | {} | {:.1}x faster than SQLite | >= 10x faster | {} |",
        fmt_secs(o4w),
        fmt_secs(s4w),
        s4w / o4w,
        met(s4w / o4w >= 10.0)
    );
    println!(
        "| (5) open {EVENTS} events | {} | {} (read and decode) | | {:.2}x raw | <= 2x raw | {} |",
        fmt_secs(o5),
        fmt_secs(r5),
        o5 / r5,
        met(o5 / r5 <= 2.0)
    );
    println!(
        "| (6) index memory per event (RSS growth at open) | {:.1} bytes | | | | <= 64 bytes | {} |",
        million.index_bytes_per_event,
        met(million.index_bytes_per_event <= 64.0)
    );
    println!(
        "| (7) live subscription lag at {LAG_RATE} appends/s ({LAG_WRITERS} threads, group commit), from the event's timestamp to its delivery | p50 {}, p99 {} | | | | reported | |",
        fmt_secs(common::percentile(&lags, 50)),
        fmt_secs(common::percentile(&lags, 99)),
    );
    println!();
    println!("Total bench time: {:.1} s.", started.elapsed().as_secs_f64());
    Ok(())
}
