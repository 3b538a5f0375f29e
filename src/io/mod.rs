//! The one place our file I/O goes through.
//!
//! Every file operation of the store, the value files, the journal and the tool
//! support code is a method of [`Io`] or of the [`IoFile`] it opens: creating,
//! writing, syncing, renaming, removing, listing and reading. In the library
//! these are the plain `std::fs` calls. In this crate's own tests an `Io` can carry
//! a simulator (`sim.rs`) that fails the Nth call with a chosen error, and that
//! models what a power loss keeps: file contents as of their last sync, and
//! directory entries as of their directory's last sync (redb's crash-simulating
//! backend, applied to a tree of files).
//!
//! sled's own file operations bypass this layer; they are tested under an
//! `LD_PRELOAD` fault shim instead (`tests/fault_shim.rs`).

#[cfg(test)]
mod faults;
#[cfg(test)]
pub(crate) mod sim;

use std::{
    ffi::OsString,
    fs::{self, File, TryLockError},
    io::{self, Read, Seek, SeekFrom, Write},
    os::unix::fs::{DirEntryExt, FileExt, MetadataExt},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use crate::{Error, Result};

/// Temporary files end in this; any found at open are left-overs of a crash.
pub(crate) const PART_SUFFIX: &str = ".part";

// How long a held directory lock is retried before the directory counts as open elsewhere.
const LOCK_WAIT: Duration = Duration::from_millis(250);

/// What a call does, for the simulator: which calls a fault may hit, and what a
/// power loss undoes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) enum Op {
    /// Opening a file, creating it or not.
    Open,
    Read,
    Write,
    /// `fsync` or `fdatasync` of a file, or `fsync` of a directory.
    Sync,
    Truncate,
    Rename,
    Remove,
    CreateDir,
    List,
}

/// How to open a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Open {
    /// An existing file, for reading (and for syncing, as the engine's log is).
    Read,
    /// An existing file, for appending.
    Append,
    /// An existing file, for writing in place.
    Write,
    /// An existing file, for reading and writing in place.
    ReadWrite,
    /// A new file, which must not exist yet.
    CreateNew,
    /// A new file, replacing whatever the path held.
    Create,
    /// The file, created empty if it does not exist, for reading and writing.
    ReadWriteCreate,
}

/// One entry of a directory.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Entry {
    pub(crate) name: OsString,
    /// The inode number: a renamed or replaced file changes it.
    pub(crate) ino: u64,
    pub(crate) is_dir: bool,
}

/// What `stat` says of a file or directory that changes whenever it does: for a
/// directory, whenever an entry is created, renamed or removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    ino: u64,
    ctime: (i64, i64),
    mtime: (i64, i64),
    size: u64,
}

/// The file system, as this crate uses it; cheap to clone.
#[derive(Clone, Default)]
pub(crate) struct Io {
    #[cfg(test)]
    sim: Option<std::sync::Arc<sim::Sim>>,
}

impl std::fmt::Debug for Io {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Io")
    }
}

/// A file opened through [`Io`].
#[derive(Debug)]
pub(crate) struct IoFile {
    file: File,
    path: PathBuf,
    io: Io,
}

impl Io {
    /// An `Io` whose calls `sim` watches, fails and models.
    #[cfg(test)]
    pub(crate) fn simulated(sim: std::sync::Arc<sim::Sim>) -> Io {
        Io { sim: Some(sim) }
    }

    /// Lets the simulator fail the call, or refuse it after a simulated power loss.
    #[allow(clippy::unused_self, clippy::unnecessary_wraps)] // Without tests there is no simulator.
    fn check(&self, op: Op, path: &Path) -> io::Result<()> {
        #[cfg(test)]
        if let Some(sim) = &self.sim {
            return sim.check(op, path);
        }
        let _ = (op, path);
        Ok(())
    }

    /// Tells the simulator that a call succeeded, so that it can track durability.
    #[allow(clippy::unused_self)] // Without tests there is no simulator.
    fn done(&self, op: Op, path: &Path) {
        #[cfg(test)]
        if let Some(sim) = &self.sim {
            sim.done(op, path);
        }
        let _ = (op, path);
    }

    /// Opens the file at `path` as `how` says.
    pub(crate) fn open(&self, path: &Path, how: Open) -> io::Result<IoFile> {
        self.check(Op::Open, path)?;
        #[cfg(test)]
        if let Some(sim) = &self.sim {
            sim.before_open(path, how);
        }
        let mut options = File::options();
        match how {
            Open::Read => options.read(true),
            Open::Append => options.append(true),
            Open::Write => options.write(true),
            Open::ReadWrite => options.read(true).write(true),
            Open::CreateNew => options.write(true).create_new(true),
            Open::Create => options.write(true).create(true).truncate(true),
            Open::ReadWriteCreate => options.read(true).write(true).create(true).truncate(false),
        };
        let file = options.open(path)?;
        #[cfg(test)]
        if let Some(sim) = &self.sim {
            sim.opened(path, how, &file);
        }
        Ok(IoFile { file, path: path.to_path_buf(), io: self.clone() })
    }

    /// Reads the whole file at `path`.
    pub(crate) fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        self.check(Op::Read, path)?;
        fs::read(path)
    }

    /// The entries of directory `path`, sorted by name.
    pub(crate) fn read_dir(&self, path: &Path) -> io::Result<Vec<Entry>> {
        self.check(Op::List, path)?;
        list(path)
    }

    /// The stamp of `path`, or `None` if there is nothing there.
    pub(crate) fn stamp(&self, path: &Path) -> io::Result<Option<Stamp>> {
        self.check(Op::List, path)?;
        match fs::metadata(path) {
            Ok(meta) => Ok(Some(Stamp {
                ino: meta.ino(),
                ctime: (meta.ctime(), meta.ctime_nsec()),
                mtime: (meta.mtime(), meta.mtime_nsec()),
                size: meta.size(),
            })),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(err),
        }
    }

    pub(crate) fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.check(Op::Rename, from)?;
        #[cfg(test)]
        if let Some(sim) = &self.sim {
            sim.before_rename(to);
        }
        fs::rename(from, to)?;
        self.done(Op::Rename, from);
        Ok(())
    }

    /// Removes the file at `path`.
    pub(crate) fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.check(Op::Remove, path)?;
        fs::remove_file(path)?;
        self.done(Op::Remove, path);
        Ok(())
    }

    /// Removes the directory at `path` and everything in it.
    pub(crate) fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        self.check(Op::Remove, path)?;
        fs::remove_dir_all(path)?;
        self.done(Op::Remove, path);
        Ok(())
    }

    /// fsyncs a directory, making the creation, removal and renaming of its entries durable.
    pub(crate) fn sync_dir(&self, path: &Path) -> io::Result<()> {
        self.check(Op::Sync, path)?;
        File::open(path)?.sync_all()?;
        self.done(Op::Sync, path);
        Ok(())
    }

    /// Creates directory `path` unless it exists; returns whether it did. The
    /// creation is durable once the caller syncs the parent directory.
    pub(crate) fn create_dir(&self, path: &Path) -> io::Result<bool> {
        if path.is_dir() {
            return Ok(false);
        }
        self.check(Op::CreateDir, path)?;
        match fs::create_dir(path) {
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(err) => Err(err),
            Ok(()) => {
                self.done(Op::CreateDir, path);
                Ok(true)
            }
        }
    }

    /// Creates `path` and any missing parents, and makes their creation durable.
    pub(crate) fn create_dir_durably(&self, path: &Path) -> io::Result<()> {
        let mut missing = Vec::new();
        let mut dir = path;
        while !dir.exists() {
            missing.push(dir);
            match dir.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => dir = parent,
                _ => break,
            }
        }
        for created in missing.iter().rev() {
            self.check(Op::CreateDir, created)?;
            match fs::create_dir(created) {
                Err(err) if err.kind() != io::ErrorKind::AlreadyExists => return Err(err),
                _ => self.done(Op::CreateDir, created),
            }
        }
        // A new directory is durable once its parent is fsynced.
        for created in missing {
            if let Some(parent) = created.parent().filter(|it| !it.as_os_str().is_empty()) {
                self.sync_dir(parent)?;
            }
        }
        Ok(())
    }

    /// Writes `bytes` to `path` through a temporary file, so that `path` holds either
    /// its old contents or all of `bytes`; the rename is made durable.
    pub(crate) fn write_durably(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        self.write_renamed(path, bytes)?;
        self.sync_dir(parent_of(path))
    }

    /// Writes `bytes` to `path` through a temporary file, synced, so that `path`
    /// holds either its old contents or all of `bytes`. The rename is durable only
    /// once the caller syncs the directory.
    pub(crate) fn write_renamed(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let part = part_of(path);
        let mut file = self.open(&part, Open::Create)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        self.rename(&part, path)
    }

    /// Writes `bytes` to `path` through a temporary file, renamed into place, syncing
    /// nothing: after a crash `path` holds its old contents, or `bytes` whole, or a
    /// part of them, which the caller's own checks must tell.
    pub(crate) fn write_unsynced(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let part = part_of(path);
        self.open(&part, Open::Create)?.write_all(bytes)?;
        self.rename(&part, path)
    }

    /// Copies the file `from` to the new file `to`, and fsyncs the copy.
    pub(crate) fn copy_durably(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut source = self.open(from, Open::Read)?;
        let mut target = self.open(to, Open::CreateNew)?;
        let mut buf = vec![0; 256 * 1024];
        loop {
            let n = source.read(&mut buf)?;
            let Some(chunk) = buf.get(..n).filter(|chunk| !chunk.is_empty()) else { break };
            target.write_all(chunk)?;
        }
        target.sync_all()
    }

    /// Locks directory `dir` itself, exclusively, for as long as the returned hold
    /// lives: nobody else, in this process or another, can open it to change it or
    /// to look at it meanwhile. `kind` says what the directory holds, for the error.
    ///
    /// The directory is what is locked, not a file in it: a lock on a file that a
    /// reader cannot create (it must change nothing) would leave a directory
    /// without that file unlocked for its readers.
    ///
    /// Fails with [`Error::Locked`] when another hold of it is open.
    pub(crate) fn lock_dir(&self, dir: &Path, kind: &'static str) -> Result<DirHold> {
        self.hold_dir(dir, kind, File::try_lock)
    }

    /// Takes a shared lock on directory `dir` itself, for as long as the returned
    /// hold lives: others may look too, and nobody can open the directory to change
    /// it meanwhile.
    ///
    /// Fails with [`Error::Locked`] when a store or journal has it open to change it.
    pub(crate) fn lock_dir_shared(&self, dir: &Path, kind: &'static str) -> Result<DirHold> {
        self.hold_dir(dir, kind, File::try_lock_shared)
    }

    fn hold_dir(
        &self,
        dir: &Path,
        kind: &'static str,
        lock: fn(&File) -> std::result::Result<(), TryLockError>,
    ) -> Result<DirHold> {
        self.check(Op::Open, dir).map_err(Error::io(dir))?;
        let file = File::open(dir).map_err(Error::io(dir))?;
        // The lock belongs to the open file, and a child process forked by any thread
        // shares our open files until it runs `exec`: for a moment after a store is
        // dropped, such a child can still hold its lock. A short wait tells that apart
        // from a store that is really open elsewhere, which is still reported at once.
        let res = retry_while_held(
            LOCK_WAIT,
            || lock(&file),
            |err| matches!(err, TryLockError::WouldBlock),
        );
        match res {
            Ok(()) => Ok(DirHold(file)),
            Err(TryLockError::WouldBlock) => Err(Error::Locked { path: dir.to_path_buf(), kind }),
            Err(TryLockError::Error(source)) => Err(Error::Io { path: dir.to_path_buf(), source }),
        }
    }
}

/// A directory held open and locked ([`Io::lock_dir`]); the lock goes when it is
/// dropped.
#[derive(Debug)]
pub(crate) struct DirHold(#[allow(dead_code, reason = "held for its lock")] File);

impl IoFile {
    /// `fsync`: the file's data and metadata.
    pub(crate) fn sync_all(&self) -> io::Result<()> {
        self.io.check(Op::Sync, &self.path)?;
        self.file.sync_all()?;
        self.synced();
        Ok(())
    }

    /// `fdatasync`: the file's data, and the metadata needed to read it back.
    pub(crate) fn sync_data(&self) -> io::Result<()> {
        self.io.check(Op::Sync, &self.path)?;
        self.file.sync_data()?;
        self.synced();
        Ok(())
    }

    #[cfg_attr(not(test), allow(clippy::unused_self))] // Without tests there is no simulator.
    fn synced(&self) {
        #[cfg(test)]
        if let Some(sim) = &self.io.sim {
            sim.synced(&self.path, &self.file);
        }
    }

    /// Cuts the file to `len` bytes (the cut is durable only once synced).
    pub(crate) fn set_len(&self, len: u64) -> io::Result<()> {
        self.io.check(Op::Truncate, &self.path)?;
        self.file.set_len(len)
    }

    /// Writes all of `bytes` at `offset`, without moving the file's cursor.
    pub(crate) fn write_all_at(&self, bytes: &[u8], offset: u64) -> io::Result<()> {
        self.io.check(Op::Write, &self.path)?;
        self.file.write_all_at(bytes, offset)
    }

    /// Reads into `buf` from `offset` until it is full or the file ends, without
    /// moving the file's cursor; returns how many bytes it read.
    pub(crate) fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.io.check(Op::Read, &self.path)?;
        let mut done = 0;
        while let Some(rest) = buf.get_mut(done..).filter(|rest| !rest.is_empty()) {
            match self.file.read_at(rest, offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
        Ok(done)
    }

    /// Reads the whole file, without moving the file's cursor.
    pub(crate) fn read_all(&self) -> io::Result<Vec<u8>> {
        self.io.check(Op::Read, &self.path)?;
        let len = usize::try_from(self.file.metadata()?.len()).map_err(io::Error::other)?;
        let mut bytes = vec![0; len];
        self.file.read_exact_at(&mut bytes, 0)?;
        Ok(bytes)
    }

    /// The file's length.
    pub(crate) fn len(&self) -> io::Result<u64> {
        self.io.check(Op::Read, &self.path)?;
        Ok(self.file.metadata()?.len())
    }
}

impl Write for IoFile {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.io.check(Op::Write, &self.path)?;
        self.file.write(bytes)
    }

    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        // One check per call, as `write_all` is one call in the code above this layer.
        self.io.check(Op::Write, &self.path)?;
        self.file.write_all(bytes)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for IoFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.io.check(Op::Read, &self.path)?;
        self.file.read(buf)
    }
}

impl Seek for IoFile {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.file.seek(to)
    }
}

/// The temporary file `path` is written to before it is renamed into place.
fn part_of(path: &Path) -> PathBuf {
    let mut part = path.as_os_str().to_owned();
    part.push(PART_SUFFIX);
    PathBuf::from(part)
}

/// The directory holding `path`, `.` for a bare name.
pub(crate) fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

/// The entries of directory `path`, sorted by name; no directory is no entries.
fn list(path: &Path) -> io::Result<Vec<Entry>> {
    let entries = match fs::read_dir(path) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err),
    };
    let mut listed = Vec::new();
    for entry in entries {
        let entry = entry?;
        // The type and inode number come with the entry; a `stat` of it would fail
        // for an entry deleted or renamed since the listing (a journal's temporary
        // file, as its snapshot or next file is made), which is simply not there.
        let is_dir = match entry.file_type() {
            Ok(kind) => kind.is_dir(),
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(err) => return Err(err),
        };
        listed.push(Entry { name: entry.file_name(), ino: entry.ino(), is_dir });
    }
    listed.sort_unstable();
    Ok(listed)
}

/// Calls `attempt` until it succeeds, fails with an error that `held` does not
/// accept, or `limit` has passed; returns its last result.
///
/// For locks that a closed store still holds for a moment (see the callers).
pub(crate) fn retry_while_held<T, E>(
    limit: Duration,
    mut attempt: impl FnMut() -> std::result::Result<T, E>,
    held: impl Fn(&E) -> bool,
) -> std::result::Result<T, E> {
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
