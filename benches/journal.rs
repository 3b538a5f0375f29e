//! The prevalence layer (`instastate::Prevayler`) against raw baselines over the same
//! bytes, and against the `prevayler-rs` crate.
//!
//! Every row runs our operation and its baseline in one process, interleaved (each
//! round alternates which side goes first, so that drift and leftovers such as dirty
//! pages hit both), and reports the medians of the rounds and their ratio. Throughput
//! rows are in events per second and their ratio is ours / baseline (higher is
//! better); recovery rows are in seconds and their ratio is ours / baseline (lower is
//! better).
//!
//! The raw baselines write the same frames instastate's journal holds
//! (`len u32 LE | crc32 u32 LE | payload`, the payload being a format-version byte, a
//! kind byte, the event number and the timestamp as `u64 LE`, then the postcard
//! event), take a timestamp per event, and apply each event to the same state, so that
//! each does the same work as `handle` minus the library. The run prints the journal
//! bytes per event of both, to show that they match.
//!
//! Rows: (1) `Durability::SyncEach`, 1 thread, against `write_all` + `fdatasync` per
//! event; (2) `Durability::GroupCommit`, 16 threads on one `Prevayler`, against a
//! minimal Mutex + Condvar leader/follower group-commit writer, and (2b) the same
//! figure against row (1); (3) `Durability::Unsynced` against a `BufWriter` append;
//! (4) `Prevayler::open` replaying 1,000,000 events (no snapshot), page cache warm,
//! against `fs::read` + frame walk + crc + decode + apply; (5) and (6) our unsynced
//! `handle` and our recovery against `prevayler-rs` (JSON lines, a write but never an
//! fsync per event; its 1,000,000-event redolog is written through its own
//! serializer, as its `execute_transaction` would take minutes).
//!
//! Run with `cargo bench --bench journal`. Unknown arguments (cargo passes `--bench`)
//! are ignored. Temp dirs are made under cargo's target tmp dir, which must be on a
//! real disk: an fsync on tmpfs is free, and the durable rows would mean nothing.

mod common;

use std::{
    fs::{self, File, OpenOptions},
    io::{BufWriter, Write},
    path::{Path, PathBuf},
    sync::{Condvar, Mutex, MutexGuard},
    thread,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use instastate::{Prevayler, Timestamp, prevalence::Durability};
use serde::{Deserialize, Serialize};

use crate::common::{Res, interleave, median, mount_of, percentile};

/// Events per round of row (1), one `fdatasync` each.
const SYNC_EVENTS: u64 = 1_000;
/// Rounds of rows (1) and (2).
const SYNC_RUNS: u32 = 15;
/// Untimed rounds before rows (1), (2), (4) and (6).
const WARM_UP: u32 = 2;
/// Threads of row (2).
const THREADS: u64 = 16;
/// Events per thread per round of row (2).
const EVENTS_PER_THREAD: u64 = 256;
/// Events per round of row (3).
const UNSYNCED_EVENTS: u64 = 1_000_000;
/// Rounds of row (3).
const UNSYNCED_RUNS: u32 = 9;
/// Events in the journals that rows (4) and (6) recover.
const RECOVERY_EVENTS: u64 = 1_000_000;
/// Rounds of rows (4) and (6).
const RECOVERY_RUNS: u32 = 7;
/// Events per round of row (5): `prevayler-rs` makes one blocking-pool write per event.
const THEIR_EVENTS: u64 = 20_000;
/// Rounds of row (5).
const THEIR_RUNS: u32 = 7;
/// Accounts in the bank state.
const ACCOUNTS: u32 = 1024;
/// `prevayler-rs`'s default redolog size, in events per file.
const THEIR_LOG_EVENTS: u64 = 64_000;
/// The format-version byte that starts each raw payload.
const FRAME_VERSION: u8 = 1;
/// The kind byte that follows it: an event.
const FRAME_KIND_EVENT: u8 = 0;
/// Bytes of the raw journal's header, standing in for instastate's.
const RAW_HEADER: &[u8; 16] = b"raw-journal-v1\0\0";

// ----------------------------------------------------------------------------
// The events and the state: a small bank.

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
enum Command {
    Deposit { who: u32, amount: i64 },
    Transfer { from: u32, to: u32, amount: i64 },
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
struct Bank {
    balances: Vec<i64>,
    applied: u64,
}

impl Bank {
    fn new() -> Bank {
        Bank { balances: vec![0; ACCOUNTS as usize], applied: 0 }
    }
}

/// Applies one event; cheap, so that the rows time the journal, not the state.
fn apply(bank: &mut Bank, command: Command) {
    bank.applied += 1;
    match command {
        Command::Deposit { who, amount } => {
            if let Some(balance) = bank.balances.get_mut(who as usize) {
                *balance += amount;
            }
        }
        Command::Transfer { from, to, amount } => {
            if let Some(balance) = bank.balances.get_mut(from as usize) {
                *balance -= amount;
            }
            if let Some(balance) = bank.balances.get_mut(to as usize) {
                *balance += amount;
            }
        }
    }
}

impl prevayler_rs::Transaction<Bank> for Command {
    fn execute(self, data: &mut Bank) {
        apply(data, self);
    }
}

/// The `n`th event of a run: a pure function of `n` (splitmix64), so that every
/// thread and every side makes the same events.
fn command(n: u64) -> Command {
    let mut z = n.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let low = u32::try_from(z & 0xFFFF_FFFF).unwrap_or(0);
    let high = u32::try_from(z >> 32).unwrap_or(0);
    let amount = i64::from(high % 10_000);
    if z.is_multiple_of(4) {
        Command::Deposit { who: low % ACCOUNTS, amount }
    } else {
        Command::Transfer { from: low % ACCOUNTS, to: (low >> 10) % ACCOUNTS, amount }
    }
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| u64::try_from(since.as_micros()).unwrap_or(u64::MAX))
}

// ----------------------------------------------------------------------------
// The raw journal: the same frames, written and read by hand.

/// Appends one frame (`len | crc | version, kind, number, micros, postcard event`) to `out`.
fn encode_frame(out: &mut Vec<u8>, number: u64, micros: u64, command: &Command) -> Res {
    let start = out.len();
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&[FRAME_VERSION, FRAME_KIND_EVENT]);
    out.extend_from_slice(&number.to_le_bytes());
    out.extend_from_slice(&micros.to_le_bytes());
    *out = postcard::to_extend(command, std::mem::take(out))?;
    let payload = out.get(start + 8..).ok_or("frame out of bounds")?;
    let len = u32::try_from(payload.len())?.to_le_bytes();
    let crc = crc32fast::hash(payload).to_le_bytes();
    let head = out.get_mut(start..start + 8).ok_or("frame out of bounds")?;
    let (len_bytes, crc_bytes) = head.split_at_mut(4);
    len_bytes.copy_from_slice(&len);
    crc_bytes.copy_from_slice(&crc);
    Ok(())
}

fn create_raw(path: &Path) -> Res<File> {
    let mut file = OpenOptions::new().create_new(true).append(true).open(path)?;
    file.write_all(RAW_HEADER)?;
    file.sync_all()?;
    File::open(path.parent().ok_or("no parent")?)?.sync_all()?;
    Ok(file)
}

/// Raw row (1): per event, frame, `write_all`, `fdatasync`, apply.
fn raw_sync_loop(path: &Path, bank: &mut Bank, events: u64) -> Res<f64> {
    let mut file = create_raw(path)?;
    let mut frame = Vec::with_capacity(64);
    let start = Instant::now();
    for n in 0..events {
        let event = command(n);
        frame.clear();
        encode_frame(&mut frame, n, now_micros(), &event)?;
        file.write_all(&frame)?;
        file.sync_data()?;
        apply(bank, event);
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Raw row (3): per event, frame into a `BufWriter` and apply; flushed at the end.
fn raw_buffered_loop(path: &Path, bank: &mut Bank, events: u64) -> Res<f64> {
    let file = create_raw(path)?;
    let mut writer = BufWriter::with_capacity(64 * 1024, file);
    let mut frame = Vec::with_capacity(64);
    let start = Instant::now();
    for n in 0..events {
        let event = command(n);
        frame.clear();
        encode_frame(&mut frame, n, now_micros(), &event)?;
        writer.write_all(&frame)?;
        apply(bank, event);
    }
    writer.flush()?;
    Ok(start.elapsed().as_secs_f64())
}

/// The raw group-commit writer of row (2): callers append their frame to a shared
/// buffer under a mutex; whoever finds no write in flight becomes the leader, writes
/// the whole buffer and fdatasyncs it outside the lock, and wakes the followers whose
/// frames that covered.
struct GroupWriter {
    file: File,
    state: Mutex<GroupState>,
    synced: Condvar,
}

struct GroupState {
    buf: Vec<u8>,
    spare: Vec<u8>,
    next_number: u64,
    synced_number: u64,
    writing: bool,
    bank: Bank,
}

fn lock<T>(mutex: &Mutex<T>) -> Res<MutexGuard<'_, T>> {
    mutex.lock().map_err(|_| "poisoned mutex".into())
}

impl GroupWriter {
    fn create(path: &Path) -> Res<GroupWriter> {
        Ok(GroupWriter {
            file: create_raw(path)?,
            state: Mutex::new(GroupState {
                buf: Vec::with_capacity(64 * 1024),
                spare: Vec::with_capacity(64 * 1024),
                next_number: 0,
                synced_number: 0,
                writing: false,
                bank: Bank::new(),
            }),
            synced: Condvar::new(),
        })
    }

    /// Journals `event` durably, then applies it.
    fn append(&self, event: Command) -> Res {
        let mut state = lock(&self.state)?;
        let number = state.next_number;
        state.next_number += 1;
        encode_frame(&mut state.buf, number, now_micros(), &event)?;
        loop {
            if state.synced_number > number {
                apply(&mut state.bank, event);
                return Ok(());
            }
            if state.writing {
                state = self.synced.wait(state).map_err(|_| "poisoned mutex")?;
                continue;
            }
            state.writing = true;
            let spare = std::mem::take(&mut state.spare);
            let batch = std::mem::replace(&mut state.buf, spare);
            let upto = state.next_number;
            drop(state);
            let res = (&self.file).write_all(&batch).and_then(|()| self.file.sync_data());
            state = lock(&self.state)?;
            state.writing = false;
            state.spare = batch;
            state.spare.clear();
            if res.is_ok() {
                state.synced_number = upto;
            }
            self.synced.notify_all();
            res?;
        }
    }
}

/// Raw row (2): `THREADS` threads, each appending `EVENTS_PER_THREAD` events.
fn raw_group_commit(path: &Path) -> Res<f64> {
    let writer = GroupWriter::create(path)?;
    let start = Instant::now();
    run_threads(|n| writer.append(command(n)))?;
    let secs = start.elapsed().as_secs_f64();
    let state = lock(&writer.state)?;
    if state.bank.applied != THREADS * EVENTS_PER_THREAD {
        return Err("the raw group writer lost events".into());
    }
    Ok(secs)
}

/// Runs `handle` for `THREADS * EVENTS_PER_THREAD` events on `THREADS` threads.
fn run_threads(handle: impl Fn(u64) -> Res + Sync) -> Res {
    thread::scope(|scope| {
        let workers: Vec<_> = (0..THREADS)
            .map(|thread| {
                let handle = &handle;
                scope.spawn(move || -> Res {
                    for i in 0..EVENTS_PER_THREAD {
                        handle(thread * EVENTS_PER_THREAD + i)?;
                    }
                    Ok(())
                })
            })
            .collect();
        workers.into_iter().try_for_each(|worker| worker.join().map_err(|_| "a thread panicked")?)
    })
}

/// Writes `events` frames to a raw journal at `path`, buffered, then fsyncs it.
fn write_raw_journal(path: &Path, events: u64) -> Res {
    let mut bank = Bank::new();
    raw_buffered_loop(path, &mut bank, events)?;
    File::open(path)?.sync_all()?;
    Ok(())
}

/// Raw row (4): `fs::read`, then per frame: bounds, crc, version, event number,
/// postcard decode, apply.
fn raw_recover(path: &Path) -> Res<Bank> {
    let bytes = fs::read(path)?;
    let mut rest = bytes.strip_prefix(RAW_HEADER).ok_or("bad raw header")?;
    let mut bank = Bank::new();
    let mut expected = 0u64;
    while let Some((head, tail)) = rest.split_first_chunk::<8>() {
        let [l0, l1, l2, l3, c0, c1, c2, c3] = *head;
        let len = usize::try_from(u32::from_le_bytes([l0, l1, l2, l3]))?;
        let (payload, tail) = tail.split_at_checked(len).ok_or("torn frame")?;
        if crc32fast::hash(payload) != u32::from_le_bytes([c0, c1, c2, c3]) {
            return Err("bad crc".into());
        }
        let (&[version, kind], payload) = payload.split_first_chunk::<2>().ok_or("short frame")?;
        let (number, payload) = payload.split_first_chunk::<8>().ok_or("short frame")?;
        let (_micros, payload) = payload.split_first_chunk::<8>().ok_or("short frame")?;
        if version != FRAME_VERSION
            || kind != FRAME_KIND_EVENT
            || u64::from_le_bytes(*number) != expected
        {
            return Err("bad frame".into());
        }
        apply(&mut bank, postcard::from_bytes(payload)?);
        expected += 1;
        rest = tail;
    }
    Ok(bank)
}

// ----------------------------------------------------------------------------
// prevayler-rs: JSON lines, one `async-std` blocking-pool write + flush per event,
// never an fsync.

type Theirs = prevayler_rs::Prevayler<Command, Bank, prevayler_rs::serializer::JsonSerializer>;

fn their_open(dir: &Path) -> Res<Theirs> {
    let builder = prevayler_rs::PrevaylerBuilder::new()
        .path(dir.to_path_buf())
        .serializer(prevayler_rs::serializer::JsonSerializer::new())
        .data(Bank::new());
    async_std::task::block_on(builder.build())
        .map_err(|err| format!("prevayler-rs: {err:?}").into())
}

/// Their row (5): `events` calls of `execute_transaction` on a new redolog.
fn their_loop(dir: &Path, events: u64) -> Res<f64> {
    let mut theirs = their_open(dir)?;
    let start = Instant::now();
    async_std::task::block_on(async {
        for n in 0..events {
            theirs
                .execute_transaction(command(n))
                .await
                .map_err(|err| format!("prevayler-rs: {err:?}"))?;
        }
        Ok::<(), String>(())
    })?;
    let secs = start.elapsed().as_secs_f64();
    if theirs.query().applied != events {
        return Err("prevayler-rs lost events".into());
    }
    Ok(secs)
}

/// Writes the redolog `prevayler-rs` would write for `events` events, through its
/// own serializer, split into files of its default size, and fsyncs it. (Writing it
/// through `execute_transaction` would take minutes.)
fn write_their_journal(dir: &Path, events: u64) -> Res {
    use prevayler_rs::serializer::Serializer as _;
    let serializer = prevayler_rs::serializer::JsonSerializer::new();
    let mut n = 0;
    for index in 0.. {
        if n >= events {
            break;
        }
        let path = dir.join(format!("redolog.log.{index:0>10}"));
        let mut writer = BufWriter::new(File::create(&path)?);
        for _ in 0..THEIR_LOG_EVENTS.min(events - n) {
            let line = serializer
                .serialize(&command(n))
                .map_err(|err| format!("prevayler-rs: {err:?}"))?;
            writer.write_all(&line)?;
            n += 1;
        }
        writer.into_inner().map_err(std::io::IntoInnerError::into_error)?.sync_all()?;
    }
    File::open(dir)?.sync_all()?;
    Ok(())
}

// ----------------------------------------------------------------------------
// Measurement helpers.

/// Exact for any count below 2^53.
fn count_f64(n: u64) -> f64 {
    let (high, low) = (n >> 32, n & 0xFFFF_FFFF);
    f64::from(u32::try_from(high).unwrap_or(u32::MAX)) * 4_294_967_296.0
        + f64::from(u32::try_from(low).unwrap_or(u32::MAX))
}

/// Formats a rate with thousands separators.
fn fmt_rate(per_sec: f64) -> String {
    if !per_sec.is_finite() {
        return "n/a".to_owned();
    }
    // Rates here are far below 2^53.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let digits = (per_sec.round() as u64).to_string();
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    format!("{out} ev/s")
}

fn fmt_secs(secs: f64) -> String {
    if secs < 1.0 { format!("{:.1} ms", secs * 1e3) } else { format!("{secs:.3} s") }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Unit {
    /// Samples are events per second; higher is better.
    Rate,
    /// Samples are seconds; lower is better.
    Secs,
}

/// What a row must reach to meet its target.
#[derive(Clone, Copy)]
enum Target {
    /// ours / baseline at least this.
    RatioAtLeast(f64),
    /// ours / baseline at most this.
    RatioAtMost(f64),
    /// ours at least this many events per second.
    RateAtLeast(f64),
    /// No target: reported for comparison.
    None,
}

struct Row {
    name: &'static str,
    baseline: &'static str,
    unit: Unit,
    target: Target,
    ours: Vec<f64>,
    base: Vec<f64>,
}

impl Row {
    fn new(name: &'static str, baseline: &'static str, unit: Unit, target: Target) -> Row {
        Row { name, baseline, unit, target, ours: Vec::new(), base: Vec::new() }
    }

    fn push(&mut self, (ours, base): (f64, f64)) {
        self.ours.push(ours);
        self.base.push(base);
    }

    fn ratio(&self) -> f64 {
        median(&self.ours) / median(&self.base)
    }

    fn fmt(&self, value: f64) -> String {
        match self.unit {
            Unit::Rate => fmt_rate(value),
            Unit::Secs => fmt_secs(value),
        }
    }

    /// The target as text, and whether it is met.
    fn verdict(&self) -> (String, Option<bool>) {
        let ratio = self.ratio();
        match self.target {
            Target::RatioAtLeast(min) => (format!(">= {min:.1}x"), Some(ratio >= min)),
            Target::RatioAtMost(max) => (format!("<= {max:.1}x"), Some(ratio <= max)),
            Target::RateAtLeast(min) => {
                (format!("ours >= {}", fmt_rate(min)), Some(median(&self.ours) >= min))
            }
            Target::None => ("(none)".to_owned(), None),
        }
    }
}

/// A fresh, empty directory for one run of one side.
struct Dirs {
    root: PathBuf,
}

impl Dirs {
    fn fresh(&self) -> Res<tempfile::TempDir> {
        Ok(tempfile::tempdir_in(&self.root)?)
    }
}

/// Runs one round of three sides, rotating which goes first.
fn rotate3(
    round: u32,
    mut first: impl FnMut() -> Res<f64>,
    mut second: impl FnMut() -> Res<f64>,
    mut third: impl FnMut() -> Res<f64>,
) -> Res<(f64, f64, f64)> {
    let mut out = [f64::NAN; 3];
    for k in 0..3 {
        let side = (round + k) % 3;
        let secs = match side {
            0 => first()?,
            1 => second()?,
            _ => third()?,
        };
        if let Some(slot) = out.get_mut(side as usize) {
            *slot = secs;
        }
    }
    let [a, b, c] = out;
    Ok((a, b, c))
}

/// The summed size of the files in `dir` whose names start with `prefix`.
fn files_len(dir: &Path, prefix: &str) -> Res<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(prefix) {
            total += entry.metadata()?.len();
        }
    }
    Ok(total)
}

// ----------------------------------------------------------------------------
// Our side.

type Ours = Prevayler<Bank, Command>;

fn our_apply(bank: &mut Bank, event: Command, _at: Timestamp) {
    apply(bank, event);
}

fn our_open(dir: &Path, durability: Durability) -> Res<Ours> {
    Ok(Prevayler::builder().durability(durability).open(dir, Bank::new(), our_apply)?)
}

/// Ours, rows (1), (3) and (5): `events` calls of `handle` on a new journal, then
/// `close` (untimed: for `Unsynced` it writes and fdatasyncs the rest).
fn our_loop(dir: &Path, durability: Durability, events: u64) -> Res<f64> {
    let ours = our_open(dir, durability)?;
    let start = Instant::now();
    for n in 0..events {
        ours.handle(command(n))?;
    }
    let secs = start.elapsed().as_secs_f64();
    if ours.events() != events || ours.read(|bank| bank.applied) != events {
        return Err("instastate lost events".into());
    }
    ours.close()?;
    Ok(secs)
}

/// Ours, row (2): `THREADS` threads calling `handle` on one `GroupCommit` journal.
fn our_group_commit(dir: &Path) -> Res<f64> {
    let ours = our_open(dir, Durability::GroupCommit)?;
    let start = Instant::now();
    run_threads(|n| Ok(ours.handle(command(n))?))?;
    let secs = start.elapsed().as_secs_f64();
    if ours.events() != THREADS * EVENTS_PER_THREAD {
        return Err("instastate lost events".into());
    }
    ours.close()?;
    Ok(secs)
}

/// Ours, row (4): open (replaying the whole journal), untimed close.
fn our_recover(dir: &Path) -> Res<(f64, Bank)> {
    let start = Instant::now();
    let ours = Ours::open(dir, Bank::new(), our_apply)?;
    let secs = start.elapsed().as_secs_f64();
    let bank = ours.read(Bank::clone);
    let recovered = ours.recovered();
    if recovered.snapshot().is_some() || recovered.replayed() != RECOVERY_EVENTS {
        return Err("open did not replay the whole journal".into());
    }
    ours.close()?;
    if files_len(dir, "snapshot-")? != 0 {
        return Err("a snapshot was written: recovery would not replay the journal".into());
    }
    Ok((secs, bank))
}

// ----------------------------------------------------------------------------
// The rows.

fn rate(events: u64, secs: f64) -> f64 {
    count_f64(events) / secs
}

fn rows_durable(dirs: &Dirs) -> Res<[Row; 3]> {
    let mut single = Row::new(
        "(1) durable `handle`, 1 thread (SyncEach)",
        "write_all + fdatasync per event",
        Unit::Rate,
        Target::RatioAtLeast(0.8),
    );
    let mut group = Row::new(
        "(2) durable `handle`, 16 threads (GroupCommit)",
        "raw group-commit writer, 16 threads",
        Unit::Rate,
        Target::RatioAtLeast(1.0),
    );
    let total = THREADS * EVENTS_PER_THREAD;
    for round in 0..WARM_UP + SYNC_RUNS {
        let dir = dirs.fresh()?;
        let ones = interleave(
            round,
            || {
                Ok(rate(
                    SYNC_EVENTS,
                    our_loop(&dir.path().join("ours1"), Durability::SyncEach, SYNC_EVENTS)?,
                ))
            },
            || {
                let mut bank = Bank::new();
                Ok(rate(
                    SYNC_EVENTS,
                    raw_sync_loop(&dir.path().join("raw1"), &mut bank, SYNC_EVENTS)?,
                ))
            },
        )?;
        let sixteens = interleave(
            round,
            || Ok(rate(total, our_group_commit(&dir.path().join("ours16"))?)),
            || Ok(rate(total, raw_group_commit(&dir.path().join("raw16"))?)),
        )?;
        if round >= WARM_UP {
            single.push(ones);
            group.push(sixteens);
        }
    }
    let scaling = Row {
        name: "(2b) durable `handle`, 16 threads vs 1 thread",
        baseline: "ours, 1 thread (row 1)",
        unit: Unit::Rate,
        target: Target::RatioAtLeast(4.0),
        ours: group.ours.clone(),
        base: single.ours.clone(),
    };
    Ok([single, group, scaling])
}

fn row_unsynced(dirs: &Dirs) -> Res<Row> {
    let mut row = Row::new(
        "(3) unsynced `handle`, 1 thread (Unsynced)",
        "BufWriter append",
        Unit::Rate,
        Target::RateAtLeast(1_000_000.0),
    );
    for round in 0..UNSYNCED_RUNS {
        let dir = dirs.fresh()?;
        row.push(interleave(
            round,
            || {
                let path = dir.path().join("ours");
                Ok(rate(UNSYNCED_EVENTS, our_loop(&path, Durability::Unsynced, UNSYNCED_EVENTS)?))
            },
            || {
                let mut bank = Bank::new();
                let secs = raw_buffered_loop(&dir.path().join("raw"), &mut bank, UNSYNCED_EVENTS)?;
                File::open(dir.path().join("raw"))?.sync_data()?;
                Ok(rate(UNSYNCED_EVENTS, secs))
            },
        )?);
    }
    Ok(row)
}

fn row_their_handle(dirs: &Dirs) -> Res<Row> {
    let mut row = Row::new(
        "(5) unsynced `handle`, 1 thread (Unsynced)",
        "prevayler-rs `execute_transaction` (JSON, write per event, no fsync)",
        Unit::Rate,
        Target::None,
    );
    for round in 0..THEIR_RUNS {
        let dir = dirs.fresh()?;
        row.push(interleave(
            round,
            || {
                let path = dir.path().join("ours");
                Ok(rate(THEIR_EVENTS, our_loop(&path, Durability::Unsynced, THEIR_EVENTS)?))
            },
            || {
                let path = dir.path().join("theirs");
                fs::create_dir(&path)?;
                Ok(rate(THEIR_EVENTS, their_loop(&path, THEIR_EVENTS)?))
            },
        )?);
    }
    Ok(row)
}

/// Sizes of the three recovered journals, in bytes per event.
struct JournalSizes {
    ours: f64,
    raw: f64,
    theirs: f64,
}

fn rows_recovery(dirs: &Dirs) -> Res<([Row; 2], JournalSizes)> {
    let mut raw_row = Row::new(
        "(4) recovery of 1,000,000 events (`Prevayler::open`)",
        "fs::read + walk frames + crc + postcard decode + apply",
        Unit::Secs,
        Target::RatioAtMost(2.0),
    );
    let mut their_row = Row::new(
        "(6) recovery of 1,000,000 events (`Prevayler::open`)",
        "prevayler-rs `build()` replaying its JSON redolog",
        Unit::Secs,
        Target::None,
    );
    let ours_dir = dirs.fresh()?;
    our_loop(ours_dir.path(), Durability::Unsynced, RECOVERY_EVENTS)?;
    let raw_dir = dirs.fresh()?;
    let raw_path = raw_dir.path().join("journal");
    write_raw_journal(&raw_path, RECOVERY_EVENTS)?;
    let their_dir = dirs.fresh()?;
    write_their_journal(their_dir.path(), RECOVERY_EVENTS)?;
    let events = count_f64(RECOVERY_EVENTS);
    let sizes = JournalSizes {
        ours: count_f64(files_len(ours_dir.path(), "journal-")?) / events,
        raw: count_f64(fs::metadata(&raw_path)?.len()) / events,
        theirs: count_f64(files_len(their_dir.path(), "redolog")?) / events,
    };
    // The state every side must recover.
    let expected = raw_recover(&raw_path)?;
    for round in 0..WARM_UP + RECOVERY_RUNS {
        let (ours, raw, theirs) = rotate3(
            round,
            || {
                let (secs, bank) = our_recover(ours_dir.path())?;
                if bank != expected {
                    return Err("instastate recovered another state".into());
                }
                Ok(secs)
            },
            || {
                let start = Instant::now();
                let bank = raw_recover(&raw_path)?;
                let secs = start.elapsed().as_secs_f64();
                if bank != expected {
                    return Err("the raw reader recovered another state".into());
                }
                Ok(secs)
            },
            || {
                let start = Instant::now();
                let theirs = their_open(their_dir.path())?;
                let secs = start.elapsed().as_secs_f64();
                if theirs.query() != &expected {
                    return Err("prevayler-rs recovered another state".into());
                }
                Ok(secs)
            },
        )?;
        if round >= WARM_UP {
            raw_row.push((ours, raw));
            their_row.push((ours, theirs));
        }
    }
    Ok(([raw_row, their_row], sizes))
}

fn print_table(rows: &[Row]) {
    println!(
        "| row | ours (median) | baseline | baseline (median) | ratio ours/baseline | target | met? |"
    );
    println!("|---|---|---|---|---|---|---|");
    for row in rows {
        let (target, met) = row.verdict();
        println!(
            "| {} | {} | {} | {} | {:.2}x | {target} | {} |",
            row.name,
            row.fmt(median(&row.ours)),
            row.baseline,
            row.fmt(median(&row.base)),
            row.ratio(),
            match met {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "-",
            },
        );
    }
    println!();
    println!("Spread (p10 / p90, ours ; baseline):");
    for row in rows {
        println!(
            "- {}: {} / {} ; {} / {}",
            row.name.split(' ').next().unwrap_or_default(),
            row.fmt(percentile(&row.ours, 10)),
            row.fmt(percentile(&row.ours, 90)),
            row.fmt(percentile(&row.base, 10)),
            row.fmt(percentile(&row.base, 90)),
        );
    }
}

fn machine(root: &Path) -> String {
    let cpus = thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split(':').nth(1))
                .map(|model| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".to_owned(), |it| it.trim().to_owned());
    let fs_type = mount_of(root).unwrap_or_else(|| "unknown".to_owned());
    format!("nproc {cpus}, {model}, Linux {kernel}; temp dirs under {} ({fs_type})", root.display())
}

fn main() -> Res {
    // Arguments (cargo passes `--bench`) are ignored.
    let started = Instant::now();
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    fs::create_dir_all(&root)?;
    if mount_of(&root).is_some_and(|mount| mount.starts_with("tmpfs")) {
        eprintln!("warning: {} is on tmpfs, where fsync is free", root.display());
    }
    let dirs = Dirs { root: root.clone() };
    println!("# instastate prevalence benchmarks: medians of interleaved runs");
    println!();
    println!("Machine: {}", machine(&root));
    println!(
        "Runs: {SYNC_RUNS} for rows (1), (2) after {WARM_UP} warm-ups ({SYNC_EVENTS} events \
         per run of row (1), {THREADS} threads x {EVENTS_PER_THREAD} events per run of row \
         (2)); {UNSYNCED_RUNS} for row (3) of {UNSYNCED_EVENTS} events; {RECOVERY_RUNS} for \
         rows (4), (6) after {WARM_UP} warm-ups (page cache warm); {THEIR_RUNS} for row (5) \
         of {THEIR_EVENTS} events."
    );
    println!();

    let mut rows = Vec::new();
    rows.extend(rows_durable(&dirs)?);
    eprintln!("(1), (2) done at {:.1} s", started.elapsed().as_secs_f64());
    rows.push(row_unsynced(&dirs)?);
    eprintln!("(3) done at {:.1} s", started.elapsed().as_secs_f64());
    let ([raw_recovery, their_recovery], sizes) = rows_recovery(&dirs)?;
    eprintln!("(4), (6) done at {:.1} s", started.elapsed().as_secs_f64());
    rows.push(raw_recovery);
    rows.push(row_their_handle(&dirs)?);
    eprintln!("(5) done at {:.1} s", started.elapsed().as_secs_f64());
    rows.push(their_recovery);

    print_table(&rows);
    println!();
    println!(
        "Journal bytes per event: instastate {:.1}, raw {:.1}, prevayler-rs {:.1} (JSON lines).",
        sizes.ours, sizes.raw, sizes.theirs
    );
    let raw_fsync = rows.first().map_or(f64::NAN, |row| median(&row.base));
    let raw_read = rows
        .iter()
        .find(|row| row.name.starts_with("(4)"))
        .map_or(f64::NAN, |row| median(&row.base));
    println!(
        "The issue measured a raw append + fdatasync at about 6,500 ev/s and a raw read-and-decode \
         of 1,000,000 events at about 0.2 s; here they are {} and {}.",
        fmt_rate(raw_fsync),
        fmt_secs(raw_read),
    );
    println!(
        "prevayler-rs never fsyncs: it writes each event to the OS (one async-std blocking-pool \
         write + flush), so row (5) compares it with our Unsynced mode; our durable 1-thread \
         figure is row (1)."
    );
    println!();
    println!("Total bench time: {:.1} s.", started.elapsed().as_secs_f64());
    Ok(())
}
