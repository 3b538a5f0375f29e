//! Reading journal events back from the journal files: where each one's frame is
//! (the frame table, filled by recovery and by scanning a file for frames it does
//! not know yet), and the frame's bytes, opened when the store is encrypted.
//!
//! Compaction rewrites journal files, which moves their frames: a reader may look
//! where the table said before (a table from a checkpoint written before a
//! compaction that a crash stopped, or learnt from the old file), or read through
//! a handle of the old file at an offset of the new one. A frame that is not where
//! the reader looked (not a sound frame of that journal event) is therefore looked
//! for again in the file as it is now, with a fresh handle and the file scanned
//! anew; only what is not found there either is reported as damage.

use std::{
    collections::HashMap,
    fmt::Display,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use parking_lot::Mutex;
use quick_cache::sync::Cache;

use super::index::Frames;
use crate::{
    Error, Result, Timestamp,
    crypt::Sealer,
    io::{Io, IoFile, Open},
    journal::{
        event_aad,
        format::{self, Frame, Read},
        journal_files,
    },
};

/// Bytes read at a time when scanning a file for frames.
const SCAN_CHUNK: usize = 1 << 20;

/// Finds and reads the frames of an event store's journal.
pub(crate) struct Locator {
    dir: PathBuf,
    io: Io,
    sealer: Sealer,
    pub(crate) frames: Mutex<Frames>,
    /// Opened frames read at random (stream reads, backward reads), by journal
    /// event, bounded by their bytes.
    cache: Option<Arc<FrameCache>>,
    /// Held by a compaction, start to end, so that they run one at a time: per
    /// journal file (by its first event), a digest of the removals it was last
    /// compacted under, with which it has nothing more to drop.
    pub(crate) compacting: Mutex<HashMap<u64, u64>>,
    /// How many journal files compaction replaced so far: a read that failed while
    /// it changed looks again.
    replaced: AtomicU64,
}

/// How many times a read looks for a frame again while compactions replace its
/// file under it.
const RELOOKS: u32 = 4;

/// The cache of opened frames, by journal event.
pub(crate) type FrameCache = Cache<u64, Arc<Cached>, ByLength>;

/// Keeps a batch just committed in the cache, where the subscriptions following
/// the head read it: `plain` is its journal event's opened bytes.
pub(crate) fn remember(cache: &FrameCache, seq: u64, at: u64, plain: Vec<u8>) {
    cache.insert(seq, Arc::new(Cached { at, plain: plain.into_boxed_slice(), place: None }));
}

/// A frame in the cache: its timestamp and opened bytes.
pub(crate) struct Cached {
    at: u64,
    plain: Box<[u8]>,
    /// Where the frame was read: its journal file and byte offset (`None` for a
    /// batch cached as it was committed).
    place: Option<(u64, u64)>,
}

/// Weighs a cached frame by its bytes (and a little for the entry itself).
#[derive(Clone)]
pub(crate) struct ByLength;

impl quick_cache::Weighter<u64, Arc<Cached>> for ByLength {
    fn weight(&self, _: &u64, frame: &Arc<Cached>) -> u64 {
        frame.plain.len() as u64 + 64
    }
}

/// Whether a read keeps the frame it reads in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Keep {
    /// A read that goes through many frames once, in order: it would only push
    /// out what others read again.
    No,
    /// A read of chosen frames, likely read again.
    Cached,
}

/// A frame read back: its timestamp and its opened bytes.
pub(crate) struct ReadFrame<'a> {
    pub(crate) at: Timestamp,
    plain: Plain<'a>,
    /// Where the frame was read: its journal file and byte offset (`None` for a
    /// batch cached as it was committed).
    place: Option<(u64, u64)>,
}

enum Plain<'a> {
    /// In the read-ahead buffer.
    Borrowed(&'a [u8]),
    /// Opened from sealed bytes.
    Owned(Vec<u8>),
    Cached(Arc<Cached>),
}

impl ReadFrame<'_> {
    /// The frame's opened bytes.
    pub(crate) fn plain(&self) -> &[u8] {
        match &self.plain {
            Plain::Borrowed(bytes) => bytes,
            Plain::Owned(bytes) => bytes,
            Plain::Cached(cached) => &cached.plain,
        }
    }

    /// Where the frame was read: its journal file and byte offset, when known.
    pub(crate) fn place(&self) -> Option<(u64, u64)> {
        self.place
    }
}

/// Bytes of one journal file, read ahead: a reader going through many frames in a
/// row reads the file a chunk at a time, and finds the next frame right after the
/// last one without asking the frame table.
#[derive(Default)]
pub(crate) struct ReadAhead {
    /// The file the bytes are of, and its open handle.
    file: Option<(u64, IoFile)>,
    start: u64,
    bytes: Vec<u8>,
    /// How much to read at a time.
    chunk: usize,
    /// The journal event expected next, and the offset after the last frame read.
    next: Option<(u64, u64)>,
}

impl ReadAhead {
    /// A read-ahead buffer reading `chunk` bytes at a time.
    pub(crate) fn new(chunk: usize) -> ReadAhead {
        ReadAhead { chunk, ..ReadAhead::default() }
    }

    /// The bytes from `offset` on, if the buffer holds at least `need` of them.
    fn at(&self, offset: u64, need: usize) -> Option<&[u8]> {
        let at = usize::try_from(offset.checked_sub(self.start)?).ok()?;
        self.bytes.get(at..).filter(|rest| need <= rest.len())
    }
}

impl Locator {
    /// A locator of the journal in `dir`, knowing the frames in `frames`, caching up
    /// to `cache` bytes of frames read at random.
    pub(crate) fn new(dir: PathBuf, io: Io, sealer: Sealer, frames: Frames, cache: u64) -> Locator {
        // Frames of a few hundred bytes: the estimate only sizes the table at first.
        let cache = (cache > 0).then(|| {
            let estimate = usize::try_from(cache / 256).unwrap_or(usize::MAX).max(16);
            Arc::new(Cache::with_weighter(estimate, cache, ByLength))
        });
        Locator {
            dir,
            io,
            sealer,
            frames: Mutex::new(frames),
            cache,
            compacting: Mutex::new(HashMap::new()),
            replaced: AtomicU64::new(0),
        }
    }

    /// How frames are sealed.
    pub(crate) fn sealer(&self) -> &Sealer {
        &self.sealer
    }

    /// Notes that compaction replaced journal file `file`, whose frames are now at
    /// `offsets` (by journal event, from its first on): readers look there, and the
    /// cache forgets the file's frames.
    pub(crate) fn replaced(&self, file: u64, offsets: Vec<u64>) {
        self.replaced.fetch_add(1, Ordering::AcqRel);
        let events = offsets.len() as u64;
        self.frames.lock().files.insert(file, offsets);
        if let Some(cache) = &self.cache {
            for seq in file..file.saturating_add(events) {
                cache.remove(&seq);
            }
        }
    }

    /// The journal file and offset of journal event `seq`'s frame. When it is not
    /// known, its file is scanned for frames; when it is not there yet (a buffered
    /// mode that has not written it), `write_out` is called once and the file
    /// scanned again.
    pub(crate) fn locate(
        &self,
        seq: u64,
        write_out: &dyn Fn() -> Result<()>,
    ) -> Result<(u64, u64)> {
        let mut wrote = false;
        loop {
            if let Some(found) = self.known(seq) {
                return Ok(found);
            }
            let files = journal_files(&self.io, &self.dir)?;
            let Some((first, path)) = files.iter().rev().find(|(first, _)| *first <= seq) else {
                return Err(self.missing(seq, "no journal file holds it"));
            };
            let damaged = self.scan(*first, path, seq)?;
            if let Some(found) = self.known(seq) {
                return Ok(found);
            }
            if wrote {
                // A whole frame that is not sound stopped the scan, again after
                // everything was written out: damage, not a write in progress.
                if let Some((offset, why)) = damaged {
                    return Err(Error::JournalCorrupt {
                        path: path.clone(),
                        offset,
                        reason: format!("{why}, before event {seq}"),
                    });
                }
                return Err(self.missing(seq, "its journal file ends before it"));
            }
            write_out()?;
            wrote = true;
        }
    }

    /// The cache of opened frames, if the store keeps one.
    pub(crate) fn cache(&self) -> Option<Arc<FrameCache>> {
        self.cache.clone()
    }

    /// Reads journal event `seq`'s frame through `ahead` (or from the cache), and
    /// opens it; `keep` says whether to keep it in the cache.
    pub(crate) fn read<'a>(
        &self,
        seq: u64,
        ahead: &'a mut ReadAhead,
        write_out: &dyn Fn() -> Result<()>,
        keep: Keep,
    ) -> Result<ReadFrame<'a>> {
        // Going forward, the frame is right after the last one read (past frames
        // that are not events); otherwise the table says where. A read that keeps
        // nothing looks there before it looks in the cache.
        let followed = if keep == Keep::No { follow(seq, ahead) } else { None };
        if followed.is_none()
            && let Some(cached) = self.cache.as_ref().and_then(|cache| cache.get(&seq))
        {
            return Ok(ReadFrame {
                at: Timestamp::from_micros(cached.at),
                place: cached.place,
                plain: Plain::Cached(cached),
            });
        }
        // A read that keeps nothing has looked in its read-ahead already.
        let followed = if keep == Keep::No { followed } else { follow(seq, ahead) };
        let mut found = match followed {
            Some(found) => found,
            None => self.locate(seq, write_out)?,
        };
        let mut looks = 0;
        loop {
            let replaced = self.replaced.load(Ordering::Acquire);
            let Err(err) = self.place(seq, found, ahead) else { break };
            // Not there: its file may have been compacted since the reader opened
            // it or the table learnt the offset. Looked for again in the file as it
            // is now; again while compactions replace it meanwhile.
            looks += 1;
            let again = looks == 1 || replaced != self.replaced.load(Ordering::Acquire);
            if !again || RELOOKS < looks {
                return Err(err);
            }
            ahead.file = None;
            ahead.next = None;
            match self.relocate(seq, found.0, replaced, write_out) {
                Some(at) => found = at,
                None => return Err(err),
            }
        }
        let (file, offset) = found;
        let bad =
            |reason: String| Error::JournalCorrupt { path: self.path_of(file), offset, reason };
        // `place` found the frame sound: its checksum is not computed again.
        let Some((Frame::Event { at: stamp, bytes: stored, .. }, _)) =
            format::parse_frame(ahead.at(offset, 0).unwrap_or_default())
        else {
            return Err(bad(format!("event {seq} changed under the reader")));
        };
        let plain = if self.sealer.is_on() {
            let opened = self.sealer.open(&event_aad(seq), stored);
            Plain::Owned(
                opened
                    .map_err(|fault| bad(format!("event {seq} cannot be opened: {fault}")))?
                    .into_owned(),
            )
        } else {
            Plain::Borrowed(stored)
        };
        let frame =
            ReadFrame { at: Timestamp::from_micros(stamp), plain, place: Some((file, offset)) };
        match (&self.cache, keep) {
            (Some(cache), Keep::Cached) => {
                let plain = frame.plain().into();
                let cached = Arc::new(Cached { at: stamp, plain, place: frame.place });
                cache.insert(seq, Arc::clone(&cached));
                Ok(ReadFrame { plain: Plain::Cached(cached), ..frame })
            }
            _ => Ok(frame),
        }
    }

    /// Reads journal event `seq`'s frame at `file` and `offset` into `ahead`, and
    /// checks that it is that event's sound frame.
    fn place(&self, seq: u64, (file, offset): (u64, u64), ahead: &mut ReadAhead) -> Result<()> {
        let bad =
            |reason: String| Error::JournalCorrupt { path: self.path_of(file), offset, reason };
        if ahead.file.as_ref().is_none_or(|(first, _)| *first != file)
            || ahead.at(offset, format::FRAME_HEAD).is_none()
        {
            self.fill(ahead, file, offset, format::FRAME_HEAD)?;
        }
        let len = ahead
            .at(offset, format::FRAME_HEAD)
            .and_then(|head| head.first_chunk::<4>())
            .map(|len| u32::from_le_bytes(*len))
            .ok_or_else(|| bad("the frame's length is cut short".into()))?;
        if format::MAX_PAYLOAD < len {
            return Err(bad("a frame's length field is out of range".into()));
        }
        let need = format::FRAME_HEAD + len as usize;
        if ahead.at(offset, need).is_none() {
            self.fill(ahead, file, offset, need)?;
        }
        let used = match format::read_frame(ahead.at(offset, 0).unwrap_or_default()) {
            Read::Frame(Frame::Event { seq: stored, .. }, _) if stored != seq => {
                return Err(bad(format!("event {stored} stands where event {seq} belongs")));
            }
            Read::Frame(Frame::Event { .. }, used) => used,
            Read::Frame(..) => return Err(bad(format!("event {seq} is not at its offset"))),
            Read::End => return Err(bad(format!("event {seq} is past the end of the file"))),
            Read::Bad(reason) => return Err(bad(format!("event {seq}: {reason}"))),
        };
        ahead.next = Some((seq + 1, offset + used as u64));
        Ok(())
    }

    /// Where journal event `seq` is in journal file `file` as it is now: the file's
    /// frames are forgotten and scanned for again. `None` when it is not found
    /// there either; the table is then left as it was, unless a compaction
    /// replaced a file since `replaced` was read.
    fn relocate(
        &self,
        seq: u64,
        file: u64,
        replaced: u64,
        write_out: &dyn Fn() -> Result<()>,
    ) -> Option<(u64, u64)> {
        let known = self.frames.lock().files.remove(&file);
        if let Ok(found) = self.locate(seq, write_out) {
            return Some(found);
        }
        let mut frames = self.frames.lock();
        if let Some(known) = known
            && replaced == self.replaced.load(Ordering::Acquire)
        {
            frames.files.insert(file, known);
        }
        None
    }

    /// Reads at least `need` bytes (or to the end of the file) of journal file
    /// `file` from `offset` into `ahead`.
    fn fill(&self, ahead: &mut ReadAhead, file: u64, offset: u64, need: usize) -> Result<()> {
        let path = self.path_of(file);
        let reuse = ahead.file.take().filter(|(first, _)| *first == file);
        let handle = match reuse {
            Some((_, handle)) => handle,
            None => self.io.open(&path, Open::Read).map_err(Error::io(&path))?,
        };
        // A frame longer than a chunk is read whole, once the file is seen to hold
        // it: a damaged length field must not allocate what is not there.
        if ahead.chunk < need {
            let len = handle.len().map_err(Error::io(&path))?;
            if len < offset.saturating_add(need as u64) {
                return Err(Error::JournalCorrupt {
                    path,
                    offset,
                    reason: "a frame runs past the end of its file".into(),
                });
            }
        }
        let mut bytes = std::mem::take(&mut ahead.bytes);
        bytes.clear();
        bytes.resize(need.max(ahead.chunk), 0);
        let n = handle.read_at(&mut bytes, offset).map_err(Error::io(&path))?;
        bytes.truncate(n);
        ahead.file = Some((file, handle));
        ahead.start = offset;
        ahead.bytes = bytes;
        Ok(())
    }

    /// A [`Error::JournalCorrupt`] for damage found in the bytes of `frame`, which
    /// holds journal event `seq`: it names the frame's file and byte offset.
    pub(crate) fn corrupt(&self, frame: &ReadFrame<'_>, seq: u64, reason: impl Display) -> Error {
        self.corrupt_at(frame.place(), seq, reason)
    }

    /// A [`Error::JournalCorrupt`] for damage in journal event `seq`, whose frame is
    /// at `place` (its journal file and byte offset), if known; else where the frame
    /// table has it, if it does; else the journal's directory is named.
    pub(crate) fn corrupt_at(
        &self,
        place: Option<(u64, u64)>,
        seq: u64,
        reason: impl Display,
    ) -> Error {
        let (path, offset) = match place.or_else(|| self.known(seq)) {
            Some((file, offset)) => (self.path_of(file), offset),
            None => (self.dir.clone(), 0),
        };
        Error::JournalCorrupt { path, offset, reason: format!("journal event {seq}: {reason}") }
    }

    /// The path of the journal file whose first event is `file`.
    fn path_of(&self, file: u64) -> PathBuf {
        self.dir.join(format::journal_name(file))
    }

    fn known(&self, seq: u64) -> Option<(u64, u64)> {
        let frames = self.frames.lock();
        frames.find(seq).and_then(|(file, offset)| Some((file, offset?)))
    }

    fn missing(&self, seq: u64, why: &str) -> Error {
        Error::JournalCorrupt {
            path: self.dir.clone(),
            offset: 0,
            reason: format!("event {seq} is not in the journal: {why}"),
        }
    }

    /// Scans journal file `file` at `path` for the frames from the last one the
    /// table knows before journal event `seq` on, and records them. Stops at the
    /// file's end or at bytes that are not a whole sound frame (a write in
    /// progress). The table may know frames after `seq` and not before: recovery
    /// records only the events after the checkpoint, which can start mid-file.
    /// Returns where (and why) a whole frame that is not sound stopped it.
    fn scan(&self, file: u64, path: &Path, seq: u64) -> Result<Option<Damage>> {
        let mut looks = 0;
        loop {
            let replaced = self.replaced.load(Ordering::Acquire);
            let (found, damaged) = self.scan_once(file, path, seq)?;
            let mut frames = self.frames.lock();
            // A compaction that replaced a file meanwhile recorded its new offsets:
            // frames found maybe in the old file are not recorded over them, and
            // the file is scanned again as it is now.
            looks += 1;
            if replaced != self.replaced.load(Ordering::Acquire) && looks <= RELOOKS {
                continue;
            }
            for (seq, offset) in found {
                frames.record(file, seq, offset);
            }
            return Ok(damaged);
        }
    }

    /// The frames `scan` finds, not recorded yet, and the damage that stopped it.
    fn scan_once(&self, file: u64, path: &Path, seq: u64) -> Result<Scanned> {
        let handle = self.io.open(path, Open::Read).map_err(Error::io(path))?;
        let before = usize::try_from(seq.saturating_sub(file)).unwrap_or(usize::MAX);
        let known = self.frames.lock().files.get(&file).and_then(|offsets| {
            let earlier = offsets.get(..before.min(offsets.len())).unwrap_or_default();
            let (k, offset) = earlier
                .iter()
                .enumerate()
                .rev()
                .find(|(_, offset)| **offset != super::index::UNKNOWN_OFFSET)?;
            Some((file + k as u64, *offset))
        });
        if let Some((known_seq, offset)) = known {
            let scanned = scan_frames(&handle, path, offset)?;
            // A table made before a compaction rewrote the file (a checkpoint of an
            // earlier run, or a scan that raced the rewrite) has offsets of the old
            // file: the frame found there must be the one the table says, or the
            // file is scanned from its start.
            if scanned.0.first() == Some(&(known_seq, offset)) {
                return Ok(scanned);
            }
            self.frames.lock().files.remove(&file);
        }
        scan_frames(&handle, path, header_len(&handle, path)?)
    }
}

/// The length of the header of the journal file `handle` (at `path`); 0 when it
/// is damaged or of another format, which reading an event of the file reports.
fn header_len(handle: &IoFile, path: &Path) -> Result<u64> {
    match crate::journal::read_header(handle, path) {
        Ok((_, len)) => Ok(len as u64),
        Err(Error::JournalCorrupt { .. } | Error::FormatVersion { .. }) => Ok(0),
        Err(err) => Err(err),
    }
}

/// Where a whole frame that is not sound is (its offset), and why.
type Damage = (u64, &'static str);

/// The events (number and offset) of the frames a scan found, and the damage that
/// stopped it, if any.
type Scanned = (Vec<(u64, u64)>, Option<Damage>);

/// The events (number and offset) of the frames of journal file `handle` from
/// `start` on, up to its end or to bytes that are not a whole sound frame (then
/// also where those are, and why).
fn scan_frames(handle: &IoFile, path: &Path, mut start: u64) -> Result<Scanned> {
    let mut buf = Vec::new();
    let file_len = handle.len().map_err(Error::io(path))?;
    let mut found = Vec::new();
    let mut at_end = false;
    loop {
        let bytes = buf.as_slice();
        let mut used = 0;
        while let Read::Frame(frame, len) =
            format::read_frame(bytes.get(used..).unwrap_or_default())
        {
            if let Frame::Event { seq, .. } = frame {
                found.push((seq, start + used as u64));
            }
            used += len;
        }
        if at_end {
            break;
        }
        // Keep the unparsed rest, and read the next chunk after it, big enough
        // for the frame that starts it.
        let rest = bytes.get(used..).unwrap_or_default().to_vec();
        start += used as u64;
        let frame_len = rest
            .get(..4)
            .and_then(|it| it.try_into().ok())
            .map_or(0, |it| u32::from_le_bytes(it) as usize)
            .min(format::MAX_PAYLOAD as usize);
        if format::FRAME_HEAD <= rest.len() && format::FRAME_HEAD + frame_len <= rest.len() {
            // A whole frame that is not sound: damage.
            let why = match format::read_frame(&rest) {
                Read::Bad(why) => why,
                _ => "a frame is not sound",
            };
            return Ok((found, Some((start, why))));
        }
        // Never more than the file holds: a damaged length must not allocate.
        let left = usize::try_from(file_len.saturating_sub(start + rest.len() as u64))
            .unwrap_or(usize::MAX);
        let want = SCAN_CHUNK.max(format::FRAME_HEAD + frame_len).min(left.max(1));
        let mut chunk = vec![0; want];
        let n = handle.read_at(&mut chunk, start + rest.len() as u64).map_err(Error::io(path))?;
        chunk.truncate(n);
        at_end = n < want;
        buf = rest;
        buf.extend_from_slice(&chunk);
    }
    Ok((found, None))
}

/// Where journal event `seq` is, if it follows the last frame `ahead` read, in
/// the same file, past frames that are not events.
fn follow(seq: u64, ahead: &ReadAhead) -> Option<(u64, u64)> {
    let (expected, mut offset) = ahead.next?;
    let (file, _) = ahead.file.as_ref()?;
    if expected != seq {
        return None;
    }
    loop {
        let bytes = ahead.at(offset, format::FRAME_HEAD)?;
        // An event frame is only peeked at: `place` checks the one it reads.
        if let Some((Frame::Event { seq: found, .. }, _)) = format::parse_frame(bytes) {
            return (found == seq).then_some((*file, offset));
        }
        match format::read_frame(bytes) {
            Read::Frame(frame, used) if !matches!(frame, Frame::Event { .. }) => {
                offset += used as u64;
            }
            // Not in the buffer whole: the table decides.
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{EventStore, Expected};

    #[test]
    fn a_table_that_knows_only_later_frames_of_a_file_still_finds_the_earlier_ones() -> Result<()> {
        // Recovery records only the journal events after the checkpoint, which can
        // start in the middle of a file: the frames before are then unknown while
        // later ones are known (found by the SIGKILL test of the event store).
        let tmp = tempfile::tempdir().map_err(Error::io(std::env::temp_dir()))?;
        let dir = tmp.path().join("events");
        {
            let events = EventStore::<u64>::open(&dir)?;
            for n in 0..10 {
                events.append("n", Expected::Any, [n])?;
            }
        }
        let none = || Ok(());
        let full =
            Locator::new(dir.clone(), Io::default(), Sealer::default(), Frames::default(), 0);
        let offsets: Vec<u64> = (0..10)
            .map(|seq| full.locate(seq, &none).map(|(_, offset)| offset))
            .collect::<Result<_>>()?;
        let mut sparse = Frames::default();
        sparse.record(0, 9, offsets.last().copied().unwrap_or_default());
        let sparse = Locator::new(dir, Io::default(), Sealer::default(), sparse, 0);
        for seq in [3, 0, 8, 9] {
            let want = usize::try_from(seq).ok().and_then(|seq| offsets.get(seq)).copied();
            assert_eq!(Some(sparse.locate(seq, &none)?.1), want, "event {seq}");
        }
        Ok(())
    }

    /// Makes a store in `dir` of 22 journal events, records where the events
    /// `known` are, then compacts its first file (dropping the data of events 0 to
    /// 14 of stream `s0`): returns the table of the file as it was.
    fn stale_table(dir: &Path, known: std::ops::Range<u64>) -> Result<Frames> {
        let events = EventStore::<String>::open(dir)?;
        for n in 0..20 {
            events.append(&format!("s{}", n % 2), Expected::Any, [format!("{n:0>500}")])?;
        }
        events.truncate_stream("s0", 8)?;
        events.checkpoint()?;
        events.append("s1", Expected::Any, ["last".to_owned()])?;
        let before =
            Locator::new(dir.to_path_buf(), Io::default(), Sealer::default(), Frames::default(), 0);
        let mut stale = Frames::default();
        for seq in known {
            let (file, offset) = before.locate(seq, &|| Ok(()))?;
            stale.record(file, seq, offset);
        }
        assert!(0 < events.compact()?.events_dropped);
        Ok(stale)
    }

    #[test]
    fn a_table_from_before_a_compaction_still_finds_every_frame_and_damage_is_reported()
    -> Result<()> {
        let tmp = tempfile::tempdir().map_err(Error::io(std::env::temp_dir()))?;
        let dir = tmp.path().join("events");
        let stale = stale_table(&dir, 0..22)?;
        let none = || Ok(());
        let locator =
            || Locator::new(dir.clone(), Io::default(), Sealer::default(), Frames::default(), 0);
        let stale = Locator::new(dir.clone(), Io::default(), Sealer::default(), stale, 0);
        let fresh = locator();
        for seq in (0..22).rev() {
            let (mut one, mut two) = (ReadAhead::new(64), ReadAhead::new(64));
            let old = stale.read(seq, &mut one, &none, Keep::No)?;
            let new = fresh.read(seq, &mut two, &none, Keep::No)?;
            assert_eq!((old.at, old.plain()), (new.at, new.plain()), "event {seq}");
        }
        // Damage in the compacted file is reported, not passed over.
        let (file, offset) = fresh.locate(5, &none)?;
        let path = dir.join(format::journal_name(file));
        let mut bytes = std::fs::read(&path).map_err(Error::io(&path))?;
        let at = usize::try_from(offset).unwrap_or(usize::MAX) + format::FRAME_HEAD + 4;
        if let Some(byte) = bytes.get_mut(at) {
            *byte ^= 1;
        }
        std::fs::write(&path, bytes).map_err(Error::io(&path))?;
        let res = locator().read(5, &mut ReadAhead::new(64), &none, Keep::No).map(|it| it.at);
        assert!(matches!(res, Err(Error::JournalCorrupt { .. })), "{res:?}");
        let res = fresh.read(5, &mut ReadAhead::new(64), &none, Keep::No).map(|it| it.at);
        assert!(matches!(res, Err(Error::JournalCorrupt { .. })), "{res:?}");
        assert!(fresh.read(6, &mut ReadAhead::new(64), &none, Keep::No).is_ok());
        Ok(())
    }

    #[test]
    fn a_table_from_before_a_compaction_that_knows_only_earlier_frames_finds_the_later_ones()
    -> Result<()> {
        // A checkpoint taken while a compaction rewrote a file keeps the old file's
        // offsets of the events read before; a kill before the next checkpoint
        // leaves that table to the next opening, whose reads of the file's later
        // events scan it from the last offset known (found by the SIGKILL test).
        let tmp = tempfile::tempdir().map_err(Error::io(std::env::temp_dir()))?;
        let dir = tmp.path().join("events");
        let stale = stale_table(&dir, 0..11)?;
        let none = || Ok(());
        let locator =
            |frames| Locator::new(dir.clone(), Io::default(), Sealer::default(), frames, 0);
        let fresh = locator(Frames::default());
        for seq in [15, 19, 12] {
            let stale = locator(stale.clone());
            assert_eq!(stale.locate(seq, &none)?, fresh.locate(seq, &none)?, "event {seq}");
            let (mut one, mut two) = (ReadAhead::new(64), ReadAhead::new(64));
            let old = stale.read(seq, &mut one, &none, Keep::No)?;
            let new = fresh.read(seq, &mut two, &none, Keep::No)?;
            assert_eq!((old.at, old.plain()), (new.at, new.plain()), "event {seq}");
        }
        Ok(())
    }
}
