//! The writer: numbering, timestamps, framing, the durability modes, group commit,
//! poisoning and voiding, snapshots and the retirement of old journal files. See
//! the [module docs](super) for how an event goes through it.

use std::{
    any::Any,
    io::Write,
    mem,
    panic::{self, AssertUnwindSafe},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{SystemTime, UNIX_EPOCH},
};

use parking_lot::{Condvar, Mutex};

use super::{Durability, Identity, Job, Timestamp, event_aad, format, recovery, snapshot};
use crate::{
    Error, Result,
    crypt::Sealer,
    io::{Io, IoFile, Open},
    lockfile::{Access, End, Hold},
};

/// Frames buffered by the unsynced modes before they are written.
const BUFFER_LIMIT: usize = 256 * 1024;

/// The journal writer; see the module docs.
pub(crate) struct Journal {
    dir: Option<PathBuf>,
    identity: Identity,
    /// The events' schema version new files are written with.
    event_schema: u32,
    durability: Durability,
    sealer: Sealer,
    queue: Mutex<Queue>,
    output: Mutex<Output>,
    /// Bytes framed since the journal opened.
    framed: AtomicU64,
    timer: Mutex<Option<Timer>>,
    /// Held by a snapshot from its write to its deletions.
    snapshotting: Mutex<()>,
    /// Set by a snapshot: the next write of an event starts a new journal file.
    rotate: AtomicBool,
    io: Io,
    /// A read-only journal refuses every event and writes nothing.
    access: Access,
    /// The database it is kept in, instead of a directory.
    database: Option<Arc<Database>>,
    /// Why it is poisoned, when a write found its writer fenced: every later call
    /// gets the same error.
    fenced: Mutex<Option<Error>>,
}

/// The place of a journal kept in a database (feature `postgres`).
#[cfg(feature = "postgres")]
pub(crate) type Database = crate::postgres::PgJournal;

/// Without the feature `postgres`, no journal is kept in a database.
#[cfg(not(feature = "postgres"))]
pub(crate) enum Database {}

#[cfg(not(feature = "postgres"))]
impl Database {
    fn label(&self) -> String {
        match *self {}
    }

    fn write(&self, _: &[u8]) -> Result<()> {
        match *self {}
    }

    fn close(&self) -> Result<()> {
        match *self {}
    }

    fn snapshot(&self, _: &[u8], _: u64, _: usize, _: bool) -> Result<()> {
        match *self {}
    }
}

struct Queue {
    /// The number of the next event.
    next: u64,
    /// The last timestamp given out, in microseconds.
    clock: u64,
    /// Frames not yet written.
    buf: Vec<u8>,
    /// The number of the first event framed in `buf`, if any: a write that starts a
    /// new journal file names it after that event.
    buf_first: Option<u64>,
    /// Group commit: events queued for the next leader.
    pending: Vec<Box<dyn Pending>>,
    leading: bool,
    poisoned: bool,
}

/// The journal file being written, under the lock every write takes.
struct Output {
    file: Option<IoFile>,
    path: PathBuf,
    /// The first event number of the file, and its length.
    first: u64,
    len: u64,
    /// The directory's lock, which records whether the journal was closed cleanly;
    /// under this lock, so that no write slips in between a clean close's mark and
    /// the end it records.
    lock: Option<Hold>,
    /// The lock file says the journal was closed cleanly: the next write must first
    /// say that it is open again.
    closed: bool,
    /// Bytes written to `file` and not yet synced.
    unsynced: bool,
    /// A write or sync failed: nothing more may be written. Kept here, under the
    /// lock every write takes, so that no writer can slip in after a failure.
    failed: bool,
}

struct Timer {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: thread::JoinHandle<()>,
}

impl Journal {
    /// The journal after recovery found its `tail`: ready to append the event
    /// numbered `from` or the one after the tail, whichever is later, with timestamps
    /// from `at` on.
    pub(super) fn resume(
        parts: Parts,
        mut lock: Option<Hold>,
        tail: &recovery::Tail,
        from: u64,
        at: u64,
    ) -> Result<Journal> {
        let Parts { dir, identity, event_schema, durability, sealer, io, access: _ } = parts;
        let next = tail.next.max(from);
        let clock = tail.clock.max(at);
        // After a crash, the last file may hold events written and never synced,
        // which recovery replayed: in the durable modes they must be durable before
        // anyone sees them (or is told, retrying, that they are there).
        let crashed = lock.as_ref().is_none_or(|lock| lock.clean_end().is_none());
        let durable = matches!(durability, Durability::SyncEach | Durability::GroupCommit);
        if let (true, true, Some(last)) = (crashed, durable, &tail.file) {
            let synced = io.open(&last.path, Open::Read).and_then(|file| file.sync_data());
            synced.map_err(Error::io(&last.path))?;
        }
        // From here on a crash may tear the last write, or leave the files other
        // than a clean close left them (a new file, a link): the lock file must not
        // say that the journal was closed cleanly. In a journal without a file yet,
        // only once its first file is there: a lock saying that it was open makes a
        // directory without a journal file damage.
        let has_files = tail.file.is_some();
        if let (Some(lock), true) = (&mut lock, has_files) {
            lock.mark_open()?;
        }
        // Append to the last file only when it ends exactly where the next event goes
        // and its header records the schema versions events are written with now;
        // otherwise (no file yet, a snapshot ahead of it, or an upgrade of the types)
        // start one now, so that a journal always has a file to hold its next event.
        let current = (identity.schema, event_schema);
        let (file, path, first) = match (&dir, &tail.file) {
            (Some(_), Some(last)) if last.next == next && last.schemas == current => {
                let file = io.open(&last.path, Open::Append).map_err(Error::io(&last.path))?;
                (Some(file), last.path.clone(), last.first)
            }
            (Some(dir), last) => {
                // A last file of other versions that holds no event, and is named as
                // the new one must be, is replaced by it.
                let replaced = last.as_ref().is_some_and(|last| last.first == next);
                let (file, path) = recovery::create_journal_file(
                    &io,
                    dir,
                    &identity,
                    event_schema,
                    &sealer,
                    next,
                )?;
                // The journal goes on in the new file: say so at the end of the last.
                if let (Some(last), false) = (last, replaced) {
                    append_link(&io, &last.path, next)?;
                }
                (Some(file), path, next)
            }
            (None, _) => (None, PathBuf::new(), 0),
        };
        let len = file_len(file.as_ref(), &path)?;
        if let (Some(lock), false) = (&mut lock, has_files) {
            lock.mark_open()?;
        }
        let durability = if dir.is_some() { durability } else { Durability::Unsynced };
        let output = Output::new(file, path, first, len, lock);
        let parts = Parts {
            dir,
            identity,
            event_schema,
            durability,
            sealer,
            io,
            access: Access::ReadWrite,
        };
        Ok(Journal::new(parts, output, next, clock))
    }

    /// The journal after a read-only recovery, whose next event would be `next`
    /// and whose last timestamp is `clock`: it refuses every event with
    /// [`Error::ReadOnly`] and writes nothing, holding `look` (the shared lock of
    /// its directory, if the directory exists) until dropped.
    pub(super) fn read_only(parts: Parts, look: Option<Hold>, next: u64, clock: u64) -> Journal {
        let output = Output::new(None, PathBuf::new(), 0, 0, look);
        let parts = Parts { durability: Durability::Unsynced, access: Access::ReadOnly, ..parts };
        Journal::new(parts, output, next, clock)
    }

    fn new(parts: Parts, output: Output, next: u64, clock: u64) -> Journal {
        let Parts { dir, identity, event_schema, durability, sealer, io, access } = parts;
        Journal {
            dir,
            identity,
            event_schema,
            durability,
            sealer,
            queue: Mutex::new(Queue {
                next,
                clock,
                buf: Vec::new(),
                buf_first: None,
                pending: Vec::new(),
                leading: false,
                poisoned: false,
            }),
            output: Mutex::new(output),
            framed: AtomicU64::new(0),
            timer: Mutex::new(None),
            snapshotting: Mutex::new(()),
            rotate: AtomicBool::new(false),
            io,
            access,
            database: None,
            fenced: Mutex::new(None),
        }
    }

    #[cfg(feature = "postgres")]
    /// The journal kept in `database` after its recovery, whose next event is
    /// `next` and whose last timestamp is `clock`.
    pub(super) fn on_database(
        parts: Parts,
        database: Arc<Database>,
        next: u64,
        clock: u64,
    ) -> Journal {
        let output = Output::new(None, PathBuf::new(), next, 0, None);
        let mut journal = Journal::new(parts, output, next, clock);
        journal.database = Some(database);
        journal
    }

    /// Whether it keeps its events (in files or a database).
    pub(crate) fn persistent(&self) -> bool {
        self.dir.is_some() || self.database.is_some()
    }

    /// The error of a call to a poisoned journal: the one that fenced its writer,
    /// if one did.
    fn poisoned(&self) -> Error {
        match &*self.fenced.lock() {
            Some(fenced) => self.share_fenced(fenced),
            None => Error::Poisoned { path: self.label() },
        }
    }

    /// Refuses `operation` on a read-only journal.
    fn check_writable(&self, operation: &'static str) -> Result<()> {
        match self.access {
            Access::ReadWrite => Ok(()),
            Access::ReadOnly => Err(Error::ReadOnly { path: self.label(), operation }),
        }
    }

    /// Durably voids `events`, which panicked on replay.
    pub(super) fn void_events(&self, events: &[u64]) -> Result<()> {
        let mut queue = self.queue.lock();
        for &seq in events {
            format::put_void(&mut queue.buf, seq, seq);
        }
        drop(queue);
        self.sync()
    }

    /// A journal that writes nothing, for transient systems: events are numbered,
    /// stamped and applied in order, and that is all.
    pub(crate) fn transient(identity: Identity) -> Journal {
        let output = Output::new(None, PathBuf::new(), 0, 0, None);
        let parts = Parts {
            dir: None,
            identity,
            // It writes no file.
            event_schema: super::format::FIRST_SCHEMA,
            durability: Durability::Unsynced,
            sealer: Sealer::default(),
            io: Io::default(),
            access: Access::ReadWrite,
        };
        Journal::new(parts, output, 0, 0)
    }

    /// Starts the timer of [`Durability::Periodic`]; `journal` is the only handle
    /// the timer keeps, weakly.
    pub(crate) fn start_timer(journal: &Arc<Journal>, on_error: impl Fn(&Error) + Send + 'static) {
        let Durability::Periodic(period) = journal.durability else { return };
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let weak = Arc::downgrade(journal);
        let signal = Arc::clone(&stop);
        let spawned =
            thread::Builder::new().name("instastate-journal-sync".to_owned()).spawn(move || {
                let (stopped, wake) = &*signal;
                loop {
                    {
                        // Not held while syncing: the sync may drop the last handle
                        // of the journal, whose `close` takes this lock.
                        let mut guard = stopped.lock();
                        if !*guard {
                            wake.wait_for(&mut guard, period);
                        }
                        if *guard {
                            return;
                        }
                    }
                    let Some(journal) = weak.upgrade() else { return };
                    if let Err(err) = journal.sync() {
                        // The journal is poisoned now: report it once, and stop.
                        on_error(&err);
                        return;
                    }
                }
            });
        if let Ok(thread) = spawned {
            *journal.timer.lock() = Some(Timer { stop, thread });
        }
    }

    /// The journal's directory, its database's location (without a password), or
    /// `:memory:`.
    pub(crate) fn label(&self) -> PathBuf {
        if let Some(database) = &self.database {
            return PathBuf::from(database.label());
        }
        self.dir.clone().unwrap_or_else(|| PathBuf::from(":memory:"))
    }

    /// Whether it keeps its events anywhere: a transient journal does not.
    pub(crate) fn is_persistent(&self) -> bool {
        self.persistent()
    }

    pub(crate) fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The number the next event will get: the events journaled so far.
    pub(crate) fn next(&self) -> u64 {
        self.queue.lock().next
    }

    /// Bytes framed since the journal opened.
    pub(crate) fn framed(&self) -> u64 {
        self.framed.load(Ordering::Relaxed)
    }

    /// Seals an encoded event, as the journal stores it.
    fn seal_event(&self, seq: u64, plain: Vec<u8>) -> Vec<u8> {
        if self.sealer.is_on() { self.sealer.seal(&event_aad(seq), plain) } else { plain }
    }

    /// Journals the encoded `event`, makes it durable as the mode asks, then runs
    /// `job` and returns its output.
    pub(crate) fn commit<J: Job>(&self, event: Vec<u8>, job: J) -> Result<J::Output> {
        self.commit_with(move |_, _| Ok(Prepared::Event(event, job)))
    }

    /// Journals the event that `prepare` makes, makes it durable as the mode asks,
    /// then runs its job and returns the job's output.
    ///
    /// `prepare` gets the number and timestamp the event will have, and runs under
    /// the journal's queue lock, in journal order: what it checks and reserves holds
    /// against every event before it and after it. It must not use the journal. An
    /// error from it, or an answer it gives at once ([`Prepared::Done`]), journals
    /// nothing and takes no number.
    pub(crate) fn commit_with<J: Job>(
        &self,
        prepare: impl FnOnce(u64, Timestamp) -> Result<Prepared<J>>,
    ) -> Result<J::Output> {
        self.check_writable("handle")?;
        match self.durability {
            Durability::GroupCommit => self.commit_grouped(prepare),
            _ => self.commit_direct(prepare),
        }
    }

    /// Takes the next event number and timestamp, has `prepare` make the event and
    /// its job, and frames the event into `buf`.
    fn frame<J: Job>(
        &self,
        queue: &mut Queue,
        prepare: impl FnOnce(u64, Timestamp) -> Result<Prepared<J>>,
    ) -> Result<Framed<J>> {
        if queue.poisoned {
            return Err(self.poisoned());
        }
        let seq = queue.next;
        let at = queue.clock.max(now_micros());
        let (event, job) = match prepare(seq, Timestamp(at))? {
            Prepared::Event(event, job) => (event, job),
            Prepared::Done(output) => return Ok(Framed::Done(output)),
        };
        if event.len() > format::MAX_EVENT {
            return Err(Error::JournalWrite {
                path: self.label(),
                source: Arc::new(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("an encoded event of {} bytes is over the 1 GiB limit", event.len()),
                )),
            });
        }
        queue.clock = at;
        queue.next += 1;
        if self.persistent() {
            let stored = self.seal_event(seq, event);
            let before = queue.buf.len();
            format::put_event(&mut queue.buf, seq, at, &stored);
            self.framed.fetch_add((queue.buf.len() - before) as u64, Ordering::Relaxed);
            queue.buf_first.get_or_insert(seq);
        }
        Ok(Framed::Queued(seq, Timestamp(at), job))
    }

    fn commit_direct<J: Job>(
        &self,
        prepare: impl FnOnce(u64, Timestamp) -> Result<Prepared<J>>,
    ) -> Result<J::Output> {
        let mut queue = self.queue.lock();
        let (seq, at, job) = match self.frame(&mut queue, prepare)? {
            Framed::Queued(seq, at, job) => (seq, at, job),
            Framed::Done(output) => return Ok(output),
        };
        let must_write = match self.durability {
            Durability::SyncEach => true,
            _ => queue.buf.len() >= BUFFER_LIMIT,
        };
        if must_write && self.persistent() {
            let sync = self.durability == Durability::SyncEach;
            let (bytes, first) = (mem::take(&mut queue.buf), queue.buf_first.take());
            if let Err(err) = self.output.lock().write(self, &bytes, first, sync) {
                queue.poisoned = true;
                return Err(write_failed(err));
            }
        }
        match run_caught(job, seq, at) {
            Ok((output, digest)) => {
                if let (Some(digest), true) = (digest, self.persistent()) {
                    format::put_check(&mut queue.buf, seq, digest);
                }
                Ok(output)
            }
            Err(payload) => {
                self.void(&mut queue, seq);
                drop(queue);
                panic::resume_unwind(payload)
            }
        }
    }

    /// After job `first` panicked: voids it and every event framed after it (none
    /// applied) durably, as far as that goes, and refuses later events.
    fn void(&self, queue: &mut Queue, first: u64) {
        let last = queue.next.saturating_sub(1).max(first);
        queue.poisoned = true;
        if !self.persistent() {
            return;
        }
        let mut bytes = mem::take(&mut queue.buf);
        let buf_first = queue.buf_first.take();
        format::put_void(&mut bytes, first, last);
        // If this fails, the panicking event is replayed on the next open and panics
        // again there, which is reported as `ReplayPanicked`.
        let _ = self.output.lock().write(self, &bytes, buf_first, true);
    }

    fn commit_grouped<J: Job>(
        &self,
        prepare: impl FnOnce(u64, Timestamp) -> Result<Prepared<J>>,
    ) -> Result<J::Output> {
        let (tx, rx) = mpsc::channel();
        let mut lead = {
            let mut queue = self.queue.lock();
            let (seq, at, job) = match self.frame(&mut queue, prepare)? {
                Framed::Queued(seq, at, job) => (seq, at, job),
                Framed::Done(output) => return Ok(output),
            };
            queue.pending.push(Box::new(Queued { job: Some(job), tx, seq, at }));
            !mem::replace(&mut queue.leading, true)
        };
        loop {
            if lead {
                self.lead();
            }
            match rx.recv() {
                Ok(Signal::Lead) => lead = true,
                Ok(Signal::Done(output)) => return Ok(output),
                Ok(Signal::Failed(err)) => return Err(err),
                Ok(Signal::Panicked(payload)) => panic::resume_unwind(payload),
                // The leader went away without answering: only possible if it was
                // unwinding from a panic outside any job.
                Err(mpsc::RecvError) => return Err(self.poisoned()),
            }
        }
    }

    /// Writes and syncs everything queued, runs the jobs in order, and hands the lead on.
    fn lead(&self) {
        let mut queue = self.queue.lock();
        let batch = mem::take(&mut queue.pending);
        let bytes = mem::take(&mut queue.buf);
        let first = queue.buf_first.take();
        let poisoned = queue.poisoned;
        let mut output = self.output.lock();
        drop(queue);
        let mut checks = Vec::new();
        let mut after = After::Fine;
        if poisoned {
            for entry in batch {
                entry.fail(self.poisoned());
            }
        } else if let Err(err) = output.write(self, &bytes, first, true) {
            let err = write_failed(err);
            for entry in batch {
                entry.fail(self.share(&err));
            }
            after = After::Poison;
        } else {
            let mut entries = batch.into_iter();
            for entry in entries.by_ref() {
                let seq = entry.seq();
                match entry.run() {
                    Ran::Done(Some(digest)) => format::put_check(&mut checks, seq, digest),
                    Ran::Done(None) => {}
                    Ran::Panicked => {
                        after = After::Void(seq);
                        break;
                    }
                }
            }
            for entry in entries {
                entry.fail(self.poisoned());
            }
        }
        drop(output);
        let mut queue = self.queue.lock();
        match after {
            After::Fine => {}
            After::Poison => queue.poisoned = true,
            After::Void(first) => self.void(&mut queue, first),
        }
        if queue.poisoned {
            for entry in mem::take(&mut queue.pending) {
                entry.fail(self.poisoned());
            }
            queue.buf.clear();
            queue.buf_first = None;
            queue.leading = false;
            return;
        }
        queue.buf.splice(0..0, checks);
        match queue.pending.first() {
            Some(next) => next.lead(),
            None => queue.leading = false,
        }
    }

    /// A copy of the [`Error::Fenced`] `err`.
    fn share_fenced(&self, err: &Error) -> Error {
        match err {
            Error::Fenced { location, namespace, epoch, current } => Error::Fenced {
                location: location.clone(),
                namespace: namespace.clone(),
                epoch: *epoch,
                current: *current,
            },
            _ => Error::Poisoned { path: self.label() },
        }
    }

    /// The error of a failed write, for one of the callers it failed.
    fn share(&self, err: &Error) -> Error {
        match err {
            Error::JournalWrite { path, source } => {
                Error::JournalWrite { path: path.clone(), source: Arc::clone(source) }
            }
            _ => self.poisoned(),
        }
    }

    /// Writes and `fdatasync`s everything handled so far.
    pub(crate) fn sync(&self) -> Result<()> {
        self.drain(true)
    }

    /// Writes everything handled so far to the journal file, syncing nothing: what a
    /// reader of the file needs in the buffered modes.
    pub(crate) fn write_out(&self) -> Result<()> {
        self.drain(false)
    }

    fn drain(&self, sync: bool) -> Result<()> {
        let mut queue = self.queue.lock();
        if queue.poisoned {
            return Err(self.poisoned());
        }
        // A read-only journal has written nothing.
        if !self.persistent() || self.access == Access::ReadOnly {
            return Ok(());
        }
        let bytes = mem::take(&mut queue.buf);
        let first = queue.buf_first.take();
        let mut output = self.output.lock();
        drop(queue);
        let res = output.write(self, &bytes, first, sync);
        if res.is_err() {
            drop(output);
            self.queue.lock().poisoned = true;
        }
        res.map_err(write_failed)
    }

    /// Writes the snapshot of `body`, the encoded state after `events` events (the
    /// last stamped `at`), has the next write start a new journal file, and deletes
    /// the snapshots beyond the newest `keep` and the journal files that no kept
    /// snapshot needs, once the oldest kept snapshot is durable.
    ///
    /// It waits for no event: neither for the journal's queue nor for its file, which
    /// an event whose job waits for the state's lock may hold. So a snapshot can be
    /// taken by a thread that holds a read guard of the state, while another handles
    /// an event.
    pub(crate) fn snapshot(
        &self,
        body: Vec<u8>,
        events: u64,
        at: u64,
        keep: usize,
        files: Files,
    ) -> Result<()> {
        self.check_writable("snapshot")?;
        if let Some(database) = &self.database {
            let _one = self.snapshotting.lock();
            let bytes = self.snapshot_bytes(self.label(), events, at, body)?;
            return database.snapshot(&bytes, events, keep, files == Files::Retire);
        }
        let Some(dir) = &self.dir else { return Ok(()) };
        // One at a time: two would write the same temporary file.
        let _one = self.snapshotting.lock();
        let bytes =
            self.snapshot_bytes(dir.join(format::snapshot_name(events)), events, at, body)?;
        snapshot::write(&self.io, dir, events, &bytes)?;
        self.rotate.store(true, Ordering::Relaxed);
        let Some(snapshot::Retained { oldest, old }) = snapshot::retained(&self.io, dir, keep)?
        else {
            return Ok(());
        };
        let retired = match files {
            Files::Retire => self.retired(oldest.0)?,
            Files::Keep => Vec::new(),
        };
        if old.is_empty() && retired.is_empty() {
            return Ok(());
        }
        // What is deleted holds no event that the oldest kept snapshot does not: it
        // must be durable first. (A snapshot nothing relies on yet need not be; one
        // lost to a crash is passed over.)
        let (_, oldest_path) = &oldest;
        self.io
            .open(oldest_path, Open::Read)
            .and_then(|file| file.sync_all())
            .and_then(|()| self.io.sync_dir(dir))
            .map_err(Error::io(oldest_path))?;
        // Not made durable: a deleted snapshot or journal file that comes back after a
        // crash is harmless (recovery passes over what a snapshot covers), and the
        // next sync of the directory covers it.
        for path in old.iter().chain(&retired) {
            self.io.remove_file(path).map_err(Error::io(path))?;
        }
        Ok(())
    }

    /// Writes a copy of this journal into the new directory `dir`: the snapshot of
    /// `body` (the encoded state after `events` events, the last stamped `at`) and
    /// an empty journal file after it, whose header carries the types and key check.
    pub(crate) fn copy_to(&self, dir: &Path, body: Vec<u8>, events: u64, at: u64) -> Result<()> {
        self.io.create_dir_durably(dir).map_err(Error::io(dir))?;
        let (identity, event_schema) = (&self.identity, self.event_schema);
        let bytes =
            self.snapshot_bytes(dir.join(format::snapshot_name(events)), events, at, body)?;
        let path = snapshot::write(&self.io, dir, events, &bytes)?;
        let synced = self.io.open(&path, Open::Read).and_then(|file| file.sync_all());
        synced.map_err(Error::io(&path))?;
        // Creating the journal file syncs the directory, which holds the snapshot too.
        recovery::create_journal_file(&self.io, dir, identity, event_schema, &self.sealer, events)
            .map(drop)
    }

    /// The bytes of the snapshot of `body` (the encoded state after `events`
    /// events, the last stamped `at`) as this journal writes them, with its types,
    /// versions and key; `place` names it in an error.
    fn snapshot_bytes(
        &self,
        place: PathBuf,
        events: u64,
        at: u64,
        body: Vec<u8>,
    ) -> Result<Vec<u8>> {
        snapshot::encode(&self.identity, self.event_schema, &self.sealer, events, at, body)
            .map_err(Error::io(place))
    }

    /// The journal files holding only events numbered below `below`: those whose
    /// successor starts at `below` or before.
    fn retired(&self, below: u64) -> Result<Vec<PathBuf>> {
        let Some(dir) = &self.dir else { return Ok(Vec::new()) };
        let files = recovery::journal_files(&self.io, dir)?;
        let retired = files.windows(2).filter_map(|pair| match pair {
            [(_, path), (next_first, _)] if *next_first <= below => Some(path.clone()),
            _ => None,
        });
        Ok(retired.collect())
    }

    /// Stops the timer thread, if any, and syncs. A poisoned journal has nothing
    /// left to sync (its callers got the error already).
    pub(crate) fn close(&self) -> Result<()> {
        if let Some(timer) = self.timer.lock().take() {
            *timer.stop.0.lock() = true;
            timer.stop.1.notify_all();
            if timer.thread.thread().id() != thread::current().id() {
                let _ = timer.thread.join();
            }
        }
        if self.queue.lock().poisoned {
            return Ok(());
        }
        self.sync()?;
        // Its writer gives the lease up, so that a standby takes over at once.
        if let Some(database) = &self.database {
            return database.close();
        }
        // Everything is synced: the journal ends here, and nothing after is torn.
        let mut output = self.output.lock();
        if output.failed || output.file.is_none() {
            return Ok(());
        }
        let end = End { first: output.first, len: output.len };
        if let Some(lock) = &mut output.lock {
            lock.mark_closed(end)?;
            output.closed = true;
        }
        Ok(())
    }
}

// A last sync for the buffered modes, whatever dropped the journal; errors were
// either reported by the owner's own `close` or cannot be reported any more.
impl Drop for Journal {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// What [`Journal::commit_with`]'s `prepare` decided.
pub(crate) enum Prepared<J: Job> {
    /// Journal this event, then run this job.
    Event(Vec<u8>, J),
    /// Journal nothing: this is the answer.
    Done(J::Output),
}

/// An event framed into the queue's buffer, or the answer that needed none.
enum Framed<J: Job> {
    Queued(u64, Timestamp, J),
    Done(J::Output),
}

/// What a snapshot does with the journal files that it and the older snapshots it
/// keeps cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Files {
    /// Deletes them: the snapshot holds their events (prevalence).
    Retire,
    /// Keeps them: they are read again (an event store's events).
    Keep,
}

/// What a journal is made of, besides its queue and output.
pub(super) struct Parts {
    pub(super) dir: Option<PathBuf>,
    pub(super) identity: Identity,
    /// The events' schema version new files are written with.
    pub(super) event_schema: u32,
    pub(super) durability: Durability,
    pub(super) sealer: Sealer,
    pub(super) io: Io,
    pub(super) access: Access,
}

impl Output {
    fn new(
        file: Option<IoFile>,
        path: PathBuf,
        first: u64,
        len: u64,
        lock: Option<Hold>,
    ) -> Output {
        Output { file, path, first, len, lock, closed: false, unsynced: false, failed: false }
    }

    /// Writes `bytes`, whose first event is numbered `first`, to the current file
    /// (first starting a new one if a snapshot asked for it and the bytes hold an
    /// event), and syncs when `sync` says so. After a failure, refuses every later
    /// write with [`Error::Poisoned`].
    fn write(
        &mut self,
        journal: &Journal,
        bytes: &[u8],
        first: Option<u64>,
        sync: bool,
    ) -> Result<()> {
        if self.failed {
            return Err(journal.poisoned());
        }
        // A database commits what it is given: each write is durable, in every mode.
        if let Some(database) = &journal.database {
            let res = database.write(bytes);
            if let Err(err) = &res {
                self.failed = true;
                if matches!(err, Error::Fenced { .. }) {
                    *journal.fenced.lock() = Some(journal.share_fenced(err));
                }
            }
            return res;
        }
        if let Some(first) = first
            && journal.rotate.swap(false, Ordering::Relaxed)
        {
            self.start(journal, first)?;
        }
        let res = self.write_unchecked(bytes, sync);
        self.failed = res.is_err();
        res
    }

    /// After a clean close, says that the journal is open again, before it changes
    /// (a snapshot still running may write after the close).
    fn reopen(&mut self) -> Result<()> {
        if self.closed {
            if let Some(lock) = &mut self.lock {
                lock.mark_open()?;
            }
            self.closed = false;
        }
        Ok(())
    }

    fn write_unchecked(&mut self, bytes: &[u8], sync: bool) -> Result<()> {
        if !bytes.is_empty() {
            self.reopen()?;
        }
        // Only a transient journal has no file, and it writes nothing.
        let Some(file) = &mut self.file else { return Ok(()) };
        if !bytes.is_empty() {
            file.write_all(bytes).map_err(Error::io(&self.path))?;
            self.len += bytes.len() as u64;
            self.unsynced = true;
        }
        if sync && self.unsynced {
            file.sync_data().map_err(Error::io(&self.path))?;
            self.unsynced = false;
        }
        Ok(())
    }

    /// Starts the journal file whose first event is `first`, durably, once the
    /// current one is synced.
    fn start(&mut self, journal: &Journal, first: u64) -> Result<()> {
        if self.failed {
            return Err(journal.poisoned());
        }
        let Some(dir) = &journal.dir else { return Ok(()) };
        let res = self.reopen().and_then(|()| self.write_unchecked(&[], true)).and_then(|()| {
            recovery::create_journal_file(
                &journal.io,
                dir,
                &journal.identity,
                journal.event_schema,
                &journal.sealer,
                first,
            )
        });
        // Once the new file is durable, the last one says that the journal goes on
        // in it, so that deleting the new file is found out. Not synced: the link
        // guards against damage, not against a power loss, which loses nothing
        // here if it takes the link.
        let res = res.and_then(|created| {
            let mut link = Vec::new();
            format::put_link(&mut link, first);
            self.write_unchecked(&link, false).map(|()| created)
        });
        match res {
            Ok((file, path)) => {
                self.len = file_len(Some(&file), &path)?;
                self.file = Some(file);
                self.path = path;
                self.first = first;
                // The new file holds nothing unsynced (the old one's link may).
                self.unsynced = false;
                Ok(())
            }
            Err(err) => {
                self.failed = true;
                Err(err)
            }
        }
    }
}

/// An event queued for group commit, with the channel back to its caller.
trait Pending: Send {
    fn seq(&self) -> u64;
    fn run(self: Box<Self>) -> Ran;
    fn fail(self: Box<Self>, err: Error);
    fn lead(&self);
}

enum Ran {
    Done(Option<u64>),
    Panicked,
}

/// What a leader must do once its batch is through.
enum After {
    Fine,
    /// The write failed: refuse later events.
    Poison,
    /// Job `.0` panicked: void it and every later event, and refuse later events.
    Void(u64),
}

enum Signal<T> {
    Lead,
    Done(T),
    Failed(Error),
    Panicked(Box<dyn Any + Send>),
}

struct Queued<J: Job> {
    job: Option<J>,
    tx: mpsc::Sender<Signal<J::Output>>,
    seq: u64,
    at: Timestamp,
}

impl<J: Job> Pending for Queued<J> {
    fn seq(&self) -> u64 {
        self.seq
    }

    fn run(mut self: Box<Self>) -> Ran {
        let Some(job) = self.job.take() else { return Ran::Done(None) };
        match run_caught(job, self.seq, self.at) {
            Ok((output, digest)) => {
                let _ = self.tx.send(Signal::Done(output));
                Ran::Done(digest)
            }
            Err(payload) => {
                let _ = self.tx.send(Signal::Panicked(payload));
                Ran::Panicked
            }
        }
    }

    fn fail(self: Box<Self>, err: Error) {
        let _ = self.tx.send(Signal::Failed(err));
    }

    fn lead(&self) {
        let _ = self.tx.send(Signal::Lead);
    }
}

fn run_caught<J: Job>(
    job: J,
    seq: u64,
    at: Timestamp,
) -> Result<(J::Output, Option<u64>), Box<dyn Any + Send>> {
    panic::catch_unwind(AssertUnwindSafe(|| job.run(seq, at)))
}

/// Appends a link to the journal file whose first event is `next` at the end of the
/// file at `path` (not synced, as at a snapshot: see `Output::start`).
fn append_link(io: &Io, path: &std::path::Path, next: u64) -> Result<()> {
    let mut link = Vec::new();
    format::put_link(&mut link, next);
    let mut file = io.open(path, Open::Append).map_err(Error::io(path))?;
    file.write_all(&link).map_err(Error::io(path))
}

/// The length of the journal file `file` at `path`.
fn file_len(file: Option<&IoFile>, path: &std::path::Path) -> Result<u64> {
    file.map_or(Ok(0), |file| file.len().map_err(Error::io(path)))
}

/// The error of a failed journal write, shareable by every caller it failed.
fn write_failed(err: Error) -> Error {
    match err {
        Error::Io { path, source } => Error::JournalWrite { path, source: Arc::new(source) },
        other => other,
    }
}

pub(crate) fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |it| u64::try_from(it.as_micros()).unwrap_or(u64::MAX))
}
