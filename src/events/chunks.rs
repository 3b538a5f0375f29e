//! The events of streams read before, kept parsed in chunks of consecutive
//! versions: a stream read again takes each event from its chunk, where a first
//! read looks up, reads and parses the journal frame of each.
//!
//! An event never changes once committed (compaction drops only the data of
//! events the store no longer shows, which a read checks as it yields), so a
//! chunk is never stale; a chunk of a stream's last versions holds those
//! committed when it was made, and is made again, longer, when a read wants more.
//! What may change, whether an event is removed and whether its subject's key
//! still opens its data, is looked at when the event is yielded.

use std::sync::Arc;

use quick_cache::sync::Cache;

use super::{EventId, Metadata, batch::EventOut, index::StreamIdx};
use crate::Timestamp;

/// The versions a chunk holds at most: chunk `n` of a stream holds versions
/// `n * CHUNK` on.
pub(crate) const CHUNK: u64 = 64;

/// The chunks of the streams read, by stream and chunk number.
pub(crate) type Chunks = Cache<(StreamIdx, u64), Arc<Chunk>, ByLength>;

/// Consecutive versions of one stream, from a multiple of [`CHUNK`] on.
pub(crate) struct Chunk {
    pub(crate) first: u64,
    pub(crate) events: Vec<Kept>,
}

impl Chunk {
    /// The event of `version`, if the chunk holds it.
    pub(crate) fn get(&self, version: u64) -> Option<&Kept> {
        let k = usize::try_from(version.checked_sub(self.first)?).ok()?;
        self.events.get(k)
    }
}

/// An event as a chunk keeps it: parsed, its data still encoded (and sealed, if
/// it was).
#[derive(Clone)]
pub(crate) struct Kept {
    pub(crate) position: u64,
    pub(crate) at: Timestamp,
    pub(crate) id: [u8; 16],
    pub(crate) event_type: Box<str>,
    pub(crate) metadata: Metadata,
    pub(crate) tags: Vec<String>,
    pub(crate) triggers: Vec<String>,
    /// Whether `data` is JSON (else postcard).
    pub(crate) json: bool,
    /// The schema version of the event type it was written with.
    pub(crate) schema: u32,
    /// `None` when compaction dropped it.
    pub(crate) data: Option<Box<[u8]>>,
    /// The journal event holding it, and where its frame was read.
    pub(crate) seq: u64,
    pub(crate) place: Option<(u64, u64)>,
}

impl Kept {
    /// `event`, at `position` in journal event `seq`, whose frame (stamped `at`)
    /// was read at `place`.
    pub(crate) fn new(
        event: &EventOut<'_>,
        position: u64,
        at: Timestamp,
        seq: u64,
        place: Option<(u64, u64)>,
    ) -> Kept {
        let (tags, triggers) = event.links();
        Kept {
            position,
            at,
            id: event.id,
            event_type: event.event_type.into(),
            metadata: event.metadata(),
            tags,
            triggers,
            json: event.json,
            schema: event.schema,
            data: event.data.map(Into::into),
            seq,
            place,
        }
    }

    pub(crate) fn id(&self) -> EventId {
        EventId::from_bytes(self.id)
    }

    /// About what it takes in memory.
    fn weight(&self) -> u64 {
        let names = |list: &[String]| list.iter().map(|it| 24 + it.len()).sum::<usize>();
        let bytes = std::mem::size_of::<Kept>()
            + self.event_type.len()
            + names(&self.tags)
            + names(&self.triggers)
            + self.data.as_ref().map_or(0, |data| data.len());
        bytes as u64
    }
}

/// A cache of at most `bytes` of chunks, or `None` for none.
pub(crate) fn new(bytes: u64) -> Option<Arc<Chunks>> {
    (bytes > 0).then(|| {
        let estimate = usize::try_from(bytes / 8_192).unwrap_or(usize::MAX).max(16);
        Arc::new(Cache::with_weighter(estimate, bytes, ByLength))
    })
}

/// Weighs a chunk by what its events take in memory.
#[derive(Clone)]
pub(crate) struct ByLength;

impl quick_cache::Weighter<(StreamIdx, u64), Arc<Chunk>> for ByLength {
    fn weight(&self, _: &(StreamIdx, u64), chunk: &Arc<Chunk>) -> u64 {
        64 + chunk.events.iter().map(Kept::weight).sum::<u64>()
    }
}
