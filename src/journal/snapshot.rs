//! Snapshot files: the whole state after a number of events, written atomically
//! and durably, read back newest sound one first.

use std::path::{Path, PathBuf};

use super::{
    Identity, Versions,
    format::{self, Extra, Header, HeaderFault},
    recovery::{self, check_sealed},
    versions::{self, Side},
};
use crate::{Error, Result, crypt::Sealer, io::Io};

/// A sound snapshot read back: what it covers and its (opened) encoded state.
pub(crate) struct LoadedSnapshot {
    pub(crate) path: PathBuf,
    /// The number of events it covers: the next event's number.
    pub(crate) events: u64,
    /// The last timestamp given out before it.
    pub(crate) at: u64,
    /// The state's schema version it was written with.
    pub(crate) schema: u32,
    pub(crate) body: Vec<u8>,
}

fn aad(events: u64) -> Vec<u8> {
    let mut aad = b"instastate snapshot ".to_vec();
    aad.extend_from_slice(&events.to_le_bytes());
    aad
}

/// Writes the snapshot `bytes` (made by [`encode`]) covering `events` events: a
/// temporary file, renamed into place. Neither is synced: the caller syncs the
/// snapshot and its directory once something relies on it.
pub(crate) fn write(io: &Io, dir: &Path, events: u64, bytes: &[u8]) -> Result<PathBuf> {
    let path = dir.join(format::snapshot_name(events));
    io.write_unsynced(&path, bytes).map_err(Error::io(&path))?;
    Ok(path)
}

/// The bytes of the snapshot of the encoded state `body` covering `events`
/// events, as a snapshot file holds them.
pub(crate) fn encode(
    identity: &Identity,
    event_schema: u32,
    sealer: &Sealer,
    events: u64,
    at: u64,
    body: Vec<u8>,
) -> std::io::Result<Vec<u8>> {
    // Sealed in chunks: a state has no size bound, and a single seal one of 256 GiB.
    let stored = sealer.seal_stream(&aad(events), body)?;
    let extra = Extra::Body { len: stored.len() as u64, crc: crc32fast::hash(&stored) };
    let mut bytes = Header::new(identity, event_schema, sealer.is_on(), events, at, extra).encode();
    bytes.extend_from_slice(&stored);
    Ok(bytes)
}

/// Reads the newest sound snapshot in `dir`; the damaged ones passed over are
/// pushed to `unsound`. Type and schema version (unless `expect` is `None`),
/// format version and key mismatches are errors, not damage.
pub(crate) fn load_newest(
    io: &Io,
    dir: &Path,
    expect: Option<(&Identity, &Versions)>,
    sealer: &Sealer,
    unsound: &mut Vec<PathBuf>,
) -> Result<Option<LoadedSnapshot>> {
    for (events, path) in recovery::snapshot_files(io, dir)?.into_iter().rev() {
        match load(io, &path, events, expect, sealer)? {
            Ok(loaded) => return Ok(Some(loaded)),
            Err(_) => unsound.push(path),
        }
    }
    Ok(None)
}

/// Reads the snapshot at `path`, which its name says covers `events` events: the
/// snapshot, or why it is damaged. Type and schema version (unless `expect` is
/// `None`), format version and key mismatches are errors, not damage.
pub(crate) fn load(
    io: &Io,
    path: &Path,
    events: u64,
    expect: Option<(&Identity, &Versions)>,
    sealer: &Sealer,
) -> Result<std::result::Result<LoadedSnapshot, String>> {
    let bytes = io.read(path).map_err(Error::io(path))?;
    parse(&bytes, path, events, expect, sealer)
}

/// Reads the snapshot `bytes` (of the file at `path`, or the row of a database
/// named so), which is said to cover `events` events: as [`load`] does.
pub(crate) fn parse(
    bytes: &[u8],
    path: &Path,
    events: u64,
    expect: Option<(&Identity, &Versions)>,
    sealer: &Sealer,
) -> Result<std::result::Result<LoadedSnapshot, String>> {
    let (header, len) = match Header::decode(bytes, true) {
        Ok(it) => it,
        // A damaged snapshot, its version field included, is passed over: the
        // one before it and the journal after it hold the same events.
        Err(HeaderFault::Damaged(reason)) => {
            return Ok(Err(format!("its header is damaged: {reason}")));
        }
        Err(HeaderFault::Version(found)) => {
            let path = path.to_path_buf();
            return Err(Error::FormatVersion { path, found, expected: format::FORMAT_VERSION });
        }
    };
    if let Some((identity, versions)) = expect {
        versions::check_header(&header, path, identity, versions, Side::State)?;
    }
    check_sealed_snapshot(&header, path, sealer)?;
    let stored = bytes.get(len..).unwrap_or_default();
    let sound_body = matches!(header.extra, Extra::Body { len, crc } if len == stored.len() as u64 && crc == crc32fast::hash(stored));
    if !sound_body {
        return Ok(
            Err("its body does not match the length and checksum its header records".into()),
        );
    }
    if header.events != events {
        return Ok(Err(format!(
            "its header says it covers {} events, its name says {events}",
            header.events
        )));
    }
    let body = if !sealer.is_on() {
        stored.to_vec()
    } else if header.version == format::FORMAT_V1 {
        // Version 1 sealed a snapshot whole.
        let Ok(plain) = sealer.open(&aad(events), stored) else {
            return Ok(Err("its body cannot be opened with the key".into()));
        };
        plain.into_owned()
    } else {
        let Ok(plain) = sealer.open_file(&aad(events), stored.to_vec()) else {
            return Ok(Err("its body cannot be opened with the key".into()));
        };
        plain
    };
    let path = path.to_path_buf();
    Ok(Ok(LoadedSnapshot { path, events, at: header.at, schema: header.schema, body }))
}

fn check_sealed_snapshot(header: &Header, path: &Path, sealer: &Sealer) -> Result<()> {
    // A snapshot has no key check of its own: the journal's header checks the key,
    // and a snapshot that does not open under it counts as damaged.
    if header.sealed != sealer.is_on() {
        return check_sealed(header, path, sealer);
    }
    Ok(())
}

/// What keeping the newest snapshots leaves: the oldest kept one (the number of
/// events it covers, and its path), and the older ones, which can go.
pub(crate) struct Retained {
    pub(crate) oldest: (u64, PathBuf),
    pub(crate) old: Vec<PathBuf>,
}

/// Keeps the newest `keep` snapshots (at least one); `None` when there is none.
pub(crate) fn retained(io: &Io, dir: &Path, keep: usize) -> Result<Option<Retained>> {
    let mut files = recovery::snapshot_files(io, dir)?;
    let cut = files.len().saturating_sub(keep.max(1));
    let kept = files.split_off(cut);
    let old = files.into_iter().map(|(_, path)| path).collect();
    Ok(kept.into_iter().next().map(|oldest| Retained { oldest, old }))
}
