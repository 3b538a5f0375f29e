//! Crash tests for the event store: an [`EventStore`] survives its process being
//! killed at any instant, in the middle of concurrent appends.
//!
//! This binary has no libtest harness (`harness = false`): it is both the test runner
//! and, when started by itself with `INSTASTATE_EVENTS_CRASH_ROLE` set, the child
//! process that the test starts and kills. Command-line arguments are ignored, except
//! `--list`.
//!
//! - `events_crash::kill`: a child appends from several threads, each thread to
//!   streams of its own, with the exact version it expects, one to three events an
//!   append, and every fifth append to two of its streams at once
//!   ([`EventStore::append_all`]). Each thread numbers its events 0, 1, 2, ... and
//!   prints `ack <thread> <n>` after each append returned, `n` being the append's
//!   last event. The child is killed with `SIGKILL` at a random instant, again and
//!   again on the same directory, going through `Durability::SyncEach` and
//!   `Durability::GroupCommit`, with frequent checkpoints and without, and
//!   `Durability::Unsynced` with frequent checkpoints (where a kill may lose what was
//!   acknowledged, and nothing else may go wrong). After every
//!   kill the store must open and hold: positions 0, 1, 2, ... without a gap; in each
//!   stream, versions without a gap; each thread's events as one prefix, no event
//!   twice, every acknowledged one, and at most one unacknowledged append more; an
//!   append of two streams whole or not at all; and every stream read on its own
//!   must give what `$all` holds for it.
//!
//!   In two more modes, one more thread of the child appends events to streams of
//!   its own, removes them (a tombstone, a delete or a truncation, in turn), starts a
//!   new journal file and compacts, again and again: a kill in the middle of a
//!   compaction must leave every other event as it was, and the removed ones removed
//!   (read through [`RawEvents`], which shows them).
//!
//! Set `INSTASTATE_EVENTS_CRASH_SEED` to replay the random kill delays and modes of
//! a failed run (where the kills land still depends on timing).

// A test indexes what it just checked, and counts threads and events in small
// numbers: a panic or a wrong cast is a failed test, as the checks would report.
#![allow(
    clippy::indexing_slicing,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

mod common;

use std::{
    collections::BTreeMap,
    env,
    io::{self, Write},
    path::Path,
    process::{self, Command, ExitCode},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use instastate::events::{Append, Durability, EventStore, Expected, RawEvents};
use serde::{Deserialize, Serialize};

use crate::common::{Test, TestResult, Watched, XorShift};

const ROLE_VAR: &str = "INSTASTATE_EVENTS_CRASH_ROLE";
const DIR_VAR: &str = "INSTASTATE_EVENTS_CRASH_DIR";
const MODE_VAR: &str = "INSTASTATE_EVENTS_CRASH_MODE";
const SEED_VAR: &str = "INSTASTATE_EVENTS_CRASH_SEED";

/// A child that is never killed stops by itself after this long.
const CHILD_LIFETIME: Duration = Duration::from_secs(30);
/// How long the parent waits for the next line from a child.
const LINE_TIMEOUT: Duration = Duration::from_secs(20);
/// Threads appending at once.
const THREADS: u64 = 4;
/// Streams of each thread.
const STREAMS: u64 = 3;
/// The most events one append of a thread holds (a two-stream append of two
/// three-event parts).
const MAX_APPEND: u64 = 6;
const KILLS: u32 = 50;

/// One event: which thread appended it, and its number among that thread's events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Ev {
    thread: u64,
    n: u64,
}

/// How a child opens the store.
#[derive(Debug, Clone, Copy)]
struct Mode {
    durability: Durability,
    checkpoint_every: u64,
    /// Whether a thread of the child also removes events of streams of its own and
    /// compacts, again and again.
    compaction: bool,
}

impl Mode {
    const fn new(durability: Durability, checkpoint_every: u64, compaction: bool) -> Mode {
        Mode { durability, checkpoint_every, compaction }
    }

    /// Whether an acknowledged append survives a kill: not in the buffered modes,
    /// where only what a checkpoint or a full buffer wrote out does.
    fn durable(self) -> bool {
        matches!(self.durability, Durability::SyncEach | Durability::GroupCommit)
    }
}

const MODES: [(&str, Mode); 7] = [
    ("sync-each", Mode::new(Durability::SyncEach, u64::MAX, false)),
    ("group-commit", Mode::new(Durability::GroupCommit, u64::MAX, false)),
    ("sync-each+checkpoints", Mode::new(Durability::SyncEach, 25, false)),
    ("group-commit+checkpoints", Mode::new(Durability::GroupCommit, 25, false)),
    // Whatever a kill loses, the store must open whole and read back every event
    // a checkpoint covers.
    ("unsynced+checkpoints", Mode::new(Durability::Unsynced, 25, false)),
    ("sync-each+compaction", Mode::new(Durability::SyncEach, u64::MAX, true)),
    ("group-commit+compaction", Mode::new(Durability::GroupCommit, 25, true)),
];

/// The thread number of the compacting thread's events, in streams `junk-*`.
const JUNK: u64 = u64::MAX;
/// Events of one append of the compacting thread.
const JUNK_APPEND: u64 = 40;

fn main() -> ExitCode {
    if env::var_os(ROLE_VAR).is_some() {
        return match appender() {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("child failed: {err}");
                ExitCode::from(2)
            }
        };
    }
    let tests: [Test; 1] = [("events_crash::kill", kill)];
    common::run(&tests)
}

fn stream(thread: u64, k: u64) -> String {
    format!("t{thread}-s{k}")
}

fn open(dir: &Path, mode: Mode) -> instastate::Result<EventStore<Ev>> {
    EventStore::<Ev>::builder()
        .durability(mode.durability)
        .checkpoint_every(mode.checkpoint_every)
        .open(dir)
}

/// The child: appends from `THREADS` threads until killed.
fn appender() -> TestResult {
    let dir = env::var_os(DIR_VAR).ok_or("no directory")?;
    let mode_name = env::var(MODE_VAR)?;
    let mode = MODES.iter().find(|(name, _)| *name == mode_name).ok_or("unknown mode")?.1;
    let events = open(Path::new(&dir), mode)?;
    // Each thread goes on after its last event.
    let mut next = [0u64; THREADS as usize];
    for event in events.read_all() {
        let event = event?;
        if let Some(slot) = next.get_mut(event.data.thread as usize) {
            *slot = (*slot).max(event.data.n + 1);
        }
    }
    println!("ready");
    io::stdout().flush()?;
    let started = Instant::now();
    thread::scope(|scope| -> TestResult {
        let handles: Vec<_> = (0..THREADS)
            .map(|thread| {
                let events = events.clone();
                let first = next[thread as usize];
                scope.spawn(move || -> TestResult {
                    let mut n = first;
                    let mut appends = 0u64;
                    while started.elapsed() < CHILD_LIFETIME {
                        appends += 1;
                        let size = appends % 3 + 1;
                        let batch = |from: u64| {
                            (from..from + size).map(|n| Ev { thread, n }).collect::<Vec<_>>()
                        };
                        let expect = |k| {
                            events
                                .stream_version(&stream(thread, k))
                                .expect("the version is read")
                                .map_or(Expected::NoStream, Expected::Exact)
                        };
                        if appends.is_multiple_of(5) {
                            let parts = [
                                Append::new(stream(thread, 0), expect(0), batch(n)),
                                Append::new(stream(thread, 1), expect(1), batch(n + size)),
                            ];
                            events.append_all(parts)?;
                            n += 2 * size;
                        } else {
                            let k = appends % STREAMS;
                            events.append(&stream(thread, k), expect(k), batch(n))?;
                            n += size;
                        }
                        let mut out = io::stdout().lock();
                        writeln!(out, "ack {thread} {}", n - 1)?;
                        out.flush()?;
                    }
                    Ok(())
                })
            })
            .collect();
        let compactor = mode.compaction.then(|| scope.spawn(|| compactor(&events, started)));
        for handle in handles.into_iter().chain(compactor) {
            handle.join().map_err(|_| "an appending thread panicked")??;
        }
        Ok(())
    })?;
    process::exit(0);
}

/// The child's compacting thread: appends events to a stream of its own, removes
/// them (a tombstone, a delete or a truncation, in turn), starts a new journal file
/// and compacts, again and again; prints `compacted <files> <events>` after each
/// compaction.
fn compactor(events: &EventStore<Ev>, started: Instant) -> TestResult {
    let mut round = 0u64;
    while started.elapsed() < CHILD_LIFETIME {
        round += 1;
        let name = format!("junk-{}-{round}", process::id());
        events.append(
            &name,
            Expected::NoStream,
            (0..JUNK_APPEND).map(|n| Ev { thread: JUNK, n }),
        )?;
        match round % 3 {
            0 => events.tombstone_stream(&name, Expected::Exact(JUNK_APPEND - 1))?,
            1 => events.delete_stream(&name, Expected::Any)?,
            _ => events.truncate_stream(&name, JUNK_APPEND / 2)?,
        }
        events.checkpoint()?;
        let compacted = events.compact()?;
        let mut out = io::stdout().lock();
        writeln!(out, "compacted {} {}", compacted.files, compacted.events_dropped)?;
        out.flush()?;
    }
    Ok(())
}

/// What a reopened store holds, checked.
struct Held {
    /// Per thread, how many of its events the store holds (a prefix).
    next: [u64; THREADS as usize],
    events: u64,
}

/// Opens the store and checks everything the test promises but the acknowledgements.
fn check_store(dir: &Path) -> TestResult<Held> {
    let events = EventStore::<Ev>::open(dir)?;
    let mut next = [0u64; THREADS as usize];
    let mut versions: BTreeMap<String, u64> = BTreeMap::new();
    let mut by_stream: BTreeMap<String, Vec<(u64, Ev)>> = BTreeMap::new();
    let mut count = 0u64;
    let (total, removed) = check_positions(dir)?;
    let mut last = None;
    for event in events.read_all() {
        let event = event?;
        if event.position.get() < last.map_or(0, |last| last + 1) {
            return Err(format!("position {} follows {last:?} in $all", event.position).into());
        }
        last = Some(event.position.get());
        count += 1;
        if event.data.thread == JUNK {
            // The compacting thread's events that are still there, whole.
            if !event.stream.starts_with("junk-") || event.data.n != event.version {
                return Err(format!(
                    "{:?} stands at version {} of {}",
                    event.data, event.version, event.stream
                )
                .into());
            }
            continue;
        }
        let version = versions.entry(event.stream.clone()).or_default();
        if event.version != *version {
            return Err(format!(
                "stream {} jumps to version {} after {}",
                event.stream, event.version, *version
            )
            .into());
        }
        *version += 1;
        let slot = next.get_mut(event.data.thread as usize).ok_or("an unknown thread")?;
        if event.data.n != *slot {
            return Err(format!(
                "thread {}'s event #{} follows #{}",
                event.data.thread,
                event.data.n,
                *slot as i64 - 1
            )
            .into());
        }
        *slot += 1;
        by_stream.entry(event.stream.clone()).or_default().push((event.version, event.data));
    }
    for (name, expected) in &by_stream {
        let read: Vec<(u64, Ev)> = events
            .read_stream(name)
            .into_iter()
            .map(|it| it.map(|it| (it.version, it.data)))
            .collect::<instastate::Result<_>>()?;
        if &read != expected {
            return Err(format!("stream {name} reads otherwise than $all holds it").into());
        }
    }
    if count + removed != total {
        return Err(format!(
            "$all reads {count} events and {removed} are removed, of the {total} the store holds"
        )
        .into());
    }
    Ok(Held { next, events: count })
}

/// Reads every position of the store as it is on disk, removed events included:
/// positions 0, 1, 2, ... without a gap, and only events of the compacting thread's
/// streams removed. Returns how many events the store holds, and how many of them
/// are removed.
fn check_positions(dir: &Path) -> TestResult<(u64, u64)> {
    let raw = RawEvents::open(dir)?;
    let (mut total, mut removed) = (0, 0);
    for (k, event) in raw.read_all().into_iter().enumerate() {
        total += 1;
        let event = event?;
        if event.position.get() != k as u64 {
            return Err(format!("position {} stands at index {k} of $all", event.position).into());
        }
        if event.removed {
            if !event.stream.starts_with("junk-") {
                return Err(
                    format!("event {} of {} is removed", event.version, event.stream).into()
                );
            }
            removed += 1;
        }
    }
    Ok((total, removed))
}

fn kill() -> TestResult {
    let seed = env::var(SEED_VAR).ok().and_then(|it| it.parse().ok()).unwrap_or_else(|| {
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |it| it.as_nanos() as u64)
    });
    println!("    seed {seed} (replay with {SEED_VAR}={seed})");
    let mut random = XorShift::new(seed);
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("events");
    let exe = env::current_exe()?;
    let started = Instant::now();
    let mut before = Held { next: [0; THREADS as usize], events: 0 };
    let (mut kills, mut acks_total, mut unacked_total) = (0u32, 0u64, 0u64);
    let (mut compactions, mut files_compacted, mut dropped_total) = (0u64, 0u64, 0u64);
    while kills < KILLS {
        let (mode_name, mode) = MODES[random.below(MODES.len() as u64) as usize];
        let mut command = Command::new(&exe);
        command.env(ROLE_VAR, "appender").env(DIR_VAR, &dir).env(MODE_VAR, mode_name);
        let mut child = Watched::spawn(command, LINE_TIMEOUT)?;
        let ready = child.next_line()?;
        if ready != "ready" {
            return Err(format!("the child said {ready:?}").into());
        }
        // A compacting child is given longer: a round of it takes several syncs.
        let window = if mode.compaction { 400 } else { 150 };
        thread::sleep(Duration::from_millis(random.below(window) + 5));
        child.kill()?;
        let (lines, stderr) = child.finish();
        if !stderr.is_empty() {
            return Err(format!("the child wrote to stderr: {stderr}").into());
        }
        let mut acked: [Option<u64>; THREADS as usize] = [None; THREADS as usize];
        for line in lines? {
            let mut words = line.split(' ');
            let (Some(word), Some(thread), Some(n)) = (words.next(), words.next(), words.next())
            else {
                return Err(format!("the child printed {line:?}").into());
            };
            if word == "compacted" {
                compactions += 1;
                files_compacted += thread.parse::<u64>()?;
                dropped_total += n.parse::<u64>()?;
                continue;
            }
            if word != "ack" {
                return Err(format!("the child printed {line:?}").into());
            }
            let (thread, n): (usize, u64) = (thread.parse()?, n.parse()?);
            *acked.get_mut(thread).ok_or("an unknown thread")? = Some(n);
            acks_total += 1;
        }
        let held = match check_store(&dir) {
            Ok(held) => held,
            Err(err) => {
                let kept = tmp.keep();
                return Err(format!(
                    "after kill {kills} ({mode_name}): {err}\n(the store is kept in {})",
                    kept.display()
                )
                .into());
            }
        };
        for (thread, acked) in acked.iter().enumerate() {
            let must = acked.map_or(before.next[thread], |n| n + 1);
            let found = held.next[thread];
            if found < must && mode.durable() {
                return Err(format!(
                    "after kill {kills} ({mode_name}): thread {thread}'s acknowledged events up to #{} are lost: the store holds {found}",
                    must - 1
                )
                .into());
            }
            if must + MAX_APPEND < found {
                return Err(format!(
                    "after kill {kills} ({mode_name}): thread {thread} holds {found} events, more than one append past the acknowledged {must}"
                )
                .into());
            }
            unacked_total += found.saturating_sub(must);
        }
        before = held;
        kills += 1;
    }
    println!(
        "    {kills} kills in {:.1} s: {acks_total} appends acknowledged, {} events at the end, {unacked_total} found durable but unacknowledged",
        started.elapsed().as_secs_f64(),
        before.events
    );
    println!(
        "    {compactions} compactions acknowledged, {files_compacted} files rewritten, the data of {dropped_total} events dropped"
    );
    if files_compacted == 0 {
        return Err("no compaction rewrote a file: the kills did not test compaction".into());
    }
    Ok(())
}
