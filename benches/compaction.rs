//! Compaction of the event store: the disk it reclaims, how long it takes, and what
//! it does to the latency of the appends that go on meanwhile.
//!
//! Each round builds a store of `EVENTS` events of about 250 bytes in `STREAMS`
//! streams over several journal files (a checkpoint every `CHECKPOINT_EVERY`
//! appends starts a new one), then tombstones a third of the streams and truncates
//! another third to its last half. It then appends from one thread, durably (one
//! `fdatasync` each), first alone and then while another thread compacts the
//! store, and records each append's latency.
//!
//! Rows:
//! 1. the journal's bytes before and after, and the events whose data went;
//! 2. the time a compaction takes;
//! 3. append latency p50 and p99 alone, and during the compaction.
//!
//! Run with `cargo bench --bench compaction`; about half a minute.

// A benchmark: its counts convert to floating point for rates (far below 2^52).
#![allow(clippy::cast_precision_loss)]

// Shared with the other benchmarks, which use what this one does not.
#[allow(dead_code)]
mod common;

use std::{
    fs,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Instant,
};

use instastate::events::{Compacted, Durability, EventStore, Expected};
use serde::{Deserialize, Serialize};

use crate::common::{Res, median, mount_of, percentile};

const EVENTS: u64 = 100_000;
const STREAMS: u64 = 3_000;
const CHECKPOINT_EVERY: u64 = 20_000;
const ROUNDS: u32 = 3;
/// Appends measured alone, per round.
const ALONE: u64 = 300;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Note {
    account: u64,
    amount: i64,
    text: String,
}

fn note(n: u64) -> Note {
    Note {
        account: n % STREAMS,
        amount: i64::try_from(n % 1000).unwrap_or(0),
        text: "n".repeat(200),
    }
}

fn stream(k: u64) -> String {
    format!("account-{k}")
}

/// The bytes of the journal files in `dir`.
fn journal_bytes(dir: &Path) -> Res<u64> {
    let mut bytes = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_str().is_some_and(|it| it.starts_with("journal-")) {
            bytes += entry.metadata()?.len();
        }
    }
    Ok(bytes)
}

/// Builds the store of a round in `dir`.
fn build(dir: &Path) -> Res {
    let events = EventStore::<Note>::builder()
        .durability(Durability::Unsynced)
        .checkpoint_every(CHECKPOINT_EVERY)
        .open(dir)?;
    for n in 0..EVENTS {
        events.append(&stream(n % STREAMS), Expected::Any, [note(n)])?;
    }
    for k in 0..STREAMS {
        match k % 3 {
            0 => events.tombstone_stream(&stream(k), Expected::Any)?,
            1 => events.truncate_stream(&stream(k), EVENTS / STREAMS / 2)?,
            _ => {}
        }
    }
    // The journal goes on in a new file: the ones before it are compacted.
    events.checkpoint()?;
    events.append("after", Expected::Any, [note(0)])?;
    events.close()?;
    Ok(())
}

/// Appends durably from this thread while `going` holds (and at least `min`
/// times); returns each append's latency in seconds.
fn append_while(events: &EventStore<Note>, going: &dyn Fn() -> bool, min: u64) -> Res<Vec<f64>> {
    let mut latencies = Vec::new();
    let mut n = 0;
    while n < min || going() {
        let started = Instant::now();
        events.append("live", Expected::Any, [note(n)])?;
        latencies.push(started.elapsed().as_secs_f64());
        n += 1;
    }
    Ok(latencies)
}

struct Round {
    compacted: Compacted,
    journal_before: u64,
    journal_after: u64,
    secs: f64,
    alone: Vec<f64>,
    during: Vec<f64>,
}

fn round(root: &Path) -> Res<Round> {
    let tmp = tempfile::tempdir_in(root)?;
    let dir = tmp.path().join("events");
    build(&dir)?;
    let journal_before = journal_bytes(&dir)?;
    let events = EventStore::<Note>::builder().checkpoint_every(u64::MAX).open(&dir)?;
    let alone = append_while(&events, &|| false, ALONE)?;
    let running = Arc::new(AtomicBool::new(true));
    let compactor = {
        let (events, running) = (events.clone(), Arc::clone(&running));
        thread::spawn(move || {
            let started = Instant::now();
            let res = events.compact();
            running.store(false, Ordering::Release);
            res.map(|compacted| (compacted, started.elapsed().as_secs_f64()))
        })
    };
    let during = append_while(&events, &|| running.load(Ordering::Acquire), 1)?;
    let (compacted, secs) = compactor.join().map_err(|_| "the compaction panicked")??;
    events.close()?;
    let journal_after = journal_bytes(&dir)?;
    Ok(Round { compacted, journal_before, journal_after, secs, alone, during })
}

fn fmt_secs(secs: f64) -> String {
    if secs < 1e-3 { format!("{:.0} µs", secs * 1e6) } else { format!("{:.1} ms", secs * 1e3) }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

fn main() -> Res {
    let started = Instant::now();
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    fs::create_dir_all(&root)?;
    println!("# instastate event store compaction: medians of {ROUNDS} rounds");
    println!();
    println!(
        "Machine: nproc {}, temp dirs under {} ({}).",
        thread::available_parallelism().map_or(0, std::num::NonZero::get),
        root.display(),
        mount_of(&root).unwrap_or_else(|| "unknown".into())
    );
    println!(
        "Store: {EVENTS} events of ~250 bytes in {STREAMS} streams, a journal file per {CHECKPOINT_EVERY} appends; \
         a third of the streams tombstoned, a third truncated to their last half."
    );
    println!();
    let mut rounds = Vec::new();
    for k in 0..ROUNDS {
        rounds.push(round(&root)?);
        eprintln!("round {k} done at {:.1} s", started.elapsed().as_secs_f64());
    }
    let last = rounds.last().ok_or("no round")?;
    let secs: Vec<f64> = rounds.iter().map(|it| it.secs).collect();
    let alone: Vec<f64> = rounds.iter().flat_map(|it| it.alone.iter().copied()).collect();
    let during: Vec<f64> = rounds.iter().flat_map(|it| it.during.iter().copied()).collect();
    println!("| row | measured |");
    println!("|---|---|");
    println!(
        "| (1) journal bytes (all files) before, after | {}, {} ({} reclaimed from {} files rewritten: {} to {}; {} events' data dropped, {} streams truncated) |",
        mib(last.journal_before),
        mib(last.journal_after),
        mib(last.compacted.bytes_reclaimed()),
        last.compacted.files,
        mib(last.compacted.bytes_before),
        mib(last.compacted.bytes_after),
        last.compacted.events_dropped,
        last.compacted.streams_truncated,
    );
    println!("| (2) compaction time | {} |", fmt_secs(median(&secs)));
    println!(
        "| (3) durable append latency, 1 thread: alone ({} appends) | p50 {}, p99 {} |",
        alone.len(),
        fmt_secs(percentile(&alone, 50)),
        fmt_secs(percentile(&alone, 99)),
    );
    println!(
        "| (3b) the same during the compaction ({} appends) | p50 {}, p99 {} |",
        during.len(),
        fmt_secs(percentile(&during, 50)),
        fmt_secs(percentile(&during, 99)),
    );
    println!();
    println!("Total bench time: {:.1} s.", started.elapsed().as_secs_f64());
    Ok(())
}
