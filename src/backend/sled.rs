//! The sled backend: the only module that names `sled`.
//!
//! sled 0.34 needs three things added to be durable (see `ARCHITECTURE.md`):
//! - its `flush` uses `sync_file_range`, which neither flushes the disk cache nor
//!   file metadata, so every commit also fsyncs the log file;
//! - it renames new snapshot files without fsyncing their directory, so every commit
//!   also fsyncs the directory;
//! - it writes nodes larger than 128 KiB to `blobs/` without fsync; our records are
//!   kept small enough that this never happens, and should it happen anyway those
//!   files are fsynced too.

use std::{
    fs::{self, File},
    io,
    path::{Path, PathBuf},
};

use super::{Backend, Records};
use crate::{Error, Result, error::StorageError, values::sync_dir};

// Our records are small and read once at open, so a small cache is plenty; sled's
// default of 1 GiB lets its memory grow far beyond what the data needs.
const CACHE_CAPACITY: u64 = 8 * 1024 * 1024;

pub(crate) struct Sled {
    db: sled::Db,
    dir: PathBuf,
    // sled gives no way to fsync its log, so we keep our own handle to it.
    log: File,
}

impl Sled {
    // clippy.toml forbids opening sled anywhere else; this is the one place.
    #[allow(clippy::disallowed_methods)]
    pub(crate) fn open(dir: &Path) -> Result<Sled> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(CACHE_CAPACITY)
            // Saves flush explicitly; a background flush would only add writes.
            .flush_every_ms(None)
            .open()
            .map_err(storage(dir))?;
        let log_path = dir.join("db");
        let log = File::open(&log_path).map_err(Error::io(log_path))?;
        let sled = Sled { db, dir: dir.to_path_buf(), log };
        sled.sync_files().map_err(Error::io(dir))?;
        Ok(sled)
    }

    fn sync_files(&self) -> io::Result<()> {
        self.log.sync_all()?;
        let blobs = self.dir.join("blobs");
        if blobs.exists() {
            for entry in fs::read_dir(&blobs)? {
                File::open(entry?.path())?.sync_all()?;
            }
            sync_dir(&blobs)?;
        }
        sync_dir(&self.dir)
    }
}

impl Backend for Sled {
    fn read_all(&self) -> Result<Records> {
        let mut records = Records::new();
        for entry in self.db.iter() {
            let (key, value) = entry.map_err(storage(&self.dir))?;
            records.insert(key.to_vec(), value.to_vec());
        }
        Ok(records)
    }

    fn commit(&self, batch: Vec<(Vec<u8>, Vec<u8>)>) -> Result<()> {
        let mut sled_batch = sled::Batch::default();
        for (key, value) in batch {
            sled_batch.insert(key, value);
        }
        self.db.apply_batch(sled_batch).map_err(storage(&self.dir))?;
        self.db.flush().map_err(storage(&self.dir))?;
        self.sync_files().map_err(Error::io(&self.dir))
    }
}

fn storage(dir: &Path) -> impl FnOnce(sled::Error) -> Error {
    let path = dir.to_path_buf();
    move |err| Error::Storage { path, source: StorageError(Box::new(err)) }
}
