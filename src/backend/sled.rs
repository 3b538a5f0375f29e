//! The sled backend: the only module that names `sled`.
//!
//! sled 0.34 needs three things added to be durable (see `ARCHITECTURE.md`):
//! - its `flush` uses `sync_file_range`, which neither flushes the disk cache nor
//!   file metadata, so every commit also fsyncs the log file;
//! - it creates and renames snapshot files without fsyncing their directory, so a
//!   commit also fsyncs the directory whenever its entries changed;
//! - it writes nodes larger than 128 KiB to `blobs/` without fsync; our records are
//!   kept small enough that this never happens, and should it happen anyway those
//!   files are fsynced too.
//!
//! Compaction writes the live records into a fresh engine in `sled.new`, then swaps
//! the directories; `open` finishes or discards a swap that a crash interrupted.
//!
//! Three more traps of sled 0.34, found by failing its system calls in child
//! processes (`tests/fault_shim.rs`), are worked around here:
//! - every open writes a snapshot to `snap.<lsn>.generating` and renames it; an
//!   interrupted write leaves the partial file, which the next open takes for the
//!   newest snapshot and refuses as corrupt. A `.generating` file is never
//!   complete (sled fsyncs before it renames), so `open` deletes it first;
//! - when a background write of its log fails, sled records the error without
//!   waking the threads that wait in `flush`, which can then wait forever. A second
//!   call to `flush` finds the error and wakes them, so while a flush waits, a
//!   watchdog keeps calling it ([`flush`]);
//! - dropping an engine flushes and fsyncs its log and unwraps the result: after a
//!   failed fsync it panics. Closing is done by [`Sled::close`], which contains the
//!   panic and reports it as an error; during a panic's unwinding the engine is
//!   leaked instead, since a second panic would abort the process.

use std::{
    ffi::OsString,
    io::{self, Read, Write},
    panic::{self, AssertUnwindSafe},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use parking_lot::{Mutex, RwLock};

use super::{Backend, Batch, Records};
use crate::{
    Error, Result,
    error::StorageError,
    io::{Io, IoFile, Open, Stamp, parent_of, retry_while_held},
};

// Our records are small and read once at open, so a small cache is plenty; sled's
// default of 1 GiB lets its memory grow far beyond what the data needs.
const CACHE_CAPACITY: u64 = 8 * 1024 * 1024;

// How long to wait for a lock that sled has not yet released after a close.
const LOCK_WAIT: Duration = Duration::from_secs(5);

pub(crate) struct Sled {
    // `None` once closed, or after a compaction failed to reopen.
    engine: RwLock<Option<Engine>>,
    dir: PathBuf,
    io: Io,
    // The entries of the engine's directories when they were last fsynced. A
    // directory fsync costs a disk cache flush, and is needed only when sled
    // created, renamed or deleted a file, which it rarely does.
    synced: Mutex<Synced>,
}

struct Engine {
    db: sled::Db,
    // sled gives no way to fsync its log, so we keep our own handle to it.
    log: IoFile,
    // Wakes the flushes that sled leaves waiting (see the module docs).
    watchdog: Watchdog,
}

/// A thread that calls `flush` again while a flush has been waiting too long.
struct Watchdog {
    shared: Arc<Watch>,
    thread: Option<thread::JoinHandle<()>>,
}

struct Watch {
    // When the flush under way started, in microseconds since `epoch`; 0: none.
    started: AtomicU64,
    epoch: Instant,
    stop: Mutex<bool>,
    wake: parking_lot::Condvar,
}

#[derive(Default)]
struct Synced {
    // The engine's directory as it was when last synced.
    engine: Option<Stamp>,
    // The blob directory's, and its entries.
    blobs_stamp: Option<Stamp>,
    blobs: Listing,
}

// Names and inode numbers, sorted: a renamed or replaced file changes it.
type Listing = Vec<(OsString, u64)>;

impl Sled {
    pub(crate) fn open(io: &Io, dir: &Path) -> Result<Sled> {
        finish_swap(io, dir).map_err(Error::io(dir))?;
        let engine = Engine::open(io, dir)?;
        let sled = Sled {
            engine: RwLock::new(Some(engine)),
            dir: dir.to_path_buf(),
            io: io.clone(),
            synced: Mutex::default(),
        };
        // sled writes its `conf` file once, when it creates the engine, and never
        // syncs it.
        let conf = dir.join("conf");
        let synced = io.open(&conf, Open::Read).and_then(|conf| conf.sync_all());
        let synced = synced.and_then(|()| sled.sync_files(sled.engine.read().as_ref()));
        if let Err(err) = synced {
            // Whatever closing reports, the open failed for this reason.
            let _ = Backend::close(&sled);
            return Err(Error::io(dir)(err));
        }
        Ok(sled)
    }

    /// Reads every record of the engine in `dir` without changing anything there.
    ///
    /// sled cannot open its files read-only (every open writes a snapshot), so the
    /// files are copied to a temporary directory (in the system's, as large as the
    /// engine's files), and the copy opened and deleted. The copy is what
    /// [`open`](Self::open) would open: the engine an interrupted compaction left
    /// complete, and no half-written snapshot. No engine at all reads as no
    /// records, as `open` would create an empty one.
    ///
    /// Errors name the engine's files, where they are about them, and the copy's
    /// when making or opening the copy failed (a full temporary directory, say):
    /// only the former say anything about the store.
    pub(crate) fn read_copy(io: &Io, dir: &Path) -> Result<Records> {
        let new = new_dir(dir);
        // As `finish_swap` decides: a new engine beside the old one is incomplete.
        let source = if new.exists() && !dir.exists() {
            new
        } else if dir.exists() {
            dir.to_path_buf()
        } else {
            return Ok(Records::new());
        };
        let temp = tempfile::Builder::new()
            .prefix(".instastate-read-")
            .tempdir()
            .map_err(Error::io(std::env::temp_dir()))?;
        let copy = temp.path().join("sled");
        copy_engine(io, &source, &copy)?;
        // sled's own errors about the copy: damage is the store's, failed calls the
        // copy's.
        let named = |err: Error| match err {
            Error::Storage { source, .. } => match source.0.downcast::<sled::Error>() {
                Ok(err) => match *err {
                    sled::Error::Io(err) => Error::Io { path: copy.clone(), source: err },
                    err => storage(dir)(err),
                },
                Err(other) => {
                    Error::Storage { path: dir.to_path_buf(), source: StorageError(other) }
                }
            },
            err => err,
        };
        let engine = Engine::open(io, &copy).map_err(named)?;
        let mut records = Records::new();
        let read = engine.db.iter().try_for_each(|entry| {
            let (key, value) = entry?;
            records.insert(key.to_vec(), value.to_vec());
            Ok(())
        });
        let closed = engine.close(&copy);
        read.map_err(storage(dir))?;
        closed.map_err(named)?;
        Ok(records)
    }

    /// Whether `dir` holds an engine, or one mid-swap (an interrupted compaction,
    /// which `open` completes).
    pub(crate) fn exists(dir: &Path) -> bool {
        dir.is_dir() || new_dir(dir).is_dir()
    }

    fn closed(&self) -> Error {
        Error::Storage {
            path: self.dir.clone(),
            source: StorageError("the engine is closed".into()),
        }
    }

    fn sync_files(&self, engine: Option<&Engine>) -> io::Result<()> {
        let Some(engine) = engine else { return Ok(()) };
        let mut synced = self.synced.lock();
        // Blob files should never appear (see the module docs); if sled wrote some
        // anyway, they are made durable before the log that points at them.
        // A directory is looked at (`stat`, which is cheap) before it is listed
        // (which, on a large heap, is not): its stamp changes whenever an entry does.
        let blobs_dir = self.dir.join("blobs");
        let blobs_stamp = self.io.stamp(&blobs_dir)?;
        if blobs_stamp != synced.blobs_stamp {
            let blobs = listing(&self.io, &blobs_dir)?;
            for (name, _) in blobs.iter().filter(|it| !synced.blobs.contains(it)) {
                self.io.open(&blobs_dir.join(name), Open::Read)?.sync_all()?;
            }
            if blobs_stamp.is_some() {
                self.io.sync_dir(&blobs_dir)?;
            }
            synced.blobs = blobs;
            synced.blobs_stamp = blobs_stamp;
        }
        engine.log.sync_all()?;
        let stamp = self.io.stamp(&self.dir)?;
        if stamp != synced.engine {
            self.io.sync_dir(&self.dir)?;
            synced.engine = stamp;
        }
        Ok(())
    }
}

impl Engine {
    // clippy.toml forbids opening sled anywhere else; this is the one place.
    #[allow(clippy::disallowed_methods)]
    fn open(io: &Io, dir: &Path) -> Result<Engine> {
        remove_generating(io, dir).map_err(Error::io(dir))?;
        let config = sled::Config::new()
            .path(dir)
            .cache_capacity(CACHE_CAPACITY)
            // Saves flush explicitly; a background flush would only add writes.
            .flush_every_ms(None);
        // The creation is made durable by the caller, with the directory holding it.
        io.create_dir(dir).map_err(Error::io(dir))?;
        // sled closes its file through deferred (epoch-based) reclamation, so for a
        // moment after a `Db` is dropped its lock is still held. The store's own lock
        // file already keeps other stores out, so a sled lock seen here is almost
        // always that leftover: wait a bounded time for it to go.
        let db = retry_while_held(LOCK_WAIT, || config.open(), |err| {
            matches!(err, sled::Error::Io(err) if err.to_string().contains("could not acquire lock"))
        })
        .map_err(storage(dir))?;
        let log_path = dir.join("db");
        let log = match io.open(&log_path, Open::Read) {
            Ok(log) => log,
            Err(err) => {
                let _ = close_db(db, dir);
                return Err(Error::io(log_path)(err));
            }
        };
        let watchdog = Watchdog::start(&db);
        Ok(Engine { db, log, watchdog })
    }

    /// Flushes sled and fsyncs its log: everything applied so far is durable.
    fn flush(&self, dir: &Path) -> Result<()> {
        self.watchdog.flush(&self.db).map_err(storage(dir))?;
        self.log.sync_all().map_err(Error::io(dir.join("db")))
    }

    /// Makes everything durable and lets sled go; see [`Sled::close`].
    fn close(self, dir: &Path) -> Result<()> {
        let Engine { db, log, watchdog } = self;
        let flushed = watchdog.flush(&db).map_err(storage(dir));
        let synced = flushed.and_then(|_| log.sync_all().map_err(Error::io(dir.join("db"))));
        watchdog.stop();
        let closed = close_db(db, dir);
        synced.and(closed)
    }
}

impl Watchdog {
    /// How long a flush may wait before the watchdog calls flush again.
    const PATIENCE: Duration = Duration::from_millis(50);

    fn start(db: &sled::Db) -> Watchdog {
        let shared = Arc::new(Watch {
            started: AtomicU64::new(0),
            epoch: Instant::now(),
            stop: Mutex::new(false),
            wake: parking_lot::Condvar::new(),
        });
        let (watch, db) = (Arc::clone(&shared), db.clone());
        let spawned = thread::Builder::new()
            .name("instastate-sled-watchdog".to_owned())
            .spawn(move || watch.run(&db));
        // Without the thread a stuck flush stays stuck, as it would with sled alone.
        Watchdog { shared, thread: spawned.ok() }
    }

    /// `db.flush()`, watched.
    fn flush(&self, db: &sled::Db) -> sled::Result<usize> {
        let now = self.shared.now().max(1);
        self.shared.started.store(now, Ordering::Release);
        let res = db.flush();
        self.shared.started.store(0, Ordering::Release);
        res
    }

    fn stop(mut self) {
        *self.shared.stop.lock() = true;
        self.shared.wake.notify_all();
        if let Some(thread) = self.thread.take() {
            // The watchdog never waits in a flush itself (its calls run on threads
            // of their own), so it ends promptly.
            let _ = thread.join();
        }
    }
}

impl Watch {
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn run(&self, db: &sled::Db) {
        let patience = u64::try_from(Watchdog::PATIENCE.as_micros()).unwrap_or(u64::MAX);
        let mut stop = self.stop.lock();
        let mut poked: u32 = 0;
        while !*stop {
            self.wake.wait_for(&mut stop, Watchdog::PATIENCE);
            let started = self.started.load(Ordering::Acquire);
            if *stop || started == 0 || self.now().saturating_sub(started) < patience {
                poked = 0;
                continue;
            }
            // Back off: a flush that is slow rather than stuck gets a call now and
            // then, not one every tick. Each call runs on a thread of its own, since
            // it may wait as long as the flush it wakes.
            poked += 1;
            if poked.is_power_of_two() {
                let db = db.clone();
                let _ = thread::Builder::new()
                    .name("instastate-sled-flush".to_owned())
                    .spawn(move || drop(db.flush()));
            }
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        *self.shared.stop.lock() = true;
        self.shared.wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Lets `db` go. sled's drop flushes and fsyncs its log and unwraps the result: on a
/// failed disk it panics, which is contained here and reported; during a panic's
/// unwinding, where a second panic would abort, the engine is leaked instead (its
/// lock is then held until the process exits).
fn close_db(db: sled::Db, dir: &Path) -> Result<()> {
    if thread::panicking() {
        std::mem::forget(db);
        return Ok(());
    }
    panic::catch_unwind(AssertUnwindSafe(|| drop(db))).map_err(|payload| {
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("no message");
        Error::Storage {
            path: dir.to_path_buf(),
            source: StorageError(format!("the engine failed while closing: {message}").into()),
        }
    })
}

/// Deletes the snapshot files that an interrupted open left half-written.
fn remove_generating(io: &Io, dir: &Path) -> io::Result<()> {
    for entry in io.read_dir(dir)? {
        let name = entry.name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            io.remove_file(&dir.join(&entry.name))?;
        }
    }
    Ok(())
}

/// Copies the engine's files in `from` into the new directory `to`, but for the
/// snapshots that an interrupted open left half-written; syncs nothing. A failed
/// read names the file read, a failed write the copy.
fn copy_engine(io: &Io, from: &Path, to: &Path) -> Result<()> {
    io.create_dir(to).map_err(Error::io(to))?;
    for entry in io.read_dir(from).map_err(Error::io(from))? {
        let name = entry.name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            continue;
        }
        let (source, target) = (from.join(&entry.name), to.join(&entry.name));
        if entry.is_dir {
            copy_engine(io, &source, &target)?;
            continue;
        }
        let mut reader = io.open(&source, Open::Read).map_err(Error::io(&source))?;
        let mut writer = io.open(&target, Open::CreateNew).map_err(Error::io(&target))?;
        let mut buf = vec![0; 256 * 1024];
        loop {
            let n = reader.read(&mut buf).map_err(Error::io(&source))?;
            let Some(chunk) = buf.get(..n).filter(|chunk| !chunk.is_empty()) else { break };
            writer.write_all(chunk).map_err(Error::io(&target))?;
        }
    }
    Ok(())
}

/// fsyncs every blob file of the engine in `dir`, and their directory.
fn sync_blobs(io: &Io, dir: &Path) -> io::Result<()> {
    let blobs = dir.join("blobs");
    for (name, _) in listing(io, &blobs)? {
        io.open(&blobs.join(name), Open::Read)?.sync_all()?;
    }
    if blobs.exists() { io.sync_dir(&blobs) } else { Ok(()) }
}

/// The directory a compaction builds the new engine in.
fn new_dir(dir: &Path) -> PathBuf {
    dir.with_extension("new")
}

/// The directory the old engine moves to while a compaction swaps them.
fn old_dir(dir: &Path) -> PathBuf {
    dir.with_extension("old")
}

/// Completes or discards a compaction that a crash interrupted. The new engine's
/// directory is complete and durable before the old one is moved away, so a
/// missing engine directory means the new one is ready.
fn finish_swap(io: &Io, dir: &Path) -> io::Result<()> {
    let (new, old) = (new_dir(dir), old_dir(dir));
    if new.exists() {
        if dir.exists() {
            io.remove_dir_all(&new)?;
        } else {
            io.rename(&new, dir)?;
        }
    }
    if old.exists() {
        io.sync_dir(parent_of(dir))?;
        io.remove_dir_all(&old)?;
    }
    Ok(())
}

fn listing(io: &Io, dir: &Path) -> io::Result<Listing> {
    let listed = io.read_dir(dir)?;
    Ok(listed.into_iter().map(|entry| (entry.name, entry.ino)).collect())
}

impl Backend for Sled {
    fn read_all(&self) -> Result<Records> {
        let engine = self.engine.read();
        let db = &engine.as_ref().ok_or_else(|| self.closed())?.db;
        let mut records = Records::new();
        for entry in db.iter() {
            let (key, value) = entry.map_err(storage(&self.dir))?;
            records.insert(key.to_vec(), value.to_vec());
        }
        Ok(records)
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let engine = self.engine.read();
        let db = &engine.as_ref().ok_or_else(|| self.closed())?.db;
        Ok(db.get(key).map_err(storage(&self.dir))?.map(|value| value.to_vec()))
    }

    fn commit(&self, batch: Batch) -> Result<()> {
        let engine = self.engine.read();
        let db = &engine.as_ref().ok_or_else(|| self.closed())?.db;
        let mut sled_batch = sled::Batch::default();
        for (key, value) in batch {
            match value {
                Some(value) => sled_batch.insert(key, value),
                None => sled_batch.remove(key),
            }
        }
        db.apply_batch(sled_batch).map_err(storage(&self.dir))?;
        let flushed = engine.as_ref().ok_or_else(|| self.closed())?.watchdog.flush(db);
        flushed.map_err(storage(&self.dir))?;
        self.sync_files(engine.as_ref()).map_err(Error::io(&self.dir))
    }

    fn compact(&self) -> Result<()> {
        let mut engine = self.engine.write();
        let records = {
            let db = &engine.as_ref().ok_or_else(|| self.closed())?.db;
            let mut batch = sled::Batch::default();
            for entry in db.iter() {
                let (key, value) = entry.map_err(storage(&self.dir))?;
                batch.insert(key, value);
            }
            batch
        };
        let io = &self.io;
        let new = new_dir(&self.dir);
        if new.exists() {
            io.remove_dir_all(&new).map_err(Error::io(&new))?;
        }
        {
            let fresh = Engine::open(io, &new)?;
            let filled = fresh.db.apply_batch(records).map_err(storage(&new));
            let filled = filled.and_then(|()| fresh.flush(&new));
            let closed = fresh.close(&new);
            filled.and(closed)?;
            sync_blobs(io, &new).map_err(Error::io(&new))?;
            io.sync_dir(&new).map_err(Error::io(&new))?;
        }
        // The old engine is closed before its directory moves.
        if let Some(old) = engine.take() {
            old.close(&self.dir)?;
        }
        let old = old_dir(&self.dir);
        io.rename(&self.dir, &old)
            .and_then(|()| io.rename(&new, &self.dir))
            .and_then(|()| io.sync_dir(parent_of(&self.dir)))
            .map_err(Error::io(&self.dir))?;
        // The swap is done; an old engine left behind is deleted at the next open.
        let _ = io.remove_dir_all(&old);
        *self.synced.lock() = Synced::default();
        *engine = Some(Engine::open(io, &self.dir)?);
        self.sync_files(engine.as_ref()).map_err(Error::io(&self.dir))
    }

    /// Flushes the engine, fsyncs its log, and lets sled go, containing the panic
    /// that sled's drop raises on a failed disk.
    fn close(&self) -> Result<()> {
        let Some(engine) = self.engine.write().take() else { return Ok(()) };
        engine.close(&self.dir)
    }
}

impl Drop for Sled {
    fn drop(&mut self) {
        // Closing reports its errors; here nobody is left to hear them.
        if let Some(engine) = self.engine.get_mut().take() {
            let _ = engine.close(&self.dir);
        }
    }
}

fn storage(dir: &Path) -> impl FnOnce(sled::Error) -> Error {
    let path = dir.to_path_buf();
    move |err| Error::Storage { path, source: StorageError(Box::new(err)) }
}
