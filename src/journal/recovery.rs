//! Reading a journal directory back: every file's header, every frame, torn tails
//! and damage, then the replay of the sound events.

use std::{
    borrow::Cow,
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use super::{
    Identity, Recovery, Replayed, Timestamp, Versions, event_aad,
    format::{self, Extra, FileKind, Frame, Header, HeaderFault, Read},
    key_check,
    versions::{self, Side},
};
use crate::{
    Error, Result,
    crypt::Sealer,
    io::{Io, IoFile, Open, PART_SUFFIX},
    lockfile::End,
};

/// What opening a journal found and did.
///
/// # Example
/// ```
/// use instastate::Prevayler;
///
/// # fn main() -> instastate::Result<()> {
/// # let dir = tempfile::tempdir().unwrap();
/// let counter = Prevayler::open(dir.path(), 0u64, |n: &mut u64, by: u64, _| *n += by)?;
/// counter.handle(2)?;
/// drop(counter);
/// let counter = Prevayler::open(dir.path(), 0u64, |n: &mut u64, by: u64, _| *n += by)?;
/// assert_eq!(counter.recovered().replayed(), 1);
/// assert_eq!(counter.recovered().torn_bytes(), 0);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovered {
    pub(crate) snapshot: Option<u64>,
    pub(crate) unsound_snapshots: Vec<PathBuf>,
    pub(crate) replayed: u64,
    pub(crate) voided: u64,
    pub(crate) torn_bytes: u64,
    pub(crate) salvaged: Option<PathBuf>,
    pub(crate) skipped: Vec<u64>,
}

impl Recovered {
    /// The number of events the snapshot that was loaded covers; `None` when the
    /// state was rebuilt from its initial value.
    #[must_use]
    pub fn snapshot(&self) -> Option<u64> {
        self.snapshot
    }

    /// Newer snapshots that were damaged and passed over, newest first.
    #[must_use]
    pub fn unsound_snapshots(&self) -> &[PathBuf] {
        &self.unsound_snapshots
    }

    /// How many journaled events were replayed after the snapshot.
    #[must_use]
    pub fn replayed(&self) -> u64 {
        self.replayed
    }

    /// How many journaled events were skipped because their system function panicked
    /// (or they were queued behind one that did).
    #[must_use]
    pub fn voided(&self) -> u64 {
        self.voided
    }

    /// The bytes of a torn last write that were cut off the journal: a crash in the
    /// middle of an append, of events that had not been acknowledged.
    #[must_use]
    pub fn torn_bytes(&self) -> u64 {
        self.torn_bytes
    }

    /// The events that [`Recovery::Salvage`] skipped because their system function
    /// panicked on replay; they are voided in the journal now.
    #[must_use]
    pub fn skipped(&self) -> &[u64] {
        &self.skipped
    }

    /// Where [`Recovery::Salvage`] moved the damaged journal files, if it had to.
    #[must_use]
    pub fn salvaged(&self) -> Option<&Path> {
        self.salvaged.as_deref()
    }
}

/// Where the journal ends.
#[derive(Debug, Default)]
pub(crate) struct Tail {
    /// The number after the last sound event.
    pub(crate) next: u64,
    /// The last timestamp journaled.
    pub(crate) clock: u64,
    /// The last journal file.
    pub(crate) file: Option<LastFile>,
}

/// The last journal file, as recovery found it.
#[derive(Debug)]
pub(crate) struct LastFile {
    pub(crate) path: PathBuf,
    /// The number after its last event (its first, when it holds none).
    pub(crate) next: u64,
    pub(crate) first: u64,
    /// The state's and the events' schema versions its header records.
    pub(crate) schemas: (u32, u32),
}

/// What to recover: the journal's types, its key, what to do about damage, and the
/// first event wanted (the ones before it are in the snapshot).
#[derive(Clone, Copy)]
pub(crate) struct Scope<'a> {
    pub(crate) io: &'a Io,
    /// The types the journal must have been written for, and the schema versions it
    /// reads; `None` when inspecting a journal without knowing them.
    pub(crate) expect: Option<(&'a Identity, &'a Versions)>,
    pub(crate) sealer: &'a Sealer,
    pub(crate) recovery: Recovery,
    pub(crate) from: u64,
    /// Where the journal ended when it was closed cleanly, if it was: then no write
    /// can have been torn, and a bad end is damage.
    pub(crate) clean: Option<End>,
    /// Whether the directory was set up as a journal, or holds a snapshot: then it
    /// must have a journal file.
    pub(crate) expected: bool,
    /// Only look: leave temporary files and a torn tail where they are.
    pub(crate) read_only: bool,
}

/// Everything the frames of the journal files say, but the events themselves:
/// those are read again, from the sound spans, as they are replayed.
#[derive(Default)]
struct Frames {
    /// Per file: where its sound frames start and end, and the events' schema
    /// version its header records.
    spans: Vec<(usize, usize, u32)>,
    /// Per file: the state's and the events' schema versions its header records.
    schemas: Vec<(u32, u32)>,
    voids: Vec<(u64, u64)>,
    checks: BTreeMap<u64, u64>,
    /// The first event numbered `from` or later, and its file.
    first_wanted: Option<(usize, u64)>,
    /// The last event: its file, number and timestamp.
    last: Option<(usize, u64, u64)>,
    /// A link frame in the last file (its offset, and the file it names): the
    /// journal went on in a file that is missing.
    dangling: Option<(usize, u64)>,
}

/// How a file's frames end.
enum Ending {
    Clean,
    Torn(usize),
    Damaged(usize, String),
}

/// Reads the journal in `dir`, replays its events numbered `from` or later, and
/// cuts a torn tail. Changes nothing on disk before everything read back soundly,
/// except what [`Recovery::Salvage`] moves aside.
// One pass over the journal's files, whose steps share the frames, the contents
// and the salvage; split, they would pass all of it around.
#[allow(clippy::too_many_lines)]
pub(crate) fn recover(
    dir: &Path,
    scope: &Scope<'_>,
    skipped: &[u64],
    replay: &mut impl FnMut(Replayed<'_>) -> Result<Option<u64>>,
) -> Result<(Recovered, Tail)> {
    let Scope { io, expect, sealer, recovery, from, clean, expected, read_only } = *scope;
    remove_parts(io, dir, read_only)?;
    let mut files = journal_files(io, dir)?;
    let strict = recovery == Recovery::Strict;
    if strict {
        check_files(io, dir, &files, clean, expected)?;
    }
    // Files whose events a snapshot holds all of are not read: damage there does
    // not matter. (They are deleted when a newer snapshot retires them.)
    let covered =
        files.windows(2).take_while(|pair| matches!(pair, [_, (next, _)] if *next <= from)).count();
    files.drain(..covered);
    let mut contents = Vec::with_capacity(files.len());
    for (_, path) in &files {
        contents.push(io.read(path).map_err(Error::io(path))?);
    }
    let mut report = Recovered::default();
    let mut frames = Frames::default();
    let mut torn = None;
    let mut expected: Option<u64> = None;
    let mut file_idx = 0;
    while let (Some((first, path)), Some(bytes)) = (files.get(file_idx), contents.get(file_idx)) {
        let last_file = file_idx + 1 == files.len();
        let ending = match check_header(bytes, *first, path, expect, sealer)? {
            Err(reason) => Ending::Damaged(0, reason),
            Ok(_) if file_idx == 0 && from < *first => Ending::Damaged(0, gap(*first, from)),
            Ok(_)
                if expected
                    .is_some_and(|next| next != *first && !(next < *first && *first <= from)) =>
            {
                let next = expected.unwrap_or_default();
                Ending::Damaged(
                    0,
                    format!(
                        "the file starts at event {first}, but the journal before it ends before event {next}"
                    ),
                )
            }
            Ok((header_len, schemas)) => {
                let mut next = *first;
                frames.schemas.push(schemas);
                let scan = Scan {
                    bytes,
                    file: file_idx,
                    last_file,
                    from,
                    clean: clean.is_some(),
                    schema: schemas.1,
                };
                let ending = scan.frames(header_len, &mut next, &mut frames);
                expected = Some(next);
                ending
            }
        };
        match ending {
            Ending::Clean => {}
            Ending::Torn(offset) => torn = Some((file_idx, offset)),
            Ending::Damaged(offset, reason) => match recovery {
                Recovery::Strict => {
                    return Err(Error::JournalCorrupt {
                        path: path.clone(),
                        offset: offset as u64,
                        reason,
                    });
                }
                Recovery::Salvage => {
                    let keep = bytes.get(..offset).unwrap_or_default().to_vec();
                    report.salvaged =
                        Some(salvage(io, dir, files.get(file_idx..).unwrap_or_default(), &keep)?);
                    files.truncate(file_idx + 1);
                    contents.truncate(file_idx);
                    if offset == 0 {
                        // Not even the header was sound: nothing of the file is kept.
                        let (_, path) = files.remove(file_idx);
                        io.remove_file(&path).map_err(Error::io(&path))?;
                        io.sync_dir(dir).map_err(Error::io(dir))?;
                    } else {
                        contents.push(keep);
                    }
                    break;
                }
            },
        }
        file_idx += 1;
    }
    if strict && let (Some((offset, next)), Some((_, path))) = (frames.dangling, files.last()) {
        let missing = format::journal_name(next);
        let reason = format!("the journal goes on in {missing}, which is missing");
        return Err(Error::JournalCorrupt { path: path.clone(), offset: offset as u64, reason });
    }
    let voided = |seq| {
        skipped.contains(&seq)
            || frames.voids.iter().any(|&(first, last)| (first..=last).contains(&seq))
    };
    replay_found(dir, &files, &contents, &frames, sealer, from, &voided, &mut report, replay)?;

    if let Some((file, offset)) = torn
        && let (Some((_, path)), Some(bytes)) = (files.get(file), contents.get(file))
    {
        report.torn_bytes = (bytes.len() - offset) as u64;
        cut(io, path, offset as u64, read_only)?;
    }
    let last = frames.last;
    let tail = Tail {
        next: last.map_or(0, |(_, seq, _)| seq + 1),
        clock: last.map_or(0, |(_, _, at)| at),
        file: files.last().map(|(first, path)| {
            let last_idx = files.len() - 1;
            let next = last.filter(|it| it.0 == last_idx).map_or(*first, |(_, seq, _)| seq + 1);
            let schemas = frames.schemas.get(last_idx).copied().unwrap_or_default();
            LastFile { path: path.clone(), next, first: *first, schemas }
        }),
    };
    Ok((report, tail))
}

/// Why a journal whose first file starts at event `first` is damaged when the
/// events from `from` on are wanted: the ones between are nowhere, and replaying
/// the file would skip them (even if it holds no event yet).
fn gap(first: u64, from: u64) -> String {
    format!(
        "the journal's first file starts at event {first}, but nothing holds the events from {from} on before it"
    )
}

/// Cuts the file at `path` to `len` bytes, durably; nothing when only looking.
fn cut(io: &Io, path: &Path, len: u64, read_only: bool) -> Result<()> {
    if read_only {
        return Ok(());
    }
    let handle = io.open(path, Open::Write).map_err(Error::io(path))?;
    handle.set_len(len).and_then(|()| handle.sync_all()).map_err(Error::io(path))
}

/// A sound journal file header's length and its state's and events' schema
/// versions, or why the header is damaged.
type HeaderCheck = std::result::Result<(usize, (u32, u32)), String>;

/// Checks a journal file's header: `Ok(Ok((length, schema versions)))` when sound,
/// `Ok(Err(reason))` when damaged, and an error when it was written for other types,
/// schema versions this journal does not read, another format version or another key.
fn check_header(
    bytes: &[u8],
    first: u64,
    path: &Path,
    expect: Option<(&Identity, &Versions)>,
    sealer: &Sealer,
) -> Result<HeaderCheck> {
    let (header, len) = match Header::decode(bytes, false) {
        Ok(it) => it,
        Err(HeaderFault::Damaged(reason)) => {
            return Ok(Err(format!("the file's header is damaged: {reason}")));
        }
        Err(HeaderFault::Version(found)) => {
            return Err(Error::FormatVersion {
                path: path.to_path_buf(),
                found,
                expected: format::FORMAT_VERSION,
            });
        }
    };
    if let Some((identity, versions)) = expect {
        versions::check_header(&header, path, identity, versions, Side::Events)?;
    }
    check_sealed(&header, path, sealer)?;
    if header.events != first {
        return Ok(Err(format!(
            "the header says the file starts at event {}, its name says {first}",
            header.events
        )));
    }
    Ok(Ok((len, (header.schema, header.event_schema))))
}

/// Refuses a journal whose files are gone (`expected` says there were some), or no
/// longer end where a clean close left them.
fn check_files(
    io: &Io,
    dir: &Path,
    files: &[(u64, PathBuf)],
    clean: Option<End>,
    expected: bool,
) -> Result<()> {
    if expected && files.is_empty() {
        return Err(Error::JournalCorrupt {
            path: dir.to_path_buf(),
            offset: 0,
            reason: "the directory held a journal, and no journal file is left in it".into(),
        });
    }
    let Some(end) = clean else { return Ok(()) };
    let expected = format::journal_name(end.first);
    let Some((first, path)) = files.last() else {
        return Err(Error::JournalCorrupt {
            path: dir.join(&expected),
            offset: 0,
            reason: format!("the journal was closed cleanly in {expected}, which is missing"),
        });
    };
    if *first != end.first {
        return Err(Error::JournalCorrupt {
            path: path.clone(),
            offset: 0,
            reason: format!(
                "the journal was closed cleanly in {expected}, but its last file is this one"
            ),
        });
    }
    let len = io.open(path, Open::Read).and_then(|file| file.len()).map_err(Error::io(path))?;
    if len != end.len {
        return Err(Error::JournalCorrupt {
            path: path.clone(),
            offset: len.min(end.len),
            reason: format!(
                "the journal was closed cleanly at byte {} of this file, which now holds {len} bytes",
                end.len
            ),
        });
    }
    Ok(())
}

/// Refuses a sealed file without a key or with the wrong one, and a plain file with a key.
pub(crate) fn check_sealed(header: &Header, path: &Path, sealer: &Sealer) -> Result<()> {
    let dir = path.parent().unwrap_or(path).to_path_buf();
    if header.sealed != sealer.is_on() {
        return Err(Error::Encryption { path: dir, encrypted: header.sealed });
    }
    if let Extra::KeyCheck(check) = &header.extra
        && header.sealed
        && !sealer
            .open(b"instastate journal key check", check)
            .is_ok_and(|it| *it == *super::KEYCHECK_PLAIN)
    {
        return Err(Error::WrongKey { path: dir });
    }
    Ok(())
}

/// One journal file being scanned.
struct Scan<'a> {
    bytes: &'a [u8],
    file: usize,
    last_file: bool,
    from: u64,
    /// The journal was closed cleanly: nothing at its end can be torn.
    clean: bool,
    /// The events' schema version the file's header records.
    schema: u32,
}

impl Scan<'_> {
    /// Checks the frames after the header (`start`); `next` is the number the next
    /// event must have, and is advanced past every event found. Records the file's
    /// sound span in `frames`.
    fn frames(&self, start: usize, next: &mut u64, frames: &mut Frames) -> Ending {
        let mut offset = start;
        let ending = loop {
            match format::read_frame(self.bytes.get(offset..).unwrap_or_default()) {
                Read::End => break Ending::Clean,
                Read::Frame(frame, len) => {
                    match frame {
                        Frame::Event { seq, .. } if seq != *next => {
                            let reason = format!("event {seq} stands where event {next} belongs");
                            break Ending::Damaged(offset, reason);
                        }
                        Frame::Event { seq, at, .. } => {
                            if seq >= self.from && frames.first_wanted.is_none() {
                                frames.first_wanted = Some((self.file, seq));
                            }
                            frames.last = Some((self.file, seq, at));
                            *next += 1;
                        }
                        Frame::Void { first, last } => frames.voids.push((first, last)),
                        Frame::Check { seq, digest } => {
                            frames.checks.insert(seq, digest);
                        }
                        // In a file before the last, the next file's number is
                        // checked against it anyway.
                        Frame::Link { next } if self.last_file => {
                            frames.dangling = Some((offset, next));
                        }
                        Frame::Link { .. } => {}
                    }
                    offset += len;
                }
                Read::Bad(_)
                    if self.last_file
                        && !self.clean
                        && !sound_after(self.bytes, offset)
                        && format::looks_torn(self.bytes, offset) =>
                {
                    break Ending::Torn(offset);
                }
                // A file before the last ends with a link to the next, not synced: a
                // crash may tear it. Nothing else is lost with it (the next file says
                // where the journal goes on), so it is left as it is.
                Read::Bad(_)
                    if !self.last_file
                        && self.bytes.len() - offset <= format::LINK_LEN
                        && format::looks_torn(self.bytes, offset) =>
                {
                    break Ending::Clean;
                }
                Read::Bad(reason) => break Ending::Damaged(offset, reason.to_owned()),
            }
        };
        frames.spans.push((start, offset, self.schema));
        ending
    }
}

/// Replays the sound, unvoided events numbered `from` or later, checking digests.
/// The spans were checked by [`Scan::frames`], so their frames are only parsed here.
#[allow(clippy::too_many_arguments)] // One call site; a struct would only rename them.
fn replay_found(
    dir: &Path,
    files: &[(u64, PathBuf)],
    contents: &[Vec<u8>],
    frames: &Frames,
    sealer: &Sealer,
    from: u64,
    voided: &dyn Fn(u64) -> bool,
    report: &mut Recovered,
    replay: &mut impl FnMut(Replayed<'_>) -> Result<Option<u64>>,
) -> Result<()> {
    if let Some((file, first)) = frames.first_wanted
        && first > from
    {
        let path = files.get(file).map(|(_, path)| path.clone()).unwrap_or_default();
        return Err(Error::JournalCorrupt {
            path,
            offset: 0,
            reason: format!(
                "events {from} to {} are missing: neither a snapshot nor the journal holds them",
                first - 1
            ),
        });
    }
    let files = files.iter().zip(contents).zip(&frames.spans);
    for (((file, path), bytes), &(start, end, schema)) in files {
        let mut offset = start;
        while let Some((frame, len)) = bytes.get(offset..end).and_then(format::parse_frame) {
            let at_offset = offset;
            offset += len;
            let Frame::Event { seq, at, bytes: stored } = frame else { continue };
            if seq < from {
                continue;
            }
            if voided(seq) {
                report.voided += 1;
                continue;
            }
            let plain = open_event(sealer, seq, stored).map_err(|reason| {
                Error::JournalCorrupt { path: path.clone(), offset: at_offset as u64, reason }
            })?;
            let replayed = Replayed {
                seq,
                at: Timestamp(at),
                bytes: &plain,
                schema,
                file: *file,
                offset: at_offset as u64,
            };
            let digest = replay(replayed)?;
            if let (Some(replayed), Some(&stored)) = (digest, frames.checks.get(&seq))
                && replayed != stored
            {
                let path = dir.to_path_buf();
                return Err(Error::ReplayDiverged { path, event: seq, stored, replayed });
            }
            report.replayed += 1;
        }
    }
    Ok(())
}

/// Whether a sound frame starts anywhere in `bytes` after `offset`: if so, the bad
/// bytes at `offset` are damage, not a torn last write.
pub(super) fn sound_after(bytes: &[u8], offset: usize) -> bool {
    (offset + 1..bytes.len()).any(|start| {
        matches!(format::read_frame(bytes.get(start..).unwrap_or_default()), Read::Frame(..))
    })
}

pub(super) fn open_event<'a>(
    sealer: &Sealer,
    seq: u64,
    stored: &'a [u8],
) -> std::result::Result<Cow<'a, [u8]>, String> {
    if !sealer.is_on() {
        return Ok(Cow::Borrowed(stored));
    }
    sealer
        .open(&event_aad(seq), stored)
        .map_err(|fault| format!("event {seq} cannot be opened: {fault}"))
}

/// Moves `files` into a new `salvaged-<time>` directory and writes `keep` back in
/// place of the first of them.
fn salvage(io: &Io, dir: &Path, files: &[(u64, PathBuf)], keep: &[u8]) -> Result<PathBuf> {
    let millis = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |it| it.as_millis());
    let aside = dir.join(format!("salvaged-{millis}"));
    io.create_dir_durably(&aside).map_err(Error::io(&aside))?;
    for (_, path) in files {
        let Some(name) = path.file_name() else { continue };
        let target = aside.join(name);
        io.rename(path, &target).map_err(Error::io(path))?;
    }
    io.sync_dir(&aside).map_err(Error::io(&aside))?;
    if let Some((_, path)) = files.first() {
        io.write_durably(path, keep).map_err(Error::io(path))?;
    }
    io.sync_dir(dir).map_err(Error::io(dir))?;
    Ok(aside)
}

/// Creates the journal file whose first event is `first`, durably, open for
/// appending; its header records the events' schema version `event_schema`.
pub(crate) fn create_journal_file(
    io: &Io,
    dir: &Path,
    identity: &Identity,
    event_schema: u32,
    sealer: &Sealer,
    first: u64,
) -> Result<(IoFile, PathBuf)> {
    let path = dir.join(format::journal_name(first));
    let extra = Extra::KeyCheck(key_check(sealer));
    let header = Header::new(identity, event_schema, sealer.is_on(), first, 0, extra);
    io.write_durably(&path, &header.encode()).map_err(Error::io(&path))?;
    let file = io.open(&path, Open::Append).map_err(Error::io(&path))?;
    Ok((file, path))
}

/// The journal files in `dir`, by first event number.
pub(crate) fn journal_files(io: &Io, dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    list(io, dir, FileKind::Journal)
}

/// The snapshot files in `dir`, by the number of events they cover.
pub(crate) fn snapshot_files(io: &Io, dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    list(io, dir, FileKind::Snapshot)
}

fn list(io: &Io, dir: &Path, kind: FileKind) -> Result<Vec<(u64, PathBuf)>> {
    let mut files = Vec::new();
    for entry in io.read_dir(dir).map_err(Error::io(dir))? {
        if let Some((found, n)) = entry.name.to_str().and_then(format::parse_name)
            && found == kind
        {
            files.push((n, dir.join(&entry.name)));
        }
    }
    files.sort();
    Ok(files)
}

/// Removes the temporary files a crash left behind; nothing when only looking.
fn remove_parts(io: &Io, dir: &Path, read_only: bool) -> Result<()> {
    if read_only {
        return Ok(());
    }
    for entry in io.read_dir(dir).map_err(Error::io(dir))? {
        if entry.name.to_str().is_some_and(|name| name.ends_with(PART_SUFFIX)) {
            let path = dir.join(&entry.name);
            io.remove_file(&path).map_err(Error::io(&path))?;
        }
    }
    Ok(())
}
