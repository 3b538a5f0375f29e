//! Stored records turned back into values: decoding, checking and installing them,
//! and [`Store::reload_all`].

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet},
    io,
    path::PathBuf,
};

use parking_lot::MutexGuard;

use super::{Inner, State};
use crate::{
    Error, Result, Store,
    atomically::{ensure_outside, exclusive, exclusive_for, try_exclusive_for},
    cell::{ErasedCell, Install},
    codec::{self, Body, Record},
    error::CodecError,
    schema::DecodeFault,
    shape::Shape,
    values::{ReadFault, ValueDir},
};

/// What an install that does not wait found held.
enum Blocked {
    /// The gate: an `atomically` block runs.
    Gate,
    /// The cell of this index among those decoded.
    Cell(usize),
}

/// Stored cell records by name.
pub(super) type Named = BTreeMap<String, Vec<u8>>;

/// A saved value, decoded and waiting to be installed.
pub(super) struct Decoded<'a> {
    cell_idx: usize,
    install: Install<'a>,
    // The name the value was stored under: the cell's, or one of its aliases.
    key: String,
    // Whether the store must write the value again: it was migrated from an older
    // schema version, or (after a revert) it is not the value the store holds.
    stale: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Missing {
    Skip,
    Fail,
}

impl Store {
    /// Reverts every cell to its last saved value, all or nothing.
    ///
    /// Every saved value is read and decoded before any cell changes; if one cannot
    /// be, or a cell was never saved, no cell changes. The reload is consistent in
    /// the same way as [`save_all`](Self::save_all): no
    /// [`atomically`](crate::atomically) block sees it half done.
    ///
    /// # Errors
    /// - [`Error::NeverSaved`] for a cell without a saved value;
    /// - [`Error::TypeMismatch`], [`Error::Decode`] or [`Error::Corrupt`] for a value
    ///   that cannot be loaded ([`Error::Several`] lists them when there are more);
    /// - [`Error::Io`] or [`Error::Storage`] when reading fails;
    /// - [`Error::Poisoned`] after a failed save;
    /// - [`Error::InsideAtomically`] when called inside [`atomically`](crate::atomically);
    /// - [`Error::GuardHeld`] when this thread holds a cell's guard that an
    ///   `atomically` block on another thread waits for (nothing is changed).
    ///
    /// Do not call it while holding a guard of one of the store's cells: it needs
    /// their write locks.
    ///
    /// # Example
    /// ```
    /// # use instastate::{StateCell, Store};
    /// static TEXT: StateCell<String> = StateCell::new("docs::reload::TEXT", || "saved".into());
    /// # fn main() -> instastate::Result<()> {
    /// let store = Store::builder().cell(&TEXT).in_memory()?;
    /// store.save_all()?;
    /// TEXT.set("edited".into());
    /// store.reload_all()?;
    /// assert_eq!(TEXT.get(), "saved");
    /// # Ok(())
    /// # }
    /// ```
    pub fn reload_all(&self) -> Result<()> {
        ensure_outside("reload_all")?;
        let inner = &*self.inner;
        inner.take_background_error()?;
        let mut state = inner.state.lock();
        inner.check_poisoned(&state)?;
        inner.restore(&mut state, None)
    }
}

impl Inner {
    /// Decodes every cell's value in `target` (the stored records if `None`) and
    /// installs them all, or none.
    ///
    /// It waits for no cell's lock while it holds the store's lock and the gate of
    /// `atomically`: a thread holding a cell's guard may be waiting for either (a
    /// save, an `atomically` block). When a cell is held, it lets both go, waits
    /// for that cell, and starts again (from the records as they are then).
    pub(super) fn restore(
        &self,
        state: &mut MutexGuard<'_, State>,
        target: Option<&Named>,
    ) -> Result<()> {
        loop {
            let mut decoded = self.decode_all(target.unwrap_or(&state.current), Missing::Fail)?;
            if let Some(target) = target {
                for it in &mut decoded {
                    let name = self.cells.get(it.cell_idx).map(|cell| cell.name());
                    it.stale |=
                        target.get(&it.key) != name.and_then(|name| state.current.get(name));
                }
            }
            match self.put(state, &mut decoded, false) {
                Ok(()) => return Ok(()),
                Err(Blocked::Cell(held)) => {
                    if let Some(it) = decoded.get(held) {
                        MutexGuard::unlocked(state, || it.install.wait());
                    }
                }
                Err(Blocked::Gate) => {
                    let operation = if target.is_some() { "revert_to" } else { "reload_all" };
                    MutexGuard::unlocked(state, || exclusive_for(operation).map(drop))?;
                }
            }
            self.check_poisoned(state)?;
        }
    }

    pub(super) fn decode_all(
        &self,
        records: &BTreeMap<String, Vec<u8>>,
        missing: Missing,
    ) -> Result<Vec<Decoded<'static>>> {
        let mut decoded = Vec::with_capacity(self.cells.len());
        let mut errors = Vec::new();
        for (cell_idx, cell) in self.cells.iter().enumerate() {
            let names = std::iter::once(cell.name()).chain(cell.aliases().iter().copied());
            let found = names.into_iter().find_map(|name| Some((name, records.get(name)?)));
            let Some((key, bytes)) = found else {
                if missing == Missing::Fail {
                    errors.push(Error::NeverSaved { cell: cell.name().to_owned() });
                }
                continue;
            };
            match self.decode(*cell, key, bytes) {
                Ok((install, migrated)) => {
                    let key = key.to_owned();
                    decoded.push(Decoded { cell_idx, install, key, stale: migrated });
                }
                Err(err) => errors.push(err),
            }
        }
        match Error::from_list(errors) {
            Some(err) => Err(err),
            None => Ok(decoded),
        }
    }

    /// Decodes the record `bytes` stored under name `key` as a value of `cell`;
    /// also says whether the value was migrated.
    fn decode(
        &self,
        cell: &'static dyn ErasedCell,
        key: &str,
        bytes: &[u8],
    ) -> Result<(Install<'static>, bool)> {
        let corrupt = |path: PathBuf, reason: String| Error::Corrupt {
            cell: cell.name().to_owned(),
            path,
            reason,
        };
        let aad = codec::cell_key(key);
        let plain = self
            .sealer
            .open(&aad, bytes)
            .map_err(|fault| corrupt(self.engine_path(), format!("record: {fault}")))?;
        let record = Record::decode(&plain)
            .map_err(|fault| corrupt(self.engine_path(), fault.to_string()))?;
        let mismatch = |expected_type: &str, changes: Vec<String>| Error::TypeMismatch {
            cell: cell.name().to_owned(),
            stored_type: record.type_name.to_owned(),
            stored_schema: record.schema,
            expected_type: expected_type.to_owned(),
            expected_schema: cell.schema(),
            changes,
        };
        if record.schema == cell.schema() {
            if record.type_name != codec::stored_type_name(cell.type_name()) {
                return Err(mismatch(cell.type_name(), Vec::new()));
            }
            let changes = self.shape_changes(record.shape, cell)?;
            if !changes.is_empty() {
                return Err(mismatch(cell.type_name(), changes));
            }
        } else if let Some((old_type, Some(old))) = cell.migration_of(record.schema) {
            // A migration trusts the version, not the name (a type may have moved),
            // but the structure it reads must be the one saved.
            let changes = self.migration_changes(record.shape, &old)?;
            if !changes.is_empty() {
                return Err(mismatch(old_type, changes));
            }
        }
        let value_bytes: Cow<'_, [u8]> = match record.body {
            Body::Inline(bytes) => Cow::Borrowed(bytes),
            Body::File { id, len, crc } => {
                Cow::Owned(self.read_file(cell.name(), key, id, len, crc)?)
            }
        };
        let install = cell.decode(&value_bytes, record.schema).map_err(|fault| match fault {
            DecodeFault::Codec(source) => Error::Decode {
                cell: cell.name().to_owned(),
                stored_type: record.type_name.to_owned(),
                expected_type: cell.type_name().to_owned(),
                source: CodecError::from(source),
            },
            DecodeFault::Panicked => Error::MigrationPanicked {
                path: self.label.clone(),
                what: format!("the value of cell `{}`", cell.name()),
                from: record.schema,
            },
            DecodeFault::Newer | DecodeFault::NoMigration => Error::SchemaVersion {
                cell: cell.name().to_owned(),
                found: record.schema,
                current: cell.schema(),
            },
        })?;
        Ok((install, record.schema != cell.schema()))
    }

    /// What changed in the structure of `cell`'s type since a record whose type's
    /// structure had the checksum `stored` was saved; nothing when it did not change,
    /// or when either structure is unknown (a record of an older format, or a type
    /// that cannot be traced), which leaves the type's name to tell.
    fn shape_changes(&self, stored: Option<u32>, cell: &dyn ErasedCell) -> Result<Vec<String>> {
        let (Some(stored), Some(current)) = (stored.filter(|crc| *crc != 0), cell.shape()) else {
            return Ok(Vec::new());
        };
        if stored == current.checksum() {
            return Ok(Vec::new());
        }
        let Some(old) = self.stored_shape(stored)? else {
            return Ok(vec![format!(
                "its structure is not the one the value was saved with ({current}), whose record this store does not hold"
            )]);
        };
        // Nothing when the same structure has another checksum: an older encoding
        // of shapes.
        Ok(Shape::differences(&old, &current))
    }

    /// What differs between the structure a value of an older schema version was
    /// saved with (checksum `stored`) and `old`, that of the type its migration
    /// reads; nothing when the saved one is unknown.
    fn migration_changes(&self, stored: Option<u32>, old: &Shape) -> Result<Vec<String>> {
        let Some(stored) = stored.filter(|crc| *crc != 0) else { return Ok(Vec::new()) };
        if stored == old.checksum() {
            return Ok(Vec::new());
        }
        let Some(saved) = self.stored_shape(stored)? else {
            return Ok(vec![format!(
                "the structure the migration reads ({old}) is not the one the value was saved with, whose record this store does not hold"
            )]);
        };
        // The old type is often kept under a new name beside the new one: its
        // containers are paired by place.
        Ok(Shape::differences(&saved, &old.renamed_like(&saved)))
    }

    /// The structure recorded under checksum `crc`, if the store holds it.
    fn stored_shape(&self, crc: u32) -> Result<Option<Shape>> {
        let key = codec::shape_key(crc);
        let bytes = codec::join_value(&key, |key| self.backend.get(key))?;
        Ok(bytes.and_then(|bytes| Shape::decode(&bytes).ok()))
    }

    /// Reads and opens value file `id` of the record stored under `key`; `cell` names
    /// the claimant in errors.
    pub(super) fn read_file(
        &self,
        cell: &str,
        key: &str,
        id: u64,
        len: u64,
        crc: u32,
    ) -> Result<Vec<u8>> {
        let stored = self.read_stored(cell, id, len, crc)?;
        self.open_value(cell, key, id, stored)
    }

    /// Opens (in an encrypted store, decrypts and authenticates) the bytes of value
    /// file `id` of the record stored under `key`.
    pub(super) fn open_value(
        &self,
        cell: &str,
        key: &str,
        id: u64,
        stored: Vec<u8>,
    ) -> Result<Vec<u8>> {
        self.sealer.open_file(&codec::cell_key(key), stored).map_err(|fault| Error::Corrupt {
            cell: cell.to_owned(),
            path: self.values_path().join(format!("{id:016x}.val")),
            reason: format!("value file: {fault}"),
        })
    }

    /// Reads value file `id` as stored, once its length and checksum match the
    /// record's; `cell` names the claimant in errors.
    pub(super) fn read_stored(&self, cell: &str, id: u64, len: u64, crc: u32) -> Result<Vec<u8>> {
        self.with_values(cell, id, |values| values.read(id, len, crc))
    }

    /// Checks that value file `id`, of cell `cell`, is there and holds `len` bytes,
    /// without reading it.
    pub(crate) fn check_stored_len(&self, cell: &str, id: u64, len: u64) -> Result<()> {
        self.with_values(cell, id, |values| values.check_len(id, len))
    }

    /// Runs `run` on the store's value files, its fault (about value file `id` of
    /// cell `cell`) turned into the error that names the file.
    fn with_values<T>(
        &self,
        cell: &str,
        id: u64,
        run: impl FnOnce(&ValueDir) -> std::result::Result<T, ReadFault>,
    ) -> Result<T> {
        let corrupt =
            |path: PathBuf, reason: String| Error::Corrupt { cell: cell.to_owned(), path, reason };
        let Some(values) = &self.values else {
            return Err(corrupt(self.label.clone(), "points at a value file".into()));
        };
        let path = values.file_path(id);
        run(values).map_err(|fault| match fault {
            ReadFault::Io(source) if source.kind() == io::ErrorKind::NotFound => {
                corrupt(path.clone(), "its value file is missing".into())
            }
            ReadFault::Io(source) => Error::Io { path: path.clone(), source },
            ReadFault::Length { expected, found } => corrupt(
                path.clone(),
                format!("value file holds {found} bytes, its record says {expected}"),
            ),
            ReadFault::Checksum => {
                corrupt(path.clone(), "value file checksum does not match".into())
            }
        })
    }

    /// Installs decoded values. A cell comes out clean (its stored value is the one
    /// installed) unless the value is stale or was found under an alias, which the
    /// next save then writes under the cell's own name. Each cell's lock is waited
    /// for in turn.
    pub(super) fn install(&self, state: &mut State, mut decoded: Vec<Decoded<'_>>) {
        // Waiting, it installs all.
        let _ = self.put(state, &mut decoded, true);
    }

    /// Installs `decoded` under the gate: waiting for the gate and each cell's
    /// lock in turn (`wait`), or taking the gate and every cell's lock first
    /// without waiting, then installing all; what someone holds, when none was
    /// installed.
    fn put(
        &self,
        state: &mut State,
        decoded: &mut [Decoded<'_>],
        wait: bool,
    ) -> Result<(), Blocked> {
        let _exclusive = if wait {
            exclusive()
        } else {
            try_exclusive_for(super::GATE_UNDER_STATE).ok_or(Blocked::Gate)?
        };
        let mut puts = Vec::with_capacity(decoded.len());
        for (k, it) in decoded.iter_mut().enumerate() {
            let (cell_idx, key, again) = (it.cell_idx, it.key.clone(), it.stale);
            let Some(put) = it.install.lock(wait) else { return Err(Blocked::Cell(k)) };
            if wait {
                // Installed at once: no lock held while the next is waited for.
                self.mark(state, cell_idx, key, again, put());
            } else {
                puts.push((put, cell_idx, key, again));
            }
        }
        for (put, cell_idx, key, again) in puts {
            self.mark(state, cell_idx, key, again, put());
        }
        Ok(())
    }

    /// Records that cell `cell_idx` holds the value stored under `key` (`again` if
    /// it must be written again), installed at change counter `seq`.
    fn mark(&self, state: &mut State, cell_idx: usize, key: String, again: bool, seq: u64) {
        let Some(cell) = self.cells.get(cell_idx) else { return };
        let renamed = key != cell.name();
        if let Some(slot) = state.saved.get_mut(cell_idx) {
            *slot = (!again && !renamed).then_some(seq);
        }
        if again || renamed {
            state.pending.insert(cell_idx);
        } else {
            state.pending.remove(&cell_idx);
        }
        if let Some(slot) = state.renamed.get_mut(cell_idx) {
            *slot = renamed.then_some(key);
        }
    }

    /// Lists the stored names that no cell claims, by its name or (for a value
    /// loaded under an alias and not yet saved again) that alias.
    pub(super) fn refresh_orphans(&self, state: &mut State) {
        let mut used: BTreeSet<&str> = self.cells.iter().map(|cell| cell.name()).collect();
        used.extend(state.renamed.iter().flatten().map(String::as_str));
        let orphans = state.current.keys().filter(|name| !used.contains(name.as_str()));
        state.orphans = orphans.cloned().collect();
    }

    /// The value file a stored record points at and the size of its value.
    pub(super) fn summary(&self, name: &str, bytes: &[u8]) -> Option<(Option<u64>, u64)> {
        let plain = self.sealer.open(&codec::cell_key(name), bytes).ok()?;
        let record = Record::decode(&plain).ok()?;
        Some((record.file(), record.value_len()))
    }
}
