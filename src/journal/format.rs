//! The journal's bytes: file headers, frames and snapshot files.
//!
//! A journal file is a header and then frames:
//!
//! ```text
//! header: magic "INSTAJNL" | version u32 | sealed u8 | first event u64 | 0 u64
//!         | state type (u16 length, bytes) | event type (u16 length, bytes) | schema u32
//!         | key check (u32 length, sealed bytes; empty when not sealed) | crc32 of all before
//! frame:  length u32 | crc32 u32 of the payload | payload
//! payload: version u8 | kind u8 | body
//!   kind 0, an event:  event number u64 | timestamp µs u64 | encoded event (sealed when the journal is)
//!   kind 1, a void:    first u64 | last u64   (events first..=last were not applied: see `Journal`)
//!   kind 2, a check:   event number u64 | digest u64 of the state after that event
//! ```
//!
//! A snapshot file is
//!
//! ```text
//! magic "INSTASNP" | version u32 | sealed u8 | events covered u64 | last timestamp µs u64
//!         | state type | event type | schema u32 | body length u64 | body crc32 | crc32 of all before
//! body: encoded state (sealed when the journal is)
//! ```
//!
//! All integers are little-endian.

use crate::journal::Identity;

pub(crate) const JOURNAL_MAGIC: [u8; 8] = *b"INSTAJNL";
pub(crate) const SNAPSHOT_MAGIC: [u8; 8] = *b"INSTASNP";
/// The version of the journal and snapshot formats this build writes and reads.
pub(crate) const FORMAT_VERSION: u32 = 1;
/// The version byte every frame's payload starts with.
const FRAME_VERSION: u8 = 1;
/// Length and checksum in front of every payload.
pub(crate) const FRAME_HEAD: usize = 8;
/// The longest payload a frame may have (1 GiB); a longer length field is damage.
pub(crate) const MAX_PAYLOAD: u32 = 1 << 30;

const KIND_EVENT: u8 = 0;
const KIND_VOID: u8 = 1;
const KIND_CHECK: u8 = 2;
/// Version, kind, event number and timestamp in front of an event's bytes.
pub(crate) const EVENT_HEAD: usize = 2 + 8 + 8;

/// One decoded frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Frame<'a> {
    Event { seq: u64, at: u64, bytes: &'a [u8] },
    Void { first: u64, last: u64 },
    Check { seq: u64, digest: u64 },
}

/// Appends a framed event: `bytes` are the encoded (and possibly sealed) event.
pub(crate) fn put_event(out: &mut Vec<u8>, seq: u64, at: u64, bytes: &[u8]) {
    put_frame(out, |out| {
        out.extend_from_slice(&[FRAME_VERSION, KIND_EVENT]);
        out.extend_from_slice(&seq.to_le_bytes());
        out.extend_from_slice(&at.to_le_bytes());
        out.extend_from_slice(bytes);
    });
}

pub(crate) fn put_void(out: &mut Vec<u8>, first: u64, last: u64) {
    put_frame(out, |out| {
        out.extend_from_slice(&[FRAME_VERSION, KIND_VOID]);
        out.extend_from_slice(&first.to_le_bytes());
        out.extend_from_slice(&last.to_le_bytes());
    });
}

pub(crate) fn put_check(out: &mut Vec<u8>, seq: u64, digest: u64) {
    put_frame(out, |out| {
        out.extend_from_slice(&[FRAME_VERSION, KIND_CHECK]);
        out.extend_from_slice(&seq.to_le_bytes());
        out.extend_from_slice(&digest.to_le_bytes());
    });
}

fn put_frame(out: &mut Vec<u8>, payload: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEAD]);
    payload(out);
    let body = out.get(start + FRAME_HEAD..).unwrap_or_default();
    // Lengths beyond `MAX_PAYLOAD` are refused before they get here (see `Journal`).
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    let crc = crc32fast::hash(body);
    let mut head = [0; FRAME_HEAD];
    let (len_bytes, crc_bytes) = head.split_at_mut(4);
    len_bytes.copy_from_slice(&len.to_le_bytes());
    crc_bytes.copy_from_slice(&crc.to_le_bytes());
    if let Some(slot) = out.get_mut(start..start + FRAME_HEAD) {
        slot.copy_from_slice(&head);
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
    /// A snapshot's last timestamp (0 in a journal header).
    pub(crate) at: u64,
    pub(crate) state_type: String,
    pub(crate) event_type: String,
    pub(crate) schema: u32,
    /// A journal's sealed key check, or a snapshot's body length and checksum.
    pub(crate) extra: Extra,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Extra {
    KeyCheck(Vec<u8>),
    Body { len: u64, crc: u32 },
}

impl Header {
    pub(crate) fn new(
        identity: &Identity,
        sealed: bool,
        events: u64,
        at: u64,
        extra: Extra,
    ) -> Header {
        Header {
            version: FORMAT_VERSION,
            sealed,
            events,
            at,
            state_type: identity.state_type.to_owned(),
            event_type: identity.event_type.to_owned(),
            schema: identity.schema,
            extra,
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
            let len = u16::try_from(name.len()).unwrap_or(u16::MAX);
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(name.as_bytes().get(..usize::from(len)).unwrap_or_default());
        }
        out.extend_from_slice(&self.schema.to_le_bytes());
        match &self.extra {
            Extra::KeyCheck(check) => {
                let len = u32::try_from(check.len()).unwrap_or(u32::MAX);
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(check);
            }
            Extra::Body { len, crc } => {
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(&crc.to_le_bytes());
            }
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes the header at the start of `bytes`, and returns it with its length.
    ///
    /// A header of another format version decodes as far as the version, so that the
    /// caller can name it.
    pub(crate) fn decode(bytes: &[u8], snapshot: bool) -> Result<(Header, usize), &'static str> {
        let magic = if snapshot { SNAPSHOT_MAGIC } else { JOURNAL_MAGIC };
        let mut reader = Reader { bytes, at: 0 };
        if reader.take(8).ok_or("the file is shorter than its header")? != magic {
            return Err("the file does not start with the right magic bytes");
        }
        let version = reader.u32().ok_or("the header is cut short")?;
        if version != FORMAT_VERSION {
            let header = Header {
                version,
                sealed: false,
                events: 0,
                at: 0,
                state_type: String::new(),
                event_type: String::new(),
                schema: 0,
                extra: Extra::KeyCheck(Vec::new()),
            };
            return Ok((header, reader.at));
        }
        let short = "the header is cut short";
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
        let extra = if snapshot {
            Extra::Body { len: reader.u64().ok_or(short)?, crc: reader.u32().ok_or(short)? }
        } else {
            let len = reader.u32().ok_or(short)? as usize;
            Extra::KeyCheck(reader.take(len).ok_or(short)?.to_vec())
        };
        let end = reader.at;
        let stored = reader.u32().ok_or(short)?;
        if crc32fast::hash(bytes.get(..end).unwrap_or_default()) != stored {
            return Err("the header's checksum does not match");
        }
        let header = Header { version, sealed, events, at, state_type, event_type, schema, extra };
        Ok((header, reader.at))
    }
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
        let identity = Identity { state_type: "S", event_type: "E", schema: 1 };
        for extra in [Extra::KeyCheck(vec![1, 2, 3]), Extra::Body { len: 5, crc: 6 }] {
            let snapshot = matches!(extra, Extra::Body { .. });
            let header = Header::new(&identity, true, 42, 7, extra);
            let bytes = header.encode();
            assert_eq!(Header::decode(&bytes, snapshot), Ok((header, bytes.len())));
            assert!(Header::decode(&bytes, !snapshot).is_err());
        }
        assert_eq!(parse_name(&journal_name(5)), Some((FileKind::Journal, 5)));
        assert_eq!(parse_name(&snapshot_name(6)), Some((FileKind::Snapshot, 6)));
        assert_eq!(parse_name("journal-5.log"), None);
    }
}
