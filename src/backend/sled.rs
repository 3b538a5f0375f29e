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

use std::{
    ffi::OsString,
    fs::{self, File},
    io,
    os::unix::fs::DirEntryExt,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::Duration,
};

use parking_lot::Mutex;

use super::{Backend, Records};
use crate::{
    Error, Result,
    error::StorageError,
    fs::{create_dir_durably, retry_while_held, sync_dir},
};

// Our records are small and read once at open, so a small cache is plenty; sled's
// default of 1 GiB lets its memory grow far beyond what the data needs.
const CACHE_CAPACITY: u64 = 8 * 1024 * 1024;

// How long to wait for a lock that sled has not yet released after a close.
const LOCK_WAIT: Duration = Duration::from_secs(5);

pub(crate) struct Sled {
    // `None` only while being dropped.
    db: Option<sled::Db>,
    // Set when a commit failed: sled may then panic when dropped.
    failed: AtomicBool,
    dir: PathBuf,
    // sled gives no way to fsync its log, so we keep our own handle to it.
    log: File,
    // The entries of the engine's directories when they were last fsynced. A
    // directory fsync costs a disk cache flush, and is needed only when sled
    // created, renamed or deleted a file, which it rarely does.
    synced: Mutex<Synced>,
}

#[derive(Default)]
struct Synced {
    engine: Listing,
    blobs: Listing,
}

// Names and inode numbers, sorted: a renamed or replaced file changes it.
type Listing = Vec<(OsString, u64)>;

impl Sled {
    // clippy.toml forbids opening sled anywhere else; this is the one place.
    #[allow(clippy::disallowed_methods)]
    pub(crate) fn open(dir: &Path) -> Result<Sled> {
        let config = sled::Config::new()
            .path(dir)
            .cache_capacity(CACHE_CAPACITY)
            // Saves flush explicitly; a background flush would only add writes.
            .flush_every_ms(None);
        // sled creates its directory without making that durable.
        create_dir_durably(dir).map_err(Error::io(dir))?;
        // sled closes its file through deferred (epoch-based) reclamation, so for a
        // moment after a `Db` is dropped its lock is still held. The store's own lock
        // file already keeps other stores out, so a sled lock seen here is almost
        // always that leftover: wait a bounded time for it to go.
        let db = retry_while_held(LOCK_WAIT, || config.open(), |err| {
            matches!(err, sled::Error::Io(err) if err.to_string().contains("could not acquire lock"))
        })
        .map_err(storage(dir))?;
        let log_path = dir.join("db");
        let log = File::open(&log_path).map_err(Error::io(log_path))?;
        let sled = Sled {
            db: Some(db),
            failed: AtomicBool::new(false),
            dir: dir.to_path_buf(),
            log,
            synced: Mutex::default(),
        };
        sled.sync_files().map_err(Error::io(dir))?;
        Ok(sled)
    }

    fn db(&self) -> Result<&sled::Db> {
        self.db.as_ref().ok_or_else(|| Error::Storage {
            path: self.dir.clone(),
            source: StorageError("the engine is closed".into()),
        })
    }

    fn sync_files(&self) -> io::Result<()> {
        let mut synced = self.synced.lock();
        // Blob files should never appear (see the module docs); if sled wrote some
        // anyway, they are made durable before the log that points at them.
        let blobs_dir = self.dir.join("blobs");
        let blobs = listing(&blobs_dir)?;
        if blobs != synced.blobs {
            for (name, _) in blobs.iter().filter(|it| !synced.blobs.contains(it)) {
                File::open(blobs_dir.join(name))?.sync_all()?;
            }
            sync_dir(&blobs_dir)?;
            synced.blobs = blobs;
        }
        self.log.sync_all()?;
        let engine = listing(&self.dir)?;
        if engine != synced.engine {
            sync_dir(&self.dir)?;
            synced.engine = engine;
        }
        Ok(())
    }
}

fn listing(dir: &Path) -> io::Result<Listing> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Listing::new()),
        Err(err) => return Err(err),
    };
    let mut listing = Listing::new();
    for entry in entries {
        let entry = entry?;
        listing.push((entry.file_name(), entry.ino()));
    }
    listing.sort_unstable();
    Ok(listing)
}

impl Backend for Sled {
    fn read_all(&self) -> Result<Records> {
        let mut records = Records::new();
        for entry in self.db()?.iter() {
            let (key, value) = entry.map_err(storage(&self.dir))?;
            records.insert(key.to_vec(), value.to_vec());
        }
        Ok(records)
    }

    fn commit(&self, batch: Vec<(Vec<u8>, Vec<u8>)>) -> Result<()> {
        let db = self.db()?;
        let mut sled_batch = sled::Batch::default();
        for (key, value) in batch {
            sled_batch.insert(key, value);
        }
        let res = db
            .apply_batch(sled_batch)
            .and_then(|()| db.flush())
            .map_err(storage(&self.dir))
            .and_then(|_| self.sync_files().map_err(Error::io(&self.dir)));
        if res.is_err() {
            self.failed.store(true, Ordering::Relaxed);
        }
        res
    }
}

impl Drop for Sled {
    fn drop(&mut self) {
        let Some(db) = self.db.take() else { return };
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
