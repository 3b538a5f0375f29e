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

use std::{
    ffi::OsString,
    io,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::Duration,
};

use parking_lot::{Mutex, RwLock};

use super::{Backend, Batch, Records};
use crate::{
    Error, Result,
    error::StorageError,
    io::{Io, IoFile, Open, parent_of, retry_while_held},
};

// Our records are small and read once at open, so a small cache is plenty; sled's
// default of 1 GiB lets its memory grow far beyond what the data needs.
const CACHE_CAPACITY: u64 = 8 * 1024 * 1024;

// How long to wait for a lock that sled has not yet released after a close.
const LOCK_WAIT: Duration = Duration::from_secs(5);

pub(crate) struct Sled {
    // `None` only while being dropped, or after a compaction failed to reopen.
    engine: RwLock<Option<Engine>>,
    // Set when a commit failed: sled may then panic when dropped.
    failed: AtomicBool,
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
}

#[derive(Default)]
struct Synced {
    engine: Listing,
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
            failed: AtomicBool::new(false),
            dir: dir.to_path_buf(),
            io: io.clone(),
            synced: Mutex::default(),
        };
        sled.sync_files(sled.engine.read().as_ref()).map_err(Error::io(dir))?;
        Ok(sled)
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
        let blobs_dir = self.dir.join("blobs");
        let blobs = listing(&self.io, &blobs_dir)?;
        if blobs != synced.blobs {
            for (name, _) in blobs.iter().filter(|it| !synced.blobs.contains(it)) {
                self.io.open(&blobs_dir.join(name), Open::Read)?.sync_all()?;
            }
            self.io.sync_dir(&blobs_dir)?;
            synced.blobs = blobs;
        }
        engine.log.sync_all()?;
        let listed = listing(&self.io, &self.dir)?;
        if listed != synced.engine {
            self.io.sync_dir(&self.dir)?;
            synced.engine = listed;
        }
        Ok(())
    }
}

impl Engine {
    // clippy.toml forbids opening sled anywhere else; this is the one place.
    #[allow(clippy::disallowed_methods)]
    fn open(io: &Io, dir: &Path) -> Result<Engine> {
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
        let log = io.open(&log_path, Open::Read).map_err(Error::io(log_path))?;
        Ok(Engine { db, log })
    }
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
        let res = db
            .apply_batch(sled_batch)
            .and_then(|()| db.flush())
            .map_err(storage(&self.dir))
            .and_then(|_| self.sync_files(engine.as_ref()).map_err(Error::io(&self.dir)));
        if res.is_err() {
            self.failed.store(true, Ordering::Relaxed);
        }
        res
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
            fresh.db.apply_batch(records).and_then(|()| fresh.db.flush()).map_err(storage(&new))?;
            fresh.log.sync_all().map_err(Error::io(&new))?;
            sync_blobs(io, &new).map_err(Error::io(&new))?;
            io.sync_dir(&new).map_err(Error::io(&new))?;
        }
        // The old engine is closed (sled flushes it on drop) before its directory moves.
        *engine = None;
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
}

impl Drop for Sled {
    fn drop(&mut self) {
        let Some(Engine { db, .. }) = self.engine.get_mut().take() else { return };
        if !self.failed.load(Ordering::Relaxed) {
            return;
        }
        // sled's drop flushes and fsyncs its log, and unwraps the result: on a disk
        // that just failed a commit it may panic. A panic during another panic
        // aborts the process, so then the engine is leaked instead (its lock is held
        // until the process exits); otherwise the panic is contained here.
        if thread::panicking() {
            std::mem::forget(db);
            return;
        }
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(db)));
    }
}

fn storage(dir: &Path) -> impl FnOnce(sled::Error) -> Error {
    let path = dir.to_path_buf();
    move |err| Error::Storage { path, source: StorageError(Box::new(err)) }
}
