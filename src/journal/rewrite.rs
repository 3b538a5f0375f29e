//! Rewriting a journal file that the writer no longer appends to: the events a
//! caller changes are framed (and sealed) anew, every other frame is copied as it
//! is, and the new file replaces the old one atomically. For an event store's
//! compaction.
//!
//! The new file is written beside the old one (`<name>.part`), synced, renamed over
//! it, and the directory synced: a crash at any point leaves the old file or the
//! new one, whole (a `.part` file left behind is removed by the next opening).
//! Both hold the same events with the same numbers and timestamps, so that
//! recovery, scans and readers go through either alike. A reader that has the old
//! file open goes on reading it (its bytes stay until the reader closes it); the
//! frames' offsets differ between the two, which the event store's locator allows
//! for.
//!
//! **Invariant:** only a file that a later file follows is rewritten: the writer
//! appends to the last file only (to a file before it, at most the link to the
//! next, which the new file carries anyway).

use std::{
    collections::BTreeSet,
    io::Write,
    path::{Path, PathBuf},
};

use super::{
    event_aad,
    format::{self, Frame, Read},
    recovery::{self, check_sealed},
    scan::read_header,
};
use crate::{
    Error, Result,
    crypt::Sealer,
    io::{Io, IoFile, Open, PART_SUFFIX},
};

/// Bytes read from the old file, and written to the new one, at a time.
const CHUNK: usize = 1 << 20;

/// What gives an event's new bytes, from its number and opened bytes (`None`:
/// kept as it is), or why the bytes are damaged.
pub(crate) type Change<'a> = dyn FnMut(u64, &[u8]) -> Result<Option<Vec<u8>>, String> + 'a;

/// What picks the events to change, from their number and opened bytes, or says
/// why the bytes are damaged.
pub(crate) type Pick<'a> = dyn FnMut(u64, &[u8]) -> Result<bool, String> + 'a;

/// A journal file to rewrite.
pub(crate) struct Target<'a> {
    pub(crate) io: &'a Io,
    pub(crate) sealer: &'a Sealer,
    /// The file, named after its first event, `first`.
    pub(crate) path: &'a Path,
    pub(crate) first: u64,
    /// The first event of the file after it, where the journal goes on.
    pub(crate) next: u64,
    /// What the new file's header records in its otherwise unused field (0 in a
    /// file never rewritten): nonzero, so that readers can tell a rewritten file.
    pub(crate) stamp: u64,
}

/// A file rewritten.
#[derive(Debug)]
pub(crate) struct Rewritten {
    /// The offset of each event's frame in the new file, from its first event on.
    pub(crate) offsets: Vec<u64>,
    /// The file's length before and after.
    pub(crate) before: u64,
    pub(crate) after: u64,
}

/// Rewrites `target`: each event whose opened bytes `pick` picks goes through
/// `change`, which gives its new bytes (`None`: kept as it is). Returns `None`,
/// writing nothing, when `pick` picks no event.
///
/// # Errors
/// [`Error::JournalCorrupt`] for damage in the file (nothing is written then);
/// [`Error::Encryption`] or [`Error::WrongKey`] for a file sealed otherwise;
/// [`Error::Io`]; and the errors of `pick` and `change`.
pub(crate) fn rewrite(
    target: &Target<'_>,
    pick: &mut Pick<'_>,
    change: &mut Change<'_>,
) -> Result<Option<Rewritten>> {
    let (io, path) = (target.io, target.path);
    let old = io.open(path, Open::Read).map_err(Error::io(path))?;
    let (header, header_len) = read_header(&old, path)?;
    check_sealed(&header, path, target.sealer)?;
    if header.events != target.first {
        let reason = format!(
            "the header says the file starts at event {}, its name says {}",
            header.events, target.first
        );
        return Err(corrupt(path, 0, reason));
    }
    // First the events to change: a file with none is left as it is.
    let mut picked = BTreeSet::new();
    let mut frames = Frames::new(&old, path, header_len as u64, target.first)?;
    while let Some(found) = frames.next()? {
        if let Found::Event { seq, stored, offset, .. } = found {
            let plain = recovery::open_event(target.sealer, seq, stored)
                .map_err(|reason| corrupt(path, offset, reason))?;
            let damaged = |reason| corrupt(path, offset, format!("event {seq}: {reason}"));
            if pick(seq, &plain).map_err(damaged)? {
                picked.insert(seq);
            }
        }
    }
    if picked.is_empty() {
        return Ok(None);
    }
    let before = old.len().map_err(Error::io(path))?;
    let part = PathBuf::from(format!("{}{PART_SUFFIX}", path.display()));
    let res = write_new(target, &old, header_len as u64, &header, &part, &picked, change);
    let (offsets, after) = match res {
        Ok(written) => written,
        Err(err) => {
            // Nothing relies on it; the next opening removes it if this cannot.
            let _ = io.remove_file(&part);
            return Err(err);
        }
    };
    io.rename(&part, path).map_err(Error::io(path))?;
    let dir = crate::io::parent_of(path);
    io.sync_dir(dir).map_err(Error::io(dir))?;
    Ok(Some(Rewritten { offsets, before, after }))
}

/// Writes the new file at `part`, synced: the old file's frames after its header,
/// the picked events changed, and a link to the next file. Returns the offsets of
/// its events' frames and its length.
fn write_new(
    target: &Target<'_>,
    old: &IoFile,
    start: u64,
    header: &format::Header,
    part: &Path,
    picked: &BTreeSet<u64>,
    change: &mut Change<'_>,
) -> Result<(Vec<u64>, u64)> {
    let (io, path) = (target.io, target.path);
    let mut new = io.open(part, Open::Create).map_err(Error::io(part))?;
    let header = format::Header { at: target.stamp, ..header.clone() };
    let mut out = header.encode();
    let mut written = 0u64;
    let mut offsets = Vec::new();
    let mut frames = Frames::new(old, path, start, target.first)?;
    while let Some(found) = frames.next()? {
        let offset = written + out.len() as u64;
        match found {
            Found::Event { seq, at, stored, whole, offset: old_offset } => {
                offsets.push(offset);
                let changed = if picked.contains(&seq) {
                    let plain = recovery::open_event(target.sealer, seq, stored)
                        .map_err(|reason| corrupt(path, old_offset, reason))?;
                    change(seq, &plain).map_err(|reason| {
                        corrupt(path, old_offset, format!("event {seq}: {reason}"))
                    })?
                } else {
                    None
                };
                match changed {
                    Some(plain) => {
                        let sealer = target.sealer;
                        let stored = if sealer.is_on() {
                            sealer.seal(&event_aad(seq), plain)
                        } else {
                            plain
                        };
                        format::put_event(&mut out, seq, at, &stored);
                    }
                    None => out.extend_from_slice(whole),
                }
            }
            // The new file gets a link of its own, at its end.
            Found::Link => {}
            Found::Other { whole } => out.extend_from_slice(whole),
        }
        if CHUNK <= out.len() {
            new.write_all(&out).map_err(Error::io(part))?;
            written += out.len() as u64;
            out.clear();
        }
    }
    // Version 1 files have no links.
    if header.version != format::FORMAT_V1 {
        format::put_link(&mut out, target.next);
    }
    new.write_all(&out).map_err(Error::io(part))?;
    written += out.len() as u64;
    new.sync_all().map_err(Error::io(part))?;
    Ok((offsets, written))
}

/// A frame of the old file.
enum Found<'a> {
    /// An event, its frame at `offset` of the old file.
    Event {
        seq: u64,
        at: u64,
        stored: &'a [u8],
        whole: &'a [u8],
        offset: u64,
    },
    Link,
    Other {
        whole: &'a [u8],
    },
}

/// Reads the frames of a journal file in order, a chunk at a time.
struct Frames<'a> {
    handle: &'a IoFile,
    path: &'a Path,
    len: u64,
    /// The offset of the frame being read, and of the one after it.
    offset: u64,
    next_offset: u64,
    buf: Vec<u8>,
    buf_start: u64,
    /// The number the next event must have.
    next_seq: u64,
}

impl<'a> Frames<'a> {
    fn new(handle: &'a IoFile, path: &'a Path, start: u64, first: u64) -> Result<Frames<'a>> {
        let len = handle.len().map_err(Error::io(path))?;
        Ok(Frames {
            handle,
            path,
            len,
            offset: start,
            next_offset: start,
            buf: Vec::new(),
            buf_start: start,
            next_seq: first,
        })
    }

    /// The next frame, or `None` at the end of the file (or at a torn link there).
    fn next(&mut self) -> Result<Option<Found<'_>>> {
        self.offset = self.next_offset;
        self.fill(format::FRAME_HEAD)?;
        let declared = self
            .rest()
            .first_chunk::<4>()
            .map_or(0, |len| u32::from_le_bytes(*len).min(format::MAX_PAYLOAD));
        self.fill(format::FRAME_HEAD + declared as usize)?;
        let offset = self.offset;
        let left = self.len.saturating_sub(offset);
        let (seq, used) = match format::read_frame(self.rest()) {
            Read::End => return Ok(None),
            // The link at the end of a file before the last is not synced: a crash
            // may tear it, and nothing is lost with it (recovery's judgement).
            Read::Bad(_)
                if left <= format::LINK_LEN as u64 && format::looks_torn(self.rest(), 0) =>
            {
                return Ok(None);
            }
            Read::Bad(reason) => return Err(corrupt(self.path, offset, reason.to_owned())),
            Read::Frame(Frame::Event { seq, .. }, used) => (Some(seq), used),
            Read::Frame(_, used) => (None, used),
        };
        if let Some(seq) = seq {
            if seq != self.next_seq {
                let reason = format!("event {seq} stands where event {} belongs", self.next_seq);
                return Err(corrupt(self.path, offset, reason));
            }
            self.next_seq += 1;
        }
        self.next_offset = offset + used as u64;
        let whole = self.rest().get(..used).unwrap_or_default();
        Ok(Some(match format::parse_frame(whole) {
            Some((Frame::Event { seq, at, bytes }, _)) => {
                Found::Event { seq, at, stored: bytes, whole, offset }
            }
            Some((Frame::Link { .. }, _)) => Found::Link,
            _ => Found::Other { whole },
        }))
    }

    /// The bytes from the current frame on that the buffer holds.
    fn rest(&self) -> &[u8] {
        let skip =
            usize::try_from(self.offset.saturating_sub(self.buf_start)).unwrap_or(usize::MAX);
        self.buf.get(skip..).unwrap_or_default()
    }

    /// Makes the buffer hold `need` bytes from the current frame on, or as many as
    /// the file has: never more, so that a damaged length allocates nothing.
    fn fill(&mut self, need: usize) -> Result<()> {
        if self.buf_start <= self.offset && need <= self.rest().len() {
            return Ok(());
        }
        let left = usize::try_from(self.len.saturating_sub(self.offset)).unwrap_or(usize::MAX);
        let want = need.max(CHUNK).min(left);
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        buf.resize(want, 0);
        let n = self.handle.read_at(&mut buf, self.offset).map_err(Error::io(self.path))?;
        buf.truncate(n);
        self.buf = buf;
        self.buf_start = self.offset;
        Ok(())
    }
}

fn corrupt(path: &Path, offset: u64, reason: String) -> Error {
    Error::JournalCorrupt { path: path.to_path_buf(), offset, reason }
}
