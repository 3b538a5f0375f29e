//! The journal's bytes: file headers, frames and snapshot files.
//!
//! A journal file is a header and then frames:
//!
//! ```text
//! header: magic "INSTAJNL" | version u32 | sealed u8 | first event u64
//!         | rewritten u64 (0; nonzero in a file that compaction rewrote, `rewrite.rs`)
//!         | state type (u16 length, bytes) | event type (u16 length, bytes)
//!         | state schema u32 | event schema u32   (the second from version 3 on)
//!         | key check (u32 length, sealed bytes; empty when not sealed)
//!         | state shape (u32 length, bytes) | event shape (u32 length, bytes)   (from version 2 on)
//!         | crc32 of all before
//! frame:  length u32 | crc32 u32 of the payload | payload
//! payload: version u8 | kind u8 | body
//!   kind 0, an event:  event number u64 | timestamp µs u64 | encoded event (sealed when the journal is)
//!   kind 1, a void:    first u64 | last u64   (events first..=last were not applied: see `Journal`)
//!   kind 2, a check:   event number u64 | digest u64 of the state after that event
//!   kind 3, a link:    next u64 | 0 u64   (the journal goes on in the file whose first event is next;
//!                      version 2 only)
//! ```
//!
//! A snapshot file is
//!
//! ```text
//! magic "INSTASNP" | version u32 | sealed u8 | events covered u64 | last timestamp µs u64
//!         | state type | event type | state schema u32 | event schema u32 (from version 3 on)
//!         | body length u64 | body crc32
//!         | state shape | event shape (from version 2 on) | crc32 of all before
//! body: encoded state (sealed when the journal is: whole in version 1, in chunks as
//!       value files are from version 2 on)
//! ```
//!
//! A shape is the structure of a type as serde sees it (`shape.rs`); an empty one is
//! a type that could not be traced. The schema versions are the front door's, of
//! the state and of the events the file was written with; versions 1 and 2 had one
//! schema version, the state's, and their events are read as version 1. All
//! integers are little-endian.

use crate::journal::Identity;

pub(crate) const JOURNAL_MAGIC: [u8; 8] = *b"INSTAJNL";
pub(crate) const SNAPSHOT_MAGIC: [u8; 8] = *b"INSTASNP";
/// The version of the journal and snapshot formats this build writes; it reads 1
/// and 2 too.
pub(crate) const FORMAT_VERSION: u32 = 3;
/// The first version: no shapes in headers, no link frames, one schema version.
pub(crate) const FORMAT_V1: u32 = 1;
/// The second version: one schema version, the state's, for both types.
pub(crate) const FORMAT_V2: u32 = 2;
/// Every version this build reads, newest first.
const READ_VERSIONS: [u32; 3] = [FORMAT_VERSION, FORMAT_V2, FORMAT_V1];
/// The events' schema version of a file written before the events had one.
pub(crate) const FIRST_SCHEMA: u32 = 1;
/// The version byte every frame's payload starts with.
const FRAME_VERSION: u8 = 1;
/// Length and checksum in front of every payload.
pub(crate) const FRAME_HEAD: usize = 8;
/// The longest payload a frame may have (1 GiB); a longer length field is damage.
pub(crate) const MAX_PAYLOAD: u32 = 1 << 30;
/// The longest encoded event the journal takes: its frame's payload must fit, with
/// room for sealing.
pub(crate) const MAX_EVENT: usize = MAX_PAYLOAD as usize - EVENT_HEAD - 64;

const KIND_EVENT: u8 = 0;
const KIND_VOID: u8 = 1;
const KIND_CHECK: u8 = 2;
const KIND_LINK: u8 = 3;
/// The length of a framed link: the only frame left unsynced at the end of a
/// journal file that is not the last (see `Output::start`).
pub(crate) const LINK_LEN: usize = FRAME_HEAD + 2 + 8 + 8;
/// Version, kind, event number and timestamp in front of an event's bytes.
pub(crate) const EVENT_HEAD: usize = 2 + 8 + 8;

/// One decoded frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Frame<'a> {
    Event { seq: u64, at: u64, bytes: &'a [u8] },
    Void { first: u64, last: u64 },
    Check { seq: u64, digest: u64 },
    Link { next: u64 },
}

/// Appends a framed event: `bytes` are the encoded (and possibly sealed) event.
pub(crate) fn put_event(out: &mut Vec<u8>, seq: u64, at: u64, bytes: &[u8]) {
    put_frame(out, &[&[FRAME_VERSION, KIND_EVENT], &seq.to_le_bytes(), &at.to_le_bytes(), bytes]);
}

pub(crate) fn put_void(out: &mut Vec<u8>, first: u64, last: u64) {
    put_frame(out, &[&[FRAME_VERSION, KIND_VOID], &first.to_le_bytes(), &last.to_le_bytes()]);
}

pub(crate) fn put_check(out: &mut Vec<u8>, seq: u64, digest: u64) {
    put_frame(out, &[&[FRAME_VERSION, KIND_CHECK], &seq.to_le_bytes(), &digest.to_le_bytes()]);
}

pub(crate) fn put_link(out: &mut Vec<u8>, next: u64) {
    put_frame(out, &[&[FRAME_VERSION, KIND_LINK], &next.to_le_bytes(), &0u64.to_le_bytes()]);
}

/// Appends a frame whose payload is `parts`, one after the other: its length and
/// checksum are computed first and written ahead of it, so that no frame can go
/// out without its head.
fn put_frame(out: &mut Vec<u8>, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|part| part.len()).sum();
    // `Journal::commit` refuses an event that would not fit before it gets a number,
    // and voids, checks and links are 18 bytes: every payload fits its length field.
    #[allow(clippy::expect_used)]
    let len = u32::try_from(len).expect("a frame's payload is at most MAX_PAYLOAD bytes");
    let mut crc = crc32fast::Hasher::new();
    for part in parts {
        crc.update(part);
    }
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    for part in parts {
        out.extend_from_slice(part);
    }
}

/// What stands at some offset of a journal file's frame area.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Read<'a> {
    /// A sound frame, and the length it takes up.
    Frame(Frame<'a>, usize),
    /// The end of the file.
    End,
    /// Not a sound frame: torn or damaged, as `reason` says.
    Bad(&'static str),
}

/// Reads the frame at the start of `bytes`.
pub(crate) fn read_frame(bytes: &[u8]) -> Read<'_> {
    if bytes.is_empty() {
        return Read::End;
    }
    let (Some(len), Some(crc)) = (le_u32(bytes, 0), le_u32(bytes, 4)) else {
        return Read::Bad("a frame's length and checksum are cut short");
    };
    if len > MAX_PAYLOAD {
        return Read::Bad("a frame's length field is out of range");
    }
    let end = FRAME_HEAD + len as usize;
    let Some(payload) = bytes.get(FRAME_HEAD..end) else {
        return Read::Bad("a frame is cut short");
    };
    if crc32fast::hash(payload) != crc {
        return Read::Bad("a frame's checksum does not match");
    }
    match decode_payload(payload) {
        Some(frame) => Read::Frame(frame, end),
        None => Read::Bad("a frame's payload is malformed or of an unknown version"),
    }
}

/// Whether the bad bytes from `offset` to the end of a journal file look like a
/// write that a crash cut short: a frame whose end is missing (unless the bytes that
/// are there hold a whole payload under a damaged length field), or zeros where the
/// file grew but its data never reached the disk (from the frame's start, or from a
/// page boundary inside it, to the end of the file). A complete frame whose checksum
/// fails is damage: a cut write does not make one.
///
/// A frame whose payload really ends in a page or more of zeros, and that is
/// damaged before them, is taken for a cut write.
pub(crate) fn looks_torn(bytes: &[u8], offset: usize) -> bool {
    const PAGE: usize = 4096;
    let Some(rest) = bytes.get(offset..) else { return true };
    let written = rest.iter().rposition(|byte| *byte != 0).map_or(offset, |at| offset + at + 1);
    if written == offset {
        return true;
    }
    let (Some(len), Some(crc)) = (le_u32(rest, 0), le_u32(rest, 4)) else { return true };
    if len > MAX_PAYLOAD {
        return false;
    }
    let end = offset + FRAME_HEAD + len as usize;
    if bytes.len() < end {
        let present = bytes.get(offset + FRAME_HEAD..).unwrap_or_default();
        return crc32fast::hash(present) != crc;
    }
    written.next_multiple_of(PAGE) < end
}

/// Parses the frame at the start of `bytes` without checking its checksum: for
/// frames that [`read_frame`] already found sound.
pub(crate) fn parse_frame(bytes: &[u8]) -> Option<(Frame<'_>, usize)> {
    let len = le_u32(bytes, 0)? as usize;
    let end = FRAME_HEAD.checked_add(len)?;
    Some((decode_payload(bytes.get(FRAME_HEAD..end)?)?, end))
}

fn decode_payload(payload: &[u8]) -> Option<Frame<'_>> {
    let (&[version, kind], body) = payload.split_first_chunk::<2>()?;
    if version != FRAME_VERSION {
        return None;
    }
    let first = le_u64(body, 0)?;
    let second = le_u64(body, 8)?;
    match kind {
        KIND_EVENT => Some(Frame::Event { seq: first, at: second, bytes: body.get(16..)? }),
        KIND_VOID if body.len() == 16 && first <= second => {
            Some(Frame::Void { first, last: second })
        }
        KIND_CHECK if body.len() == 16 => Some(Frame::Check { seq: first, digest: second }),
        KIND_LINK if body.len() == 16 && second == 0 => Some(Frame::Link { next: first }),
        _ => None,
    }
}

/// The fields of a journal file's or snapshot's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) version: u32,
    pub(crate) sealed: bool,
    /// A journal's first event number, or the number of events a snapshot covers.
    pub(crate) events: u64,
    /// A snapshot's last timestamp; in a journal header 0, or nonzero when
    /// compaction rewrote the file (`rewrite.rs`).
    pub(crate) at: u64,
    pub(crate) state_type: String,
    pub(crate) event_type: String,
    /// The state's schema version.
    pub(crate) schema: u32,
    /// The events' schema version ([`FIRST_SCHEMA`] before version 3).
    pub(crate) event_schema: u32,
    /// A journal's sealed key check, or a snapshot's body length and checksum.
    pub(crate) extra: Extra,
    /// The encoded shapes of the state and event types (`shape.rs`); empty for a
    /// type that could not be traced, and in version 1.
    pub(crate) state_shape: Vec<u8>,
    pub(crate) event_shape: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Extra {
    KeyCheck(Vec<u8>),
    Body { len: u64, crc: u32 },
}

/// Why a header could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HeaderFault {
    /// The bytes are damaged, as the reason says.
    Damaged(String),
    /// A sound header of a format version this build does not read.
    Version(u32),
}

impl Header {
    pub(crate) fn new(
        identity: &Identity,
        event_schema: u32,
        sealed: bool,
        events: u64,
        at: u64,
        extra: Extra,
    ) -> Header {
        let shape = |shape: &Option<crate::shape::Shape>| {
            shape.as_ref().map(crate::shape::Shape::encode).unwrap_or_default()
        };
        Header {
            version: FORMAT_VERSION,
            sealed,
            events,
            at,
            state_type: identity.state_type.to_owned(),
            event_type: identity.event_type.to_owned(),
            schema: identity.schema,
            event_schema,
            extra,
            state_shape: shape(&identity.state_shape),
            event_shape: shape(&identity.event_shape),
        }
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        let snapshot = matches!(self.extra, Extra::Body { .. });
        out.extend_from_slice(if snapshot { &SNAPSHOT_MAGIC } else { &JOURNAL_MAGIC });
        out.extend_from_slice(&self.version.to_le_bytes());
        out.push(u8::from(self.sealed));
        out.extend_from_slice(&self.events.to_le_bytes());
        out.extend_from_slice(&self.at.to_le_bytes());
        for name in [&self.state_type, &self.event_type] {
            // Type names are stored cut to fit (`codec::stored_type_name`), and
            // compared in that form.
            let name = crate::codec::stored_type_name(name);
            let len = u16::try_from(name.len()).unwrap_or(u16::MAX);
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(name.as_bytes());
        }
        out.extend_from_slice(&self.schema.to_le_bytes());
        if has_event_schema(self.version) {
            out.extend_from_slice(&self.event_schema.to_le_bytes());
        }
        match &self.extra {
            Extra::KeyCheck(check) => put_bytes32(&mut out, check),
            Extra::Body { len, crc } => {
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(&crc.to_le_bytes());
            }
        }
        if self.version != FORMAT_V1 {
            put_bytes32(&mut out, &self.state_shape);
            put_bytes32(&mut out, &self.event_shape);
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes the header at the start of `bytes`, and returns it with its length.
    ///
    /// A header whose version this build does not read is [`HeaderFault::Version`]
    /// only if its checksum holds under one of the layouts it knows; otherwise the
    /// version field itself is taken for damage.
    pub(crate) fn decode(bytes: &[u8], snapshot: bool) -> Result<(Header, usize), HeaderFault> {
        let magic = if snapshot { SNAPSHOT_MAGIC } else { JOURNAL_MAGIC };
        let damaged = |reason: &str| HeaderFault::Damaged(reason.to_owned());
        match bytes.get(..8) {
            None => return Err(damaged("the file is shorter than its header")),
            Some(found) if found != magic => {
                return Err(damaged("the file does not start with the right magic bytes"));
            }
            Some(_) => {}
        }
        let version = le_u32(bytes, 8).ok_or_else(|| damaged("the header is cut short"))?;
        if READ_VERSIONS.contains(&version) {
            return Header::parse(bytes, snapshot, version).map_err(damaged);
        }
        // A sound header of another version, or a damaged version field?
        let sound =
            READ_VERSIONS.into_iter().any(|layout| Header::parse(bytes, snapshot, layout).is_ok());
        if sound {
            return Err(HeaderFault::Version(version));
        }
        Err(HeaderFault::Damaged(format!(
            "the header is damaged (its version field reads {version}, and its checksum does not hold)"
        )))
    }

    /// Parses the header in `bytes` with the layout of version `layout`, whatever its
    /// version field says, and checks its checksum.
    fn parse(bytes: &[u8], snapshot: bool, layout: u32) -> Result<(Header, usize), &'static str> {
        let short = "the header is cut short";
        let mut reader = Reader { bytes, at: 8 };
        let version = reader.u32().ok_or(short)?;
        let sealed = match reader.take(1).ok_or(short)? {
            [0] => false,
            [1] => true,
            _ => return Err("the header's sealed flag is neither 0 nor 1"),
        };
        let events = reader.u64().ok_or(short)?;
        let at = reader.u64().ok_or(short)?;
        let state_type = reader.name().ok_or(short)?;
        let event_type = reader.name().ok_or(short)?;
        let schema = reader.u32().ok_or(short)?;
        let event_schema =
            if has_event_schema(layout) { reader.u32().ok_or(short)? } else { FIRST_SCHEMA };
        let extra = if snapshot {
            Extra::Body { len: reader.u64().ok_or(short)?, crc: reader.u32().ok_or(short)? }
        } else {
            Extra::KeyCheck(reader.bytes32().ok_or(short)?.to_vec())
        };
        let (state_shape, event_shape) = if layout == FORMAT_V1 {
            (Vec::new(), Vec::new())
        } else {
            (reader.bytes32().ok_or(short)?.to_vec(), reader.bytes32().ok_or(short)?.to_vec())
        };
        let end = reader.at;
        let stored = reader.u32().ok_or(short)?;
        if crc32fast::hash(bytes.get(..end).unwrap_or_default()) != stored {
            return Err("the header's checksum does not match");
        }
        let header = Header {
            version,
            sealed,
            events,
            at,
            state_type,
            event_type,
            schema,
            event_schema,
            extra,
            state_shape,
            event_shape,
        };
        Ok((header, reader.at))
    }
}

/// Whether headers of format `version` have the events' schema version.
fn has_event_schema(version: u32) -> bool {
    version != FORMAT_V1 && version != FORMAT_V2
}

/// Appends `bytes` with their length as a `u32`.
fn put_bytes32(out: &mut Vec<u8>, bytes: &[u8]) {
    // Key checks are tens of bytes, and shapes a few KiB.
    #[allow(clippy::expect_used)]
    let len = u32::try_from(bytes.len()).expect("a header field is far below 4 GiB");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let taken = self.bytes.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(taken)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn bytes32(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.u32()?).ok()?;
        self.take(len)
    }

    fn name(&mut self) -> Option<String> {
        let len = u16::from_le_bytes(self.take(2)?.try_into().ok()?);
        String::from_utf8(self.take(usize::from(len))?.to_vec()).ok()
    }
}

fn le_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn le_u64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

/// The file name of the journal file whose first event is `first`.
pub(crate) fn journal_name(first: u64) -> String {
    format!("journal-{first:020}.log")
}

/// The file name of the snapshot covering the first `events` events.
pub(crate) fn snapshot_name(events: u64) -> String {
    format!("snapshot-{events:020}.snap")
}

/// The number in a journal or snapshot file name, and which of the two it is.
pub(crate) fn parse_name(name: &str) -> Option<(FileKind, u64)> {
    let (kind, digits) = if let Some(rest) = name.strip_prefix("journal-") {
        (FileKind::Journal, rest.strip_suffix(".log")?)
    } else {
        (FileKind::Snapshot, name.strip_prefix("snapshot-")?.strip_suffix(".snap")?)
    };
    if digits.len() != 20 || !digits.bytes().all(|it| it.is_ascii_digit()) {
        return None;
    }
    Some((kind, digits.parse().ok()?))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileKind {
    Journal,
    Snapshot,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let mut out = Vec::new();
        put_event(&mut out, 7, 99, b"hello");
        put_void(&mut out, 7, 9);
        put_check(&mut out, 7, 0xfeed);
        let Read::Frame(first, n) = read_frame(&out) else { panic!("no frame") };
        assert_eq!(first, Frame::Event { seq: 7, at: 99, bytes: b"hello" });
        let rest = out.get(n..).expect("two more frames");
        let Read::Frame(second, m) = read_frame(rest) else { panic!("no frame") };
        assert_eq!(second, Frame::Void { first: 7, last: 9 });
        let rest = rest.get(m..).expect("one more frame");
        let Read::Frame(third, k) = read_frame(rest) else { panic!("no frame") };
        assert_eq!(third, Frame::Check { seq: 7, digest: 0xfeed });
        assert_eq!(read_frame(rest.get(k..).expect("the end")), Read::End);
    }

    #[test]
    fn every_cut_and_flip_is_refused() {
        let mut out = Vec::new();
        put_event(&mut out, 1, 2, b"payload");
        for len in 1..out.len() {
            assert!(
                matches!(read_frame(out.get(..len).expect("a prefix")), Read::Bad(_)),
                "cut at {len}"
            );
        }
        for idx in 0..out.len() {
            let mut flipped = out.clone();
            if let Some(byte) = flipped.get_mut(idx) {
                *byte ^= 0x10;
            }
            assert!(matches!(read_frame(&flipped), Read::Bad(_)), "flip at {idx}");
        }
    }

    #[test]
    fn headers_round_trip_and_names_parse() {
        let identity = Identity {
            state_type: "S",
            event_type: "E",
            schema: 1,
            state_shape: crate::shape::Shape::of::<(u8, String)>(),
            event_shape: None,
        };
        for extra in [Extra::KeyCheck(vec![1, 2, 3]), Extra::Body { len: 5, crc: 6 }] {
            let snapshot = matches!(extra, Extra::Body { .. });
            let header = Header::new(&identity, 3, true, 42, 7, extra);
            assert!(!header.state_shape.is_empty() && header.event_shape.is_empty());
            let bytes = header.encode();
            assert_eq!(Header::decode(&bytes, snapshot), Ok((header.clone(), bytes.len())));
            assert!(Header::decode(&bytes, !snapshot).is_err());
            // A version 1 header (no shapes) and a version 2 one (no events' schema)
            // still read, their events' schema version the first.
            let old = Header { version: FORMAT_V1, ..header.clone() };
            let decoded = Header::decode(&old.encode(), snapshot).map(|(it, _)| it);
            assert_eq!(
                decoded.map(|it| (it.state_shape, it.event_schema)),
                Ok((Vec::new(), FIRST_SCHEMA))
            );
            let old = Header { version: FORMAT_V2, ..header.clone() };
            let decoded = Header::decode(&old.encode(), snapshot).map(|(it, _)| it);
            assert_eq!(
                decoded.map(|it| (it.state_shape == header.state_shape, it.event_schema)),
                Ok((true, FIRST_SCHEMA))
            );
            // Damage in the version field is damage; a sound header of a newer
            // version is that version.
            for at in 8..12 {
                let mut flipped = bytes.clone();
                if let Some(byte) = flipped.get_mut(at) {
                    *byte ^= 0x40;
                }
                let res = Header::decode(&flipped, snapshot);
                assert!(matches!(res, Err(HeaderFault::Damaged(_))), "{res:?}");
            }
            let newer = Header {
                version: 9,
                ..Header::new(&identity, 1, false, 1, 0, Extra::KeyCheck(Vec::new()))
            };
            assert_eq!(Header::decode(&newer.encode(), false), Err(HeaderFault::Version(9)));
        }
        assert_eq!(parse_name(&journal_name(5)), Some((FileKind::Journal, 5)));
        assert_eq!(parse_name(&snapshot_name(6)), Some((FileKind::Snapshot, 6)));
        assert_eq!(parse_name("journal-5.log"), None);
    }
}
