//! The witness: a small file beside the engine that records the last acknowledged
//! save (its generation, and a digest of the cell records it left), written and
//! fsynced after each save's commit is durable.
//!
//! The engine can lose a save without an error: one flipped bit in the log bytes of
//! the last save, or a zeroed page, and sled opens at the save before. The witness
//! tells: at open, the engine must hold the witnessed save exactly (same generation,
//! same records), or the save after it (a crash between the commit and the
//! witness's update), whose history manifest leads back to the witnessed records.
//! Anything else is [`Error::Corrupt`] naming the lost save, unless the user accepts
//! the older save ([`StoreBuilder::accept_older_save`](crate::StoreBuilder::accept_older_save)).

use std::path::{Path, PathBuf};

use crate::{
    Error, Result,
    codec::{Digest, Manifest, STORE_FORMAT, WITNESS_LEN, WITNESS_SLOTS, Witness},
    io::{Io, IoFile, Open},
    lockfile::Access,
};

/// The witness file's name in the store directory.
pub(super) const WITNESS_FILE: &str = "witness";

/// The store's open witness file.
#[derive(Debug)]
pub(super) struct WitnessFile {
    file: IoFile,
    path: PathBuf,
}

/// What the engine holds, for the witness to check.
pub(super) struct Held<'a> {
    /// `meta/format`, if there is one.
    pub(super) format: Option<u32>,
    pub(super) generation: u64,
    pub(super) digest: Digest,
    /// The history manifest of save `generation`, if the history holds it.
    pub(super) last: Option<&'a Manifest>,
    /// The records as they stand, by cell name.
    pub(super) current: &'a std::collections::BTreeMap<String, Vec<u8>>,
}

/// Whether to open a store that holds an older save than the witness says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Older {
    Refuse,
    Accept,
}

/// What checking the witness found: a sound witness, one a save behind the store
/// (and the save to record in it), or the witness to write (for a store without
/// one, or one whose lost saves the user accepts).
pub(super) enum Checked {
    Sound(WitnessFile),
    Behind(WitnessFile, Witness),
    Write(PathBuf, Witness),
}

impl Checked {
    /// The witness file, once written if it must be, and whether it was: its
    /// directory entry is durable only once the caller syncs the store directory.
    pub(super) fn finish(self, io: &Io) -> Result<(WitnessFile, bool)> {
        match self {
            Checked::Sound(file) => Ok((file, false)),
            // A crash came between the last save's commit and its witness: the
            // witness must catch up before the next save, or a second such crash
            // would leave the store two saves ahead of it, which no check accepts.
            Checked::Behind(file, now) => {
                file.record(&now)?;
                Ok((file, false))
            }
            Checked::Write(path, now) => Ok((WitnessFile::create(io, path, now)?, true)),
        }
    }
}

impl WitnessFile {
    /// Checks `held` against the witness of the store in `dir`, writing nothing; the
    /// file is opened to be written later unless `access` is read-only.
    pub(super) fn check(
        io: &Io,
        dir: &Path,
        held: &Held<'_>,
        older: Older,
        access: Access,
    ) -> Result<Checked> {
        let path = dir.join(WITNESS_FILE);
        let corrupt = |reason: String| Error::Corrupt {
            cell: WITNESS_FILE.to_owned(),
            path: path.clone(),
            reason,
        };
        let now = Witness { generation: held.generation, digest: held.digest };
        let how = if access == Access::ReadOnly { Open::Read } else { Open::ReadWrite };
        let file = match io.open(&path, how) {
            Ok(file) => file,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                let witnessed = held.format.is_some_and(|format| format >= STORE_FORMAT);
                if witnessed && older == Older::Refuse {
                    return Err(corrupt(format!(
                        "the witness file is missing, so nothing shows that the store holds its last save (it holds save {}); {ACCEPT}",
                        held.generation
                    )));
                }
                return Ok(Checked::Write(path, now));
            }
            Err(err) => return Err(Error::io(&path)(err)),
        };
        let witness = WitnessFile { file, path: path.clone() };
        let found = witness.read().map_err(Error::io(&path))?;
        let problem = match found {
            None => Some("the witness file is damaged: neither of its slots is sound".to_owned()),
            Some(witnessed) => check(&witnessed, held),
        };
        match (problem, older) {
            (None, _) if found.is_some_and(|found| found.generation < held.generation) => {
                Ok(Checked::Behind(witness, now))
            }
            (None, _) => Ok(Checked::Sound(witness)),
            (Some(problem), Older::Refuse) => Err(corrupt(format!("{problem}; {ACCEPT}"))),
            (Some(_), Older::Accept) => Ok(Checked::Write(path, now)),
        }
    }

    /// Makes the witness file at `path` (replacing any), with `now` in both slots:
    /// synced, and renamed into place, durably once the caller syncs the directory.
    pub(super) fn create(io: &Io, path: PathBuf, now: Witness) -> Result<WitnessFile> {
        let mut bytes = vec![0; usize::try_from(WITNESS_SLOTS[1]).unwrap_or(512) + WITNESS_LEN];
        for slot in WITNESS_SLOTS {
            let start = usize::try_from(slot).unwrap_or(0);
            if let Some(target) = bytes.get_mut(start..start + WITNESS_LEN) {
                target.copy_from_slice(&now.encode());
            }
        }
        io.write_renamed(&path, &bytes).map_err(Error::io(&path))?;
        let file = io.open(&path, Open::ReadWrite).map_err(Error::io(&path))?;
        Ok(WitnessFile { file, path })
    }

    /// The newest sound slot, if any is sound.
    fn read(&self) -> std::io::Result<Option<Witness>> {
        let mut best: Option<Witness> = None;
        let bytes = self.file.read_all()?;
        for slot in WITNESS_SLOTS {
            let start = usize::try_from(slot).unwrap_or(usize::MAX);
            let Some(slot) = bytes.get(start..start.saturating_add(WITNESS_LEN)) else { continue };
            if let Ok(witness) = Witness::decode(slot)
                && best.is_none_or(|best| best.generation < witness.generation)
            {
                best = Some(witness);
            }
        }
        Ok(best)
    }

    /// Records the acknowledged save `witness`, durably, in the slot of its parity.
    pub(super) fn record(&self, witness: &Witness) -> Result<()> {
        let slot =
            if witness.generation.is_multiple_of(2) { WITNESS_SLOTS[0] } else { WITNESS_SLOTS[1] };
        self.write_slot(witness, slot)
            .and_then(|()| self.file.sync_data())
            .map_err(Error::io(&self.path))
    }

    fn write_slot(&self, witness: &Witness, slot: u64) -> std::io::Result<()> {
        self.file.write_all_at(&witness.encode(), slot)
    }
}

/// What to do about a store that lost saves, for error messages.
const ACCEPT: &str =
    "to go on from what the store holds, open it with `StoreBuilder::accept_older_save`";

/// Why `held` is not the witnessed save or the one after it, if it is not.
fn check(witnessed: &Witness, held: &Held<'_>) -> Option<String> {
    let (want, have) = (witnessed.generation, held.generation);
    if have < want {
        let lost = if have + 1 == want {
            format!("save {want} is lost")
        } else {
            format!("saves {} to {want} are lost", have + 1)
        };
        return Some(format!(
            "the store holds save {have}, but save {want} was acknowledged: {lost}"
        ));
    }
    if have == want {
        return (held.digest != witnessed.digest).then(|| {
            format!(
                "the store holds save {have}, but not the records it left: {} records where it left {}, or some of them changed",
                held.digest.records, witnessed.digest.records
            )
        });
    }
    if have > want + 1 {
        return Some(format!(
            "the store holds save {have}, but the witness knows only save {want}: it was replaced or is older than the store"
        ));
    }
    // The save after the witnessed one: a crash came between its commit and the
    // witness's update. Its manifest leads back to the witnessed records.
    let manifest = held.last?;
    let mut digest = held.digest;
    for (name, pre) in &manifest.entries {
        if let Some(bytes) = held.current.get(name) {
            digest.toggle(name, bytes, false);
        }
        if let Some(pre) = pre {
            digest.toggle(name, pre, true);
        }
    }
    (digest != witnessed.digest).then(|| {
        format!(
            "the store holds save {have}, whose history does not lead back to the records that save {want} left"
        )
    })
}

/// The digest of `records`, cell records by name.
pub(super) fn digest_of(records: &std::collections::BTreeMap<String, Vec<u8>>) -> Digest {
    let mut digest = Digest::default();
    for (name, bytes) in records {
        digest.toggle(name, bytes, true);
    }
    digest
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn held<'a>(
        generation: u64,
        current: &'a BTreeMap<String, Vec<u8>>,
        last: Option<&'a Manifest>,
    ) -> Held<'a> {
        Held { format: Some(STORE_FORMAT), generation, digest: digest_of(current), last, current }
    }

    #[test]
    fn the_witnessed_save_and_the_one_after_it_pass_and_nothing_else() {
        let old: BTreeMap<String, Vec<u8>> = BTreeMap::from([("a".into(), b"1".to_vec())]);
        let new: BTreeMap<String, Vec<u8>> =
            BTreeMap::from([("a".into(), b"2".to_vec()), ("b".into(), b"3".to_vec())]);
        let witnessed = Witness { generation: 4, digest: digest_of(&old) };
        assert_eq!(check(&witnessed, &held(4, &old, None)), None);
        assert!(
            check(&witnessed, &held(3, &old, None)).is_some_and(|it| it.contains("save 4 is lost"))
        );
        assert!(check(&witnessed, &held(4, &new, None)).is_some());
        let manifest = Manifest {
            generation: 5,
            at_ms: 0,
            entries: vec![("a".into(), Some(b"1".to_vec())), ("b".into(), None)],
        };
        assert_eq!(check(&witnessed, &held(5, &new, Some(&manifest))), None);
        let wrong = Manifest { entries: vec![("a".into(), Some(b"9".to_vec()))], ..manifest };
        assert!(check(&witnessed, &held(5, &new, Some(&wrong))).is_some());
        assert!(check(&witnessed, &held(6, &new, None)).is_some());
    }

    #[test]
    fn slots_round_trip_and_refuse_every_flip() {
        let witness = Witness { generation: 9, digest: Digest { records: 3, xor: 0xfeed } };
        let bytes = witness.encode();
        assert_eq!(Witness::decode(&bytes), Ok(witness));
        for bit in 0..bytes.len() * 8 {
            let mut flipped = bytes;
            if let Some(byte) = flipped.get_mut(bit / 8) {
                *byte ^= 1 << (bit % 8);
            }
            assert!(Witness::decode(&flipped).is_err(), "bit {bit}");
        }
    }
}
