//! Reading a journal's frames in order without taking its lock and without changing
//! anything: for readers of a directory that a running program may be appending to
//! (`instastate follow`), and for checks that go through every frame (`instastate
//! verify` of an event store).
//!
//! Only whole frames whose checksums hold are read. Bytes at the end of the last file
//! that are not such a frame are, while a program may be appending
//! ([`Tail::Live`]), a write not finished yet: the scanner says [`Step::Pending`] and
//! reads them again when asked for the next step. Once nobody appends
//! ([`Tail::Settled`], the reader holds a shared lock) they are a torn write if
//! recovery would take them for one (and cut them), and damage otherwise. New journal
//! files are followed as they appear; a file the scanner needs that disappears is
//! [`Error::JournalChanged`].
//!
//! The writer never appends to a journal file once the next one exists (it starts
//! the next file after syncing the last, and only then writes the last one's link),
//! so a reader at the end of a file that sees a later file reads the rest of its
//! file once more and then goes on in the later one.

use std::path::{Path, PathBuf};

use super::{
    Timestamp,
    format::{self, Frame, Header, HeaderFault, Read},
    recovery::{self, check_sealed},
};
use crate::{
    Error, Result,
    crypt::Sealer,
    io::{Io, IoFile, Open},
    lockfile::End,
};

/// Bytes read at a time.
const CHUNK: usize = 256 * 1024;

/// Whether a program may be appending to the journal while it is scanned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tail {
    /// It may: an unfinished frame at the end is not written yet.
    Live,
    /// Nobody appends: an unfinished frame at the end is a torn write or damage.
    Settled {
        /// Where the journal ended when it was closed cleanly, if it was: then no
        /// write can have been torn.
        clean: Option<End>,
    },
}

/// Where a scan starts.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Start {
    /// The first event wanted: the ones before it are read and checked, not returned.
    pub(crate) from: u64,
    /// Where the frame of an event at or before `from` is: its file (by first event),
    /// offset and number. Without it, the scan starts at the beginning of the file
    /// holding `from`.
    pub(crate) at: Option<(u64, u64, u64)>,
}

/// An event read by a scan.
#[derive(Debug, Clone)]
pub(crate) struct Scanned {
    pub(crate) seq: u64,
    pub(crate) at: Timestamp,
    /// Its encoded bytes, opened when the journal is sealed.
    pub(crate) plain: Vec<u8>,
    /// Its journal file (by first event), and its frame's offset there.
    pub(crate) file: u64,
    pub(crate) offset: u64,
}

/// What a scan found next.
#[derive(Debug)]
pub(crate) enum Step {
    Event(Scanned),
    /// Events `first..=last` were voided: written, and never applied.
    Void {
        first: u64,
        last: u64,
    },
    /// Nothing more for now: the end of the journal as it is, or (while a program
    /// appends) an unfinished frame.
    Pending,
}

/// A torn last write found once nobody appends: where, and how many bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Torn {
    pub(crate) path: PathBuf,
    pub(crate) offset: u64,
    pub(crate) bytes: u64,
}

/// Reads a journal's frames in order; see the module documentation.
pub(crate) struct Scanner {
    io: Io,
    dir: PathBuf,
    sealer: Sealer,
    tail: Tail,
    start: Start,
    file: Option<Current>,
    /// The number the next event's frame must carry.
    next: u64,
    /// The header of the first file read: every later one must agree with it.
    header: Option<Header>,
    torn: Option<Torn>,
}

/// The journal file being read.
struct Current {
    first: u64,
    path: PathBuf,
    handle: IoFile,
    /// The offset of the next frame.
    offset: u64,
    /// Bytes of the file from `buf_start` on.
    buf: Vec<u8>,
    buf_start: u64,
    /// The link frame read in it: the file the journal goes on in, and its offset.
    link: Option<(u64, u64)>,
    /// Its end was judged (a torn link after which a later file goes on): nothing
    /// more is read from it.
    finished: bool,
}

/// What comes after the end of the current file's frames.
enum After {
    /// The file grew meanwhile: read on in it.
    Stay,
    /// The journal goes on in this file.
    Next(Current),
    Pending,
}

impl Scanner {
    /// A scan of the journal in `dir`, opening sealed events with `sealer`.
    pub(crate) fn new(io: Io, dir: PathBuf, sealer: Sealer, tail: Tail, start: Start) -> Scanner {
        Scanner { io, dir, sealer, tail, start, file: None, next: 0, header: None, torn: None }
    }

    /// The torn last write found, once nobody appends and the scan reached it.
    pub(crate) fn torn(&self) -> Option<&Torn> {
        self.torn.as_ref()
    }

    /// The number the next event will have.
    pub(crate) fn next_seq(&self) -> u64 {
        self.next
    }

    /// The next event or void, or [`Step::Pending`] at the end of what is written.
    ///
    /// # Errors
    /// [`Error::JournalCorrupt`] naming the file and offset of damage;
    /// [`Error::JournalChanged`] when a file it needs disappeared;
    /// [`Error::FormatVersion`], [`Error::Encryption`], [`Error::WrongKey`];
    /// [`Error::Io`].
    pub(crate) fn step(&mut self) -> Result<Step> {
        loop {
            if self.file.is_none() {
                self.file = Some(self.open_first()?);
            }
            let Some(cur) = self.file.as_mut() else { continue };
            if cur.finished {
                match self.after()? {
                    After::Next(next) => self.file = Some(next),
                    After::Stay | After::Pending => return Ok(Step::Pending),
                }
                continue;
            }
            cur.fill(format::FRAME_HEAD)?;
            let declared = cur
                .rest()
                .first_chunk::<4>()
                .map_or(0, |len| u32::from_le_bytes(*len).min(format::MAX_PAYLOAD));
            cur.fill(format::FRAME_HEAD + declared as usize)?;
            let offset = cur.offset;
            match format::read_frame(cur.rest()) {
                Read::Frame(frame, used) => {
                    let found = match frame {
                        Frame::Event { seq, at, bytes } => {
                            if seq != self.next {
                                let reason =
                                    format!("event {seq} stands where event {} belongs", self.next);
                                return Err(corrupt(&cur.path, offset, reason));
                            }
                            self.next += 1;
                            if seq < self.start.from {
                                None
                            } else {
                                let plain = recovery::open_event(&self.sealer, seq, bytes)
                                    .map_err(|reason| corrupt(&cur.path, offset, reason))?
                                    .into_owned();
                                let (file, at) = (cur.first, Timestamp(at));
                                Some(Step::Event(Scanned { seq, at, plain, file, offset }))
                            }
                        }
                        Frame::Void { first, last } => Some(Step::Void { first, last }),
                        Frame::Check { .. } => None,
                        Frame::Link { next } => {
                            cur.link = Some((next, offset));
                            None
                        }
                    };
                    cur.offset += used as u64;
                    if let Some(found) = found {
                        return Ok(found);
                    }
                }
                Read::End => match self.after()? {
                    After::Stay => {}
                    After::Next(next) => self.file = Some(next),
                    After::Pending => return Ok(Step::Pending),
                },
                Read::Bad(reason) => {
                    if let Some(step) = self.judge_bad(reason)? {
                        return Ok(step);
                    }
                }
            }
        }
    }

    /// Opens the file the scan starts in.
    fn open_first(&mut self) -> Result<Current> {
        let Start { from, at } = self.start;
        if let Some((file, offset, seq)) = at {
            let path = self.dir.join(format::journal_name(file));
            let mut cur = self.open_file(file, &path)?;
            // The offset comes from a checkpoint's frame table, which a compaction
            // of the file after it makes stale: start there only if that event's
            // frame is there, and otherwise at the file's first frame.
            let header_len = cur.offset;
            cur.offset = offset;
            cur.fill(format::FRAME_HEAD)?;
            let declared = cur
                .rest()
                .first_chunk::<4>()
                .map_or(0, |len| u32::from_le_bytes(*len).min(format::MAX_PAYLOAD));
            cur.fill(format::FRAME_HEAD + declared as usize)?;
            let there = matches!(
                format::read_frame(cur.rest()),
                Read::Frame(Frame::Event { seq: found, .. }, _) if found == seq
            );
            if there {
                self.next = seq;
            } else {
                cur.offset = header_len;
                self.next = file;
            }
            return Ok(cur);
        }
        let files = recovery::journal_files(&self.io, &self.dir)?;
        let Some((first, path)) = files.iter().rev().find(|(first, _)| *first <= from) else {
            return Err(match files.first() {
                None => corrupt(&self.dir, 0, "the directory holds no journal file".into()),
                Some((first, path)) => corrupt(
                    path,
                    0,
                    format!(
                        "the journal's first file starts at event {first}, and nothing holds the events from {from} on before it"
                    ),
                ),
            });
        };
        let cur = self.open_file(*first, path)?;
        self.next = *first;
        Ok(cur)
    }

    /// Opens journal file `first` at `path` and checks its header.
    fn open_file(&mut self, first: u64, path: &Path) -> Result<Current> {
        let handle = match self.io.open(path, Open::Read) {
            Ok(handle) => handle,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Err(vanished(path)),
            Err(err) => return Err(Error::io(path)(err)),
        };
        let (header, header_len) = read_header(&handle, path)?;
        check_sealed(&header, path, &self.sealer)?;
        if header.events != first {
            let reason = format!(
                "the header says the file starts at event {}, its name says {first}",
                header.events
            );
            return Err(corrupt(path, 0, reason));
        }
        match &self.header {
            None => self.header = Some(header),
            Some(known) => {
                // The events' type may change from file to file (after an upgrade,
                // at a new schema version): its reader decodes each event with the
                // structure of its version. The state, the journal's own format,
                // may not.
                let same = (&known.state_type, known.schema) == (&header.state_type, header.schema);
                if !same {
                    let reason = format!(
                        "the file was written for events `{}` (schema v{}, events v{}), the journal's first file for `{}` (schema v{}, events v{})",
                        header.event_type,
                        header.schema,
                        header.event_schema,
                        known.event_type,
                        known.schema,
                        known.event_schema
                    );
                    return Err(corrupt(path, 0, reason));
                }
            }
        }
        Ok(Current {
            first,
            path: path.to_path_buf(),
            handle,
            offset: header_len as u64,
            buf: Vec::new(),
            buf_start: 0,
            link: None,
            finished: false,
        })
    }

    /// What comes after the frames of the current file, read to its end.
    fn after(&mut self) -> Result<After> {
        let Some(cur) = self.file.as_mut() else { return Ok(After::Pending) };
        // What is read again must come from the file, not from the buffer.
        cur.buf.clear();
        let (first, path, link) = (cur.first, cur.path.clone(), cur.link);
        if let Some((next, offset)) = link {
            let next_path = self.dir.join(format::journal_name(next));
            if !self.exists(&next_path) {
                let missing = format::journal_name(next);
                let reason = format!("the journal goes on in {missing}, which is missing");
                return Err(corrupt(&path, offset, reason));
            }
            return self.go_on(next, &next_path).map(After::Next);
        }
        let files = recovery::journal_files(&self.io, &self.dir)?;
        let later = files.into_iter().find(|(found, _)| first < *found);
        let Some((next, next_path)) = later else {
            if self.tail == Tail::Live && !self.exists(&path) {
                return Err(Error::JournalChanged {
                    path,
                    reason: "the journal file disappeared while it was followed".into(),
                });
            }
            return Ok(After::Pending);
        };
        // Written before the later file was made: read it before going on.
        if let Some(cur) = self.file.as_ref()
            && !cur.finished
            && cur.offset < cur.handle.len().map_err(Error::io(&path))?
        {
            return Ok(After::Stay);
        }
        self.go_on(next, &next_path).map(After::Next)
    }

    fn exists(&self, path: &Path) -> bool {
        self.io.stamp(path).is_ok_and(|stamp| stamp.is_some())
    }

    /// Opens journal file `next`, which must go on where the current one ended.
    fn go_on(&mut self, next: u64, path: &Path) -> Result<Current> {
        if next != self.next {
            let reason = format!(
                "the file starts at event {next}, but the journal before it ends before event {}",
                self.next
            );
            return Err(corrupt(path, 0, reason));
        }
        self.open_file(next, path)
    }

    /// Judges bytes at the current offset that are not a sound frame: a write not
    /// finished yet or a torn one (`Some(Pending)`), a torn link before a later file
    /// (`None`: go on), or damage (an error).
    fn judge_bad(&mut self, reason: &str) -> Result<Option<Step>> {
        let files = recovery::journal_files(&self.io, &self.dir)?;
        let Some(cur) = self.file.as_mut() else { return Ok(Some(Step::Pending)) };
        let is_last = files.iter().all(|(first, _)| *first <= cur.first);
        // Through the handle: a file that compaction replaced meanwhile is read as
        // it was, at the offsets of this scan.
        let whole = cur.handle.read_all().map_err(Error::io(&cur.path))?;
        let offset = usize::try_from(cur.offset).unwrap_or(usize::MAX);
        let rest = whole.len().saturating_sub(offset);
        cur.buf.clear();
        if !is_last {
            // A file before the last ends with its link, which is not synced: a crash
            // may tear it, and nothing is lost with it.
            if rest <= format::LINK_LEN && format::looks_torn(&whole, offset) {
                cur.finished = true;
                return Ok(None);
            }
            return Err(corrupt(&cur.path, cur.offset, reason.to_owned()));
        }
        let sound_after = recovery::sound_after(&whole, offset);
        match self.tail {
            Tail::Live if !sound_after => Ok(Some(Step::Pending)),
            Tail::Settled { clean: None } if !sound_after && format::looks_torn(&whole, offset) => {
                let (path, offset, bytes) = (cur.path.clone(), cur.offset, rest as u64);
                self.torn = Some(Torn { path, offset, bytes });
                cur.finished = true;
                Ok(Some(Step::Pending))
            }
            _ => Err(corrupt(&cur.path, cur.offset, reason.to_owned())),
        }
    }
}

impl Current {
    /// The bytes from the current offset on that the buffer holds.
    fn rest(&self) -> &[u8] {
        let skip =
            usize::try_from(self.offset.saturating_sub(self.buf_start)).unwrap_or(usize::MAX);
        self.buf.get(skip..).unwrap_or_default()
    }

    /// Makes the buffer hold `need` bytes from the current offset, or as many as the
    /// file has. Never reads more than the file holds: a damaged length allocates
    /// nothing.
    fn fill(&mut self, need: usize) -> Result<()> {
        let held = self.buf_start <= self.offset && need <= self.rest().len();
        if held {
            return Ok(());
        }
        let len = self.handle.len().map_err(Error::io(&self.path))?;
        let left = usize::try_from(len.saturating_sub(self.offset)).unwrap_or(usize::MAX);
        let want = need.max(CHUNK).min(left);
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        buf.resize(want, 0);
        let n = self.handle.read_at(&mut buf, self.offset).map_err(Error::io(&self.path))?;
        buf.truncate(n);
        self.buf = buf;
        self.buf_start = self.offset;
        Ok(())
    }
}

/// Reads the header of the journal file open as `handle` at `path`, and its length.
///
/// # Errors
/// [`Error::JournalCorrupt`] when it is damaged, [`Error::FormatVersion`] when it is
/// of a format this build does not read, [`Error::Io`].
pub(crate) fn read_header(handle: &IoFile, path: &Path) -> Result<(Header, usize)> {
    // A header carries the types' structure: read more until it decodes.
    let mut want = 64 * 1024;
    loop {
        let mut head = vec![0; want];
        let n = handle.read_at(&mut head, 0).map_err(Error::io(path))?;
        head.truncate(n);
        match Header::decode(&head, false) {
            Ok(found) => return Ok(found),
            Err(HeaderFault::Version(found)) => {
                let path = path.to_path_buf();
                return Err(Error::FormatVersion { path, found, expected: format::FORMAT_VERSION });
            }
            Err(HeaderFault::Damaged(reason)) if n < want => {
                return Err(corrupt(path, 0, format!("the file's header is damaged: {reason}")));
            }
            Err(HeaderFault::Damaged(_)) => want *= 4,
        }
    }
}

/// The error of a journal file that disappeared while it was read.
pub(crate) fn vanished(path: &Path) -> Error {
    Error::JournalChanged {
        path: path.to_path_buf(),
        reason: "the journal file disappeared while the journal was read".into(),
    }
}

fn corrupt(path: &Path, offset: u64, reason: String) -> Error {
    Error::JournalCorrupt { path: path.to_path_buf(), offset, reason }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{EventStore, Expected};

    fn scanner(dir: &Path, tail: Tail) -> Scanner {
        Scanner::new(Io::default(), dir.to_path_buf(), Sealer::default(), tail, Start::default())
    }

    fn events(scanner: &mut Scanner) -> Result<Vec<u64>> {
        let mut seqs = Vec::new();
        while let Step::Event(event) = scanner.step()? {
            seqs.push(event.seq);
        }
        Ok(seqs)
    }

    #[test]
    fn a_scan_follows_appends_and_new_files_and_waits_at_an_unfinished_frame() -> Result<()> {
        let tmp = tempfile::tempdir().map_err(Error::io(std::env::temp_dir()))?;
        let dir = tmp.path().join("events");
        let store = EventStore::<u64>::open(&dir)?;
        store.append("n", Expected::Any, [1, 2])?;
        let mut live = scanner(&dir, Tail::Live);
        assert_eq!(events(&mut live)?, [0]);
        store.append("n", Expected::Any, [3])?;
        store.checkpoint()?;
        store.append("n", Expected::Any, [4])?;
        assert_eq!(events(&mut live)?, [1, 2]);
        assert_eq!(recovery::journal_files(&Io::default(), &dir)?.len(), 2);
        // Half a frame at the end is not written yet: nothing, then the frame once
        // it is whole.
        let last = recovery::journal_files(&Io::default(), &dir)?.pop().map(|(_, it)| it);
        let last = last.ok_or_else(|| corrupt(&dir, 0, "no file".into()))?;
        drop(store);
        let bytes = std::fs::read(&last).map_err(Error::io(&last))?;
        let mut frame = Vec::new();
        format::put_event(&mut frame, 3, 1, b"x");
        let (head, tail) = frame.split_at(5);
        std::fs::write(&last, [bytes.as_slice(), head].concat()).map_err(Error::io(&last))?;
        assert!(matches!(live.step()?, Step::Pending));
        std::fs::write(&last, [bytes.as_slice(), head, tail].concat()).map_err(Error::io(&last))?;
        assert!(matches!(live.step()?, Step::Event(Scanned { seq: 3, .. })));
        // A file that disappears is an error, not the end.
        std::fs::remove_file(&last).map_err(Error::io(&last))?;
        assert!(matches!(live.step(), Err(Error::JournalChanged { .. })), "gone");
        Ok(())
    }
}
