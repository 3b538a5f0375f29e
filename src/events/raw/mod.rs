//! An untyped, read-only view of an event store's journal: [`RawEvents`], for tools
//! that do not know the store's event type (the `instastate` command-line tool).
//!
//! It reads what [`EventStore`](super::EventStore) wrote: the events with their
//! data as bytes, which [`RawEvents::decode`] reads back as a [`RawValue`] from the
//! structure of the event type that the journal records. It writes, creates and
//! deletes nothing in the directory, and it can read a store that a running
//! program has open and is appending to: it then takes no lock and reads only the
//! frames that are whole and sound (see [`Locking`]).

mod read;
mod verify;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use parking_lot::Mutex;

pub use self::{
    read::{RawEventIter, RawRead},
    verify::{Damage, Verified},
};
use super::{
    EventId, Metadata, Position, SCHEMA,
    index::{Checkpoint, Frames, Index},
    locate::Locator,
};
use crate::{
    Error, Result, Timestamp,
    crypt::Sealer,
    io::{Io, Open},
    journal::{self, Scanned, Scanner, Start, Step, Tail, format::Header},
    lockfile::{Kind, Look},
    shape::{Shape, value::RawValue},
};

/// The state type an event store's journal records.
const STATE_TYPE: &str = "instastate::events::Index";

/// Whether a [`RawEvents`] locks the store's directory while it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Locking {
    /// Takes a shared lock when no program has the store open, so that none opens
    /// it meanwhile; reads without a lock, as [`Locking::Never`] does, when one has
    /// it open. The default.
    #[default]
    SharedIfFree,
    /// Never locks: a program may open the store and append at any time meanwhile.
    /// For following a store.
    Never,
}

/// Options for opening a [`RawEvents`]: `RawEvents::builder()`.
#[derive(Default)]
#[must_use]
pub struct RawEventsBuilder {
    locking: Locking,
    #[cfg(feature = "encryption")]
    key: Option<crate::EncryptionKey>,
}

/// A stream as [`RawEvents::streams`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamSummary {
    /// The stream's id.
    pub name: String,
    /// How many events it holds.
    pub events: u64,
    /// The version of its last event.
    pub last_version: u64,
}

/// An event as the journal holds it, its data still encoded: see
/// [`RawEvents::decode`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RawEvent {
    /// The stream it was appended to.
    pub stream: String,
    /// Its version in that stream.
    pub version: u64,
    /// Its position in the whole store.
    pub position: Position,
    /// When the store appended it.
    pub at: Timestamp,
    /// Its id.
    pub id: EventId,
    /// Its type: the variant name of an enum event, or the type's name.
    pub event_type: String,
    /// Its causation and correlation.
    pub metadata: Metadata,
    /// The aggregates it touches.
    pub tags: Vec<String>,
    /// Whether its data is JSON ([`Codec::Json`](super::Codec)), else postcard.
    pub json: bool,
    /// The schema version of the event type it was written with.
    pub schema: u32,
    /// The triggers it is linked to.
    pub triggers: Vec<String>,
    /// Whether the store no longer reads it: its stream was deleted or truncated
    /// past it, or a retention rule passes over it.
    pub removed: bool,
    /// Whether [compaction](super::EventStore::compact) dropped its data (it was
    /// removed): `data` is empty.
    pub dropped: bool,
    /// The event, encoded with postcard; empty when `dropped`.
    pub data: Vec<u8>,
}

/// An event store's journal read without its event type and without changing it.
///
/// Opening reads the newest checkpoint and the journal after it, as opening the
/// store does; [`refresh`](Self::refresh) reads what was appended since.
///
/// # Example
/// ```
/// use instastate::events::{EventStore, Expected, RawEvents};
///
/// # fn main() -> instastate::Result<()> {
/// # let dir = tempfile::tempdir().unwrap();
/// let store = EventStore::<Vec<u16>>::open(dir.path())?;
/// store.append("lists", Expected::Any, [vec![1, 2]])?;
/// // The store is open here: the view reads it without a lock.
/// let raw = RawEvents::open(dir.path())?;
/// assert!(raw.open_elsewhere());
/// let event = raw.read_all().into_iter().next().transpose()?.expect("one event");
/// assert_eq!((event.stream.as_str(), event.version), ("lists", 0));
/// assert_eq!(raw.decode(&event)?.to_string(), "[1, 2]");
/// # Ok(())
/// # }
/// ```
pub struct RawEvents {
    dir: PathBuf,
    /// The shared lock, when it was free.
    #[allow(dead_code, reason = "held for its lock")]
    look: Option<Look>,
    open_elsewhere: bool,
    header: Header,
    /// The structure of each schema version of the event type, as the journal
    /// files' headers record it; filled again when an event of another comes.
    shapes: Mutex<BTreeMap<u32, std::result::Result<Shape, String>>>,
    io: Io,
    index: Index,
    locator: Locator,
    scanner: Scanner,
    checkpoint: Option<u64>,
}

impl std::fmt::Debug for RawEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawEvents").field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl RawEventsBuilder {
    /// Whether to lock the directory while reading; [`Locking::SharedIfFree`] by
    /// default.
    pub fn locking(mut self, locking: Locking) -> Self {
        self.locking = locking;
        self
    }

    /// The key of an encrypted store.
    #[cfg(feature = "encryption")]
    pub fn encryption_key(mut self, key: crate::EncryptionKey) -> Self {
        self.key = Some(key);
        self
    }

    #[cfg(feature = "encryption")]
    fn sealer(&self) -> Sealer {
        Sealer::new(self.key.as_ref())
    }

    #[cfg(not(feature = "encryption"))]
    #[allow(clippy::unused_self)] // With the feature, the key is in `self`.
    fn sealer(&self) -> Sealer {
        Sealer::default()
    }

    /// Opens the event store in `dir` read-only: reads its newest checkpoint and the
    /// journal after it.
    ///
    /// # Errors
    /// [`Error::NotAnEventStore`] when `dir` holds no event store (a `Prevayler`'s
    /// journal, a store of cells, nothing); [`Error::WrongDirectory`];
    /// [`Error::Encryption`] or [`Error::WrongKey`] for a missing or wrong key;
    /// [`Error::JournalCorrupt`] naming the file and offset of damage;
    /// [`Error::JournalChanged`] when a file disappears while it is read;
    /// [`Error::Io`].
    pub fn open(self, dir: impl AsRef<Path>) -> Result<RawEvents> {
        let dir = dir.as_ref();
        crate::location::refuse_database(dir, "an event store")?;
        let io = Io::default();
        let sealer = self.sealer();
        let (look, tail, open_elsewhere) = take_lock(&io, dir, self.locking)?;
        let header = identify(&io, dir)?;
        let shapes = Mutex::new(BTreeMap::from([(header.event_schema, describe(&header))]));
        let mut skip = Vec::new();
        loop {
            let (index, frames, checkpoint, start) = load_checkpoint(&io, dir, &sealer)?;
            let scanner = Scanner::new(io.clone(), dir.to_path_buf(), sealer.clone(), tail, start);
            let locator = Locator::new(dir.to_path_buf(), io.clone(), sealer.clone(), frames, 0);
            let mut raw = RawEvents {
                dir: dir.to_path_buf(),
                look: None,
                open_elsewhere,
                header: header.clone(),
                shapes: Mutex::new(shapes.lock().clone()),
                io: io.clone(),
                index,
                locator,
                scanner,
                checkpoint,
            };
            match raw.catch_up(&skip)? {
                None => {
                    raw.look = look;
                    return Ok(raw);
                }
                // Events read were voided: read again without them.
                Some(voided) => skip.push(voided),
            }
        }
    }

    /// Checks the event store in `dir` through and through: see [`Verified`].
    ///
    /// # Errors
    /// As [`open`](Self::open), except that damage is reported in the
    /// [`Verified`], not as an error.
    pub fn verify(self, dir: impl AsRef<Path>) -> Result<Verified> {
        let dir = dir.as_ref();
        crate::location::refuse_database(dir, "an event store")?;
        let io = Io::default();
        let sealer = self.sealer();
        let (look, tail, open_elsewhere) = take_lock(&io, dir, self.locking)?;
        let header = identify(&io, dir)?;
        let mut shapes = shapes_of(&io, dir)?;
        shapes.entry(header.event_schema).or_insert_with(|| describe(&header));
        let verified = verify::verify(&io, dir, &sealer, tail, &shapes)?;
        let verified = Verified { open_elsewhere, ..verified };
        match look {
            // Nobody appends: the journal-level checks of opening apply too.
            Some(look) => verify::check_as_opening(&io, dir, &sealer, look, verified),
            None => Ok(verified),
        }
    }
}

impl RawEvents {
    /// Options for opening a view; see [`RawEventsBuilder`].
    pub fn builder() -> RawEventsBuilder {
        RawEventsBuilder::default()
    }

    /// Opens the event store in `dir` read-only with the default options; see
    /// [`RawEventsBuilder::open`].
    ///
    /// # Errors
    /// Those of [`RawEventsBuilder::open`].
    pub fn open(dir: impl AsRef<Path>) -> Result<RawEvents> {
        RawEventsBuilder::default().open(dir)
    }

    /// Reads what was appended since opening or the last refresh, and returns the
    /// new head: the position the next event will have.
    ///
    /// # Errors
    /// As [`RawEventsBuilder::open`]; [`Error::JournalChanged`] when events already
    /// read were voided since (the program's append of them failed).
    pub fn refresh(&mut self) -> Result<Position> {
        match self.catch_up(&[])? {
            None => Ok(self.head()),
            Some((first, last)) => Err(Error::JournalChanged {
                path: self.dir.clone(),
                reason: format!(
                    "journal events {first} to {last}, already read, were voided: the program's append of them failed; read the store again"
                ),
            }),
        }
    }

    /// The store's directory.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Whether a program had the store open when it was opened, so that it was read
    /// without a lock.
    #[must_use]
    pub fn open_elsewhere(&self) -> bool {
        self.open_elsewhere
    }

    /// Whether the store is encrypted.
    #[must_use]
    pub fn encrypted(&self) -> bool {
        self.header.sealed
    }

    /// The Rust type of the store's events, as the journal records it.
    #[must_use]
    pub fn data_type(&self) -> &str {
        &self.header.event_type
    }

    /// The position the next event will have: how many events the store holds, as
    /// far as this view has read.
    #[must_use]
    pub fn head(&self) -> Position {
        Position::new(self.index.committed)
    }

    /// How many journal events (appends) the store holds, as far as this view has
    /// read.
    #[must_use]
    pub fn appends(&self) -> u64 {
        self.index.journal_events()
    }

    /// How many journal events the checkpoint this view started from covers, if it
    /// started from one.
    #[must_use]
    pub fn checkpoint(&self) -> Option<u64> {
        self.checkpoint
    }

    /// The bytes of a torn last write at the end of the journal (a crash in the
    /// middle of an append, which opening the store cuts off), when the view holds
    /// the directory's lock; 0 otherwise.
    #[must_use]
    pub fn torn_bytes(&self) -> u64 {
        self.scanner.torn().map_or(0, |torn| torn.bytes)
    }

    /// The streams, in the order they were created.
    #[must_use]
    pub fn streams(&self) -> Vec<StreamSummary> {
        self.index
            .streams
            .iter()
            // As the store lists them: not the deleted ones.
            .filter(|stream| !stream.life.deleted && !stream.life.tombstoned)
            .filter_map(|stream| {
                let events = stream.seqs.len() as u64;
                let last_version = events.checked_sub(1)?;
                Some(StreamSummary { name: stream.name.clone(), events, last_version })
            })
            .collect()
    }

    /// Reads every event in position order (`$all`), forward from the first unless
    /// the returned [`RawRead`] is told otherwise.
    pub fn read_all(&self) -> RawRead<'_> {
        RawRead::new(self, None)
    }

    /// Reads stream `stream`, forward from its first event unless the returned
    /// [`RawRead`] is told otherwise; an id no stream can have yields
    /// [`Error::InvalidStreamId`](crate::Error::InvalidStreamId).
    pub fn read_stream(&self, stream: &str) -> RawRead<'_> {
        RawRead::new(self, Some(stream.to_owned()))
    }

    /// Reads `event`'s data back as a [`RawValue`], from the structure of the event
    /// type that the journal records.
    ///
    /// # Errors
    /// [`Error::EventData`] when the journal records no structure (the type could
    /// not be traced when the store was written) or the data does not read as it.
    pub fn decode(&self, event: &RawEvent) -> Result<RawValue> {
        let fail = |reason: String| Error::EventData {
            position: event.position.get(),
            event_type: event.event_type.clone(),
            reason,
        };
        if event.json {
            // JSON says what it holds: maps, sequences and scalars, without the
            // type's names.
            #[cfg(feature = "json")]
            return serde_json::from_slice(&event.data)
                .map(crate::shape::value::from_json)
                .map_err(|err| fail(format!("its JSON does not parse: {err}")));
            #[cfg(not(feature = "json"))]
            return Err(fail("its data is JSON, which needs the `json` feature".to_owned()));
        }
        let shape = self.shape_of(event.schema).map_err(fail)?;
        crate::shape::value::decode(&shape, &event.data).map_err(fail)
    }

    /// The structure of version `version` of the event type, from the header of
    /// a journal file written with it.
    fn shape_of(&self, version: u32) -> std::result::Result<Shape, String> {
        if let Some(known) = self.shapes.lock().get(&version) {
            return known.clone();
        }
        let found = shapes_of(&self.io, &self.dir).map_err(|err| err.to_string())?;
        let mut shapes = self.shapes.lock();
        for (schema, shape) in found {
            shapes.entry(schema).or_insert(shape);
        }
        shapes.get(&version).cloned().unwrap_or_else(|| {
            Err(format!("no journal file records version {version} of the event type"))
        })
    }

    /// Reads the journal from where it stopped to its end, into the index. Returns
    /// the void of events already read, if one comes, which stops the reading.
    fn catch_up(&mut self, skip: &[(u64, u64)]) -> Result<Option<(u64, u64)>> {
        loop {
            match self.scanner.step()? {
                Step::Pending => return Ok(None),
                Step::Void { first, last } => {
                    let read = first < self.index.journal_events();
                    if read && !skip.contains(&(first, last)) {
                        return Ok(Some((first, last)));
                    }
                }
                Step::Event(event) => {
                    let voided =
                        skip.iter().any(|(first, last)| (*first..=*last).contains(&event.seq));
                    if !voided {
                        self.commit(&event)?;
                    }
                }
            }
        }
    }

    /// Puts a journal event read back into the index, as opening the store does.
    fn commit(&mut self, event: &Scanned) -> Result<()> {
        let bad = |reason: String| Error::JournalCorrupt {
            path: self.dir.join(journal::format::journal_name(event.file)),
            offset: event.offset,
            reason: format!("event {}: {reason}", event.seq),
        };
        self.index.replay(event.seq, &event.plain).map_err(bad)?;
        self.index.last_at = event.at.as_micros();
        self.locator.frames.lock().record(event.file, event.seq, event.offset);
        Ok(())
    }
}

/// Takes the lock `locking` asks for: the look held, whether a program may append,
/// and whether one has the store open.
fn take_lock(io: &Io, dir: &Path, locking: Locking) -> Result<(Option<Look>, Tail, bool)> {
    match Look::take(io, dir, Kind::Journal) {
        Ok(look) if locking == Locking::SharedIfFree => {
            let clean = look.clean_end();
            Ok((Some(look), Tail::Settled { clean }, false))
        }
        Ok(_) => Ok((None, Tail::Live, false)),
        Err(Error::Locked { .. }) => Ok((None, Tail::Live, true)),
        Err(Error::WrongDirectory { path, reason, .. }) => {
            Err(Error::NotAnEventStore { path, reason })
        }
        Err(err) => Err(err),
    }
}

/// The header of the directory's first journal file, if it is an event store's.
fn identify(io: &Io, dir: &Path) -> Result<Header> {
    let not = |reason: String| Error::NotAnEventStore { path: dir.to_path_buf(), reason };
    let files = journal::journal_files(io, dir)?;
    let Some((_, path)) = files.first() else {
        return Err(not("it holds no journal file".into()));
    };
    let handle = match io.open(path, Open::Read) {
        Ok(handle) => handle,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Err(journal::vanished(path));
        }
        Err(err) => return Err(Error::io(path)(err)),
    };
    let (header, _) = journal::read_header(&handle, path)?;
    if header.state_type != STATE_TYPE {
        return Err(not(format!(
            "it holds the journal of a `Prevayler` or a journaled cell, of state `{}` with events `{}`",
            header.state_type, header.event_type
        )));
    }
    if header.schema != SCHEMA {
        return Err(not(format!(
            "it holds an event store of format v{}, and this build reads v{SCHEMA}",
            header.schema
        )));
    }
    Ok(header)
}

/// The structure of each schema version of the event type, as the headers of the
/// journal files in `dir` record them (a file that vanished meanwhile is passed
/// over: its version is in a later one, or no event needs it any more).
fn shapes_of(io: &Io, dir: &Path) -> Result<BTreeMap<u32, std::result::Result<Shape, String>>> {
    let mut shapes = BTreeMap::new();
    for (_, path) in journal::journal_files(io, dir)? {
        let handle = match io.open(&path, Open::Read) {
            Ok(handle) => handle,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
            Err(err) => return Err(Error::io(&path)(err)),
        };
        let (header, _) = journal::read_header(&handle, &path)?;
        shapes.entry(header.event_schema).or_insert_with(|| describe(&header));
    }
    Ok(shapes)
}

/// The structure of the event type that `header` records, or why there is none.
fn describe(header: &Header) -> std::result::Result<Shape, String> {
    if header.event_shape.is_empty() {
        return Err("the journal records no structure of the event type (serde could not trace it when the store was written)".into());
    }
    Shape::decode(&header.event_shape).map_err(|fault| {
        format!("the recorded structure of the event type is unreadable ({fault})")
    })
}

/// The index and frame table of the newest checkpoint that reads back, the journal
/// events it covers, and where the journal after it starts; an empty index when
/// there is none. A checkpoint is only a short cut here: one that does not read
/// back is passed over (`verify` reports it), and the journal read whole.
fn load_checkpoint(
    io: &Io,
    dir: &Path,
    sealer: &Sealer,
) -> Result<(Index, Frames, Option<u64>, Start)> {
    let empty = || (Index::new(0), Frames::default(), None, Start::default());
    // A program that has the store open may delete an old checkpoint meanwhile.
    let loaded = match journal::load_newest_snapshot(io, dir, None, sealer, &mut Vec::new()) {
        Ok(loaded) => loaded,
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Ok(empty());
        }
        Err(err) => return Err(err),
    };
    let Some(loaded) = loaded else { return Ok(empty()) };
    let Ok(checkpoint) =
        journal::decode::<Checkpoint>(&loaded.body, &loaded.path, || "the checkpoint".into())
    else {
        return Ok(empty());
    };
    // A checkpoint that does not hold together is passed over, as one that does
    // not decode (`verify` reports it).
    let Ok((index, frames)) = Index::restore(checkpoint, 0) else { return Ok(empty()) };
    let covered = loaded.events;
    // Where the last covered event is, when the checkpoint's frame table knows: the
    // journal after it is read from there, else from the start of its file.
    let last = covered.checked_sub(1).and_then(|seq| match frames.find(seq) {
        Some((file, Some(offset))) => Some((file, offset, seq)),
        _ => None,
    });
    if index.journal_events() != covered {
        return Ok(empty());
    }
    Ok((index, frames, Some(covered), Start { from: covered, at: last }))
}
