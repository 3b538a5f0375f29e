//! The lock file of every directory instastate owns, whatever its kind: a store, a
//! [`Prevayler`](crate::Prevayler)'s journal, or a journaled cell's journal.
//!
//! One name for all (`instastate.lock`), so that no two kinds of opener share a
//! directory: the file is `flock`ed while the directory is open. It also says what
//! the directory holds (its *kind*), so that a store is never opened as a journal or
//! the other way round, and a directory holding anything else is refused rather than
//! quietly taken over. For a journal it records whether the journal was closed
//! cleanly and where it ended: only a crash can leave a torn last write, so after a
//! clean close any damage at the end of the journal is damage, not a tear.
//!
//! ```text
//! "INSTALCK" | version u8 = 1 | kind u8 (1 store, 2 journal) | clean u8 | 0 u8
//!            | first event of the last journal file u64 | its length u64 | crc32 u32
//! ```
//!
//! (little-endian, as the journal's own files). An empty lock file is one whose
//! directory was never set up.

use std::path::{Path, PathBuf};

use crate::{
    Error, Result,
    io::{DirHold, Io, IoFile, Open},
    journal::format::parse_name,
};

/// The lock file's name, in every kind of directory.
pub(crate) const LOCK_FILE: &str = "instastate.lock";
/// What store directories held as their lock file before it had a kind.
const OLD_STORE_LOCK: &str = "LOCK";

const MAGIC: [u8; 8] = *b"INSTALCK";
const VERSION: u8 = 1;
const LEN: usize = 8 + 4 + 8 + 8 + 4;

/// What a directory holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Store,
    Journal,
}

impl Kind {
    fn tag(self) -> u8 {
        match self {
            Kind::Store => 1,
            Kind::Journal => 2,
        }
    }

    /// The directory, as errors name it.
    fn directory(self) -> &'static str {
        match self {
            Kind::Store => "store directory",
            Kind::Journal => "journal directory",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Kind::Store => "a store of cells",
            Kind::Journal => "a journal of events (a `Prevayler` directory)",
        }
    }
}

/// Whether a directory is opened to change it, or only to read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    ReadWrite,
    ReadOnly,
}

/// An open directory's lock: exclusive to change it, shared to only read it.
#[derive(Debug)]
pub(crate) enum Hold {
    Exclusive(DirLock),
    Shared(Look),
}

/// Where a journal ended when it was closed cleanly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct End {
    /// The first event number of the last journal file.
    pub(crate) first: u64,
    /// That file's length in bytes.
    pub(crate) len: u64,
}

/// What the lock file says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mark {
    kind: Kind,
    /// `Some` when a journal was closed cleanly: where it ended.
    end: Option<End>,
}

/// A directory's lock, held while the directory is open.
#[derive(Debug)]
pub(crate) struct DirLock {
    _hold: DirHold,
    file: IoFile,
    path: PathBuf,
    kind: Kind,
    /// What the lock file said when the directory was opened.
    found: Option<Mark>,
}

impl DirLock {
    /// Locks directory `dir` (creating it if needed) to open it as `kind`, refusing
    /// the empty path, a file, a directory of the other kind, and a non-empty
    /// directory of no kind of ours.
    ///
    /// # Errors
    /// [`Error::WrongDirectory`], [`Error::Locked`], or [`Error::Io`].
    pub(crate) fn acquire(io: &Io, dir: &Path, kind: Kind) -> Result<DirLock> {
        let wrong = wrong_directory(dir, kind);
        check_path(dir, kind, true)?;
        // Looked at before anything is made in it: a directory that is refused is
        // left exactly as it was. Looked at again once locked, with its lock file.
        if dir.is_dir() {
            check_kind(&classify(io, dir)?, None, kind).map_err(&wrong)?;
        }
        io.create_dir_durably(dir).map_err(Error::io(dir))?;
        let hold = io.lock_dir(dir, kind.directory())?;
        let path = dir.join(LOCK_FILE);
        let file = io.open(&path, Open::ReadWriteCreate).map_err(Error::io(&path))?;
        let bytes = file.read_all().map_err(Error::io(&path))?;
        let found = decode(&bytes);
        check_kind(&classify(io, dir)?, found, kind).map_err(&wrong)?;
        Ok(DirLock { _hold: hold, file, path, kind, found })
    }

    /// Whether the directory was set up as this kind before (the lock file said so).
    pub(crate) fn was_set_up(&self) -> bool {
        self.found.is_some()
    }

    /// Where the journal ended, if it was closed cleanly.
    pub(crate) fn clean_end(&self) -> Option<End> {
        self.found.and_then(|mark| mark.end)
    }

    /// Records the directory's kind, if the lock file does not say it yet. Not synced:
    /// a store's own files say what it is too, and this only makes that plainer.
    pub(crate) fn note_kind(&mut self) {
        if self.found.is_some() {
            return;
        }
        let mark = Mark { kind: self.kind, end: None };
        if self.file.write_all_at(&encode(&mark), 0).is_ok() {
            self.found = Some(mark);
        }
    }

    /// Records that the directory is set up as its kind and open: a crash from now on
    /// may tear the journal's last write. Durably when it replaces a clean close's
    /// mark, which would otherwise outlive a crash and take a torn write for damage;
    /// a first mark needs no sync (the journal's files say what the directory is).
    pub(crate) fn mark_open(&mut self) -> Result<()> {
        let replaces_clean = matches!(self.found, Some(Mark { end: Some(_), .. }));
        self.write(Mark { kind: self.kind, end: None }, replaces_clean)
    }

    /// Records that the journal was closed cleanly, ending at `end`. Not synced: the
    /// mark only sharpens what damage is told apart from a crash's torn write, and a
    /// power loss that takes it leaves the mark of the open, which is the safe side.
    pub(crate) fn mark_closed(&mut self, end: End) -> Result<()> {
        self.write(Mark { kind: self.kind, end: Some(end) }, false)
    }

    fn write(&mut self, mark: Mark, sync: bool) -> Result<()> {
        if self.found == Some(mark) {
            return Ok(());
        }
        self.file.write_all_at(&encode(&mark), 0).map_err(Error::io(&self.path))?;
        if sync {
            self.file.sync_data().map_err(Error::io(&self.path))?;
        }
        self.found = Some(mark);
        Ok(())
    }
}

/// What a look makes of a directory that was never set up.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Unset {
    /// It holds nothing of ours: refuse it.
    Refuse,
    /// It is an empty one of the kind looked for.
    Empty,
}

/// A look at a directory, under a shared lock: nothing is created or written.
#[derive(Debug)]
pub(crate) struct Look {
    _hold: DirHold,
    found: Option<Mark>,
}

impl Look {
    /// Takes a shared lock on directory `dir` to look at it as `kind`, refusing the
    /// empty path, a missing directory, a file, a directory of the other kind or of
    /// none of ours, and a directory open to be changed.
    ///
    /// # Errors
    /// [`Error::WrongDirectory`], [`Error::Locked`], or [`Error::Io`].
    pub(crate) fn take(io: &Io, dir: &Path, kind: Kind) -> Result<Look> {
        Look::take_as(io, dir, kind, Unset::Refuse)
    }

    /// Looks at `dir` as [`take`](Self::take) does, where a directory that was never
    /// set up (it holds nothing of any kind) is an empty one of `kind`, as opening it
    /// to change it would take it.
    fn take_as(io: &Io, dir: &Path, kind: Kind, unset: Unset) -> Result<Look> {
        let wrong = wrong_directory(dir, kind);
        check_path(dir, kind, false)?;
        let hold = io.lock_dir_shared(dir, kind.directory())?;
        let path = dir.join(LOCK_FILE);
        let bytes = match io.read(&path) {
            Ok(bytes) => bytes,
            // A directory never set up, or a copy of one (a backup): no mark.
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(err) => return Err(Error::io(&path)(err)),
        };
        let found = decode(&bytes);
        let seen = classify(io, dir)?;
        check_kind(&seen, found, kind).map_err(&wrong)?;
        if found.is_none() && seen.kind.is_none() && unset == Unset::Refuse {
            let ours = if kind == Kind::Store { "store" } else { "journal" };
            return Err(wrong(format!("it holds no instastate {ours}")));
        }
        Ok(Look { _hold: hold, found })
    }

    /// Whether the directory was set up as its kind (its lock file says so).
    pub(crate) fn was_set_up(&self) -> bool {
        self.found.is_some()
    }

    /// Where the journal ended, if it was closed cleanly.
    pub(crate) fn clean_end(&self) -> Option<End> {
        self.found.and_then(|mark| mark.end)
    }
}

impl Hold {
    /// Locks directory `dir` to open it as `kind` with `access`: see
    /// [`DirLock::acquire`] and [`Look::take`]. `None` when only reading a directory
    /// that does not exist: there is nothing to lock, and nothing to read.
    ///
    /// A directory that was never set up is taken for an empty one of `kind`, as
    /// [`DirLock::acquire`] takes it (the caller knows what the directory is for).
    ///
    /// # Errors
    /// [`Error::WrongDirectory`], [`Error::Locked`], or [`Error::Io`].
    pub(crate) fn take(io: &Io, dir: &Path, kind: Kind, access: Access) -> Result<Option<Hold>> {
        match access {
            Access::ReadWrite => {
                DirLock::acquire(io, dir, kind).map(|lock| Some(Hold::Exclusive(lock)))
            }
            Access::ReadOnly if !dir.exists() => Ok(None),
            Access::ReadOnly => {
                Look::take_as(io, dir, kind, Unset::Empty).map(|look| Some(Hold::Shared(look)))
            }
        }
    }

    /// Whether the directory was set up as its kind before (the lock file said so).
    pub(crate) fn was_set_up(&self) -> bool {
        match self {
            Hold::Exclusive(lock) => lock.was_set_up(),
            Hold::Shared(look) => look.was_set_up(),
        }
    }

    /// Where the journal ended, if it was closed cleanly.
    pub(crate) fn clean_end(&self) -> Option<End> {
        match self {
            Hold::Exclusive(lock) => lock.clean_end(),
            Hold::Shared(look) => look.clean_end(),
        }
    }

    /// See [`DirLock::note_kind`]; a shared lock records nothing.
    pub(crate) fn note_kind(&mut self) {
        if let Hold::Exclusive(lock) = self {
            lock.note_kind();
        }
    }

    /// See [`DirLock::mark_open`]; a shared lock records nothing.
    pub(crate) fn mark_open(&mut self) -> Result<()> {
        match self {
            Hold::Exclusive(lock) => lock.mark_open(),
            Hold::Shared(_) => Ok(()),
        }
    }

    /// See [`DirLock::mark_closed`]; a shared lock records nothing.
    pub(crate) fn mark_closed(&mut self, end: End) -> Result<()> {
        match self {
            Hold::Exclusive(lock) => lock.mark_closed(end),
            Hold::Shared(_) => Ok(()),
        }
    }
}

/// Makes the error refusing `dir` as `kind` for a reason.
fn wrong_directory(dir: &Path, kind: Kind) -> impl Fn(String) -> Error {
    let path = dir.to_path_buf();
    move |reason| Error::WrongDirectory { path: path.clone(), kind: kind.describe(), reason }
}

/// Refuses the empty path and a file, and a missing directory unless `may_create`.
fn check_path(dir: &Path, kind: Kind, may_create: bool) -> Result<()> {
    let reason = if dir.as_os_str().is_empty() {
        "the path is empty (use \".\" for the working directory)"
    } else if dir.is_dir() || (may_create && !dir.exists()) {
        return Ok(());
    } else if dir.exists() {
        "it is not a directory"
    } else {
        "it does not exist"
    };
    Err(wrong_directory(dir, kind)(reason.into()))
}

/// Why a directory whose entries say `seen` and whose lock file says `found` cannot
/// be opened as `kind`, if it cannot.
fn check_kind(seen: &Seen, found: Option<Mark>, kind: Kind) -> std::result::Result<(), String> {
    match found.map(|mark| mark.kind).or(seen.kind) {
        Some(held) if held != kind => Err(format!("it holds {}", held.describe())),
        None if !seen.foreign.is_empty() => {
            let names = seen.foreign.iter().take(3).cloned().collect::<Vec<_>>().join(", ");
            let ours = if kind == Kind::Store { "store" } else { "journal" };
            Err(format!("it holds other files ({names}), and no instastate {ours}"))
        }
        _ => Ok(()),
    }
}

/// What the entries of a directory say it holds.
struct Seen {
    kind: Option<Kind>,
    /// Entries that belong to no kind of ours.
    foreign: Vec<String>,
}

fn classify(io: &Io, dir: &Path) -> Result<Seen> {
    let (mut store, mut journal, mut foreign) = (false, false, Vec::new());
    for entry in io.read_dir(dir).map_err(Error::io(dir))? {
        let name = entry.name.to_string_lossy();
        match &*name {
            LOCK_FILE | OLD_STORE_LOCK => {}
            "sled" | "sled.new" | "sled.old" | "values" | "witness" | "journals" => store = true,
            _ if name.ends_with(crate::io::PART_SUFFIX) => {}
            _ if parse_name(&name).is_some() || name.starts_with("salvaged-") => journal = true,
            _ => foreign.push(name.into_owned()),
        }
    }
    let kind = match (store, journal) {
        (true, false) => Some(Kind::Store),
        (false, true) => Some(Kind::Journal),
        // Both: not a directory we made; the foreign entries decide nothing either.
        (true, true) => {
            foreign.push("a store's and a journal's files together".into());
            None
        }
        (false, false) => None,
    };
    Ok(Seen { kind, foreign })
}

fn encode(mark: &Mark) -> [u8; LEN] {
    let mut out = Vec::with_capacity(LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&[VERSION, mark.kind.tag(), u8::from(mark.end.is_some()), 0]);
    let end = mark.end.unwrap_or(End { first: 0, len: 0 });
    out.extend_from_slice(&end.first.to_le_bytes());
    out.extend_from_slice(&end.len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&out).to_le_bytes());
    let mut bytes = [0; LEN];
    for (to, from) in bytes.iter_mut().zip(out) {
        *to = from;
    }
    bytes
}

/// The mark in a lock file's bytes; `None` for an empty or damaged one (the
/// directory's entries then say what it holds).
fn decode(bytes: &[u8]) -> Option<Mark> {
    let (body, crc) = bytes.get(..LEN)?.split_last_chunk::<4>()?;
    if crc32fast::hash(body) != u32::from_le_bytes(*crc) {
        return None;
    }
    let (magic, rest) = body.split_first_chunk::<8>()?;
    let ([version, kind, clean, _], rest) = rest.split_first_chunk::<4>().map(|(a, b)| (*a, b))?;
    if *magic != MAGIC || version != VERSION {
        return None;
    }
    let kind = match kind {
        1 => Kind::Store,
        2 => Kind::Journal,
        _ => return None,
    };
    let (first, rest) = rest.split_first_chunk::<8>()?;
    let (len, _) = rest.split_first_chunk::<8>()?;
    let end = End { first: u64::from_le_bytes(*first), len: u64::from_le_bytes(*len) };
    Some(Mark { kind, end: (clean == 1).then_some(end) })
}

/// Decodes a lock file's bytes, and checks that a mark read back encodes to one
/// that reads the same: the fuzz target's view of this module.
#[cfg(feature = "fuzz")]
pub(crate) fn fuzz_decode(bytes: &[u8]) {
    if let Some(mark) = decode(bytes) {
        assert_eq!(decode(&encode(&mark)), Some(mark), "a lock file's mark does not round-trip");
    }
}

/// Lock files of every kind and mark, to start the fuzz target's corpus from.
#[cfg(feature = "fuzz")]
pub(crate) fn fuzz_seeds() -> Vec<Vec<u8>> {
    let ends = [None, Some(End { first: 7, len: 4096 })];
    let kinds = [Kind::Store, Kind::Journal];
    kinds
        .into_iter()
        .flat_map(|kind| ends.map(|end| encode(&Mark { kind, end }).to_vec()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_round_trip_and_damage_reads_as_none() {
        for mark in [
            Mark { kind: Kind::Store, end: None },
            Mark { kind: Kind::Journal, end: Some(End { first: 7, len: 99 }) },
        ] {
            let bytes = encode(&mark);
            assert_eq!(decode(&bytes), Some(mark));
            for bit in 0..LEN * 8 {
                let mut flipped = bytes;
                if let Some(byte) = flipped.get_mut(bit / 8) {
                    *byte ^= 1 << (bit % 8);
                }
                assert_eq!(decode(&flipped), None, "bit {bit}");
            }
        }
        assert_eq!(decode(b""), None);
    }
}
