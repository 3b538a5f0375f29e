//! Corruption sweep: every file of four kinds of directory is damaged, one damage at
//! a time, and for each damaged copy opening it and `instastate verify` must agree.
//!
//! This binary has no libtest harness (`harness = false`): it is both the test runner
//! and, when started by itself with `INSTASTATE_CORRUPTION_ROLE` set, the child that
//! opens one damaged copy. Command-line arguments are ignored, except `--list`.
//!
//! The directories, each built once through the public API with known contents:
//! - `plain`: a cell store with six small cells (inline records) and one large cell
//!   (about 6 KiB encoded, so it lives in a value file under `values/`), after five
//!   saves, the last of which changes three cells;
//! - `encrypted`: the same, sealed with `EncryptionKey::from_bytes([7; 32])`;
//! - `prevayler`: a [`Prevayler`] directory after 48 events, with a snapshot every
//!   8 events (three kept), so that there are several snapshots and journal files;
//! - `journaled`: a store with a journaled cell (its journal in `journals/<name>/`)
//!   that handled events after its last snapshot, and a plain cell.
//!
//! The damages, each to a fresh copy of a directory, for every regular file in it:
//! - `flip`: one byte XOR 0x01 and XOR 0xFF, at every offset of the first and last
//!   512 bytes, at a stride over the middle, and at every offset of sled's log
//!   (`sled/db`, a 512 KiB segment that is mostly zero) where the last save's bytes
//!   are, with a margin around them;
//! - `truncate`: to 0, to half, to the length less one, and to every 4 KiB boundary;
//! - `zero page`: each 4 KiB page that holds a byte other than zero;
//! - `delete`: the file.
//!
//! The row `none` is the undamaged directory.
//!
//! That full list (`INSTASTATE_CORRUPTION_WIDE=full`) is about 42,000 cases, and each
//! case costs two processes that open sled, about 0.15 s of CPU in a debug build
//! (most of it sled setting up its page table): over an hour. So a default run
//! samples it, with strides from a random start, to about 1,300 cases: every offset
//! of each file's first 16 and last 8 bytes (its header, its checksum or last
//! frame), 6 more offsets in the rest of the first 512 bytes, 6 in the middle, 4 in
//! the rest of the last 512, and 80 over the last save in sled's log, one mask per
//! offset, alternating; every 4 KiB boundary within a file's data and 8 after it;
//! 4 pages of each file and every page of the last save; and every deletion.
//!
//! Each damaged copy is opened in a child process, the way the program would (same
//! cells, same key; a `Prevayler` with the same types and `Recovery::Strict`), which
//! reports what it found; a child that panics, aborts or prints nothing for 20 s is
//! caught. A second copy with the same damage goes to `instastate verify`, so that
//! verify judges the damage, not what the open left behind. Each case is:
//! - `ok`: the open gives exactly the last acknowledged state, and verify does not
//!   contradict it (it may report harmless damage, such as an old history entry);
//! - `typed error`: the open fails with a typed `instastate::Error`, and verify does
//!   not say the directory is sound (exit status 1 or 2);
//! - `BAD`: the open panics, aborts or hangs, or gives anything but the last
//!   acknowledged state without an error (a silent rollback or loss); or verify
//!   panics, aborts or hangs, says the directory holds no store, or says it is sound
//!   while the open failed or lost data.
//!
//! The test prints the table of cases per directory kind and damage, what happened
//! to each file, and the BAD cases grouped by cause, and fails if there is one.
//!
//! Before the witness, the journal's clean-close mark and link frames, and the
//! tool's journal inspection, a default run found 524 BAD cases of 1,282: a flipped
//! byte, zeroed page or truncation in the last save's bytes of sled's log opened the
//! store at the save before without an error (and verify said "sound"); verify said a
//! Prevayler directory holds no store, and called a store sound whose journaled
//! cell's journal did not open; a damaged last journal frame, or a deleted newest
//! journal file, lost acknowledged events as a "torn write". Now there are none.
//!
//! Run it with `cargo test -p instastate-cli --test corruption`: about 1,550 cases,
//! 90 s on 2 cores in a debug build.
//! Its directories go to `/dev/shm` when there is one and `TMPDIR` is not set, since
//! most of the time would otherwise go to fsyncs.
//!
//! Environment:
//! - `INSTASTATE_CORRUPTION_WIDE=<n>`: `n` times the sampled offsets, pages and
//!   truncations, and both masks at every offset (a longer run); `full`: the full
//!   list;
//! - `INSTASTATE_CORRUPTION_ONLY=<text>`: only the cases whose description contains
//!   `text`, as in `plain/flip plain sled/db flip ^0x01 at offset 12` (directory
//!   kind and damage, directory kind, file, damage); with a `$` at its end, only
//!   those whose description ends with it;
//! - `INSTASTATE_CORRUPTION_SEED`: replays a run's sampled offsets;
//! - `INSTASTATE_CORRUPTION_WORKERS`: how many cases run side by side (2);
//! - `INSTASTATE_CORRUPTION_VERBOSE`: prints every case as it ends;
//! - `INSTASTATE_CORRUPTION_KEEP`: keeps the undamaged directories, for a look.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    env,
    fmt::Write as _,
    fs,
    io::{self, Write as _},
    ops::Range,
    os::unix::{fs::FileExt, process::ExitStatusExt},
    path::{Path, PathBuf},
    process::{self, Command, ExitCode, ExitStatus, Stdio},
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use instastate::{
    CellOptions, EncryptionKey, Prevalent, Prevayler, StateCell, Store, StoreBuilder, Timestamp,
    prevalence::PrevaylerBuilder,
};
use serde::{Deserialize, Serialize};

use crate::common::{Test, TestResult, Watched, XorShift};

/// Selects the child role; unset in the parent.
const ROLE_VAR: &str = "INSTASTATE_CORRUPTION_ROLE";
/// The directory kind a child opens: a [`Kind::name`].
const KIND_VAR: &str = "INSTASTATE_CORRUPTION_KIND";
/// The damaged directory a child opens.
const DIR_VAR: &str = "INSTASTATE_CORRUPTION_DIR";
const WIDE_VAR: &str = "INSTASTATE_CORRUPTION_WIDE";
const ONLY_VAR: &str = "INSTASTATE_CORRUPTION_ONLY";
const SEED_VAR: &str = "INSTASTATE_CORRUPTION_SEED";
const WORKERS_VAR: &str = "INSTASTATE_CORRUPTION_WORKERS";
const KEEP_VAR: &str = "INSTASTATE_CORRUPTION_KEEP";
const VERBOSE_VAR: &str = "INSTASTATE_CORRUPTION_VERBOSE";

const ROLE_OPEN: &str = "open";

/// How long a child or `instastate verify` may print nothing before it counts as hung.
const PATIENCE: Duration = Duration::from_secs(20);
/// How long a process that closed its stdout may take to exit.
const EXIT_GRACE: Duration = Duration::from_secs(5);
/// The cases run side by side unless `INSTASTATE_CORRUPTION_WORKERS` says otherwise.
const DEFAULT_WORKERS: usize = 2;

/// The head and the tail of a file: the first and the last this many bytes.
const EDGE: u64 = 512;
/// Every offset of a file's first bytes (its header, as a rule) and of its last
/// bytes (a checksum, or the last frame of a journal) is flipped.
const START: u64 = 16;
const END: u64 = 8;
/// Flipped offsets, at most, per file (times the widening): in the rest of the head,
/// in the middle and in the rest of the tail.
const HEAD_FLIPS: u64 = 6;
const MIDDLE_FLIPS: u64 = 6;
const TAIL_FLIPS: u64 = 4;
/// Flipped offsets over the middle of each file when sampling is full.
const FULL_MIDDLE_FLIPS: u64 = 256;
/// Flipped offsets, at most, over the last save's bytes in sled's log, and the
/// margin around them.
const DENSE_FLIPS: u64 = 80;
const DENSE_MARGIN: u64 = 64;
/// Truncations, at most, to 4 KiB boundaries after a file's data (every boundary
/// within its data is one).
const TRUNCATIONS: u64 = 8;
/// Zeroed pages per file, at most (besides the pages of the last save).
const ZEROED_PAGES: u64 = 4;
const PAGE: u64 = 4096;
const MASKS: [u8; 2] = [0x01, 0xFF];

/// The key of the encrypted store.
const KEY: [u8; 32] = [7; 32];

fn main() -> ExitCode {
    if let Ok(role) = env::var(ROLE_VAR) {
        return child_main(&role);
    }
    let tests: [Test; 1] = [("corruption::sweep", sweep)];
    common::run(&tests)
}

// ---------------------------------------------------------------------------------
// The directories and their last acknowledged state
// ---------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Plain,
    Encrypted,
    Prevayler,
    Journaled,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::Plain, Kind::Encrypted, Kind::Prevayler, Kind::Journaled];

    fn name(self) -> &'static str {
        match self {
            Kind::Plain => "plain",
            Kind::Encrypted => "encrypted",
            Kind::Prevayler => "prevayler",
            Kind::Journaled => "journaled",
        }
    }

    fn parse(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|kind| kind.name() == name)
    }
}

const N_SMALL: usize = 6;
/// The small cells; a cell that was never saved holds the empty string.
static SMALL: [StateCell<String>; N_SMALL] = [
    StateCell::new("corruption::SMALL0", String::new),
    StateCell::new("corruption::SMALL1", String::new),
    StateCell::new("corruption::SMALL2", String::new),
    StateCell::new("corruption::SMALL3", String::new),
    StateCell::new("corruption::SMALL4", String::new),
    StateCell::new("corruption::SMALL5", String::new),
];
/// The large cell, cell number `N_SMALL`: about 6 KiB encoded, so in a value file.
static BIG: StateCell<Vec<u64>> = StateCell::new("corruption::BIG", Vec::new);
const BIG_LEN: u64 = 800;
/// The cells each save writes (save 1 is the first): small cells by number, and
/// the large cell as `N_SMALL`. The last save changes a few cells, the large one too.
const SAVES: [&[usize]; 5] =
    [&[0, 1, 2, 3, 4, 5, N_SMALL], &[0, 1, N_SMALL], &[2, 3], &[0, 5], &[1, 4, N_SMALL]];
const LAST_SAVE: usize = SAVES.len();
/// The saves each run of the program makes: the store is closed and reopened in between.
const SESSIONS: [&[usize]; 3] = [&[1, 2], &[3, 4], &[5]];

fn small_value(cell: usize, save: usize) -> String {
    format!("small cell {cell} as written by save {save}")
}

fn big_value(save: usize) -> Vec<u64> {
    // Each element encodes to 8 bytes and names its save.
    (0..BIG_LEN).map(|idx| ((save as u64) << 48) | (idx * 0x0001_0203)).collect()
}

/// Whether save `save` writes cell `cell`.
fn writes(save: usize, cell: usize) -> bool {
    save.checked_sub(1).and_then(|idx| SAVES.get(idx)).is_some_and(|cells| cells.contains(&cell))
}

/// The save whose value cell `cell` holds after save `save`; 0 for its initial value.
fn writer_as_of(cell: usize, save: usize) -> usize {
    (1..=save).rev().find(|&it| writes(it, cell)).unwrap_or(0)
}

/// The save whose value cell `cell` holds now (0: its initial value), or `None`
/// for a value no save wrote.
fn found_writer(cell: usize) -> Option<usize> {
    let mut writers = (0..=LAST_SAVE).filter(|&save| save == 0 || writes(save, cell));
    match SMALL.get(cell) {
        Some(small) => small.with(|value| {
            writers.find(|&save| {
                if save == 0 { value.is_empty() } else { *value == small_value(cell, save) }
            })
        }),
        None => BIG.with(|value| {
            writers
                .find(|&save| if save == 0 { value.is_empty() } else { *value == big_value(save) })
        }),
    }
}

fn cell_name(cell: usize) -> String {
    if cell < N_SMALL { format!("SMALL{cell}") } else { "BIG".to_owned() }
}

/// Sets the cells as save `save` does.
fn write_save(save: usize) {
    instastate::atomically(|| {
        for cell in (0..=N_SMALL).filter(|&cell| writes(save, cell)) {
            match SMALL.get(cell) {
                Some(small) => small.set(small_value(cell, save)),
                None => BIG.set(big_value(save)),
            }
        }
    });
}

fn cell_store(dir: &Path, key: Option<[u8; 32]>) -> instastate::Result<Store> {
    let mut builder = SMALL.iter().fold(Store::builder(), StoreBuilder::cell);
    builder = builder.cell(&BIG);
    if let Some(key) = key {
        builder = builder.encryption_key(EncryptionKey::from_bytes(key));
    }
    builder.open(dir)
}

/// Checks the cells against the last save: a description of what they hold, or
/// what is wrong as a category (`an older save`, `a cell missing`, `values no save
/// wrote`, `another save number`) and the details.
fn check_cells(generation: u64) -> Result<String, (&'static str, String)> {
    let found: Vec<Option<usize>> = (0..=N_SMALL).map(found_writer).collect();
    let as_of = |save: usize| -> Vec<Option<usize>> {
        (0..=N_SMALL).map(|cell| Some(writer_as_of(cell, save))).collect()
    };
    let last = LAST_SAVE as u64;
    if found == as_of(LAST_SAVE) {
        if generation == last {
            return Ok(format!("all {} cells as save {LAST_SAVE} left them", N_SMALL + 1));
        }
        return Err((
            "another save number",
            format!("the cells hold save {LAST_SAVE}, but the store says save {generation}"),
        ));
    }
    if let Some(save) = (0..LAST_SAVE).rev().find(|&save| found == as_of(save)) {
        return Err((
            "an older save",
            format!("every cell as save {save} left it (store at save {generation})"),
        ));
    }
    let mut wrong = Vec::new();
    for (cell, writer) in found.iter().enumerate() {
        let expected = writer_as_of(cell, LAST_SAVE);
        match writer {
            Some(writer) if *writer == expected => {}
            Some(0) => wrong.push(format!("{} missing (its initial value)", cell_name(cell))),
            Some(writer) => wrong.push(format!(
                "{} holds save {writer}'s value, not save {expected}'s",
                cell_name(cell)
            )),
            None => wrong.push(format!("{} holds a value no save wrote", cell_name(cell))),
        }
    }
    let category = if found.contains(&Some(0)) {
        "a cell missing"
    } else if found.contains(&None) {
        "values no save wrote"
    } else {
        "an older value of a cell"
    };
    Err((category, format!("{} (store at save {generation})", wrong.join("; "))))
}

/// The state of the prevalent systems: the events applied, in order.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct Ledger {
    events: Vec<u64>,
}

impl Prevalent for Ledger {
    type Event = u64;
    type Output = u64;

    fn apply(&mut self, event: u64, _at: Timestamp) -> u64 {
        self.events.push(event);
        self.events.len() as u64
    }
}

/// Event `n` (from 1) is `event(n)`, so that a ledger names what it holds.
fn event(n: u64) -> u64 {
    n * 1_000 + 7
}

/// Checks a ledger of `applied` events against `expected` events: what it holds,
/// or what is wrong as a category (`fewer events`, `other events`, `another event
/// count`) and details.
fn check_ledger(
    ledger: &Ledger,
    applied: u64,
    expected: u64,
) -> Result<String, (&'static str, String)> {
    let prefix = ledger.events.iter().zip(1..).all(|(&found, n)| found == event(n));
    let held = ledger.events.len() as u64;
    if !prefix || expected < held {
        let first: Vec<&u64> = ledger.events.iter().take(64).collect();
        return Err((
            "other events",
            format!("{held} events, not the first {expected}: {first:?}"),
        ));
    }
    if held < expected {
        return Err((
            "fewer events",
            format!("the first {held} of {expected} events ({applied} applied)"),
        ));
    }
    if applied != expected {
        return Err((
            "another event count",
            format!("the ledger holds all {expected} events, but {applied} were applied"),
        ));
    }
    Ok(format!("all {expected} events"))
}

/// The Prevayler directory's events, and how often it snapshots.
const PREVAYLER_EVENTS: u64 = 48;
const PREVAYLER_SNAPSHOT_EVERY: u64 = 8;

/// How the program opens its Prevayler directory; the defaults but for three
/// snapshots kept, so that there are more journal files.
fn prevayler_builder() -> PrevaylerBuilder<Ledger> {
    Prevayler::builder().keep_snapshots(3)
}

/// The journaled cell, and a plain cell beside it.
static LEDGER: StateCell<Ledger> =
    StateCell::with_options("corruption::LEDGER", Ledger::default, CellOptions::new().journaled());
static NOTE: StateCell<String> = StateCell::new("corruption::NOTE", String::new);
/// The events the journaled cell handles before each of its two saves, and after
/// the last one.
const LEDGER_EVENTS: [u64; 3] = [6, 6, 8];
const JOURNALED_SAVES: u64 = 2;

fn note(save: u64) -> String {
    format!("note as written by save {save}")
}

fn journaled_store(dir: &Path) -> instastate::Result<Store> {
    Store::builder().cell(&LEDGER).cell(&NOTE).open(dir)
}

// ---------------------------------------------------------------------------------
// The child: opens one damaged copy and says what it found
// ---------------------------------------------------------------------------------

fn child_main(role: &str) -> ExitCode {
    let res = (|| -> TestResult {
        if role != ROLE_OPEN {
            return Err(format!("unknown child role `{role}`").into());
        }
        let kind = env::var(KIND_VAR)?;
        let kind = Kind::parse(&kind).ok_or_else(|| format!("unknown kind `{kind}`"))?;
        let dir = PathBuf::from(env::var_os(DIR_VAR).ok_or_else(|| format!("{DIR_VAR} unset"))?);
        match kind {
            Kind::Plain => open_cells(&dir, None),
            Kind::Encrypted => open_cells(&dir, Some(KEY)),
            Kind::Prevayler => open_prevayler(&dir),
            Kind::Journaled => open_journaled(&dir),
        }
    })();
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("child `{role}` failed: {err}");
            ExitCode::from(2)
        }
    }
}

/// Prints the child's report: `EXACT <what>`, `OTHER <category>\t<what>` or
/// `ERROR <variant>\t<display>\t<debug>`.
fn report(res: Result<String, (&str, String)>) -> TestResult {
    let line = match res {
        Ok(what) => format!("EXACT {}", one_line(&what)),
        Err((category, what)) => format!("OTHER {category}\t{}", one_line(&what)),
    };
    let mut out = io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

fn report_error(err: &instastate::Error) -> TestResult {
    let debug = format!("{err:?}");
    let variant = debug.split(|c: char| !c.is_ascii_alphanumeric()).next().unwrap_or_default();
    let mut out = io::stdout().lock();
    writeln!(out, "ERROR {variant}\t{}\t{}", one_line(&err.to_string()), one_line(&debug))?;
    out.flush()?;
    Ok(())
}

fn one_line(text: &str) -> String {
    text.replace('\n', "\\n").replace('\t', " ")
}

fn open_cells(dir: &Path, key: Option<[u8; 32]>) -> TestResult {
    let store = match cell_store(dir, key) {
        Ok(store) => store,
        Err(err) => return report_error(&err),
    };
    report(check_cells(store.generation()))?;
    // Closing may fail too; that ends the child after its report.
    drop(store);
    Ok(())
}

fn open_prevayler(dir: &Path) -> TestResult {
    let system = match prevayler_builder().open(dir, Ledger::default(), Ledger::apply) {
        Ok(system) => system,
        Err(err) => return report_error(&err),
    };
    let checked = system.read(|ledger| check_ledger(ledger, system.events(), PREVAYLER_EVENTS));
    let recovered = system.recovered();
    let how = format!(
        "snapshot {:?}, {} replayed, {} torn bytes cut, unsound snapshots {:?}",
        recovered.snapshot(),
        recovered.replayed(),
        recovered.torn_bytes(),
        recovered.unsound_snapshots()
    );
    report(
        checked
            .map(|what| format!("{what} ({how})"))
            .map_err(|(category, what)| (category, format!("{what} ({how})"))),
    )?;
    drop(system);
    Ok(())
}

fn open_journaled(dir: &Path) -> TestResult {
    let store = match journaled_store(dir) {
        Ok(store) => store,
        Err(err) => return report_error(&err),
    };
    let expected: u64 = LEDGER_EVENTS.iter().sum();
    let ledger = LEDGER.with(|ledger| check_ledger(ledger, ledger.events.len() as u64, expected));
    let generation = store.generation();
    let found_note = NOTE.get();
    let note_ok = found_note == note(JOURNALED_SAVES);
    let res = match (ledger, note_ok, generation == JOURNALED_SAVES) {
        (Ok(what), true, true) => Ok(format!("{what}, the note of save {JOURNALED_SAVES}")),
        (Err(wrong), _, _) => Err(wrong),
        (Ok(_), false, _) => {
            let which = (1..JOURNALED_SAVES).find(|&save| found_note == note(save));
            let category = if found_note.is_empty() { "a cell missing" } else { "an older save" };
            Err((
                category,
                format!("NOTE is {found_note:?} (save {which:?}), store at save {generation}"),
            ))
        }
        (Ok(_), true, false) => Err((
            "another save number",
            format!("the cells are right, but the store says save {generation}"),
        )),
    };
    report(res)?;
    drop(store);
    Ok(())
}

// ---------------------------------------------------------------------------------
// Building the directories
// ---------------------------------------------------------------------------------

/// One undamaged directory, and what to damage in it.
struct Template {
    kind: Kind,
    dir: PathBuf,
    /// Every regular file, by its path below `dir`, with its bytes.
    files: Vec<(String, Vec<u8>)>,
    /// Where sled's log holds the last save's bytes.
    last_save: Option<Range<u64>>,
}

/// Where sled's log is, below a store directory.
const SLED_LOG: &str = "sled/db";

fn build_template(root: &Path, kind: Kind) -> TestResult<Template> {
    let dir = root.join(format!("template-{}", kind.name()));
    let last_save = match kind {
        Kind::Plain => Some(build_cells(&dir, None)?),
        Kind::Encrypted => Some(build_cells(&dir, Some(KEY))?),
        Kind::Prevayler => {
            build_prevayler(&dir)?;
            None
        }
        Kind::Journaled => Some(build_journaled(&dir)?),
    };
    let mut files = Vec::new();
    for path in regular_files(&dir)? {
        let bytes = fs::read(dir.join(&path))?;
        files.push((path, bytes));
    }
    Ok(Template { kind, dir, files, last_save })
}

/// Writes the five saves, reopening the store between sessions as a program that
/// restarts does (so that sled's log has its snapshots and segments); returns where
/// the last save's bytes are in sled's log.
fn build_cells(dir: &Path, key: Option<[u8; 32]>) -> TestResult<Range<u64>> {
    let mut before = 0;
    for session in SESSIONS {
        let store = cell_store(dir, key)?;
        for &save in session {
            if save == LAST_SAVE {
                before = data_end(&dir.join(SLED_LOG))?;
            }
            write_save(save);
            store.save_all()?;
            if store.generation() != save as u64 {
                return Err(format!("save {save} made save {}", store.generation()).into());
            }
        }
        drop(store);
    }
    let values = regular_files(&dir.join("values"))?;
    if values.is_empty() {
        return Err("the large cell went to no value file".into());
    }
    Ok(before..data_end(&dir.join(SLED_LOG))?)
}

fn build_prevayler(dir: &Path) -> TestResult {
    // Two runs of the program, with a snapshot every few events.
    for events in [1..=PREVAYLER_EVENTS / 2, PREVAYLER_EVENTS / 2 + 1..=PREVAYLER_EVENTS] {
        let system = prevayler_builder().open(dir, Ledger::default(), Ledger::apply)?;
        for n in events {
            system.handle(event(n))?;
            if n % PREVAYLER_SNAPSHOT_EVERY == 0 && n < PREVAYLER_EVENTS {
                system.snapshot()?;
            }
        }
        system.close()?;
    }
    Ok(())
}

/// Handles events and saves, in two runs of the program, and handles more events
/// after the last save; returns where the last save's bytes are in sled's log.
fn build_journaled(dir: &Path) -> TestResult<Range<u64>> {
    let [first, second, after] = LEDGER_EVENTS;
    let mut handled = 0;
    let mut handle = |count: u64| -> TestResult {
        for _ in 0..count {
            handled += 1;
            LEDGER.handle(event(handled))?;
        }
        Ok(())
    };
    let store = journaled_store(dir)?;
    handle(first)?;
    NOTE.set(note(1));
    store.save_all()?;
    drop(store);
    // The second run of the program: its save is the last, and events follow it.
    let store = journaled_store(dir)?;
    handle(second)?;
    let before = data_end(&dir.join(SLED_LOG))?;
    NOTE.set(note(JOURNALED_SAVES));
    store.save_all()?;
    handle(after)?;
    if store.generation() != JOURNALED_SAVES {
        return Err(
            format!("the store is at save {}, not {JOURNALED_SAVES}", store.generation()).into()
        );
    }
    drop(store);
    Ok(before..data_end(&dir.join(SLED_LOG))?)
}

/// The offset after the last byte of `path` that is not zero.
fn data_end(path: &Path) -> io::Result<u64> {
    let bytes = fs::read(path)?;
    Ok(bytes.iter().rposition(|&byte| byte != 0).map_or(0, |last| last as u64 + 1))
}

/// Every regular file below `dir`, as paths relative to it, sorted.
fn regular_files(dir: &Path) -> io::Result<Vec<String>> {
    let mut files = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(below) = pending.pop() {
        for entry in fs::read_dir(dir.join(&below))? {
            let entry = entry?;
            let path = below.join(entry.file_name());
            let file_type = entry.file_type()?;
            if file_type.is_dir() {
                pending.push(path);
            } else if file_type.is_file() {
                files.push(path.to_string_lossy().into_owned());
            } else {
                return Err(io::Error::other(format!("{} is not a file", path.display())));
            }
        }
    }
    files.sort();
    Ok(files)
}

// ---------------------------------------------------------------------------------
// Damages
// ---------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Damage {
    None,
    Flip { offset: u64, mask: u8 },
    Truncate { len: u64 },
    ZeroPage { page: u64 },
    Delete,
}

/// The damages in the order of the table.
const FAMILIES: [&str; 5] = ["none", "flip", "truncate", "zero page", "delete"];

impl Damage {
    fn family(self) -> &'static str {
        match self {
            Damage::None => "none",
            Damage::Flip { .. } => "flip",
            Damage::Truncate { .. } => "truncate",
            Damage::ZeroPage { .. } => "zero page",
            Damage::Delete => "delete",
        }
    }

    /// The damage without its position, and its position: to list cases compactly.
    fn split(self) -> (String, Option<u64>) {
        match self {
            Damage::None => ("undamaged".to_owned(), None),
            Damage::Flip { offset, mask } => (format!("flip ^{mask:#04x} at offset"), Some(offset)),
            Damage::Truncate { len } => ("truncate to".to_owned(), Some(len)),
            Damage::ZeroPage { page } => ("zero 4 KiB page".to_owned(), Some(page)),
            Damage::Delete => ("delete".to_owned(), None),
        }
    }

    fn describe(self) -> String {
        match self.split() {
            (what, Some(at)) => format!("{what} {at}"),
            (what, None) => what,
        }
    }

    /// Applies the damage to `path`.
    fn apply(self, path: &Path) -> io::Result<()> {
        match self {
            Damage::None => Ok(()),
            Damage::Flip { offset, mask } => {
                let file = fs::OpenOptions::new().read(true).write(true).open(path)?;
                let mut byte = [0];
                file.read_exact_at(&mut byte, offset)?;
                let [old] = byte;
                file.write_all_at(&[old ^ mask], offset)
            }
            Damage::Truncate { len } => fs::OpenOptions::new().write(true).open(path)?.set_len(len),
            Damage::ZeroPage { page } => {
                let file = fs::OpenOptions::new().write(true).open(path)?;
                let start = page * PAGE;
                let len = file.metadata()?.len().saturating_sub(start).min(PAGE);
                let zeros = vec![0; usize::try_from(len).map_err(io::Error::other)?];
                file.write_all_at(&zeros, start)
            }
            Damage::Delete => fs::remove_file(path),
        }
    }
}

/// How densely to sample.
struct Sampling {
    /// Everything the module docs list: no sampling.
    full: bool,
    /// Sample this many times as densely; both masks at every offset from 2.
    wide: u64,
    rng: XorShift,
}

impl Sampling {
    /// At most `cap` (times the widening) offsets of `range`, evenly spaced from a
    /// random start.
    fn strided(&mut self, range: Range<u64>, cap: u64) -> Vec<u64> {
        if range.is_empty() {
            return Vec::new();
        }
        let stride = (range.end - range.start).div_ceil(cap * self.wide).max(1);
        let first = range.start + self.rng.below(stride);
        (first..range.end).step_by(usize::try_from(stride).unwrap_or(usize::MAX)).collect()
    }

    /// All of `range` when sampling is full, else [`strided`](Self::strided).
    fn sample(&mut self, range: Range<u64>, cap: u64) -> Vec<u64> {
        if self.full { range.collect() } else { self.strided(range, cap) }
    }
}

/// The damages of one file: see the module docs. `last_save` is where the last
/// save's bytes are in it, if it is sled's log.
fn plan_file(bytes: &[u8], last_save: Option<&Range<u64>>, sampling: &mut Sampling) -> Vec<Damage> {
    let len = bytes.len() as u64;
    let data_end = bytes.iter().rposition(|&byte| byte != 0).map_or(0, |last| last as u64 + 1);
    // Small files: the head is the first half, the tail the second.
    let head_end = len.div_ceil(2).min(EDGE);
    let tail_start = len.saturating_sub(EDGE).max(head_end);
    let end_start = len.saturating_sub(END);
    let mut offsets: BTreeSet<u64> = (0..len.min(START)).chain(end_start..len).collect();
    offsets.extend(sampling.sample(len.min(START)..head_end, HEAD_FLIPS));
    let middle = if sampling.full { FULL_MIDDLE_FLIPS } else { MIDDLE_FLIPS };
    offsets.extend(sampling.strided(head_end..tail_start, middle));
    offsets.extend(sampling.sample(tail_start..end_start.max(tail_start), TAIL_FLIPS));
    let dense = last_save.map(|range| {
        range.start.saturating_sub(DENSE_MARGIN * sampling.wide)
            ..(range.end + DENSE_MARGIN * sampling.wide).min(len)
    });
    if let Some(dense) = &dense {
        offsets.extend(sampling.sample(dense.clone(), DENSE_FLIPS));
    }
    // One mask per offset, alternating, unless sampling more densely.
    let both = sampling.full || 1 < sampling.wide;
    let mut damages: Vec<Damage> = offsets
        .into_iter()
        .zip(0_usize..)
        .flat_map(|(offset, idx)| {
            let masks = if both { &MASKS[..] } else { MASKS.get(idx % 2..=idx % 2).unwrap_or(&[]) };
            masks.iter().map(move |&mask| Damage::Flip { offset, mask })
        })
        .collect();

    let boundaries: Vec<u64> = (1..len.div_ceil(PAGE)).map(|page| page * PAGE).collect();
    let (within, after): (Vec<u64>, Vec<u64>) =
        boundaries.iter().partition(|&&at| at < data_end + PAGE);
    let mut lens: BTreeSet<u64> = [0, len / 2, len.saturating_sub(1)].into();
    lens.extend(within);
    let after = after.first().zip(after.last()).map_or(0..0, |(&first, &last)| first..last + 1);
    lens.extend(sampling.sample(after, TRUNCATIONS).into_iter().filter(|at| at % PAGE == 0));
    damages.extend(lens.into_iter().filter(|&it| it < len).map(|len| Damage::Truncate { len }));

    // Zeroing a page of zeros changes nothing.
    let pages: Vec<u64> = (0..len.div_ceil(PAGE))
        .filter(|&page| {
            let start = usize::try_from(page * PAGE).unwrap_or(usize::MAX);
            let end = usize::try_from((page + 1) * PAGE).unwrap_or(usize::MAX).min(bytes.len());
            bytes.get(start..end).is_some_and(|it| it.iter().any(|&byte| byte != 0))
        })
        .collect();
    let picked = sampling.sample(0..pages.len() as u64, ZEROED_PAGES);
    let mut zeroed: BTreeSet<u64> = picked
        .into_iter()
        .filter_map(|idx| pages.get(usize::try_from(idx).ok()?).copied())
        .collect();
    if let Some(dense) = &dense {
        zeroed.extend(
            pages
                .iter()
                .filter(|&&page| page * PAGE < dense.end && dense.start < (page + 1) * PAGE),
        );
    }
    damages.extend(zeroed.into_iter().map(|page| Damage::ZeroPage { page }));
    damages.push(Damage::Delete);
    damages
}

// ---------------------------------------------------------------------------------
// Running a case
// ---------------------------------------------------------------------------------

/// One damage to one file of one directory.
#[derive(Clone)]
struct Case {
    kind: Kind,
    /// The damaged file below the directory; empty for the undamaged directory.
    file: String,
    damage: Damage,
}

impl Case {
    fn attack(&self) -> String {
        format!("{}/{}", self.kind.name(), self.damage.family())
    }

    fn describe(&self) -> String {
        let file = if self.file.is_empty() { "-" } else { &self.file };
        format!("{} {file} {}", self.kind.name(), self.damage.describe())
    }
}

/// What opening a damaged copy gave.
enum Opened {
    /// Exactly the last acknowledged state.
    Exact(String),
    /// Something else, without an error: a category and the details.
    Other { category: String, detail: String },
    /// A typed error.
    Typed { variant: String, display: String, debug: String },
    /// The child panicked, aborted, hung or died: what happened, and its stderr.
    Crashed { what: String, stderr: String },
}

impl Opened {
    /// The kind of outcome, without the details: to group cases by cause.
    fn summary(&self) -> String {
        match self {
            Opened::Exact(_) => "exact".to_owned(),
            Opened::Other { category, .. } => format!("{category}, no error"),
            Opened::Typed { variant, .. } => format!("typed error {variant}"),
            Opened::Crashed { what, .. } => what.clone(),
        }
    }

    fn detail(&self) -> String {
        match self {
            Opened::Exact(what) => format!("exactly the last acknowledged state: {what}"),
            Opened::Other { category, detail } => format!("{category}, no error: {detail}"),
            Opened::Typed { display, debug, .. } => {
                format!("typed error\n      Display: {display}\n      Debug: {debug}")
            }
            Opened::Crashed { what, stderr } => {
                format!("{what}\n      stderr: {}", excerpt(stderr, 6))
            }
        }
    }
}

/// What `instastate verify` said.
enum Verified {
    /// Exit 0, "sound".
    Sound(String),
    /// Exit 1, "NOT sound".
    NotSound(String),
    /// Exit 2, because the directory "holds no instastate store".
    NoStore(String),
    /// Exit 2 for another reason, or another exit status.
    Failed(String),
    /// It panicked, aborted, hung or died.
    Crashed { what: String, output: String },
}

impl Verified {
    fn summary(&self) -> String {
        match self {
            Verified::Sound(_) => "sound (exit 0)".to_owned(),
            Verified::NotSound(_) => "not sound (exit 1)".to_owned(),
            Verified::NoStore(_) => "\"holds no instastate store\" (exit 2)".to_owned(),
            Verified::Failed(_) => "failed (exit 2)".to_owned(),
            Verified::Crashed { what, .. } => what.clone(),
        }
    }

    fn output(&self) -> &str {
        match self {
            Verified::Sound(output)
            | Verified::NotSound(output)
            | Verified::NoStore(output)
            | Verified::Failed(output)
            | Verified::Crashed { output, .. } => output,
        }
    }
}

enum Verdict {
    Ok,
    Typed,
    /// Whether the open was BAD, and whether verify was.
    Bad {
        open: bool,
        verify: bool,
    },
}

impl Verdict {
    fn name(&self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Typed => "typed error",
            Verdict::Bad { .. } => "BAD",
        }
    }
}

/// Classifies a case: see the module docs.
fn classify(opened: &Opened, verified: &Verified) -> Verdict {
    let open_bad = matches!(opened, Opened::Other { .. } | Opened::Crashed { .. });
    let verify_bad = match verified {
        Verified::Crashed { .. } | Verified::NoStore(_) => true,
        Verified::Sound(_) => !matches!(opened, Opened::Exact(_)),
        Verified::NotSound(_) | Verified::Failed(_) => false,
    };
    match opened {
        _ if open_bad || verify_bad => Verdict::Bad { open: open_bad, verify: verify_bad },
        Opened::Typed { .. } => Verdict::Typed,
        _ => Verdict::Ok,
    }
}

struct Outcome {
    opened: Opened,
    verified: Verified,
    verdict: Verdict,
}

/// What one finished process did.
struct Finished {
    /// `None` when it hung and was killed.
    status: Option<ExitStatus>,
    lines: Vec<String>,
    stderr: String,
}

/// Runs `command` until it exits, or kills it when it prints nothing for `PATIENCE`.
fn run_watched(command: Command) -> TestResult<Finished> {
    let mut child = Watched::spawn(command, PATIENCE)?;
    let mut lines = Vec::new();
    let mut waited = Instant::now();
    while let Ok(line) = child.next_line() {
        lines.push(line);
        waited = Instant::now();
    }
    let hung = PATIENCE <= waited.elapsed();
    let closed = Instant::now();
    let mut status = child.exited()?;
    while status.is_none() && !hung && closed.elapsed() < EXIT_GRACE {
        thread::sleep(Duration::from_millis(1));
        status = child.exited()?;
    }
    // Still running: it hung. `kill` fails only if it exited just now.
    if status.is_none() && child.kill().is_err() {
        status = child.exited()?;
    }
    let (rest, stderr) = child.finish();
    lines.extend(rest?);
    Ok(Finished { status, lines, stderr })
}

/// How a process that did not exit normally ended.
fn crash(status: Option<ExitStatus>, stderr: &str) -> String {
    let Some(status) = status else {
        return format!("hung (nothing for {} s, killed)", PATIENCE.as_secs());
    };
    match (status.code(), status.signal()) {
        (Some(101), _) => format!("panicked at {}", panic_location(stderr)),
        (_, Some(6)) => "aborted (SIGABRT)".to_owned(),
        (_, Some(signal)) => format!("died of signal {signal}"),
        (Some(code), _) => format!("exited with status {code}"),
        (None, None) => format!("ended with {status}"),
    }
}

/// Where the first panic in `stderr` happened; in a dependency, from its crate's
/// directory (`sled-0.34.7/src/...`).
fn panic_location(stderr: &str) -> String {
    let Some((_, rest)) = stderr.split_once("panicked at ") else {
        return "<unknown>".to_owned();
    };
    let location = rest.lines().next().unwrap_or_default().trim_end_matches(':');
    // A dependency's path is `<cargo home>/registry/src/<index>/<crate>/...`.
    let dependency = location.split_once("/registry/src/").map(|(_, registry)| registry);
    let location = dependency.map_or(location, |registry| {
        registry.split_once('/').map_or(registry, |(_, in_crate)| in_crate)
    });
    location.to_owned()
}

/// The first `max` lines of `text`, on one line.
fn excerpt(text: &str, max: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|line| !line.trim().is_empty()).collect();
    let mut out = lines.iter().take(max).copied().collect::<Vec<_>>().join(" | ");
    if lines.len() > max {
        out.push_str(" | …");
    }
    if out.is_empty() { "<empty>".to_owned() } else { out }
}

struct Sweeper {
    templates: Vec<Template>,
    root: PathBuf,
    key_file: PathBuf,
}

impl Sweeper {
    fn template(&self, kind: Kind) -> TestResult<&Template> {
        Ok(self
            .templates
            .iter()
            .find(|template| template.kind == kind)
            .ok_or_else(|| format!("no {} directory", kind.name()))?)
    }

    /// Makes a damaged copy of the case's directory at `dir`.
    fn damaged_copy(&self, case: &Case, dir: &Path) -> TestResult {
        common::copy_tree(&self.template(case.kind)?.dir, dir)?;
        case.damage
            .apply(&dir.join(&case.file))
            .map_err(|err| format!("cannot apply {}: {err}", case.describe()))?;
        Ok(())
    }

    fn run_case(&self, case: &Case, number: usize) -> TestResult<Outcome> {
        let open_dir = self.root.join(format!("case-{number}-open"));
        let verify_dir = self.root.join(format!("case-{number}-verify"));
        self.damaged_copy(case, &open_dir)?;
        self.damaged_copy(case, &verify_dir)?;
        let opened = Self::open(case.kind, &open_dir)?;
        let verified = self.verify(case.kind, &verify_dir)?;
        fs::remove_dir_all(&open_dir)?;
        fs::remove_dir_all(&verify_dir)?;
        let verdict = classify(&opened, &verified);
        Ok(Outcome { opened, verified, verdict })
    }

    /// Opens `dir` in a child, as the program would.
    fn open(kind: Kind, dir: &Path) -> TestResult<Opened> {
        let mut command = Command::new(env::current_exe()?);
        command
            .env(ROLE_VAR, ROLE_OPEN)
            .env(KIND_VAR, kind.name())
            .env(DIR_VAR, dir)
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null());
        let run = run_watched(command)?;
        let report = run.lines.iter().find_map(|line| parse_report(line));
        let exited_cleanly = run.status.is_some_and(|status| status.success());
        Ok(match report {
            Some(report) if exited_cleanly => report,
            Some(report) => Opened::Crashed {
                what: format!(
                    "{} after reporting: {}",
                    crash(run.status, &run.stderr),
                    report.summary()
                ),
                stderr: run.stderr,
            },
            None if run.status.and_then(|status| status.code()) == Some(2) => {
                return Err(format!("the child failed: {}", run.stderr).into());
            }
            None => Opened::Crashed { what: crash(run.status, &run.stderr), stderr: run.stderr },
        })
    }

    /// Runs `instastate verify` on `dir`.
    fn verify(&self, kind: Kind, dir: &Path) -> TestResult<Verified> {
        let mut command = Command::new(env!("CARGO_BIN_EXE_instastate"));
        command.arg("verify").arg(dir).env("RUST_BACKTRACE", "0").stdin(Stdio::null());
        if kind == Kind::Encrypted {
            command.arg("--key-file").arg(&self.key_file);
        }
        let run = run_watched(command)?;
        let stdout = run.lines.join("\n");
        let output = excerpt(&format!("{stdout}\n{}", run.stderr), 4);
        let code = run.status.and_then(|status| status.code());
        Ok(match code {
            Some(0) if stdout.contains(" is sound") => Verified::Sound(output),
            Some(1) if stdout.contains(" is NOT sound") => Verified::NotSound(output),
            Some(2) if run.stderr.contains("holds no instastate store") => {
                Verified::NoStore(output)
            }
            Some(0..=2) => Verified::Failed(output),
            _ => Verified::Crashed { what: crash(run.status, &run.stderr), output },
        })
    }
}

/// A child's report line, if `line` is one.
fn parse_report(line: &str) -> Option<Opened> {
    if let Some(what) = line.strip_prefix("EXACT ") {
        return Some(Opened::Exact(what.to_owned()));
    }
    if let Some(rest) = line.strip_prefix("OTHER ") {
        let (category, detail) = rest.split_once('\t')?;
        return Some(Opened::Other { category: category.to_owned(), detail: detail.to_owned() });
    }
    let mut parts = line.strip_prefix("ERROR ")?.splitn(3, '\t');
    let (variant, display, debug) = (parts.next()?, parts.next()?, parts.next()?);
    Some(Opened::Typed {
        variant: variant.to_owned(),
        display: display.to_owned(),
        debug: debug.to_owned(),
    })
}

// ---------------------------------------------------------------------------------
// The sweep
// ---------------------------------------------------------------------------------

fn sweep() -> TestResult {
    let started = Instant::now();
    let wide_var = env::var(WIDE_VAR).ok();
    let full = wide_var.as_deref() == Some("full");
    let wide: u64 = wide_var.and_then(|it| it.parse().ok()).unwrap_or(1).max(1);
    let workers: usize =
        env::var(WORKERS_VAR).ok().and_then(|it| it.parse().ok()).unwrap_or(DEFAULT_WORKERS).max(1);
    let only = env::var(ONLY_VAR).ok();
    let seed = env::var(SEED_VAR).ok().and_then(|seed| seed.parse().ok()).unwrap_or_else(|| {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        // Truncation is fine: any bits make a seed.
        #[allow(clippy::cast_possible_truncation)]
        let seed = (nanos as u64) ^ (u64::from(process::id()) << 32);
        seed
    });

    let root = temp_root()?;
    if env::var_os(KEEP_VAR).is_some() {
        println!("    keeping the undamaged directories in {}", root.path().display());
    }
    let key_file = root.path().join("key");
    fs::write(&key_file, KEY)?;
    let mut templates = Vec::new();
    for kind in Kind::ALL {
        templates.push(build_template(root.path(), kind)?);
    }
    let mut sampling = Sampling { full, wide, rng: XorShift::new(seed) };
    let mut cases = Vec::new();
    for template in &templates {
        cases.push(Case { kind: template.kind, file: String::new(), damage: Damage::None });
        println!("    {} directory:", template.kind.name());
        for (file, bytes) in &template.files {
            let last_save = template.last_save.as_ref().filter(|_| file == SLED_LOG);
            let damages = plan_file(bytes, last_save, &mut sampling);
            print!("      {file:<60} {:>7} B, {:>5} cases", bytes.len(), damages.len());
            match last_save {
                Some(range) => println!(" (the last save is at {}..{})", range.start, range.end),
                None => println!(),
            }
            cases.extend(damages.into_iter().map(|damage| Case {
                kind: template.kind,
                file: file.clone(),
                damage,
            }));
        }
    }
    if let Some(only) = &only {
        cases.retain(|case| {
            let text = format!("{} {}", case.attack(), case.describe());
            match only.strip_suffix('$') {
                Some(end) => text.ends_with(end),
                None => text.contains(only.as_str()),
            }
        });
        if cases.is_empty() {
            return Err(format!("{ONLY_VAR}={only:?} matches no case").into());
        }
    }
    println!(
        "    {} cases, {workers} side by side, sampling {}; seed {seed} (replay the sampled \
         offsets with {SEED_VAR}={seed}); built in {:.1} s",
        cases.len(),
        if full { "everything".to_owned() } else { format!("{wide}x") },
        started.elapsed().as_secs_f64()
    );

    let sweeper = Sweeper { templates, root: root.path().to_path_buf(), key_file };
    let outcomes = run_all(&sweeper, &cases, workers)?;
    let records: Vec<(&Case, &Outcome)> = cases.iter().zip(&outcomes).collect();
    print_table(&records);
    print_files(&sweeper, &records);
    println!("    sweep took {:.1} s", started.elapsed().as_secs_f64());
    if env::var_os(KEEP_VAR).is_some() {
        let _ = root.keep();
    }
    let bad: Vec<(&Case, &Outcome)> = records
        .iter()
        .copied()
        .filter(|(_, outcome)| matches!(outcome.verdict, Verdict::Bad { .. }))
        .collect();
    if bad.is_empty() {
        return Ok(());
    }
    Err(report_bad(&bad, seed).into())
}

/// The directory the cases are made in: `/dev/shm` when it exists and `TMPDIR` is
/// not set, since a case is mostly fsyncs otherwise.
fn temp_root() -> io::Result<tempfile::TempDir> {
    let builder = {
        let mut builder = tempfile::Builder::new();
        builder.prefix("instastate-corruption-");
        builder
    };
    let shm = Path::new("/dev/shm");
    if env::var_os("TMPDIR").is_none()
        && shm.is_dir()
        && let Ok(dir) = builder.tempdir_in(shm)
    {
        return Ok(dir);
    }
    builder.tempdir()
}

/// Runs every case, `workers` side by side, and returns their outcomes in order.
fn run_all(sweeper: &Sweeper, cases: &[Case], workers: usize) -> TestResult<Vec<Outcome>> {
    let verbose = env::var_os(VERBOSE_VAR).is_some();
    let started = Instant::now();
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let outcomes: Mutex<BTreeMap<usize, Outcome>> = Mutex::default();
    let last_progress = Mutex::new(Instant::now());
    thread::scope(|scope| -> TestResult {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| -> TestResult {
                    loop {
                        let idx = next.fetch_add(1, Ordering::Relaxed);
                        let Some(case) = cases.get(idx) else { return Ok(()) };
                        let outcome = sweeper
                            .run_case(case, idx)
                            .map_err(|err| format!("{}: {err}", case.describe()))?;
                        if verbose {
                            println!(
                                "    case {}: {}\n      open: {}\n      verify: {}",
                                case.describe(),
                                outcome.verdict.name(),
                                outcome.opened.detail(),
                                outcome.verified.output()
                            );
                        }
                        outcomes
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .insert(idx, outcome);
                        let finished = done.fetch_add(1, Ordering::Relaxed) + 1;
                        let mut last = last_progress.lock().unwrap_or_else(PoisonError::into_inner);
                        if last.elapsed() > Duration::from_secs(15) {
                            *last = Instant::now();
                            println!(
                                "    {finished} of {} cases in {:.0} s",
                                cases.len(),
                                started.elapsed().as_secs_f64()
                            );
                        }
                    }
                })
            })
            .collect();
        for handle in handles {
            handle.join().map_err(|_| "a sweep thread panicked")??;
        }
        Ok(())
    })?;
    Ok(outcomes.into_inner().unwrap_or_else(PoisonError::into_inner).into_values().collect())
}

#[derive(Default)]
struct Row {
    cases: u32,
    ok: u32,
    typed: u32,
    bad: u32,
    bad_open: u32,
    bad_verify: u32,
}

impl Row {
    fn add(&mut self, verdict: &Verdict) {
        self.cases += 1;
        match verdict {
            Verdict::Ok => self.ok += 1,
            Verdict::Typed => self.typed += 1,
            Verdict::Bad { open, verify } => {
                self.bad += 1;
                self.bad_open += u32::from(*open);
                self.bad_verify += u32::from(*verify);
            }
        }
    }
}

fn print_table(records: &[(&Case, &Outcome)]) {
    let mut rows: BTreeMap<(Kind, usize), Row> = BTreeMap::new();
    let mut families: BTreeMap<usize, Row> = BTreeMap::new();
    let mut total = Row::default();
    for (case, outcome) in records {
        let family = FAMILIES.iter().position(|&it| it == case.damage.family()).unwrap_or(0);
        rows.entry((case.kind, family)).or_default().add(&outcome.verdict);
        families.entry(family).or_default().add(&outcome.verdict);
        total.add(&outcome.verdict);
    }
    println!(
        "\n    attack               | cases |    ok | typed error |   BAD | BAD open | BAD verify"
    );
    println!(
        "    ---------------------|-------|-------|-------------|-------|----------|-----------"
    );
    let line = |name: &str, row: &Row| {
        println!(
            "    {name:<20} | {:>5} | {:>5} | {:>11} | {:>5} | {:>8} | {:>10}",
            row.cases, row.ok, row.typed, row.bad, row.bad_open, row.bad_verify
        );
    };
    for ((kind, family), row) in &rows {
        let family = FAMILIES.get(*family).copied().unwrap_or_default();
        line(&format!("{}/{family}", kind.name()), row);
    }
    for (family, row) in &families {
        let family = FAMILIES.get(*family).copied().unwrap_or_default();
        line(&format!("total {family}"), row);
    }
    line("total", &total);
    println!(
        "    (a BAD case counts under BAD open when the open went wrong, under BAD verify \
         when verify did, or under both)"
    );
}

/// What happened to one file's cases.
#[derive(Default)]
struct FileOutcomes {
    row: Row,
    /// How many cases each outcome of the open and of verify had.
    opened: BTreeMap<String, u32>,
    verified: BTreeMap<String, u32>,
}

/// What happened to each file: its cases, and the outcomes of the open and of verify.
fn print_files(sweeper: &Sweeper, records: &[(&Case, &Outcome)]) {
    let mut files: BTreeMap<(Kind, &str), FileOutcomes> = BTreeMap::new();
    for (case, outcome) in records {
        let entry = files.entry((case.kind, case.file.as_str())).or_default();
        entry.row.add(&outcome.verdict);
        *entry.opened.entry(outcome.opened.summary()).or_default() += 1;
        *entry.verified.entry(outcome.verified.summary()).or_default() += 1;
    }
    let counts = |counts: &BTreeMap<String, u32>| {
        let mut sorted: Vec<(&String, &u32)> = counts.iter().collect();
        sorted.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        sorted.iter().map(|(what, n)| format!("{n} {what}")).collect::<Vec<_>>().join(", ")
    };
    println!("\n    per file: cases (ok / typed error / BAD), then what the open and verify said");
    for ((kind, file), outcomes) in &files {
        let size = sweeper
            .template(*kind)
            .ok()
            .and_then(|template| template.files.iter().find(|(it, _)| it == file))
            .map_or(String::new(), |(_, bytes)| format!(" ({} B)", bytes.len()));
        let file = if file.is_empty() { "(undamaged)" } else { file };
        let row = &outcomes.row;
        println!(
            "    {} {file}{size}: {} cases ({} / {} / {})\n      open:   {}\n      verify: {}",
            kind.name(),
            row.cases,
            row.ok,
            row.typed,
            row.bad,
            counts(&outcomes.opened),
            counts(&outcomes.verified)
        );
    }
}

/// The BAD cases grouped by cause: for each, the cases listed compactly (positions
/// as ranges), and one in full.
fn report_bad(bad: &[(&Case, &Outcome)], seed: u64) -> String {
    type Positions = BTreeMap<(Kind, String, String), Vec<u64>>;
    let mut causes: BTreeMap<String, (Positions, (&Case, &Outcome), u32)> = BTreeMap::new();
    for &(case, outcome) in bad {
        let cause =
            format!("open: {}; verify: {}", outcome.opened.summary(), outcome.verified.summary());
        let entry = causes.entry(cause).or_insert_with(|| (Positions::new(), (case, outcome), 0));
        let (what, at) = case.damage.split();
        entry.0.entry((case.kind, case.file.clone(), what)).or_default().extend(at);
        entry.2 += 1;
    }
    let mut out = format!("{} BAD case(s), {} cause(s):", bad.len(), causes.len());
    let mut sorted: Vec<_> = causes.iter().collect();
    sorted.sort_by(|a, b| b.1.2.cmp(&a.1.2).then(a.0.cmp(b.0)));
    for (cause, (positions, (case, outcome), count)) in sorted {
        let _ = write!(out, "\n\n* {cause}\n  {count} case(s):");
        for ((kind, file, what), at) in positions {
            let file = if file.is_empty() { "-" } else { file };
            let at = if at.is_empty() { String::new() } else { format!(" {}", ranges(at)) };
            let _ = write!(out, "\n    {} {file}: {what}{at}", kind.name());
        }
        let _ = write!(
            out,
            "\n  e.g. {} (replay: {SEED_VAR}={seed} {ONLY_VAR}='{}$')\n    open: {}\n    verify: {}",
            case.describe(),
            case.describe(),
            outcome.opened.detail(),
            outcome.verified.output()
        );
    }
    out
}

/// Sorted numbers as ranges: `1..=3, 7, 9..=10`.
fn ranges(numbers: &[u64]) -> String {
    let sorted: BTreeSet<u64> = numbers.iter().copied().collect();
    let mut out: Vec<String> = Vec::new();
    let mut run: Option<(u64, u64)> = None;
    for number in sorted {
        run = match run {
            Some((first, last)) if last + 1 == number => Some((first, number)),
            Some((first, last)) => {
                out.push(if first == last {
                    first.to_string()
                } else {
                    format!("{first}..={last}")
                });
                Some((number, number))
            }
            None => Some((number, number)),
        };
    }
    if let Some((first, last)) = run {
        out.push(if first == last { first.to_string() } else { format!("{first}..={last}") });
    }
    out.join(", ")
}
