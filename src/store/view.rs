//! What the maintenance operations of `admin.rs` (listing, verifying, backups,
//! exports, imports, pruning and compaction) may see and do of a store: a view of
//! its last save, taken under the store's state lock, and the few changes they make
//! through it. Saves, reloads and other views wait while a view is held; cells do not.

use std::{
    borrow::Cow,
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
};

use parking_lot::MutexGuard;

use super::{
    ENGINE_DIR, Inner, State, VALUES_DIR, now_ms,
    records::Missing,
    witness::{WITNESS_FILE, WitnessFile},
};
use crate::{
    Error, Result,
    backend::{Backend, Batch, Records, Sled},
    codec::{self, Body, Manifest, Record, Witness},
    journal::{self, JournalReport},
    journaled,
    lockfile::Access,
    values::{Encoded, Spilled, ValueDir, ValueWriter},
};

/// The last save of a store, seen under its state lock.
pub(crate) struct LastSave<'a> {
    inner: &'a Inner,
    state: MutexGuard<'a, State>,
}

/// One value of an export file, as stored: its name, its record and the bytes of its
/// value file, if the record points at one.
pub(crate) struct Imported {
    pub(crate) name: String,
    pub(crate) record: Vec<u8>,
    pub(crate) file: Option<Vec<u8>>,
}

impl Inner {
    /// A view of the last save; saves wait until it is dropped.
    pub(crate) fn last_save(&self) -> LastSave<'_> {
        LastSave { inner: self, state: self.state.lock() }
    }

    /// Whether the store's records and value files are sealed.
    pub(crate) fn is_sealed(&self) -> bool {
        self.sealer.is_on()
    }
}

impl LastSave<'_> {
    /// Fails with [`Error::Poisoned`] after a failed save.
    pub(crate) fn check_poisoned(&self) -> Result<()> {
        self.inner.check_poisoned(&self.state)
    }

    /// The number of the last save.
    pub(crate) fn generation(&self) -> u64 {
        self.state.generation
    }

    /// Whether the store's records and value files are sealed.
    pub(crate) fn is_sealed(&self) -> bool {
        self.inner.sealer.is_on()
    }

    /// The engine's directory, which errors about records name.
    pub(crate) fn engine_path(&self) -> PathBuf {
        self.inner.engine_path()
    }

    /// Every stored cell record, by name, exactly as stored.
    pub(crate) fn records(&self) -> &BTreeMap<String, Vec<u8>> {
        &self.state.current
    }

    /// The stored names no cell claims: for a store without cells (as the tool opens
    /// it), those the program that saved last did not claim.
    pub(crate) fn orphans(&self) -> Vec<String> {
        if !self.inner.cells.is_empty() {
            return self.state.orphans.clone();
        }
        let claims = &self.state.claims;
        let orphans = self.state.current.keys().filter(|name| claims.claims(name) == Some(false));
        orphans.cloned().collect()
    }

    /// The plain bytes of the record `bytes` stored for cell `name` (unsealed in an
    /// encrypted store), or why they cannot be had.
    pub(crate) fn open_record<'b>(
        &self,
        name: &str,
        bytes: &'b [u8],
    ) -> std::result::Result<Cow<'b, [u8]>, String> {
        self.inner.sealer.open(&codec::cell_key(name), bytes).map_err(|fault| fault.to_string())
    }

    /// Checks the record `bytes` stored for cell `name` and the value file it points
    /// at, and returns that file's bytes as stored; or says what is wrong.
    pub(crate) fn checked_file(
        &self,
        name: &str,
        bytes: &[u8],
    ) -> std::result::Result<Option<Vec<u8>>, String> {
        let inner = self.inner;
        let plain = self.open_record(name, bytes)?;
        let record = Record::decode(&plain).map_err(|fault| fault.to_string())?;
        let Body::File { id, len, crc } = record.body else { return Ok(None) };
        let stored = inner.read_stored(name, id, len, crc).map_err(|err| err.to_string())?;
        if inner.sealer.is_on() {
            // Authenticated, and thrown away: the file travels sealed.
            inner.open_value(name, name, id, stored.clone()).map_err(|err| err.to_string())?;
        }
        Ok(Some(stored))
    }

    /// The journals of journaled cells in the store's directory that this store has
    /// not opened (a store opened without those cells, as the tool opens it), each
    /// with its directory and what [`journal::inspect`] found.
    pub(crate) fn inspect_journals(&self) -> Result<Vec<(PathBuf, Result<JournalReport>)>> {
        let inner = self.inner;
        if inner.values.is_none() {
            return Ok(Vec::new());
        }
        let root = inner.label.join(journaled::JOURNALS_DIR);
        let mut found = Vec::new();
        for entry in inner.io.read_dir(&root).map_err(Error::io(&root))? {
            let dir = root.join(&entry.name);
            let open = inner
                .journaled
                .iter()
                .any(|cell| journaled::journal_dir(&inner.label, cell.name()) == dir);
            if !open {
                found.push((dir.clone(), journal::inspect(&inner.io, &dir, &inner.sealer)));
            }
        }
        Ok(found)
    }

    /// Every record the engine holds, cell records or not, by key.
    pub(crate) fn engine_records(&self) -> Result<Records> {
        self.inner.backend.read_all()
    }

    /// The history manifest of save `generation`, read from `records`.
    pub(crate) fn manifest(&self, generation: u64, records: &Records) -> Result<Manifest> {
        let read = self.inner.read_manifest(generation, |key| Ok(records.get(key).cloned()));
        read.map(|(manifest, _)| manifest)
    }

    /// Writes the last save into `dir` as a store of its own, durably: its records,
    /// the value files they and the history point at, and a snapshot of each
    /// journaled cell as it is now.
    pub(crate) fn copy_to(&self, dir: &Path) -> Result<()> {
        let inner = self.inner;
        let io = &inner.io;
        let records = inner.backend.read_all()?;
        let values_path = dir.join(VALUES_DIR);
        let values = ValueDir::open(io, values_path.clone(), Access::ReadWrite)
            .map_err(Error::io(&values_path))?;
        let files = match (inner.referenced_files(&self.state), &inner.values) {
            (Some(files), _) => files.into_iter().collect(),
            // Unreadable data might point at any file: copy them all.
            (None, Some(source)) => source.ids().map_err(Error::io(source.path()))?,
            (None, None) => Vec::new(),
        };
        if let Some(source) = &inner.values {
            for id in files {
                let from = source.file_path(id);
                io.copy_durably(&from, &values.file_path(id)).map_err(Error::io(from))?;
            }
        }
        io.sync_dir(&values_path).map_err(Error::io(&values_path))?;
        let batch: Batch = records.into_iter().map(|(key, bytes)| (key, Some(bytes))).collect();
        let engine = Sled::open(io, &dir.join(ENGINE_DIR))?;
        let committed = engine.commit(batch);
        committed.and(engine.close())?;
        let now = Witness { generation: self.state.generation, digest: self.state.digest };
        WitnessFile::create(io, dir.join(WITNESS_FILE), now)?;
        for cell in &inner.journaled {
            cell.backup_into(&journaled::journal_dir(dir, cell.name()))?;
        }
        Ok(())
    }

    /// Deletes the stored values no cell claims as one new save; returns their names.
    pub(crate) fn prune_orphans(mut self) -> Result<Vec<String>> {
        self.inner.check_writable("prune_orphans")?;
        self.check_poisoned()?;
        let orphans = self.orphans();
        if orphans.is_empty() {
            return Ok(orphans);
        }
        let (inner, state) = (self.inner, &mut *self.state);
        state.now_ms = now_ms();
        let writes = orphans.iter().map(|name| (name.clone(), None)).collect();
        inner.commit_generation(state, writes, &[], &[])?;
        inner.refresh_orphans(state);
        Ok(orphans)
    }

    /// Rewrites the engine's files to hold only live records, and deletes the value
    /// files nothing points at.
    pub(crate) fn compact(&self) -> Result<()> {
        self.inner.check_writable("compact")?;
        self.check_poisoned()?;
        self.inner.backend.compact()?;
        self.inner.remove_unreferenced_files(&self.state)
    }

    /// Stores `entries`, read from the export file at `path`, as one new save, all or
    /// nothing: every value is decoded for its cell before anything is committed.
    pub(crate) fn import(mut self, path: &Path, entries: Vec<Imported>) -> Result<()> {
        self.inner.check_writable("import_from")?;
        self.check_poisoned()?;
        let (inner, state) = (self.inner, &mut *self.state);
        state.now_ms = now_ms();
        let mut encoded = Vec::new();
        let staged = inner
            .stage_import(state, path, entries, &mut encoded)
            .and_then(|(writes, target)| Ok((writes, inner.decode_all(&target, Missing::Skip)?)));
        let (writes, decoded) = match staged {
            Ok(staged) => staged,
            Err(err) => {
                for spilled in encoded.iter().filter_map(Encoded::spilled) {
                    inner.remove_file(spilled.id);
                }
                return Err(err);
            }
        };
        let spilled: Vec<&Spilled> = encoded.iter().filter_map(Encoded::spilled).collect();
        inner.commit_generation(state, writes, &[], &spilled)?;
        inner.install(state, decoded);
        inner.refresh_orphans(state);
        Ok(())
    }
}

/// Cell records by name, and the writes of a save: a new record, or a deletion.
type Staged = (Vec<(String, Option<Vec<u8>>)>, BTreeMap<String, Vec<u8>>);

impl Inner {
    /// Turns export entries into new records (writing value files as needed, into
    /// `encoded`), and returns the writes and the resulting records by name.
    fn stage_import(
        &self,
        state: &State,
        path: &Path,
        entries: Vec<Imported>,
        encoded: &mut Vec<Encoded>,
    ) -> Result<Staged> {
        let mut writes = Vec::new();
        let mut target = BTreeMap::new();
        for Imported { name, record, file } in entries {
            let corrupt = |reason: String| Error::BadExport { path: path.to_path_buf(), reason };
            codec::check_name(&name).map_err(|fault| corrupt(format!("a cell name: {fault}")))?;
            let plain = self
                .sealer
                .open(&codec::cell_key(&name), &record)
                .map_err(|fault| corrupt(format!("record of `{name}`: {fault}")))?;
            let record = Record::decode(&plain)
                .map_err(|fault| corrupt(format!("record of `{name}`: {fault}")))?;
            let value = match (record.body, file) {
                (Body::Inline(bytes), _) => bytes.to_vec(),
                (Body::File { len, crc, .. }, Some(file)) => {
                    if file.len() as u64 != len || codec::checksum(&file) != crc {
                        return Err(corrupt(format!(
                            "value of `{name}` does not match its record"
                        )));
                    }
                    self.sealer
                        .open_file(&codec::cell_key(&name), file)
                        .map_err(|fault| corrupt(format!("value of `{name}`: {fault}")))?
                }
                (Body::File { .. }, None) => {
                    return Err(corrupt(format!("value of `{name}` is missing")));
                }
            };
            let mut out = ValueWriter::new(self.values.as_ref(), &self.sealer, &name);
            let res = out.write_all(&value).and_then(|()| out.finish());
            let new = res.map_err(Error::io(self.label.clone()))?;
            // The structure's checksum travels with the record; a store that does
            // not hold the structure itself still tells a changed type by it.
            let shape = record.shape.unwrap_or(0);
            let bytes =
                self.seal_record(&name, record.schema, record.type_name, shape, &new, state);
            encoded.push(new);
            target.insert(name.clone(), bytes.clone());
            writes.push((name, Some(bytes)));
        }
        Ok((writes, target))
    }
}
