//! [`Store`]: loads, saves and reloads a set of cells; and the global store behind
//! [`open`], [`save_all`] and [`reload_all`].

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet, btree_map::Entry},
    fmt,
    fs::{File, TryLockError},
    io,
    path::{Path, PathBuf},
    sync::{Arc, Weak},
    time::Duration,
};

use parking_lot::Mutex;

use crate::{
    Error, Result, StateCell,
    atomically::{ensure_outside, exclusive},
    backend::{Backend, Memory, Records, Sled},
    cell::{ErasedCell, Install, Value},
    codec::{self, Body, FORMAT_VERSION, Record},
    error::CodecError,
    fs, registry,
    values::{Encoded, ReadFault, ValueDir, ValueWriter},
};

const LOCK_FILE: &str = "LOCK";
const ENGINE_DIR: &str = "sled";
const VALUES_DIR: &str = "values";
const MEMORY_LABEL: &str = ":memory:";
// How long a held directory lock is retried before the store counts as open elsewhere.
const LOCK_WAIT: Duration = Duration::from_millis(250);

/// An open store: a directory (or memory) holding the saved values of a set of cells.
///
/// [`open`] opens the global store for every cell declared with
/// [`defstate!`](crate::defstate), which the free functions [`save_all`] and
/// [`reload_all`] use. A [`StoreBuilder`] opens stores over a chosen set of cells,
/// on disk or in memory, which is what tests and libraries want: two such stores
/// never touch each other's cells or files.
///
/// A `Store` is a cheap handle: clones share one open store, which closes (and
/// unlocks its directory) when the last clone is dropped.
///
/// # Example
/// ```
/// use instastate::{StateCell, Store};
///
/// static SCORE: StateCell<u32> = StateCell::new("docs::store::SCORE", || 0);
///
/// # fn main() -> instastate::Result<()> {
/// # let dir = tempfile::tempdir().unwrap();
/// {
///     let store = Store::builder().cell(&SCORE).open(dir.path())?;
///     SCORE.set(42);
///     store.save_all()?;
/// }
/// SCORE.set(0);
/// let _store = Store::builder().cell(&SCORE).open(dir.path())?;
/// assert_eq!(SCORE.get(), 42);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
#[must_use = "the store closes when its last handle is dropped"]
pub struct Store {
    inner: Arc<Inner>,
}

/// Chooses the cells of a [`Store`] and where it keeps them.
///
/// # Example
/// ```
/// use instastate::{StateCell, Store};
///
/// static A: StateCell<u8> = StateCell::new("docs::builder::A", || 1);
/// static B: StateCell<String> = StateCell::new("docs::builder::B", String::new);
///
/// # fn main() -> instastate::Result<()> {
/// let store = Store::builder().cell(&A).cell(&B).in_memory()?;
/// A.set(2);
/// store.save_all()?;
/// A.set(3);
/// store.reload_all()?;
/// assert_eq!(A.get(), 2);
/// # Ok(())
/// # }
/// ```
#[derive(Default)]
#[must_use]
pub struct StoreBuilder {
    cells: Vec<&'static dyn ErasedCell>,
}

struct Inner {
    // The store directory, or `:memory:`; names the store in errors.
    label: PathBuf,
    backend: Box<dyn Backend>,
    values: Option<ValueDir>,
    cells: Vec<&'static dyn ErasedCell>,
    // Held for the whole of a save, reload or load, which therefore never overlap.
    state: Mutex<State>,
    // Held open for its lock, which the OS releases when the store is dropped.
    _lock: Option<File>,
}

#[derive(Default)]
struct State {
    // Per cell, by index into `Inner::cells`: what the store holds for it.
    saved: Vec<Option<Saved>>,
    generation: u64,
    poisoned: bool,
    orphans: Vec<String>,
}

#[derive(Clone, Copy)]
struct Saved {
    // The cell's change counter when the stored value was taken from it (or put into it).
    seq: u64,
    // The value file the stored record points at, if any.
    file: Option<u64>,
}

/// A cell's value, encoded by a save and waiting for the commit.
struct Staged {
    cell_idx: usize,
    seq: u64,
    encoded: Encoded,
}

/// A saved value, decoded by a load and waiting to be installed.
struct Decoded<'a> {
    cell_idx: usize,
    install: Install<'a>,
    file: Option<u64>,
}

impl StoreBuilder {
    /// Adds `cell` to the store; adding one cell twice adds it once.
    ///
    /// # Example
    /// ```
    /// # use instastate::{StateCell, Store};
    /// static SEEN: StateCell<Vec<String>> = StateCell::new("docs::cell::SEEN", Vec::new);
    /// # fn main() -> instastate::Result<()> {
    /// let store = Store::builder().cell(&SEEN).cell(&SEEN).in_memory()?;
    /// store.save_all()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn cell<T: Value>(mut self, cell: &'static StateCell<T>) -> StoreBuilder {
        self.cells.push(cell);
        self
    }

    /// Adds every cell declared with [`defstate!`](crate::defstate) in the program.
    ///
    /// This is what [`open`] uses; it is here for a store of all cells that is not
    /// the global one, such as an in-memory store in a test.
    ///
    /// # Example
    /// ```
    /// instastate::defstate!(MODE: String = "edit".to_owned());
    ///
    /// # fn main() -> instastate::Result<()> {
    /// let store = instastate::Store::builder().registered_cells().in_memory()?;
    /// store.save_all()?;
    /// MODE.set("view".to_owned());
    /// store.reload_all()?;
    /// assert_eq!(MODE.get(), "edit");
    /// # Ok(())
    /// # }
    /// ```
    pub fn registered_cells(mut self) -> StoreBuilder {
        self.cells.extend(registry::registered());
        self
    }

    /// Opens (creating if needed) the store in directory `path` and loads every cell
    /// that has a saved value there; cells without one keep their value.
    ///
    /// Loading is all or nothing: if any cell's saved value cannot be loaded, no cell
    /// changes and no stored value changes (the engine may still tidy its own files).
    ///
    /// # Errors
    /// - [`Error::Locked`] when another store, in this or another process, has `path` open;
    /// - [`Error::DuplicateName`] when two of the cells share a name;
    /// - [`Error::TypeMismatch`], [`Error::Decode`] or [`Error::Corrupt`] when a
    ///   cell's saved value cannot be loaded ([`Error::Several`] when more than one cannot);
    /// - [`Error::FormatVersion`] when the store was written by another format;
    /// - [`Error::Io`] or [`Error::Storage`] when the file system or engine fails.
    ///
    /// # Example
    /// ```
    /// # use instastate::{StateCell, Store};
    /// static LAST: StateCell<Option<String>> = StateCell::new("docs::open::LAST", || None);
    /// # fn main() -> instastate::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let store = Store::builder().cell(&LAST).open(dir.path().join("state"))?;
    /// assert_eq!(store.path(), Some(dir.path().join("state").as_path()));
    /// # Ok(())
    /// # }
    /// ```
    pub fn open(self, path: impl AsRef<Path>) -> Result<Store> {
        let path = path.as_ref();
        let cells = check_names(self.cells)?;
        fs::create_dir_durably(path).map_err(Error::io(path))?;
        let lock = lock(path)?;
        let backend = Sled::open(&path.join(ENGINE_DIR))?;
        let values_path = path.join(VALUES_DIR);
        let values = ValueDir::open(values_path.clone()).map_err(Error::io(values_path))?;
        Store::load(Inner {
            label: path.to_path_buf(),
            backend: Box::new(backend),
            values: Some(values),
            cells,
            state: Mutex::default(),
            _lock: Some(lock),
        })
    }

    /// Opens a store that keeps its saved values in memory, for tests and for
    /// programs that want [`reload_all`](Store::reload_all) without a disk.
    ///
    /// # Errors
    /// [`Error::DuplicateName`] when two of the cells share a name.
    ///
    /// # Example
    /// ```
    /// # use instastate::{StateCell, Store};
    /// static DRAFT: StateCell<String> = StateCell::new("docs::mem::DRAFT", String::new);
    /// # fn main() -> instastate::Result<()> {
    /// let store = Store::builder().cell(&DRAFT).in_memory()?;
    /// assert_eq!(store.path(), None);
    /// # Ok(())
    /// # }
    /// ```
    pub fn in_memory(self) -> Result<Store> {
        let cells = check_names(self.cells)?;
        Store::load(Inner {
            label: PathBuf::from(MEMORY_LABEL),
            backend: Box::new(Memory::default()),
            values: None,
            cells,
            state: Mutex::default(),
            _lock: None,
        })
    }
}

impl Store {
    /// Starts choosing the cells of a new store.
    ///
    /// # Example
    /// ```
    /// # use instastate::{StateCell, Store};
    /// # static A: StateCell<u8> = StateCell::new("docs::new::A", || 1);
    /// # fn main() -> instastate::Result<()> {
    /// let store = Store::builder().cell(&A).in_memory()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn builder() -> StoreBuilder {
        StoreBuilder::default()
    }

    /// The store's directory, or `None` for an in-memory store.
    ///
    /// # Example
    /// ```
    /// # fn main() -> instastate::Result<()> {
    /// let store = instastate::Store::builder().in_memory()?;
    /// assert!(store.path().is_none());
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn path(&self) -> Option<&Path> {
        self.inner.values.as_ref().map(|_| self.inner.label.as_path())
    }

    /// Saves every cell changed since the last save, plus every cell never saved, in
    /// one atomic, durable and consistent step.
    ///
    /// - Atomic: if the process or machine dies during the save, the store holds
    ///   either the previous save or this one, never a mix.
    /// - Durable: once this returns `Ok`, the save survives power loss (the files
    ///   written are fsynced, and so is their directory).
    /// - Consistent: the save sees each [`atomically`](crate::atomically) block
    ///   whole or not at all; it waits for running blocks and holds new ones back
    ///   while it encodes (not while it writes to disk).
    ///
    /// A save with nothing changed does no I/O. After an I/O failure the store is
    /// poisoned: every later save or reload fails with [`Error::Poisoned`] until the
    /// store is reopened. Cells are never changed by a save, successful or not.
    ///
    /// Do not call it while holding a cell's [`write`](StateCell::write) guard on
    /// the same thread: the save would wait for that cell forever.
    ///
    /// # Errors
    /// - [`Error::Encode`] when a cell's value cannot be encoded (nothing is saved);
    /// - [`Error::Io`] or [`Error::Storage`] when writing fails (the store is poisoned);
    /// - [`Error::Poisoned`] after an earlier failure;
    /// - [`Error::InsideAtomically`] when called inside [`atomically`](crate::atomically).
    ///
    /// # Example
    /// ```
    /// # use instastate::{StateCell, Store};
    /// static HITS: StateCell<u64> = StateCell::new("docs::save::HITS", || 0);
    /// # fn main() -> instastate::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let store = Store::builder().cell(&HITS).open(dir.path())?;
    /// HITS.update(|hits| *hits += 1);
    /// store.save_all()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn save_all(&self) -> Result<()> {
        ensure_outside("save_all")?;
        let inner = &*self.inner;
        let mut state = inner.state.lock();
        if state.poisoned {
            return Err(Error::Poisoned { path: inner.label.clone() });
        }
        let mut staged = Vec::new();
        let encoded = {
            let _exclusive = exclusive();
            inner.encode_changed(&state, &mut staged)
        };
        if let Err(err) = encoded {
            inner.discard(&staged);
            state.poisoned = matches!(err, Error::Io { .. });
            return Err(err);
        }
        if staged.is_empty() {
            return Ok(());
        }
        if let Err(err) = inner.commit(&staged, state.generation.wrapping_add(1)) {
            // The new files stay: the engine may have taken the batch before failing
            // and may still make it durable, and its records point at them. The next
            // open deletes whichever files end up unreferenced.
            state.poisoned = true;
            return Err(err);
        }
        state.generation = state.generation.wrapping_add(1);
        for Staged { cell_idx, seq, encoded } in staged {
            let file = match encoded {
                Encoded::Inline(_) => None,
                Encoded::File(spilled) => Some(spilled.id),
            };
            let Some(slot) = state.saved.get_mut(cell_idx) else { continue };
            let replaced = slot.replace(Saved { seq, file }).and_then(|saved| saved.file);
            if let (Some(old), Some(values)) = (replaced, &inner.values) {
                // A file that cannot be deleted now is unreferenced, and goes at the next open.
                let _ = values.remove(old);
            }
        }
        Ok(())
    }

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
    /// - [`Error::InsideAtomically`] when called inside [`atomically`](crate::atomically).
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
        let mut state = inner.state.lock();
        // The engine of a poisoned store may hold records it never made durable.
        if state.poisoned {
            return Err(Error::Poisoned { path: inner.label.clone() });
        }
        let records = inner.backend.read_all()?;
        let decoded = inner.decode_all(&records, Missing::Fail)?;
        Inner::install(&mut state, decoded);
        Ok(())
    }

    /// The names of saved values that no cell of this store claims, found at open:
    /// cells that were renamed, moved or deleted. Their data is kept.
    ///
    /// # Example
    /// ```
    /// # fn main() -> instastate::Result<()> {
    /// let store = instastate::Store::builder().in_memory()?;
    /// assert!(store.orphans().is_empty());
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn orphans(&self) -> Vec<String> {
        self.inner.state.lock().orphans.clone()
    }

    fn load(inner: Inner) -> Result<Store> {
        ensure_outside("open")?;
        let records = inner.backend.read_all()?;
        check_format(&inner.label, &records)?;
        let decoded = inner.decode_all(&records, Missing::Skip)?;
        let mut state = State {
            saved: vec![None; inner.cells.len()],
            generation: generation(&inner.label, &records)?,
            ..State::default()
        };
        Inner::install(&mut state, decoded);
        let claimed: BTreeSet<&str> = inner.cells.iter().map(|cell| cell.name()).collect();
        state.orphans = records
            .keys()
            .filter_map(|key| codec::cell_name(key))
            .filter(|name| !claimed.contains(name))
            .map(str::to_owned)
            .collect();
        // Leftover files are harmless, and the cells are already loaded: a failed
        // cleanup must not fail the open. The next open tries again.
        let _ = inner.remove_unreferenced_files(&records);
        Ok(Store { inner: Arc::new(Inner { state: Mutex::new(state), ..inner }) })
    }
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.label)
            .field("cells", &self.inner.cells.len())
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for StoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.cells.iter().map(|cell| cell.name()).collect();
        f.debug_struct("StoreBuilder").field("cells", &names).finish()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Missing {
    Skip,
    Fail,
}

impl Inner {
    fn encode_changed(&self, state: &State, staged: &mut Vec<Staged>) -> Result<()> {
        for (cell_idx, cell) in self.cells.iter().enumerate() {
            let saved = state.saved.get(cell_idx).copied().flatten().map(|saved| saved.seq);
            let mut writer = ValueWriter::new(self.values.as_ref());
            let res = cell.encode_if_changed(saved, &mut writer);
            let seq = match res {
                Ok(Some(seq)) => seq,
                Ok(None) => continue,
                Err(source) => {
                    let created = writer.file_id();
                    if let (Some(id), Some(values)) = (created, &self.values) {
                        let _ = values.remove(id);
                    }
                    return Err(match writer.take_error() {
                        Some(source) => Error::Io { path: self.values_path(), source },
                        None => Error::Encode {
                            cell: cell.name().to_owned(),
                            type_name: cell.type_name().to_owned(),
                            source: CodecError(source),
                        },
                    });
                }
            };
            let encoded = writer.finish().map_err(Error::io(self.values_path()))?;
            staged.push(Staged { cell_idx, seq, encoded });
        }
        Ok(())
    }

    fn commit(&self, staged: &[Staged], generation: u64) -> Result<()> {
        let mut spilled_any = false;
        for Staged { encoded, .. } in staged {
            if let Encoded::File(spilled) = encoded {
                spilled.sync().map_err(Error::io(self.values_path()))?;
                spilled_any = true;
            }
        }
        if let (true, Some(values)) = (spilled_any, &self.values) {
            values.sync().map_err(Error::io(values.path()))?;
        }
        let mut batch = Vec::with_capacity(staged.len() + 2);
        for Staged { cell_idx, encoded, .. } in staged {
            let Some(cell) = self.cells.get(*cell_idx) else { continue };
            let body = match encoded {
                Encoded::Inline(bytes) => Body::Inline(bytes),
                Encoded::File(spilled) => {
                    Body::File { id: spilled.id, len: spilled.len, crc: spilled.crc }
                }
            };
            let record = Record {
                format: FORMAT_VERSION,
                schema: cell.schema(),
                type_name: cell.type_name(),
                body,
            };
            batch.push((codec::cell_key(cell.name()), record.encode()));
        }
        batch.push((codec::FORMAT_KEY.to_vec(), codec::u32_bytes(FORMAT_VERSION.into()).to_vec()));
        batch.push((codec::GENERATION_KEY.to_vec(), codec::u64_bytes(generation).to_vec()));
        self.backend.commit(batch)
    }

    /// Deletes the value files of a save that failed before its commit began.
    fn discard(&self, staged: &[Staged]) {
        let Some(values) = &self.values else { return };
        for Staged { encoded, .. } in staged {
            if let Encoded::File(spilled) = encoded {
                let _ = values.remove(spilled.id);
            }
        }
    }

    fn decode_all(&self, records: &Records, missing: Missing) -> Result<Vec<Decoded<'static>>> {
        let mut decoded = Vec::with_capacity(self.cells.len());
        let mut errors = Vec::new();
        for (cell_idx, cell) in self.cells.iter().enumerate() {
            let Some(bytes) = records.get(&codec::cell_key(cell.name())) else {
                if missing == Missing::Fail {
                    errors.push(Error::NeverSaved { cell: cell.name().to_owned() });
                }
                continue;
            };
            match self.decode(*cell, bytes) {
                Ok((install, file)) => decoded.push(Decoded { cell_idx, install, file }),
                Err(err) => errors.push(err),
            }
        }
        match Error::from_list(errors) {
            Some(err) => Err(err),
            None => Ok(decoded),
        }
    }

    fn decode(
        &self,
        cell: &'static dyn ErasedCell,
        bytes: &[u8],
    ) -> Result<(Install<'static>, Option<u64>)> {
        let corrupt = |path: PathBuf, reason: String| Error::Corrupt {
            cell: cell.name().to_owned(),
            path,
            reason,
        };
        let record = Record::decode(bytes)
            .map_err(|fault| corrupt(self.engine_path(), fault.to_string()))?;
        if record.type_name != codec::stored_type_name(cell.type_name())
            || record.schema != cell.schema()
        {
            return Err(Error::TypeMismatch {
                cell: cell.name().to_owned(),
                stored_type: record.type_name.to_owned(),
                stored_schema: record.schema,
                expected_type: cell.type_name().to_owned(),
                expected_schema: cell.schema(),
            });
        }
        let (value_bytes, file): (Cow<'_, [u8]>, _) = match record.body {
            Body::Inline(bytes) => (Cow::Borrowed(bytes), None),
            Body::File { id, len, crc } => {
                let Some(values) = &self.values else {
                    return Err(corrupt(self.label.clone(), "points at a value file".into()));
                };
                let path = values.file_path(id);
                let bytes = values.read(id, len, crc).map_err(|fault| match fault {
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
                })?;
                (Cow::Owned(bytes), Some(id))
            }
        };
        let install = cell.decode(&value_bytes).map_err(|source| Error::Decode {
            cell: cell.name().to_owned(),
            stored_type: record.type_name.to_owned(),
            expected_type: cell.type_name().to_owned(),
            source: CodecError(source),
        })?;
        Ok((install, file))
    }

    fn install(state: &mut State, decoded: Vec<Decoded<'_>>) {
        let _exclusive = exclusive();
        for Decoded { cell_idx, install, file } in decoded {
            let seq = install();
            if let Some(slot) = state.saved.get_mut(cell_idx) {
                *slot = Some(Saved { seq, file });
            }
        }
    }

    /// Deletes value files that no record points at: leftovers of interrupted saves.
    fn remove_unreferenced_files(&self, records: &Records) -> Result<()> {
        let Some(values) = &self.values else { return Ok(()) };
        let mut keep = BTreeSet::new();
        for (key, bytes) in records {
            if codec::cell_name(key).is_none() {
                continue;
            }
            match Record::decode(bytes) {
                Ok(Record { body: Body::File { id, .. }, .. }) => {
                    keep.insert(id);
                }
                Ok(_) => {}
                // An unreadable orphan record might point at any file: keep them all.
                Err(_) => return Ok(()),
            }
        }
        values.remove_all_but(&keep).map_err(Error::io(values.path()))
    }

    fn engine_path(&self) -> PathBuf {
        match &self.values {
            Some(_) => self.label.join(ENGINE_DIR),
            None => self.label.clone(),
        }
    }

    fn values_path(&self) -> PathBuf {
        self.values
            .as_ref()
            .map_or_else(|| self.label.clone(), |values| values.path().to_path_buf())
    }
}

fn check_names(cells: Vec<&'static dyn ErasedCell>) -> Result<Vec<&'static dyn ErasedCell>> {
    let mut by_name: BTreeMap<&str, &'static dyn ErasedCell> = BTreeMap::new();
    let mut unique = Vec::with_capacity(cells.len());
    for cell in cells {
        match by_name.entry(cell.name()) {
            Entry::Occupied(it) if std::ptr::addr_eq(*it.get(), cell) => {}
            Entry::Occupied(it) => {
                let first = *it.get();
                return Err(Error::DuplicateName {
                    name: cell.name().to_owned(),
                    first: format!("{}: {}", first.origin(), first.type_name()),
                    second: format!("{}: {}", cell.origin(), cell.type_name()),
                });
            }
            Entry::Vacant(it) => {
                it.insert(cell);
                unique.push(cell);
            }
        }
    }
    Ok(unique)
}

fn check_format(label: &Path, records: &Records) -> Result<()> {
    let expected = u32::from(FORMAT_VERSION);
    match meta(label, records, codec::FORMAT_KEY, codec::read_u32)? {
        Some(found) if found != expected => {
            Err(Error::FormatVersion { path: label.to_path_buf(), found, expected })
        }
        _ => Ok(()),
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
    let Some(bytes) = records.get(key) else { return Ok(None) };
    let value = read(bytes).ok_or_else(|| {
        let key = String::from_utf8_lossy(key).into_owned();
        Error::Corrupt {
            reason: format!(
                "{key} is {} bytes long, not {}",
                bytes.len(),
                std::mem::size_of::<T>()
            ),
            cell: key,
            path: label.join(ENGINE_DIR),
        }
    })?;
    Ok(Some(value))
}

fn lock(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(Error::io(&path))?;
    // The lock belongs to the open file, and a child process forked by any thread
    // shares our open files until it runs `exec`: for a moment after a store is
    // dropped, such a child can still hold its lock. A short wait tells that apart
    // from a store that is really open elsewhere, which is still reported at once.
    let res = fs::retry_while_held(
        LOCK_WAIT,
        || file.try_lock(),
        |err| matches!(err, TryLockError::WouldBlock),
    );
    match res {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(Error::Locked { path: dir.to_path_buf() }),
        Err(TryLockError::Error(source)) => Err(Error::Io { path, source }),
    }
}

// The store `open` installed; weak, so that dropping the last `Store` closes it.
static GLOBAL: Mutex<Weak<Inner>> = Mutex::new(Weak::new());

/// Opens the global store in directory `path` for every cell declared with
/// [`defstate!`](crate::defstate), and loads each cell's saved value.
///
/// [`save_all`] and [`reload_all`] act on this store while the returned [`Store`]
/// (or a clone of it) is alive; dropping the last one closes the store.
/// See [`StoreBuilder::open`] for what loading does.
///
/// # Errors
/// [`Error::AlreadyOpen`] while the global store is open, and every error of
/// [`StoreBuilder::open`].
///
/// # Example
/// ```
/// instastate::defstate!(VISITS: u64 = 0);
///
/// # fn main() -> instastate::Result<()> {
/// # let dir = tempfile::tempdir().unwrap();
/// let _store = instastate::open(dir.path())?;
/// VISITS.update(|visits| *visits += 1);
/// instastate::save_all()?;
/// # Ok(())
/// # }
/// ```
pub fn open(path: impl AsRef<Path>) -> Result<Store> {
    let mut global = GLOBAL.lock();
    if let Some(open) = global.upgrade() {
        return Err(Error::AlreadyOpen { path: open.label.clone() });
    }
    let store = Store::builder().registered_cells().open(path)?;
    *global = Arc::downgrade(&store.inner);
    Ok(store)
}

/// Saves the global store opened by [`open`]: see [`Store::save_all`].
///
/// # Errors
/// [`Error::NotOpen`] when no global store is open, and every error of [`Store::save_all`].
///
/// # Example
/// ```
/// assert!(matches!(instastate::save_all(), Err(instastate::Error::NotOpen)));
/// ```
pub fn save_all() -> Result<()> {
    global()?.save_all()
}

/// Reverts every cell of the global store opened by [`open`] to its last save: see
/// [`Store::reload_all`].
///
/// # Errors
/// [`Error::NotOpen`] when no global store is open, and every error of [`Store::reload_all`].
///
/// # Example
/// ```
/// assert!(matches!(instastate::reload_all(), Err(instastate::Error::NotOpen)));
/// ```
pub fn reload_all() -> Result<()> {
    global()?.reload_all()
}

fn global() -> Result<Store> {
    let inner = GLOBAL.lock().upgrade().ok_or(Error::NotOpen)?;
    Ok(Store { inner })
}
