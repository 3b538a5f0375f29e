//! What an event store writes to its journal: one journal event per command, an
//! append of one or more streams being one batch.
//!
//! ```text
//! command:  format u8 (1; 2: an append batch that compaction dropped data of)
//!           | kind u8 (0: append, 1: delete, 2: retention, 3: effect) | body
//! append:   first position | part count | parts | event bodies
//! part:     stream (length, UTF-8 bytes) | first version | event count | ids (16 bytes each)
//! event body, one per event, parts in order:
//!           event type (length, UTF-8 bytes)
//!           | flags u8 (1: causation, 2: correlation, 4: triggers, 8: data in JSON,
//!             16: schema version, 32: dropped, format 2 only)
//!           | causation (16 bytes, if flagged) | correlation (16 bytes, if flagged)
//!           | tag count | tags (length, UTF-8 bytes each)
//!           | trigger count, triggers (length, UTF-8 bytes each), if flagged
//!           | the event type's schema version, if flagged (else 1)
//!           | data (length, bytes; absent when dropped)
//! delete:   stream (length, UTF-8 bytes) | how u8 (0: soft, 1: tombstone, 2: truncate)
//!           | before (the versions below it are gone)
//! retention: stream | flags u8 (1: max count, 2: max age) | max count? | max age (µs)?
//! effect:   trigger (length, UTF-8 bytes) | reason (length, UTF-8 bytes)
//!           | forgotten (the subject key generations below it are destroyed; 0: none)
//! ```
//!
//! Numbers and lengths are LEB128 varints (at most 10 bytes, the value fitting a
//! `u64`). The heads of the parts come first, so that opening, which needs only the
//! streams, versions and ids, reads no event body. The positions of a batch's events
//! follow each other from its first position, part after part; the versions of a
//! part's events from its first version. The timestamp is the journal's, shared by
//! the batch. `data` is the event encoded with postcard.
//!
//! Compaction (`compact.rs`) rewrites the batches holding events that the store
//! will never read again: it keeps their heads and everything of their bodies but
//! the data, flags them dropped, and writes the batch with format 2, which a build
//! that does not know dropped events refuses as a format it does not read.

use std::fmt;

/// The version of the command layout, its first byte.
const FORMAT: u8 = 1;
/// The version of an append batch that compaction dropped the data of events of.
const FORMAT_COMPACTED: u8 = 2;
const KIND_APPEND: u8 = 0;
const KIND_DELETE: u8 = 1;
const KIND_RETENTION: u8 = 2;
const KIND_EFFECT: u8 = 3;
const FLAG_MAX_COUNT: u8 = 1;
const FLAG_MAX_AGE: u8 = 2;
const FLAG_CAUSATION: u8 = 1;
const FLAG_CORRELATION: u8 = 2;
const FLAG_TRIGGERS: u8 = 4;
const FLAG_JSON: u8 = 8;
const FLAG_SCHEMA: u8 = 16;
const FLAG_DROPPED: u8 = 32;
/// The schema version of an event whose flags name none.
pub(crate) const FIRST_SCHEMA: u32 = 1;

/// The events of one stream, as a batch is made of them.
pub(crate) struct PartIn<'a> {
    pub(crate) stream: &'a str,
    pub(crate) first_version: u64,
    pub(crate) events: &'a [EventIn<'a>],
}

/// One event, as a batch is made of it.
pub(crate) struct EventIn<'a> {
    pub(crate) id: [u8; 16],
    pub(crate) event_type: &'a str,
    pub(crate) causation: Option<[u8; 16]>,
    pub(crate) correlation: Option<[u8; 16]>,
    pub(crate) tags: &'a [String],
    pub(crate) triggers: &'a [String],
    /// Whether `data` is JSON (else postcard).
    pub(crate) json: bool,
    /// The schema version of the event type it was written with.
    pub(crate) schema: u32,
    pub(crate) data: &'a [u8],
}

/// The head of one part of a batch read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PartHead<'a> {
    pub(crate) stream: &'a str,
    pub(crate) first_version: u64,
    /// The ids of its events, 16 bytes each.
    pub(crate) ids: &'a [u8],
}

impl PartHead<'_> {
    /// The ids of the part's events.
    pub(crate) fn ids(&self) -> impl Iterator<Item = [u8; 16]> + '_ {
        self.ids.chunks_exact(16).filter_map(|id| id.try_into().ok())
    }

    pub(crate) fn len(&self) -> usize {
        self.ids.len() / 16
    }
}

/// The heads of an append batch read back, and where its event bodies start.
#[derive(Debug)]
pub(crate) struct BatchHead<'a> {
    pub(crate) first_position: u64,
    pub(crate) parts: Vec<PartHead<'a>>,
    bodies: &'a [u8],
    /// Written by compaction: its events' bodies may be dropped.
    compacted: bool,
}

/// One event of a batch read back, borrowing from the batch's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EventOut<'a> {
    pub(crate) stream: &'a str,
    pub(crate) version: u64,
    pub(crate) id: [u8; 16],
    pub(crate) event_type: &'a str,
    pub(crate) causation: Option<[u8; 16]>,
    pub(crate) correlation: Option<[u8; 16]>,
    pub(crate) tags: Vec<&'a str>,
    pub(crate) triggers: Vec<&'a str>,
    /// Whether `data` is JSON (else postcard).
    pub(crate) json: bool,
    /// The schema version of the event type it was written with.
    pub(crate) schema: u32,
    /// `None` when compaction dropped it: the store no longer reads the event.
    pub(crate) data: Option<&'a [u8]>,
}

impl EventOut<'_> {
    /// Its causation and correlation ids.
    pub(crate) fn metadata(&self) -> super::Metadata {
        super::Metadata {
            causation: self.causation.map(super::EventId::from_bytes),
            correlation: self.correlation.map(super::EventId::from_bytes),
        }
    }

    /// Its tags and triggers, owned.
    pub(crate) fn links(&self) -> (Vec<String>, Vec<String>) {
        let owned = |names: &[&str]| names.iter().map(|it| (*it).to_owned()).collect();
        (owned(&self.tags), owned(&self.triggers))
    }
}

/// Why stored command bytes could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BatchFault {
    /// A format this build does not read.
    Format(u8),
    /// Not a command of the known format.
    Malformed(&'static str),
}

impl fmt::Display for BatchFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BatchFault::Format(found) => {
                write!(
                    f,
                    "event store command format {found} is unknown (this build reads {FORMAT} and {FORMAT_COMPACTED})"
                )
            }
            BatchFault::Malformed(reason) => write!(f, "the command is malformed: {reason}"),
        }
    }
}

/// How a delete command removes a stream's events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Removal {
    /// The stream is hidden until its next append; its versions go on.
    Soft,
    /// The stream is gone for good: appends are refused.
    Tombstone,
    /// The stream's events before a version are gone.
    Truncate,
}

/// A stream's retention rules: how many of its last events it keeps, and for how
/// long (in microseconds).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Rules {
    pub(crate) max_count: Option<u64>,
    pub(crate) max_age: Option<u64>,
}

/// A command read back.
#[derive(Debug)]
pub(crate) enum Command<'a> {
    Append(BatchHead<'a>),
    Delete { stream: &'a str, removal: Removal, before: u64 },
    Retention { stream: &'a str, rules: Rules },
    Effect { trigger: &'a str, reason: &'a str, forgotten: u64 },
}

/// Encodes an effect command on `trigger`, for `reason`; `forgotten` is the
/// generation of subject keys below which they are destroyed (0: none).
pub(crate) fn encode_effect(trigger: &str, reason: &str, forgotten: u64) -> Vec<u8> {
    let mut out = vec![FORMAT, KIND_EFFECT];
    put_bytes(&mut out, trigger.as_bytes());
    put_bytes(&mut out, reason.as_bytes());
    put_varint(&mut out, forgotten);
    out
}

/// Encodes a delete command: the events of `stream` below version `before` are
/// removed as `removal` says.
pub(crate) fn encode_delete(stream: &str, removal: Removal, before: u64) -> Vec<u8> {
    let mut out = vec![FORMAT, KIND_DELETE];
    put_bytes(&mut out, stream.as_bytes());
    out.push(match removal {
        Removal::Soft => 0,
        Removal::Tombstone => 1,
        Removal::Truncate => 2,
    });
    put_varint(&mut out, before);
    out
}

/// Encodes a retention command: `stream`'s rules become `rules`.
pub(crate) fn encode_retention(stream: &str, rules: Rules) -> Vec<u8> {
    let mut out = vec![FORMAT, KIND_RETENTION];
    put_bytes(&mut out, stream.as_bytes());
    let flags = if rules.max_count.is_some() { FLAG_MAX_COUNT } else { 0 }
        | if rules.max_age.is_some() { FLAG_MAX_AGE } else { 0 };
    out.push(flags);
    for value in [rules.max_count, rules.max_age].into_iter().flatten() {
        put_varint(&mut out, value);
    }
    out
}

/// Reads any command.
pub(crate) fn decode_command(bytes: &[u8]) -> Result<Command<'_>, BatchFault> {
    let mut reader = Reader(bytes);
    let compacted = match reader.byte()? {
        FORMAT => false,
        FORMAT_COMPACTED => true,
        other => return Err(BatchFault::Format(other)),
    };
    let command = match reader.byte()? {
        KIND_APPEND => return decode_head(bytes).map(Command::Append),
        _ if compacted => return Err(BatchFault::Malformed("only an append batch is compacted")),
        KIND_DELETE => {
            let stream = reader.str()?;
            let removal = match reader.byte()? {
                0 => Removal::Soft,
                1 => Removal::Tombstone,
                2 => Removal::Truncate,
                _ => return Err(BatchFault::Malformed("a delete's kind is unknown")),
            };
            Command::Delete { stream, removal, before: reader.varint()? }
        }
        KIND_RETENTION => {
            let stream = reader.str()?;
            let flags = reader.byte()?;
            if flags & !(FLAG_MAX_COUNT | FLAG_MAX_AGE) != 0 {
                return Err(BatchFault::Malformed("a retention's flags are unknown"));
            }
            let max_count = if flags & FLAG_MAX_COUNT == 0 { None } else { Some(reader.varint()?) };
            let max_age = if flags & FLAG_MAX_AGE == 0 { None } else { Some(reader.varint()?) };
            Command::Retention { stream, rules: Rules { max_count, max_age } }
        }
        KIND_EFFECT => {
            let trigger = reader.str()?;
            let reason = reader.str()?;
            Command::Effect { trigger, reason, forgotten: reader.varint()? }
        }
        _ => return Err(BatchFault::Malformed("its kind is unknown")),
    };
    if !reader.0.is_empty() {
        return Err(BatchFault::Malformed("bytes follow its end"));
    }
    Ok(command)
}

/// Encodes an append batch of `parts`, whose first event gets `first_position`.
pub(crate) fn encode(first_position: u64, parts: &[PartIn<'_>]) -> Vec<u8> {
    let mut out = vec![FORMAT, KIND_APPEND];
    put_varint(&mut out, first_position);
    put_varint(&mut out, parts.len() as u64);
    for part in parts {
        put_bytes(&mut out, part.stream.as_bytes());
        put_varint(&mut out, part.first_version);
        put_varint(&mut out, part.events.len() as u64);
        for event in part.events {
            out.extend_from_slice(&event.id);
        }
    }
    for event in parts.iter().flat_map(|part| part.events) {
        put_bytes(&mut out, event.event_type.as_bytes());
        let flags = if event.causation.is_some() { FLAG_CAUSATION } else { 0 }
            | if event.correlation.is_some() { FLAG_CORRELATION } else { 0 }
            | if event.triggers.is_empty() { 0 } else { FLAG_TRIGGERS }
            | if event.json { FLAG_JSON } else { 0 }
            | if event.schema == FIRST_SCHEMA { 0 } else { FLAG_SCHEMA };
        out.push(flags);
        for id in [event.causation, event.correlation].into_iter().flatten() {
            out.extend_from_slice(&id);
        }
        put_varint(&mut out, event.tags.len() as u64);
        for tag in event.tags {
            put_bytes(&mut out, tag.as_bytes());
        }
        if !event.triggers.is_empty() {
            put_varint(&mut out, event.triggers.len() as u64);
            for trigger in event.triggers {
                put_bytes(&mut out, trigger.as_bytes());
            }
        }
        if event.schema != FIRST_SCHEMA {
            put_varint(&mut out, u64::from(event.schema));
        }
        put_bytes(&mut out, event.data);
    }
    out
}

/// Reads the heads of the append batch in `bytes`: what opening needs.
pub(crate) fn decode_head(bytes: &[u8]) -> Result<BatchHead<'_>, BatchFault> {
    let mut reader = Reader(bytes);
    let compacted = match reader.byte()? {
        FORMAT => false,
        FORMAT_COMPACTED => true,
        other => return Err(BatchFault::Format(other)),
    };
    if reader.byte()? != KIND_APPEND {
        return Err(BatchFault::Malformed("its kind is unknown"));
    }
    let first_position = reader.varint()?;
    let count = reader.count(1)?;
    let mut parts = Vec::with_capacity(count);
    for _ in 0..count {
        let stream = reader.str()?;
        let first_version = reader.varint()?;
        let events = reader.count(16)?;
        let ids = reader.take(events * 16)?;
        parts.push(PartHead { stream, first_version, ids });
    }
    Ok(BatchHead { first_position, parts, bodies: reader.0, compacted })
}

/// Re-encodes the append batch in `bytes` without the data of the events `drop`
/// picks (by their index in the batch, stream and version): they keep their heads,
/// type, metadata, tags and triggers, which the index is rebuilt from, and are
/// flagged dropped. Returns the batch and how many events it dropped the data of,
/// or `None` when `drop` picks no event whose data is still there.
pub(crate) fn drop_data(
    bytes: &[u8],
    drop: impl Fn(usize, &str, u64) -> bool,
) -> Result<Option<(Vec<u8>, u64)>, BatchFault> {
    let head = decode_head(bytes)?;
    let heads = bytes.get(1..bytes.len() - head.bodies.len()).unwrap_or_default();
    let mut out = Vec::with_capacity(bytes.len());
    out.push(FORMAT_COMPACTED);
    out.extend_from_slice(heads);
    let mut reader = Reader(head.bodies);
    let mut dropped = 0;
    let mut k = 0;
    for part in &head.parts {
        for version in (part.first_version..).take(part.len()) {
            let before = reader.0;
            let body = reader.body(head.compacted)?;
            let whole = before.get(..before.len() - reader.0.len()).unwrap_or_default();
            if body.data.is_none() || !drop(k, part.stream, version) {
                out.extend_from_slice(whole);
                k += 1;
                continue;
            }
            put_bytes(&mut out, body.event_type.as_bytes());
            out.push(body.flags | FLAG_DROPPED);
            for id in [body.causation, body.correlation].into_iter().flatten() {
                out.extend_from_slice(&id);
            }
            put_varint(&mut out, body.tag_count as u64);
            out.extend_from_slice(body.tags);
            if body.flags & FLAG_TRIGGERS != 0 {
                put_varint(&mut out, body.trigger_count as u64);
                out.extend_from_slice(body.triggers);
            }
            if body.flags & FLAG_SCHEMA != 0 {
                put_varint(&mut out, u64::from(body.schema));
            }
            dropped += 1;
            k += 1;
        }
    }
    if !reader.0.is_empty() {
        return Err(BatchFault::Malformed("bytes follow its last event"));
    }
    Ok((dropped > 0).then_some((out, dropped)))
}

impl<'a> BatchHead<'a> {
    /// The batch's events in order, read from its bodies one at a time; an error
    /// ends them.
    pub(crate) fn events(&self) -> EventsOut<'a, '_> {
        EventsOut { head: self, part: 0, k: 0, reader: Reader(self.bodies), failed: false }
    }

    /// How many events the batch holds.
    pub(crate) fn len(&self) -> usize {
        self.parts.iter().map(PartHead::len).sum()
    }

    /// The tags and triggers of the batch's events: for each, the event's index
    /// in the batch and the name, in order. Reads the bodies, but decodes no data.
    pub(crate) fn links(&self) -> Result<Links<'a>, BatchFault> {
        let mut reader = Reader(self.bodies);
        let mut links = Links::default();
        for k in 0..self.len() {
            let body = reader.body(self.compacted)?;
            for (list, count, bytes) in [
                (&mut links.tags, body.tag_count, body.tags),
                (&mut links.triggers, body.trigger_count, body.triggers),
            ] {
                let mut names = Reader(bytes);
                for _ in 0..count {
                    list.push((k, names.str()?));
                }
            }
        }
        if !reader.0.is_empty() {
            return Err(BatchFault::Malformed("bytes follow its last event"));
        }
        Ok(links)
    }
}

/// The tags and triggers of a batch's events, by the event's index in the batch.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Links<'a> {
    pub(crate) tags: Vec<(usize, &'a str)>,
    pub(crate) triggers: Vec<(usize, &'a str)>,
}

/// An event's body read back, its tags still encoded.
struct Body<'a> {
    event_type: &'a str,
    flags: u8,
    causation: Option<[u8; 16]>,
    correlation: Option<[u8; 16]>,
    tag_count: usize,
    tags: &'a [u8],
    trigger_count: usize,
    triggers: &'a [u8],
    json: bool,
    schema: u32,
    /// `None` when compaction dropped it.
    data: Option<&'a [u8]>,
}

/// Reads every event of the append batch in `bytes`.
pub(crate) fn decode(bytes: &[u8]) -> Result<(u64, Vec<EventOut<'_>>), BatchFault> {
    let head = decode_head(bytes)?;
    let events = head.events().collect::<Result<_, _>>()?;
    Ok((head.first_position, events))
}

/// The events of a batch read back: [`BatchHead::events`].
pub(crate) struct EventsOut<'a, 'h> {
    head: &'h BatchHead<'a>,
    /// The part, and the event in it, read next.
    part: usize,
    k: usize,
    reader: Reader<'a>,
    failed: bool,
}

impl<'a> EventsOut<'a, '_> {
    fn read(&mut self, part: PartHead<'a>) -> Result<EventOut<'a>, BatchFault> {
        let id = part
            .ids
            .get(self.k * 16..(self.k + 1) * 16)
            .and_then(|id| <[u8; 16]>::try_from(id).ok())
            .ok_or(BatchFault::Malformed("it is cut short"))?;
        let body = self.reader.body(self.head.compacted)?;
        let Body { event_type, causation, correlation, json, schema, data, .. } = body;
        let tags = Reader(body.tags).strs(body.tag_count)?;
        let triggers = Reader(body.triggers).strs(body.trigger_count)?;
        let version = part
            .first_version
            .checked_add(self.k as u64)
            .ok_or(BatchFault::Malformed("its versions overflow"))?;
        Ok(EventOut {
            stream: part.stream,
            version,
            id,
            event_type,
            causation,
            correlation,
            tags,
            triggers,
            json,
            schema,
            data,
        })
    }
}

impl<'a> Iterator for EventsOut<'a, '_> {
    type Item = Result<EventOut<'a>, BatchFault>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        while let Some(part) = self.head.parts.get(self.part) {
            if self.k < part.len() {
                let event = self.read(*part);
                self.k += 1;
                self.failed = event.is_err();
                return Some(event);
            }
            self.part += 1;
            self.k = 0;
        }
        self.failed = true;
        (!self.reader.0.is_empty())
            .then_some(Err(BatchFault::Malformed("bytes follow its last event")))
    }
}

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    // Each byte takes the low seven bits: the cast drops only what was shifted out.
    #[allow(clippy::cast_possible_truncation)]
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    #[allow(clippy::cast_possible_truncation)]
    out.push(n as u8);
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Result<u8, BatchFault> {
        let (&byte, rest) = self.0.split_first().ok_or(BatchFault::Malformed("it is cut short"))?;
        self.0 = rest;
        Ok(byte)
    }

    fn varint(&mut self) -> Result<u64, BatchFault> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.byte()?;
            let bits = u64::from(byte & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(BatchFault::Malformed("a number overflows 64 bits"));
            }
            n |= bits << shift;
            if byte & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err(BatchFault::Malformed("a number overflows 64 bits"))
    }

    /// A count of things at least `each` bytes long: never more than the bytes left
    /// could hold, so that no allocation follows a damaged count.
    fn count(&mut self, each: usize) -> Result<usize, BatchFault> {
        let n = usize::try_from(self.varint()?)
            .map_err(|_| BatchFault::Malformed("a count is too large"))?;
        if n.checked_mul(each).is_none_or(|bytes| self.0.len() < bytes) {
            return Err(BatchFault::Malformed("a count is larger than the bytes left"));
        }
        Ok(n)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], BatchFault> {
        let (taken, rest) =
            self.0.split_at_checked(n).ok_or(BatchFault::Malformed("it is cut short"))?;
        self.0 = rest;
        Ok(taken)
    }

    fn bytes(&mut self) -> Result<&'a [u8], BatchFault> {
        let len = self.count(1)?;
        self.take(len)
    }

    fn str(&mut self) -> Result<&'a str, BatchFault> {
        std::str::from_utf8(self.bytes()?)
            .map_err(|_| BatchFault::Malformed("a string is not UTF-8"))
    }

    fn id(&mut self) -> Result<[u8; 16], BatchFault> {
        let bytes = self.take(16)?;
        bytes.try_into().map_err(|_| BatchFault::Malformed("it is cut short"))
    }

    /// One event's body; its tags are checked, and left encoded. Its data may
    /// be dropped only in a `compacted` batch.
    fn body(&mut self, compacted: bool) -> Result<Body<'a>, BatchFault> {
        let event_type = self.str()?;
        let flags = self.byte()?;
        let known = FLAG_CAUSATION
            | FLAG_CORRELATION
            | FLAG_TRIGGERS
            | FLAG_JSON
            | FLAG_SCHEMA
            | if compacted { FLAG_DROPPED } else { 0 };
        if flags & !known != 0 {
            return Err(BatchFault::Malformed("an event's flags are unknown"));
        }
        let causation = if flags & FLAG_CAUSATION == 0 { None } else { Some(self.id()?) };
        let correlation = if flags & FLAG_CORRELATION == 0 { None } else { Some(self.id()?) };
        let (tag_count, tags) = self.names()?;
        let (trigger_count, triggers) =
            if flags & FLAG_TRIGGERS == 0 { (0, &[][..]) } else { self.names()? };
        let schema = if flags & FLAG_SCHEMA == 0 {
            FIRST_SCHEMA
        } else {
            u32::try_from(self.varint()?)
                .map_err(|_| BatchFault::Malformed("a schema version overflows 32 bits"))?
        };
        let data = if flags & FLAG_DROPPED == 0 { Some(self.bytes()?) } else { None };
        Ok(Body {
            event_type,
            flags,
            causation,
            correlation,
            tag_count,
            tags,
            trigger_count,
            triggers,
            json: flags & FLAG_JSON != 0,
            schema,
            data,
        })
    }

    /// `count` strings.
    fn strs(&mut self, count: usize) -> Result<Vec<&'a str>, BatchFault> {
        if count == 0 {
            return Ok(Vec::new());
        }
        (0..count).map(|_| self.str()).collect()
    }

    /// A count and that many strings, checked and left encoded.
    fn names(&mut self) -> Result<(usize, &'a [u8]), BatchFault> {
        let count = self.count(1)?;
        let before = self.0;
        for _ in 0..count {
            self.str()?;
        }
        Ok((count, before.get(..before.len() - self.0.len()).unwrap_or_default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_round_trips_and_damage_is_a_fault() {
        let tags = vec!["account-1".to_owned()];
        let events = [
            EventIn {
                id: [9; 16],
                event_type: "Deposited",
                causation: None,
                correlation: Some([1; 16]),
                tags: &tags,
                triggers: &tags,
                json: true,
                schema: 1,
                data: &[1, 2, 3],
            },
            EventIn {
                id: [8; 16],
                event_type: "Withdrew",
                causation: Some([2; 16]),
                correlation: None,
                tags: &[],
                triggers: &[],
                json: false,
                schema: 1,
                data: &[],
            },
        ];
        let bytes = encode(
            300,
            &[
                PartIn { stream: "account-1", first_version: 2, events: &events[..1] },
                PartIn { stream: "account-2", first_version: 0, events: &events[1..] },
            ],
        );
        let head = decode_head(&bytes).expect("a head");
        assert_eq!(head.first_position, 300);
        assert_eq!(
            head.parts
                .iter()
                .map(|part| (part.stream, part.first_version, part.ids().collect::<Vec<_>>()))
                .collect::<Vec<_>>(),
            [("account-1", 2, vec![[9; 16]]), ("account-2", 0, vec![[8; 16]])]
        );
        let (first, read) = decode(&bytes).expect("a batch");
        assert_eq!(first, 300);
        assert_eq!(read.len(), 2);
        let event = read.first().expect("an event");
        assert_eq!(
            (event.stream, event.version, event.event_type, event.data),
            ("account-1", 2, "Deposited", Some(&[1u8, 2, 3][..]))
        );
        assert_eq!((event.correlation, event.tags.clone()), (Some([1; 16]), vec!["account-1"]));
        assert_eq!((event.triggers.clone(), event.json), (vec!["account-1"], true));
        let links = head.links().expect("links");
        assert_eq!((links.tags, links.triggers), (vec![(0, "account-1")], vec![(0, "account-1")]));
        assert_eq!(read.get(1).map(|it| (it.causation, it.version)), Some((Some([2; 16]), 0)));

        let mut newer = bytes.clone();
        if let Some(format) = newer.first_mut() {
            *format = 3;
        }
        assert_eq!(decode(&newer).err(), Some(BatchFault::Format(3)));
        for cut in 0..bytes.len() {
            assert!(decode(bytes.get(..cut).unwrap_or_default()).is_err(), "cut at {cut}");
        }
        let mut longer = bytes;
        longer.push(0);
        assert!(matches!(decode(&longer), Err(BatchFault::Malformed(_))));
        // A huge count allocates nothing: it is refused first.
        let mut huge = vec![FORMAT, KIND_APPEND, 0];
        put_varint(&mut huge, u64::MAX / 2);
        assert!(matches!(decode(&huge), Err(BatchFault::Malformed(_))));
    }

    #[test]
    fn dropping_data_keeps_heads_and_metadata_and_is_refused_in_format_1() {
        let tags = vec!["t".to_owned()];
        let event = |id: u8, data: &'static [u8]| EventIn {
            id: [id; 16],
            event_type: "E",
            causation: Some([7; 16]),
            correlation: None,
            tags: &tags,
            triggers: &tags,
            json: id == 2,
            schema: u32::from(id),
            data,
        };
        let events = [event(1, b"secret"), event(2, b"kept"), event(3, b"other")];
        let bytes = encode(
            10,
            &[
                PartIn { stream: "a", first_version: 4, events: &events[..2] },
                PartIn { stream: "b", first_version: 0, events: &events[2..] },
            ],
        );
        assert_eq!(drop_data(&bytes, |_, _, _| false), Ok(None), "nothing picked");
        let (compacted, n) = drop_data(&bytes, |_, stream, version| stream == "a" && version == 4)
            .expect("a batch")
            .expect("one dropped");
        assert_eq!(n, 1);
        assert!(compacted.len() < bytes.len());
        assert!(!compacted.windows(6).any(|it| it == b"secret"), "the data is gone");
        let (_, before) = decode(&bytes).expect("the batch");
        let (first, after) = decode(&compacted).expect("the compacted batch");
        assert_eq!(first, 10);
        let first_event = after.first().expect("an event");
        assert_eq!(first_event.data, None);
        let mut expected = before.clone();
        if let Some(event) = expected.first_mut() {
            event.data = None;
        }
        assert_eq!(after, expected, "all but the dropped data is kept");
        let head = decode_head(&compacted).expect("heads");
        assert_eq!(head.links().map(|it| it.triggers.len()), Ok(3));
        // Dropped again, nothing changes; the rest can still go.
        assert_eq!(drop_data(&compacted, |k, _, _| k == 0), Ok(None));
        let (twice, n) = drop_data(&compacted, |_, _, _| true).expect("a batch").expect("two");
        assert_eq!(n, 2);
        assert!(decode(&twice).expect("a batch").1.iter().all(|it| it.data.is_none()));
        // The dropped flag in a batch of format 1 is damage.
        let mut old = compacted;
        if let Some(format) = old.first_mut() {
            *format = FORMAT;
        }
        assert!(matches!(decode(&old), Err(BatchFault::Malformed(_))));
        // Only append batches come in format 2.
        let mut delete = encode_delete("a", Removal::Truncate, 3);
        if let Some(format) = delete.first_mut() {
            *format = FORMAT_COMPACTED;
        }
        assert!(matches!(decode_command(&delete), Err(BatchFault::Malformed(_))));
    }
}
