//! The on-disk record format: keys, record framing, checksums and byte order.
//!
//! Every byte layout instastate writes is defined here and nowhere else, so that
//! `ARCHITECTURE.md` and this file are the whole format specification.
//!
//! A record is:
//!
//! ```text
//! magic "IS" | format u16 | schema u32 | type_len u16 | type_name | kind u8 | body | crc32 u32
//! body, kind 0 (inline): len u32 | bytes
//! body, kind 1 (file):   file_id u64 | len u64 | crc32 u32 of the file's bytes
//! ```
//!
//! All integers are big-endian, and the final checksum covers every byte before it.

use std::fmt;

/// The record format this build writes and reads.
pub(crate) const FORMAT_VERSION: u16 = 1;

/// The schema version written for every cell until cells can declare their own.
pub(crate) const DEFAULT_SCHEMA: u32 = 1;

/// Values whose encoding is longer than this are written to a value file of their own.
///
/// sled writes any tree node larger than a quarter of its 512 KiB segment to a separate
/// blob file without ever fsyncing it, and splits leaves only above 16 entries.
/// Keeping records this small keeps every leaf well under that limit, so all of our
/// records live in sled's log, which we do fsync.
pub(crate) const INLINE_MAX: usize = 4 * 1024;

const MAGIC: [u8; 2] = *b"IS";
const KIND_INLINE: u8 = 0;
const KIND_FILE: u8 = 1;

/// The prefix of every cell record's key; the cell's name follows it.
pub(crate) const CELL_PREFIX: &[u8] = b"cell/";
/// The key of the store's format version (a `u32`).
pub(crate) const FORMAT_KEY: &[u8] = b"meta/format";
/// The key of the number of the last completed save (a `u64`).
pub(crate) const GENERATION_KEY: &[u8] = b"meta/generation";

pub(crate) fn cell_key(name: &str) -> Vec<u8> {
    [CELL_PREFIX, name.as_bytes()].concat()
}

/// Returns the cell name of a cell record's key, or `None` for other keys.
pub(crate) fn cell_name(key: &[u8]) -> Option<&str> {
    key.strip_prefix(CELL_PREFIX).and_then(|name| std::str::from_utf8(name).ok())
}

pub(crate) fn u32_bytes(n: u32) -> [u8; 4] {
    n.to_be_bytes()
}

pub(crate) fn u64_bytes(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

pub(crate) fn read_u32(bytes: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(bytes.try_into().ok()?))
}

pub(crate) fn read_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

pub(crate) fn checksum(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// Where a record's value bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Body<'a> {
    /// In the record itself.
    Inline(&'a [u8]),
    /// In value file `id`, which must hold exactly `len` bytes with checksum `crc`.
    File { id: u64, len: u64, crc: u32 },
}

/// A decoded record, borrowing from the record's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record<'a> {
    pub(crate) format: u16,
    pub(crate) schema: u32,
    pub(crate) type_name: &'a str,
    pub(crate) body: Body<'a>,
}

/// Why a record could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RecordFault {
    Truncated,
    Checksum,
    Magic,
    Format(u16),
    Kind(u8),
    TypeName,
    TrailingBytes,
}

impl fmt::Display for RecordFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordFault::Truncated => f.write_str("record is truncated"),
            RecordFault::Checksum => f.write_str("record checksum does not match"),
            RecordFault::Magic => f.write_str("record does not start with the instastate magic"),
            RecordFault::Format(found) => {
                write!(f, "record format v{found} is unknown (this build reads v{FORMAT_VERSION})")
            }
            RecordFault::Kind(kind) => write!(f, "record body kind {kind} is unknown"),
            RecordFault::TypeName => f.write_str("record type name is not UTF-8"),
            RecordFault::TrailingBytes => f.write_str("record has bytes after its body"),
        }
    }
}

impl Record<'_> {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let inline_len = match self.body {
            Body::Inline(bytes) => bytes.len(),
            Body::File { .. } => 0,
        };
        let mut out = Vec::with_capacity(32 + self.type_name.len() + inline_len);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.format.to_be_bytes());
        out.extend_from_slice(&u32_bytes(self.schema));
        let type_name = stored_type_name(self.type_name);
        out.extend_from_slice(&u16::try_from(type_name.len()).unwrap_or(u16::MAX).to_be_bytes());
        out.extend_from_slice(type_name.as_bytes());
        match self.body {
            Body::Inline(bytes) => {
                out.push(KIND_INLINE);
                // Inline bodies are at most `INLINE_MAX` bytes, far below `u32::MAX`.
                out.extend_from_slice(&u32_bytes(u32::try_from(bytes.len()).unwrap_or(u32::MAX)));
                out.extend_from_slice(bytes);
            }
            Body::File { id, len, crc } => {
                out.push(KIND_FILE);
                out.extend_from_slice(&u64_bytes(id));
                out.extend_from_slice(&u64_bytes(len));
                out.extend_from_slice(&u32_bytes(crc));
            }
        }
        let crc = checksum(&out);
        out.extend_from_slice(&u32_bytes(crc));
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Record<'_>, RecordFault> {
        let (content, crc) = bytes.split_last_chunk::<4>().ok_or(RecordFault::Truncated)?;
        if checksum(content) != u32::from_be_bytes(*crc) {
            return Err(RecordFault::Checksum);
        }
        let mut cursor = Cursor(content);
        if cursor.take::<2>()? != MAGIC {
            return Err(RecordFault::Magic);
        }
        let format = u16::from_be_bytes(cursor.take()?);
        if format != FORMAT_VERSION {
            return Err(RecordFault::Format(format));
        }
        let schema = u32::from_be_bytes(cursor.take()?);
        let type_len = u16::from_be_bytes(cursor.take()?);
        let type_name = std::str::from_utf8(cursor.take_slice(usize::from(type_len))?)
            .map_err(|_| RecordFault::TypeName)?;
        let body = match cursor.take::<1>()? {
            [KIND_INLINE] => {
                let len = u32::from_be_bytes(cursor.take()?);
                let len = usize::try_from(len).map_err(|_| RecordFault::Truncated)?;
                Body::Inline(cursor.take_slice(len)?)
            }
            [KIND_FILE] => Body::File {
                id: u64::from_be_bytes(cursor.take()?),
                len: u64::from_be_bytes(cursor.take()?),
                crc: u32::from_be_bytes(cursor.take()?),
            },
            [kind] => return Err(RecordFault::Kind(kind)),
        };
        if !cursor.0.is_empty() {
            return Err(RecordFault::TrailingBytes);
        }
        Ok(Record { format, schema, type_name, body })
    }
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], RecordFault> {
        let (head, rest) = self.0.split_first_chunk::<N>().ok_or(RecordFault::Truncated)?;
        self.0 = rest;
        Ok(*head)
    }

    fn take_slice(&mut self, len: usize) -> Result<&'a [u8], RecordFault> {
        let (head, rest) = self.0.split_at_checked(len).ok_or(RecordFault::Truncated)?;
        self.0 = rest;
        Ok(head)
    }
}

/// A type name as records store it: cut to fit its 16-bit length field.
/// Loads compare the cell's type name in this form too, so a cut name still matches.
pub(crate) fn stored_type_name(type_name: &str) -> &str {
    truncate_to_char_boundary(type_name, usize::from(u16::MAX))
}

fn truncate_to_char_boundary(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(body: Body<'_>) -> Record<'_> {
        Record { format: FORMAT_VERSION, schema: 3, type_name: "alloc::string::String", body }
    }

    #[test]
    fn inline_record_round_trips() {
        let record = sample(Body::Inline(b"hello"));
        let bytes = record.encode();
        assert_eq!(Record::decode(&bytes), Ok(record));
    }

    #[test]
    fn file_record_round_trips() {
        let record = sample(Body::File { id: 7, len: 1 << 40, crc: 0xdead_beef });
        let bytes = record.encode();
        assert_eq!(Record::decode(&bytes), Ok(record));
    }

    #[test]
    fn every_truncation_is_detected() {
        let bytes = sample(Body::Inline(b"some value bytes")).encode();
        for len in 0..bytes.len() {
            let res = Record::decode(bytes.get(..len).unwrap_or_default());
            assert!(res.is_err(), "a record cut to {len} bytes decoded");
        }
    }

    #[test]
    fn every_bit_flip_is_detected() {
        let bytes = sample(Body::Inline(b"some value bytes")).encode();
        for bit in 0..bytes.len() * 8 {
            let mut flipped = bytes.clone();
            if let Some(byte) = flipped.get_mut(bit / 8) {
                *byte ^= 1 << (bit % 8);
            }
            assert!(Record::decode(&flipped).is_err(), "flipping bit {bit} went unnoticed");
        }
    }

    #[test]
    fn unknown_format_is_reported() {
        let mut record = sample(Body::Inline(b""));
        record.format = 9;
        assert_eq!(Record::decode(&record.encode()), Err(RecordFault::Format(9)));
    }

    #[test]
    fn keys_round_trip_and_sort_big_endian() {
        assert_eq!(cell_name(&cell_key("app::COUNTER")), Some("app::COUNTER"));
        assert_eq!(cell_name(GENERATION_KEY), None);
        assert!(u64_bytes(255) < u64_bytes(256));
        assert_eq!(read_u64(&u64_bytes(42)), Some(42));
        assert_eq!(read_u32(&[1, 2]), None);
    }

    #[test]
    fn long_type_names_are_cut_at_a_char_boundary() {
        let long = "é".repeat(40_000);
        let bytes = sample(Body::Inline(b"")).encode();
        assert!(Record::decode(&bytes).is_ok());
        let record = Record { type_name: &long, ..sample(Body::Inline(b"")) };
        let decoded_bytes = record.encode();
        let decoded = Record::decode(&decoded_bytes).map(|it| it.type_name.len());
        assert_eq!(decoded, Ok(65_534));
    }
}
