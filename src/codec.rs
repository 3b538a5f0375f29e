//! The on-disk record format: keys, record framing, checksums and byte order.
//!
//! Every byte layout instastate writes is defined here and nowhere else, so that
//! `ARCHITECTURE.md` and this file are the whole format specification.
//!
//! A record is:
//!
//! ```text
//! magic "IS" | format u16 | schema u32 | [generation u64 | saved_at_ms u64]  (formats 2 and 3)
//!            | type_len u16 | type_name | [shape u32]  (format 3) | kind u8 | body | crc32 u32
//! body, kind 0 (inline): len u32 | bytes
//! body, kind 1 (file):   file_id u64 | len u64 | crc32 u32 of the file's bytes
//! ```
//!
//! `shape` is the CRC-32 of the encoded structure of the value's type (`shape.rs`),
//! 0 when the type could not be traced; the structure itself is stored once under
//! `shape/<crc32 u32>` (split over `shape/<crc32>/<n u32>` past 4 KiB, as manifests).
//!
//! A history manifest (key `hist/<generation u64>`) lists what one save changed, with
//! the record each changed key held before it (its pre-image):
//!
//! ```text
//! magic "IH" | format u16 | generation u64 | saved_at_ms u64 | count u32
//!            | count × (name_len u16 | name | has_pre u8 | [pre_len u32 | pre bytes]) | crc32 u32
//! ```
//!
//! The list of cells the last saving program had (key `meta/claimed`):
//!
//! ```text
//! magic "IC" | count u32 | count × (name_len u16 | name) | crc32 u32
//! ```
//!
//! The witness file (`witness`, beside the engine) holds two slots, at offsets 0 and
//! 512, each of which records one acknowledged save; a save writes the slot of its
//! generation's parity, so a torn write leaves the other:
//!
//! ```text
//! magic "IW" | version u8 | 0 u8 | generation u64 | records u64 | digest u64 | crc32 u32
//! ```
//!
//! `records` counts the cell records the save left, and `digest` is the XOR of
//! [`record_hash`] over them: together they tell whether the engine holds exactly
//! what that save left.
//!
//! All integers are big-endian, and each final checksum covers every byte before it.
//! In an encrypted store, records (and pre-images) are sealed as a whole; see `crypt.rs`.

use std::fmt;

/// The record format this build writes; it also reads formats 1 and 2.
pub(crate) const FORMAT_VERSION: u16 = 3;
/// Records with a generation and a save time, and no shape.
pub(crate) const FORMAT_V2: u16 = 2;
/// The store format this build writes (`meta/format`): 3 is format 2 with a witness
/// file. It reads formats 1 and 2 too, and gives them a witness.
pub(crate) const STORE_FORMAT: u32 = 3;
/// The first format, written by instastate 0.1's first release: no history, and
/// records without generation and time.
pub(crate) const FORMAT_V1: u16 = 1;

/// Values whose encoding is longer than this are written to a value file of their own.
///
/// sled writes any tree node larger than a quarter of its 512 KiB segment to a separate
/// blob file without ever fsyncing it, and splits leaves only above 16 entries.
/// Keeping records this small keeps every leaf well under that limit, so all of our
/// records live in sled's log, which we do fsync.
pub(crate) const INLINE_MAX: usize = 4 * 1024;

const MAGIC: [u8; 2] = *b"IS";
/// The format of history manifests.
const MANIFEST_FORMAT: u16 = 2;
const MANIFEST_MAGIC: [u8; 2] = *b"IH";
const CLAIMED_MAGIC: [u8; 2] = *b"IC";
const KIND_INLINE: u8 = 0;
const KIND_FILE: u8 = 1;

/// The prefix of every cell record's key; the cell's name follows it.
pub(crate) const CELL_PREFIX: &[u8] = b"cell/";
/// The key of the store's format version (a `u32`).
pub(crate) const FORMAT_KEY: &[u8] = b"meta/format";
/// The key of the number of the last completed save (a `u64`).
pub(crate) const GENERATION_KEY: &[u8] = b"meta/generation";
/// The key of the names of the cells of the programs that saved, as one list: what
/// stores kept before each claimed name had a key of its own ([`claim_key`]).
pub(crate) const CLAIMED_KEY: &[u8] = b"meta/claimed";
/// The prefix of the key that marks a name as claimed by some program's cell.
pub(crate) const CLAIM_PREFIX: &[u8] = b"claim/";
/// The key of the sealed check value of an encrypted store.
pub(crate) const KEYCHECK_KEY: &[u8] = b"meta/keycheck";
/// The prefix of the keys of the types' structures; a CRC-32 follows it.
pub(crate) const SHAPE_PREFIX: &[u8] = b"shape/";
/// The longest cell name, in bytes: keys stay small, and a journaled cell's
/// directory name (escaped, three bytes for one at worst) short enough.
pub(crate) const MAX_NAME: usize = 1024;
/// The prefix of every history manifest's key; the generation follows it.
pub(crate) const HISTORY_PREFIX: &[u8] = b"hist/";

pub(crate) fn history_key(generation: u64) -> Vec<u8> {
    [HISTORY_PREFIX, &u64_bytes(generation)].concat()
}

/// A manifest longer than this is split over several keys. Like inline records
/// (see [`INLINE_MAX`]), chunks must stay small enough that no sled leaf, which
/// holds up to 16 of them, reaches the size at which sled moves it to a blob file.
pub(crate) const MANIFEST_CHUNK: usize = INLINE_MAX;

/// The key of chunk `chunk` (from 1) of the manifest of save `generation`.
pub(crate) fn history_chunk_key(generation: u64, chunk: u32) -> Vec<u8> {
    chunk_key(&history_key(generation), chunk)
}

/// The key of chunk `chunk` (from 1) of a value split over keys from `key`.
fn chunk_key(key: &[u8], chunk: u32) -> Vec<u8> {
    [key, b"/", &u32_bytes(chunk)].concat()
}

/// The key of the stored structure whose CRC-32 is `crc`.
pub(crate) fn shape_key(crc: u32) -> Vec<u8> {
    [SHAPE_PREFIX, &u32_bytes(crc)].concat()
}

/// Returns the CRC-32 a shape's key names, or `None` for other keys (a shape
/// chunk's key among them).
pub(crate) fn shape_crc(key: &[u8]) -> Option<u32> {
    key.strip_prefix(SHAPE_PREFIX).and_then(read_u32)
}

/// Returns the CRC-32 and chunk number of a shape chunk's key.
pub(crate) fn shape_chunk(key: &[u8]) -> Option<(u32, u32)> {
    let rest = key.strip_prefix(SHAPE_PREFIX)?;
    let (crc, rest) = rest.split_first_chunk::<4>()?;
    Some((u32::from_be_bytes(*crc), read_u32(rest.strip_prefix(b"/")?)?))
}

/// Returns the generation and chunk number of a manifest chunk's key.
pub(crate) fn history_chunk(key: &[u8]) -> Option<(u64, u32)> {
    let rest = key.strip_prefix(HISTORY_PREFIX)?;
    let (generation, rest) = rest.split_first_chunk::<8>()?;
    let chunk = read_u32(rest.strip_prefix(b"/")?)?;
    Some((u64::from_be_bytes(*generation), chunk))
}

/// The label of the manifest of save `generation` in messages.
pub(crate) fn history_label(generation: u64) -> String {
    format!("hist/{generation}")
}

/// Splits an encoded manifest into the values of its keys: see [`split_value`].
pub(crate) fn split_manifest(generation: u64, bytes: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    split_value(&history_key(generation), bytes)
}

/// Splits `bytes` over keys small enough for the engine's log: `key` holds the
/// number of chunks (a `u32`) and the first chunk, and `key/<n u32>` chunk `n`.
pub(crate) fn split_value(key: &[u8], bytes: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let chunks: Vec<&[u8]> = bytes.chunks(MANIFEST_CHUNK).collect();
    // A value of 4 GiB chunks would be 16 PiB: the count fits.
    #[allow(clippy::expect_used)]
    let count = u32::try_from(chunks.len().max(1)).expect("a value's chunks fit a u32");
    let mut out = Vec::with_capacity(chunks.len());
    out.push((
        key.to_vec(),
        [&u32_bytes(count)[..], chunks.first().copied().unwrap_or_default()].concat(),
    ));
    for (n, chunk) in (1..count).zip(chunks.iter().skip(1)) {
        out.push((chunk_key(key, n), chunk.to_vec()));
    }
    out
}

/// Joins a value split by [`split_value`], reading its keys through `get`; `None`
/// when a chunk is missing or the head is cut short.
pub(crate) fn join_value<E>(
    key: &[u8],
    mut get: impl FnMut(&[u8]) -> Result<Option<Vec<u8>>, E>,
) -> Result<Option<Vec<u8>>, E> {
    let Some(head) = get(key)? else { return Ok(None) };
    let Some((chunks, first)) = manifest_head(&head) else { return Ok(None) };
    let mut bytes = first.to_vec();
    for chunk in 1..chunks {
        let Some(part) = get(&chunk_key(key, chunk))? else { return Ok(None) };
        bytes.extend_from_slice(&part);
    }
    Ok(Some(bytes))
}

/// The chunk count and first chunk stored under `hist/<generation>`.
pub(crate) fn manifest_head(bytes: &[u8]) -> Option<(u32, &[u8])> {
    let (count, first) = bytes.split_first_chunk::<4>()?;
    Some((u32::from_be_bytes(*count), first))
}

/// Returns the generation of a history manifest's key, or `None` for other keys.
pub(crate) fn history_generation(key: &[u8]) -> Option<u64> {
    key.strip_prefix(HISTORY_PREFIX).and_then(read_u64)
}

/// The key that marks cell name `name` as claimed; its value is empty.
pub(crate) fn claim_key(name: &str) -> Vec<u8> {
    [CLAIM_PREFIX, name.as_bytes()].concat()
}

/// Returns the cell name a claim key marks, or `None` for other keys.
pub(crate) fn claim_name(key: &[u8]) -> Option<&str> {
    key.strip_prefix(CLAIM_PREFIX).and_then(|name| std::str::from_utf8(name).ok())
}

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

/// Decodes postcard `bytes` as exactly one `T`.
pub(crate) fn decode_exact<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
) -> Result<T, postcard::Error> {
    let (value, rest): (T, &[u8]) = postcard::take_from_bytes(bytes)?;
    if !rest.is_empty() {
        // Trailing bytes mean the bytes were written for another type that happens
        // to share a prefix with this one: refuse rather than misdecode.
        return Err(postcard::Error::DeserializeBadEncoding);
    }
    Ok(value)
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
    /// The save that wrote the record and when (milliseconds since the Unix epoch);
    /// `None` in format 1 records.
    pub(crate) saved: Option<Saved>,
    pub(crate) type_name: &'a str,
    /// The CRC-32 of the structure of the value's type: `None` in formats 1 and 2,
    /// and `Some(0)` for a type that could not be traced.
    pub(crate) shape: Option<u32>,
    pub(crate) body: Body<'a>,
}

/// A cell name too long for a key, or one that holds a byte no name may hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BadName {
    /// The name, cut to its first 80 characters.
    pub(crate) name: String,
    pub(crate) reason: String,
}

impl BadName {
    pub(crate) fn new(name: &str, reason: String) -> BadName {
        BadName { name: name.chars().take(80).collect(), reason }
    }
}

impl fmt::Display for BadName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

/// Refuses a cell name that no key may hold: empty, longer than [`MAX_NAME`], or
/// holding a NUL or another control character.
pub(crate) fn check_name(name: &str) -> Result<(), BadName> {
    if name.is_empty() {
        return Err(BadName::new(name, "the name is empty".into()));
    }
    if MAX_NAME < name.len() {
        let reason =
            format!("the name is {} bytes long, and at most {MAX_NAME} are allowed", name.len());
        return Err(BadName::new(name, reason));
    }
    if let Some(at) = name.char_indices().find_map(|(at, ch)| ch.is_control().then_some(at)) {
        return Err(BadName::new(name, format!("the name holds a control character at byte {at}")));
    }
    Ok(())
}

/// The save that wrote a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Saved {
    pub(crate) generation: u64,
    pub(crate) at_ms: u64,
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
            RecordFault::Format(found) => write!(
                f,
                "record format v{found} is unknown (this build reads v{FORMAT_V1} to v{FORMAT_VERSION})"
            ),
            RecordFault::Kind(kind) => write!(f, "record body kind {kind} is unknown"),
            RecordFault::TypeName => f.write_str("record type name is not UTF-8"),
            RecordFault::TrailingBytes => f.write_str("record has bytes after its body"),
        }
    }
}

impl Record<'_> {
    /// The record's bytes. Its inline body is at most [`INLINE_MAX`] bytes (larger
    /// values go to value files), and its type name is stored cut to fit
    /// ([`stored_type_name`]).
    pub(crate) fn encode(&self) -> Vec<u8> {
        let inline_len = match self.body {
            Body::Inline(bytes) => bytes.len(),
            Body::File { .. } => 0,
        };
        let mut out = Vec::with_capacity(32 + self.type_name.len() + inline_len);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.format.to_be_bytes());
        out.extend_from_slice(&u32_bytes(self.schema));
        if self.format != FORMAT_V1 {
            let saved = self.saved.unwrap_or(Saved { generation: 0, at_ms: 0 });
            out.extend_from_slice(&u64_bytes(saved.generation));
            out.extend_from_slice(&u64_bytes(saved.at_ms));
        }
        let type_name = stored_type_name(self.type_name);
        out.extend_from_slice(&u16::try_from(type_name.len()).unwrap_or(u16::MAX).to_be_bytes());
        out.extend_from_slice(type_name.as_bytes());
        if self.format == FORMAT_VERSION {
            out.extend_from_slice(&u32_bytes(self.shape.unwrap_or(0)));
        }
        match self.body {
            Body::Inline(bytes) => {
                out.push(KIND_INLINE);
                // Inline bodies are at most `INLINE_MAX` bytes (a `ValueWriter` spills
                // anything longer to a value file), far below `u32::MAX`.
                #[allow(clippy::expect_used)]
                let len = u32::try_from(bytes.len()).expect("an inline body is at most 4 KiB");
                out.extend_from_slice(&u32_bytes(len));
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
        let mut cursor = Cursor::checked(bytes, MAGIC)?;
        let format = u16::from_be_bytes(cursor.take()?);
        if ![FORMAT_V1, FORMAT_V2, FORMAT_VERSION].contains(&format) {
            return Err(RecordFault::Format(format));
        }
        let schema = u32::from_be_bytes(cursor.take()?);
        let saved = if format == FORMAT_V1 {
            None
        } else {
            Some(Saved {
                generation: u64::from_be_bytes(cursor.take()?),
                at_ms: u64::from_be_bytes(cursor.take()?),
            })
        };
        let type_len = u16::from_be_bytes(cursor.take()?);
        let type_name = std::str::from_utf8(cursor.take_slice(usize::from(type_len))?)
            .map_err(|_| RecordFault::TypeName)?;
        let shape =
            if format == FORMAT_VERSION { Some(u32::from_be_bytes(cursor.take()?)) } else { None };
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
        cursor.finish()?;
        Ok(Record { format, schema, saved, type_name, shape, body })
    }

    /// How many bytes the value takes, wherever it is.
    pub(crate) fn value_len(&self) -> u64 {
        match self.body {
            Body::Inline(bytes) => bytes.len() as u64,
            Body::File { len, .. } => len,
        }
    }

    /// The value file the record points at, if any.
    pub(crate) fn file(&self) -> Option<u64> {
        match self.body {
            Body::Inline(_) => None,
            Body::File { id, .. } => Some(id),
        }
    }
}

/// One save's entry in the history: which keys it changed, and what they held before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Manifest {
    pub(crate) generation: u64,
    pub(crate) at_ms: u64,
    /// Per changed key: the cell name and its stored record before the save, if any.
    pub(crate) entries: Vec<(String, Option<Vec<u8>>)>,
}

impl Manifest {
    /// The manifest's bytes; a name too long for its length field is refused (one
    /// written by an older version of the program, which did not check names).
    pub(crate) fn encode(&self) -> Result<Vec<u8>, BadName> {
        let mut out = Vec::new();
        out.extend_from_slice(&MANIFEST_MAGIC);
        out.extend_from_slice(&MANIFEST_FORMAT.to_be_bytes());
        out.extend_from_slice(&u64_bytes(self.generation));
        out.extend_from_slice(&u64_bytes(self.at_ms));
        put_count(&mut out, self.entries.len());
        for (name, pre) in &self.entries {
            put_name(&mut out, name)?;
            match pre {
                None => out.push(0),
                Some(bytes) => {
                    out.push(1);
                    // A record is at most a few KiB: its inline body at most 4 KiB.
                    put_count(&mut out, bytes.len());
                    out.extend_from_slice(bytes);
                }
            }
        }
        let crc = checksum(&out);
        out.extend_from_slice(&u32_bytes(crc));
        Ok(out)
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Manifest, RecordFault> {
        let mut cursor = Cursor::checked(bytes, MANIFEST_MAGIC)?;
        let format = u16::from_be_bytes(cursor.take()?);
        if format != MANIFEST_FORMAT {
            return Err(RecordFault::Format(format));
        }
        let generation = u64::from_be_bytes(cursor.take()?);
        let at_ms = u64::from_be_bytes(cursor.take()?);
        let count = u32::from_be_bytes(cursor.take()?);
        let mut entries = Vec::new();
        for _ in 0..count {
            let name = cursor.take_name()?;
            let pre = match cursor.take::<1>()? {
                [0] => None,
                [1] => {
                    let len = u32::from_be_bytes(cursor.take()?);
                    let len = usize::try_from(len).map_err(|_| RecordFault::Truncated)?;
                    Some(cursor.take_slice(len)?.to_vec())
                }
                [kind] => return Err(RecordFault::Kind(kind)),
            };
            entries.push((name, pre));
        }
        cursor.finish()?;
        Ok(Manifest { generation, at_ms, entries })
    }
}

/// Encodes the list of cell names stored under [`CLAIMED_KEY`], as stores kept it
/// before each claim had a key of its own.
#[cfg(any(test, feature = "fuzz"))]
pub(crate) fn encode_claimed<'a>(
    names: impl ExactSizeIterator<Item = &'a str>,
) -> Result<Vec<u8>, BadName> {
    let mut out = Vec::new();
    out.extend_from_slice(&CLAIMED_MAGIC);
    put_count(&mut out, names.len());
    for name in names {
        put_name(&mut out, name)?;
    }
    let crc = checksum(&out);
    out.extend_from_slice(&u32_bytes(crc));
    Ok(out)
}

pub(crate) fn decode_claimed(bytes: &[u8]) -> Result<Vec<String>, RecordFault> {
    let mut cursor = Cursor::checked(bytes, CLAIMED_MAGIC)?;
    let count = u32::from_be_bytes(cursor.take()?);
    let mut names = Vec::new();
    for _ in 0..count {
        names.push(cursor.take_name()?);
    }
    cursor.finish()?;
    Ok(names)
}

/// Appends `name` with its length as a `u16`; a longer name is refused, never cut.
fn put_name(out: &mut Vec<u8>, name: &str) -> Result<(), BadName> {
    let len = u16::try_from(name.len()).map_err(|_| {
        BadName::new(name, format!("the name is {} bytes long, past what a key holds", name.len()))
    })?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    Ok(())
}

/// Appends a count or length as a `u32`.
fn put_count(out: &mut Vec<u8>, count: usize) {
    // Counts of cells and lengths of records: far below 4 Gi.
    #[allow(clippy::expect_used)]
    let count = u32::try_from(count).expect("a count of cells or a record's length fits a u32");
    out.extend_from_slice(&u32_bytes(count));
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    /// A cursor over `bytes` without its checksum, once the checksum and `magic` match.
    fn checked(bytes: &'a [u8], magic: [u8; 2]) -> Result<Cursor<'a>, RecordFault> {
        let (content, crc) = bytes.split_last_chunk::<4>().ok_or(RecordFault::Truncated)?;
        if checksum(content) != u32::from_be_bytes(*crc) {
            return Err(RecordFault::Checksum);
        }
        let mut cursor = Cursor(content);
        if cursor.take::<2>()? != magic {
            return Err(RecordFault::Magic);
        }
        Ok(cursor)
    }

    fn finish(self) -> Result<(), RecordFault> {
        if self.0.is_empty() { Ok(()) } else { Err(RecordFault::TrailingBytes) }
    }

    fn take_name(&mut self) -> Result<String, RecordFault> {
        let len = u16::from_be_bytes(self.take()?);
        let name = self.take_slice(usize::from(len))?;
        String::from_utf8(name.to_vec()).map_err(|_| RecordFault::TypeName)
    }

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

/// The hash of one stored record, `key` holding `bytes`, for the witness's digest.
pub(crate) fn record_hash(key: &[u8], bytes: &[u8]) -> u64 {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    hasher.update(&u64_bytes(key.len() as u64));
    hasher.update(key);
    hasher.update(bytes);
    hasher.digest()
}

/// The cell records of a store, summed up: how many, and the XOR of their hashes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Digest {
    pub(crate) records: u64,
    pub(crate) xor: u64,
}

impl Digest {
    /// Adds (or, again, removes) the record of cell `name` holding `bytes`.
    pub(crate) fn toggle(&mut self, name: &str, bytes: &[u8], add: bool) {
        self.xor ^= record_hash(&cell_key(name), bytes);
        self.records =
            if add { self.records.wrapping_add(1) } else { self.records.wrapping_sub(1) };
    }
}

/// One slot of the witness file: the last acknowledged save, as far as it knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Witness {
    pub(crate) generation: u64,
    pub(crate) digest: Digest,
}

const WITNESS_MAGIC: [u8; 2] = *b"IW";
const WITNESS_VERSION: u8 = 1;
/// The length of one witness slot.
pub(crate) const WITNESS_LEN: usize = 32;
/// Where each of the two slots of the witness file starts.
pub(crate) const WITNESS_SLOTS: [u64; 2] = [0, 512];

impl Witness {
    pub(crate) fn encode(&self) -> [u8; WITNESS_LEN] {
        let mut out = Vec::with_capacity(WITNESS_LEN);
        out.extend_from_slice(&WITNESS_MAGIC);
        out.extend_from_slice(&[WITNESS_VERSION, 0]);
        out.extend_from_slice(&u64_bytes(self.generation));
        out.extend_from_slice(&u64_bytes(self.digest.records));
        out.extend_from_slice(&u64_bytes(self.digest.xor));
        out.extend_from_slice(&u32_bytes(checksum(&out)));
        let mut slot = [0; WITNESS_LEN];
        for (to, from) in slot.iter_mut().zip(out) {
            *to = from;
        }
        slot
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Witness, RecordFault> {
        let mut cursor = Cursor::checked(bytes, WITNESS_MAGIC)?;
        match cursor.take::<2>()? {
            [WITNESS_VERSION, 0] => {}
            [version, _] => return Err(RecordFault::Format(u16::from(version))),
        }
        let generation = u64::from_be_bytes(cursor.take()?);
        let records = u64::from_be_bytes(cursor.take()?);
        let xor = u64::from_be_bytes(cursor.take()?);
        cursor.finish()?;
        Ok(Witness { generation, digest: Digest { records, xor } })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(body: Body<'_>) -> Record<'_> {
        Record {
            format: FORMAT_VERSION,
            schema: 3,
            saved: Some(Saved { generation: 9, at_ms: 1_700_000_000_000 }),
            type_name: "alloc::string::String",
            shape: Some(0xabcd_1234),
            body,
        }
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
    fn format_1_records_still_decode() {
        let record =
            Record { format: FORMAT_V1, saved: None, shape: None, ..sample(Body::Inline(b"v1")) };
        assert_eq!(Record::decode(&record.encode()), Ok(record));
        let record = Record { format: FORMAT_V2, shape: None, ..sample(Body::Inline(b"v2")) };
        assert_eq!(Record::decode(&record.encode()), Ok(record));
    }

    #[test]
    fn manifests_round_trip_and_detect_damage() {
        let manifest = Manifest {
            generation: 12,
            at_ms: 34,
            entries: vec![("a".into(), None), ("b".into(), Some(b"record".to_vec()))],
        };
        let bytes = manifest.encode().expect("short names");
        assert_eq!(Manifest::decode(&bytes), Ok(manifest));
        for len in 0..bytes.len() {
            assert!(Manifest::decode(bytes.get(..len).unwrap_or_default()).is_err());
        }
        // A name too long for its length field is refused, never cut.
        let long = Manifest { generation: 1, at_ms: 0, entries: vec![("x".repeat(70_000), None)] };
        assert!(long.encode().is_err());
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("app::COUNTER").is_ok());
        assert!(check_name(&"é".repeat(512)).is_ok());
        for bad in ["", "a\0b", "line\nbreak", &"x".repeat(MAX_NAME + 1)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn split_values_join_back() {
        for len in [0, 1, MANIFEST_CHUNK, MANIFEST_CHUNK + 1, 3 * MANIFEST_CHUNK + 7] {
            let bytes: Vec<u8> = (0..len).map(|it| u8::try_from(it % 251).unwrap_or(0)).collect();
            let parts: std::collections::BTreeMap<Vec<u8>, Vec<u8>> =
                split_value(b"shape/abcd", &bytes).into_iter().collect();
            let joined = join_value(b"shape/abcd", |key| Ok::<_, ()>(parts.get(key).cloned()));
            assert_eq!(joined, Ok(Some(bytes)), "{len}");
        }
    }

    #[test]
    fn claimed_lists_round_trip() {
        let bytes = encode_claimed(["x", "y::Z"].into_iter()).expect("short names");
        assert_eq!(decode_claimed(&bytes), Ok(vec!["x".to_owned(), "y::Z".to_owned()]));
        assert_eq!(history_generation(&history_key(77)), Some(77));
        assert_eq!(history_generation(&history_chunk_key(77, 2)), None);
        assert_eq!(history_chunk(&history_chunk_key(77, 2)), Some((77, 2)));
        let long = vec![7u8; 2 * MANIFEST_CHUNK + 5];
        let parts = split_manifest(9, &long);
        assert_eq!(parts.len(), 3);
        let head = parts.first().and_then(|(_, first)| manifest_head(first));
        assert_eq!(head.map(|(count, first)| (count, first.len())), Some((3, MANIFEST_CHUNK)));
        assert!(history_key(255) < history_key(256));
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
