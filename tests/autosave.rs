//! Autosave: [`Store::autosave`], its guard, [`Store::close`] and background errors.
//!
//! - `kill_under_load`: a child process autosaves while three threads write, and is
//!   killed with `SIGKILL` at random instants, again and again on one directory;
//!   after every kill the store must hold whole snapshots, and nothing that a
//!   completed background save acknowledged may be lost.
//! - `final_save_*`: a child process exits in various ways with autosave running;
//!   the final save must have kept its last change.
//! - The rest run in this process: background errors reach the hook and the next
//!   explicit call, `close` and `stop` stop and save, nothing is saved when nothing
//!   changed.
//! - Five tests pin down bugs this file found, now fixed: `stop_after_background_error`,
//!   `drop_after_background_error`, `explicit_call_while_hook_runs_sees_the_error`,
//!   `stop_while_autosave_thread_makes_final_save` and
//!   `stop_or_close_inside_atomically_refuses_without_hanging`.
//!
//! Child processes re-run this test binary: the test `child` does the work of the
//! role that `INSTASTATE_AUTOSAVE_CHILD` names, and nothing when it is unset.
//! Set `INSTASTATE_AUTOSAVE_SEED` to replay the random kill delays and autosave
//! periods of a failed `kill_under_load` (where the kills land still depends on timing).

use std::{
    env,
    error::Error as _,
    io::{self, BufRead, BufReader, Read, Write},
    path::{Path, PathBuf},
    process::{self, Child, Command, Output, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError, Sender},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use instastate::{Error, StateCell, Store, defstate};
use serde::{Deserialize, Serialize, Serializer, ser::Error as _};

type TestResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Selects the child role; unset in a normal test run.
const ROLE_VAR: &str = "INSTASTATE_AUTOSAVE_CHILD";
/// The store directory a child works on.
const DIR_VAR: &str = "INSTASTATE_AUTOSAVE_DIR";
/// The autosave period of a `load` child, in milliseconds.
const PERIOD_VAR: &str = "INSTASTATE_AUTOSAVE_PERIOD_MS";
/// Replays a run's random kill delays and periods.
const SEED_VAR: &str = "INSTASTATE_AUTOSAVE_SEED";

const ROLE_LOAD: &str = "load";
const ROLE_DROP_GUARD: &str = "drop-guard";
const ROLE_PANIC_WITH_GUARD: &str = "panic-with-guard";
const ROLE_RETURN_WITH_GUARD: &str = "return-with-guard";
const ROLE_DROP_STORE: &str = "drop-store";
const ROLE_STOP_INSIDE_ATOMICALLY: &str = "stop-inside-atomically";
const ROLE_CLOSE_INSIDE_ATOMICALLY: &str = "close-inside-atomically";

/// Starts every line a child reports to the parent; libtest may print on the same line.
const MARK: &str = "@autosave-child ";
/// A child that is never killed stops by itself after this long, so that no process
/// outlives a parent that died.
const CHILD_LIFETIME: Duration = Duration::from_secs(30);
/// How long the parent waits for a child to report that it started, and in-process
/// tests wait for something autosave should do within a few periods.
const PATIENCE: Duration = Duration::from_secs(10);
/// A period so long that only the final save can save anything.
const HOUR: Duration = Duration::from_hours(1);

/// Runs the child role that `INSTASTATE_AUTOSAVE_CHILD` names, in a process that
/// one of the tests below started; see the module docs.
///
/// In a normal run the variable is unset and this passes at once, doing nothing:
/// it is only the entry point of the child processes, which this binary cannot have
/// otherwise because the libtest harness owns `main`.
#[test]
fn child() -> TestResult {
    let Ok(role) = env::var(ROLE_VAR) else { return Ok(()) };
    let dir = PathBuf::from(env::var_os(DIR_VAR).ok_or("INSTASTATE_AUTOSAVE_DIR is not set")?);
    match role.as_str() {
        ROLE_LOAD => load_child(&dir),
        ROLE_DROP_GUARD => drop_guard_child(&dir),
        ROLE_PANIC_WITH_GUARD => panic_with_guard_child(&dir),
        ROLE_RETURN_WITH_GUARD => return_with_guard_child(&dir),
        ROLE_DROP_STORE => drop_store_child(&dir),
        ROLE_STOP_INSIDE_ATOMICALLY => stop_inside_atomically_child(&dir),
        ROLE_CLOSE_INSIDE_ATOMICALLY => close_inside_atomically_child(&dir),
        other => Err(format!("unknown child role `{other}`").into()),
    }
}

// ---------------------------------------------------------------------------------
// kill_under_load
// ---------------------------------------------------------------------------------

/// Small cells: in generation `g` of its group, cell `idx` holds `g * STRIDE + idx`,
/// so that a value written for another cell or generation is noticed. Every cell
/// starts at generation 0.
const STRIDE: u64 = 16;

macro_rules! small_cells {
    ($($idx:literal)*) => {
        [$(StateCell::new(concat!("autosave::load::SMALL", $idx), || $idx)),*]
    };
}

static SMALL: [StateCell<u64>; 8] = small_cells!(0 1 2 3 4 5 6 7);
/// About 50,000 elements, all equal to group 0's generation: saved in a value file.
static BIG: StateCell<Vec<u64>> = StateCell::new("autosave::load::BIG", || vec![0; big_len(0)]);

/// The writer groups: each writer thread owns one and writes all of its cells in
/// one `atomically` block; group 0 also owns `BIG`.
const GROUPS: [(usize, usize); 3] = [(0, 3), (3, 6), (6, 8)];
const GROUP_COUNT: usize = GROUPS.len();

/// How many saves the load test's store keeps in its history.
const LOAD_HISTORY: usize = 3;

/// How long a writer rests between two generations.
const WRITER_PAUSE: Duration = Duration::from_micros(100);

const LOAD_KILLS: u32 = 40;
const LOAD_MIN_KILLS: u32 = 30;
const LOAD_BUDGET: Duration = Duration::from_mins(1);

fn load_store(dir: &Path) -> instastate::Result<Store> {
    let mut builder = Store::builder().keep_history(LOAD_HISTORY);
    for cell in &SMALL {
        builder = builder.cell(cell);
    }
    builder.cell(&BIG).open(dir)
}

fn group_cells(group: usize) -> impl Iterator<Item = (usize, &'static StateCell<u64>)> {
    let (start, end) = GROUPS.get(group).copied().unwrap_or_default();
    SMALL.iter().enumerate().skip(start).take(end.saturating_sub(start))
}

fn small_value(idx: usize, generation: u64) -> u64 {
    generation.wrapping_mul(STRIDE).wrapping_add(idx as u64)
}

fn big_len(generation: u64) -> usize {
    usize::try_from(40_000 + generation.wrapping_mul(7_919) % 20_000).unwrap_or(usize::MAX)
}

/// Sets every cell of `group` to `generation`, in one `atomically` block.
fn write_group(group: usize, generation: u64) {
    instastate::atomically(|| {
        for (idx, cell) in group_cells(group) {
            cell.set(small_value(idx, generation));
        }
        if group == 0 {
            BIG.update(|values| {
                values.clear();
                values.resize(big_len(generation), generation);
            });
        }
    });
}

/// Sets every cell to a value no generation has, so that a cell a load leaves
/// alone is noticed.
fn poison_load_cells() {
    for cell in &SMALL {
        cell.set(u64::MAX);
    }
    BIG.set(Vec::new());
}

/// The generation every cell of `group` holds, or a description of the mix they hold.
fn group_generation(group: usize) -> Result<u64, String> {
    let mut cells = group_cells(group);
    let (first_idx, first) = cells.next().ok_or("empty group")?;
    let generation = first.get().wrapping_sub(first_idx as u64) / STRIDE;
    let mut wrong = Vec::new();
    for (idx, cell) in group_cells(group) {
        let value = cell.get();
        if value != small_value(idx, generation) {
            wrong.push(format!("SMALL{idx} = {value}"));
        }
    }
    if group == 0 {
        let values = BIG.read();
        let odd = values.iter().position(|&value| value != generation);
        if values.len() != big_len(generation) || odd.is_some() {
            wrong.push(format!(
                "BIG has {} elements (generation {generation} has {}), first {:?}, \
                 first not {generation} at {odd:?}",
                values.len(),
                big_len(generation),
                values.first()
            ));
        }
    }
    if wrong.is_empty() {
        return Ok(generation);
    }
    Err(format!(
        "group {group} is not one whole generation (its first cell says {generation}): {}",
        wrong.join(", ")
    ))
}

fn all_generations() -> Result<[u64; GROUP_COUNT], String> {
    let mut found = [0; GROUP_COUNT];
    for (group, slot) in found.iter_mut().enumerate() {
        *slot = group_generation(group)?;
    }
    Ok(found)
}

/// Prints one report line for the parent, in one write, and flushes it.
fn report(out: &io::Stdout, line: &str) -> io::Result<()> {
    let mut out = out.lock();
    out.write_all(format!("{MARK}{line}\n").as_bytes())?;
    out.flush()
}

/// Child: continues each group from the generation on disk, writing generation after
/// generation from one thread per group while autosave runs, until killed.
///
/// The main thread acknowledges: it notes the generation each writer has finished
/// writing, then the store's save number `n`, and waits for save `n + 1`. That save
/// locked the store after `n` was read, so after the writes finished: it encoded
/// them or newer values (a cell it skipped was unchanged since a save that had).
/// Once it completed, it prints `ack g0 g1 g2`. Each writer prints `intent <group> <g>`
/// before writing `g`, so the parent knows the newest generation that may be on disk.
fn load_child(dir: &Path) -> TestResult {
    let started = Instant::now();
    let period: u64 = env::var(PERIOD_VAR)?.parse()?;
    let store = load_store(dir)?;
    let first = all_generations()?;
    store.on_background_error(|err| eprintln!("{MARK}background error: {}", chain(err)));
    let _autosave = store.autosave(Duration::from_millis(period))?;
    let written = first.map(AtomicU64::new);
    let stop = AtomicBool::new(false);
    let out = io::stdout();
    report(&out, &format!("ready {} {} {}", first[0], first[1], first[2]))?;
    thread::scope(|scope| -> TestResult {
        let writers: Vec<_> = (0..GROUP_COUNT)
            .map(|group| {
                let (written, stop, out) = (&written, &stop, &out);
                scope.spawn(move || -> io::Result<()> {
                    let Some(written) = written.get(group) else { return Ok(()) };
                    let mut generation = written.load(Ordering::SeqCst);
                    while !stop.load(Ordering::SeqCst) {
                        generation += 1;
                        report(out, &format!("intent {group} {generation}"))?;
                        write_group(group, generation);
                        written.store(generation, Ordering::SeqCst);
                        // Leave the autosave thread some of the machine's cores.
                        thread::sleep(WRITER_PAUSE);
                    }
                    Ok(())
                })
            })
            .collect();
        let acked = acknowledge(&store, &written, &out, started);
        stop.store(true, Ordering::SeqCst);
        for writer in writers {
            writer.join().map_err(|_| "a writer panicked")??;
        }
        acked
    })
}

/// Acknowledges what the writers wrote, save after save, until the child's lifetime
/// is over; see [`load_child`].
fn acknowledge(
    store: &Store,
    written: &[AtomicU64; GROUP_COUNT],
    out: &io::Stdout,
    started: Instant,
) -> TestResult {
    while started.elapsed() < CHILD_LIFETIME {
        let done = written.each_ref().map(|it| it.load(Ordering::SeqCst));
        let before = store.generation();
        while store.generation() == before {
            if CHILD_LIFETIME < started.elapsed() {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(1));
        }
        report(out, &format!("ack {} {} {}", done[0], done[1], done[2]))?;
    }
    Ok(())
}

/// What the parent read from one `load` child.
#[derive(Debug, Default)]
struct LoadReport {
    /// The generations the child found when it opened the store.
    ready: Option<[u64; GROUP_COUNT]>,
    /// Per group, the newest generation the child was about to write.
    intents: [Option<u64>; GROUP_COUNT],
    /// The newest acknowledgement.
    acked: Option<[u64; GROUP_COUNT]>,
    acks: u64,
    writes: u64,
}

impl LoadReport {
    /// Takes in one line; returns the generations of a `ready` line.
    fn parse(&mut self, line: &str) -> Result<Option<[u64; GROUP_COUNT]>, String> {
        let Some((_, report)) = line.split_once(MARK) else { return Ok(None) };
        let bad = |why: &str| format!("{why}: {line:?}");
        let words: Vec<&str> = report.split(' ').collect();
        let numbers: Vec<u64> = words
            .iter()
            .skip(1)
            .map(|it| it.parse())
            .collect::<Result<_, _>>()
            .map_err(|_| bad("not a number"))?;
        match (words.first().copied(), numbers.as_slice()) {
            (Some("ready"), &[g0, g1, g2]) if self.ready.is_none() => {
                self.ready = Some([g0, g1, g2]);
                Ok(self.ready)
            }
            (Some("intent"), &[group, generation]) => {
                let group = usize::try_from(group).map_err(|_| bad("no such group"))?;
                let start = self.ready.and_then(|it| it.get(group).copied());
                let slot = self.intents.get_mut(group).ok_or_else(|| bad("no such group"))?;
                if slot.or(start).map(|last| last + 1) != Some(generation) {
                    return Err(bad(&format!("intent after {:?} (ready {start:?})", *slot)));
                }
                *slot = Some(generation);
                self.writes += 1;
                Ok(None)
            }
            (Some("ack"), &[g0, g1, g2]) => {
                let acked = [g0, g1, g2];
                let ready = self.ready.ok_or_else(|| bad("ack before ready"))?;
                for group in 0..GROUP_COUNT {
                    let previous = self.acked.unwrap_or(ready).get(group).copied();
                    let intent = self.intents.get(group).copied().flatten();
                    let generation = acked.get(group).copied();
                    // An acknowledged generation was written, so announced first, and
                    // acknowledgements never go back.
                    if generation < previous || intent.or(previous) < generation {
                        return Err(bad(&format!(
                            "group {group}: ack after ack {previous:?} and intent {intent:?}"
                        )));
                    }
                }
                self.acked = Some(acked);
                self.acks += 1;
                Ok(None)
            }
            _ => Err(bad("unexpected line from the child")),
        }
    }
}

#[derive(Default)]
struct LoadStats {
    kills: u32,
    before_ready: u32,
    with_ack: u32,
    newer_than_ack: u32,
    acks: u64,
    writes: u64,
    saves: u64,
    max_generation: [u64; GROUP_COUNT],
}

#[test]
fn kill_under_load() -> TestResult {
    let seed = seed();
    println!("kill_under_load: seed {seed} (replay with {SEED_VAR}={seed})");
    let mut rng = XorShift::new(seed);
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("db");
    {
        let store = load_store(&db)?;
        for group in 0..GROUP_COUNT {
            write_group(group, 0);
        }
        store.save_all()?;
    }

    let started = Instant::now();
    let mut stats = LoadStats::default();
    let mut found = [0; GROUP_COUNT];
    let mut last_save = 1;
    while stats.kills < LOAD_KILLS && started.elapsed() < LOAD_BUDGET {
        // One kill in five may land while the child is still starting or opening the
        // store; the others wait for it to run, so that they land among saves.
        let from_spawn = rng.below(5) == 0;
        let delay = Duration::from_millis(if from_spawn { rng.below(80) } else { rng.below(250) });
        let period = 5 + rng.below(16);
        let (report, now, save) = kill_round(&db, found, from_spawn, delay, period).map_err(|err| {
            format!(
                "kill #{} (seed {seed}, from {found:?}, {} + {delay:?}, period {period} ms): {err}",
                stats.kills + 1,
                if from_spawn { "spawn" } else { "ready" },
            )
        })?;
        stats.kills += 1;
        stats.before_ready += u32::from(report.ready.is_none());
        stats.with_ack += u32::from(report.acked.is_some());
        stats.newer_than_ack += u32::from(report.acked.is_some_and(|acked| acked != now));
        stats.acks += report.acks;
        stats.writes += report.writes;
        stats.saves += save - last_save;
        last_save = save;
        found = now;
        stats.max_generation = now;
    }
    println!(
        "kill_under_load: {} kills in {:.1} s ({} before the child was ready, {} after an \
         acknowledged save, {} with newer data than acknowledged); {} acks, {} saves, {} writes; \
         reached generations {:?}",
        stats.kills,
        started.elapsed().as_secs_f64(),
        stats.before_ready,
        stats.with_ack,
        stats.newer_than_ack,
        stats.acks,
        stats.saves,
        stats.writes,
        stats.max_generation,
    );
    if stats.kills < LOAD_MIN_KILLS {
        return Err(format!(
            "only {} kills in {LOAD_BUDGET:?}, at least {LOAD_MIN_KILLS} are needed",
            stats.kills
        )
        .into());
    }
    if stats.with_ack == 0 {
        return Err("no kill landed after an acknowledged save".into());
    }
    Ok(())
}

/// Starts a `load` child on `db` (which holds `expected`), kills it after `delay`,
/// and checks what the store holds then; returns what the child reported, the
/// generations found and the store's save number.
fn kill_round(
    db: &Path,
    expected: [u64; GROUP_COUNT],
    from_spawn: bool,
    delay: Duration,
    period: u64,
) -> TestResult<(LoadReport, [u64; GROUP_COUNT], u64)> {
    let mut command = child_command(ROLE_LOAD, db)?;
    command.env(PERIOD_VAR, period.to_string());
    let mut child = Watched::spawn(command)?;
    let killed = (|| -> TestResult {
        if !from_spawn {
            child.wait_ready()?;
        }
        thread::sleep(delay);
        child.kill()
    })();
    let (report, stderr) = child.finish();
    let report = killed.and(report).map_err(|err| format!("{err}\nchild stderr: {stderr}"))?;
    if !stderr.is_empty() {
        return Err(format!("the child wrote to stderr: {stderr}").into());
    }
    if report.ready.is_some_and(|ready| ready != expected) {
        return Err(format!("the child found {:?} in the store", report.ready).into());
    }

    poison_load_cells();
    let store = load_store(db).map_err(|err| format!("the store does not open: {err}"))?;
    let found = all_generations()?;
    let files = value_files(db)?;
    let saves = store.generation();
    drop(store);
    for group in 0..GROUP_COUNT {
        let acked = report.acked.unwrap_or(expected).get(group).copied().unwrap_or_default();
        let newest = report.intents.get(group).copied().flatten();
        let newest = newest.unwrap_or_else(|| expected.get(group).copied().unwrap_or_default());
        let now = found.get(group).copied().unwrap_or_default();
        if now < acked {
            return Err(format!(
                "acknowledged save lost: group {group} was acknowledged at generation {acked}, \
                 the store holds {now} (found {found:?}, acked {:?})",
                report.acked
            )
            .into());
        }
        if newest < now {
            return Err(format!(
                "group {group} holds generation {now}, the child never wrote past {newest}"
            )
            .into());
        }
    }
    // `BIG` is the only cell large enough for a value file: one for its current
    // value, and one for its earlier value in each kept save.
    if LOAD_HISTORY + 1 < files {
        return Err(format!(
            "{files} value files after open, at most {} expected",
            LOAD_HISTORY + 1
        )
        .into());
    }
    Ok((report, found, saves))
}

/// A `load` child whose stdout a thread parses, and whose stderr another collects;
/// killed when dropped.
struct Watched {
    child: Child,
    ready: Receiver<[u64; GROUP_COUNT]>,
    stdout_reader: Option<JoinHandle<Result<LoadReport, String>>>,
    stderr_reader: Option<JoinHandle<String>>,
}

impl Watched {
    fn spawn(mut command: Command) -> TestResult<Watched> {
        let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
        let stdout = child.stdout.take().ok_or("child stdout is not piped")?;
        let mut stderr = child.stderr.take().ok_or("child stderr is not piped")?;
        let (sender, ready) = mpsc::channel();
        let stdout_reader = thread::spawn(move || read_reports(stdout, &sender));
        let stderr_reader = thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        Ok(Watched {
            child,
            ready,
            stdout_reader: Some(stdout_reader),
            stderr_reader: Some(stderr_reader),
        })
    }

    fn wait_ready(&self) -> TestResult {
        match self.ready.recv_timeout(PATIENCE) {
            Ok(_) => Ok(()),
            Err(RecvTimeoutError::Timeout) => {
                Err(format!("the child was not ready after {PATIENCE:?}").into())
            }
            Err(RecvTimeoutError::Disconnected) => Err("the child closed its stdout".into()),
        }
    }

    /// Kills the child, which must still be running, with `SIGKILL`.
    fn kill(&mut self) -> TestResult {
        if let Some(status) = self.child.try_wait()? {
            return Err(format!("the child exited before it was killed: {status}").into());
        }
        // On Unix, `Child::kill` sends SIGKILL.
        self.child.kill()?;
        let status = self.child.wait()?;
        if status.success() {
            return Err(format!("the killed child exited with {status}").into());
        }
        Ok(())
    }

    /// Makes sure the child is dead, then returns what it reported and everything
    /// it wrote to stderr.
    fn finish(&mut self) -> (TestResult<LoadReport>, String) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let stderr = match self.stderr_reader.take().map(JoinHandle::join) {
            Some(Ok(stderr)) => stderr,
            Some(Err(_)) => "<stderr reader panicked>".to_owned(),
            None => String::new(),
        };
        let report = match self.stdout_reader.take().map(JoinHandle::join) {
            Some(Ok(report)) => report.map_err(Into::into),
            Some(Err(_)) => Err("stdout reader panicked".into()),
            None => Err("stdout already read".into()),
        };
        (report, stderr)
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Parses the child's stdout until it closes, passing on its `ready` line.
fn read_reports(
    stdout: process::ChildStdout,
    ready: &Sender<[u64; GROUP_COUNT]>,
) -> Result<LoadReport, String> {
    let mut stdout = BufReader::new(stdout);
    let mut report = LoadReport::default();
    let mut line = String::new();
    loop {
        line.clear();
        match stdout.read_line(&mut line) {
            Ok(0) | Err(_) => return Ok(report),
            Ok(_) => {}
        }
        // A line cut short by the kill is not a report.
        let Some(whole) = line.strip_suffix('\n') else { return Ok(report) };
        if let Some(generations) = report.parse(whole)? {
            let _ = ready.send(generations);
        }
    }
}

/// xorshift64*: plenty for picking kill times.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> XorShift {
        // splitmix64's finalizer, so that close seeds (the clock's) start far apart.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        XorShift((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, bound: u64) -> u64 {
        (self.next() >> 32) % bound
    }
}

/// The seed `INSTASTATE_AUTOSAVE_SEED` gives, or one from the clock.
fn seed() -> u64 {
    env::var(SEED_VAR).ok().and_then(|seed| seed.parse().ok()).unwrap_or_else(|| {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |it| it.as_nanos());
        // Truncation is fine: any bits make a seed.
        #[allow(clippy::cast_possible_truncation)]
        let seed = (nanos as u64) ^ (u64::from(process::id()) << 32);
        seed
    })
}

/// How many value files the store in `dir` has.
fn value_files(dir: &Path) -> TestResult<usize> {
    let mut count = 0;
    for entry in std::fs::read_dir(dir.join("values"))? {
        if entry?.path().extension().is_some_and(|ext| ext == "val") {
            count += 1;
        }
    }
    Ok(count)
}

// ---------------------------------------------------------------------------------
// final_save_*: the final save when a process ends with autosave running
// ---------------------------------------------------------------------------------

static DROP_GUARD: StateCell<u64> = StateCell::new("autosave::final::DROP_GUARD", || 0);
static PANIC_WITH_GUARD: StateCell<u64> = StateCell::new("autosave::final::PANIC_WITH_GUARD", || 0);
static RETURN_WITH_GUARD: StateCell<u64> =
    StateCell::new("autosave::final::RETURN_WITH_GUARD", || 0);
static DROP_STORE: StateCell<u64> = StateCell::new("autosave::final::DROP_STORE", || 0);

const FINAL_VALUE: u64 = 0x5eed_cafe;
const PANIC_MESSAGE: &str = "deliberate panic with the autosave guard alive";

/// Child: sets a cell, drops the guard, and exits without `save_all`.
fn drop_guard_child(dir: &Path) -> TestResult {
    let store = Store::builder().cell(&DROP_GUARD).open(dir)?;
    let autosave = store.autosave(HOUR)?;
    DROP_GUARD.set(FINAL_VALUE);
    drop(autosave);
    Ok(())
}

/// Child: sets a cell and panics, with the guard alive in this frame.
fn panic_with_guard_child(dir: &Path) -> TestResult {
    let store = Store::builder().cell(&PANIC_WITH_GUARD).open(dir)?;
    let _autosave = store.autosave(HOUR)?;
    PANIC_WITH_GUARD.set(FINAL_VALUE);
    panic!("{PANIC_MESSAGE}");
}

/// Child: sets a cell and returns, with the guard alive in this frame.
fn return_with_guard_child(dir: &Path) -> TestResult {
    let store = Store::builder().cell(&RETURN_WITH_GUARD).open(dir)?;
    let _autosave = store.autosave(HOUR)?;
    RETURN_WITH_GUARD.set(FINAL_VALUE);
    Ok(())
}

/// Child: sets a cell and drops the store's only handle while the guard lives.
fn drop_store_child(dir: &Path) -> TestResult {
    let store = Store::builder().cell(&DROP_STORE).open(dir)?;
    let autosave = store.autosave(HOUR)?;
    DROP_STORE.set(FINAL_VALUE);
    drop(store);
    // The store is gone, so the guard has nothing left to save or to fail on.
    autosave.stop()?;
    Ok(())
}

/// Runs `role` on a fresh store to the end, checks how it ended, then reopens the
/// store with `cell` and checks the child's last change was saved, by one save.
fn check_final_save(role: &str, cell: &'static StateCell<u64>, should_panic: bool) -> TestResult {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("db");
    let output = run_child(role, &db)?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if should_panic {
        // libtest exits with 101 when a test panics.
        if output.status.code() != Some(101) || !stderr.contains(PANIC_MESSAGE) {
            return Err(describe(role, "did not panic as planned", &output).into());
        }
    } else if !output.status.success() {
        return Err(describe(role, "failed", &output).into());
    }
    cell.set(0);
    let store = Store::builder().cell(cell).open(&db)?;
    if cell.get() != FINAL_VALUE {
        return Err(describe(role, &format!("left {:#x} in the store", cell.get()), &output).into());
    }
    // The period is an hour: the final save is the only one.
    if store.generation() != 1 {
        return Err(format!("{role}: {} saves, expected 1", store.generation()).into());
    }
    Ok(())
}

#[test]
fn final_save_on_guard_drop() -> TestResult {
    check_final_save(ROLE_DROP_GUARD, &DROP_GUARD, false)
}

#[test]
fn final_save_when_panicking_with_guard_alive() -> TestResult {
    check_final_save(ROLE_PANIC_WITH_GUARD, &PANIC_WITH_GUARD, true)
}

#[test]
fn final_save_when_returning_with_guard_alive() -> TestResult {
    check_final_save(ROLE_RETURN_WITH_GUARD, &RETURN_WITH_GUARD, false)
}

#[test]
fn final_save_when_last_store_handle_dropped() -> TestResult {
    check_final_save(ROLE_DROP_STORE, &DROP_STORE, false)
}

static STOP_INSIDE: StateCell<u64> = StateCell::new("autosave::inside::STOP_INSIDE", || 0);
static CLOSE_INSIDE: StateCell<u64> = StateCell::new("autosave::inside::CLOSE_INSIDE", || 0);

/// Child: stops autosave inside `atomically`, and prints what `stop` returned.
fn stop_inside_atomically_child(dir: &Path) -> TestResult {
    let store = Store::builder().cell(&STOP_INSIDE).open(dir)?;
    let autosave = store.autosave(HOUR)?;
    STOP_INSIDE.set(1);
    let res = instastate::atomically(|| autosave.stop());
    report(&io::stdout(), &format!("returned {res:?}"))?;
    // The thread makes the final save once the block has ended; `close` waits for it.
    store.close()?;
    Ok(())
}

/// Child: closes an autosaving store inside `atomically`, and prints what `close`
/// returned.
fn close_inside_atomically_child(dir: &Path) -> TestResult {
    let store = Store::builder().cell(&CLOSE_INSIDE).open(dir)?;
    let _autosave = store.autosave(HOUR)?;
    CLOSE_INSIDE.set(1);
    let res = instastate::atomically(|| store.close());
    report(&io::stdout(), &format!("returned {res:?}"))?;
    Ok(())
}

/// `Autosave::stop` and `Store::close` (with autosave running) inside `atomically`.
///
/// A save there would wait for the block it runs in, so both refuse with
/// `Error::InsideAtomically` instead of hanging. `stop` leaves the final save to
/// the autosave thread, which makes it once the block has ended. `close` consumes
/// the store's last handle, whose final save cannot run: it is reported to the
/// hook (stderr by default) instead.
#[test]
fn stop_or_close_inside_atomically_refuses_without_hanging() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut children = Vec::new();
    for role in [ROLE_STOP_INSIDE_ATOMICALLY, ROLE_CLOSE_INSIDE_ATOMICALLY] {
        let mut command = child_command(role, &dir.path().join(role))?;
        let child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
        children.push((role, child));
    }
    let started = Instant::now();
    for (role, mut child) in children {
        // A save takes milliseconds; a child still running after this is stuck.
        while child.try_wait()?.is_none() && started.elapsed() < PATIENCE {
            thread::sleep(Duration::from_millis(10));
        }
        let running = child.try_wait()?.is_none();
        if running {
            child.kill()?;
        }
        let output = child.wait_with_output()?;
        if running || !output.status.success() {
            return Err(describe(role, "hung or failed", &output).into());
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !stdout.contains("returned Err(InsideAtomically") {
            return Err(describe(role, "did not refuse with InsideAtomically", &output).into());
        }
        if role == ROLE_CLOSE_INSIDE_ATOMICALLY
            && !String::from_utf8_lossy(&output.stderr).contains("inside `atomically`")
        {
            return Err(describe(role, "the lost final save was not reported", &output).into());
        }
    }
    STOP_INSIDE.set(0);
    let _store =
        Store::builder().cell(&STOP_INSIDE).open(dir.path().join(ROLE_STOP_INSIDE_ATOMICALLY))?;
    if STOP_INSIDE.get() != 1 {
        return Err("the final save after `stop` inside `atomically` was not made".into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// In-process tests
// ---------------------------------------------------------------------------------

/// Whether `Flaky<ID>` values fail to serialize, per `ID`, so that each test has its own.
static FAIL: [AtomicBool; 5] = [const { AtomicBool::new(false) }; 5];

/// A number that fails to serialize while `FAIL[ID]` is set.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
struct Flaky<const ID: usize>(u64);

impl<const ID: usize> Flaky<ID> {
    fn fail(on: bool) {
        if let Some(flag) = FAIL.get(ID) {
            flag.store(on, Ordering::SeqCst);
        }
    }
}

impl<const ID: usize> Serialize for Flaky<ID> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if FAIL.get(ID).is_some_and(|flag| flag.load(Ordering::SeqCst)) {
            return Err(S::Error::custom("told to fail"));
        }
        serializer.serialize_newtype_struct("Flaky", &self.0)
    }
}

/// Sends what each background error the hook sees is: the name of the cell of an
/// `Encode` error, or the error's description.
fn hook_channel(store: &Store) -> Receiver<Result<String, String>> {
    let (sender, errors) = mpsc::channel();
    store.on_background_error(move |err| {
        let _ = sender.send(encode_error_cell(err).map(str::to_owned).ok_or_else(|| chain(err)));
    });
    errors
}

/// Waits for the hook to report the encoding error of `cell` twice, for at most
/// `PATIENCE` each.
///
/// Twice, because the error becomes pending for the next explicit call only after
/// the hook returns (see `explicit_call_while_hook_runs_misses_the_error`): the
/// second report proves that the first one is done.
fn wait_for_hook(errors: &Receiver<Result<String, String>>, cell: &str) -> TestResult {
    for _ in 0..2 {
        let hooked =
            errors.recv_timeout(PATIENCE).map_err(|err| format!("hook not called: {err}"))?;
        if hooked.as_deref() != Ok(cell) {
            return Err(format!("the hook saw {hooked:?}, not an encode error of `{cell}`").into());
        }
    }
    Ok(())
}

fn encode_error_cell(err: &Error) -> Option<&str> {
    match err {
        Error::Encode { cell, .. } => Some(cell),
        _ => None,
    }
}

/// Checks `res` is the `Background` error of store `dir`, wrapping the encoding
/// error of `cell`.
fn check_background_encode(res: instastate::Result<()>, dir: &Path, cell: &str) -> TestResult {
    match res {
        Err(Error::Background { path, source, .. })
            if path == dir && encode_error_cell(&source) == Some(cell) =>
        {
            Ok(())
        }
        Err(err) => Err(format!("expected a background encode error of `{cell}`: {err:?}").into()),
        Ok(()) => Err(format!("expected a background encode error of `{cell}`, got Ok").into()),
    }
}

/// Waits until `done` holds, for at most `PATIENCE`; returns whether it held.
fn wait_until(mut done: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    while started.elapsed() < PATIENCE {
        if done() {
            return true;
        }
        thread::sleep(Duration::from_millis(1));
    }
    done()
}

static HOOKED: StateCell<Flaky<0>> = StateCell::new("autosave::errors::HOOKED", Flaky::default);

#[test]
fn background_error_reaches_hook_and_next_save() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::builder().cell(&HOOKED).open(dir.path())?;
    store.save_all()?;
    let errors = hook_channel(&store);
    let autosave = store.autosave(Duration::from_millis(5))?;
    Flaky::<0>::fail(true);
    HOOKED.set(Flaky(7));
    wait_for_hook(&errors, HOOKED.name())?;
    Flaky::<0>::fail(false);
    let res = store.save_all();
    check_background_encode(res, dir.path(), HOOKED.name())?;
    store.save_all()?;
    if store.has_unsaved_changes() {
        return Err("save_all returned Ok but left changes unsaved".into());
    }
    drop((autosave, store));
    HOOKED.set(Flaky(0));
    let _store = Store::builder().cell(&HOOKED).open(dir.path())?;
    if HOOKED.get() != Flaky(7) {
        return Err(format!("reopened store holds {:?}", HOOKED.get()).into());
    }
    Ok(())
}

static CLOSED_AFTER_ERROR: StateCell<Flaky<1>> =
    StateCell::new("autosave::errors::CLOSED_AFTER_ERROR", Flaky::default);

/// `close` returns a pending background error, and still makes the final save.
#[test]
fn close_returns_background_error_and_still_saves() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::builder().cell(&CLOSED_AFTER_ERROR).open(dir.path())?;
    let errors = hook_channel(&store);
    let autosave = store.autosave(Duration::from_millis(5))?;
    Flaky::<1>::fail(true);
    CLOSED_AFTER_ERROR.set(Flaky(3));
    wait_for_hook(&errors, CLOSED_AFTER_ERROR.name())?;
    Flaky::<1>::fail(false);
    let res = store.close();
    check_background_encode(res, dir.path(), CLOSED_AFTER_ERROR.name())?;
    autosave.stop()?;
    CLOSED_AFTER_ERROR.set(Flaky(0));
    let _store = Store::builder().cell(&CLOSED_AFTER_ERROR).open(dir.path())?;
    if CLOSED_AFTER_ERROR.get() != Flaky(3) {
        return Err(format!("the final save was not made: {:?}", CLOSED_AFTER_ERROR.get()).into());
    }
    Ok(())
}

static STOPPED_AFTER_ERROR: StateCell<Flaky<2>> =
    StateCell::new("autosave::errors::STOPPED_AFTER_ERROR", Flaky::default);

/// `Autosave::stop` after a background error that no call returned yet.
#[test]
fn stop_after_background_error() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::builder().cell(&STOPPED_AFTER_ERROR).open(dir.path())?;
    let errors = hook_channel(&store);
    let autosave = store.autosave(Duration::from_millis(5))?;
    Flaky::<2>::fail(true);
    STOPPED_AFTER_ERROR.set(Flaky(5));
    wait_for_hook(&errors, STOPPED_AFTER_ERROR.name())?;
    Flaky::<2>::fail(false);
    let res = autosave.stop();
    check_background_encode(res, dir.path(), STOPPED_AFTER_ERROR.name())?;
    // The pending error is returned, and the final save is still made.
    if store.has_unsaved_changes() {
        return Err("stop returned the pending error without the final save".into());
    }
    Ok(())
}

static DROPPED_AFTER_ERROR: StateCell<Flaky<3>> =
    StateCell::new("autosave::errors::DROPPED_AFTER_ERROR", Flaky::default);

/// Dropping the guard after a background error that no call returned yet.
#[test]
fn drop_after_background_error() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::builder().cell(&DROPPED_AFTER_ERROR).open(dir.path())?;
    let errors = hook_channel(&store);
    let autosave = store.autosave(Duration::from_millis(5))?;
    Flaky::<3>::fail(true);
    DROPPED_AFTER_ERROR.set(Flaky(6));
    wait_for_hook(&errors, DROPPED_AFTER_ERROR.name())?;
    Flaky::<3>::fail(false);
    drop(autosave);
    // The final save is made, and the pending error stays pending, unwrapped, for
    // the next explicit call; the hook does not see it twice.
    if store.has_unsaved_changes() {
        return Err("the dropped guard did not make the final save".into());
    }
    let mut again = Vec::new();
    while let Ok(hooked) = errors.try_recv() {
        again.push(hooked);
    }
    if again.iter().any(|hooked| hooked.as_ref().is_err_and(|text| text.contains("background"))) {
        return Err(format!("the hook saw the pending error again: {again:?}").into());
    }
    check_background_encode(store.save_all(), dir.path(), DROPPED_AFTER_ERROR.name())?;
    store.save_all()?;
    Ok(())
}

static RACED: StateCell<Flaky<4>> = StateCell::new("autosave::errors::RACED", Flaky::default);

/// An explicit call made while the hook reports a failed background save.
#[test]
fn explicit_call_while_hook_runs_sees_the_error() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::builder().cell(&RACED).open(dir.path())?;
    let (sender, errors) = mpsc::channel();
    let (resume, resumed) = mpsc::channel::<()>();
    // The hook must be `Sync`, and a `Receiver` is not.
    let resumed = Mutex::new(resumed);
    store.on_background_error(move |err| {
        let _ = sender.send(encode_error_cell(err).map(str::to_owned));
        // Hold the autosave thread in the hook until the test has made its call.
        let _ = resumed.lock().map(|it| it.recv_timeout(PATIENCE));
    });
    let autosave = store.autosave(Duration::from_millis(5))?;
    Flaky::<4>::fail(true);
    RACED.set(Flaky(8));
    let hooked = errors.recv_timeout(PATIENCE).map_err(|err| format!("hook not called: {err}"))?;
    if hooked.as_deref() != Some(RACED.name()) {
        return Err(format!("the hook saw {hooked:?}").into());
    }
    Flaky::<4>::fail(false);
    // The background save has failed, and its error is being reported: this call
    // comes after the failure, so it should return it.
    let res = store.save_all();
    resume.send(())?;
    // The error was made pending before the hook ran, so this call returns it.
    check_background_encode(res, dir.path(), RACED.name())?;
    autosave.stop()?;
    Ok(())
}

/// How many `Gated` values started encoding, and how many of them may finish.
static GATED_ENTERED: AtomicU64 = AtomicU64::new(0);
static GATED_RELEASED: AtomicU64 = AtomicU64::new(1);

/// A number whose encoding waits, from the second encoding on, until the test
/// releases it (or `PATIENCE` is over).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
struct Gated(u64);

impl Serialize for Gated {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let entry = GATED_ENTERED.fetch_add(1, Ordering::SeqCst) + 1;
        let started = Instant::now();
        while GATED_RELEASED.load(Ordering::SeqCst) < entry && started.elapsed() < PATIENCE {
            thread::sleep(Duration::from_millis(1));
        }
        serializer.serialize_newtype_struct("Gated", &self.0)
    }
}

static GATED_FIRST: StateCell<Gated> = StateCell::new("autosave::gated::FIRST", Gated::default);
static GATED_SECOND: StateCell<Gated> = StateCell::new("autosave::gated::SECOND", Gated::default);

/// The store's last handle is dropped while a background save runs, so the
/// autosave thread drops it, and makes the final save; then the guard is stopped.
#[test]
fn stop_while_autosave_thread_makes_final_save() -> TestResult {
    let entered = || GATED_ENTERED.load(Ordering::SeqCst);
    let dir = tempfile::tempdir()?;
    let store = Store::builder().cell(&GATED_FIRST).cell(&GATED_SECOND).open(dir.path())?;
    let autosave = store.autosave(Duration::from_millis(1))?;
    // The first background save encodes FIRST (entry 1), then waits in SECOND (entry 2).
    if !wait_until(|| entered() == 2) {
        return Err(format!("the background save did not start: {} entries", entered()).into());
    }
    drop(store);
    GATED_FIRST.set(Gated(2));
    // The background save completes; its thread drops the last handle, and the
    // final save this makes waits in FIRST (entry 3).
    GATED_RELEASED.store(2, Ordering::SeqCst);
    if !wait_until(|| entered() == 3) {
        return Err(format!("the final save did not start: {} entries", entered()).into());
    }
    let (sender, stopped) = mpsc::channel();
    thread::spawn(move || sender.send(autosave.stop()));
    let early = stopped.recv_timeout(Duration::from_millis(300));
    GATED_RELEASED.store(u64::MAX, Ordering::SeqCst);
    // `stop` waits for the thread, and so for the final save it is making.
    if early.is_ok() {
        return Err(format!("stop returned before the final save was made: {early:?}").into());
    }
    stopped.recv_timeout(PATIENCE)?.map_err(|err| format!("stop failed: {err}"))?;
    // The final save is on disk.
    GATED_FIRST.set(Gated(0));
    if !wait_until(|| Store::builder().cell(&GATED_FIRST).open(dir.path()).is_ok()) {
        return Err("the store stayed locked".into());
    }
    if GATED_FIRST.get() != Gated(2) {
        return Err(format!("the final save was lost: {:?}", GATED_FIRST.get()).into());
    }
    Ok(())
}

static TWICE: StateCell<u64> = StateCell::new("autosave::api::TWICE", || 0);

#[test]
fn autosave_twice_is_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::builder().cell(&TWICE).open(dir.path())?;
    let first = store.autosave(HOUR)?;
    match store.clone().autosave(HOUR) {
        Err(Error::AutosaveRunning { path, .. }) if path == dir.path() => {}
        other => return Err(format!("second autosave: {other:?}").into()),
    }
    first.stop()?;
    // Once stopped, it can start again.
    store.autosave(HOUR)?.stop()?;
    Ok(())
}

static CLOSED: StateCell<u64> = StateCell::new("autosave::api::CLOSED", || 0);

/// `close` stops the autosave thread and saves; the guard then has nothing to do.
#[test]
fn close_stops_autosave_and_saves() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::builder().cell(&CLOSED).open(dir.path())?;
    let autosave = store.autosave(Duration::from_millis(5))?;
    let other = store.clone();
    CLOSED.set(11);
    store.close()?;
    if other.has_unsaved_changes() || other.generation() != 1 {
        return Err(format!("close saved nothing (generation {})", other.generation()).into());
    }
    // The store is still open through `other`, but nothing saves it any more.
    CLOSED.set(12);
    thread::sleep(Duration::from_millis(100));
    if !other.has_unsaved_changes() || other.generation() != 1 {
        return Err(format!("autosave ran after close (generation {})", other.generation()).into());
    }
    // "Nothing is saved if the store was closed in the meantime."
    autosave.stop()?;
    if !other.has_unsaved_changes() {
        return Err("the guard of a closed autosave saved".into());
    }
    drop(other);
    CLOSED.set(0);
    let _store = Store::builder().cell(&CLOSED).open(dir.path())?;
    if CLOSED.get() != 11 {
        return Err(format!("reopened store holds {}", CLOSED.get()).into());
    }
    Ok(())
}

static STOPPED: StateCell<u64> = StateCell::new("autosave::api::STOPPED", || 0);

#[test]
fn stop_saves() -> TestResult {
    let dir = tempfile::tempdir()?;
    {
        let store = Store::builder().cell(&STOPPED).open(dir.path())?;
        store.save_all()?;
        let autosave = store.autosave(HOUR)?;
        STOPPED.set(21);
        autosave.stop()?;
        if store.has_unsaved_changes() || store.generation() != 2 {
            return Err(format!("stop saved nothing (generation {})", store.generation()).into());
        }
    }
    STOPPED.set(0);
    let _store = Store::builder().cell(&STOPPED).open(dir.path())?;
    if STOPPED.get() != 21 {
        return Err(format!("reopened store holds {}", STOPPED.get()).into());
    }
    Ok(())
}

static IDLE: StateCell<u64> = StateCell::new("autosave::api::IDLE", || 0);

#[test]
fn no_save_without_changes() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::builder().cell(&IDLE).open(dir.path())?;
    let errors = hook_channel(&store);
    let autosave = store.autosave(Duration::from_millis(5))?;
    // The cell was never saved: the first period saves it.
    if !wait_until(|| store.generation() == 1) {
        return Err(format!("autosave did not save a new cell: {}", store.generation()).into());
    }
    // Twenty periods with nothing changed; reads are not changes.
    for _ in 0..20 {
        let _ = IDLE.get();
        thread::sleep(Duration::from_millis(5));
    }
    if store.generation() != 1 || store.history().len() != 1 {
        return Err(format!("autosave saved nothing new: {:?}", store.history()).into());
    }
    IDLE.set(1);
    if !wait_until(|| store.generation() == 2) {
        return Err(format!("autosave did not save a change: {}", store.generation()).into());
    }
    // Nothing changed since: the final save makes no save either.
    autosave.stop()?;
    if store.generation() != 2 {
        return Err(format!("the final save saved nothing new: {}", store.generation()).into());
    }
    if let Ok(err) = errors.try_recv() {
        return Err(format!("background error: {err:?}").into());
    }
    Ok(())
}

defstate! {
    /// The only registered cell of this binary: the global store's.
    #[name = "autosave::global::GLOBAL"]
    GLOBAL: u64 = 0;
}

/// The free function `instastate::autosave` works on the global store; this is
/// the only test that opens it.
#[test]
fn global_autosave() -> TestResult {
    match instastate::autosave(HOUR) {
        Err(Error::NotOpen) => {}
        other => return Err(format!("autosave without a global store: {other:?}").into()),
    }
    let dir = tempfile::tempdir()?;
    {
        let store = instastate::open(dir.path())?;
        let autosave = instastate::autosave(HOUR)?;
        if !matches!(instastate::autosave(HOUR), Err(Error::AutosaveRunning { .. })) {
            return Err("a second global autosave started".into());
        }
        GLOBAL.set(31);
        autosave.stop()?;
        if store.has_unsaved_changes() {
            return Err("stop left the global store unsaved".into());
        }
    }
    GLOBAL.set(0);
    let _store = instastate::open(dir.path())?;
    if GLOBAL.get() != 31 {
        return Err(format!("reopened global store holds {}", GLOBAL.get()).into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------

fn child_command(role: &str, dir: &Path) -> TestResult<Command> {
    let mut command = Command::new(env::current_exe()?);
    command
        .args(["--exact", "child", "--nocapture", "--test-threads=1"])
        .env(ROLE_VAR, role)
        .env(DIR_VAR, dir)
        .stdin(Stdio::null());
    Ok(command)
}

fn run_child(role: &str, dir: &Path) -> TestResult<Output> {
    Ok(child_command(role, dir)?.output()?)
}

fn describe(role: &str, what: &str, output: &Output) -> String {
    format!(
        "child `{role}` {what} ({})\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// An error with its sources, on one line.
fn chain(err: &Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(err) = source {
        text.push_str(": ");
        text.push_str(&err.to_string());
        source = err.source();
    }
    text
}
