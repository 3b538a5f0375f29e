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
use crate::postgres::FrameRow;
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

/// Opens the journal kept in `database`, as `open_versioned` opens one in files:
/// loads its newest snapshot, or `initial()`, and replays the events after it
/// through `apply`; then records the current types and versions as its header.
pub(crate) fn open_on_database<S>(
    database: Database,
    config: DatabaseConfig,
    versions: &Versions,
    mut initial: impl FnMut() -> Result<S>,
    restore: &mut impl FnMut(Restored<'_>) -> Result<S>,
    apply: &mut impl FnMut(&mut S, Replayed<'_>) -> Result<Option<u64>>,
) -> Result<Opened<S>> {
    let DatabaseConfig { identity, durability, sealer } = config;
    let label = PathBuf::from(database.label());
    let damaged = |reason: String| Error::DatabaseCorrupt { location: database.label(), reason };
    if let Some(bytes) = database.header()? {
        let header = match Header::decode(&bytes, false) {
            Ok((header, _)) => header,
            Err(HeaderFault::Damaged(reason)) => {
                return Err(damaged(format!("the journal's header is damaged: {reason}")));
            }
            Err(HeaderFault::Version(found)) => {
                return Err(Error::FormatVersion {
                    path: label,
                    found,
                    expected: format::FORMAT_VERSION,
                });
            }
        };
        versions::check_header(&header, &label, &identity, versions, Side::Events)?;
        recovery::check_sealed(&header, &label, &sealer)?;
    }
    let expect = Some((&identity, versions));
    let (mut state, from, mut clock, covered) = match database.newest_snapshot()? {
        Some((events, bytes)) => match snapshot::parse(&bytes, &label, events, expect, &sealer)? {
            Ok(loaded) => {
                let restored =
                    Restored { path: &label, schema: loaded.schema, bytes: &loaded.body };
                (restore(restored)?, events, loaded.at, Some(events))
            }
            Err(reason) => {
                return Err(damaged(format!("the snapshot of {events} events: {reason}")));
            }
        },
        None => (initial()?, 0, 0, None),
    };
    let rows = database.frames_from(from)?;
    let Frames { events, voids, checks } = frames(&rows).map_err(damaged)?;
    let mut recovered = Recovered::default();
    let mut next = from;
    for (seq, at, stored, schema) in events {
        if seq != next {
            return Err(damaged(format!(
                "events {next} to {} are missing: neither a snapshot nor the journal holds them",
                seq.saturating_sub(1)
            )));
        }
        next = seq + 1;
        clock = clock.max(at);
        if voids.iter().any(|&(first, last)| (first..=last).contains(&seq)) {
            recovered.voided += 1;
            continue;
        }
        let plain = recovery::open_event(&sealer, seq, stored)
            .map_err(|reason| damaged(format!("event {seq}: {reason}")))?;
        let replayed =
            Replayed { seq, at: Timestamp(at), bytes: &plain, schema, file: 0, offset: 0 };
        let digest = apply(&mut state, replayed)?;
        if let (Some(replayed), Some(&stored)) = (digest, checks.get(&seq))
            && replayed != stored
        {
            return Err(Error::ReplayDiverged { path: label, event: seq, stored, replayed });
        }
        recovered.replayed += 1;
    }
    // From now on, frames are written with the current types and versions.
    let header = Header::new(
        &identity,
        versions.event,
        sealer.is_on(),
        0,
        0,
        Extra::KeyCheck(key_check(&sealer)),
    );
    database.set_header(&header.encode(), versions.event)?;
    recovered.snapshot = covered;
    let parts = Parts {
        dir: None,
        identity,
        event_schema: versions.event,
        durability,
        sealer,
        io: Io::default(),
        access: Access::ReadWrite,
    };
    let journal = Journal::on_database(parts, Arc::new(database), next, clock);
    Ok(Opened { state, applied: next, at: clock, journal, recovered })
}
