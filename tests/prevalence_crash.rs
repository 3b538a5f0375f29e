//! Crash tests for the prevalence layer: a [`Prevayler`] survives its process being
//! killed at any instant.
//!
//! This binary has no libtest harness (`harness = false`): it is both the test runner
//! and, when started by itself with `INSTASTATE_PREVALENCE_CRASH_ROLE` set, the child
//! process that the test starts and kills. Command-line arguments (test filters,
//! `--nocapture`, `--test-threads`, ...) are ignored, except `--list`.
//!
//! - `prevalence_crash::kill`: a child handles events from several threads, each
//!   thread numbering its own events 0, 1, 2, ..., and prints `ack <thread> <n>` to a
//!   pipe after each `handle` returned. It is killed with `SIGKILL` at a random
//!   instant, again and again on the same directory (and, with the `encryption`
//!   feature, on an encrypted one in between), going through `Durability::SyncEach` and
//!   `Durability::GroupCommit`, with and without snapshots (automatic ones and explicit
//!   ones back to back), with and without the replay check. After every kill the
//!   directory must open (in `Recovery::Strict` mode) and hold exactly one whole
//!   prefix of each thread's events: every acknowledged event, no event twice, no
//!   gap, and nothing a thread never handled; the next child must open the same
//!   state. After the last kill, a torn last write is added by hand: a strict open
//!   must cut it, and a salvaging open must find nothing to salvage.
//!
//! Set `INSTASTATE_PREVALENCE_CRASH_SEED` to replay the random kill delays and modes
//! of a failed run (where the kills land still depends on timing).

mod common;

use std::{
    collections::{BTreeMap, VecDeque, hash_map::DefaultHasher},
    env,
    fmt::Write as _,
    hash::{Hash, Hasher},
    io::{self, Write},
    path::{Path, PathBuf},
    process::{self, Command, ExitCode, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use instastate::{
    Prevayler, Timestamp,
    prevalence::{Durability, PrevaylerBuilder, Recovery},
};
use serde::{Deserialize, Serialize};

use crate::common::{Test, TestResult, Watched, XorShift};

/// Selects the child role; unset in the parent.
const ROLE_VAR: &str = "INSTASTATE_PREVALENCE_CRASH_ROLE";
/// The prevalence directory a child works on.
const DIR_VAR: &str = "INSTASTATE_PREVALENCE_CRASH_DIR";
/// How the child opens the directory: a [`Mode::name`].
const MODE_VAR: &str = "INSTASTATE_PREVALENCE_CRASH_MODE";
/// Replays a run's random kill times and modes.
const SEED_VAR: &str = "INSTASTATE_PREVALENCE_CRASH_SEED";

const ROLE_HANDLER: &str = "handler";

/// A child that is never killed stops by itself after this long, so that no process
/// outlives a parent that died.
const CHILD_LIFETIME: Duration = Duration::from_secs(30);
/// How long the parent waits for the next line from a child.
const LINE_TIMEOUT: Duration = Duration::from_secs(20);

/// How many threads of the child handle events at once.
const THREADS: u32 = 4;
/// How many of the latest events the ledger keeps, in journal order. Besides letting
/// the parent check the order, this makes snapshots tens of KiB, so that kills also
/// land while one is being written.
const RECENT: usize = 16_384;
/// The automatic snapshot policy of the modes with snapshots.
const SNAPSHOT_EVERY: u64 = 50;
const KEEP_SNAPSHOTS: usize = 2;
/// In the modes with snapshots, the pause between the explicit snapshots a child
/// takes one after another.
const SNAPSHOT_PAUSE: Duration = Duration::from_millis(2);

fn main() -> ExitCode {
    if let Ok(role) = env::var(ROLE_VAR) {
        return child_main(&role);
    }
    let tests: [Test; 1] = [("prevalence_crash::kill", kill)];
    common::run(&tests)
}

fn child_main(role: &str) -> ExitCode {
    let result = (|| -> TestResult {
        let dir = env::var_os(DIR_VAR).map(PathBuf::from).ok_or(format!("{DIR_VAR} is not set"))?;
        let mode = env::var(MODE_VAR).map_err(|_| format!("{MODE_VAR} is not set"))?;
        let mode = Mode::from_name(&mode).ok_or(format!("unknown mode `{mode}`"))?;
        match role {
            ROLE_HANDLER => handler(&dir, mode),
            other => Err(format!("unknown child role `{other}`").into()),
        }
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("child `{role}` failed: {err}");
            ExitCode::from(2)
        }
    }
}

// ---------------------------------------------------------------------------------
// The state: a ledger of every thread's events
// ---------------------------------------------------------------------------------

/// Thread `thread`'s event number `n`; each thread handles 0, 1, 2, ... in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
struct Event {
    thread: u32,
    n: u64,
}

/// How far one thread's events got.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
struct Lane {
    /// The next event number the thread may send: its events `0..next` are applied.
    next: u64,
    /// A hash chain over `0..next`, which the parent recomputes: a snapshot or replay
    /// that garbles a lane does not go unnoticed.
    chain: u64,
}

/// The prevalent state: enough to notice a lost, repeated or reordered event.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
struct Ledger {
    lanes: BTreeMap<u32, Lane>,
    /// Events applied, including any duplicate or out-of-order one.
    count: u64,
    /// Events that repeated one already applied.
    duplicates: u64,
    /// Events that skipped over one not applied yet.
    gaps: u64,
    /// The latest [`RECENT`] events, in the order they were applied.
    recent: VecDeque<Event>,
    /// The timestamp of the latest event applied, in µs since the Unix epoch.
    latest_micros: u64,
    /// Events whose timestamp was less than the one before (instastate promises
    /// timestamps that never go back).
    clock_backwards: u64,
}

/// What applying one event found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Applied {
    /// The event was its thread's next one, as it must be.
    Next,
    /// The event was applied before.
    Duplicate,
    /// The event skipped over one or more of its thread's events.
    Gap,
}

fn chain(chain: u64, n: u64) -> u64 {
    (chain ^ n).wrapping_mul(0x0100_0000_01b3).rotate_left(17) ^ 0x9e37_79b9_7f4a_7c15
}

/// The `apply` function: deterministic, as replay needs.
fn apply(ledger: &mut Ledger, event: Event, at: Timestamp) -> Applied {
    let lane = ledger.lanes.entry(event.thread).or_default();
    let applied = match event.n.cmp(&lane.next) {
        std::cmp::Ordering::Equal => {
            lane.next += 1;
            lane.chain = chain(lane.chain, event.n);
            Applied::Next
        }
        std::cmp::Ordering::Less => {
            ledger.duplicates += 1;
            Applied::Duplicate
        }
        std::cmp::Ordering::Greater => {
            ledger.gaps += 1;
            Applied::Gap
        }
    };
    ledger.count += 1;
    ledger.recent.push_back(event);
    if ledger.recent.len() > RECENT {
        ledger.recent.pop_front();
    }
    ledger.clock_backwards += u64::from(at.as_micros() < ledger.latest_micros);
    ledger.latest_micros = at.as_micros();
    applied
}

impl Ledger {
    fn next(&self, thread: u32) -> u64 {
        self.lanes.get(&thread).map_or(0, |lane| lane.next)
    }

    /// A digest cheap enough to journal after every event: all but the recent events.
    fn quick_digest(&self) -> u64 {
        let mut hasher = DefaultHasher::new();
        (&self.lanes, self.count, self.duplicates, self.gaps).hash(&mut hasher);
        (self.recent.back(), self.latest_micros, self.clock_backwards).hash(&mut hasher);
        hasher.finish()
    }

    /// A digest of the whole ledger, for comparing a child's with the parent's.
    fn digest(&self) -> u64 {
        // `DefaultHasher::new` has fixed keys, and parent and child are one binary.
        let mut hasher = DefaultHasher::new();
        self.hash(&mut hasher);
        hasher.finish()
    }

    /// Checks that the ledger is what replaying whole per-thread prefixes gives: no
    /// duplicate, no gap, counts and hash chains that match the lanes, and recent
    /// events that are consecutive per thread and end at each lane's last event.
    fn check(&self, not_before_micros: u64) -> Result<(), String> {
        let mut wrong = String::new();
        if self.duplicates != 0 {
            let _ = write!(wrong, "\n  {} duplicate event(s) applied", self.duplicates);
        }
        if self.gaps != 0 {
            let _ = write!(wrong, "\n  {} event(s) applied out of order (a gap)", self.gaps);
        }
        if self.clock_backwards != 0 {
            let _ = write!(
                wrong,
                "\n  {} event(s) have an earlier timestamp than the event before them",
                self.clock_backwards
            );
        }
        let total: u64 = self.lanes.values().map(|lane| lane.next).sum();
        if total != self.count {
            let _ =
                write!(wrong, "\n  the lanes hold {total} events, but {} were applied", self.count);
        }
        for (thread, lane) in &self.lanes {
            if *thread >= THREADS {
                let _ = write!(wrong, "\n  a lane for thread {thread}, which does not exist");
            }
            let expected = (0..lane.next).fold(0, chain);
            if lane.chain != expected {
                let _ = write!(
                    wrong,
                    "\n  thread {thread}: hash chain {:#x}, replaying 0..{} gives {expected:#x}",
                    lane.chain, lane.next
                );
            }
        }
        let expected_recent = usize::try_from(self.count).unwrap_or(usize::MAX).min(RECENT);
        if self.recent.len() != expected_recent {
            let _ = write!(
                wrong,
                "\n  {} recent events kept, expected {expected_recent}",
                self.recent.len()
            );
        }
        // Walking backwards, each thread's recent events count down from its last one.
        let mut expected_n: BTreeMap<u32, u64> = BTreeMap::new();
        for (back, event) in self.recent.iter().rev().enumerate() {
            let expected = *expected_n
                .entry(event.thread)
                .or_insert_with(|| self.next(event.thread).checked_sub(1).unwrap_or(u64::MAX));
            if event.n != expected {
                let _ = write!(
                    wrong,
                    "\n  the event {back} from the end is thread {} #{}, expected #{expected} \
                     from that thread",
                    event.thread, event.n
                );
                break;
            }
            expected_n.insert(event.thread, expected.wrapping_sub(1));
        }
        if self.count > 0 {
            let now = now_micros();
            if self.latest_micros < not_before_micros || self.latest_micros > now + 1_000_000 {
                let _ = write!(
                    wrong,
                    "\n  the latest event's timestamp is {} µs, outside this test's run \
                     ({not_before_micros} to {now})",
                    self.latest_micros
                );
            }
        }
        if wrong.is_empty() {
            Ok(())
        } else {
            Err(format!("the reopened state is not a replay of whole per-thread prefixes:{wrong}"))
        }
    }

    /// The lanes, for messages.
    fn describe(&self) -> String {
        let lanes: Vec<String> = (0..THREADS)
            .map(|thread| format!("thread {thread}: 0..{}", self.next(thread)))
            .collect();
        format!("{} events applied ({})", self.count, lanes.join(", "))
    }
}

fn now_micros() -> u64 {
    let micros = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros());
    u64::try_from(micros).unwrap_or(u64::MAX)
}

type Ledgers = Prevayler<Ledger, Event, Applied>;

/// How a child opens the directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Mode {
    group_commit: bool,
    snapshots: bool,
    /// Whether the child journals a digest after every event, which every reopen
    /// compares (`PrevaylerBuilder::replay_check`).
    checked: bool,
}

impl Mode {
    /// The modes, in the order the kills go through them.
    fn all() -> impl Iterator<Item = Mode> {
        (0..8_u8).map(|bits| Mode {
            group_commit: bits & 1 != 0,
            snapshots: bits & 2 != 0,
            checked: bits & 4 != 0,
        })
    }

    fn name(self) -> String {
        let mut name = String::from(if self.group_commit { "group-commit" } else { "sync-each" });
        if self.snapshots {
            name.push_str("+snapshots");
        }
        if self.checked {
            name.push_str("+replay-check");
        }
        name
    }

    fn from_name(name: &str) -> Option<Mode> {
        Mode::all().find(|mode| mode.name() == name)
    }

    fn builder(self, dir: &Path) -> PrevaylerBuilder<Ledger> {
        let durability =
            if self.group_commit { Durability::GroupCommit } else { Durability::SyncEach };
        let mut builder = builder(dir).durability(durability);
        if self.snapshots {
            builder = builder.snapshot_every(SNAPSHOT_EVERY).keep_snapshots(KEEP_SNAPSHOTS);
        }
        if self.checked {
            builder = builder.replay_check(Ledger::quick_digest);
        }
        builder
    }
}

/// A directory whose name ends with this is encrypted.
const SEALED_SUFFIX: &str = "-sealed";

/// The default options for `dir`, with the key if it is encrypted.
fn builder(dir: &Path) -> PrevaylerBuilder<Ledger> {
    let builder = Prevayler::builder();
    #[cfg(feature = "encryption")]
    if dir.to_string_lossy().ends_with(SEALED_SUFFIX) {
        return builder.encryption_key(instastate::EncryptionKey::from_bytes([0x42; 32]));
    }
    let _ = dir;
    builder
}

fn open_ledgers(builder: PrevaylerBuilder<Ledger>, dir: &Path) -> instastate::Result<Ledgers> {
    builder.open(dir, Ledger::default(), apply)
}

// ---------------------------------------------------------------------------------
// The child
// ---------------------------------------------------------------------------------

/// Child: opens the directory, says `ready <digest> <events> <open µs>`, then handles
/// events from [`THREADS`] threads, each continuing from where its lane left off and
/// printing `ack <thread> <n>` after each `handle` returned, until killed.
fn handler(dir: &Path, mode: Mode) -> TestResult {
    let started = Instant::now();
    let prevayler = open_ledgers(mode.builder(dir), dir)?;
    let (digest, count, firsts) = prevayler.read(|ledger| {
        let firsts: Vec<(u32, u64)> =
            (0..THREADS).map(|thread| (thread, ledger.next(thread))).collect();
        (ledger.digest(), ledger.count, firsts)
    });
    {
        let mut out = io::stdout().lock();
        writeln!(out, "ready {digest} {count} {}", started.elapsed().as_micros())?;
        out.flush()?;
    }
    let stop = AtomicBool::new(false);
    let failure: Mutex<Option<String>> = Mutex::new(None);
    let fail = |err: String| {
        stop.store(true, Ordering::Relaxed);
        failure.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get_or_insert(err);
    };
    let (stop, fail) = (&stop, &fail);
    thread::scope(|scope| {
        for (thread, first) in firsts {
            let prevayler = &prevayler;
            scope.spawn(move || {
                let result = (|| -> TestResult {
                    for n in first.. {
                        if stop.load(Ordering::Relaxed) || started.elapsed() > CHILD_LIFETIME {
                            break;
                        }
                        let applied = prevayler
                            .handle(Event { thread, n })
                            .map_err(|err| format!("handle thread {thread} #{n}: {err}"))?;
                        if applied != Applied::Next {
                            return Err(
                                format!("thread {thread} #{n} applied as {applied:?}").into()
                            );
                        }
                        let mut out = io::stdout().lock();
                        writeln!(out, "ack {thread} {n}")?;
                        out.flush()?;
                    }
                    Ok(())
                })();
                if let Err(err) = result {
                    fail(err.to_string());
                }
            });
        }
        if mode.snapshots {
            // Explicit snapshots one after another, besides the automatic ones, so
            // that most kills in this mode land in some step of a snapshot: encoding,
            // rotating the journal, writing, deleting older snapshots and journals.
            let prevayler = &prevayler;
            scope.spawn(move || {
                while !stop.load(Ordering::Relaxed) && started.elapsed() <= CHILD_LIFETIME {
                    if let Err(err) = prevayler.snapshot() {
                        fail(format!("snapshot: {err}"));
                    }
                    thread::sleep(SNAPSHOT_PAUSE);
                }
            });
        }
    });
    if let Some(err) = failure.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner) {
        return Err(err.into());
    }
    prevayler.close()?;
    Ok(())
}

// ---------------------------------------------------------------------------------
// prevalence_crash::kill
// ---------------------------------------------------------------------------------

/// What the parent read from one killed child.
#[derive(Default)]
struct Reported {
    /// The child's digest and event count after opening, and how long opening took.
    ready: Option<(u64, u64, Duration)>,
    /// Per thread, the last event acknowledged.
    acked: BTreeMap<u32, u64>,
    acks: u64,
}

impl Reported {
    /// Parses `ready <digest> <events> <micros>` or `ack <thread> <n>`, checking that
    /// each thread's acknowledgements continue from where `before` left it, one by one.
    fn parse(&mut self, line: &str, before: &Ledger) -> TestResult {
        let bad = || format!("unexpected line from the child: {line:?}");
        let words: Vec<&str> = line.split(' ').collect();
        match words.as_slice() {
            ["ready", digest, count, micros] => {
                let digest: u64 = digest.parse().map_err(|_| bad())?;
                let count: u64 = count.parse().map_err(|_| bad())?;
                let took = Duration::from_micros(micros.parse().map_err(|_| bad())?);
                if self.ready.is_some() || self.acks > 0 {
                    return Err(format!("{} after the child was ready", bad()).into());
                }
                if digest != before.digest() || count != before.count {
                    return Err(format!(
                        "the child opened a state of {count} events with digest {digest:#x}, \
                         the parent's reopen before it saw {} (digest {:#x}): recovery is not \
                         deterministic",
                        before.describe(),
                        before.digest()
                    )
                    .into());
                }
                self.ready = Some((digest, count, took));
            }
            ["ack", thread, n] => {
                let thread: u32 = thread.parse().map_err(|_| bad())?;
                let n: u64 = n.parse().map_err(|_| bad())?;
                if self.ready.is_none() {
                    return Err(format!("{} before the child was ready", bad()).into());
                }
                if thread >= THREADS {
                    return Err(bad().into());
                }
                let expected = self.acked.get(&thread).map_or(before.next(thread), |n| n + 1);
                if n != expected {
                    return Err(format!(
                        "the child acknowledged thread {thread} #{n}, expected #{expected} next"
                    )
                    .into());
                }
                self.acked.insert(thread, n);
                self.acks += 1;
            }
            _ => return Err(bad().into()),
        }
        Ok(())
    }
}

#[derive(Default)]
struct KillStats {
    kills: u32,
    /// Kills that landed before the child reported it was ready: while it started
    /// or opened the directory.
    before_ready: u32,
    with_ack: u32,
    total_acks: u64,
    /// Events found durable that the child handled but had not acknowledged yet.
    unacked_found: u64,
    opens: u32,
    open_time: Duration,
    reopen_time: Duration,
    /// Kills that left a temporary file behind: they landed while a snapshot or a new
    /// journal file was being written.
    mid_write: u32,
    /// Reopens that cut a torn last write off the journal, and the bytes they cut.
    torn: u32,
    torn_bytes: u64,
    /// Reopens that loaded a snapshot, and the events reopens replayed in all.
    from_snapshot: u32,
    replayed: u64,
    /// Per mode: kills after the child was ready, and the events it acknowledged.
    per_mode: BTreeMap<String, (u32, u64)>,
    max_journals: usize,
    max_snapshots: usize,
    max_entries: usize,
}

impl KillStats {
    fn record(&mut self, mode: Mode, round: &Round) {
        self.kills += 1;
        if let Some((_, _, took)) = round.reported.ready {
            self.opens += 1;
            self.open_time += took;
            let entry = self.per_mode.entry(mode.name()).or_default();
            entry.0 += 1;
            entry.1 += round.reported.acks;
        } else {
            self.before_ready += 1;
        }
        self.with_ack += u32::from(round.reported.acks > 0);
        self.total_acks += round.reported.acks;
        self.unacked_found += round.unacked_found;
        self.mid_write += u32::from(round.mid_write);
        let reopened = &round.reopened;
        self.reopen_time += reopened.took;
        self.torn += u32::from(reopened.torn_bytes > 0);
        self.torn_bytes += reopened.torn_bytes;
        self.from_snapshot += u32::from(reopened.snapshot.is_some());
        self.replayed += reopened.replayed;
        self.max_journals = self.max_journals.max(reopened.files.journals);
        self.max_snapshots = self.max_snapshots.max(reopened.files.snapshots);
        self.max_entries = self.max_entries.max(reopened.files.entries);
    }

    fn print(&self, elapsed: Duration, dbs: &[(PathBuf, Ledger)]) {
        let found: u64 = dbs.iter().map(|(_, ledger)| ledger.count).sum();
        println!(
            "    {} kills in {:.1} s on {} director{} ({}): {} before the child was ready, {} \
             after at least one acknowledged event; {} events acknowledged in all ({:.0} per \
             kill), {} found on reopen ({} of them handled but not yet acknowledged when killed)",
            self.kills,
            elapsed.as_secs_f64(),
            dbs.len(),
            if dbs.len() == 1 { "y" } else { "ies" },
            if dbs.len() == 1 { "plain" } else { "plain, encrypted" },
            self.before_ready,
            self.with_ack,
            self.total_acks,
            mean(self.total_acks, self.kills.into()),
            found,
            self.unacked_found,
        );
        for (mode, (kills, acks)) in &self.per_mode {
            println!(
                "    {mode}: {kills} kills, {:.0} events acknowledged per kill",
                mean(*acks, (*kills).into())
            );
        }
        println!(
            "    child open {:.1} ms, parent reopen {:.1} ms on average; {} reopens from a \
             snapshot, {:.0} events replayed per reopen; {} torn tails cut ({} bytes); {} kills \
             left a temporary file (a snapshot or journal file half written)",
            mean_ms(self.open_time, self.opens.into()),
            mean_ms(self.reopen_time, self.kills.into()),
            self.from_snapshot,
            mean(self.replayed, self.kills.into()),
            self.torn,
            self.torn_bytes,
            self.mid_write,
        );
        println!(
            "    at most {} journal file(s), {} snapshot file(s), {} directory entries",
            self.max_journals, self.max_snapshots, self.max_entries,
        );
    }
}

const KILL_TARGET: u32 = 80;
const KILL_MINIMUM: u32 = 60;
const KILL_BUDGET: Duration = Duration::from_secs(90);

fn kill() -> TestResult {
    let seed = env::var(SEED_VAR).ok().and_then(|seed| seed.parse().ok()).unwrap_or_else(|| {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        // Truncation is fine: any bits make a seed.
        #[allow(clippy::cast_possible_truncation)]
        let seed = (nanos as u64) ^ (u64::from(process::id()) << 32);
        seed
    });
    println!("    seed {seed} (replay with {SEED_VAR}={seed})");
    let mut rng = XorShift::new(seed);
    let not_before = now_micros();

    let dir = tempfile::tempdir()?;
    // Kills alternate between a plain directory and, with the `encryption` feature, an
    // encrypted one; each holds its own ledger.
    let mut dbs: Vec<(PathBuf, Ledger)> = vec![(dir.path().join("prevalence"), Ledger::default())];
    if cfg!(feature = "encryption") {
        dbs.push((dir.path().join(format!("prevalence{SEALED_SUFFIX}")), Ledger::default()));
    }
    let modes: Vec<Mode> = Mode::all().collect();

    let started = Instant::now();
    let mut stats = KillStats::default();
    while stats.kills < KILL_TARGET && started.elapsed() < KILL_BUDGET {
        let round = stats.kills as usize;
        let n_dbs = dbs.len();
        let Some((db, ledger)) = dbs.get_mut(round % n_dbs) else { break };
        // Every directory goes through every mode in turn.
        let Some(&mode) = modes.get(round / n_dbs % modes.len()) else { break };
        // One kill in eight lands right after the child started, mostly while it
        // opens the directory (replaying, cutting a torn tail); the others wait for
        // the child to be ready, so that they land among handled events and snapshots.
        let from_spawn = rng.below(8) == 0;
        let delay = if from_spawn {
            Duration::from_millis(rng.below(15))
        } else {
            Duration::from_millis(20 + rng.below(281))
        };
        // The first round that waits for the child also checks that the directory
        // it holds cannot be opened by another process.
        let check_lock = !from_spawn && stats.opens == 0;
        let result = kill_round(db, mode, from_spawn, delay, check_lock, ledger, not_before)
            .map_err(|err| {
                format!(
                    "kill #{} (seed {seed}, {}, mode {}, {} delay {delay:?}, from {}): {err}",
                    round + 1,
                    db.display(),
                    mode.name(),
                    if from_spawn { "spawn +" } else { "ready +" },
                    ledger.describe(),
                )
            })?;
        stats.record(mode, &result);
        *ledger = result.reopened.ledger;
    }
    let elapsed = started.elapsed();

    // A kill can only tear the journal's last write, which a strict open cuts: each
    // directory must still open strictly (without the replay check, too), and
    // salvaging must find nothing more or less. The kills above seldom tear a write
    // (a small `write` is not cut short by SIGKILL), so one torn write is made by hand.
    for (db, ledger) in &dbs {
        let torn = tear_last_write(db)?;
        for (how, recovery) in [("strict", Recovery::Strict), ("salvaging", Recovery::Salvage)] {
            let found = reopen(db, builder(db).recovery(recovery))
                .map_err(|err| format!("{how} open of {} after all kills: {err}", db.display()))?;
            if found.ledger != *ledger {
                return Err(format!(
                    "a {how} open of {} after all kills found {}, the last reopen found {}",
                    db.display(),
                    found.ledger.describe(),
                    ledger.describe()
                )
                .into());
            }
            let expected_torn = if recovery == Recovery::Strict { torn } else { 0 };
            if found.torn_bytes != expected_torn {
                return Err(format!(
                    "a {how} open of {} cut {} torn bytes, expected {expected_torn}",
                    db.display(),
                    found.torn_bytes
                )
                .into());
            }
        }
    }

    stats.print(elapsed, &dbs);
    if stats.kills < KILL_MINIMUM {
        return Err(format!(
            "only {} kills in {KILL_BUDGET:?}, at least {KILL_MINIMUM} are needed",
            stats.kills
        )
        .into());
    }
    if stats.with_ack == 0 {
        return Err("no kill landed after an acknowledged event".into());
    }
    Ok(())
}

/// Appends the start of a frame to the last journal file, as a write cut short by a
/// crash leaves it, and returns how many bytes it appended.
fn tear_last_write(db: &Path) -> TestResult<u64> {
    let mut journals: Vec<PathBuf> = std::fs::read_dir(db)?
        .map(|entry| entry.map(|entry| entry.path()))
        .collect::<io::Result<_>>()?;
    journals.retain(|path| {
        path.file_name()
            .and_then(|name| name.to_str())
            .is_some_and(|name| is_file_of(name, "journal-", "log"))
    });
    journals.sort();
    let last = journals.last().ok_or_else(|| format!("no journal file in {}", db.display()))?;
    // A write is torn only while the journal is open, and the last reopen closed it
    // cleanly, which its lock file records (after a clean close, a bad end is damage).
    // Without that record, the directory is as a process that died mid-write left it.
    std::fs::remove_file(db.join("instastate.lock"))?;
    // A frame header announcing 40 payload bytes, and only 13 of them.
    let mut torn = 40_u32.to_le_bytes().to_vec();
    torn.extend_from_slice(&0x1234_5678_u32.to_le_bytes());
    torn.extend_from_slice(&[1, 0, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7]);
    std::fs::OpenOptions::new().append(true).open(last)?.write_all(&torn)?;
    Ok(torn.len() as u64)
}

#[allow(clippy::cast_precision_loss)]
fn mean(total: u64, count: u64) -> f64 {
    total as f64 / count.max(1) as f64
}

#[allow(clippy::cast_precision_loss)]
fn mean_ms(total: Duration, count: u64) -> f64 {
    total.as_secs_f64() * 1000.0 / count.max(1) as f64
}

/// What the parent found when it reopened a directory after a kill.
struct Reopened {
    ledger: Ledger,
    took: Duration,
    /// The events the snapshot it loaded covers, if it loaded one.
    snapshot: Option<u64>,
    replayed: u64,
    torn_bytes: u64,
    files: Files,
}

/// Opens `db`, reads its state and closes it, checking what opening reported and
/// what the directory holds then.
fn reopen(db: &Path, builder: PrevaylerBuilder<Ledger>) -> TestResult<Reopened> {
    let started = Instant::now();
    let prevayler =
        open_ledgers(builder, db).map_err(|err| format!("the directory does not open: {err}"))?;
    let took = started.elapsed();
    let ledger = prevayler.read(Ledger::clone);
    let events = prevayler.events();
    let recovered = prevayler.recovered().clone();
    prevayler.close().map_err(|err| format!("close after reopen: {err}"))?;
    let files = Files::count(db)?;

    let mut wrong = String::new();
    if events != ledger.count {
        let _ = write!(
            wrong,
            "\n  the prevayler says {events} events were journaled, its state applied {}",
            ledger.count
        );
    }
    // Snapshots are written to a temporary file and renamed: a kill cannot leave a
    // damaged one.
    if !recovered.unsound_snapshots().is_empty() {
        let _ = write!(wrong, "\n  unsound snapshots: {:?}", recovered.unsound_snapshots());
    }
    if recovered.voided() != 0 {
        let _ = write!(wrong, "\n  {} events voided, but none panicked", recovered.voided());
    }
    if let Some(salvaged) = recovered.salvaged() {
        let _ = write!(wrong, "\n  journal files were salvaged to {}", salvaged.display());
    }
    if let Some(covered) = recovered.snapshot()
        && covered + recovered.replayed() != events
    {
        let _ = write!(
            wrong,
            "\n  a snapshot of {covered} events and {} replayed ones, but {events} events",
            recovered.replayed()
        );
    }
    if !files.odd.is_empty() {
        let _ = write!(wrong, "\n  left-overs in the directory after opening: {:?}", files.odd);
    }
    // An automatic snapshot deletes the older ones only after it is durable, so a kill
    // can leave one more than are kept, but never more.
    if files.snapshots > KEEP_SNAPSHOTS + 1 {
        let _ = write!(
            wrong,
            "\n  {} snapshot files, but only {KEEP_SNAPSHOTS} are kept",
            files.snapshots
        );
    }
    if !wrong.is_empty() {
        return Err(format!("reopening found:{wrong}\n{}", recovered_text(&recovered)).into());
    }
    Ok(Reopened {
        ledger,
        took,
        snapshot: recovered.snapshot(),
        replayed: recovered.replayed(),
        torn_bytes: recovered.torn_bytes(),
        files,
    })
}

fn recovered_text(recovered: &instastate::prevalence::Recovered) -> String {
    format!("(opening reported: {recovered:?})")
}

struct Round {
    reported: Reported,
    reopened: Reopened,
    unacked_found: u64,
    /// Whether the kill left a temporary file behind.
    mid_write: bool,
}

/// Starts a child on `db` (which holds `before`), kills it after `delay`, and checks
/// what the directory holds then.
fn kill_round(
    db: &Path,
    mode: Mode,
    from_spawn: bool,
    delay: Duration,
    check_lock: bool,
    before: &Ledger,
    not_before: u64,
) -> TestResult<Round> {
    let mut child = Watched::spawn(handler_command(db, mode)?, LINE_TIMEOUT)?;
    let mut reported = Reported::default();
    let killed = (|| {
        if !from_spawn {
            reported.parse(&child.next_line()?, before)?;
            if check_lock {
                check_locked(db)?;
            }
        }
        thread::sleep(delay);
        child.kill()
    })();
    let (rest, stderr) = child.finish();
    killed
        .and(rest)
        .and_then(|rest| rest.iter().try_for_each(|line| reported.parse(line, before)))
        .map_err(|err| format!("{err}\nchild stderr: {stderr}"))?;
    if !stderr.is_empty() {
        return Err(format!("the child wrote to stderr: {stderr}").into());
    }

    // A temporary file left behind means the kill landed while a snapshot (or a new
    // journal file) was being written.
    let mid_write = !Files::count(db)?.odd.is_empty();
    // Always with the replay check: a child that journaled digests has them compared.
    let reopened = reopen(db, builder(db).replay_check(Ledger::quick_digest))?;
    let found = &reopened.ledger;
    let replayed = found.check(not_before);

    let mut unacked_found = 0;
    let mut wrong = String::new();
    for thread in 0..THREADS {
        let acked = reported.acked.get(&thread).copied();
        // The first event the thread had not had acknowledged when it was killed.
        let unacked = acked.map_or(before.next(thread), |n| n + 1);
        let next = found.next(thread);
        if next < unacked {
            let _ = write!(
                wrong,
                "\n  thread {thread}: acknowledged events #{next} to #{} are lost (the state \
                 holds 0..{next}, the child acknowledged up to #{})",
                unacked - 1,
                unacked - 1,
            );
        } else if next > unacked + 1 {
            // A thread handles one event at a time, so at most one event of it can be
            // durable without having been acknowledged.
            let _ = write!(
                wrong,
                "\n  thread {thread}: the state holds 0..{next}, but the thread never handled \
                 more than #{unacked}",
            );
        } else {
            unacked_found += next - unacked;
        }
    }
    if !wrong.is_empty() {
        let _ = write!(
            wrong,
            "\n(the state holds {}; the child acknowledged {} events)",
            found.describe(),
            reported.acks
        );
    }
    match replayed {
        Ok(()) if wrong.is_empty() => {}
        Ok(()) => return Err(format!("after the kill:{wrong}").into()),
        Err(err) => return Err(format!("after the kill: {err}{wrong}").into()),
    }
    Ok(Round { reported, reopened, unacked_found, mid_write })
}

/// Checks that opening `db`, which a child holds, fails with `Error::Locked`.
fn check_locked(db: &Path) -> TestResult {
    match open_ledgers(builder(db), db) {
        Err(instastate::Error::Locked { .. }) => Ok(()),
        Err(err) => {
            Err(format!("opening the directory a child holds failed with {err:?}, not Locked")
                .into())
        }
        Ok(prevayler) => {
            drop(prevayler);
            Err("the directory a child holds opened a second time, in another process".into())
        }
    }
}

/// How many files of each kind the directory holds.
struct Files {
    journals: usize,
    snapshots: usize,
    entries: usize,
    /// Temporary files and salvaged journals, which no kill should leave behind
    /// after a reopen.
    odd: Vec<String>,
}

impl Files {
    fn count(dir: &Path) -> TestResult<Files> {
        let mut files = Files { journals: 0, snapshots: 0, entries: 0, odd: Vec::new() };
        // A child killed right after it started may not have made its directory.
        let entries = match std::fs::read_dir(dir) {
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(files),
            entries => entries?,
        };
        for entry in entries {
            let name = entry?.file_name();
            let name = name.to_string_lossy();
            files.entries += 1;
            files.journals += usize::from(is_file_of(&name, "journal-", "log"));
            files.snapshots += usize::from(is_file_of(&name, "snapshot-", "snap"));
            if is_file_of(&name, "", "part") || name.starts_with("salvaged-") {
                files.odd.push(name.into_owned());
            }
        }
        Ok(files)
    }
}

/// The command that starts a handler child on `db` in `mode`.
fn handler_command(db: &Path, mode: Mode) -> TestResult<Command> {
    let mut command = Command::new(env::current_exe()?);
    command
        .env(ROLE_VAR, ROLE_HANDLER)
        .env(DIR_VAR, db)
        .env(MODE_VAR, mode.name())
        .stdin(Stdio::null());
    Ok(command)
}

/// Whether the file `name` starts with `prefix` and has extension `extension`.
fn is_file_of(name: &str, prefix: &str, extension: &str) -> bool {
    name.starts_with(prefix) && Path::new(name).extension().is_some_and(|ext| ext == extension)
}
