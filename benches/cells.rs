//! instastate against raw baselines over the same bytes.
//!
//! Every row runs its own operation and a hand-written baseline over the same bytes
//! in one process, interleaved (ours, raw, raw, ours, ours, raw, ...: each round
//! alternates which side goes first) so that drift hits both, and reports the ratio
//! of their medians (ours / baseline; lower is better). Row (b) also reports the
//! peak RSS during our save (`VmHWM`, reset through `/proc/self/clear_refs`) as a
//! multiple of the state's encoded size.
//!
//! Row (f) has no raw baseline: it sets our save of one changed cell among 100,000
//! beside the same save among 16, so its ratio is how a save's cost grows with the
//! cells it does not write.
//!
//! Run with `cargo bench --bench cells` for every row, or name rows to run only
//! those: `cargo bench --bench cells -- f`, `cargo bench --bench cells -- b d`.
//! Other arguments (cargo passes `--bench`) are ignored.

mod common;

use std::{
    collections::BTreeMap,
    fs::{self, File},
    hint::black_box,
    io::{BufWriter, Write},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use instastate::{StateCell, Store};
use serde::{Deserialize, Serialize};

use crate::common::{Res, interleave, median, mount_of, percentile};

/// Runs of the rows timing a few fsyncs, (a) and (c): their times are bimodal (an
/// fsync that needs an ext4 journal commit costs milliseconds, one that does not
/// a fraction of one), so they take many runs for a stable median.
const FSYNC_RUNS: u32 = 101;
/// Untimed rounds before rows (a) and (c).
const WARM_UP: u32 = 3;
/// Runs of row (e).
const READ_RUNS: u32 = 31;
/// Runs of the 100 MiB rows, (b) and (d), each after one warm-up.
const LARGE_RUNS: u32 = 7;
/// Reads per run of row (e).
const READS: u32 = 2_000_000;
/// Bytes per value of the large maps.
const VALUE_LEN: usize = 1024;
/// Entries per large cell: 25 MiB of values each, 100 MiB in all.
const ENTRIES: u64 = 25 * 1024;
const MIB: f64 = 1024.0 * 1024.0;
/// Cells of row (f)'s large store, the scale the issue measured.
const MANY: usize = 100_000;
/// Cells of row (f)'s small store, as many as row (a) saves.
const FEW: usize = 16;
/// The rows a benchmark run can name.
const ROWS: [&str; 6] = ["a", "b", "c", "d", "e", "f"];

// ----------------------------------------------------------------------------
// Row (a): 16 small cells of mixed types.

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
struct Settings {
    volume: u8,
    theme: String,
    ratio: f32,
    enabled: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
enum Mode {
    Idle,
    Running(u32),
    Paused { since: i64 },
}

static S_U64: StateCell<u64> = StateCell::new("bench::S_U64", || 0);
static S_STRING: StateCell<String> = StateCell::new("bench::S_STRING", String::new);
static S_IDS: StateCell<Vec<u32>> = StateCell::new("bench::S_IDS", Vec::new);
static S_SETTINGS: StateCell<Settings> = StateCell::new("bench::S_SETTINGS", || Settings {
    volume: 7,
    theme: "dark".to_owned(),
    ratio: 1.5,
    enabled: true,
});
static S_OPTION: StateCell<Option<String>> = StateCell::new("bench::S_OPTION", || None);
static S_BOOL: StateCell<bool> = StateCell::new("bench::S_BOOL", || false);
static S_F64: StateCell<f64> = StateCell::new("bench::S_F64", || 0.0);
static S_MAP: StateCell<BTreeMap<String, u32>> = StateCell::new("bench::S_MAP", BTreeMap::new);
static S_I32: StateCell<i32> = StateCell::new("bench::S_I32", || 0);
static S_PAIR: StateCell<(u16, u16)> = StateCell::new("bench::S_PAIR", || (0, 0));
static S_NAMES: StateCell<Vec<String>> = StateCell::new("bench::S_NAMES", Vec::new);
static S_U128: StateCell<u128> = StateCell::new("bench::S_U128", || 0);
static S_OPT_U64: StateCell<Option<u64>> = StateCell::new("bench::S_OPT_U64", || None);
static S_DIGEST: StateCell<[u8; 16]> = StateCell::new("bench::S_DIGEST", || [0; 16]);
static S_POINTS: StateCell<Vec<(u32, f32)>> = StateCell::new("bench::S_POINTS", Vec::new);
static S_MODE: StateCell<Mode> = StateCell::new("bench::S_MODE", || Mode::Idle);

fn small_store(dir: &Path) -> Res<Store> {
    Ok(Store::builder()
        .cell(&S_U64)
        .cell(&S_STRING)
        .cell(&S_IDS)
        .cell(&S_SETTINGS)
        .cell(&S_OPTION)
        .cell(&S_BOOL)
        .cell(&S_F64)
        .cell(&S_MAP)
        .cell(&S_I32)
        .cell(&S_PAIR)
        .cell(&S_NAMES)
        .cell(&S_U128)
        .cell(&S_OPT_U64)
        .cell(&S_DIGEST)
        .cell(&S_POINTS)
        .cell(&S_MODE)
        .open(dir)?)
}

/// Writes to all 16 small cells, so that the next save writes every one.
fn touch_small(round: u32) {
    S_U64.set(u64::from(round) * 3);
    S_STRING.set(format!("user name number {round}"));
    S_IDS.set((round..round + 32).collect());
    S_SETTINGS.update(|it| {
        it.volume = it.volume.wrapping_add(1);
        it.ratio += 0.25;
        it.enabled = !it.enabled;
    });
    S_OPTION.set(Some(format!("last file {round}.txt")));
    S_BOOL.update(|it| *it = !*it);
    S_F64.set(f64::from(round) * 0.5);
    S_MAP.update(|map| {
        for key in 0..8u32 {
            map.insert(format!("key-{key}"), round + key);
        }
    });
    S_I32.set(-i32::try_from(round).unwrap_or(i32::MAX));
    S_PAIR.update(|pair| pair.0 = pair.0.wrapping_add(1));
    S_NAMES.set(vec!["alpha".into(), "beta".into(), format!("gamma {round}"), "delta".into()]);
    S_U128.update(|it| *it = it.wrapping_add(u128::MAX / 3));
    S_OPT_U64.set(Some(u64::from(round)));
    S_DIGEST.update(|it| it.rotate_left(1));
    S_POINTS.set((0..16u32).map(|i| (i + round, 0.5)).collect());
    S_MODE.set(match round % 3 {
        0 => Mode::Idle,
        1 => Mode::Running(round),
        _ => Mode::Paused { since: i64::from(round) },
    });
}

/// The raw encoding of the 16 small values: one postcard buffer.
fn encode_small() -> Res<Vec<u8>> {
    let buf = Vec::with_capacity(1024);
    let buf = postcard::to_extend(&*S_U64.read(), buf)?;
    let buf = postcard::to_extend(&*S_STRING.read(), buf)?;
    let buf = postcard::to_extend(&*S_IDS.read(), buf)?;
    let buf = postcard::to_extend(&*S_SETTINGS.read(), buf)?;
    let buf = postcard::to_extend(&*S_OPTION.read(), buf)?;
    let buf = postcard::to_extend(&*S_BOOL.read(), buf)?;
    let buf = postcard::to_extend(&*S_F64.read(), buf)?;
    let buf = postcard::to_extend(&*S_MAP.read(), buf)?;
    let buf = postcard::to_extend(&*S_I32.read(), buf)?;
    let buf = postcard::to_extend(&*S_PAIR.read(), buf)?;
    let buf = postcard::to_extend(&*S_NAMES.read(), buf)?;
    let buf = postcard::to_extend(&*S_U128.read(), buf)?;
    let buf = postcard::to_extend(&*S_OPT_U64.read(), buf)?;
    let buf = postcard::to_extend(&*S_DIGEST.read(), buf)?;
    let buf = postcard::to_extend(&*S_POINTS.read(), buf)?;
    let buf = postcard::to_extend(&*S_MODE.read(), buf)?;
    Ok(buf)
}

/// The raw small save: encode, write a temp file, fsync, rename, fsync the directory.
fn raw_small_save(dir: &Path) -> Res {
    let bytes = encode_small()?;
    let tmp = dir.join("small.tmp");
    let mut file = File::create(&tmp)?;
    file.write_all(&bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, dir.join("small.bin"))?;
    File::open(dir)?.sync_all()?;
    Ok(())
}

// ----------------------------------------------------------------------------
// Rows (b), (c), (d): 100 MiB in 4 large cells, plus one small cell beside them.

type Big = BTreeMap<u64, Vec<u8>>;
type Snapshot = (Big, Big, Big, Big);

static BIG0: StateCell<Big> = StateCell::new("bench::BIG0", BTreeMap::new);
static BIG1: StateCell<Big> = StateCell::new("bench::BIG1", BTreeMap::new);
static BIG2: StateCell<Big> = StateCell::new("bench::BIG2", BTreeMap::new);
static BIG3: StateCell<Big> = StateCell::new("bench::BIG3", BTreeMap::new);
static BIGS: [&StateCell<Big>; 4] = [&BIG0, &BIG1, &BIG2, &BIG3];
static TICK: StateCell<u64> = StateCell::new("bench::TICK", || 0);

fn big_builder() -> instastate::StoreBuilder {
    BIGS.iter().fold(Store::builder(), |builder, cell| builder.cell(*cell))
}

/// Fills each large cell with `ENTRIES` pseudo-random 1 KiB values.
fn fill_big() {
    let mut rng = 0x9E37_79B9_7F4A_7C15_u64;
    for (n, cell) in (0u64..).zip(BIGS) {
        let map: Big = (0..ENTRIES)
            .map(|i| {
                let mut value = Vec::with_capacity(VALUE_LEN);
                while value.len() < VALUE_LEN {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    value.extend_from_slice(&rng.to_le_bytes());
                }
                (n << 32 | i, value)
            })
            .collect();
        cell.set(map);
    }
}

/// Changes one entry of every large cell, so that the next save writes all four.
fn touch_big(round: u32) {
    let key = u64::from(round) % ENTRIES;
    for (n, cell) in (0u64..).zip(BIGS) {
        cell.update(|map| {
            if let Some(byte) = map.get_mut(&(n << 32 | key)).and_then(|value| value.first_mut()) {
                *byte = byte.wrapping_add(1);
            }
        });
    }
}

/// The raw large save: postcard straight into a buffered temp file, fsync, rename,
/// fsync the directory.
fn raw_big_save(dir: &Path) -> Res {
    let tmp = dir.join("snapshot.tmp");
    let writer = BufWriter::new(File::create(&tmp)?);
    let guards = (BIG0.read(), BIG1.read(), BIG2.read(), BIG3.read());
    let writer = postcard::to_io(&(&*guards.0, &*guards.1, &*guards.2, &*guards.3), writer)?;
    drop(guards);
    let file = writer.into_inner().map_err(std::io::IntoInnerError::into_error)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, snapshot_path(dir))?;
    File::open(dir)?.sync_all()?;
    Ok(())
}

fn snapshot_path(dir: &Path) -> PathBuf {
    dir.join("snapshot.bin")
}

/// The raw small write beside a large state: one insert in a plain sled database,
/// flushed, with its log fsynced.
struct RawSled {
    db: sled::Db,
    log: File,
}

impl RawSled {
    // The crate forbids opening sled outside its backend; this baseline must.
    #[allow(clippy::disallowed_methods)]
    fn open(dir: &Path) -> Res<RawSled> {
        // No background flusher, as in instastate's own sled configuration.
        let db = sled::Config::new().path(dir).flush_every_ms(None).open()?;
        let log = File::open(dir.join("db"))?;
        Ok(RawSled { db, log })
    }

    fn put(&self, value: u64) -> Res {
        self.db.insert(b"cell/bench::TICK", postcard::to_stdvec(&value)?)?;
        self.db.flush()?;
        self.log.sync_all()?;
        Ok(())
    }
}

// ----------------------------------------------------------------------------
// Row (e): a read of a cell against a read of a plain lock.

static HOT: StateCell<u64> = StateCell::new("bench::HOT", || 7);
static PLAIN: parking_lot::RwLock<u64> = parking_lot::RwLock::new(7);

fn read_cell_loop() -> Duration {
    let start = Instant::now();
    let mut sum = 0u64;
    for _ in 0..READS {
        sum = sum.wrapping_add(*black_box(&HOT).read());
    }
    black_box(sum);
    start.elapsed()
}

fn read_plain_loop() -> Duration {
    let start = Instant::now();
    let mut sum = 0u64;
    for _ in 0..READS {
        sum = sum.wrapping_add(*black_box(&PLAIN).read());
    }
    black_box(sum);
    start.elapsed()
}

// ----------------------------------------------------------------------------
// Row (f): one changed cell among 100,000 against one among 16.

/// `n_cells` new `u64` cells named `bench::{prefix}::{cell_idx}`. A store takes
/// `&'static` cells and these are made at run time, so they (and their names) are
/// leaked; the bench holds them until it exits anyway.
fn leak_cells(prefix: &str, n_cells: usize) -> Vec<&'static StateCell<u64>> {
    (0..n_cells)
        .map(|cell_idx| {
            let name: &'static str = format!("bench::{prefix}::{cell_idx:06}").leak();
            let cell: &'static StateCell<u64> = Box::leak(Box::new(StateCell::new(name, || 0)));
            cell
        })
        .collect()
}

fn cells_store(dir: &Path, cells: &[&'static StateCell<u64>]) -> Res<Store> {
    Ok(cells.iter().fold(Store::builder(), |builder, cell| builder.cell(*cell)).open(dir)?)
}

/// Changes one cell of `cells`, a different one each round: a prime stride moves
/// the change across the whole key range rather than along its first few keys.
fn touch_one(cells: &[&'static StateCell<u64>], round: u32) {
    let round = usize::try_from(round).unwrap_or(0);
    let cell_idx = round.wrapping_mul(7_919) % cells.len().max(1);
    if let Some(cell) = cells.get(cell_idx) {
        cell.update(|it| *it += 1);
    }
}

/// The bytes of the files under `path`: their lengths, and the blocks they take on
/// disk (sled's files can be sparse).
fn dir_size(path: &Path) -> Res<(u64, u64)> {
    let (mut len, mut allocated) = (0, 0);
    for entry in fs::read_dir(path)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            let (dir_len, dir_allocated) = dir_size(&entry.path())?;
            len += dir_len;
            allocated += dir_allocated;
        } else {
            len += meta.len();
            allocated += meta.blocks() * 512;
        }
    }
    Ok((len, allocated))
}

/// What row (f) measures once, outside its ratio.
struct Scale {
    /// Seconds to build and open the new store of `MANY` cells.
    open: f64,
    /// Seconds of its first save, which writes every cell.
    first_save: f64,
    /// Its directory's size after that save, and after the timed runs.
    after_first: (u64, u64),
    after_runs: (u64, u64),
    /// Seconds per save among `FEW` cells before the large store existed.
    few_alone: Vec<f64>,
}

// ----------------------------------------------------------------------------
// Measurement helpers.

fn timed(f: impl FnOnce() -> Res) -> Res<f64> {
    let start = Instant::now();
    f()?;
    Ok(start.elapsed().as_secs_f64())
}

/// Formats seconds with a readable unit.
fn fmt_secs(secs: f64) -> String {
    if secs < 1e-6 {
        format!("{:.2} ns", secs * 1e9)
    } else if secs < 1e-3 {
        format!("{:.1} µs", secs * 1e6)
    } else if secs < 1.0 {
        format!("{:.2} ms", secs * 1e3)
    } else {
        format!("{secs:.3} s")
    }
}

struct Row {
    name: &'static str,
    /// Per-run seconds (per operation for row (e)).
    ours: Vec<f64>,
    base: Vec<f64>,
    target: f64,
}

impl Row {
    fn new(name: &'static str, target: f64) -> Row {
        Row { name, ours: Vec::new(), base: Vec::new(), target }
    }

    fn ratio(&self) -> f64 {
        median(&self.ours) / median(&self.base)
    }
}

/// A field of `/proc/self/status` in KiB, such as `VmRSS` or `VmHWM`.
fn status_kib(field: &str) -> Option<u64> {
    proc_kib("/proc/self/status", field)
}

/// A `Field:   123 kB` line of a `/proc` file, in KiB.
fn proc_kib(file: &str, field: &str) -> Option<u64> {
    let text = fs::read_to_string(file).ok()?;
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Resets the peak RSS (`VmHWM`) to the current RSS.
fn reset_peak_rss() -> Res {
    Ok(fs::write("/proc/self/clear_refs", "5")?)
}

fn kib_to_bytes(kib: u64) -> f64 {
    // Exact for any RSS below 2^53 bytes.
    f64::from(u32::try_from(kib).unwrap_or(u32::MAX)) * 1024.0
}

fn len_f64(bytes: u64) -> f64 {
    let (high, low) = (bytes >> 32, bytes & 0xFFFF_FFFF);
    f64::from(u32::try_from(high).unwrap_or(u32::MAX)) * 4_294_967_296.0
        + f64::from(u32::try_from(low).unwrap_or(u32::MAX))
}

#[derive(Default)]
struct Memory {
    before: Vec<f64>,
    peak: Vec<f64>,
    base_peak: Vec<f64>,
    payload: f64,
}

// ----------------------------------------------------------------------------
// The rows.

impl Row {
    fn push(&mut self, (ours, base): (f64, f64)) {
        self.ours.push(ours);
        self.base.push(base);
    }
}

fn row_read() -> Res<Row> {
    let mut row = Row::new("(e) `read()` of a `StateCell<u64>` vs `parking_lot::RwLock<u64>`", 1.1);
    let per_op = f64::from(READS);
    // Warm up both (and initialise the cell).
    read_cell_loop();
    read_plain_loop();
    for round in 0..READ_RUNS {
        row.push(interleave(
            round,
            || Ok(read_cell_loop().as_secs_f64() / per_op),
            || Ok(read_plain_loop().as_secs_f64() / per_op),
        )?);
    }
    Ok(row)
}

fn row_small(root: &Path) -> Res<Row> {
    // A save also makes its witness durable (one more `fdatasync` than the raw
    // baseline), which the trust issue allowed up to 1.2 times the baseline.
    let mut row = Row::new("(a) save 16 small mixed cells vs temp file + fsync + rename", 1.2);
    let ours_dir = tempfile::tempdir_in(root)?;
    let raw_dir = tempfile::tempdir_in(root)?;
    let store = small_store(ours_dir.path())?;
    // Warm-up rounds for both (the first save creates every record).
    for round in 0..WARM_UP {
        touch_small(round);
        store.save_all()?;
        raw_small_save(raw_dir.path())?;
    }
    for round in WARM_UP..WARM_UP + FSYNC_RUNS {
        touch_small(round);
        row.push(interleave(
            round,
            || timed(|| Ok(store.save_all()?)),
            || timed(|| raw_small_save(raw_dir.path())),
        )?);
    }
    Ok(row)
}

fn row_big_save(store: &Store, raw_dir: &Path, memory: &mut Memory) -> Res<Row> {
    let mut row = Row::new("(b) save 100 MiB in 4 changed cells vs postcard snapshot file", 1.5);
    for round in 1..=LARGE_RUNS {
        touch_big(round);
        let ours = || {
            let before = status_kib("VmRSS").ok_or("no VmRSS")?;
            reset_peak_rss()?;
            let secs = timed(|| Ok(store.save_all()?))?;
            let peak = status_kib("VmHWM").ok_or("no VmHWM")?;
            memory.before.push(kib_to_bytes(before));
            memory.peak.push(kib_to_bytes(peak));
            Ok(secs)
        };
        let mut base_peak = 0.0;
        let base = || {
            reset_peak_rss()?;
            let secs = timed(|| raw_big_save(raw_dir))?;
            base_peak = kib_to_bytes(status_kib("VmHWM").ok_or("no VmHWM")?);
            Ok(secs)
        };
        row.push(interleave(round, ours, base)?);
        memory.base_peak.push(base_peak);
    }
    Ok(row)
}

fn row_small_beside_big(store: &Store, raw: &RawSled) -> Res<Row> {
    let mut row = Row::new(
        "(c) save 1 small cell beside 100 MiB unchanged vs sled insert + flush + fsync",
        2.0,
    );
    for round in 0..WARM_UP {
        TICK.set(u64::from(round));
        store.save_all()?;
        raw.put(u64::from(round))?;
    }
    for round in WARM_UP..WARM_UP + FSYNC_RUNS {
        TICK.set(u64::from(round));
        row.push(interleave(
            round,
            || timed(|| Ok(store.save_all()?)),
            || timed(|| raw.put(u64::from(round))),
        )?);
    }
    Ok(row)
}

/// Empties the large cells, outside any timing, so that no timed load pays for
/// dropping the old 100 MiB.
fn empty_big() {
    for cell in BIGS {
        cell.set(BTreeMap::new());
    }
}

fn row_load(ours_dir: &Path, raw_dir: &Path) -> Res<Row> {
    let mut row =
        Row::new("(d) open + load 100 MiB in 4 cells vs `fs::read` + `postcard::from_bytes`", 1.5);
    let raw_load = || -> Res<Snapshot> {
        let bytes = fs::read(snapshot_path(raw_dir))?;
        Ok(postcard::from_bytes(&bytes)?)
    };
    // Warm-up, which also checks that both sides load the same state.
    let expected: Vec<usize> = BIGS.iter().map(|cell| cell.read().len()).collect();
    empty_big();
    drop(big_builder().open(ours_dir)?);
    let loaded: Vec<usize> = BIGS.iter().map(|cell| cell.read().len()).collect();
    if loaded != expected {
        return Err(format!("open loaded {loaded:?} entries, expected {expected:?}").into());
    }
    let snapshot = raw_load()?;
    let same = *BIG0.read() == snapshot.0
        && *BIG1.read() == snapshot.1
        && *BIG2.read() == snapshot.2
        && *BIG3.read() == snapshot.3;
    drop(snapshot);
    if !same {
        return Err("the raw snapshot and the loaded cells differ".into());
    }
    for round in 0..LARGE_RUNS {
        let ours = || {
            empty_big();
            let mut store = None;
            let secs = timed(|| {
                store = Some(big_builder().open(ours_dir)?);
                Ok(())
            })?;
            drop(store);
            Ok(secs)
        };
        let base = || {
            let mut snapshot = None;
            let secs = timed(|| {
                snapshot = Some(raw_load()?);
                Ok(())
            })?;
            drop(snapshot);
            Ok(secs)
        };
        row.push(interleave(round, ours, base)?);
    }
    Ok(row)
}

fn row_many(root: &Path) -> Res<(Row, Scale)> {
    let mut row = Row::new("(f) save 1 changed `u64` cell among 100,000 vs among 16", 2.0);
    let few = leak_cells("few", FEW);
    let few_dir = tempfile::tempdir_in(root)?;
    let few_store = cells_store(few_dir.path(), &few)?;
    few_store.save_all()?;
    // Beside the large store, the small store's saves slow down: the large one's
    // saves leave the allocator's heap fragmented, and every allocation after them
    // pays. So the ratio's baseline is not the small save a program without the
    // large store sees; this reference, taken before the large store exists, shows
    // how far apart the two are.
    let mut few_alone = Vec::new();
    for round in 0..WARM_UP + FSYNC_RUNS {
        touch_one(&few, round);
        let secs = timed(|| Ok(few_store.save_all()?))?;
        if WARM_UP <= round {
            few_alone.push(secs);
        }
    }
    let many = leak_cells("many", MANY);
    let many_dir = tempfile::tempdir_in(root)?;
    let start = Instant::now();
    let many_store = cells_store(many_dir.path(), &many)?;
    let open = start.elapsed().as_secs_f64();
    let first_save = timed(|| Ok(many_store.save_all()?))?;
    let after_first = dir_size(many_dir.path())?;
    for round in 0..WARM_UP {
        touch_one(&many, round);
        touch_one(&few, round);
        many_store.save_all()?;
        few_store.save_all()?;
    }
    for round in WARM_UP..WARM_UP + FSYNC_RUNS {
        touch_one(&many, round);
        touch_one(&few, round);
        row.push(interleave(
            round,
            || timed(|| Ok(many_store.save_all()?)),
            || timed(|| Ok(few_store.save_all()?)),
        )?);
    }
    drop(many_store);
    let after_runs = dir_size(many_dir.path())?;
    Ok((row, Scale { open, first_save, after_first, after_runs, few_alone }))
}

fn machine(root: &Path) -> String {
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
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
    let mem_gib =
        proc_kib("/proc/meminfo", "MemTotal").map_or(0.0, |kib| kib_to_bytes(kib) / MIB / 1024.0);
    let fs_type = mount_of(root).unwrap_or_else(|| "unknown".to_owned());
    format!(
        "nproc {cpus}, {model}, {mem_gib:.1} GiB RAM, Linux {kernel}; temp dirs under {} ({fs_type})",
        root.display()
    )
}

fn print_table(rows: &[Row], memory: &Memory, scale: Option<&Scale>) {
    println!("| row | ours (median) | baseline (median) | ratio | target | met? |");
    println!("|---|---|---|---|---|---|");
    for row in rows {
        let ratio = row.ratio();
        println!(
            "| {} | {} | {} | {ratio:.2} | <= {:.1} | {} |",
            row.name,
            fmt_secs(median(&row.ours)),
            fmt_secs(median(&row.base)),
            row.target,
            if ratio <= row.target { "yes" } else { "NO" },
        );
    }
    if !memory.peak.is_empty() {
        print_memory(memory);
    }
    if let Some(scale) = scale {
        println!();
        println!(
            "(f) ours is the save among {MANY} cells, the baseline the save among {FEW}. The \
             store of {MANY} cells: open {}, first save (every cell) {}; directory after it \
             {:.1} MiB ({:.1} MiB on disk), after the timed saves {:.1} MiB ({:.1} MiB on disk).",
            fmt_secs(scale.open),
            fmt_secs(scale.first_save),
            len_f64(scale.after_first.0) / MIB,
            len_f64(scale.after_first.1) / MIB,
            len_f64(scale.after_runs.0) / MIB,
            len_f64(scale.after_runs.1) / MIB,
        );
        let alone = median(&scale.few_alone);
        let among_many = rows.iter().find(|row| row.name.starts_with("(f)")).map(|row| &row.ours);
        println!(
            "(f) the save among {FEW} alone, before the large store existed: {} (p10 {}, p90 \
             {}); the save among {MANY} against it: {:.2}.",
            fmt_secs(alone),
            fmt_secs(percentile(&scale.few_alone, 10)),
            fmt_secs(percentile(&scale.few_alone, 90)),
            among_many.map_or(f64::NAN, |ours| median(ours) / alone),
        );
    }
    println!();
    println!("Spread (p10 / p90, ours ; baseline):");
    for row in rows {
        println!(
            "- {}: {} / {} ; {} / {}",
            row.name.split(' ').next().unwrap_or_default(),
            fmt_secs(percentile(&row.ours, 10)),
            fmt_secs(percentile(&row.ours, 90)),
            fmt_secs(percentile(&row.base, 10)),
            fmt_secs(percentile(&row.base, 90)),
        );
    }
}

/// The memory lines of row (b).
fn print_memory(memory: &Memory) {
    let peak = median(&memory.peak) / memory.payload;
    let worst = memory.peak.iter().copied().fold(0.0, f64::max) / memory.payload;
    println!(
        "| (b) peak RSS during our save / state payload ({:.1} MiB) | {peak:.2}x (worst {worst:.2}x) | {:.2}x during the raw save | | <= 1.5x | {} |",
        memory.payload / MIB,
        median(&memory.base_peak) / memory.payload,
        if worst <= 1.5 { "yes" } else { "NO" },
    );
    println!();
    println!(
        "RSS just before our 100 MiB save: {:.1} MiB ({:.2}x the payload); peak during it: {:.1} MiB (+{:.1} MiB).",
        median(&memory.before) / MIB,
        median(&memory.before) / memory.payload,
        median(&memory.peak) / MIB,
        (median(&memory.peak) - median(&memory.before)) / MIB,
    );
}

fn main() -> Res {
    // Arguments naming rows select them; others (cargo passes `--bench`) are ignored.
    let named: Vec<String> =
        std::env::args().skip(1).filter(|arg| ROWS.contains(&arg.as_str())).collect();
    let runs = |row: &str| named.is_empty() || named.iter().any(|it| it == row);
    let started = Instant::now();
    let root = std::env::temp_dir();
    println!("# instastate benchmarks: ours vs raw baseline, medians, interleaved runs");
    println!();
    println!("Machine: {}", machine(&root));
    println!(
        "Runs (interleaved, alternating which side goes first): {FSYNC_RUNS} for rows (a) and \
         (c) after {WARM_UP} warm-ups; {LARGE_RUNS} for rows (b) and (d) after one warm-up; \
         {READ_RUNS} for row (e), of {READS} reads each (time per read); {FSYNC_RUNS} for row \
         (f) after the first save of both stores and {WARM_UP} warm-ups (and before them, \
         {FSYNC_RUNS} of the small store alone)."
    );
    println!();

    let mut rows = Vec::new();
    if runs("a") {
        rows.push(row_small(&root)?);
        eprintln!("(a) done at {:.1} s", started.elapsed().as_secs_f64());
    }

    let mut memory = Memory::default();
    if runs("b") || runs("c") || runs("d") {
        let ours_dir = tempfile::tempdir_in(&root)?;
        let raw_dir = tempfile::tempdir_in(&root)?;
        let sled_dir = tempfile::tempdir_in(&root)?;
        {
            let store = big_builder().cell(&TICK).open(ours_dir.path())?;
            fill_big();
            eprintln!("state built at {:.1} s", started.elapsed().as_secs_f64());
            // Warm-up: the first save of each side creates the files (which row (d)
            // loads, whether or not (b) and (c) run).
            store.save_all()?;
            raw_big_save(raw_dir.path())?;
            memory.payload = len_f64(fs::metadata(snapshot_path(raw_dir.path()))?.len());
            if runs("b") {
                rows.push(row_big_save(&store, raw_dir.path(), &mut memory)?);
                eprintln!("(b) done at {:.1} s", started.elapsed().as_secs_f64());
            }
            if runs("c") {
                let raw = RawSled::open(sled_dir.path())?;
                rows.push(row_small_beside_big(&store, &raw)?);
                eprintln!("(c) done at {:.1} s", started.elapsed().as_secs_f64());
            }
        }
        if runs("d") {
            rows.push(row_load(ours_dir.path(), raw_dir.path())?);
            eprintln!("(d) done at {:.1} s", started.elapsed().as_secs_f64());
        }
        empty_big();
    }
    if runs("e") {
        rows.push(row_read()?);
        eprintln!("(e) done at {:.1} s", started.elapsed().as_secs_f64());
    }
    let mut scale = None;
    if runs("f") {
        let (row, measured) = row_many(&root)?;
        rows.push(row);
        scale = Some(measured);
        eprintln!("(f) done at {:.1} s", started.elapsed().as_secs_f64());
    }

    print_table(&rows, &memory, scale.as_ref());
    println!();
    println!("Total bench time: {:.1} s.", started.elapsed().as_secs_f64());
    Ok(())
}
