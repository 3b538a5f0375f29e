//! Opening a store: reading every record, checking it, and installing the cells'
//! values, all or nothing.

use std::{collections::BTreeSet, path::Path, sync::Arc};

use super::{
    ENGINE_DIR, Inner, State,
    claims::Claims,
    records::{Decoded, Missing},
    witness::{self, Held, Older, WitnessFile},
};
use crate::{
    Error, Result, Store,
    atomically::ensure_outside,
    backend::Records,
    codec::{self, STORE_FORMAT},
    crypt::{KEYCHECK_PLAIN, SealFault},
};

impl Store {
    pub(super) fn load(older: Older, mut inner: Inner) -> Result<Store> {
        ensure_outside("open")?;
        let records = inner.backend.read_all()?;
        let Read { format, mut state, decoded } = inner.read(&records)?;
        if inner.values.is_some() {
            let read = inner.read_manifest(state.generation, |key| Ok(records.get(key).cloned()));
            let last = read.ok().map(|(manifest, _)| manifest);
            let held = Held {
                format,
                generation: state.generation,
                digest: state.digest,
                last: last.as_ref(),
                current: &state.current,
            };
            let checked = WitnessFile::check(&inner.io, &inner.label, &held, older, inner.access)?;
            // A read-only store writes no witness, and has no save for one to record.
            if !inner.is_read_only() {
                let (witness, created) = checked.finish(&inner.io)?;
                inner.witness = Some(witness);
                if created || inner.created {
                    // One sync for every entry the open made: engine, values, witness.
                    inner.io.sync_dir(&inner.label).map_err(Error::io(&inner.label))?;
                }
            }
        }
        let journals = inner.open_journals()?;
        state.pending.clear();
        inner.install(&mut state, decoded);
        let unsaved = state.saved.iter().enumerate().filter(|(_, saved)| saved.is_none());
        state.pending.extend(unsaved.map(|(cell_idx, _)| cell_idx));
        for attach in journals {
            attach();
        }
        // From here on, dropping `inner` (also when the open fails) detaches them.
        inner.journals_attached = true;
        inner.refresh_orphans(&mut state);
        if inner.is_read_only() {
            *inner.state.get_mut() = state;
            return Ok(Store { inner: Arc::new(inner) });
        }
        // Leftover files are harmless, and the cells are already loaded: a failed
        // cleanup must not fail the open. The next open tries again.
        let _ = inner.remove_unreferenced_files(&state);
        if inner.sealer.is_on() && !records.contains_key(codec::KEYCHECK_KEY) {
            // A new encrypted store: sealing the check value now makes the store
            // refuse to open without the key from the start.
            let check = inner.sealer.seal(codec::KEYCHECK_KEY, KEYCHECK_PLAIN.to_vec());
            inner.backend.commit(vec![(codec::KEYCHECK_KEY.to_vec(), Some(check))])?;
        }
        *inner.state.get_mut() = state;
        Ok(Store { inner: Arc::new(inner) })
    }
}

/// What a store's records hold, read and checked: its format, what the store
/// knows of them, and the cells' values decoded, to install.
pub(super) struct Read {
    format: Option<u32>,
    pub(super) state: State,
    pub(super) decoded: Vec<Decoded<'static>>,
}

impl Inner {
    /// Reads and checks `records`, every record of the store, and decodes the
    /// values of the cells that have one; changes nothing. Damaged records are
    /// named first; a store whose records are all sound but not those of its last
    /// acknowledged save is the witness's to refuse.
    pub(super) fn read(&self, records: &Records) -> Result<Read> {
        let format = check_format(&self.label, records)?;
        self.check_key(records)?;
        let mut state = State {
            saved: vec![None; self.cells.len()],
            renamed: vec![None; self.cells.len()],
            // Every cell until loaded: one without a stored value is never saved.
            pending: (0..self.cells.len()).collect(),
            generation: generation(&self.label, records)?,
            ..State::default()
        };
        let mut generations = Vec::new();
        for (key, bytes) in records {
            if let Some(name) = codec::cell_name(key) {
                state.current.insert(name.to_owned(), bytes.clone());
            } else if let Some(generation) = codec::history_generation(key) {
                generations.push(generation);
            } else if let Some(crc) = codec::shape_crc(key) {
                state.shapes.insert(crc);
            }
        }
        // Newest first: a damaged manifest ends the history there. The current
        // values do not depend on it, so it must not stop the store from opening;
        // `verify` reports it, and the next save deletes it with the older ones.
        for generation in generations.into_iter().rev() {
            let read = self.read_manifest(generation, |key| Ok(records.get(key).cloned()));
            match read.and_then(|(manifest, chunks)| self.kept(manifest, chunks)) {
                Ok(kept) if state.damaged_history.is_empty() => state.history.push_front(kept),
                _ => state.damaged_history.push(generation),
            }
        }
        let names = self.cells.iter().map(|cell| cell.name());
        state.claims = Claims::read(records, names, &self.engine_path())?;
        let decoded = self.decode_all(&state.current, Missing::Skip)?;
        state.digest = witness::digest_of(&state.current);
        Ok(Read { format, state, decoded })
    }

    /// Opens the journals of the journaled cells; the returned functions install
    /// their values, after every journal opened.
    fn open_journals(&self) -> Result<Vec<Box<dyn FnOnce() + Send>>> {
        let mut opened = Vec::with_capacity(self.journaled.len());
        let mut errors = Vec::new();
        for cell in &self.journaled {
            let place = self.journals.of_cell(cell.name());
            match cell.open_journal(place, self.journal, self.sealer.clone(), &self.io, self.access)
            {
                Ok(attach) => opened.push(attach),
                Err(err) => errors.push(err),
            }
        }
        Error::from_list(errors).map_or(Ok(opened), Err)
    }

    /// Refuses a key the store was not sealed with, a missing key for a sealed
    /// store, and a key for a store whose records are not sealed.
    fn check_key(&self, records: &Records) -> Result<()> {
        let path = self.label.clone();
        match records.get(codec::KEYCHECK_KEY) {
            Some(check) => match self.sealer.open(codec::KEYCHECK_KEY, check) {
                Ok(plain) if *plain == *KEYCHECK_PLAIN => Ok(()),
                Err(SealFault::NoKey) => Err(Error::Encryption { path, encrypted: true }),
                _ => Err(Error::WrongKey { path }),
            },
            None if self.sealer.is_on()
                && records.keys().any(|key| codec::cell_name(key).is_some()) =>
            {
                Err(Error::Encryption { path, encrypted: false })
            }
            None => Ok(()),
        }
    }

    /// Deletes value files that no record points at: leftovers of interrupted saves.
    pub(super) fn remove_unreferenced_files(&self, state: &State) -> Result<()> {
        let Some(values) = &self.values else { return Ok(()) };
        let Some(keep) = self.referenced_files(state) else { return Ok(()) };
        values.remove_all_but(&keep).map_err(Error::io(values.path()))
    }

    /// The value files the stored records and the kept history point at, or `None`
    /// when an unreadable record or a damaged manifest might point at any file.
    pub(super) fn referenced_files(&self, state: &State) -> Option<BTreeSet<u64>> {
        if !state.damaged_history.is_empty() {
            return None;
        }
        let mut files = BTreeSet::new();
        for (name, bytes) in &state.current {
            files.extend(self.summary(name, bytes)?.0);
        }
        for kept in &state.history {
            files.extend(kept.files.iter().copied());
        }
        Some(files)
    }
}

/// The store's format (`meta/format`), refusing one newer than this build's.
fn check_format(label: &Path, records: &Records) -> Result<Option<u32>> {
    let found = meta(label, records, codec::FORMAT_KEY, codec::read_u32)?;
    match found {
        Some(found) if found == 0 || STORE_FORMAT < found => {
            Err(Error::FormatVersion { path: label.to_path_buf(), found, expected: STORE_FORMAT })
        }
        _ => Ok(found),
    }
}

fn generation(label: &Path, records: &Records) -> Result<u64> {
    Ok(meta(label, records, codec::GENERATION_KEY, codec::read_u64)?.unwrap_or(0))
}

/// Reads the fixed-width number stored under meta `key`, if there is one.
fn meta<T>(
    label: &Path,
    records: &Records,
    key: &[u8],
    read: fn(&[u8]) -> Option<T>,
) -> Result<Option<T>> {
    meta_value(&label.join(ENGINE_DIR), key, records.get(key).map(Vec::as_slice), read)
}

/// Reads `bytes`, the fixed-width number stored under meta `key` (if there is
/// one), with `read`; a record of another width is damage at `path`.
pub(super) fn meta_value<T>(
    path: &Path,
    key: &[u8],
    bytes: Option<&[u8]>,
    read: fn(&[u8]) -> Option<T>,
) -> Result<Option<T>> {
    let Some(bytes) = bytes else { return Ok(None) };
    let value = read(bytes).ok_or_else(|| {
        let key = String::from_utf8_lossy(key).into_owned();
        Error::Corrupt {
            reason: format!(
                "{key} is {} bytes long, not {}",
                bytes.len(),
                std::mem::size_of::<T>()
            ),
            cell: key,
            path: path.to_path_buf(),
        }
    })?;
    Ok(Some(value))
}
