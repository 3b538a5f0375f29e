//! File-system helpers shared by the store, the value files and the backends.

use std::{
    fs::{self, File, TryLockError},
    io,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use crate::{Error, Result};

// How long a held directory lock is retried before the directory counts as open elsewhere.
const LOCK_WAIT: Duration = Duration::from_millis(250);

/// fsyncs a directory, making the creation, removal and renaming of its entries durable.
pub(crate) fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// Creates `path` and any missing parents, and makes their creation durable.
pub(crate) fn create_dir_durably(path: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut dir = path;
    while !dir.exists() {
        missing.push(dir);
        match dir.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => dir = parent,
            _ => break,
        }
    }
    fs::create_dir_all(path)?;
    // A new directory is durable once its parent is fsynced.
    for created in missing {
        if let Some(parent) = created.parent().filter(|it| !it.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

/// Calls `attempt` until it succeeds, fails with an error that `held` does not
/// accept, or `limit` has passed; returns its last result.
///
/// For locks that a closed store still holds for a moment (see the callers).
pub(crate) fn retry_while_held<T, E>(
    limit: Duration,
    mut attempt: impl FnMut() -> Result<T, E>,
    held: impl Fn(&E) -> bool,
) -> Result<T, E> {
    let started = Instant::now();
    loop {
        match attempt() {
            Err(err) if held(&err) && started.elapsed() < limit => {
                thread::sleep(Duration::from_millis(2));
            }
            res => return res,
        }
    }
}

/// Locks directory `dir` through its file `name` for as long as the returned file is open.
///
/// Fails with [`Error::Locked`] when another open handle, in this process or
/// another, holds the lock.
pub(crate) fn lock_dir(dir: &Path, name: &str) -> Result<File> {
    let path = dir.join(name);
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(Error::io(&path))?;
    // The lock belongs to the open file, and a child process forked by any thread
    // shares our open files until it runs `exec`: for a moment after a store is
    // dropped, such a child can still hold its lock. A short wait tells that apart
    // from a store that is really open elsewhere, which is still reported at once.
    let res = retry_while_held(
        LOCK_WAIT,
        || file.try_lock(),
        |err| matches!(err, TryLockError::WouldBlock),
    );
    match res {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(Error::Locked { path: dir.to_path_buf() }),
        Err(TryLockError::Error(source)) => Err(Error::Io { path, source }),
    }
}
