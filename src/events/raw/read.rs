//! Reading a [`RawEvents`] view: one stream or `$all`, forward or backward, as the
//! typed reads of the store do, with the data left encoded.

use super::{RawEvent, RawEvents};
use crate::{
    Error, Result,
    events::{
        EventId, Position, batch,
        locate::{Keep, ReadAhead},
        stream_id,
    },
};

/// Bytes read ahead at a time.
const CHUNK: usize = 64 * 1024;

/// A read of a [`RawEvents`] view, of one stream or of every event; iterate it for
/// the events. See [`RawEvents::read_all`] and [`RawEvents::read_stream`].
#[must_use]
pub struct RawRead<'a> {
    raw: &'a RawEvents,
    stream: Option<String>,
    from: Option<u64>,
    backward: bool,
    limit: Option<u64>,
    event_type: Option<String>,
    stream_prefix: Option<String>,
}

/// The events of a [`RawRead`], one at a time; an error ends the read.
pub struct RawEventIter<'a> {
    raw: &'a RawEvents,
    /// Positions (`$all`) or versions (a stream) still to read: the next, and the
    /// end going forward or the start going backward.
    next: u64,
    bound: u64,
    backward: bool,
    read: RawRead<'a>,
    ahead: ReadAhead,
    /// The last batch read: its journal event and events.
    batch: Option<(u64, Vec<RawEvent>)>,
    /// An error to yield first (a stream id no stream can have).
    pending: Option<Error>,
    failed: bool,
}

impl<'a> RawRead<'a> {
    pub(super) fn new(raw: &'a RawEvents, stream: Option<String>) -> RawRead<'a> {
        RawRead {
            raw,
            stream,
            from: None,
            backward: false,
            limit: None,
            event_type: None,
            stream_prefix: None,
        }
    }

    /// Starts at this position (`$all`) or version (a stream), included: the first
    /// event read forward, the last read backward.
    pub fn from(mut self, at: u64) -> Self {
        self.from = Some(at);
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

    /// Reads only the events of type `event_type`.
    pub fn of_type(mut self, event_type: impl Into<String>) -> Self {
        self.event_type = Some(event_type.into());
        self
    }

    /// Reads only the events of streams whose id starts with `prefix`.
    pub fn stream_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.stream_prefix = Some(prefix.into());
        self
    }
}

impl<'a> IntoIterator for RawRead<'a> {
    type Item = Result<RawEvent>;
    type IntoIter = RawEventIter<'a>;

    fn into_iter(self) -> RawEventIter<'a> {
        let pending = self.stream.as_deref().and_then(|it| stream_id::check(it).err());
        let index = &self.raw.index;
        let len = match &self.stream {
            None => index.committed,
            Some(stream) => index
                .stream(stream)
                .and_then(|idx| index.get(idx))
                .map_or(0, |stream| stream.seqs.len() as u64),
        };
        let (next, bound) = if self.backward {
            // `next` counts down from one past the first one read.
            (self.from.map_or(len, |from| from.saturating_add(1).min(len)), 0)
        } else {
            (self.from.unwrap_or(0), len)
        };
        RawEventIter {
            raw: self.raw,
            next,
            bound,
            backward: self.backward,
            read: self,
            ahead: ReadAhead::new(CHUNK),
            batch: None,
            pending,
            failed: false,
        }
    }
}

impl Iterator for RawEventIter<'_> {
    type Item = Result<RawEvent>;

    fn next(&mut self) -> Option<Result<RawEvent>> {
        if let Some(err) = self.pending.take() {
            self.failed = true;
            return Some(Err(err));
        }
        if self.failed {
            return None;
        }
        loop {
            if self.read.limit == Some(0) {
                return None;
            }
            let at = if self.backward {
                self.next = self.next.checked_sub(1).filter(|at| self.bound <= *at)?;
                self.next
            } else {
                let at = (self.next < self.bound).then_some(self.next)?;
                self.next += 1;
                at
            };
            match self.event(at) {
                Ok(Some(event)) => {
                    let wanted =
                        self.read.event_type.as_ref().is_none_or(|it| *it == event.event_type)
                            && self
                                .read
                                .stream_prefix
                                .as_ref()
                                .is_none_or(|prefix| event.stream.starts_with(prefix.as_str()));
                    if wanted {
                        self.read.limit = self.read.limit.map(|n| n - 1);
                        return Some(Ok(event));
                    }
                }
                Ok(None) => {}
                Err(err) => {
                    self.failed = true;
                    return Some(Err(err));
                }
            }
        }
    }
}

impl RawEventIter<'_> {
    /// The event at position `at` (`$all`) or version `at` (a stream).
    fn event(&mut self, at: u64) -> Result<Option<RawEvent>> {
        let index = &self.raw.index;
        let seq = match &self.read.stream {
            None => index.seq_of(at),
            Some(stream) => index
                .stream(stream)
                .and_then(|idx| index.get(idx))
                .and_then(|stream| stream.seqs.get(usize::try_from(at).ok()?).copied()),
        };
        let Some(seq) = seq else { return Ok(None) };
        if self.batch.as_ref().is_none_or(|(read, _)| *read != seq) {
            self.batch = Some((seq, self.batch(seq)?));
        }
        let events = self.batch.as_ref().map(|(_, events)| events.as_slice()).unwrap_or_default();
        let found = events.iter().find(|event| match &self.read.stream {
            None => event.position.get() == at,
            Some(stream) => event.stream == *stream && event.version == at,
        });
        Ok(found.cloned())
    }

    /// The events of journal event `seq`'s batch.
    fn batch(&mut self, seq: u64) -> Result<Vec<RawEvent>> {
        let raw = self.raw;
        let frame = raw.locator.read(seq, &mut self.ahead, &|| Ok(()), Keep::No)?;
        let bad = |reason: String| raw.locator.corrupt(&frame, seq, reason);
        let (first, events) =
            batch::decode(frame.plain()).map_err(|fault| bad(fault.to_string()))?;
        if raw.index.start_of(seq) != Some(first) {
            return Err(bad(format!(
                "its batch starts at position {first}, where the index says otherwise"
            )));
        }
        let now = crate::journal::now_micros();
        let ruled = raw.index.ruled;
        Ok(events
            .into_iter()
            .zip(first..)
            .map(|(event, position)| {
                let (tags, triggers) = event.links();
                RawEvent {
                    removed: event.data.is_none()
                        || ruled
                            && raw.index.hides(
                                event.stream,
                                event.version,
                                frame.at.as_micros(),
                                now,
                            ),
                    dropped: event.data.is_none(),
                    stream: event.stream.to_owned(),
                    version: event.version,
                    position: Position::new(position),
                    at: frame.at,
                    id: EventId::from_bytes(event.id),
                    event_type: event.event_type.to_owned(),
                    metadata: event.metadata(),
                    tags,
                    triggers,
                    json: event.json,
                    schema: event.schema,
                    data: event.data.map(<[u8]>::to_vec).unwrap_or_default(),
                }
            })
            .collect())
    }
}
