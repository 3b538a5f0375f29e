//! Looking at a journal directory without its types and without changing it: the
//! checks of [`open_versioned`](super::open_versioned) but the decoding of states and events,
//! for the command-line tool and for [`Store::verify`](crate::Store::verify).

use std::path::{Path, PathBuf};

use super::{
    Recovery,
    format::{self, Header},
    recovery::{self, Scope},
    snapshot,
};
use crate::{
    Error, Result,
    crypt::Sealer,
    io::Io,
    lockfile::{Kind, Look},
};

/// What a journal directory holds, read without knowing its types; see
/// [`PrevaylerBuilder::inspect`](crate::prevalence::PrevaylerBuilder::inspect).
///
/// A report means that opening the directory with the right types would succeed
/// as far as the journal's bytes go (its events could still fail to decode).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct JournalReport {
    /// The state type the journal was written for.
    pub state_type: String,
    /// The event type the journal was written for.
    pub event_type: String,
    /// The state's schema version its newest file was written with.
    pub schema: u32,
    /// The events' schema version its newest file was written with (1 for a
    /// journal written before events had a version of their own).
    pub event_schema: u32,
    /// Whether its events and snapshots are encrypted.
    pub encrypted: bool,
    /// How many events it holds, snapshots included: the next event's number.
    pub events: u64,
    /// How many events the newest sound snapshot covers; `None` without one.
    pub snapshot: Option<u64>,
    /// Newer snapshots that are damaged, and that opening passes over.
    pub unsound_snapshots: Vec<PathBuf>,
    /// The events after the snapshot that a replay would apply.
    pub replayed: u64,
    /// The voided events among them, which a replay skips.
    pub voided: u64,
    /// The bytes of a torn last write, which opening cuts off.
    pub torn_bytes: u64,
    /// Whether the journal was closed cleanly.
    pub closed_cleanly: bool,
}

/// Checks the journal in `dir` as opening it would, without its types: every
/// header, frame and checksum from the newest sound snapshot on, the numbering, the
/// links between files, a clean close's end, and (with the key) every sealed event.
/// It holds a shared lock on the directory meanwhile.
///
/// # Errors
/// What opening would fail with: [`Error::JournalCorrupt`], [`Error::FormatVersion`],
/// [`Error::Encryption`], [`Error::WrongKey`]; and [`Error::WrongDirectory`] or
/// [`Error::Locked`] when `dir` holds no journal or is open elsewhere.
pub(crate) fn inspect(io: &Io, dir: &Path, sealer: &Sealer) -> Result<JournalReport> {
    let look = Look::take(io, dir, Kind::Journal)?;
    let (clean, set_up) = (look.clean_end(), look.was_set_up());
    let mut unsound = Vec::new();
    let loaded = snapshot::load_newest(io, dir, None, sealer, &mut unsound)?;
    let covered = loaded.as_ref().map(|loaded| loaded.events);
    let from = covered.unwrap_or(0);
    let scope = Scope {
        io,
        expect: None,
        sealer,
        recovery: Recovery::Strict,
        from,
        clean,
        // A snapshot, even a damaged one, says the journal held events.
        expected: set_up || covered.is_some() || !unsound.is_empty(),
        read_only: true,
    };
    let (recovered, tail) = recovery::recover(dir, &scope, &[], &mut |_| Ok(None))?;
    let header = newest_header(io, dir, loaded.as_ref().map(|loaded| loaded.path.as_path()))?;
    Ok(JournalReport {
        state_type: header.state_type,
        event_type: header.event_type,
        schema: header.schema,
        event_schema: header.event_schema,
        encrypted: header.sealed,
        events: tail.next.max(from),
        snapshot: covered,
        unsound_snapshots: unsound,
        replayed: recovered.replayed,
        voided: recovered.voided,
        torn_bytes: recovered.torn_bytes,
        closed_cleanly: clean.is_some(),
    })
}

/// The header of the newest journal file, or of the snapshot loaded: what the
/// journal says it was written for.
fn newest_header(io: &Io, dir: &Path, snapshot: Option<&Path>) -> Result<Header> {
    let newest = recovery::journal_files(io, dir)?.pop().map(|(_, path)| path);
    let Some(path) = newest.as_deref().or(snapshot) else {
        return Err(Error::JournalCorrupt {
            path: dir.to_path_buf(),
            offset: 0,
            reason: "the directory holds neither a journal file nor a snapshot".into(),
        });
    };
    let bytes = io.read(path).map_err(Error::io(path))?;
    let is_snapshot = newest.is_none();
    // Checked by the recovery above already: a fault here is one it let through.
    format::Header::decode(&bytes, is_snapshot).map(|(header, _)| header).map_err(|_| {
        Error::JournalCorrupt {
            path: path.to_path_buf(),
            offset: 0,
            reason: "the file's header is damaged".into(),
        }
    })
}
