//! The journal engine behind both front doors of prevalence: [`Prevayler`] and
//! journaled cells ([`StateCell::handle`]).
//!
//! Split like fjall's journal: `format` (the bytes), `recovery` (reading a directory
//! back, torn tails and damage), `snapshot` (snapshot files) and this module, the
//! writer. The writer assigns every event its number and timestamp, appends it to
//! the journal, makes it as durable as the [`Durability`] asks, and only then runs
//! the event's job (which applies it to the state), in event-number order.
//!
//! - `Sync`: the caller holds the queue lock through the write, the `fdatasync` and
//!   the job, so each event has an `fdatasync` of its own.
//! - `GroupCommit`: callers queue their event and its job; one of them, the leader,
//!   writes everything queued with one `fdatasync`, runs the jobs in order, hands each
//!   caller its result, and passes the lead to the first caller that queued meanwhile.
//! - `Periodic` and `Unsynced`: frames collect in a buffer that is written when it
//!   fills (and, for `Periodic`, written and synced by a timer thread); jobs run at once.
//!
//! If a write fails, no job of that write runs, and the journal refuses every later
//! event ([`Error::Poisoned`]): memory never runs ahead of the journal. If a job
//! panics, the state may be half-changed, so the journal writes a *void* frame for
//! that event and every event after it that was written but not applied, syncs it,
//! and refuses later events; replay skips voided events, so reopening gives the state
//! without them.
//!
//! [`Prevayler`]: crate::Prevayler
//! [`StateCell::handle`]: crate::StateCell::handle

mod format;
mod recovery;
mod snapshot;

use std::{
    any::Any,
    fs::{self, File},
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
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use parking_lot::{Condvar, Mutex};
use serde::de::DeserializeOwned;

pub use self::recovery::Recovered;
use crate::{
    Error, Result,
    crypt::{KEYCHECK_PLAIN, Sealer},
    fs as dirs,
};

/// Frames buffered by the unsynced modes before they are written.
const BUFFER_LIMIT: usize = 256 * 1024;
/// The journal directory's lock file.
pub(crate) const LOCK_FILE: &str = "instastate.lock";
/// Temporary files end in this; any found at open are left-overs of a crash.
pub(crate) const PART_SUFFIX: &str = ".part";

/// When a handled event is durable.
///
/// The default is [`Durability::SyncEach`]. Whatever the mode, an event is written to
/// the journal before its system function runs, and events run in journal order.
///
/// # Example
/// ```
/// use std::time::Duration;
/// use instastate::{Prevayler, prevalence::Durability};
///
/// # fn main() -> instastate::Result<()> {
/// # let dir = tempfile::tempdir().unwrap();
/// let counter = Prevayler::builder()
///     .durability(Durability::Periodic(Duration::from_millis(100)))
///     .open(dir.path(), 0u64, |n: &mut u64, by: u64, _| { *n += by; *n })?;
/// counter.handle(5)?;
/// counter.sync()?; // durable now, without waiting for the timer
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Durability {
    /// Every event is written and `fdatasync`ed before [`handle`] returns; one
    /// `fdatasync` per event, one event at a time.
    ///
    /// [`handle`]: crate::Prevayler::handle
    #[default]
    SyncEach,
    /// Every event is written and `fdatasync`ed before [`handle`] returns, and
    /// callers on other threads share one `fdatasync`: under concurrency, many
    /// times the throughput of [`Durability::SyncEach`], with the same promise.
    ///
    /// [`handle`]: crate::Prevayler::handle
    GroupCommit,
    /// Events are buffered, and written and `fdatasync`ed every period (and by
    /// [`sync`], snapshots and closing). A crash loses at most the events of the
    /// last period, whole events, never a part of one.
    ///
    /// [`sync`]: crate::Prevayler::sync
    Periodic(Duration),
    /// Events are buffered and written when the buffer fills, and written and
    /// `fdatasync`ed only by [`sync`], snapshots and closing. A crash loses the events
    /// since the last of those. For bulk loads and tests.
    ///
    /// [`sync`]: crate::Prevayler::sync
    Unsynced,
}

/// What to do when a journal file is damaged somewhere other than its torn last write.
///
/// # Example
/// ```
/// use instastate::{Prevayler, prevalence::Recovery};
///
/// # fn main() -> instastate::Result<()> {
/// # let dir = tempfile::tempdir().unwrap();
/// // Only after `Error::JournalCorrupt`, and after copying the directory:
/// let counter = Prevayler::builder()
///     .recovery(Recovery::Salvage)
///     .open(dir.path(), 0u64, |n: &mut u64, by: u64, _| *n += by)?;
/// if let Some(salvage) = counter.recovered().salvaged() {
///     eprintln!("kept the events before the damage; the rest is in {}", salvage.display());
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Recovery {
    /// Damage other than a torn last write is an error, [`Error::JournalCorrupt`],
    /// and nothing is changed.
    #[default]
    Strict,
    /// Keep the events before the damage: the damaged file and every later one are
    /// moved into a `salvaged-<time>` directory beside the journal, and the sound
    /// part of the damaged file is written back. Events after the damage are lost
    /// (their bytes are kept in that directory).
    Salvage,
}

/// When the system function ran: chosen by instastate when the event is handled,
/// journaled with it, and given again on replay, so that replay is deterministic.
///
/// Microseconds since the Unix epoch, from the system clock, never less than the
/// timestamp of the event before.
///
/// # Example
/// ```
/// use instastate::{Prevayler, Timestamp};
///
/// fn stamp(log: &mut Vec<u64>, _: (), at: Timestamp) {
///     log.push(at.as_millis());
/// }
/// let log = Prevayler::builder().transient(Vec::new(), stamp);
/// log.handle(())?;
/// log.handle(())?;
/// log.read(|log| assert!(log[0] <= log[1]));
/// # Ok::<(), instastate::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The timestamp `micros` microseconds after the Unix epoch.
    #[must_use]
    pub const fn from_micros(micros: u64) -> Timestamp {
        Timestamp(micros)
    }

    /// Microseconds since the Unix epoch.
    #[must_use]
    pub const fn as_micros(self) -> u64 {
        self.0
    }

    /// Whole milliseconds since the Unix epoch.
    #[must_use]
    pub const fn as_millis(self) -> u64 {
        self.0 / 1000
    }

    /// The timestamp as a [`SystemTime`].
    #[must_use]
    pub fn to_system_time(self) -> SystemTime {
        UNIX_EPOCH + Duration::from_micros(self.0)
    }
}

// A timestamp is often kept in the state; it encodes as its microseconds.
impl serde::Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_u64(self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        u64::deserialize(deserializer).map(Timestamp)
    }
}

/// What a journal's files are written for; checked strictly on open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Identity {
    pub(crate) state_type: &'static str,
    pub(crate) event_type: &'static str,
    pub(crate) schema: u32,
}

impl Identity {
    fn describe(state_type: &str, event_type: &str, schema: u32) -> String {
        format!("state `{state_type}` with events `{event_type}` (schema v{schema})")
    }
}

/// How to open a journal.
pub(crate) struct Config {
    /// The directory, or `None` for a transient journal.
    pub(crate) dir: Option<PathBuf>,
    pub(crate) identity: Identity,
    pub(crate) durability: Durability,
    pub(crate) recovery: Recovery,
    pub(crate) sealer: Sealer,
}

/// An event's work once it is in the journal: apply it and return its result, and
/// the digest of the state after it when the replay check is on.
pub(crate) trait Job: Send + 'static {
    type Output: Send + 'static;
    fn run(self, seq: u64, at: Timestamp) -> (Self::Output, Option<u64>);
}

/// One replayed event: its number, timestamp and encoded bytes.
#[derive(Clone, Copy)]
pub(crate) struct Replayed<'a> {
    pub(crate) seq: u64,
    pub(crate) at: Timestamp,
    pub(crate) bytes: &'a [u8],
}

/// A state read back from a snapshot and the journal after it.
pub(crate) struct Opened<S> {
    pub(crate) state: S,
    /// The events applied to it: the next event's number.
    pub(crate) applied: u64,
    /// The last timestamp applied to it.
    pub(crate) at: u64,
    pub(crate) journal: Journal,
    pub(crate) recovered: Recovered,
}

/// Opens the journal in `config.dir` (which the caller created and locked, holding
/// `lock`): loads the newest sound snapshot, or `initial()`, and replays the journal
/// after it through `apply`, which returns the state's digest when checking replay.
///
/// With [`Recovery::Salvage`], an event whose system function panics on replay (it
/// was journaled, and the process died before its void frame was written, or it was
/// built with `panic = "abort"`) is skipped: replay starts again without it, and a
/// void frame for it is written once the journal is open.
///
/// This is the one recovery path of both front doors.
pub(crate) fn open_state<S: DeserializeOwned>(
    config: Config,
    lock: Option<File>,
    mut initial: impl FnMut() -> Result<S>,
    apply: &mut impl FnMut(&mut S, Replayed<'_>) -> Result<Option<u64>>,
) -> Result<Opened<S>> {
    let Config { dir, identity, durability, recovery, sealer } = config;
    let mut skipped = Vec::new();
    loop {
        let mut unsound = Vec::new();
        let snapshot = match &dir {
            Some(dir) => snapshot::load_newest(dir, &identity, &sealer, &mut unsound)?,
            None => None,
        };
        let (mut state, covered, at) = match snapshot {
            Some(loaded) => {
                let state = crate::cell::decode_exact(&loaded.body).map_err(|source| {
                    Error::JournalDecode {
                        path: loaded.path.clone(),
                        what: "the snapshot".to_owned(),
                        type_name: identity.state_type.to_owned(),
                        source: crate::error::CodecError(source),
                    }
                })?;
                (state, Some(loaded.events), loaded.at)
            }
            None => (initial()?, None, 0),
        };
        let from = covered.unwrap_or(0);
        let (mut applied, mut last_at) = (from, at);
        let recovered = match &dir {
            Some(dir) => {
                let scope =
                    recovery::Scope { identity: &identity, sealer: &sealer, recovery, from };
                recovery::recover(dir, &scope, &skipped, &mut |event| {
                    let digest = apply(&mut state, event)?;
                    applied = event.seq + 1;
                    last_at = event.at.as_micros();
                    Ok(digest)
                })
            }
            None => Ok((Recovered::default(), recovery::Tail::default())),
        };
        let (mut recovered, tail) = match recovered {
            Err(Error::ReplayPanicked { event, .. })
                if recovery == Recovery::Salvage && !skipped.contains(&event) =>
            {
                skipped.push(event);
                continue;
            }
            res => res?,
        };
        let journal = Journal::resume(dir, identity, durability, sealer, lock, &tail, from, at)?;
        if !skipped.is_empty() {
            journal.void_events(&skipped)?;
        }
        recovered.snapshot = covered;
        recovered.unsound_snapshots = unsound;
        recovered.skipped = skipped;
        return Ok(Opened { state, applied, at: last_at, journal, recovered });
    }
}

/// The journal writer; see the module docs.
pub(crate) struct Journal {
    dir: Option<PathBuf>,
    identity: Identity,
    durability: Durability,
    sealer: Sealer,
    queue: Mutex<Queue>,
    io: Mutex<Io>,
    /// Set by a snapshot: the next write starts a new file.
    rotate: AtomicBool,
    /// Bytes framed since the journal opened.
    framed: AtomicU64,
    timer: Mutex<Option<Timer>>,
    _lock: Option<File>,
}

struct Queue {
    /// The number of the next event.
    next: u64,
    /// The last timestamp given out, in microseconds.
    clock: u64,
    /// Frames not yet written.
    buf: Vec<u8>,
    /// The number of the first event framed in `buf`, if any.
    buf_first: Option<u64>,
    /// Group commit: events queued for the next leader.
    pending: Vec<Box<dyn Pending>>,
    leading: bool,
    poisoned: bool,
}

struct Io {
    file: Option<File>,
    path: PathBuf,
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
    #[allow(clippy::too_many_arguments)] // One call site, in `open_state`.
    fn resume(
        dir: Option<PathBuf>,
        identity: Identity,
        durability: Durability,
        sealer: Sealer,
        lock: Option<File>,
        tail: &recovery::Tail,
        from: u64,
        at: u64,
    ) -> Result<Journal> {
        let next = tail.next.max(from);
        let clock = tail.clock.max(at);
        // Append to the last file only when it ends exactly where the next event goes;
        // otherwise (no file yet, or a snapshot ahead of it) the next write starts one.
        let file = match (&dir, &tail.file) {
            (Some(_), Some((path, last_next))) if *last_next == next => {
                Some(File::options().append(true).open(path).map_err(Error::io(path))?)
            }
            _ => None,
        };
        let path = tail.file.as_ref().map(|(path, _)| path.clone()).unwrap_or_default();
        let rotate = file.is_none();
        Ok(Journal {
            identity,
            durability: if dir.is_some() { durability } else { Durability::Unsynced },
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
            io: Mutex::new(Io { file, path, unsynced: false, failed: false }),
            rotate: AtomicBool::new(rotate),
            framed: AtomicU64::new(0),
            timer: Mutex::new(None),
            _lock: lock,
            dir,
        })
    }

    /// Durably voids `events`, which panicked on replay.
    fn void_events(&self, events: &[u64]) -> Result<()> {
        let mut queue = self.queue.lock();
        for &seq in events {
            format::put_void(&mut queue.buf, seq, seq);
        }
        // A journal without a current file starts one named after the next event.
        let next = queue.next;
        queue.buf_first.get_or_insert(next);
        drop(queue);
        self.sync()
    }

    /// A journal that writes nothing, for transient systems: events are numbered,
    /// stamped and applied in order, and that is all.
    pub(crate) fn transient(identity: Identity) -> Journal {
        Journal {
            dir: None,
            identity,
            durability: Durability::Unsynced,
            sealer: Sealer::default(),
            queue: Mutex::new(Queue {
                next: 0,
                clock: 0,
                buf: Vec::new(),
                buf_first: None,
                pending: Vec::new(),
                leading: false,
                poisoned: false,
            }),
            io: Mutex::new(Io { file: None, path: PathBuf::new(), unsynced: false, failed: false }),
            rotate: AtomicBool::new(false),
            framed: AtomicU64::new(0),
            timer: Mutex::new(None),
            _lock: None,
        }
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

    /// The journal's directory, or `:memory:`.
    pub(crate) fn label(&self) -> PathBuf {
        self.dir.clone().unwrap_or_else(|| PathBuf::from(":memory:"))
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
        if event.len() > (format::MAX_PAYLOAD as usize).saturating_sub(format::EVENT_HEAD + 64) {
            return Err(Error::JournalWrite {
                path: self.label(),
                source: Arc::new(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("an encoded event of {} bytes is over the 1 GiB limit", event.len()),
                )),
            });
        }
        match self.durability {
            Durability::GroupCommit => self.commit_grouped(event, job),
            _ => self.commit_direct(event, job),
        }
    }

    /// Takes the next event number and timestamp and frames the event into `buf`.
    fn frame(&self, queue: &mut Queue, event: Vec<u8>) -> Result<(u64, Timestamp)> {
        if queue.poisoned {
            return Err(Error::Poisoned { path: self.label() });
        }
        let seq = queue.next;
        queue.clock = queue.clock.max(now_micros());
        let at = queue.clock;
        queue.next += 1;
        if self.dir.is_some() {
            let stored = self.seal_event(seq, event);
            let before = queue.buf.len();
            format::put_event(&mut queue.buf, seq, at, &stored);
            self.framed.fetch_add((queue.buf.len() - before) as u64, Ordering::Relaxed);
            queue.buf_first.get_or_insert(seq);
        }
        Ok((seq, Timestamp(at)))
    }

    fn commit_direct<J: Job>(&self, event: Vec<u8>, job: J) -> Result<J::Output> {
        let mut queue = self.queue.lock();
        let (seq, at) = self.frame(&mut queue, event)?;
        let must_write = match self.durability {
            Durability::SyncEach => true,
            _ => queue.buf.len() >= BUFFER_LIMIT,
        };
        if must_write && self.dir.is_some() {
            let sync = self.durability == Durability::SyncEach;
            let (bytes, first) = (mem::take(&mut queue.buf), queue.buf_first.take());
            if let Err(err) = self.io.lock().write(self, &bytes, first, sync) {
                queue.poisoned = true;
                return Err(write_failed(err));
            }
        }
        match run_caught(job, seq, at) {
            Ok((output, digest)) => {
                if let (Some(digest), true) = (digest, self.dir.is_some()) {
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
        if self.dir.is_none() {
            return;
        }
        let mut bytes = mem::take(&mut queue.buf);
        let buf_first = queue.buf_first.take();
        format::put_void(&mut bytes, first, last);
        // If this fails, the panicking event is replayed on the next open and panics
        // again there, which is reported as `ReplayPanicked`.
        let _ = self.io.lock().write(self, &bytes, buf_first, true);
    }

    fn commit_grouped<J: Job>(&self, event: Vec<u8>, job: J) -> Result<J::Output> {
        let (tx, rx) = mpsc::channel();
        let mut lead = {
            let mut queue = self.queue.lock();
            let (seq, at) = self.frame(&mut queue, event)?;
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
                Err(mpsc::RecvError) => return Err(Error::Poisoned { path: self.label() }),
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
        let mut io = self.io.lock();
        drop(queue);
        let mut checks = Vec::new();
        let mut after = After::Fine;
        if poisoned {
            for entry in batch {
                entry.fail(Error::Poisoned { path: self.label() });
            }
        } else if let Err(err) = io.write(self, &bytes, first, true) {
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
                entry.fail(Error::Poisoned { path: self.label() });
            }
        }
        drop(io);
        let mut queue = self.queue.lock();
        match after {
            After::Fine => {}
            After::Poison => queue.poisoned = true,
            After::Void(first) => self.void(&mut queue, first),
        }
        if queue.poisoned {
            for entry in mem::take(&mut queue.pending) {
                entry.fail(Error::Poisoned { path: self.label() });
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

    /// The error of a failed write, for one of the callers it failed.
    fn share(&self, err: &Error) -> Error {
        match err {
            Error::JournalWrite { path, source } => {
                Error::JournalWrite { path: path.clone(), source: Arc::clone(source) }
            }
            _ => Error::Poisoned { path: self.label() },
        }
    }

    /// Writes and `fdatasync`s everything handled so far.
    pub(crate) fn sync(&self) -> Result<()> {
        let mut queue = self.queue.lock();
        if queue.poisoned {
            return Err(Error::Poisoned { path: self.label() });
        }
        if self.dir.is_none() {
            return Ok(());
        }
        let bytes = mem::take(&mut queue.buf);
        let first = queue.buf_first.take();
        let mut io = self.io.lock();
        drop(queue);
        let res = io.write(self, &bytes, first, true);
        if res.is_err() {
            drop(io);
            self.queue.lock().poisoned = true;
        }
        res.map_err(write_failed)
    }

    /// Writes the snapshot of `body`, the encoded state after `events` events (the
    /// last stamped `at`): later events go to a new journal file, the journal is
    /// synced, the snapshot written durably, and only then are snapshots beyond the
    /// newest `keep` and the journal files that no kept snapshot needs deleted.
    pub(crate) fn snapshot(&self, body: Vec<u8>, events: u64, at: u64, keep: usize) -> Result<()> {
        let Some(dir) = &self.dir else { return Ok(()) };
        self.rotate.store(true, Ordering::Relaxed);
        self.sync()?;
        snapshot::write(dir, &self.identity, &self.sealer, events, at, body)?;
        if let Some(oldest) = snapshot::retain(dir, keep)? {
            self.retire(oldest)?;
        }
        Ok(())
    }

    /// Writes a copy of this journal into the new directory `dir`: the snapshot of
    /// `body` (the encoded state after `events` events, the last stamped `at`) and
    /// an empty journal file after it, whose header carries the types and key check.
    pub(crate) fn copy_to(&self, dir: &Path, body: Vec<u8>, events: u64, at: u64) -> Result<()> {
        dirs::create_dir_durably(dir).map_err(Error::io(dir))?;
        snapshot::write(dir, &self.identity, &self.sealer, events, at, body)?;
        recovery::create_journal_file(dir, &self.identity, &self.sealer, events).map(drop)
    }

    /// Deletes the journal files holding only events numbered below `below`.
    fn retire(&self, below: u64) -> Result<()> {
        let Some(dir) = &self.dir else { return Ok(()) };
        let files = recovery::journal_files(dir)?;
        let mut removed = false;
        for pair in files.windows(2) {
            if let [(_, path), (next_first, _)] = pair
                && *next_first <= below
            {
                fs::remove_file(path).map_err(Error::io(path))?;
                removed = true;
            }
        }
        if removed {
            dirs::sync_dir(dir).map_err(Error::io(dir))?;
        }
        Ok(())
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
        self.sync()
    }
}

// A last sync for the buffered modes, whatever dropped the journal; errors were
// either reported by the owner's own `close` or cannot be reported any more.
impl Drop for Journal {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

impl Io {
    /// Writes `bytes` to the current file (starting a new one first when asked and
    /// `first` says which event it starts with), and syncs when `sync` says so.
    /// After a failure, refuses every later write with [`Error::Poisoned`].
    fn write(
        &mut self,
        journal: &Journal,
        bytes: &[u8],
        first: Option<u64>,
        sync: bool,
    ) -> Result<()> {
        if self.failed {
            return Err(Error::Poisoned { path: journal.label() });
        }
        let res = self.write_unchecked(journal, bytes, first, sync);
        self.failed = res.is_err();
        res
    }

    fn write_unchecked(
        &mut self,
        journal: &Journal,
        bytes: &[u8],
        first: Option<u64>,
        sync: bool,
    ) -> Result<()> {
        let Some(dir) = &journal.dir else { return Ok(()) };
        if let Some(first) = first
            && journal.rotate.swap(false, Ordering::Relaxed)
        {
            if let Some(file) = &self.file
                && self.unsynced
            {
                file.sync_data().map_err(Error::io(&self.path))?;
                self.unsynced = false;
            }
            let (file, path) =
                recovery::create_journal_file(dir, &journal.identity, &journal.sealer, first)?;
            self.file = Some(file);
            self.path = path;
        }
        let Some(file) = &mut self.file else {
            // Nothing was ever written, and `bytes` hold no event: only check frames
            // of events whose file is gone. Nothing to do.
            return Ok(());
        };
        if !bytes.is_empty() {
            file.write_all(bytes).map_err(Error::io(&self.path))?;
            self.unsynced = true;
        }
        if sync && self.unsynced {
            file.sync_data().map_err(Error::io(&self.path))?;
            self.unsynced = false;
        }
        Ok(())
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

/// Marks its flag when dropped while the thread panics. A job holds one, made after
/// it took the state's write lock, so that the flag is set before the lock is
/// released: snapshots and backups check it and refuse a half-changed state.
pub(crate) struct Taint<'a>(pub(crate) &'a AtomicBool);

impl Drop for Taint<'_> {
    fn drop(&mut self) {
        if thread::panicking() {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

/// The associated data a sealed event is bound to: its number.
pub(crate) fn event_aad(seq: u64) -> Vec<u8> {
    let mut aad = b"instastate journal event ".to_vec();
    aad.extend_from_slice(&seq.to_le_bytes());
    aad
}

/// The sealed key check a sealed journal's header carries.
pub(crate) fn key_check(sealer: &Sealer) -> Vec<u8> {
    if sealer.is_on() {
        sealer.seal(b"instastate journal key check", KEYCHECK_PLAIN.to_vec())
    } else {
        Vec::new()
    }
}

/// Decodes a replayed event as exactly one `E`.
#[inline]
pub(crate) fn decode_event<E: DeserializeOwned>(dir: &Path, event: &Replayed<'_>) -> Result<E> {
    crate::cell::decode_exact(event.bytes).map_err(|source| Error::JournalDecode {
        path: dir.to_path_buf(),
        what: format!("event {}", event.seq),
        type_name: std::any::type_name::<E>().to_owned(),
        source: crate::error::CodecError(source),
    })
}

/// Runs a replayed event's system function; a panic there is
/// [`Error::ReplayPanicked`]: the event did not panic when it was handled, or it
/// would have been voided.
pub(crate) fn replay_caught(dir: &Path, seq: u64, run: impl FnOnce()) -> Result<()> {
    panic::catch_unwind(AssertUnwindSafe(run))
        .map_err(|_| Error::ReplayPanicked { path: dir.to_path_buf(), event: seq })
}

/// The error of a failed journal write, shareable by every caller it failed.
fn write_failed(err: Error) -> Error {
    match err {
        Error::Io { path, source } => Error::JournalWrite { path, source: Arc::new(source) },
        other => other,
    }
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |it| u64::try_from(it.as_micros()).unwrap_or(u64::MAX))
}
