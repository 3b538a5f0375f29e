//! Reading events back: one stream ([`ReadStream`]) or every stream in position
//! order ([`ReadAll`]), forward or backward, as iterators ([`Events`]) that read the
//! journal files lazily, a batch at a time.

use serde::{Serialize, de::DeserializeOwned};

use std::sync::Arc;

#[cfg(feature = "postgres")]
use super::database::{self, DbCore};
use super::{
    Core, Engine, EventId, EventStore, Position, RecordedEvent, batch,
    chunks::{CHUNK, Chunk, Kept},
    codec::EventSchema,
    index::StreamIdx,
    locate::{Keep, ReadAhead, ReadFrame},
    stream_id,
};
use crate::{Error, Result};

/// Bytes read ahead when going forward through many batches.
const FORWARD_CHUNK: usize = 256 * 1024;
/// Bytes read at a time going backward or through one stream.
const RANDOM_CHUNK: usize = 4 * 1024;

/// A read of one stream; iterate it for the events. See
/// [`EventStore::read_stream`].
///
/// # Example
/// ```
/// use instastate::events::{EventStore, Expected};
///
/// # fn main() -> instastate::Result<()> {
/// # let dir = tempfile::tempdir().unwrap();
/// let events = EventStore::<u32>::open(dir.path())?;
/// events.append("numbers", Expected::Any, [1, 2, 3, 4])?;
/// let last_two: Vec<u32> = events
///     .read_stream("numbers")
///     .backward()
///     .limit(2)
///     .into_iter()
///     .map(|event| event.map(|event| event.data))
///     .collect::<Result<_, _>>()?;
/// assert_eq!(last_two, [4, 3]);
/// # Ok(())
/// # }
/// ```
#[must_use]
pub struct ReadStream<'a, E> {
    store: &'a EventStore<E>,
    stream: String,
    from: Option<u64>,
    /// Reads no version at or after it, going forward.
    until: Option<u64>,
    backward: bool,
    limit: Option<u64>,
    event_type: Option<String>,
}

/// A read of every event in position order (`$all`); iterate it for the events.
/// See [`EventStore::read_all`].
#[must_use]
pub struct ReadAll<'a, E> {
    store: &'a EventStore<E>,
    from: Option<Position>,
    /// Reads no position at or after it, going forward.
    until: Option<u64>,
    backward: bool,
    limit: Option<u64>,
    event_type: Option<String>,
    stream_prefix: Option<String>,
}

impl<'a, E> ReadStream<'a, E> {
    pub(crate) fn new(store: &'a EventStore<E>, stream: &str) -> ReadStream<'a, E> {
        ReadStream {
            store,
            stream: stream.to_owned(),
            from: None,
            until: None,
            backward: false,
            limit: None,
            event_type: None,
        }
    }

    /// Starts at version `version` (included): the first event read forward, the
    /// last read backward.
    pub fn from(mut self, version: u64) -> Self {
        self.from = Some(version);
        self
    }

    /// Reads from the first event on (the default).
    pub fn forward(mut self) -> Self {
        self.backward = false;
        self
    }

    /// Reads from the last event back.
    pub fn backward(mut self) -> Self {
        self.backward = true;
        self
    }

    /// Reads at most `n` events.
    pub fn limit(mut self, n: u64) -> Self {
        self.limit = Some(n);
        self
    }

    /// Reads only the events of type `event_type` (see [`RecordedEvent::event_type`]).
    pub fn of_type(mut self, event_type: impl Into<String>) -> Self {
        self.event_type = Some(event_type.into());
        self
    }
}

impl<'a, E> ReadAll<'a, E> {
    pub(crate) fn new(store: &'a EventStore<E>) -> ReadAll<'a, E> {
        ReadAll {
            store,
            from: None,
            until: None,
            backward: false,
            limit: None,
            event_type: None,
            stream_prefix: None,
        }
    }

    /// Starts at `position` (included): the first event read forward, the last read
    /// backward.
    pub fn from(mut self, position: Position) -> Self {
        self.from = Some(position);
        self
    }

    /// Reads from the first event on (the default).
    pub fn forward(mut self) -> Self {
        self.backward = false;
        self
    }

    /// Reads from the last event back.
    pub fn backward(mut self) -> Self {
        self.backward = true;
        self
    }

    /// Reads at most `n` events (of those the filters let through).
    pub fn limit(mut self, n: u64) -> Self {
        self.limit = Some(n);
        self
    }

    /// Reads only the events of type `event_type` (see [`RecordedEvent::event_type`]).
    pub fn of_type(mut self, event_type: impl Into<String>) -> Self {
        self.event_type = Some(event_type.into());
        self
    }

    /// Reads only the events of streams whose id starts with `prefix`.
    pub fn stream_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.stream_prefix = Some(prefix.into());
        self
    }

    /// Going forward, reads no event at `position` or after it.
    pub(crate) fn until(mut self, position: u64) -> Self {
        self.until = Some(position);
        self
    }
}

impl<E> ReadStream<'_, E> {
    /// Going forward, reads no event of version `version` or after it.
    pub(crate) fn until(mut self, version: u64) -> Self {
        self.until = Some(version);
        self
    }
}

/// The events of a read, one at a time; an error ends the read.
pub struct Events<'a, E> {
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    store: &'a EventStore<E>,
    remaining: Option<u64>,
    failed: bool,
    /// An error to yield first (a read of a tombstoned stream).
    pending: Option<Error>,
    source: Source<E>,
}

/// Where a read reads from.
#[allow(clippy::large_enum_variant)] // One per read, made once and never moved.
enum Source<E> {
    Files(FileRead<E>),
    #[cfg(feature = "postgres")]
    Database(Arc<DbCore>, database::Read),
}

/// A read of a store's journal files.
struct FileRead<E> {
    core: Arc<Core>,
    schema: Arc<EventSchema<E>>,
    cursor: Cursor,
    filter: Filter,
    ahead: ReadAhead,
    keep: Keep,
    batch: Option<Decoded<E>>,
    /// The chunk of the stream read at hand, when the store keeps them.
    chunk: Option<Arc<Chunk>>,
    /// The events of the stream read in the batch read last, for chunks.
    held: Option<Held>,
}

/// Which events of the batches read a read yields.
struct Filter {
    /// Exactly this stream (a stream read).
    stream: Option<String>,
    stream_prefix: Option<String>,
    event_type: Option<String>,
}

impl Filter {
    /// Whether the event is one of the read's streams, and whether the read wants it.
    fn wants(&self, stream: &str, event_type: &str) -> (bool, bool) {
        let ours = self.stream.as_deref().is_none_or(|wanted| wanted == stream)
            && self.stream_prefix.as_deref().is_none_or(|prefix| stream.starts_with(prefix));
        (ours, ours && self.event_type.as_deref().is_none_or(|wanted| wanted == event_type))
    }
}

/// An event of a batch read back, as a read sees it.
enum Slot<E> {
    /// Of another stream, or yielded already.
    Other,
    /// Of the read's stream, but not of the type it wants.
    Passed,
    Ready(Result<RecordedEvent<E>>),
}

/// Which positions a read goes through.
enum Cursor {
    /// Versions of one stream: the next one, and the end (exclusive) going forward
    /// or the start going backward; read from the stream's chunks.
    Stream { idx: Option<StreamIdx>, next: u64, bound: u64, backward: bool },
    /// Positions of the store.
    All { next: u64, bound: u64, backward: bool },
}

/// A batch read back: the events the read wants, decoded, with each event's
/// version.
struct Decoded<E> {
    seq: u64,
    /// Where its frame is (journal file and byte offset), when known.
    place: Option<(u64, u64)>,
    first_position: u64,
    events: Vec<Slot<E>>,
    versions: Vec<u64>,
}

impl<'a, E: Serialize + DeserializeOwned> IntoIterator for ReadStream<'a, E> {
    type Item = Result<RecordedEvent<E>>;
    type IntoIter = Events<'a, E>;

    fn into_iter(self) -> Events<'a, E> {
        // An id no stream can have is refused rather than read as an empty
        // stream: a typo (a space at the end, say) is not taken for a stream
        // that has no event yet.
        let invalid = stream_id::check(&self.stream).err();
        let core = match &self.store.shared.engine {
            Engine::Files(core) => Arc::clone(core),
            #[cfg(feature = "postgres")]
            Engine::Database(db) => {
                // A tombstoned stream is refused, as in files. Going forward, the
                // read ends at the stream's end as of now, as in files: later
                // appends are not read (unless told where it ends).
                let life = match invalid {
                    Some(err) => Err(err),
                    None => db.engine.stream_life(&self.stream),
                };
                let life = life.and_then(|(life, next)| {
                    if life.tombstoned {
                        return Err(Error::StreamTombstoned { stream: self.stream.clone() });
                    }
                    Ok(next)
                });
                // Never past the stream's end as of now (as in files), so that
                // everything before its end is committed.
                let until = |next: u64| self.until.map_or(next, |until| until.min(next));
                let (next, until) = if self.backward {
                    (self.from.unwrap_or(u64::MAX), life.map(|_| None))
                } else {
                    (self.from.unwrap_or(0), life.map(|next| Some(until(next))))
                };
                let mut read = database::Read::new(Some(self.stream), Some(next), self.backward);
                read.event_type = self.event_type;
                read.committed = true;
                return Events::from_database(self.store, self.limit, db, read, until);
            }
        };
        let index = core.index.read();
        let idx = index.stream(&self.stream);
        let stream = idx.and_then(|idx| index.get(idx));
        let len = stream.map_or(0, |it| it.seqs.len() as u64);
        let life = stream.map(|it| it.life).unwrap_or_default();
        drop(index);
        // The versions removed are not read (those too old are passed over).
        let first = life.visible_from(len);
        let cursor = if self.backward {
            // `next` counts down from one past the first version read.
            let start = self.from.map_or(len, |from| from.saturating_add(1).min(len));
            Cursor::Stream { idx, next: start, bound: first, backward: true }
        } else {
            let next = self.from.unwrap_or(0).max(first);
            let bound = self.until.map_or(len, |until| until.min(len));
            Cursor::Stream { idx, next, bound, backward: false }
        };
        let tombstoned =
            life.tombstoned.then(|| Error::StreamTombstoned { stream: self.stream.clone() });
        let filter =
            Filter { stream: Some(self.stream), stream_prefix: None, event_type: self.event_type };
        let mut events = Events::new(self.store, core, cursor, self.limit, filter, Keep::Cached);
        events.pending = invalid.or(tombstoned);
        events
    }
}

impl<'a, E: Serialize + DeserializeOwned> IntoIterator for ReadAll<'a, E> {
    type Item = Result<RecordedEvent<E>>;
    type IntoIter = Events<'a, E>;

    fn into_iter(self) -> Events<'a, E> {
        let core = match &self.store.shared.engine {
            Engine::Files(core) => Arc::clone(core),
            #[cfg(feature = "postgres")]
            Engine::Database(db) => {
                let from = self.from.map(Position::get);
                let (next, until) = if self.backward {
                    (from.unwrap_or(u64::MAX), Ok(self.until))
                } else {
                    // Going forward, the read ends at the head as of now, as in files:
                    // later appends are not read (unless told where it ends).
                    let until = match self.until {
                        Some(until) => Ok(Some(until)),
                        None => db.engine.head().map(|head| Some(head.get())),
                    };
                    (from.unwrap_or(0), until)
                };
                let mut read = database::Read::new(None, Some(next), self.backward);
                // Only the head is known to have everything before it committed.
                read.committed = self.until.is_none();
                read.event_type = self.event_type;
                read.prefix = self.stream_prefix;
                return Events::from_database(self.store, self.limit, db, read, until);
            }
        };
        let committed = core.index.read().committed;
        let from = self.from.map(Position::get);
        let cursor = if self.backward {
            let start = from.map_or(committed, |from| from.saturating_add(1).min(committed));
            Cursor::All { next: start, bound: 0, backward: true }
        } else {
            let bound = self.until.map_or(committed, |until| until.min(committed));
            Cursor::All { next: from.unwrap_or(0), bound, backward: false }
        };
        let filter =
            Filter { stream: None, stream_prefix: self.stream_prefix, event_type: self.event_type };
        let keep = if self.backward { Keep::Cached } else { Keep::No };
        Events::new(self.store, core, cursor, self.limit, filter, keep)
    }
}

/// Where in journal event `seq`'s batch each stream that begins there has its
/// first event (version 0), by stream, counted in events from the batch's first.
pub(crate) fn first_events_in(
    core: &Core,
    seq: u64,
) -> Result<std::collections::HashMap<String, usize>> {
    let mut ahead = ReadAhead::new(RANDOM_CHUNK);
    let frame = core.locator.read(seq, &mut ahead, &|| core.write_out(), Keep::Cached)?;
    let head = batch::decode_head(frame.plain())
        .map_err(|fault| core.locator.corrupt(&frame, seq, fault))?;
    let mut places = std::collections::HashMap::new();
    let mut at = 0;
    for part in &head.parts {
        if part.first_version == 0 {
            places.insert(part.stream.to_owned(), at);
        }
        at += part.len();
    }
    Ok(places)
}

impl<E> EventStore<E> {
    /// The tags of the event at `position`, removed or not (its data is not
    /// decoded, and compaction keeps tags): `None` when the store holds no event
    /// there.
    pub(crate) fn tags_at(&self, position: u64) -> Result<Option<Vec<String>>> {
        #[cfg(feature = "postgres")]
        if let Engine::Database(db) = &self.shared.engine {
            return db.engine.tags_at(position);
        }
        let core = self.shared.files("read an event's tags")?;
        let place = {
            let index = core.index.read();
            index.seq_of(position).and_then(|seq| Some((seq, index.start_of(seq)?)))
        };
        let Some((seq, first_position)) = place else { return Ok(None) };
        let mut ahead = ReadAhead::new(RANDOM_CHUNK);
        let frame = core.locator.read(seq, &mut ahead, &|| core.write_out(), Keep::Cached)?;
        let (stored_first, stored) = batch::decode(frame.plain())
            .map_err(|fault| core.locator.corrupt(&frame, seq, fault))?;
        let k = position.checked_sub(stored_first.max(first_position));
        let event = k.and_then(|k| usize::try_from(k).ok()).and_then(|k| stored.get(k));
        Ok(event.map(|event| event.tags.iter().map(|tag| (*tag).to_owned()).collect()))
    }
}

impl<'a, E> Events<'a, E> {
    fn new(
        store: &'a EventStore<E>,
        core: Arc<Core>,
        cursor: Cursor,
        remaining: Option<u64>,
        filter: Filter,
        keep: Keep,
    ) -> Events<'a, E> {
        let chunk = if keep == Keep::No { FORWARD_CHUNK } else { RANDOM_CHUNK };
        let read = FileRead {
            core,
            schema: Arc::clone(&store.schema),
            cursor,
            filter,
            ahead: ReadAhead::new(chunk),
            keep,
            batch: None,
            chunk: None,
            held: None,
        };
        Events::from_source(store, remaining, Source::Files(read))
    }

    /// A read of the database: `read`, bounded by `until` (or the error that kept
    /// it from finding its bound, yielded first).
    #[cfg(feature = "postgres")]
    fn from_database(
        store: &'a EventStore<E>,
        remaining: Option<u64>,
        db: &Arc<DbCore>,
        mut read: database::Read,
        until: Result<Option<u64>>,
    ) -> Events<'a, E> {
        let pending = until.map(|until| read.until = until).err();
        let mut events =
            Events::from_source(store, remaining, Source::Database(Arc::clone(db), read));
        events.pending = pending;
        events
    }

    fn from_source(
        store: &'a EventStore<E>,
        remaining: Option<u64>,
        source: Source<E>,
    ) -> Events<'a, E> {
        Events { store, remaining, failed: false, pending: None, source }
    }
}

impl<E: Serialize + DeserializeOwned> FileRead<E> {
    /// The position to read next, if any is left (of a read of `$all`).
    fn next_position(&mut self) -> Option<u64> {
        match &mut self.cursor {
            Cursor::All { next, bound, backward: false } => {
                let position = (*next < *bound).then_some(*next)?;
                *next += 1;
                Some(position)
            }
            Cursor::All { next, bound, backward: true } => {
                let position = (*bound < *next).then(|| *next - 1)?;
                *next = position;
                Some(position)
            }
            Cursor::Stream { .. } => None,
        }
    }

    fn load_position(&mut self, position: u64) -> Result<usize> {
        let in_hand = self.batch.as_ref().and_then(|batch| {
            let k = usize::try_from(position.checked_sub(batch.first_position)?).ok()?;
            (k < batch.events.len()).then_some(k)
        });
        if let Some(k) = in_hand {
            return Ok(k);
        }
        let core = Arc::clone(&self.core);
        let (seq, first_position, ruled) = {
            let index = core.index.read();
            let missing = || Error::JournalCorrupt {
                path: core.dir.clone(),
                offset: 0,
                reason: format!("the index holds no journal event for position {position}"),
            };
            // Going forward, the next batch is usually the next journal event.
            let next = self.batch.as_ref().map(|batch| batch.seq + 1);
            let seq = match next {
                Some(next)
                    if index.start_of(next) == Some(position)
                        && index.seq_of_next_holds(next, position) =>
                {
                    next
                }
                _ => index.seq_of(position).ok_or_else(missing)?,
            };
            (seq, index.start_of(seq).ok_or_else(missing)?, index.ruled)
        };
        let decoded = self.decode_batch(seq, first_position, ruled)?;
        let batch = self.batch.insert(decoded);
        let k = position.checked_sub(batch.first_position).and_then(|k| usize::try_from(k).ok());
        k.filter(|k| *k < batch.events.len()).ok_or_else(|| {
            let reason = format!("it does not hold position {position}");
            core.locator.corrupt_at(batch.place, seq, reason)
        })
    }

    /// Reads and decodes journal event `seq`, whose first position the index says
    /// is `first_position`; `ruled` is whether the index has removal rules, which
    /// the batch's events are checked against.
    fn decode_batch(&mut self, seq: u64, first_position: u64, ruled: bool) -> Result<Decoded<E>> {
        let core = &self.core;
        // The buffers of the batch read before are filled again.
        let (mut events, mut versions) =
            self.batch.take().map(|batch| (batch.events, batch.versions)).unwrap_or_default();
        events.clear();
        versions.clear();
        let frame = core.locator.read(seq, &mut self.ahead, &|| core.write_out(), self.keep)?;
        let bad = |reason: &dyn std::fmt::Display| core.locator.corrupt(&frame, seq, reason);
        let head = head_at(core, &frame, seq, first_position)?;
        let at = frame.at;
        let place = frame.place();
        for part in &head.parts {
            for k in 0..part.len() as u64 {
                let version = part.first_version.checked_add(k);
                versions.push(version.ok_or_else(|| bad(&"its versions overflow"))?);
            }
        }
        // Events removed by a delete, a truncation or a retention rule are passed
        // over.
        let hidden: Vec<bool> = if ruled {
            let index = core.index.read();
            let now = crate::journal::now_micros();
            let at = at.as_micros();
            let streams = head.parts.iter().flat_map(|part| (0..part.len()).map(|_| part.stream));
            streams.zip(&versions).map(|(stream, v)| index.hides(stream, *v, at, now)).collect()
        } else {
            Vec::new()
        };
        for (k, event) in head.events().enumerate() {
            let event = event.map_err(|fault| bad(&fault))?;
            match self.filter.wants(event.stream, event.event_type) {
                (false, _) => {
                    events.push(Slot::Other);
                    continue;
                }
                (true, false) => {
                    events.push(Slot::Passed);
                    continue;
                }
                (true, true) if hidden.get(k) == Some(&true) => {
                    events.push(Slot::Passed);
                    continue;
                }
                (true, true) => {}
            }
            let position = first_position + k as u64;
            let Some(bytes) = event.data else {
                events.push(Slot::Ready(Err(bad(&dropped(position)))));
                continue;
            };
            let data =
                core.decode_data::<E>(&self.schema, (event.json, event.schema), bytes, || {
                    format!("the event at position {position}")
                });
            let (tags, triggers) = event.links();
            events.push(Slot::Ready(data.map(|data| RecordedEvent {
                stream: event.stream.to_owned(),
                version: event.version,
                position: Position::new(position),
                at,
                id: EventId::from_bytes(event.id),
                event_type: event.event_type.to_owned(),
                metadata: event.metadata(),
                tags,
                triggers,
                data,
            })));
        }
        Ok(Decoded { seq, place, first_position, events, versions })
    }
}

impl<E: Serialize + DeserializeOwned> Iterator for Events<'_, E> {
    type Item = Result<RecordedEvent<E>>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(err) = self.pending.take() {
            self.failed = true;
            return Some(Err(err));
        }
        if self.failed || self.remaining == Some(0) {
            return None;
        }
        let event = match &mut self.source {
            Source::Files(read) => read.next(self.remaining)?,
            #[cfg(feature = "postgres")]
            Source::Database(db, read) => read
                .next(db, self.remaining)?
                .and_then(|row| database::recorded(&row, &self.store.schema, db)),
        };
        if event.is_err() {
            self.failed = true;
        }
        if let Some(remaining) = &mut self.remaining {
            *remaining -= 1;
        }
        Some(event)
    }
}

impl<E: Serialize + DeserializeOwned> FileRead<E> {
    /// The next event the read wants (of at most `remaining` more), or the error
    /// that ends it.
    fn next(&mut self, remaining: Option<u64>) -> Option<Result<RecordedEvent<E>>> {
        if matches!(self.cursor, Cursor::Stream { .. }) {
            return self.next_kept(remaining);
        }
        loop {
            let position = self.next_position()?;
            let k = match self.load_position(position) {
                Ok(k) => k,
                Err(err) => return Some(Err(err)),
            };
            // Each event of a batch is yielded at most once: it moves out.
            let slot = std::mem::replace(self.batch.as_mut()?.events.get_mut(k)?, Slot::Other);
            if let Slot::Ready(event) = slot {
                return Some(event);
            }
        }
    }
}

impl<E: Serialize + DeserializeOwned> FileRead<E> {
    /// The next event of a stream read, from the stream's chunks.
    fn next_kept(&mut self, remaining: Option<u64>) -> Option<Result<RecordedEvent<E>>> {
        loop {
            let Cursor::Stream { idx, next, bound, backward, .. } = &mut self.cursor else {
                return None;
            };
            let (idx, backward) = ((*idx)?, *backward);
            // The versions the read still wants, this one first: a chunk is made of
            // those of them it holds, no more (a read of one event reads one).
            let (version, wanted) = if backward {
                let version = (*bound < *next).then(|| *next - 1)?;
                *next = version;
                (version, *bound..version + 1)
            } else {
                let version = (*next < *bound).then_some(*next)?;
                *next += 1;
                (version, version..*bound)
            };
            if let Err(err) = self.take_chunk(idx, version, wanted, backward, remaining) {
                return Some(Err(err));
            }
            let FileRead { core, schema, filter, chunk, .. } = &*self;
            let name = filter.stream.as_deref().unwrap_or_default();
            // A chunk made for this version holds it (else its making failed).
            let Some(kept) = chunk.as_ref().and_then(|chunk| chunk.get(version)) else {
                return Some(Err(Error::JournalCorrupt {
                    path: core.dir.clone(),
                    offset: 0,
                    reason: format!("version {version} of the stream read was not found"),
                }));
            };
            if filter.event_type.as_deref().is_some_and(|wanted| wanted != &*kept.event_type) {
                continue;
            }
            // Removed since: passed over (looked at now, as a batch read does).
            let index = core.index.read();
            if index.ruled
                && index.hides(name, version, kept.at.as_micros(), crate::journal::now_micros())
            {
                continue;
            }
            drop(index);
            return Some(recorded(core, schema, name, version, kept));
        }
    }

    /// Makes the chunk holding `version` the one at hand: the cached one, or one
    /// made of the versions of `wanted` that its chunk number covers (at most
    /// `remaining` of them, counted from `version` in the read's direction, when
    /// each one read is one yielded: no type filter, no removal rule), kept in
    /// the cache if the store has one.
    fn take_chunk(
        &mut self,
        idx: StreamIdx,
        version: u64,
        wanted: std::ops::Range<u64>,
        backward: bool,
        remaining: Option<u64>,
    ) -> Result<()> {
        if self.chunk.as_ref().is_some_and(|chunk| chunk.get(version).is_some()) {
            return Ok(());
        }
        let chunks = self.core.chunks.clone();
        let no = version / CHUNK;
        let cached = chunks.as_ref().and_then(|chunks| chunks.get(&(idx, no)));
        if let Some(chunk) = cached.as_ref().filter(|chunk| chunk.get(version).is_some()) {
            self.chunk = Some(Arc::clone(chunk));
            return Ok(());
        }
        let (start, end) = (no * CHUNK, no * CHUNK + CHUNK);
        let skips = self.filter.event_type.is_some() || self.core.index.read().ruled;
        let count = remaining.filter(|_| !skips).unwrap_or(u64::MAX);
        let range = if backward {
            wanted.start.max(start).max((version + 1).saturating_sub(count))..version + 1
        } else {
            version..wanted.end.min(end).min(version.saturating_add(count))
        };
        let name = self.filter.stream.as_deref().unwrap_or_default();
        let made =
            make_chunk(&self.core, &mut self.ahead, &mut self.held, name, idx, range, backward);
        let mut chunk = made?;
        // A chunk of a stream's last versions read before goes on with the ones
        // committed since, rather than being replaced by them.
        if let Some(before) = cached.filter(|it| it.first + it.events.len() as u64 == chunk.first) {
            chunk.events.splice(..0, before.events.iter().cloned());
            chunk.first = before.first;
        }
        chunk.events.shrink_to_fit();
        let chunk = Arc::new(chunk);
        if let Some(chunks) = chunks {
            chunks.insert((idx, no), Arc::clone(&chunk));
        }
        self.chunk = Some(chunk);
        Ok(())
    }
}

/// The events of the read's stream in the batch a read read last, by version,
/// each taken out as a chunk takes it: a batch of many versions is read and
/// parsed once, not once for each chunk of them.
struct Held {
    seq: u64,
    /// Where its frame was read.
    place: Option<(u64, u64)>,
    events: Vec<(u64, Option<Kept>)>,
}

impl Held {
    /// The events of stream `name` in journal event `seq`, whose first position
    /// the index says is `first_position`, read from the journal.
    fn read(
        core: &Core,
        ahead: &mut ReadAhead,
        name: &str,
        seq: u64,
        first_position: u64,
    ) -> Result<Held> {
        let frame = core.locator.read(seq, ahead, &|| core.write_out(), Keep::No)?;
        let head = head_at(core, &frame, seq, first_position)?;
        let mut events = Vec::new();
        for (k, event) in head.events().enumerate() {
            let event = event.map_err(|fault| core.locator.corrupt(&frame, seq, fault))?;
            if event.stream == name {
                let position = first_position + k as u64;
                let kept = Kept::new(&event, position, frame.at, seq, frame.place());
                events.push((event.version, Some(kept)));
            }
        }
        events.sort_by_key(|(version, _)| *version);
        Ok(Held { seq, place: frame.place(), events })
    }

    fn slot(&mut self, version: u64) -> Option<&mut Option<Kept>> {
        let k = self.events.binary_search_by_key(&version, |(it, _)| *it).ok()?;
        self.events.get_mut(k).map(|(_, kept)| kept)
    }
}

/// The chunk of the versions `range` of stream `name` (`idx`), read from the
/// journal in the read's direction (`backward` or not). Where a batch cannot be
/// read, the chunk ends before it: the read yields the events before the damage
/// and meets the error at the damaged version (a chunk made from there fails).
fn make_chunk(
    core: &Core,
    ahead: &mut ReadAhead,
    held: &mut Option<Held>,
    name: &str,
    idx: StreamIdx,
    range: std::ops::Range<u64>,
    backward: bool,
) -> Result<Chunk> {
    let missing = |version: u64| Error::JournalCorrupt {
        path: core.dir.clone(),
        offset: 0,
        reason: format!(
            "the index holds no journal event for version {version} of the stream read"
        ),
    };
    // Each version's journal event and its first position, under one lock. The
    // stream had these versions when the read began, and an index only grows.
    let planned: Vec<(u64, u64, u64)> = {
        let index = core.index.read();
        let seqs = index.get(idx).map(|stream| stream.seqs.as_slice()).unwrap_or_default();
        range
            .clone()
            .map(|version| {
                let seq = usize::try_from(version).ok().and_then(|k| seqs.get(k)).copied();
                let place = seq.and_then(|seq| Some((version, seq, index.start_of(seq)?)));
                place.ok_or_else(|| missing(version))
            })
            .collect::<Result<_>>()?
    };
    let mut slots: Vec<Option<Kept>> = planned.iter().map(|_| None).collect();
    let order: Vec<usize> =
        if backward { (0..planned.len()).rev().collect() } else { (0..planned.len()).collect() };
    let mut failed = None;
    for k in order {
        let (Some(&(version, seq, first_position)), Some(None)) = (planned.get(k), slots.get(k))
        else {
            continue;
        };
        // The batch read last, else this one, read now (again, if a chunk took
        // this version out of it already).
        let reusable = held.as_mut().filter(|it| it.seq == seq).and_then(|it| it.slot(version));
        if reusable.is_none_or(|slot| slot.is_none()) {
            match Held::read(core, ahead, name, seq, first_position) {
                Ok(read) => *held = Some(read),
                Err(err) => {
                    failed = Some(err);
                    break;
                }
            }
        }
        let Some(batch) = held.as_mut() else { break };
        // Every version of the chunk that this batch holds, this one among them.
        for (slot, (other, at, _)) in slots.iter_mut().zip(&planned) {
            if *at == seq && slot.is_none() {
                *slot = batch.slot(*other).and_then(Option::take);
            }
        }
        if slots.get(k).is_some_and(Option::is_none) {
            let reason = format!("it does not hold version {version} of its stream");
            failed = Some(core.locator.corrupt_at(batch.place, seq, reason));
            break;
        }
    }
    // The versions made from the read's first on, in its direction, up to the
    // first that could not be.
    let made = if backward {
        slots.iter().rev().take_while(|slot| slot.is_some()).count()
    } else {
        slots.iter().take_while(|slot| slot.is_some()).count()
    };
    let skip = if backward { slots.len() - made } else { 0 };
    let events: Vec<Kept> = slots.into_iter().skip(skip).take(made).flatten().collect();
    if events.is_empty() {
        return Err(failed.unwrap_or_else(|| missing(range.start)));
    }
    Ok(Chunk { first: range.start + skip as u64, events })
}

/// The head of the batch in `frame`, journal event `seq`, whose first position
/// the index says is `first_position`.
fn head_at<'a>(
    core: &Core,
    frame: &'a ReadFrame<'_>,
    seq: u64,
    first_position: u64,
) -> Result<batch::BatchHead<'a>> {
    let head = batch::decode_head(frame.plain())
        .map_err(|fault| core.locator.corrupt(frame, seq, fault))?;
    if head.first_position != first_position {
        let reason = format!(
            "it holds positions from {}, where the index has {first_position}",
            head.first_position
        );
        return Err(core.locator.corrupt(frame, seq, reason));
    }
    Ok(head)
}

/// Why an event at `position` that a read yields has no data. Compaction drops
/// only what the index removes: a dropped event that the index shows is damage
/// (or a bug), never data to decode.
fn dropped(position: u64) -> String {
    format!(
        "compaction dropped the data of the event at position {position}, which the store still reads"
    )
}

/// The event `kept`, version `version` of stream `name`, its data decoded.
fn recorded<E: DeserializeOwned>(
    core: &Core,
    schema: &EventSchema<E>,
    name: &str,
    version: u64,
    kept: &Kept,
) -> Result<RecordedEvent<E>> {
    let position = kept.position;
    let Some(bytes) = kept.data.as_deref() else {
        return Err(core.locator.corrupt_at(kept.place, kept.seq, dropped(position)));
    };
    let data = core.decode_data(schema, (kept.json, kept.schema), bytes, || {
        format!("the event at position {position}")
    })?;
    Ok(RecordedEvent {
        stream: name.to_owned(),
        version,
        position: Position::new(position),
        at: kept.at,
        id: kept.id(),
        event_type: kept.event_type.to_string(),
        metadata: kept.metadata,
        tags: kept.tags.clone(),
        triggers: kept.triggers.clone(),
        data,
    })
}
