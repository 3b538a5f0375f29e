//! Recovery of a journal kept in a database (feature `postgres`): the newest
//! snapshot row, then the event frames after it, replayed as recovery replays a
//! journal's files (`recovery.rs`), with the same checks: the header's types,
//! versions and key, each frame's checksum, no event missing, voided events passed
//! over, and the replay checks compared.
//!
//! A database stores whole transactions: there is no torn write to cut, and
//! nothing to salvage. Damage is [`Error::DatabaseCorrupt`].

use std::{collections::HashMap, path::PathBuf, sync::Arc};

use super::{
    Durability, Identity, Opened, Recovered, Replayed, Restored, Timestamp, Versions,
    format::{self, Extra, Frame, Header, HeaderFault, Read},
    key_check, recovery, snapshot,
    versions::{self, Side},
    writer::{Database, Journal, Parts},
};
use crate::postgres::{FrameRow, PgReader};
use crate::{Error, Result, crypt::Sealer, io::Io, lockfile::Access};

/// The frames of a journal's rows: its events (number, timestamp, stored bytes,
/// events' schema version), voids and checks.
struct Frames<'a> {
    events: Vec<(u64, u64, &'a [u8], u32)>,
    voids: Vec<(u64, u64)>,
    checks: HashMap<u64, u64>,
}

/// Reads the frames of `rows`, each checked (its checksum, and that it is the
/// frame of the event its row says); why they are damaged.
fn frames(rows: &[FrameRow]) -> std::result::Result<Frames<'_>, String> {
    let mut frames = Frames { events: Vec::new(), voids: Vec::new(), checks: HashMap::new() };
    for row in rows {
        let frame = match format::read_frame(&row.frame) {
            Read::Frame(frame, len) if len == row.frame.len() => frame,
            Read::Frame(..) => return Err(format!("the frame of event {} holds more", row.seq)),
            Read::End | Read::Bad(_) => {
                return Err(format!("the frame of event {} is damaged", row.seq));
            }
        };
        match frame {
            Frame::Event { seq, at, bytes } if seq == row.seq => {
                frames.events.push((seq, at, bytes, row.schema));
            }
            Frame::Void { first, last } if first == row.seq => frames.voids.push((first, last)),
            Frame::Check { seq, digest } if seq == row.seq => {
                frames.checks.insert(seq, digest);
            }
            _ => return Err(format!("the frame of event {} is another's", row.seq)),
        }
    }
    Ok(frames)
}

/// How to open a journal kept in a database.
pub(crate) struct DatabaseConfig {
    pub(crate) identity: Identity,
    pub(crate) durability: Durability,
    pub(crate) sealer: Sealer,
}

impl DatabaseConfig {
    /// The parts of the journal it opens, with `access`.
    fn parts(self, versions: &Versions, access: Access) -> Parts {
        let DatabaseConfig { identity, durability, sealer } = self;
        let event_schema = versions.event;
        Parts { dir: None, identity, event_schema, durability, sealer, io: Io::default(), access }
    }
}

/// A state to go on from, instead of the newest snapshot: a follower's, promoted.
pub(crate) struct Start<S> {
    pub(crate) state: S,
    /// The events applied to it: the next event's number.
    pub(crate) applied: u64,
    /// The last timestamp applied to it.
    pub(crate) at: u64,
}

/// Opens the journal kept in `database`, as `open_versioned` opens one in files:
/// goes on from `start`, or loads the newest snapshot (or `initial()`), and
/// replays the events after it through `apply`; then records the current types
/// and versions as its header.
#[allow(clippy::too_many_arguments)] // Two callers; a struct would only rename them.
pub(crate) fn open_on_database<S>(
    database: Database,
    mut config: DatabaseConfig,
    versions: &Versions,
    start: Option<Start<S>>,
    mut initial: impl FnMut() -> Result<S>,
    restore: &mut impl FnMut(Restored<'_>) -> Result<S>,
    apply: &mut impl FnMut(&mut S, Replayed<'_>) -> Result<Option<u64>>,
) -> Result<Opened<S>> {
    // Every write is a commit: concurrent callers share one, in both durable modes.
    if config.durability == Durability::SyncEach {
        config.durability = Durability::GroupCommit;
    }
    let DatabaseConfig { identity, sealer, .. } = &config;
    let label = database.label();
    check_header(database.header()?, &label, identity, versions, sealer)?;
    let mut recovered = Recovered::default();
    // A state to go on from that a newer snapshot holds is passed over.
    let mut start = match start {
        Some(start) => {
            let newest = database.newest_snapshot_events()?;
            newest.is_none_or(|events| events <= start.applied).then_some(start)
        }
        None => None,
    };
    let (state, next, clock) = loop {
        let (mut state, from, clock, started) = if let Some(start) = start.take() {
            (start.state, start.applied, start.at, true)
        } else {
            let found = database.newest_snapshot()?;
            let expect = (identity, versions);
            let (state, from, clock) =
                snapshot_or(found, &label, expect, sealer, &mut initial, restore, &mut recovered)?;
            (state, from, clock, false)
        };
        let rows = database.frames_from(from)?;
        match replay_rows(&rows, from, clock, sealer, &label, &mut state, apply)? {
            Replay::Done { next, clock, replayed, voided } => {
                recovered.replayed += replayed;
                recovered.voided += voided;
                break (state, next, clock);
            }
            // The frames it needs are gone, held by a newer snapshot: from there.
            Replay::Gap { .. } if started => {}
            Replay::Gap { first } => return Err(missing(&label, from, first)),
        }
    };
    // From now on, frames are written with the current types and versions.
    database.set_header(&header_bytes(identity, versions, sealer), versions.event)?;
    let parts = config.parts(versions, Access::ReadWrite);
    let journal = Journal::on_database(parts, Arc::new(database), next, clock);
    Ok(Opened { state, applied: next, at: clock, journal, recovered })
}

/// Reads the journal kept at `reader`'s location without its lease, as a
/// read-only opening reads files: the newest snapshot (or `initial()`) and the
/// events after it, through `apply`. The journal it returns refuses every event
/// ([`Error::ReadOnly`]) and writes nothing.
pub(crate) fn read_on_database<S>(
    reader: &mut PgReader,
    config: DatabaseConfig,
    versions: &Versions,
    mut initial: impl FnMut() -> Result<S>,
    restore: &mut impl FnMut(Restored<'_>) -> Result<S>,
    apply: &mut impl FnMut(&mut S, Replayed<'_>) -> Result<Option<u64>>,
) -> Result<Opened<S>> {
    let DatabaseConfig { identity, sealer, .. } = &config;
    let label = reader.label();
    check_header(reader.header()?, &label, identity, versions, sealer)?;
    let mut recovered = Recovered::default();
    let mut tries = 0;
    let (state, next, clock) = loop {
        let found = reader.newest_snapshot()?;
        let expect = (identity, versions);
        let (mut state, from, clock) =
            snapshot_or(found, &label, expect, sealer, &mut initial, restore, &mut recovered)?;
        let rows = reader.frames_from(from)?;
        match replay_rows(&rows, from, clock, sealer, &label, &mut state, apply)? {
            Replay::Done { next, clock, replayed, voided } => {
                recovered.replayed += replayed;
                recovered.voided += voided;
                break (state, next, clock);
            }
            // The writer took a newer snapshot between the two reads, and dropped
            // the frames it covers: read again from it.
            Replay::Gap { .. } if tries < 3 => tries += 1,
            Replay::Gap { first } => return Err(missing(&label, from, first)),
        }
    };
    let parts = config.parts(versions, Access::ReadOnly);
    let journal = Journal::read_only(parts, None, next, clock);
    Ok(Opened { state, applied: next, at: clock, journal, recovered })
}

/// Checks the journal's header `bytes` (if it has one yet), kept at `label`: its
/// types, versions and key, as a file's header is checked.
pub(crate) fn check_header(
    bytes: Option<Vec<u8>>,
    label: &str,
    identity: &Identity,
    versions: &Versions,
    sealer: &Sealer,
) -> Result<()> {
    let Some(bytes) = bytes else { return Ok(()) };
    let path = PathBuf::from(label);
    let header = match Header::decode(&bytes, false) {
        Ok((header, _)) => header,
        Err(HeaderFault::Damaged(reason)) => {
            return Err(damaged(label, format!("the journal's header is damaged: {reason}")));
        }
        Err(HeaderFault::Version(found)) => {
            return Err(Error::FormatVersion { path, found, expected: format::FORMAT_VERSION });
        }
    };
    versions::check_header(&header, &path, identity, versions, Side::Events)?;
    recovery::check_sealed(&header, &path, sealer)
}

/// The header a journal written with `identity`, `versions` and `sealer` records,
/// encoded as a file's.
pub(crate) fn header_bytes(identity: &Identity, versions: &Versions, sealer: &Sealer) -> Vec<u8> {
    let extra = Extra::KeyCheck(key_check(sealer));
    Header::new(identity, versions.event, sealer.is_on(), 0, 0, extra).encode()
}

/// The state of the snapshot `found` (the events it covers and its bytes), with
/// those events and its last timestamp.
pub(crate) fn load_snapshot<S>(
    found: Option<(u64, Vec<u8>)>,
    label: &str,
    expect: (&Identity, &Versions),
    sealer: &Sealer,
    restore: &mut impl FnMut(Restored<'_>) -> Result<S>,
) -> Result<Option<(S, u64, u64)>> {
    let Some((events, bytes)) = found else { return Ok(None) };
    let path = PathBuf::from(label);
    match snapshot::parse(&bytes, &path, events, Some(expect), sealer)? {
        Ok(loaded) => {
            let restored = Restored { path: &path, schema: loaded.schema, bytes: &loaded.body };
            Ok(Some((restore(restored)?, events, loaded.at)))
        }
        Err(reason) => Err(damaged(label, format!("the snapshot of {events} events: {reason}"))),
    }
}

/// The state of the snapshot `found` (noted in `recovered`), or `initial()` when
/// there is none: with the events it covers and its last timestamp.
fn snapshot_or<S>(
    found: Option<(u64, Vec<u8>)>,
    label: &str,
    expect: (&Identity, &Versions),
    sealer: &Sealer,
    initial: &mut impl FnMut() -> Result<S>,
    restore: &mut impl FnMut(Restored<'_>) -> Result<S>,
    recovered: &mut Recovered,
) -> Result<(S, u64, u64)> {
    match load_snapshot(found, label, expect, sealer, restore)? {
        Some((state, events, at)) => {
            recovered.snapshot = Some(events);
            Ok((state, events, at))
        }
        None => Ok((initial()?, 0, 0)),
    }
}

/// What [`replay_rows`] did.
pub(crate) enum Replay {
    /// Replayed: the next event's number and the last timestamp, how many events
    /// were applied and how many passed over as voided.
    Done { next: u64, clock: u64, replayed: u64, voided: u64 },
    /// The rows start at event `first`, after the one wanted: the events between
    /// are held only by a snapshot (or lost).
    Gap { first: u64 },
}

/// Applies to `state` the events of `rows` from `next` on (the state's last
/// timestamp is `clock`), as recovery replays a file's frames: voided events are
/// passed over, a check found is compared. Events must follow one another.
pub(crate) fn replay_rows<S>(
    rows: &[FrameRow],
    next: u64,
    clock: u64,
    sealer: &Sealer,
    label: &str,
    state: &mut S,
    apply: &mut impl FnMut(&mut S, Replayed<'_>) -> Result<Option<u64>>,
) -> Result<Replay> {
    let Frames { events, voids, checks } = frames(rows).map_err(|it| damaged(label, it))?;
    let (mut next, mut clock, mut replayed, mut voided) = (next, clock, 0, 0);
    for (seq, at, stored, schema) in events {
        if seq < next {
            continue;
        }
        if seq != next {
            if replayed == 0 && voided == 0 {
                return Ok(Replay::Gap { first: seq });
            }
            return Err(missing(label, next, seq));
        }
        next = seq + 1;
        clock = clock.max(at);
        if voids.iter().any(|&(first, last)| (first..=last).contains(&seq)) {
            voided += 1;
            continue;
        }
        let plain = recovery::open_event(sealer, seq, stored)
            .map_err(|reason| damaged(label, format!("event {seq}: {reason}")))?;
        let event = Replayed { seq, at: Timestamp(at), bytes: &plain, schema, file: 0, offset: 0 };
        let digest = apply(state, event)?;
        if let (Some(replayed), Some(&stored)) = (digest, checks.get(&seq))
            && replayed != stored
        {
            let path = PathBuf::from(label);
            return Err(Error::ReplayDiverged { path, event: seq, stored, replayed });
        }
        replayed += 1;
    }
    Ok(Replay::Done { next, clock, replayed, voided })
}

fn damaged(label: &str, reason: String) -> Error {
    Error::DatabaseCorrupt { location: label.to_owned(), reason }
}

fn missing(label: &str, from: u64, first: u64) -> Error {
    damaged(
        label,
        format!(
            "events {from} to {} are missing: neither a snapshot nor the journal holds them",
            first.saturating_sub(1)
        ),
    )
}
