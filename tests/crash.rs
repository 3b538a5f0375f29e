//! Crash and restart tests: the store survives its process being killed at any instant.
//!
//! This binary has no libtest harness (`harness = false`): it is both the test runner
//! and, when started by itself with `INSTASTATE_CRASH_ROLE` set, the child process
//! that a test starts, kills and restarts. Command-line arguments (test filters,
//! `--nocapture`, `--test-threads`, ...) are ignored, except `--list`.
//!
//! - `crash::restart`: one process saves through the global API and exits, a second
//!   one (and then this one) sees exactly what was saved.
//! - `crash::crash`: a child saves generation after generation of an invariant spread
//!   over 26 cells, and is killed with `SIGKILL` at a random instant, again and again
//!   on the same directory; after every kill the store must open and hold one whole
//!   generation, no older than the last one the child reported saved.
//! - `crash::locked`: a store held open by another process cannot be opened.
//!
//! Set `INSTASTATE_CRASH_SEED` to replay the random kill delays of a failed run (where
//! the kills land still depends on timing).

mod common;

use std::{
    env,
    fmt::Write as _,
    io::{self, Write},
    path::{Path, PathBuf},
    process::{self, Command, ExitCode, ExitStatus, Stdio},
    thread::{self},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use instastate::{StateCell, Store, defstate};

use crate::common::{Test, TestResult, Watched, XorShift};

/// Selects the child role; unset in the parent.
const ROLE_VAR: &str = "INSTASTATE_CRASH_ROLE";
/// The store directory a child works on.
const DIR_VAR: &str = "INSTASTATE_CRASH_DIR";
/// Replays a run's random kill times.
const SEED_VAR: &str = "INSTASTATE_CRASH_SEED";

const ROLE_RESTART_SAVE: &str = "restart-save";
const ROLE_RESTART_CHECK: &str = "restart-check";
const ROLE_CRASH_WRITER: &str = "crash-writer";
const ROLE_HOLD: &str = "hold";

/// A child that is never killed stops by itself after this long, so that no process
/// outlives a parent that died.
const CHILD_LIFETIME: Duration = Duration::from_secs(30);
/// How long the parent waits for a child to report that it opened the store.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

fn main() -> ExitCode {
    if let Ok(role) = env::var(ROLE_VAR) {
        return child_main(&role);
    }
    let tests: [Test; 3] =
        [("crash::restart", restart), ("crash::crash", crash), ("crash::locked", locked)];
    common::run(&tests)
}

fn child_main(role: &str) -> ExitCode {
    let result = env::var_os(DIR_VAR)
        .map(PathBuf::from)
        .ok_or_else(|| format!("{DIR_VAR} is not set").into())
        .and_then(|dir| match role {
            ROLE_RESTART_SAVE => restart_save(&dir),
            ROLE_RESTART_CHECK => restart_check(&dir),
            ROLE_CRASH_WRITER => crash_writer(&dir),
            ROLE_HOLD => hold(&dir),
            other => Err(format!("unknown child role `{other}`").into()),
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("child `{role}` failed: {err}");
            ExitCode::from(2)
        }
    }
}

// ---------------------------------------------------------------------------------
// crash::restart
// ---------------------------------------------------------------------------------

defstate! {
    /// A number, saved inline.
    #[name = "crash::restart::NUMBER"]
    NUMBER: u64 = 7;
    /// A string, saved inline.
    #[name = "crash::restart::TEXT"]
    TEXT: String = String::from("initial");
    /// About 40 KiB encoded: saved to a value file.
    #[name = "crash::restart::BIG"]
    BIG: Vec<u64> = Vec::new();
}

const RESTART_NUMBER: u64 = 0x0123_4567_89ab_cdef;
const RESTART_TEXT: &str = "saved by the first process — ünïcödé included";
const RESTART_BIG_LEN: u64 = 6_000;

fn restart_big() -> Vec<u64> {
    // Varied values, mostly large, so that the encoding is tens of KiB.
    (0..RESTART_BIG_LEN).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (i % 40)).collect()
}

/// Child: saves the restart values through the global API, then changes them again
/// without saving, and exits.
fn restart_save(dir: &Path) -> TestResult {
    let _store = instastate::open(dir)?;
    check_restart_values(7, "initial", &[])?;
    instastate::atomically(|| {
        NUMBER.set(RESTART_NUMBER);
        TEXT.set(RESTART_TEXT.to_owned());
        BIG.set(restart_big());
    });
    instastate::save_all()?;
    // Not saved: the next process must not see these.
    NUMBER.set(1);
    TEXT.set("unsaved".to_owned());
    BIG.write().clear();
    println!("restart-save saved");
    Ok(())
}

/// Child: opens the store through the global API and checks it holds the restart values.
fn restart_check(dir: &Path) -> TestResult {
    let _store = instastate::open(dir)?;
    check_restart_values(RESTART_NUMBER, RESTART_TEXT, &restart_big())?;
    println!(
        "restart-check ok: NUMBER = {:#x}, TEXT = {:?}, BIG = {} elements, {} value file(s)",
        NUMBER.get(),
        TEXT.get(),
        BIG.read().len(),
        value_files(dir)?
    );
    Ok(())
}

fn check_restart_values(number: u64, text: &str, big: &[u64]) -> TestResult {
    let found_number = NUMBER.get();
    if found_number != number {
        return Err(format!("NUMBER is {found_number:#x}, expected {number:#x}").into());
    }
    let found_text = TEXT.get();
    if found_text != text {
        return Err(format!("TEXT is {found_text:?}, expected {text:?}").into());
    }
    let found_big = BIG.read();
    if *found_big != big {
        return Err(format!(
            "BIG has {} elements (first {:?}), expected {} (first {:?})",
            found_big.len(),
            found_big.first(),
            big.len(),
            big.first()
        )
        .into());
    }
    Ok(())
}

fn restart() -> TestResult {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("db");

    let saved = run_child(ROLE_RESTART_SAVE, &db)?;
    ensure_success(ROLE_RESTART_SAVE, &saved)?;

    let checked = run_child(ROLE_RESTART_CHECK, &db)?;
    ensure_success(ROLE_RESTART_CHECK, &checked)?;
    let report = String::from_utf8_lossy(&checked.stdout);
    if !report.contains("restart-check ok") {
        return Err(format!("{ROLE_RESTART_CHECK} printed no verdict: {report:?}").into());
    }
    print!("    {report}");

    let files = value_files(&db)?;
    if files != 1 {
        return Err(format!("expected BIG in exactly one value file, found {files}").into());
    }

    // And this process, which never touched the cells, loads the same values.
    check_restart_values(7, "initial", &[])?;
    let store = instastate::open(&db)?;
    check_restart_values(RESTART_NUMBER, RESTART_TEXT, &restart_big())?;
    drop(store);
    Ok(())
}

// ---------------------------------------------------------------------------------
// crash::crash
// ---------------------------------------------------------------------------------

/// Small cells: in generation `g`, cell `idx` holds `g * STRIDE + idx`.
const STRIDE: u64 = 64;

macro_rules! small_cells {
    ($($idx:literal)*) => {
        [$(StateCell::new(concat!("crash::crash::SMALL", $idx), || u64::MAX)),*]
    };
}

static SMALL: [StateCell<u64>; 24] =
    small_cells!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23);
/// Large cells: in generation `g`, large cell `k` holds `large_len(k, g)` copies of `g`.
static LARGE: [StateCell<Vec<u64>>; 2] = [
    StateCell::new("crash::crash::LARGE0", Vec::new),
    StateCell::new("crash::crash::LARGE1", Vec::new),
];

/// The length of large cell `k` in generation `generation`.
///
/// `LARGE0` always spills to a value file (2,000 to 50,000 elements); `LARGE1` does
/// too three generations out of four, and is small enough to be inline the fourth,
/// so saves keep replacing value files by inline records and back.
fn large_len(k: usize, generation: u64) -> usize {
    let len = match k {
        0 => 2_000 + (generation * 7_919) % 48_000,
        _ if generation.is_multiple_of(4) => 200 + generation % 1_000,
        _ => 10_000 + (generation * 104_729) % 40_000,
    };
    usize::try_from(len).unwrap_or(usize::MAX)
}

fn small_value(idx: usize, generation: u64) -> u64 {
    generation * STRIDE + idx as u64
}

/// How many saves the crash test's store keeps in its history.
const CRASH_HISTORY: usize = 3;

/// A store directory whose name ends with this is encrypted.
const SEALED_SUFFIX: &str = "-sealed";

fn crash_store(dir: &Path) -> instastate::Result<Store> {
    let mut builder = Store::builder();
    #[cfg(feature = "encryption")]
    if dir.to_string_lossy().ends_with(SEALED_SUFFIX) {
        builder = builder.encryption_key(instastate::EncryptionKey::from_bytes([0x42; 32]));
    }
    for cell in &SMALL {
        builder = builder.cell(cell);
    }
    for cell in &LARGE {
        builder = builder.cell(cell);
    }
    builder.keep_history(CRASH_HISTORY).open(dir)
}

/// Sets every cell to generation `generation`, in one `atomically` block.
fn set_generation(generation: u64) {
    instastate::atomically(|| {
        for (idx, cell) in SMALL.iter().enumerate() {
            cell.set(small_value(idx, generation));
        }
        for (k, cell) in LARGE.iter().enumerate() {
            let len = large_len(k, generation);
            cell.update(|values| {
                values.clear();
                values.resize(len, generation);
            });
        }
    });
}

/// Sets every cell to a value no generation has, so that a cell a load leaves
/// alone is noticed.
fn poison_cells() {
    for cell in &SMALL {
        cell.set(u64::MAX);
    }
    for cell in &LARGE {
        cell.set(Vec::new());
    }
}

/// The generation every cell holds, or a description of the mix they hold.
fn snapshot_generation() -> Result<u64, String> {
    let first = SMALL.first().map_or(u64::MAX, StateCell::get);
    let generation = first / STRIDE;
    let mut wrong = String::new();
    for (idx, cell) in SMALL.iter().enumerate() {
        let value = cell.get();
        if value != small_value(idx, generation) {
            let _ = write!(
                wrong,
                "\n  SMALL{idx} = {value} (generation {}, offset {})",
                value / STRIDE,
                value % STRIDE
            );
        }
    }
    for (k, cell) in LARGE.iter().enumerate() {
        let values = cell.read();
        let expected_len = large_len(k, generation);
        let odd = values.iter().find(|&&value| value != generation);
        if values.len() != expected_len || odd.is_some() {
            let _ = write!(
                wrong,
                "\n  LARGE{k}: {} elements (generation {generation} has {expected_len}), first {:?}, \
                 first not {generation}: {odd:?}",
                values.len(),
                values.first(),
            );
        }
    }
    if wrong.is_empty() {
        Ok(generation)
    } else {
        Err(format!("cells are not one whole generation (SMALL0 says {generation}):{wrong}"))
    }
}

/// Child: continues from the generation on disk, saving one generation after another
/// and reporting each after its save returned, until killed.
fn crash_writer(dir: &Path) -> TestResult {
    let started = Instant::now();
    let store = crash_store(dir)?;
    let first = snapshot_generation()?;
    let mut out = io::stdout().lock();
    writeln!(out, "opened {first} {}", started.elapsed().as_micros())?;
    out.flush()?;
    for generation in first + 1.. {
        set_generation(generation);
        let saving = Instant::now();
        store.save_all()?;
        writeln!(out, "saved {generation} {}", saving.elapsed().as_micros())?;
        out.flush()?;
        if started.elapsed() > CHILD_LIFETIME {
            break;
        }
    }
    Ok(())
}

/// What the parent read from one killed writer.
#[derive(Default)]
struct Reported {
    opened: Option<u64>,
    last_saved: Option<u64>,
    saves: u64,
    open_time: Duration,
    save_time: Duration,
}

impl Reported {
    /// Parses `opened <generation> <micros>` or `saved <generation> <micros>`.
    fn parse(&mut self, line: &str, expected_first: u64) -> TestResult {
        let bad = || format!("unexpected line from the writer: {line:?}");
        let mut words = line.split(' ');
        let (Some(what), Some(generation), Some(micros), None) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            return Err(bad().into());
        };
        let generation: u64 = generation.parse().map_err(|_| bad())?;
        let took = Duration::from_micros(micros.parse().map_err(|_| bad())?);
        match what {
            "opened" => {
                if generation != expected_first || self.opened.is_some() {
                    return Err(format!(
                        "writer opened generation {generation}, the parent saw {expected_first}"
                    )
                    .into());
                }
                self.opened = Some(generation);
                self.open_time = took;
            }
            "saved" => {
                let last = self.last_saved.or(self.opened);
                if last.map(|last| last + 1) != Some(generation) {
                    return Err(
                        format!("writer reported saving {generation} after {last:?}").into()
                    );
                }
                self.last_saved = Some(generation);
                self.saves += 1;
                self.save_time += took;
            }
            _ => return Err(bad().into()),
        }
        Ok(())
    }
}

#[derive(Default)]
struct KillStats {
    kills: u32,
    before_open: u32,
    with_ack: u32,
    advanced: u32,
    newer_than_ack: u32,
    max_generation: u64,
    total_acks: u64,
    opens: u32,
    open_time: Duration,
    save_time: Duration,
}

const KILL_TARGET: u32 = 100;
const KILL_MINIMUM: u32 = 50;
const KILL_BUDGET: Duration = Duration::from_secs(90);

fn crash() -> TestResult {
    let seed = env::var(SEED_VAR).ok().and_then(|seed| seed.parse().ok()).unwrap_or_else(|| {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        // Truncation is fine: any bits make a seed.
        #[allow(clippy::cast_possible_truncation)]
        let seed = (nanos as u64) ^ (u64::from(process::id()) << 32);
        seed
    });
    println!("    seed {seed} (replay with {SEED_VAR}={seed})");
    let mut rng = XorShift::new(seed);

    let dir = tempfile::tempdir()?;
    // Kills alternate between a plain store and, with the `encryption` feature, an
    // encrypted one; each store continues from its own generation.
    let mut dbs: Vec<(PathBuf, u64)> = vec![(dir.path().join("db"), 0)];
    if cfg!(feature = "encryption") {
        dbs.push((dir.path().join(format!("db{SEALED_SUFFIX}")), 0));
    }
    for (db, _) in &dbs {
        let store = crash_store(db)?;
        set_generation(0);
        store.save_all()?;
    }

    let started = Instant::now();
    let mut stats = KillStats::default();
    while stats.kills < KILL_TARGET && started.elapsed() < KILL_BUDGET {
        let which = usize::try_from(stats.kills).unwrap_or(0) % dbs.len();
        let Some((db, generation)) = dbs.get_mut(which) else { break };
        let (db, generation): (&Path, &mut u64) = (db, generation);
        // One kill in five may land while the writer is still opening the store; the
        // others wait for the writer to open it first, so that they land among saves.
        let from_spawn = rng.below(5) == 0;
        let delay = Duration::from_millis(2 + rng.below(149));
        let round = kill_round(db, *generation, from_spawn, delay).map_err(|err| {
            format!(
                "kill #{} (seed {seed}, {}, from generation {generation}, {} delay {delay:?}): {err}",
                stats.kills + 1,
                db.display(),
                if from_spawn { "spawn +" } else { "open +" },
            )
        })?;
        stats.kills += 1;
        stats.before_open += u32::from(round.reported.opened.is_none());
        stats.with_ack += u32::from(round.reported.saves > 0);
        stats.advanced += u32::from(round.found > *generation);
        stats.newer_than_ack +=
            u32::from(round.found > round.reported.last_saved.unwrap_or(*generation));
        stats.total_acks += round.reported.saves;
        stats.opens += u32::from(round.reported.opened.is_some());
        stats.open_time += round.reported.open_time;
        stats.save_time += round.reported.save_time;
        *generation = round.found;
        stats.max_generation = stats.max_generation.max(round.found);
    }
    println!(
        "    {} kills in {:.1} s, alternating over {} store(s) (plain{}): {} before the writer opened the store, {} after at least one \
         acknowledged save ({} acknowledged in all), {} with the generation advanced, {} with the \
         reopened generation newer than the last acknowledged one; reached generation {}",
        stats.kills,
        started.elapsed().as_secs_f64(),
        dbs.len(),
        if dbs.len() > 1 { ", encrypted" } else { "" },
        stats.before_open,
        stats.with_ack,
        stats.total_acks,
        stats.advanced,
        stats.newer_than_ack,
        stats.max_generation,
    );
    println!(
        "    writer: open {:.1} ms, save {:.1} ms on average",
        mean_ms(stats.open_time, stats.opens.into()),
        mean_ms(stats.save_time, stats.total_acks),
    );
    if stats.kills < KILL_MINIMUM {
        return Err(format!(
            "only {} kills in {KILL_BUDGET:?}, at least {KILL_MINIMUM} are needed",
            stats.kills
        )
        .into());
    }
    if stats.with_ack == 0 {
        return Err("no kill landed after a completed save".into());
    }
    Ok(())
}

#[allow(clippy::cast_precision_loss)]
fn mean_ms(total: Duration, count: u64) -> f64 {
    total.as_secs_f64() * 1000.0 / count.max(1) as f64
}

struct Round {
    reported: Reported,
    /// The generation found on disk after the kill.
    found: u64,
}

/// Starts a writer on `db` (which holds `generation`), kills it after `delay`, and
/// checks what the store holds then.
fn kill_round(db: &Path, generation: u64, from_spawn: bool, delay: Duration) -> TestResult<Round> {
    let mut writer = Watched::spawn(child_command(ROLE_CRASH_WRITER, db)?, READY_TIMEOUT)?;
    let mut reported = Reported::default();
    let killed = (|| {
        if !from_spawn {
            reported.parse(&writer.next_line()?, generation)?;
        }
        thread::sleep(delay);
        writer.kill()
    })();
    let (rest, stderr) = writer.finish();
    killed
        .and(rest)
        .and_then(|rest| rest.iter().try_for_each(|line| reported.parse(line, generation)))
        .map_err(|err| format!("{err}\nwriter stderr: {stderr}"))?;
    if !stderr.is_empty() {
        return Err(format!("the writer wrote to stderr: {stderr}").into());
    }

    poison_cells();
    let store = crash_store(db).map_err(|err| format!("the store does not open: {err}"))?;
    let found = snapshot_generation()?;
    let files = value_files(db)?;
    check_history(&store, found)?;
    drop(store);

    let acked = reported.last_saved.unwrap_or(generation);
    if found < acked {
        return Err(format!(
            "acknowledged save lost: the writer reported generation {acked} saved, the store holds {found}"
        )
        .into());
    }
    if found > acked + 1 {
        return Err(format!(
            "the store holds generation {found}, but the writer never got further than saving {}",
            acked + 1
        )
        .into());
    }
    // Each kept save holds the earlier value of every cell it wrote.
    if files > LARGE.len() * (CRASH_HISTORY + 1) {
        return Err(format!(
            "{files} value files after open, but only {} cells can have one, in {} kept saves",
            LARGE.len(),
            CRASH_HISTORY
        )
        .into());
    }
    Ok(Round { reported, found })
}

/// Checks that the history survived the kill: it ends at the save the store holds,
/// keeps no more than it should, and reverts to every save it lists, whole.
/// Cell generation `g` is store generation `g + 1`: the first save wrote generation 0.
fn check_history(store: &Store, found: u64) -> TestResult {
    let history = store.history();
    let newest = history.last().map(|saved| saved.number);
    if newest != Some(found + 1) {
        return Err(
            format!("history ends at save {newest:?}, the store holds save {}", found + 1).into()
        );
    }
    if history.len() > CRASH_HISTORY {
        return Err(
            format!("history holds {} saves, more than {CRASH_HISTORY}", history.len()).into()
        );
    }
    for saved in &history {
        store
            .revert_to(saved.number)
            .map_err(|err| format!("revert to {}: {err}", saved.number))?;
        let at = snapshot_generation()
            .map_err(|err| format!("after revert to {}: {err}", saved.number))?;
        if at + 1 != saved.number {
            return Err(format!("revert to save {} gave generation {at}", saved.number).into());
        }
    }
    store.reload_all()?;
    Ok(())
}

// ---------------------------------------------------------------------------------
// crash::locked
// ---------------------------------------------------------------------------------

/// Child: opens the store, says so, and keeps it open until killed.
fn hold(dir: &Path) -> TestResult {
    let store = crash_store(dir)?;
    println!("ready");
    io::stdout().flush()?;
    thread::sleep(CHILD_LIFETIME);
    drop(store);
    Ok(())
}

/// How soon an open of a store another process holds must fail.
// "At once, not a hang": the store retries a held lock for 250 ms before reporting it.
const LOCKED_LIMIT: Duration = Duration::from_secs(2);

fn locked() -> TestResult {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("db");
    let mut holder = Watched::spawn(child_command(ROLE_HOLD, &db)?, READY_TIMEOUT)?;
    let held = (|| -> TestResult {
        let line = holder.next_line()?;
        if line != "ready" {
            return Err(format!("unexpected line from the holder: {line:?}").into());
        }
        for attempt in ["Store::builder().open", "instastate::open"] {
            let started = Instant::now();
            let result = match attempt {
                "instastate::open" => instastate::open(&db),
                _ => crash_store(&db),
            };
            let elapsed = started.elapsed();
            match result {
                Err(instastate::Error::Locked { path, .. }) if path == db => {}
                Err(err) => {
                    return Err(format!(
                        "{attempt} failed with {err:?}, not Locked `{}`",
                        db.display()
                    )
                    .into());
                }
                Ok(_) => {
                    return Err(format!("{attempt} opened a store another process holds").into());
                }
            }
            if elapsed > LOCKED_LIMIT {
                return Err(format!("{attempt} took {elapsed:?} to report Locked").into());
            }
            println!("    {attempt}: Locked in {elapsed:?}");
        }
        holder.kill()
    })();
    let (rest, stderr) = holder.finish();
    held.and(rest).map_err(|err| format!("{err}\nholder stderr: {stderr}"))?;

    // The kill released the lock.
    let store = crash_store(&db)?;
    drop(store);
    Ok(())
}

// ---------------------------------------------------------------------------------
// Children
// ---------------------------------------------------------------------------------

fn child_command(role: &str, dir: &Path) -> TestResult<Command> {
    let mut command = Command::new(env::current_exe()?);
    command.env(ROLE_VAR, role).env(DIR_VAR, dir).stdin(Stdio::null());
    Ok(command)
}

fn run_child(role: &str, dir: &Path) -> TestResult<process::Output> {
    Ok(child_command(role, dir)?.output()?)
}

fn ensure_success(role: &str, output: &process::Output) -> TestResult {
    if output.status.success() {
        return Ok(());
    }
    Err(describe_failure(role, output.status, &output.stdout, &output.stderr).into())
}

fn describe_failure(role: &str, status: ExitStatus, stdout: &[u8], stderr: &[u8]) -> String {
    format!(
        "child `{role}` failed with {status}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(stdout),
        String::from_utf8_lossy(stderr)
    )
}

/// How many value files the store in `dir` has.
fn value_files(dir: &Path) -> TestResult<usize> {
    let mut count = 0;
    for entry in std::fs::read_dir(dir.join("values"))? {
        let entry = entry?;
        if entry.path().extension().is_some_and(|ext| ext == "val") {
            count += 1;
        }
    }
    Ok(count)
}
