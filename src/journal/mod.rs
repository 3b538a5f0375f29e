//! The journal engine behind both front doors of prevalence: [`Prevayler`] and
//! journaled cells ([`StateCell::handle`]).
//!
//! Split like fjall's journal: `format` (the bytes), `writer`, `recovery` (reading a
//! directory back, torn tails and damage), `snapshot` (snapshot files), `inspect`
//! (the same checks without the types, changing nothing), `scan` (reading the frames
//! in order without a lock, while a program may append), `rewrite` (replacing a
//! file the writer is done with by a rewritten copy: an event store's compaction),
//! and this module: the public types and `open_versioned`, the one recovery path. The writer
//! assigns every event its number and timestamp, appends it to the journal, makes it
//! as durable as the [`Durability`] asks, and only then runs the event's job (which
//! applies it to the state), in event-number order.
//!
//! - `SyncEach`: the caller holds the queue lock through the write, the `fdatasync` and
//!   the job, so each event has an `fdatasync` of its own.
//! - `GroupCommit`: callers queue their event and its job; one of them, the leader,
//!   writes everything queued with one `fdatasync`, runs the jobs in order, hands each
//!   caller its result, and passes the lead to the first caller that queued meanwhile.
//! - `Periodic` and `Unsynced`: frames collect in a buffer that is written when it
//!   fills (and, for `Periodic`, written and synced by a timer thread); jobs run at once.
//!
//! If a write fails, no job of that write runs, and the journal refuses every later
//! event ([`Error::Poisoned`]): in the durable modes, memory never runs ahead of the
//! journal. If a job
//! panics, the state may be half-changed, so the journal writes a *void* frame for
//! that event and every event after it that was written but not applied, syncs it,
//! and refuses later events; replay skips voided events, so reopening gives the state
//! without them.
//!
//! [`Prevayler`]: crate::Prevayler
//! [`StateCell::handle`]: crate::StateCell::handle

#[cfg(feature = "postgres")]
mod database;
pub(crate) mod format;
mod inspect;
mod recovery;
mod rewrite;
mod scan;
mod snapshot;
mod versions;
mod writer;

use std::{
    panic::{self, AssertUnwindSafe},
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Serialize, de::DeserializeOwned};

#[cfg(feature = "postgres")]
pub(crate) use self::database::{
    DatabaseConfig, Replay, Start as Resume, check_header as check_database_header,
    header_bytes as database_header, load_snapshot as load_database_snapshot, open_on_database,
    read_on_database, replay_rows,
};
pub(crate) use self::inspect::inspect;
pub use self::{inspect::JournalReport, recovery::Recovered};
pub(crate) use self::{
    recovery::{journal_files, snapshot_files},
    rewrite::{Target as RewriteTarget, rewrite},
    scan::{Scanned, Scanner, Start, Step, Tail, read_header, vanished},
    snapshot::{LoadedSnapshot, load as load_snapshot, load_newest as load_newest_snapshot},
    versions::{Older, Place, Versions, decode as decode_versioned},
    writer::{Files, Journal, Prepared, now_micros},
};
use crate::{
    Error, Result,
    crypt::{KEYCHECK_PLAIN, Sealer},
    error::CodecError,
    io::Io,
    lockfile::{Access, Hold},
    shape::Shape,
};

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
    /// [`sync`], closing, and an event store's checkpoints). A crash loses at most
    /// the events of the last period, whole events, never a part of one.
    ///
    /// [`sync`]: crate::Prevayler::sync
    Periodic(Duration),
    /// Events are buffered and written when the buffer fills, and written and
    /// `fdatasync`ed only by [`sync`], closing, and an event store's checkpoints. A
    /// crash loses the events since the last of those (a `Prevayler` snapshot taken
    /// since keeps their effect on the state). For bulk loads and tests.
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

/// What a journal's files are written for; checked strictly on open, with the
/// [`Versions`] the journal reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Identity {
    pub(crate) state_type: &'static str,
    pub(crate) event_type: &'static str,
    /// The state's current schema version (the events' is [`Versions::event`]).
    pub(crate) schema: u32,
    /// The structure of the state and event types, when they can be traced.
    pub(crate) state_shape: Option<Shape>,
    pub(crate) event_shape: Option<Shape>,
}

/// How to open a journal.
pub(crate) struct Config {
    /// The directory, or `None` for a transient journal.
    pub(crate) dir: Option<PathBuf>,
    pub(crate) identity: Identity,
    pub(crate) durability: Durability,
    pub(crate) recovery: Recovery,
    pub(crate) sealer: Sealer,
    pub(crate) io: Io,
    /// Read-only: recovery changes nothing (a torn tail stays, [`Recovery::Salvage`]
    /// acts as [`Recovery::Strict`]) and the journal refuses every event.
    pub(crate) access: Access,
}

/// An event's work once it is in the journal: apply it and return its result, and
/// the digest of the state after it when the replay check is on.
pub(crate) trait Job: Send + 'static {
    type Output: Send + 'static;
    fn run(self, seq: u64, at: Timestamp) -> (Self::Output, Option<u64>);
}

/// One replayed event: its number, timestamp and encoded bytes, the events' schema
/// version its file was written with, and where its frame is: the journal file
/// (named by its first event) and the frame's offset in it.
#[derive(Clone, Copy)]
pub(crate) struct Replayed<'a> {
    pub(crate) seq: u64,
    pub(crate) at: Timestamp,
    pub(crate) bytes: &'a [u8],
    /// Checked against the journal's [`Versions`]: the current version, or an older
    /// one that has a migration, whose old type the file's header matches.
    pub(crate) schema: u32,
    pub(crate) file: u64,
    pub(crate) offset: u64,
}

/// A snapshot read back, before its state is decoded: the state's schema version
/// it was written with (checked as [`Replayed::schema`] is) and its encoded state.
#[derive(Clone, Copy)]
pub(crate) struct Restored<'a> {
    pub(crate) path: &'a Path,
    pub(crate) schema: u32,
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
/// `lock`; read-only, the directory may be missing and `lock` `None`): loads the
/// newest sound snapshot, or `initial()`, and replays the journal after it through
/// `apply`, which returns the state's digest when checking replay.
///
/// With [`Recovery::Salvage`], an event whose system function panics on replay (it
/// was journaled, and the process died before its void frame was written, or it was
/// built with `panic = "abort"`) is skipped: replay starts again without it, and a
/// void frame for it is written once the journal is open.
///
/// The files may have been written with older schema versions of the journal's
/// types, which `versions` lists: every file's header is
/// checked against them (`versions::check_header`), `restore` decodes the newest
/// sound snapshot's state from the version it was written with, and every replayed
/// event comes with its file's events' version ([`Replayed::schema`]). New files are
/// written with the current versions: if the last journal file was written with
/// others, the journal goes on in a new file.
///
/// This is the one recovery path of every front door.
pub(crate) fn open_versioned<S>(
    config: Config,
    versions: &Versions,
    lock: Option<Hold>,
    mut initial: impl FnMut() -> Result<S>,
    restore: &mut impl FnMut(Restored<'_>) -> Result<S>,
    apply: &mut impl FnMut(&mut S, Replayed<'_>) -> Result<Option<u64>>,
) -> Result<Opened<S>> {
    let Config { dir, identity, durability, recovery, sealer, io, access } = config;
    let expect = Some((&identity, versions));
    // Salvaging moves files: a read-only opening refuses damage instead.
    let recovery = if access == Access::ReadOnly { Recovery::Strict } else { recovery };
    let clean = lock.as_ref().and_then(Hold::clean_end);
    let set_up = lock.as_ref().is_some_and(Hold::was_set_up);
    let mut skipped = Vec::new();
    loop {
        let mut unsound = Vec::new();
        let snapshot = match &dir {
            Some(dir) => snapshot::load_newest(&io, dir, expect, &sealer, &mut unsound)?,
            None => None,
        };
        let (mut state, covered, at) = match snapshot {
            Some(loaded) => {
                let snapshot =
                    Restored { path: &loaded.path, schema: loaded.schema, bytes: &loaded.body };
                (restore(snapshot)?, Some(loaded.events), loaded.at)
            }
            None => (initial()?, None, 0),
        };
        let from = covered.unwrap_or(0);
        let (mut applied, mut last_at) = (from, at);
        let recovered = match &dir {
            Some(dir) => {
                let scope = recovery::Scope {
                    io: &io,
                    expect,
                    sealer: &sealer,
                    recovery,
                    from,
                    clean,
                    // A snapshot, even a damaged one, says the journal held events.
                    expected: set_up || covered.is_some() || !unsound.is_empty(),
                    read_only: access == Access::ReadOnly,
                };
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
        let event_schema = versions.event;
        let parts = writer::Parts { dir, identity, event_schema, durability, sealer, io, access };
        let journal = match access {
            Access::ReadOnly if parts.dir.is_some() => {
                let (next, clock) = (tail.next.max(from), tail.clock.max(at));
                Journal::read_only(parts, lock, next, clock)
            }
            _ => Journal::resume(parts, lock, &tail, from, at)?,
        };
        if !skipped.is_empty() {
            journal.void_events(&skipped)?;
        }
        recovered.snapshot = covered;
        recovered.unsound_snapshots = unsound;
        recovered.skipped = skipped;
        return Ok(Opened { state, applied, at: last_at, journal, recovered });
    }
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

/// Encodes an event, or a state, for the journal at `path` (only named on failure).
///
/// Always inlined: it is on the path of every `handle`, and measured 10% slower
/// there as a call (`cargo bench --bench journal`, row 3).
#[allow(clippy::inline_always)]
#[inline(always)]
pub(crate) fn encode<T: Serialize>(value: &T, path: impl FnOnce() -> PathBuf) -> Result<Vec<u8>> {
    postcard::to_extend(value, Vec::with_capacity(64)).map_err(|source| Error::EventEncode {
        path: path(),
        type_name: std::any::type_name::<T>().to_owned(),
        source: CodecError::from(source),
    })
}

/// Decodes `bytes` of the journal or snapshot at `path` as exactly one `T`; `what`
/// names them on failure.
#[inline]
pub(crate) fn decode<T: DeserializeOwned>(
    bytes: &[u8],
    path: &Path,
    what: impl FnOnce() -> String,
) -> Result<T> {
    crate::codec::decode_exact(bytes).map_err(|source| Error::JournalDecode {
        path: path.to_path_buf(),
        what: what(),
        type_name: std::any::type_name::<T>().to_owned(),
        source: CodecError::from(source),
    })
}

/// Runs a replayed event's system function; a panic there is
/// [`Error::ReplayPanicked`]: the event did not panic when it was handled, or it
/// would have been voided.
pub(crate) fn replay_caught(dir: &Path, seq: u64, run: impl FnOnce()) -> Result<()> {
    panic::catch_unwind(AssertUnwindSafe(run))
        .map_err(|_| Error::ReplayPanicked { path: dir.to_path_buf(), event: seq })
}
