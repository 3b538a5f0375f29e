//! Crash tests for checkpointed projections: a projection's state and position,
//! saved together in a cell, survive its process being killed at any instant, and
//! it resumes from the saved position applying every later event exactly once.
//!
//! This binary has no libtest harness (`harness = false`): it is both the test runner
//! and, when started by itself with `INSTASTATE_PROJECTION_CRASH_ROLE` set, the child
//! process that the test starts and kills. Command-line arguments are ignored, except
//! `--list`.
//!
//! - `projection_crash::kill`: a child opens an event store and a cell store, starts
//!   a projection of every event into a cell that saves itself through the store
//!   (every 1 to 1,000 events, and whenever it has applied everything), and appends
//!   from two threads, each to a stream of its own with the exact version it
//!   expects, printing `ack <thread> <n>` after each append; its main thread saves
//!   the store too, at random moments, racing the projection's own saves. The child
//!   is killed with `SIGKILL` at a random instant, again and again on the same
//!   directories, going through `Durability::SyncEach`, `Durability::GroupCommit`
//!   and `Durability::Unsynced` (where a kill may lose acknowledged appends). After
//!   every kill the parent opens both stores and checks: the cell's position is at
//!   most the event store's head; its state equals a fold of exactly the events
//!   below its position (each applied once, in order: no event twice, none
//!   skipped); and in the durable modes every acknowledged event is in the store.
//!   The next child resumes the projection from the saved position, and the next
//!   check covers what it applied.
//!
//! Set `INSTASTATE_PROJECTION_CRASH_SEED` to replay the random kill delays and modes
//! of a failed run (where the kills land still depends on timing).

// A test indexes what it just checked, and counts threads and events in small
// numbers: a panic or a wrong cast is a failed test, as the checks would report.
#![allow(clippy::indexing_slicing, clippy::cast_possible_truncation)]

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

use instastate::{
    StateCell, Store,
    events::{Durability, EventStore, Expected, Projected, RecordedEvent},
};
use serde::{Deserialize, Serialize};

use crate::common::{Test, TestResult, Watched, XorShift};

const ROLE_VAR: &str = "INSTASTATE_PROJECTION_CRASH_ROLE";
const DIR_VAR: &str = "INSTASTATE_PROJECTION_CRASH_DIR";
const MODE_VAR: &str = "INSTASTATE_PROJECTION_CRASH_MODE";
const SAVE_EVERY_VAR: &str = "INSTASTATE_PROJECTION_CRASH_SAVE_EVERY";
const SEED_VAR: &str = "INSTASTATE_PROJECTION_CRASH_SEED";

/// A child that is never killed stops by itself after this long.
const CHILD_LIFETIME: Duration = Duration::from_secs(30);
/// How long the parent waits for the next line from a child.
const LINE_TIMEOUT: Duration = Duration::from_secs(20);
/// Threads appending at once.
const THREADS: u64 = 2;
/// The most events one append holds.
const MAX_APPEND: u64 = 3;
const KILLS: u32 = 50;
/// How many events a child's projection applies between its saves: one of these.
const SAVE_EVERY: [u64; 5] = [1, 2, 5, 20, 1_000];

/// One event: which thread appended it, and its number among that thread's events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Ev {
    thread: u64,
    n: u64,
}

/// The projected state: it shows how many events were applied, which, and in which
/// order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Model {
    applied: u64,
    /// A hash of the positions and events applied, in order.
    digest: u64,
    /// Per thread, how many of its events were applied (they come in order).
    next: BTreeMap<u64, u64>,
}

static STATE: StateCell<Projected<Model>> =
    StateCell::new("projection_crash::STATE", || Projected::new(Model::default()));

/// The handler: checks that the event is its thread's next, then applies it.
fn step(model: &mut Model, event: &RecordedEvent<Ev>) -> Result<(), String> {
    let Ev { thread, n } = event.data;
    let next = model.next.entry(thread).or_default();
    if n != *next {
        return Err(format!(
            "thread {thread}'s event #{n} at position {} comes where #{next} should",
            event.position
        ));
    }
    *next += 1;
    model.applied += 1;
    let mixed = event.position.get() ^ (thread << 56) ^ n.rotate_left(17);
    model.digest = (model.digest.rotate_left(9) ^ mixed).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    Ok(())
}

const MODES: [(&str, Durability, u64); 4] = [
    ("sync-each", Durability::SyncEach, u64::MAX),
    ("group-commit", Durability::GroupCommit, u64::MAX),
    // A kill may lose acknowledged appends: the cell must never count one.
    ("unsynced+checkpoints", Durability::Unsynced, 25),
    ("unsynced", Durability::Unsynced, u64::MAX),
];

fn main() -> ExitCode {
    if env::var_os(ROLE_VAR).is_some() {
        return match child() {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("child failed: {err}");
                ExitCode::from(2)
            }
        };
    }
    let tests: [Test; 1] = [("projection_crash::kill", kill)];
    common::run(&tests)
}

fn stream(thread: u64) -> String {
    format!("t{thread}")
}

/// The child: projects, appends and saves until killed.
fn child() -> TestResult {
    let dir = env::var_os(DIR_VAR).ok_or("no directory")?;
    let dir = Path::new(&dir);
    let mode_name = env::var(MODE_VAR)?;
    let &(_, durability, checkpoint_every) =
        MODES.iter().find(|(name, ..)| *name == mode_name).ok_or("unknown mode")?;
    let save_every: u64 = env::var(SAVE_EVERY_VAR)?.parse()?;
    let events = EventStore::<Ev>::builder()
        .durability(durability)
        .checkpoint_every(checkpoint_every)
        .open(dir.join("events"))?;
    let store = Store::builder().cell(&STATE).open(dir.join("cells"))?;
    let projection = events
        .projection(&STATE)
        .save_with(&store)
        .save_every(save_every)
        .save_interval(Duration::from_millis(5))
        .on_error(|err| eprintln!("the projection failed: {err}"))
        .start(|model, event| step(model, event).map_err(Into::into))?;
    // Each thread goes on after its last event.
    let next: Vec<u64> = (0..THREADS)
        .map(|thread| Ok(events.stream_version(&stream(thread))?.map_or(0, |version| version + 1)))
        .collect::<instastate::Result<_>>()?;
    let mut out = io::stdout().lock();
    writeln!(out, "ready")?;
    out.flush()?;
    drop(out);
    let started = Instant::now();
    thread::scope(|scope| -> TestResult {
        let handles: Vec<_> = (0..THREADS)
            .map(|thread| {
                let events = &events;
                let first = next[thread as usize];
                scope.spawn(move || -> TestResult {
                    let (mut n, mut appends) = (first, 0u64);
                    while started.elapsed() < CHILD_LIFETIME {
                        appends += 1;
                        let size = appends % MAX_APPEND + 1;
                        let batch: Vec<Ev> = (n..n + size).map(|n| Ev { thread, n }).collect();
                        let expected = n.checked_sub(1).map_or(Expected::NoStream, Expected::Exact);
                        events.append(&stream(thread), expected, batch)?;
                        n += size;
                        let mut out = io::stdout().lock();
                        writeln!(out, "ack {thread} {}", n - 1)?;
                        out.flush()?;
                    }
                    Ok(())
                })
            })
            .collect();
        // The user's own saves, racing the projection's.
        let mut random = XorShift::new(u64::from(process::id()));
        while started.elapsed() < CHILD_LIFETIME {
            thread::sleep(Duration::from_micros(random.below(3_000)));
            store.save_all()?;
            if let Some(err) = projection.error() {
                return Err(err.into());
            }
        }
        for handle in handles {
            handle.join().map_err(|_| "an appending thread panicked")??;
        }
        Ok(())
    })?;
    process::exit(0);
}

/// What the parent found after a kill.
struct Found {
    /// The cell's saved position.
    position: u64,
    head: u64,
    /// Per thread, how many of its events the event store holds.
    in_store: [u64; THREADS as usize],
}

/// Opens both stores and checks the cell against the events.
fn check(dir: &Path) -> TestResult<Found> {
    let events = EventStore::<Ev>::open(dir.join("events"))?;
    STATE.set(Projected::new(Model::default()));
    let store = Store::builder().cell(&STATE).open(dir.join("cells"))?;
    let saved = STATE.get();
    drop(store);
    let position = saved.position().get();
    let head = events.head()?.get();
    if head < position {
        return Err(format!("the cell counts {position} events; the store holds {head}").into());
    }
    let mut fold = Model::default();
    let mut in_store = [0u64; THREADS as usize];
    for event in events.read_all() {
        let event = event?;
        if event.position.get() < position {
            step(&mut fold, &event)?;
        }
        let slot = in_store.get_mut(event.data.thread as usize).ok_or("an unknown thread")?;
        *slot = (*slot).max(event.data.n + 1);
    }
    if saved.applied != position {
        return Err(
            format!("the cell applied {} events by position {position}", saved.applied).into()
        );
    }
    if *saved.state() != fold {
        return Err(format!(
            "the cell at position {position} holds {:?}; a fold of the events below it gives {fold:?}",
            saved.state()
        )
        .into());
    }
    Ok(Found { position, head, in_store })
}

fn kill() -> TestResult {
    let seed = env::var(SEED_VAR).ok().and_then(|it| it.parse().ok()).unwrap_or_else(|| {
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |it| it.as_nanos() as u64)
    });
    println!("    seed {seed} (replay with {SEED_VAR}={seed})");
    let mut random = XorShift::new(seed);
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let exe = env::current_exe()?;
    let started = Instant::now();
    let mut before = Found { position: 0, head: 0, in_store: [0; THREADS as usize] };
    let (mut kills, mut acks, mut advanced, mut behind) = (0u32, 0u64, 0u32, 0u32);
    while kills < KILLS {
        let (mode_name, durability, _) = MODES[random.below(MODES.len() as u64) as usize];
        let save_every = SAVE_EVERY[random.below(SAVE_EVERY.len() as u64) as usize];
        let mut command = Command::new(&exe);
        command
            .env(ROLE_VAR, "child")
            .env(DIR_VAR, dir)
            .env(MODE_VAR, mode_name)
            .env(SAVE_EVERY_VAR, save_every.to_string());
        let mut child = Watched::spawn(command, LINE_TIMEOUT)?;
        let ready = child.next_line()?;
        if ready != "ready" {
            return Err(format!("the child said {ready:?}").into());
        }
        thread::sleep(Duration::from_millis(random.below(50) + 2));
        child.kill()?;
        let (lines, stderr) = child.finish();
        if !stderr.is_empty() {
            return Err(format!("the child wrote to stderr: {stderr}").into());
        }
        let mut acked: [Option<u64>; THREADS as usize] = [None; THREADS as usize];
        for line in lines? {
            let mut words = line.split(' ');
            let (Some("ack"), Some(thread), Some(n)) = (words.next(), words.next(), words.next())
            else {
                return Err(format!("the child printed {line:?}").into());
            };
            let (thread, n): (usize, u64) = (thread.parse()?, n.parse()?);
            *acked.get_mut(thread).ok_or("an unknown thread")? = Some(n);
            acks += 1;
        }
        let context = format!("after kill {kills} ({mode_name}, saving every {save_every})");
        let found = match check(dir) {
            Ok(found) => found,
            Err(err) => {
                let kept = tmp.keep();
                return Err(format!(
                    "{context}: {err}\n(the stores are kept in {})",
                    kept.display()
                )
                .into());
            }
        };
        let durable = matches!(durability, Durability::SyncEach | Durability::GroupCommit);
        for (thread, acked) in acked.iter().enumerate() {
            let must = acked.map_or(before.in_store[thread], |n| n + 1);
            if durable && found.in_store[thread] < must {
                return Err(format!(
                    "{context}: thread {thread}'s acknowledged events up to #{} are lost: the store holds {}",
                    must - 1,
                    found.in_store[thread]
                )
                .into());
            }
        }
        if before.position < found.position {
            advanced += 1;
        }
        if found.position < found.head {
            behind += 1;
        }
        before = found;
        kills += 1;
    }
    println!(
        "    {kills} kills in {:.1} s: {acks} appends acknowledged, {} events at the end, the cell saved at {}; its saved position moved after {advanced} kills, and was behind the head (to be resumed) after {behind}",
        started.elapsed().as_secs_f64(),
        before.head,
        before.position
    );
    // A test in which the projection never saved would check nothing.
    if advanced < KILLS / 4 {
        return Err(
            format!("the saved position moved after only {advanced} of {KILLS} kills").into()
        );
    }
    Ok(())
}
