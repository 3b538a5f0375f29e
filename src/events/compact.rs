//! Compaction: reclaiming the disk that removed events take in the journal files.
//!
//! Deletes, truncations, tombstones and retention rules only hide events from
//! reads; their bytes stay in the journal. [`EventStore::compact`] rewrites the
//! journal files the writer is done with (every file but the last), dropping the
//! data of the events the store will never read again: those of tombstoned
//! streams, and those below a stream's floor (deleted or truncated). Everything
//! else of them stays: the batch's heads (stream, version, id) and each event's
//! type, metadata, tags and triggers, so that every position, version, id, tag and
//! trigger means what it meant, the index rebuilt from the journal is the index
//! before, and a conditional append conflicts as it did. A dropped event is flagged
//! in its batch (`batch.rs`, format 2), so that no reader decodes it as data.
//!
//! Whole batches are not removed: the journal numbers its events without gaps,
//! and the index finds a batch's positions by its number; keeping the heads costs
//! a few dozen bytes per event and keeps that bookkeeping as it is.
//!
//! A retention rule can be lifted, which shows the events it hid again. So
//! compaction first makes what each rule hides permanent: it journals a truncation
//! of the stream up to the first version the rule still shows (what
//! [`EventStore::truncate_stream`] journals), and then drops only what is below a
//! floor. After a compaction, lifting a rule no longer shows the events it hid then.
//!
//! Each file is rewritten beside itself and renamed over it (`journal/rewrite.rs`);
//! appends go on meanwhile (they write to the last file, and wait for nothing of a
//! compaction), and so do reads, which find a frame that moved by scanning its file
//! again (`locate.rs`). A checkpoint follows, whose frame table knows the new
//! offsets.

use std::{
    collections::BTreeMap,
    hash::{DefaultHasher, Hash, Hasher},
};

use serde::{Serialize, de::DeserializeOwned};

use super::{
    EventStore,
    batch::{self, Command},
    index::Life,
    locate::{Keep, ReadAhead},
};
use crate::{Error, Result, journal};

/// What [`EventStore::compact`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Compacted {
    /// The journal files rewritten (none in a database).
    pub files: u64,
    /// Their bytes before (in a database: the bytes of event data the store
    /// held).
    pub bytes_before: u64,
    /// Their bytes after (in a database: the bytes of event data the store holds).
    pub bytes_after: u64,
    /// The events whose data was dropped.
    pub events_dropped: u64,
    /// The streams whose retention rules hid events, truncated so that they stay
    /// hidden.
    pub streams_truncated: u64,
}

impl Compacted {
    /// The bytes reclaimed: `bytes_before - bytes_after`.
    #[must_use]
    pub fn bytes_reclaimed(&self) -> u64 {
        self.bytes_before.saturating_sub(self.bytes_after)
    }
}

impl<E: Serialize + DeserializeOwned> EventStore<E> {
    /// Reclaims the disk taken by the data of events the store will never read
    /// again: those of tombstoned streams, and those deleted, truncated, or hidden
    /// by a retention rule. Every read gives what it gave before; appends, reads
    /// and subscriptions go on meanwhile, from other threads (compactions run one at
    /// a time).
    ///
    /// Only the journal files before the one being appended to are rewritten: the
    /// events of the last one wait for a later compaction, after a checkpoint has
    /// started a new file. Each file is written beside the old one, synced, and
    /// renamed over it: a crash leaves the one or the other, both whole. A
    /// checkpoint follows.
    ///
    /// What a retention rule hides is made permanent first: a truncation of the
    /// stream up to the first event the rule still shows is journaled, so that
    /// lifting the rule later does not show the events whose data is gone.
    ///
    /// In a database, the events' data is set to NULL (in one statement, which
    /// appends do not wait for) and the events' table vacuumed, which leaves the
    /// room free for the database to reuse; [`Compacted`] then counts the bytes of
    /// event data the namespace holds, and no files. Compactions of several
    /// processes may overlap there: each event's data is dropped, and counted,
    /// once.
    ///
    /// # Example
    /// ```
    /// use instastate::events::{EventStore, Expected};
    ///
    /// # fn main() -> instastate::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let events = EventStore::<String>::open(dir.path())?;
    /// events.append("draft-1", Expected::NoStream, ["a long draft".repeat(1000)])?;
    /// events.tombstone_stream("draft-1", Expected::Any)?;
    /// events.checkpoint()?; // the next append starts a new journal file
    /// events.append("draft-2", Expected::NoStream, ["short".to_owned()])?;
    ///
    /// // In the background, while appends go on:
    /// let store = events.clone();
    /// let compacted = std::thread::spawn(move || store.compact()).join().unwrap()?;
    /// assert_eq!(compacted.events_dropped, 1);
    /// assert!(compacted.bytes_reclaimed() > 10_000);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// In a database, [`Error::Database`] when it cannot be reached.
    /// [`Error::JournalCorrupt`] for damage in a file to rewrite (the files
    /// rewritten before it stay rewritten; nothing is lost); [`Error::Io`] when
    /// reading or writing fails, and [`Error::JournalWrite`] when the truncations
    /// or the checkpoint cannot be journaled. A failed compaction leaves the store
    /// as it was, or with some files rewritten, and usable either way.
    pub fn compact(&self) -> Result<Compacted> {
        #[cfg(feature = "postgres")]
        if let super::Engine::Database(db) = &self.shared.engine {
            return db.engine.compact();
        }
        let core = self.shared.files("compact")?;
        let mut examined = core.locator.compacting.lock();
        let mut report =
            Compacted { streams_truncated: self.settle_retention()?, ..Compacted::default() };
        // What is removed for good, as of now: floors only rise, and tombstones
        // stay. The lock is held only to copy it, so that commits do not wait.
        let (removed, known) = {
            let index = core.index.read();
            let removed: BTreeMap<String, (u64, bool)> = index
                .streams
                .iter()
                .filter(|stream| 0 < stream.life.floor || stream.life.tombstoned)
                .map(|stream| (stream.name.clone(), (stream.life.floor, stream.life.tombstoned)))
                .collect();
            (removed, index.journal_events())
        };
        if removed.is_empty() {
            return Ok(report);
        }
        // The removals (and truncations) acted on must be durable before their
        // events' data is gone: in the buffered modes they may still be in the
        // journal's buffer.
        self.sync()?;
        // A file compacted under these removals has nothing more to drop.
        let digest = {
            let mut hasher = DefaultHasher::new();
            removed.hash(&mut hasher);
            hasher.finish()
        };
        let drops = |_: usize, stream: &str, version: u64| {
            removed.get(stream).is_some_and(|(floor, tombstoned)| *tombstoned || version < *floor)
        };
        let files = journal::journal_files(&core.io, &core.dir)?;
        for pair in files.windows(2) {
            let [(first, path), (next, _)] = pair else { continue };
            // A file whose events the index does not all hold yet is left for later.
            if known < *next {
                break;
            }
            if examined.get(first) == Some(&digest) {
                continue;
            }
            // The batches with data to drop, with that data dropped.
            let compacted = |plain: &[u8]| match batch::decode_command(plain)? {
                Command::Append(_) => batch::drop_data(plain, drops),
                _ => Ok(None),
            };
            let mut dropped = 0;
            let target = journal::RewriteTarget {
                io: &core.io,
                sealer: core.locator.sealer(),
                path,
                first: *first,
                next: *next,
                stamp: known.max(1),
            };
            let rewritten = journal::rewrite(
                &target,
                &mut |_, plain| Ok(compacted(plain).map_err(|it| it.to_string())?.is_some()),
                &mut |_, plain| {
                    let compacted = compacted(plain).map_err(|it| it.to_string())?;
                    Ok(compacted.map(|(bytes, n)| {
                        dropped += n;
                        bytes
                    }))
                },
            )?;
            examined.insert(*first, digest);
            let Some(rewritten) = rewritten else { continue };
            core.locator.replaced(*first, rewritten.offsets);
            report.files += 1;
            report.bytes_before += rewritten.before;
            report.bytes_after += rewritten.after;
            report.events_dropped += dropped;
        }
        if 0 < report.files {
            core.checkpoint()?;
        }
        Ok(report)
    }

    /// Journals, for each stream whose retention rules hide events above its
    /// floor, a truncation up to the first event they still show; returns how many
    /// streams it truncated.
    fn settle_retention(&self) -> Result<u64> {
        let core = self.shared.files("compact")?;
        let now = journal::now_micros();
        let ruled: Vec<(String, Life, u64)> = {
            let index = core.index.read();
            index
                .streams
                .iter()
                .filter(|stream| !stream.life.tombstoned)
                .filter(|stream| stream.life.rules != batch::Rules::default())
                .map(|stream| (stream.name.clone(), stream.life, stream.seqs.len() as u64))
                .collect()
        };
        let mut truncated = 0;
        for (name, life, len) in ruled {
            let mut before = life.visible_from(len);
            if let Some(age) = life.rules.max_age {
                before = self.first_young(&name, before, len, age, now)?;
            }
            if before <= life.floor {
                continue;
            }
            match self.truncate_stream(&name, before) {
                Ok(()) => truncated += 1,
                // Tombstoned meanwhile: gone whole anyway.
                Err(Error::StreamTombstoned { .. }) => {}
                Err(err) => return Err(err),
            }
        }
        Ok(truncated)
    }

    /// The first version from `from` on (below `len`) of stream `name` appended at
    /// most `age` microseconds before `now`, or `len`: the events of a stream are in
    /// time order, so that the search halves the versions.
    fn first_young(&self, name: &str, from: u64, len: u64, age: u64, now: u64) -> Result<u64> {
        let core = self.shared.files("compact")?;
        let mut ahead = ReadAhead::new(4 * 1024);
        let (mut low, mut high) = (from, len);
        while low < high {
            let mid = low + (high - low) / 2;
            let seq = {
                let index = core.index.read();
                let seqs = index.stream(name).and_then(|idx| index.get(idx)).map(|it| &it.seqs);
                seqs.and_then(|seqs| seqs.get(usize::try_from(mid).ok()?).copied())
            };
            let Some(seq) = seq else { return Ok(len) };
            let at = core.locator.read(seq, &mut ahead, &|| core.write_out(), Keep::No)?.at;
            if age < now.saturating_sub(at.as_micros()) {
                low = mid + 1;
            } else {
                high = mid;
            }
        }
        Ok(low)
    }
}
