//! Fault sweeps under an `LD_PRELOAD` shim: the Nth write, fsync or rename of a real
//! child process fails (or kills it), and the store must still open, whole.
//!
//! sled's own files bypass instastate's I/O code, so their failures can only be
//! injected into the real system calls. `tests/shim/fault.c` is built at run time
//! with `cc` and preloaded into a child; it fails or kills the Nth matching call on
//! files under the case's directory (see the comment at its top).
//!
//! This binary has no libtest harness (`harness = false`): it is both the test runner
//! and, when started by itself with `INSTASTATE_FAULT_SHIM_ROLE` set, the child.
//! Command-line arguments are ignored, except `--list`.
//!
//! `fault_shim::sweep`: for every child role (`save`, `compact`, `backup`, `reopen`,
//! `journal`), every operation (`write`, `fsync`, `rename`) and every action (`eio`,
//! `enospc`, `kill`, and `eio-sticky`, where every later matching call fails too: a
//! dead disk), a clean run first counts the matching calls, then N = 1, 2, 3, ...
//! (with a stride when a row would not fit the time budget) runs a child on a fresh
//! copy of a clean store until a run ends without the fault firing. After each run
//! the store is reopened here, without the shim, and the case is classified:
//! - `ok`: the store opens holding the last acknowledged generation or the one after
//!   it, every cell of one generation (and a backup, if one exists, whole);
//! - `typed error`: the first reopen fails with a typed error and a second one opens
//!   the store, whole;
//! - `BAD`: the child panicked, aborted or hung; the reopen panicked; the store holds
//!   less than was acknowledged, or a mix; or it cannot be opened at all.
//!
//! The child prints `ACK <generation>` after each operation that returned `Ok`,
//! `REPORTED <error>` for each error the store reports to its background error hook
//! (those of its drop), exits 0 when it is done, and 2 when an operation returned an
//! error. The table at the end also counts, as `unreported`, ok cases where an
//! injected error fired and the child still finished without an error returned or
//! reported; the notes list panics the child caught.
//!
//! Run it with `cargo test --test fault_shim` (about 1.5 minutes in a debug build
//! on 2 cores); it needs `cc`.
//!
//! It found three faults of sled 0.34 that the library now works around (see
//! `src/backend/sled.rs`): an interrupted sled snapshot (`snap.*.generating`) left a
//! store that never opened again; sled unwraps the fsync of its log when dropped, so
//! after a failed fsync dropping a `Store` (or the temporary engines of `compact` and
//! `backup_to`) panicked, or aborted during unwinding; and a failed write of sled's
//! log could leave `save_all` waiting forever.
//!
//! Environment: `INSTASTATE_FAULT_SHIM_ONLY` runs only the attacks whose name
//! (`role/op/action`) contains it; `INSTASTATE_FAULT_SHIM_N` runs only that N (no
//! stride); `INSTASTATE_FAULT_SHIM_SEED` replays the offsets of subsampled rows;
//! `INSTASTATE_FAULT_SHIM_BUDGET` sets the time budget in seconds.

mod common;

use std::{
    collections::BTreeMap,
    env,
    fmt::Write as _,
    fs, io,
    io::Write as _,
    os::unix::process::ExitStatusExt,
    panic::{self, AssertUnwindSafe},
    path::{Path, PathBuf},
    process::{self, Command, ExitCode, ExitStatus, Stdio},
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use instastate::{CellOptions, Prevalent, StateCell, Store, Timestamp};
use serde::{Deserialize, Serialize};

use crate::common::{Test, TestResult, Watched, XorShift};

/// Selects the child role; unset in the parent.
const ROLE_VAR: &str = "INSTASTATE_FAULT_SHIM_ROLE";
/// The case directory a child works in: the store is `store/` in it.
const DIR_VAR: &str = "INSTASTATE_FAULT_SHIM_DIR";
const ONLY_VAR: &str = "INSTASTATE_FAULT_SHIM_ONLY";
const N_VAR: &str = "INSTASTATE_FAULT_SHIM_N";
const SEED_VAR: &str = "INSTASTATE_FAULT_SHIM_SEED";
const BUDGET_VAR: &str = "INSTASTATE_FAULT_SHIM_BUDGET";

/// The shim's configuration variables (see `tests/shim/fault.c`).
const FAULT_OP: &str = "INSTASTATE_FAULT_OP";
const FAULT_NTH: &str = "INSTASTATE_FAULT_NTH";
const FAULT_ACTION: &str = "INSTASTATE_FAULT_ACTION";
const FAULT_STICKY: &str = "INSTASTATE_FAULT_STICKY";
const FAULT_DIR: &str = "INSTASTATE_FAULT_DIR";
const FAULT_LOG: &str = "INSTASTATE_FAULT_LOG";

const ROLES: [&str; 5] = ["save", "compact", "backup", "reopen", "journal"];
const OPS: [&str; 3] = ["write", "fsync", "rename"];

/// How a fault acts: the shim's action, and whether later calls fail too.
#[derive(Clone, Copy)]
struct Action {
    name: &'static str,
    shim: &'static str,
    sticky: bool,
}

const ACTIONS: [Action; 4] = [
    Action { name: "eio", shim: "eio", sticky: false },
    Action { name: "enospc", shim: "enospc", sticky: false },
    Action { name: "kill", shim: "kill", sticky: false },
    Action { name: "eio-sticky", shim: "eio", sticky: true },
];

/// At most this many values of N per row; rows with more matching calls are
/// subsampled with a stride.
const ROW_CAP: u64 = 60;
/// What the whole sweep may take, estimated from the clean runs, unless
/// `INSTASTATE_FAULT_SHIM_BUDGET` says otherwise.
const DEFAULT_BUDGET: Duration = Duration::from_secs(150);
/// How long a child may print nothing before it counts as hung. A whole run takes
/// well under a second.
const CHILD_PATIENCE: Duration = Duration::from_secs(10);
/// How long a child that closed its stdout may take to exit.
const EXIT_GRACE: Duration = Duration::from_secs(5);
/// Runs after the last counted call that still fire end a row's sweep anyway.
const EXTRA_RUNS: u64 = 10;
/// Rows swept side by side.
const WORKERS: usize = 2;

fn main() -> ExitCode {
    if let Ok(role) = env::var(ROLE_VAR) {
        return child_main(&role);
    }
    let tests: [Test; 1] = [("fault_shim::sweep", sweep)];
    common::run(&tests)
}

// ---------------------------------------------------------------------------------
// The store
// ---------------------------------------------------------------------------------

/// In generation `g`, `NUMBER` is `g`, `TEXT` is `text(g)` and `BIG` is `big(g)`.
static NUMBER: StateCell<u64> = StateCell::new("fault_shim::NUMBER", || u64::MAX);
static TEXT: StateCell<String> = StateCell::new("fault_shim::TEXT", String::new);
/// About 6 KiB encoded: saved to a value file.
static BIG: StateCell<Vec<u64>> = StateCell::new("fault_shim::BIG", Vec::new);
/// A journaled cell: after `n` events it holds the events `1..=n`.
// Not `defstate!`: nothing here uses the global registry.
static LEDGER: StateCell<Ledger> =
    StateCell::with_options("fault_shim::LEDGER", Ledger::default, CellOptions::new().journaled());

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

/// The plain generation the template store holds.
const BASE: u64 = 2;
/// The events the template store's ledger holds.
const BASE_EVENTS: u64 = 2;
/// The saves of the `save` role.
const SAVES: u64 = 3;
/// The events the `journal` role handles before its `save_all`, and after it.
const EVENTS_BEFORE: u64 = 3;
const EVENTS_AFTER: u64 = 2;
const BIG_LEN: u64 = 1_000;

/// Opens the store, whose background errors (those of its drop among them) the
/// child prints as `REPORTED <error>`.
fn open_store(dir: &Path) -> instastate::Result<Store> {
    let store = Store::builder().cell(&NUMBER).cell(&TEXT).cell(&BIG).cell(&LEDGER).open(dir)?;
    store.on_background_error(|err| {
        let mut out = io::stdout().lock();
        let _ = writeln!(out, "REPORTED {err}").and_then(|()| out.flush());
    });
    Ok(store)
}

fn text(generation: u64) -> String {
    format!("generation {generation}")
}

fn big(generation: u64) -> Vec<u64> {
    // Each element names its generation and its index, and encodes to 6 bytes.
    (0..BIG_LEN + generation).map(|idx| (generation << 40) | idx).collect()
}

fn set_generation(generation: u64) {
    instastate::atomically(|| {
        NUMBER.set(generation);
        TEXT.set(text(generation));
        BIG.set(big(generation));
    });
}

/// Sets every cell to a value no generation has, so that a reopen that loads
/// nothing cannot pass for one that loads the right values.
fn poison_cells() {
    NUMBER.set(u64::MAX);
    TEXT.set("poisoned".to_owned());
    BIG.set(vec![u64::MAX]);
    LEDGER.set(Ledger { events: vec![u64::MAX] });
}

/// The generation the plain cells hold, if they hold one whole generation.
fn plain_generation() -> Result<u64, String> {
    let generation = NUMBER.get();
    let mut wrong = String::new();
    let found_text = TEXT.get();
    if found_text != text(generation) {
        let _ = write!(wrong, " TEXT is {found_text:?};");
    }
    let found_big = BIG.read();
    if *found_big != big(generation) {
        let _ = write!(
            wrong,
            " BIG has {} elements (generation {generation} has {}), the first of generation {:?};",
            found_big.len(),
            BIG_LEN + generation,
            found_big.first().map(|first| first >> 40)
        );
    }
    if wrong.is_empty() {
        Ok(generation)
    } else {
        Err(format!("cells are not one whole generation (NUMBER is {generation}):{wrong}"))
    }
}

/// How many events the ledger holds, if it holds exactly the events `1..=n`.
fn ledger_events() -> Result<u64, String> {
    LEDGER.with(|ledger| {
        let whole = ledger.events.iter().zip(1..).all(|(&event, expected)| event == expected);
        if whole {
            Ok(ledger.events.len() as u64)
        } else {
            Err(format!("the ledger is not the events 1..=n: {:?}", ledger.events))
        }
    })
}

// ---------------------------------------------------------------------------------
// Children
// ---------------------------------------------------------------------------------

fn child_main(role: &str) -> ExitCode {
    let result = env::var_os(DIR_VAR)
        .map(PathBuf::from)
        .ok_or_else(|| format!("{DIR_VAR} is not set").into())
        .and_then(|dir| match role {
            "save" => child_save(&dir),
            "compact" => child_compact(&dir),
            "backup" => child_backup(&dir),
            "reopen" => child_reopen(&dir),
            "journal" => child_journal(&dir),
            other => Err(format!("unknown child role `{other}`").into()),
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("child `{role}` failed: {err}\n  debug: {err:?}");
            ExitCode::from(2)
        }
    }
}

/// Reports that an operation returned `Ok`.
fn ack(generation: u64) -> TestResult {
    let mut out = io::stdout().lock();
    writeln!(out, "ACK {generation}")?;
    out.flush()?;
    Ok(())
}

/// Saves generations `BASE + 1 ..= BASE + SAVES`.
fn child_save(dir: &Path) -> TestResult {
    let store = open_store(&dir.join("store"))?;
    for generation in BASE + 1..=BASE + SAVES {
        set_generation(generation);
        store.save_all()?;
        ack(generation)?;
    }
    drop(store);
    Ok(())
}

fn child_compact(dir: &Path) -> TestResult {
    let store = open_store(&dir.join("store"))?;
    store.compact()?;
    ack(BASE)?;
    drop(store);
    Ok(())
}

fn child_backup(dir: &Path) -> TestResult {
    let store = open_store(&dir.join("store"))?;
    store.backup_to(dir.join("backup"))?;
    ack(BASE)?;
    drop(store);
    Ok(())
}

fn child_reopen(dir: &Path) -> TestResult {
    let store = open_store(&dir.join("store"))?;
    ack(BASE)?;
    drop(store);
    Ok(())
}

/// Handles events `BASE_EVENTS + 1 ..`, acknowledging the number of events after
/// each, with a `save_all` (a snapshot of the ledger) in between.
fn child_journal(dir: &Path) -> TestResult {
    let store = open_store(&dir.join("store"))?;
    let mut events = BASE_EVENTS;
    for _ in 0..EVENTS_BEFORE {
        events = LEDGER.handle(events + 1)?;
        ack(events)?;
    }
    store.save_all()?;
    ack(events)?;
    for _ in 0..EVENTS_AFTER {
        events = LEDGER.handle(events + 1)?;
        ack(events)?;
    }
    drop(store);
    Ok(())
}

/// What a role acknowledges, and what its generations are about.
struct Expect {
    /// The plain generation and ledger events before the child starts.
    plain: u64,
    events: u64,
    /// The ACK lines of a whole run, in order.
    acks: Vec<u64>,
    /// Whether the ACKs name plain generations (else ledger events).
    acks_plain: bool,
}

fn expect(role: &str) -> Expect {
    match role {
        "save" => Expect {
            plain: BASE,
            events: BASE_EVENTS,
            acks: (BASE + 1..=BASE + SAVES).collect(),
            acks_plain: true,
        },
        "journal" => {
            let before = BASE_EVENTS + 1..=BASE_EVENTS + EVENTS_BEFORE;
            let saved = BASE_EVENTS + EVENTS_BEFORE;
            let after = saved + 1..=saved + EVENTS_AFTER;
            Expect {
                plain: BASE,
                events: BASE_EVENTS,
                acks: before.chain([saved]).chain(after).collect(),
                acks_plain: false,
            }
        }
        _ => Expect { plain: BASE, events: BASE_EVENTS, acks: vec![BASE], acks_plain: true },
    }
}

// ---------------------------------------------------------------------------------
// The sweep
// ---------------------------------------------------------------------------------

/// Where a parent-side panic's message goes, for the report.
static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);

fn sweep() -> TestResult {
    let started = Instant::now();
    let default_hook = panic::take_hook();
    panic::set_hook(Box::new(move |info| {
        *LAST_PANIC.lock().unwrap_or_else(PoisonError::into_inner) = Some(info.to_string());
        if !REOPENING.with(std::cell::Cell::get) {
            default_hook(info);
        }
    }));
    let only = env::var(ONLY_VAR).ok();
    let pinned: Option<u64> = env::var(N_VAR).ok().and_then(|n| n.parse().ok());
    let budget = env::var(BUDGET_VAR)
        .ok()
        .and_then(|secs| secs.parse().ok())
        .map_or(DEFAULT_BUDGET, Duration::from_secs);
    let seed = env::var(SEED_VAR).ok().and_then(|seed| seed.parse().ok()).unwrap_or_else(|| {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        // Truncation is fine: any bits make a seed.
        #[allow(clippy::cast_possible_truncation)]
        let seed = (nanos as u64) ^ (u64::from(process::id()) << 32);
        seed
    });
    let mut rng = XorShift::new(seed);

    let root = tempfile::tempdir()?;
    // The shim compares the paths it sees, which are canonical, with this one.
    let root_path = root.path().canonicalize()?;
    let shim = build_shim(&root_path)?;
    let template = root_path.join("template");
    make_template(&template.join("store"))?;
    let sweeper = Sweeper { shim, template, root: root_path, next_case: AtomicU64::new(0) };
    sweeper.sanity()?;

    // Clean runs: count each role's matching calls per operation, and time them.
    let mut rows = Vec::new();
    for role in ROLES {
        for op in OPS {
            let attacks: Vec<Action> = ACTIONS
                .into_iter()
                .filter(|action| {
                    only.as_deref().is_none_or(|only| attack_name(role, op, action).contains(only))
                })
                .collect();
            if attacks.is_empty() {
                continue;
            }
            let (calls, took) = sweeper.calibrate(role, op)?;
            for action in attacks {
                rows.push(Plan { role, op, action, calls, took, stride: 1, offset: 1 });
            }
        }
    }
    if rows.is_empty() {
        return Err(format!("{ONLY_VAR}={only:?} matches no attack").into());
    }
    plan_strides(&mut rows, budget, &mut rng);
    println!(
        "    {} attacks; clean runs took {:.1} s; seed {seed} (replay the subsampling with {SEED_VAR}={seed})",
        rows.len(),
        started.elapsed().as_secs_f64()
    );
    for plan in rows.iter().filter(|plan| plan.stride > 1) {
        println!(
            "    subsampled {}: {} matching calls, N = {}, {}, ... (every {})",
            attack_name(plan.role, plan.op, &plan.action),
            plan.calls,
            plan.offset,
            plan.offset + plan.stride,
            plan.stride
        );
    }

    let swept = sweep_rows(&sweeper, &rows, pinned)?;

    let table: Vec<&Row> = swept.iter().map(|it| &it.row).collect();
    print_table(&table);
    let mut notes: BTreeMap<&str, (&str, u32)> = BTreeMap::new();
    for (key, example) in swept.iter().flat_map(|it| &it.notes) {
        notes.entry(key).or_insert((example, 0)).1 += 1;
    }
    if !notes.is_empty() {
        println!("\n    notes (not failures; the first case and the count of each kind):");
        for (key, (example, count)) in &notes {
            println!("    - {key} ({count}x), e.g. {example}");
        }
    }
    let unended: Vec<&str> =
        table.iter().filter(|row| row.unended).map(|row| row.attack.as_str()).collect();
    let bad_cases: Vec<&BadCase> = swept.iter().flat_map(|it| &it.bad).collect();
    println!("    sweep took {:.1} s", started.elapsed().as_secs_f64());
    if bad_cases.is_empty() && unended.is_empty() {
        return Ok(());
    }
    Err(report_bad(&bad_cases, &unended).into())
}

/// Sweeps `rows` with `WORKERS` threads side by side (the children mostly wait for
/// fsyncs), and returns what each found, in order. Reopening is serialized: the
/// cells are process-wide statics.
fn sweep_rows(sweeper: &Sweeper, rows: &[Plan], pinned: Option<u64>) -> TestResult<Vec<Swept>> {
    let next_row = AtomicUsize::new(0);
    let swept: Mutex<BTreeMap<usize, Swept>> = Mutex::default();
    thread::scope(|scope| -> TestResult {
        let workers: Vec<_> = (0..WORKERS)
            .map(|_| {
                scope.spawn(|| -> TestResult {
                    loop {
                        let idx = next_row.fetch_add(1, Ordering::Relaxed);
                        let Some(plan) = rows.get(idx) else { return Ok(()) };
                        let row = sweep_row(sweeper, plan, pinned)?;
                        let done = &row.row;
                        println!(
                            "    {:<28} {:>3} cases: {:>3} ok, {:>3} typed error, {:>3} BAD",
                            done.attack, done.cases, done.ok, done.typed, done.bad
                        );
                        swept.lock().unwrap_or_else(PoisonError::into_inner).insert(idx, row);
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.join().map_err(|_| "a sweep thread panicked")??;
        }
        Ok(())
    })?;
    Ok(swept.into_inner().unwrap_or_else(PoisonError::into_inner).into_values().collect())
}

/// What sweeping one row found.
struct Swept {
    row: Row,
    bad: Vec<BadCase>,
    /// Notes by kind, with the case each was first seen in.
    notes: Vec<(String, String)>,
}

/// Runs N = offset, offset + stride, ... of one row until the fault no longer fires
/// (or only `pinned`).
fn sweep_row(sweeper: &Sweeper, plan: &Plan, pinned: Option<u64>) -> TestResult<Swept> {
    let attack = attack_name(plan.role, plan.op, &plan.action);
    let mut swept =
        Swept { row: Row { attack, ..Row::default() }, bad: Vec::new(), notes: Vec::new() };
    let row = &mut swept.row;
    let stride = if pinned.is_some() { 1 } else { plan.stride };
    let mut nth = pinned.unwrap_or(plan.offset);
    loop {
        let case = Case { role: plan.role, op: plan.op, action: plan.action, nth };
        let outcome = sweeper.run_case(&case)?;
        row.cases += 1;
        match outcome.verdict {
            Verdict::Ok => row.ok += 1,
            Verdict::Typed(_) => row.typed += 1,
            Verdict::Bad(what) => {
                row.bad += 1;
                let kind = signature(&what, &outcome.stderr, outcome.fired.as_deref());
                swept.bad.push(BadCase {
                    attack: row.attack.clone(),
                    nth,
                    what,
                    kind,
                    fired: outcome.fired.clone(),
                    stderr: outcome.stderr,
                });
            }
        }
        if let Some(note) = outcome.note {
            row.unreported += u32::from(note.starts_with("unreported"));
            let key = format!("{}: {}", row.attack, blur(&note));
            swept.notes.push((key, format!("N={nth}: {note}")));
        }
        let ended = outcome.fired.is_none() || pinned.is_some();
        if ended || plan.calls + EXTRA_RUNS < nth {
            row.unended = !ended;
            return Ok(swept);
        }
        // Past the clean run's count, every N is tried until the fault stops firing.
        nth += if plan.calls < nth { 1 } else { stride };
    }
}

fn attack_name(role: &str, op: &str, action: &Action) -> String {
    format!("{role}/{op}/{}", action.name)
}

/// One row of the sweep as planned.
struct Plan {
    role: &'static str,
    op: &'static str,
    action: Action,
    /// The matching calls of the clean run, and how long that run took.
    calls: u64,
    took: Duration,
    stride: u64,
    offset: u64,
}

/// Chooses each row's stride so that the sweep fits `budget`, estimating a run
/// by its clean run (an upper bound: most faults end a run early). A subsampled row starts at a random offset within its stride.
fn plan_strides(rows: &mut [Plan], budget: Duration, rng: &mut XorShift) {
    let estimate = |rows: &[Plan], cap: u64| -> Duration {
        rows.iter()
            .map(|plan| {
                let runs = (plan.calls + 1).div_ceil((plan.calls + 1).div_ceil(cap));
                plan.took * u32::try_from(runs + 1).unwrap_or(u32::MAX)
            })
            .sum::<Duration>()
            / u32::try_from(WORKERS).unwrap_or(1)
    };
    let mut cap = ROW_CAP;
    while cap > 4 && estimate(rows, cap) > budget {
        cap -= 1;
    }
    for plan in rows {
        plan.stride = (plan.calls + 1).div_ceil(cap).max(1);
        plan.offset = 1 + rng.below(plan.stride);
    }
}

#[derive(Default)]
struct Row {
    attack: String,
    cases: u32,
    ok: u32,
    typed: u32,
    bad: u32,
    /// Cases where an injected error fired and the child still acknowledged everything.
    unreported: u32,
    /// Whether the sweep stopped with the fault still firing.
    unended: bool,
}

fn print_table(table: &[&Row]) {
    let mut total = Row { attack: "total".to_owned(), ..Row::default() };
    for row in table {
        total.cases += row.cases;
        total.ok += row.ok;
        total.typed += row.typed;
        total.bad += row.bad;
        total.unreported += row.unreported;
    }
    println!("\n    attack                       | cases |  ok | typed error | BAD | unreported");
    println!("    -----------------------------|-------|-----|-------------|-----|-----------");
    for row in table.iter().copied().chain([&total]) {
        println!(
            "    {:<28} | {:>5} | {:>3} | {:>11} | {:>3} | {:>10}",
            row.attack, row.cases, row.ok, row.typed, row.bad, row.unreported
        );
    }
    println!(
        "    (unreported: counted as ok, but an injected error fired and the child still \
         acknowledged every operation, reported nothing and exited 0)"
    );
}

struct BadCase {
    attack: String,
    nth: u64,
    what: String,
    /// What groups it with cases of the same finding: see `signature`.
    kind: String,
    fired: Option<String>,
    stderr: String,
}

fn report_bad(bad_cases: &[&BadCase], unended: &[&str]) -> String {
    let mut out = format!("{} BAD case(s):", bad_cases.len());
    for case in bad_cases {
        let _ = write!(out, "\n  {} N={}: {}", case.attack, case.nth, first_line(&case.what));
    }
    let mut kinds: BTreeMap<&str, (&BadCase, u32)> = BTreeMap::new();
    for case in bad_cases {
        kinds.entry(&case.kind).or_insert((case, 0)).1 += 1;
    }
    let _ = write!(out, "\n\n{} distinct finding(s), one case each:", kinds.len());
    for (kind, (case, count)) in &kinds {
        let _ = write!(
            out,
            "\n\n* {kind}\n  {count} case(s), e.g. {} N={} (replay: {ONLY_VAR}={} {N_VAR}={})\n  {}\n  fault: {}\n  child stderr:\n{}",
            case.attack,
            case.nth,
            case.attack,
            case.nth,
            case.what.replace('\n', "\n  "),
            case.fired.as_deref().unwrap_or("did not fire"),
            indent(&stderr_excerpt(&case.stderr), "    | ")
        );
    }
    if !unended.is_empty() {
        let _ = write!(
            out,
            "\n\nsweeps that stopped with the fault still firing {EXTRA_RUNS} runs past the clean \
             run's count: {}",
            unended.join(", ")
        );
    }
    out
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}

/// A finding's kind, to group the cases of one bug. A panic is grouped by where it
/// happened: the location of the last panic with a backtrace (a panic caught in
/// the child may come before the one that ended it), and its first two frames in
/// instastate or this test. Anything else by what went wrong and which call on
/// which file the fault hit. Numbers and temporary names are blurred.
fn signature(what: &str, stderr: &str, fired: Option<&str>) -> String {
    let what = first_line(what);
    // When the child panicked matters less than where.
    let what = what.split(ACK_SEPARATOR).next().unwrap_or(what);
    let mut kind = blur(what);
    let panics = stderr.split("panicked at ").skip(1).filter_map(|panic| {
        let location = first_line(panic).trim_end_matches(':');
        let frames: Vec<&str> = panic
            .lines()
            .filter_map(|line| {
                let (_, function) = line.trim_start().split_once(": ")?;
                let name = function.trim_start_matches('<');
                let ours = name.starts_with("instastate::") || name.starts_with("fault_shim::");
                ours.then_some(function)
            })
            .take(2)
            .collect();
        (!location.starts_with("/rustc/") && !frames.is_empty()).then_some((location, frames))
    });
    if let Some((location, frames)) = panics.last() {
        let short = location.rsplit_once("/src/").map_or(location, |(_, file)| file);
        let _ = write!(kind, "; panicked at {short} in {}", frames.join(" <- "));
        return kind;
    }
    if let Some(fired) = fired {
        // `fired <call> <n> <path>[ -> <path>]`: the call, and the paths below the
        // case directory.
        let mut words = fired.split(' ').skip(1);
        let call = words.next().unwrap_or_default();
        let paths: Vec<String> = words
            .skip(1)
            .filter(|word| *word != "->")
            .map(|path| {
                let below = path
                    .split_once("/case-")
                    .map_or(path, |(_, rest)| rest.split_once('/').map_or("", |(_, below)| below));
                below.split('/').map(blur_name).collect::<Vec<_>>().join("/")
            })
            .collect();
        let _ = write!(kind, "; fault on {call} {}", paths.join(" -> "));
    }
    kind
}

/// `text` with digits blurred to `#`, and absolute paths to `<path>`.
fn blur(text: &str) -> String {
    let mut out = String::new();
    for word in text.split(' ') {
        if !out.is_empty() {
            out.push(' ');
        }
        if word.starts_with('/') || word.starts_with("`/") {
            out.push_str("<path>");
        } else {
            out.extend(word.chars().map(|c| if c.is_ascii_digit() { '#' } else { c }));
        }
    }
    out
}

/// A file name with its generated parts blurred: the random suffix of a backup's
/// temporary directory, the LSN of a sled snapshot, and any digits.
fn blur_name(name: &str) -> String {
    if name.starts_with(".instastate-backup-") {
        return ".instastate-backup-*".to_owned();
    }
    if let Some(rest) = name.strip_prefix("snap.") {
        let suffix = rest.split_once('.').map_or("", |(_, suffix)| suffix);
        return if suffix.is_empty() {
            "snap.<lsn>".to_owned()
        } else {
            format!("snap.<lsn>.{suffix}")
        };
    }
    name.chars().map(|c| if c.is_ascii_digit() { '#' } else { c }).collect()
}

fn indent(text: &str, prefix: &str) -> String {
    text.lines().map(|line| format!("{prefix}{line}")).collect::<Vec<_>>().join("\n")
}

/// The part of a child's stderr worth reading: its messages, and the backtrace
/// frames in sled, instastate and this test, each with its location.
fn stderr_excerpt(stderr: &str) -> String {
    const MAX_LINES: usize = 24;
    let mut kept: Vec<String> = Vec::new();
    // Whether the last frame was kept, so that its `at` line goes with it.
    let mut keeping = false;
    for line in stderr.lines() {
        let trimmed = line.trim_start();
        let frame = trimmed.split_once(": ").and_then(|(number, function)| {
            let numbered = !number.is_empty() && number.chars().all(|c| c.is_ascii_digit());
            numbered.then_some(function)
        });
        if let Some(function) = frame {
            let function = function.trim_start_matches('<');
            keeping = ["sled::", "instastate::", "fault_shim::"]
                .iter()
                .any(|name| function.starts_with(name));
            if keeping {
                kept.push(format!("  {trimmed}"));
            }
        } else if let Some(location) = trimmed.strip_prefix("at ") {
            if keeping {
                let short = location.rsplit_once("/src/").map_or(location, |(_, file)| file);
                if let Some(last) = kept.last_mut() {
                    let _ = write!(last, "  ({short})");
                }
            }
        } else if !trimmed.is_empty()
            && !trimmed.starts_with("stack backtrace")
            && !trimmed.starts_with("note: ")
        {
            kept.push(line.to_owned());
        }
    }
    if kept.len() > MAX_LINES {
        kept.truncate(MAX_LINES);
        kept.push("…".to_owned());
    }
    if kept.is_empty() { "<empty>".to_owned() } else { kept.join("\n") }
}

// ---------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------

struct Sweeper {
    shim: PathBuf,
    template: PathBuf,
    root: PathBuf,
    next_case: AtomicU64,
}

struct Case {
    role: &'static str,
    op: &'static str,
    action: Action,
    nth: u64,
}

/// What one child run did.
struct Run {
    acks: Vec<u64>,
    /// `None` when it hung and was killed.
    status: Option<ExitStatus>,
    stderr: String,
    unexpected: Vec<String>,
    /// Errors the store reported to its background error hook.
    reported: Vec<String>,
    /// The shim's first `fired` line, if the fault fired.
    fired: Option<String>,
    /// The matching calls, from the shim's `calls` line (written only at a normal exit).
    calls: Option<u64>,
}

enum Verdict {
    Ok,
    Typed(String),
    Bad(String),
}

struct Outcome {
    verdict: Verdict,
    fired: Option<String>,
    stderr: String,
    /// Something worth knowing that is not a failure.
    note: Option<String>,
}

impl Sweeper {
    /// A fresh case directory holding a copy of the template store.
    fn new_case(&self) -> TestResult<PathBuf> {
        let case = self.next_case.fetch_add(1, Ordering::Relaxed) + 1;
        let dir = self.root.join(format!("case-{case}"));
        common::copy_tree(&self.template, &dir)?;
        Ok(dir)
    }

    /// Proves that the shim is loaded and fires: the first write of a `save` child fails.
    fn sanity(&self) -> TestResult {
        let dir = self.new_case()?;
        let case = Case { role: "save", op: "write", action: ACTIONS[0], nth: 1 };
        let run = self.run_child(&case, &dir)?;
        fs::remove_dir_all(&dir)?;
        let Some(fired) = run.fired else {
            return Err(format!(
                "LD_PRELOAD does not work: a `save` child under {} with its first write failing \
                 ran without the fault firing (the shim's log is empty; exit {:?}, acks {:?}, \
                 stderr: {})",
                self.shim.display(),
                run.status,
                run.acks,
                run.stderr
            )
            .into());
        };
        if run.status.and_then(|status| status.code()) != Some(2) {
            return Err(format!(
                "sanity run: the first write failed ({fired}), but the child did not report an \
                 error: exit {:?}, acks {:?}, stderr: {}",
                run.status, run.acks, run.stderr
            )
            .into());
        }
        println!("    sanity: LD_PRELOAD works, the first write failed: {fired}");
        Ok(())
    }

    /// Runs `role` without a fault, counting the calls of `op`; the store must come
    /// out whole.
    fn calibrate(&self, role: &'static str, op: &'static str) -> TestResult<(u64, Duration)> {
        let started = Instant::now();
        let dir = self.new_case()?;
        let case = Case { role, op, action: ACTIONS[0], nth: 0 };
        let run = self.run_child(&case, &dir)?;
        let expected = expect(role);
        let finished =
            run.status.is_some_and(|status| status.success()) && run.acks == expected.acks;
        let (Some(calls), true) = (run.calls, finished) else {
            return Err(format!(
                "clean run of `{role}` (counting {op} calls) failed: exit {:?}, acks {:?}, \
                 shim count {:?}, unexpected output {:?}, stderr:\n{}",
                run.status, run.acks, run.calls, run.unexpected, run.stderr
            )
            .into());
        };
        let verdict = check_store(&case, &dir, &run);
        fs::remove_dir_all(&dir)?;
        if let Verdict::Bad(what) | Verdict::Typed(what) = verdict {
            return Err(format!("after a clean run of `{role}`: {what}").into());
        }
        println!("    clean {role:<8} {calls:>4} {op} calls");
        Ok((calls, started.elapsed()))
    }

    fn run_case(&self, case: &Case) -> TestResult<Outcome> {
        let dir = self.new_case()?;
        let run = self.run_child(case, &dir)?;
        let fired = run.fired.is_some();
        let expected = expect(case.role);
        let complete = run.acks == expected.acks;
        let mut note = None;
        let child_bad = match run.status {
            None => Some(format!(
                "the child hung (nothing for {CHILD_PATIENCE:?}, killed){}",
                after_acks(&run)
            )),
            Some(status) => match (status.code(), status.signal()) {
                (Some(0), _) if complete && run.unexpected.is_empty() => {
                    // An error after the last operation (closing, in the store's drop)
                    // can only go to the background error hook.
                    if fired && case.action.shim != "kill" && run.reported.is_empty() {
                        note = Some(format!(
                            "unreported: the child finished with exit 0 ({})",
                            run.fired.as_deref().unwrap_or_default()
                        ));
                    }
                    None
                }
                (Some(0), _) => Some(format!(
                    "the child exited 0 after acknowledging {:?} (a whole run acknowledges {:?}), \
                     unexpected output {:?}",
                    run.acks, expected.acks, run.unexpected
                )),
                (Some(2), _) if fired => None,
                (Some(2), _) => Some("the child failed, but the fault never fired".to_owned()),
                (Some(101), _) => {
                    Some(format!("the child panicked (exit 101){}", after_acks(&run)))
                }
                (_, Some(9)) if fired && case.action.shim == "kill" => None,
                (_, Some(6)) => Some(format!("the child aborted (SIGABRT){}", after_acks(&run))),
                _ => Some(format!("the child ended with {status}")),
            },
        };
        let contained = run.stderr.contains("panicked at");
        if child_bad.is_none() && contained {
            let panic = run.stderr.split("panicked at ").nth(1).unwrap_or_default();
            let location = first_line(panic).trim_end_matches(':');
            let short = location.rsplit_once("/src/").map_or(location, |(_, file)| file);
            note = Some(format!("a panic was caught inside the child, at {short}"));
        }
        let store_verdict = check_store(case, &dir, &run);
        fs::remove_dir_all(&dir)?;
        let verdict = match (child_bad, store_verdict) {
            (Some(child), Verdict::Bad(store)) => Verdict::Bad(format!("{child}; and {store}")),
            (Some(child), _) => Verdict::Bad(child),
            (None, verdict) => verdict,
        };
        Ok(Outcome { verdict, fired: run.fired, stderr: run.stderr, note })
    }

    /// Runs the child of `case` in case directory `dir` under the shim.
    fn run_child(&self, case: &Case, dir: &Path) -> TestResult<Run> {
        let log = dir.with_extension("log");
        let mut command = Command::new(env::current_exe()?);
        command
            .env(ROLE_VAR, case.role)
            .env(DIR_VAR, dir)
            .env("LD_PRELOAD", &self.shim)
            .env(FAULT_OP, case.op)
            .env(FAULT_NTH, case.nth.to_string())
            .env(FAULT_ACTION, case.action.shim)
            .env(FAULT_STICKY, if case.action.sticky { "1" } else { "0" })
            .env(FAULT_DIR, dir)
            .env(FAULT_LOG, &log)
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null());
        let mut child = Watched::spawn(command, CHILD_PATIENCE)?;
        let mut acks = Vec::new();
        let (mut unexpected, mut reported) = (Vec::new(), Vec::new());
        let mut take = |line: String| match line.strip_prefix("ACK ").map(str::parse::<u64>) {
            Some(Ok(generation)) => acks.push(generation),
            _ if line.starts_with("REPORTED ") => reported.push(line),
            _ => unexpected.push(line),
        };
        // Lines until the child closes its stdout (it exited) or prints nothing for
        // `CHILD_PATIENCE` (it hung).
        let mut waited = Instant::now();
        while let Ok(line) = child.next_line() {
            take(line);
            waited = Instant::now();
        }
        let hung = CHILD_PATIENCE <= waited.elapsed();
        let waited = Instant::now();
        let mut status = child.exited()?;
        while status.is_none() && !hung && waited.elapsed() < EXIT_GRACE {
            thread::sleep(Duration::from_millis(5));
            status = child.exited()?;
        }
        // Still running: it hung. `kill` fails only if it exited just now.
        if status.is_none() && child.kill().is_err() {
            status = child.exited()?;
        }
        let (rest, stderr) = child.finish();
        for line in rest? {
            take(line);
        }
        let shim_log = match fs::read_to_string(&log) {
            Ok(text) => text,
            Err(err) if err.kind() == io::ErrorKind::NotFound => String::new(),
            Err(err) => return Err(err.into()),
        };
        let _ = fs::remove_file(&log);
        let fired = shim_log.lines().find(|line| line.starts_with("fired ")).map(str::to_owned);
        let calls = shim_log
            .lines()
            .find_map(|line| line.strip_prefix("calls "))
            .and_then(|rest| rest.split(' ').nth(1))
            .and_then(|count| count.parse().ok());
        Ok(Run { acks, status, stderr, unexpected, reported, fired, calls })
    }
}

/// Separates what happened to a child from when, in a finding.
const ACK_SEPARATOR: &str = ", ";

fn after_acks(run: &Run) -> String {
    match run.acks.last() {
        Some(last) => format!("{ACK_SEPARATOR}after acknowledging {last}"),
        None => format!("{ACK_SEPARATOR}before acknowledging anything"),
    }
}

thread_local! {
    /// Set while the parent reopens a store: its panics are reported, not printed.
    static REOPENING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// What reopening a store found.
enum Reopened {
    /// It opened; the check of its cells passed or failed.
    Opened(Result<(), String>),
    Failed(instastate::Error),
    Panicked(String),
}

/// Opens the store in `dir` in this process (without the shim), checks it holds
/// one whole plain generation in `plain` and a whole ledger of `events` events, and
/// that `Store::verify` finds nothing, and closes it.
fn reopen(dir: &Path, plain: (u64, u64), events: (u64, u64)) -> Reopened {
    poison_cells();
    REOPENING.with(|it| it.set(true));
    let res = panic::catch_unwind(AssertUnwindSafe(
        || -> instastate::Result<Result<(), String>> {
            let store = open_store(dir)?;
            let checked = (|| {
                let generation = plain_generation()?;
                if generation < plain.0 || plain.1 < generation {
                    return Err(if generation < plain.0 {
                        format!(
                            "acknowledged save lost: the store holds generation {generation}, {} was \
                         acknowledged",
                            plain.0
                        )
                    } else {
                        format!("the store holds generation {generation}, never saved")
                    });
                }
                let found = ledger_events()?;
                if found < events.0 || events.1 < found {
                    return Err(if found < events.0 {
                        format!(
                            "acknowledged event lost: the ledger holds {found} events, {} were \
                         acknowledged",
                            events.0
                        )
                    } else {
                        format!("the ledger holds {found} events, more than were handled")
                    });
                }
                let problems = store.verify().map_err(|err| format!("verify failed: {err}"))?;
                if let Some(problem) = problems.first() {
                    return Err(format!("verify found {} problem(s): {problem}", problems.len()));
                }
                Ok(())
            })();
            drop(store);
            Ok(checked)
        },
    ));
    REOPENING.with(|it| it.set(false));
    match res {
        Ok(Ok(checked)) => Reopened::Opened(checked),
        Ok(Err(err)) => Reopened::Failed(err),
        Err(_) => Reopened::Panicked(
            LAST_PANIC
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take()
                .unwrap_or_else(|| "<no message>".to_owned()),
        ),
    }
}

/// Reopens the case's store (and backup, if any) and classifies what it holds
/// against what the child acknowledged.
fn check_store(case: &Case, dir: &Path, run: &Run) -> Verdict {
    static REOPEN: Mutex<()> = Mutex::new(());
    let _reopening = REOPEN.lock().unwrap_or_else(PoisonError::into_inner);
    let expected = expect(case.role);
    let acked = run.acks.last().copied();
    // The operation in flight when the child stopped may or may not have reached
    // the disk; nothing later may have.
    let range = |base: u64| {
        let acked = acked.unwrap_or(base);
        (acked, expected.acks.get(run.acks.len()).copied().unwrap_or(acked))
    };
    let (plain, events) = if expected.acks_plain {
        (range(expected.plain), (expected.events, expected.events))
    } else {
        ((expected.plain, expected.plain), range(expected.events))
    };
    let store = dir.join("store");
    let verdict = match reopen(&store, plain, events) {
        Reopened::Opened(Ok(())) => Verdict::Ok,
        Reopened::Opened(Err(what)) => Verdict::Bad(what),
        Reopened::Panicked(message) => Verdict::Bad(format!("the reopen panicked: {message}")),
        Reopened::Failed(first) => match reopen(&store, plain, events) {
            Reopened::Opened(Ok(())) => Verdict::Typed(format!(
                "the first reopen failed ({first}), the second opened the store whole"
            )),
            Reopened::Failed(again) => Verdict::Bad(format!(
                "the store cannot be opened: {first}\n  {first:?}\n  again: {again}"
            )),
            Reopened::Opened(Err(what)) => Verdict::Bad(format!(
                "the first reopen failed ({first}), the second opened it but: {what}"
            )),
            Reopened::Panicked(message) => Verdict::Bad(format!(
                "the first reopen failed ({first}), the second panicked: {message}"
            )),
        },
    };
    if !matches!(verdict, Verdict::Ok) || case.role != "backup" {
        return verdict;
    }
    // A backup exists only whole: `backup_to` renames it into place when complete.
    let backup = dir.join("backup");
    if !backup.exists() {
        return if acked.is_some() {
            Verdict::Bad("backup_to returned Ok, but there is no backup".to_owned())
        } else {
            verdict
        };
    }
    let base = (expected.plain, expected.plain);
    match reopen(&backup, base, (expected.events, expected.events)) {
        Reopened::Opened(Ok(())) => verdict,
        Reopened::Opened(Err(what)) => Verdict::Bad(format!("the backup: {what}")),
        Reopened::Failed(err) => {
            Verdict::Bad(format!("the backup cannot be opened: {err}\n  {err:?}"))
        }
        Reopened::Panicked(message) => {
            Verdict::Bad(format!("opening the backup panicked: {message}"))
        }
    }
}

// ---------------------------------------------------------------------------------
// Setup
// ---------------------------------------------------------------------------------

/// Builds `tests/shim/fault.c` into `dir`, returning the library's path.
fn build_shim(dir: &Path) -> TestResult<PathBuf> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/shim/fault.c");
    let library = dir.join("libfault.so");
    let output = Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&library)
        .arg(&source)
        .arg("-ldl")
        .output()
        .map_err(|err| {
            if err.kind() == io::ErrorKind::NotFound {
                format!(
                    "this test needs a C compiler: `cc` is not installed, so the fault shim \
                     {} cannot be built (install gcc or clang)",
                    source.display()
                )
            } else {
                format!("cannot run `cc` to build the fault shim: {err}")
            }
        })?;
    if !output.status.success() {
        return Err(format!(
            "`cc` failed to build {} ({}):\n{}",
            source.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    Ok(library)
}

/// Writes the clean store every case starts from: plain generation `BASE` after
/// `BASE` saves, and `BASE_EVENTS` events with the ledger snapshotted.
fn make_template(dir: &Path) -> TestResult {
    let store = open_store(dir)?;
    for generation in 1..=BASE {
        set_generation(generation);
        store.save_all()?;
    }
    for event in 1..=BASE_EVENTS {
        LEDGER.handle(event)?;
    }
    store.save_all()?;
    drop(store);
    Ok(())
}
