//! [`Store`]: loads, saves and reloads a set of cells; and the global store behind
//! [`open`], [`save_all`] and [`reload_all`].

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet, VecDeque, btree_map::Entry},
    fmt,
    fs::File,
    io,
    path::{Path, PathBuf},
    sync::{Arc, Weak},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use parking_lot::Mutex;

use crate::{
    Error, Result, StateCell,
    atomically::{ensure_outside, exclusive},
    autosave::Background,
    backend::{Backend, Batch, Memory, Records, Sled},
    cell::{ErasedCell, Install, Value},
    codec::{self, Body, FORMAT_V1, FORMAT_VERSION, Record},
    crypt::{KEYCHECK_PLAIN, SealFault, Sealer},
    error::CodecError,
    fs,
    journal::{Durability, Recovery},
    journaled::{self, JournalOptions, JournaledCell},
    registry,
    schema::DecodeFault,
    values::{Encoded, ReadFault, Spilled, ValueDir, ValueWriter},
};

const LOCK_FILE: &str = "LOCK";
pub(crate) const ENGINE_DIR: &str = "sled";
pub(crate) const VALUES_DIR: &str = "values";
const MEMORY_LABEL: &str = ":memory:";
// How many saves the history keeps unless the builder says otherwise.
const DEFAULT_HISTORY: usize = 10;
// How many bytes of earlier values the history keeps unless the builder says otherwise.
const DEFAULT_HISTORY_BYTES: u64 = 64 * 1024 * 1024;

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
    pub(crate) inner: Arc<Inner>,
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
#[must_use]
pub struct StoreBuilder {
    cells: Vec<&'static dyn ErasedCell>,
    keep: usize,
    keep_bytes: u64,
    journal: JournalOptions,
    #[cfg(feature = "encryption")]
    key: Option<crate::EncryptionKey>,
}

pub(crate) struct Inner {
    // The store directory, or `:memory:`; names the store in errors.
    pub(crate) label: PathBuf,
    pub(crate) backend: Box<dyn Backend>,
    pub(crate) values: Option<ValueDir>,
    pub(crate) sealer: Sealer,
    pub(crate) cells: Vec<&'static dyn ErasedCell>,
    // The journaled cells, which are kept in journals of their own, not in `cells`.
    pub(crate) journaled: Vec<&'static dyn JournaledCell>,
    journal: JournalOptions,
    // Whether this store attached the journaled cells' journals (a failed open did not).
    journals_attached: bool,
    // How many saves the history keeps (at least 1).
    keep: usize,
    // How many bytes of earlier values the history keeps beyond the last save.
    keep_bytes: u64,
    // Held for the whole of a save, reload or load, which therefore never overlap.
    pub(crate) state: Mutex<State>,
    pub(crate) background: Background,
    // Held open for its lock, which the OS releases when the store is dropped.
    _lock: Option<File>,
}

#[derive(Default)]
pub(crate) struct State {
    // Per cell, by index into `Inner::cells`: the change counter its stored value
    // was taken at, or `None` when the next save must write it.
    saved: Vec<Option<u64>>,
    // Per cell: the other name (an alias) its stored value was loaded from, whose
    // record the next save of the cell deletes.
    renamed: Vec<Option<String>>,
    // Every stored cell record, by name, exactly as stored.
    pub(crate) current: BTreeMap<String, Vec<u8>>,
    // The saves the history holds, oldest first.
    pub(crate) history: VecDeque<Kept>,
    // The cell names stored under `meta/claimed`.
    pub(crate) claimed: Option<Vec<String>>,
    // Manifests found damaged at open, and the older ones after them: not in the
    // history, and deleted by the next save. The files they point at are unknown.
    pub(crate) damaged_history: Vec<u64>,
    pub(crate) generation: u64,
    // The time the next generation is stamped with, set just before it is made.
    pub(crate) now_ms: u64,
    pub(crate) poisoned: bool,
    pub(crate) orphans: Vec<String>,
}

/// Stored cell records by name.
pub(crate) type Named = BTreeMap<String, Vec<u8>>;

/// A save the history holds.
pub(crate) struct Kept {
    pub(crate) generation: u64,
    pub(crate) at_ms: u64,
    pub(crate) changed: Vec<String>,
    // The value files its pre-images point at, deleted when it is pruned.
    pub(crate) files: Vec<u64>,
    // How many keys its manifest is split over.
    pub(crate) chunks: u32,
    // The size of the earlier values it holds.
    pub(crate) bytes: u64,
}

/// One save in a store's history: see [`Store::history`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Generation {
    /// The save's number; each save numbers one more than the one before.
    pub number: u64,
    /// When the save was made.
    pub saved_at: SystemTime,
    /// The names of the cells the save wrote.
    pub changed: Vec<String>,
}

/// A cell's value, encoded by a save and waiting for the commit.
struct Staged {
    cell_idx: usize,
    seq: u64,
    encoded: Encoded,
}

/// A saved value, decoded and waiting to be installed.
pub(crate) struct Decoded<'a> {
    cell_idx: usize,
    install: Install<'a>,
    // The name the value was stored under: the cell's, or one of its aliases.
    key: String,
    // Whether the store must write the value again: it was migrated from an older
    // schema version, or (after a revert) it is not the value the store holds.
    stale: bool,
}

impl Default for StoreBuilder {
    fn default() -> StoreBuilder {
        StoreBuilder {
            cells: Vec::new(),
            keep: DEFAULT_HISTORY,
            keep_bytes: DEFAULT_HISTORY_BYTES,
            journal: JournalOptions {
                durability: Durability::SyncEach,
                recovery: Recovery::Strict,
            },
            #[cfg(feature = "encryption")]
            key: None,
        }
    }
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

    /// When an event handled by a journaled cell ([`StateCell::handle`]) is durable;
    /// [`Durability::SyncEach`] by default, as for a [`Prevayler`](crate::Prevayler).
    ///
    /// # Example
    /// ```
    /// use instastate::{Store, prevalence::Durability};
    /// # fn main() -> instastate::Result<()> {
    /// let store = Store::builder().journal_durability(Durability::GroupCommit).in_memory()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn journal_durability(mut self, durability: Durability) -> StoreBuilder {
        self.journal.durability = durability;
        self
    }

    /// What to do about damage in a journaled cell's journal; [`Recovery::Strict`]
    /// by default, as for a [`Prevayler`](crate::Prevayler).
    pub fn journal_recovery(mut self, recovery: Recovery) -> StoreBuilder {
        self.journal.recovery = recovery;
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

    /// Sets how many saves the history keeps for [`Store::revert_to`]: the last
    /// `saves` of them, at least 1 (the last save). The default is 10.
    ///
    /// Saves are incremental, so a kept save costs only the cells it changed: their
    /// values from before the save, which revert needs. Older saves are pruned as
    /// new ones are made.
    ///
    /// # Example
    /// ```
    /// # use instastate::{StateCell, Store};
    /// static STEP: StateCell<u32> = StateCell::new("docs::keep::STEP", || 0);
    /// # fn main() -> instastate::Result<()> {
    /// let store = Store::builder().cell(&STEP).keep_history(3).in_memory()?;
    /// for step in 1..=5 {
    ///     STEP.set(step);
    ///     store.save_all()?;
    /// }
    /// let kept: Vec<u64> = store.history().iter().map(|save| save.number).collect();
    /// assert_eq!(kept, [3, 4, 5]);
    /// # Ok(())
    /// # }
    /// ```
    pub fn keep_history(mut self, saves: usize) -> StoreBuilder {
        self.keep = saves.max(1);
        self
    }

    /// Sets how many bytes of earlier values the history may hold besides the last
    /// save's: older saves are pruned until the rest fit (the last save is always
    /// kept). The default is 64 MiB, so that a large state does not keep ten old
    /// copies of itself; `u64::MAX` lets [`keep_history`](Self::keep_history) alone
    /// decide.
    ///
    /// # Example
    /// ```
    /// # use instastate::{StateCell, Store};
    /// static BLOB: StateCell<Vec<u8>> = StateCell::new("docs::budget::BLOB", Vec::new);
    /// # fn main() -> instastate::Result<()> {
    /// let store = Store::builder().cell(&BLOB).history_bytes(10_000).in_memory()?;
    /// for byte in 0..5 {
    ///     BLOB.set(vec![byte; 4_000]); // each save keeps 4 KB of earlier value
    ///     store.save_all()?;
    /// }
    /// let kept: Vec<u64> = store.history().iter().map(|save| save.number).collect();
    /// assert_eq!(kept, [3, 4, 5]);
    /// # Ok(())
    /// # }
    /// ```
    pub fn history_bytes(mut self, bytes: u64) -> StoreBuilder {
        self.keep_bytes = bytes;
        self
    }

    /// Encrypts the store with `key` (feature `encryption`): every record and
    /// value file is sealed with XChaCha20-Poly1305 and a fresh random nonce.
    ///
    /// A new store becomes encrypted at open. An encrypted store opens only with its
    /// key ([`Error::WrongKey`] otherwise, [`Error::Encryption`] without one), and a
    /// tampered record or file fails to load with [`Error::Corrupt`]. Cell names,
    /// sizes and save times are not encrypted. Records are authenticated one by one:
    /// someone who can write the store can still replace a record with an older
    /// sealed one of the same cell, or delete it.
    ///
    /// # Example
    /// See [`EncryptionKey`](crate::EncryptionKey).
    #[cfg(feature = "encryption")]
    pub fn encryption_key(mut self, key: crate::EncryptionKey) -> StoreBuilder {
        self.key = Some(key);
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
        let sealer = self.sealer();
        let cells = check_names(self.cells)?;
        fs::create_dir_durably(path).map_err(Error::io(path))?;
        let lock = fs::lock_dir(path, LOCK_FILE)?;
        let backend = Sled::open(&path.join(ENGINE_DIR))?;
        let values_path = path.join(VALUES_DIR);
        let values = ValueDir::open(values_path.clone()).map_err(Error::io(values_path))?;
        let (cells, journaled) = split_journaled(cells);
        Store::load(Inner {
            label: path.to_path_buf(),
            backend: Box::new(backend),
            values: Some(values),
            sealer,
            cells,
            journaled,
            journal: self.journal,
            journals_attached: false,
            keep: self.keep,
            keep_bytes: self.keep_bytes,
            state: Mutex::default(),
            background: Background::default(),
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
        let sealer = self.sealer();
        let cells = check_names(self.cells)?;
        let (cells, journaled) = split_journaled(cells);
        Store::load(Inner {
            label: PathBuf::from(MEMORY_LABEL),
            backend: Box::new(Memory::default()),
            values: None,
            sealer,
            cells,
            journaled,
            journal: self.journal,
            journals_attached: false,
            keep: self.keep,
            keep_bytes: self.keep_bytes,
            state: Mutex::default(),
            background: Background::default(),
            _lock: None,
        })
    }

    #[cfg_attr(not(feature = "encryption"), allow(clippy::unused_self))]
    fn sealer(&self) -> Sealer {
        #[cfg(feature = "encryption")]
        return Sealer::new(self.key.as_ref());
        #[cfg(not(feature = "encryption"))]
        Sealer::default()
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

    /// Whether directory `path` holds a store, so that a tool can refuse to open
    /// (and so create) one where there is none.
    ///
    /// # Example
    /// ```
    /// use instastate::Store;
    /// # fn main() -> instastate::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// assert!(!Store::exists(dir.path()));
    /// drop(Store::builder().open(dir.path())?);
    /// assert!(Store::exists(dir.path()));
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn exists(path: impl AsRef<Path>) -> bool {
        Sled::exists(&path.as_ref().join(ENGINE_DIR))
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
        self.inner.take_background_error()?;
        self.inner.save()
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
        inner.take_background_error()?;
        let mut state = inner.state.lock();
        inner.check_poisoned(&state)?;
        inner.restore(&mut state, None)
    }

    /// Reverts every cell to its value in save number `generation`, all or nothing:
    /// the REPL's undo.
    ///
    /// Like [`reload_all`](Self::reload_all), which is `revert_to` the last save, it
    /// changes the cells and not the store: the next save writes the reverted values
    /// as a new save, and until then `reload_all` still returns to the last one.
    /// [`history`](Self::history) lists the generations it accepts.
    ///
    /// # Errors
    /// - [`Error::UnknownGeneration`] when the history does not hold `generation`;
    /// - [`Error::NeverSaved`] when a cell had no saved value yet in that save;
    /// - every error of [`reload_all`](Self::reload_all).
    ///
    /// # Example
    /// ```
    /// # use instastate::{StateCell, Store};
    /// static DOC: StateCell<String> = StateCell::new("docs::revert::DOC", String::new);
    /// # fn main() -> instastate::Result<()> {
    /// let store = Store::builder().cell(&DOC).in_memory()?;
    /// DOC.set("draft".into());
    /// store.save_all()?;
    /// let draft = store.generation();
    /// DOC.set("final".into());
    /// store.save_all()?;
    ///
    /// store.revert_to(draft)?;
    /// assert_eq!(DOC.get(), "draft");
    /// # Ok(())
    /// # }
    /// ```
    pub fn revert_to(&self, generation: u64) -> Result<()> {
        ensure_outside("revert_to")?;
        let inner = &*self.inner;
        inner.take_background_error()?;
        let mut state = inner.state.lock();
        inner.check_poisoned(&state)?;
        let target = inner.records_at(&state, generation)?;
        inner.restore(&mut state, Some(&target))
    }

    /// The saves the history holds, oldest first, each with its time and the cells
    /// it wrote. A store written before history existed starts one at its next save.
    ///
    /// # Example
    /// ```
    /// # use instastate::{StateCell, Store};
    /// static N: StateCell<u8> = StateCell::new("docs::history::N", || 0);
    /// # fn main() -> instastate::Result<()> {
    /// let store = Store::builder().cell(&N).in_memory()?;
    /// store.save_all()?;
    /// let last = store.history().pop().expect("one save");
    /// assert_eq!((last.number, last.changed), (1, vec!["docs::history::N".to_owned()]));
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn history(&self) -> Vec<Generation> {
        let state = self.inner.state.lock();
        state
            .history
            .iter()
            .map(|kept| Generation {
                number: kept.generation,
                saved_at: time_of(kept.at_ms),
                changed: kept.changed.clone(),
            })
            .collect()
    }

    /// The number of the last completed save; 0 before the first.
    ///
    /// # Example
    /// ```
    /// # fn main() -> instastate::Result<()> {
    /// let store = instastate::Store::builder().in_memory()?;
    /// assert_eq!(store.generation(), 0);
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn generation(&self) -> u64 {
        self.inner.state.lock().generation
    }

    /// Whether a cell changed since the last save (or was never saved), so that
    /// [`save_all`](Self::save_all) would write something.
    ///
    /// # Example
    /// ```
    /// # use instastate::{StateCell, Store};
    /// static FLAG: StateCell<bool> = StateCell::new("docs::dirty::FLAG", || false);
    /// # fn main() -> instastate::Result<()> {
    /// let store = Store::builder().cell(&FLAG).in_memory()?;
    /// assert!(store.has_unsaved_changes());
    /// store.save_all()?;
    /// assert!(!store.has_unsaved_changes());
    /// FLAG.set(true);
    /// assert!(store.has_unsaved_changes());
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn has_unsaved_changes(&self) -> bool {
        self.inner.is_dirty()
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

    fn load(mut inner: Inner) -> Result<Store> {
        ensure_outside("open")?;
        let records = inner.backend.read_all()?;
        check_format(&inner.label, &records)?;
        inner.check_key(&records)?;
        let mut state = State {
            saved: vec![None; inner.cells.len()],
            renamed: vec![None; inner.cells.len()],
            generation: generation(&inner.label, &records)?,
            ..State::default()
        };
        let mut generations = Vec::new();
        for (key, bytes) in &records {
            if let Some(name) = codec::cell_name(key) {
                state.current.insert(name.to_owned(), bytes.clone());
            } else if let Some(generation) = codec::history_generation(key) {
                generations.push(generation);
            }
        }
        // Newest first: a damaged manifest ends the history there. The current
        // values do not depend on it, so it must not stop the store from opening;
        // `verify` reports it, and the next save deletes it with the older ones.
        for generation in generations.into_iter().rev() {
            let read = inner.read_manifest(generation, |key| Ok(records.get(key).cloned()));
            match read.and_then(|(manifest, chunks)| inner.kept(manifest, chunks)) {
                Ok(kept) if state.damaged_history.is_empty() => state.history.push_front(kept),
                _ => state.damaged_history.push(generation),
            }
        }
        if let Some(bytes) = records.get(codec::CLAIMED_KEY) {
            let claimed = codec::decode_claimed(bytes).map_err(|fault| Error::Corrupt {
                cell: String::from_utf8_lossy(codec::CLAIMED_KEY).into_owned(),
                path: inner.engine_path(),
                reason: fault.to_string(),
            })?;
            state.claimed = Some(claimed);
        }
        let decoded = inner.decode_all(&state.current, Missing::Skip)?;
        let journals = inner.open_journals()?;
        inner.install(&mut state, decoded);
        for attach in journals {
            attach();
        }
        // From here on, dropping `inner` (also when the open fails) detaches them.
        inner.journals_attached = true;
        inner.refresh_orphans(&mut state);
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
        f.debug_struct("StoreBuilder")
            .field("cells", &names)
            .field("keep_history", &self.keep)
            .field("history_bytes", &self.keep_bytes)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Missing {
    Skip,
    Fail,
}

impl Inner {
    pub(crate) fn check_poisoned(&self, state: &State) -> Result<()> {
        // The engine of a poisoned store may hold records it never made durable.
        if state.poisoned {
            return Err(Error::Poisoned { path: self.label.clone() });
        }
        Ok(())
    }

    /// Whether a save would write something.
    pub(crate) fn is_dirty(&self) -> bool {
        let state = self.state.lock();
        self.cells.iter().zip(&state.saved).any(|(cell, saved)| *saved != Some(cell.seq()))
            || self.journaled.iter().any(|cell| cell.is_dirty())
    }

    /// Saves every changed cell as one new generation, then snapshots the journaled
    /// cells that handled events since their last snapshot; see [`Store::save_all`].
    pub(crate) fn save(&self) -> Result<()> {
        self.save_records()?;
        let errors =
            self.journaled.iter().filter_map(|cell| cell.snapshot_journal().err()).collect();
        Error::from_list(errors).map_or(Ok(()), Err)
    }

    /// Opens the journals of the journaled cells; the returned functions install
    /// their values, after every journal opened.
    fn open_journals(&self) -> Result<Vec<Box<dyn FnOnce() + Send>>> {
        let mut opened = Vec::with_capacity(self.journaled.len());
        let mut errors = Vec::new();
        for cell in &self.journaled {
            let dir =
                self.values.as_ref().map(|_| journaled::journal_dir(&self.label, cell.name()));
            match cell.open_journal(dir, self.journal, self.sealer.clone()) {
                Ok(attach) => opened.push(attach),
                Err(err) => errors.push(err),
            }
        }
        Error::from_list(errors).map_or(Ok(opened), Err)
    }

    /// Closes the journals of the journaled cells: every handled event is synced,
    /// and `handle` fails until the store is opened again.
    pub(crate) fn close_journals(&self) -> Result<()> {
        if !self.journals_attached {
            return Ok(());
        }
        let errors = self.journaled.iter().filter_map(|cell| cell.close_journal().err()).collect();
        Error::from_list(errors).map_or(Ok(()), Err)
    }

    fn save_records(&self) -> Result<()> {
        let mut state = self.state.lock();
        self.check_poisoned(&state)?;
        let mut staged = Vec::new();
        let encoded = {
            let _exclusive = exclusive();
            self.encode_changed(&state, &mut staged)
        };
        if let Err(err) = encoded {
            self.discard(&staged);
            state.poisoned = matches!(err, Error::Io { .. });
            return Err(err);
        }
        if staged.is_empty() {
            return Ok(());
        }
        state.now_ms = now_ms();
        let mut writes = Vec::new();
        for Staged { cell_idx, encoded, .. } in &staged {
            let Some(cell) = self.cells.get(*cell_idx) else { continue };
            writes.push((cell.name().to_owned(), Some(self.record(*cell, encoded, &state))));
            if let Some(alias) = state.renamed.get(*cell_idx).cloned().flatten() {
                writes.push((alias, None));
            }
        }
        let spilled: Vec<&Spilled> = staged.iter().filter_map(|it| it.encoded.spilled()).collect();
        self.commit_generation(&mut state, writes, &spilled)?;
        for Staged { cell_idx, seq, .. } in staged {
            if let Some(slot) = state.saved.get_mut(cell_idx) {
                *slot = Some(seq);
            }
            if let Some(slot) = state.renamed.get_mut(cell_idx) {
                *slot = None;
            }
        }
        Ok(())
    }

    /// The sealed record of `cell`'s value `encoded`, for the next generation.
    pub(crate) fn record(
        &self,
        cell: &dyn ErasedCell,
        encoded: &Encoded,
        state: &State,
    ) -> Vec<u8> {
        self.seal_record(cell.name(), cell.schema(), cell.type_name(), encoded, state)
    }

    pub(crate) fn seal_record(
        &self,
        name: &str,
        schema: u32,
        type_name: &str,
        encoded: &Encoded,
        state: &State,
    ) -> Vec<u8> {
        let body = match encoded {
            Encoded::Inline(bytes) => Body::Inline(bytes),
            Encoded::File(spilled) => {
                Body::File { id: spilled.id, len: spilled.len, crc: spilled.crc }
            }
        };
        let record = Record {
            format: FORMAT_VERSION,
            schema,
            saved: Some(codec::Saved {
                generation: state.generation.wrapping_add(1),
                at_ms: state.now_ms,
            }),
            type_name,
            body,
        };
        let key = codec::cell_key(name);
        self.sealer.seal(&key, record.encode())
    }

    /// Commits `writes` (a new record, or a deletion, per cell name) as the next
    /// generation, with its history manifest, after making `spilled` durable; prunes
    /// the history to its length. Poisons the store if the commit fails.
    pub(crate) fn commit_generation(
        &self,
        state: &mut State,
        writes: Vec<(String, Option<Vec<u8>>)>,
        spilled: &[&Spilled],
    ) -> Result<()> {
        let generation = state.generation.wrapping_add(1);
        let at_ms = state.now_ms;
        let mut batch = Batch::new();
        let mut entries = Vec::new();
        let mut files = Vec::new();
        let mut held = 0;
        for (name, bytes) in &writes {
            let pre = state.current.get(name).cloned();
            if let Some(record) = pre.as_deref().and_then(|pre| self.summary(name, pre)) {
                files.extend(record.0);
                held += record.1;
            }
            entries.push((name.clone(), pre));
            batch.push((codec::cell_key(name), bytes.clone()));
        }
        let manifest = codec::Manifest { generation, at_ms, entries };
        let parts = codec::split_manifest(generation, &manifest.encode());
        let chunks = u32::try_from(parts.len()).unwrap_or(u32::MAX);
        batch.extend(parts.into_iter().map(|(key, bytes)| (key, Some(bytes))));
        let pruned = self.to_prune(state, held);
        for kept in state.history.iter().take(pruned) {
            batch.push((codec::history_key(kept.generation), None));
            for chunk in 1..kept.chunks {
                batch.push((codec::history_chunk_key(kept.generation, chunk), None));
            }
        }
        // A damaged manifest's chunk count may be wrong too: its chunk keys are
        // left behind, and `verify` reports them.
        for damaged in &state.damaged_history {
            batch.push((codec::history_key(*damaged), None));
        }
        let format = codec::u32_bytes(FORMAT_VERSION.into()).to_vec();
        batch.push((codec::FORMAT_KEY.to_vec(), Some(format)));
        batch.push((codec::GENERATION_KEY.to_vec(), Some(codec::u64_bytes(generation).to_vec())));
        // A store opened without cells (by a tool) keeps the program's list.
        // The names some program's cells claimed: a store over a subset of the cells
        // (or none, as the tool opens it) adds its own and keeps the others, so the
        // tool never takes a live value for an orphan. A name leaves the list when
        // its value is deleted.
        let mut names: BTreeSet<String> = state.claimed.iter().flatten().cloned().collect();
        names.extend(self.cells.iter().map(|cell| cell.name().to_owned()));
        for (name, bytes) in &writes {
            if bytes.is_none() && !self.cells.iter().any(|cell| cell.name() == name) {
                names.remove(name);
            }
        }
        let claimed: Vec<String> = names.into_iter().collect();
        let claimed_changed = state.claimed.as_ref() != Some(&claimed);
        if claimed_changed {
            let bytes = codec::encode_claimed(claimed.iter().map(String::as_str));
            batch.push((codec::CLAIMED_KEY.to_vec(), Some(bytes)));
        }
        if let Err(err) = self.commit(spilled, batch) {
            // The new files stay: the engine may have taken the batch before failing
            // and may still make it durable, and its records point at them. The next
            // open deletes whichever files end up unreferenced.
            state.poisoned = true;
            return Err(err);
        }
        state.generation = generation;
        if claimed_changed {
            state.claimed = Some(claimed);
        }
        for (name, bytes) in writes {
            match bytes {
                Some(bytes) => state.current.insert(name, bytes),
                None => state.current.remove(&name),
            };
        }
        state.damaged_history.clear();
        let changed = manifest.entries.into_iter().map(|(name, _)| name).collect();
        state.history.push_back(Kept { generation, at_ms, changed, files, chunks, bytes: held });
        for kept in state.history.drain(..pruned) {
            for id in kept.files {
                self.remove_file(id);
            }
        }
        Ok(())
    }

    fn encode_changed(&self, state: &State, staged: &mut Vec<Staged>) -> Result<()> {
        for (cell_idx, cell) in self.cells.iter().enumerate() {
            let saved = state.saved.get(cell_idx).copied().flatten();
            let mut writer = ValueWriter::new(self.values.as_ref(), &self.sealer, cell.name());
            let res = cell.encode_if_changed(saved, &mut writer);
            let seq = match res {
                Ok(Some(seq)) => seq,
                Ok(None) => continue,
                Err(source) => {
                    if let Some(id) = writer.file_id() {
                        self.remove_file(id);
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

    fn commit(&self, spilled: &[&Spilled], batch: Batch) -> Result<()> {
        for file in spilled {
            file.sync().map_err(Error::io(self.values_path()))?;
        }
        if let (false, Some(values)) = (spilled.is_empty(), &self.values) {
            values.sync().map_err(Error::io(values.path()))?;
        }
        self.backend.commit(batch)
    }

    /// Deletes the value files of a save that failed before its commit began.
    fn discard(&self, staged: &[Staged]) {
        for Staged { encoded, .. } in staged {
            if let Some(spilled) = encoded.spilled() {
                self.remove_file(spilled.id);
            }
        }
    }

    /// Deletes a value file no record points at any more. A file that cannot be
    /// deleted now is unreferenced, and goes at the next open.
    pub(crate) fn remove_file(&self, id: u64) {
        if let Some(values) = &self.values {
            let _ = values.remove(id);
        }
    }

    /// The cell records as they were at save `generation`, by name.
    fn records_at(&self, state: &State, generation: u64) -> Result<BTreeMap<String, Vec<u8>>> {
        let held = state.history.iter().any(|kept| kept.generation == generation);
        if !held {
            return Err(Error::UnknownGeneration {
                path: self.label.clone(),
                generation,
                oldest: state.history.front().map(|kept| kept.generation),
                newest: state.history.back().map(|kept| kept.generation),
            });
        }
        let mut target = state.current.clone();
        // Undo the later saves, newest first, by putting back their pre-images.
        for kept in state.history.iter().rev().take_while(|kept| kept.generation > generation) {
            let (manifest, _) = self.read_manifest(kept.generation, |key| self.backend.get(key))?;
            for (name, pre) in manifest.entries {
                match pre {
                    Some(pre) => target.insert(name, pre),
                    None => target.remove(&name),
                };
            }
        }
        Ok(target)
    }

    /// Decodes every cell's value in `target` (the stored records if `None`) and
    /// installs them all, or none.
    fn restore(&self, state: &mut State, target: Option<&Named>) -> Result<()> {
        let mut decoded = self.decode_all(target.unwrap_or(&state.current), Missing::Fail)?;
        if let Some(target) = target {
            for it in &mut decoded {
                let name = self.cells.get(it.cell_idx).map(|cell| cell.name());
                it.stale |= target.get(&it.key) != name.and_then(|name| state.current.get(name));
            }
        }
        self.install(state, decoded);
        Ok(())
    }

    pub(crate) fn decode_all(
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
        if record.schema == cell.schema()
            && record.type_name != codec::stored_type_name(cell.type_name())
        {
            return Err(Error::TypeMismatch {
                cell: cell.name().to_owned(),
                stored_type: record.type_name.to_owned(),
                stored_schema: record.schema,
                expected_type: cell.type_name().to_owned(),
                expected_schema: cell.schema(),
            });
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
                source: CodecError(source),
            },
            DecodeFault::Newer | DecodeFault::NoMigration => Error::SchemaVersion {
                cell: cell.name().to_owned(),
                found: record.schema,
                current: cell.schema(),
            },
        })?;
        Ok((install, record.schema != cell.schema()))
    }

    /// Reads and opens value file `id` of the record stored under `key`; `cell` names
    /// the claimant in errors.
    pub(crate) fn read_file(
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
    pub(crate) fn open_value(
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
    pub(crate) fn read_stored(&self, cell: &str, id: u64, len: u64, crc: u32) -> Result<Vec<u8>> {
        let corrupt =
            |path: PathBuf, reason: String| Error::Corrupt { cell: cell.to_owned(), path, reason };
        let Some(values) = &self.values else {
            return Err(corrupt(self.label.clone(), "points at a value file".into()));
        };
        let path = values.file_path(id);
        values.read(id, len, crc).map_err(|fault| match fault {
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
    /// next save then writes under the cell's own name.
    pub(crate) fn install(&self, state: &mut State, decoded: Vec<Decoded<'_>>) {
        let _exclusive = exclusive();
        for Decoded { cell_idx, install, key, stale } in decoded {
            let seq = install();
            let Some(cell) = self.cells.get(cell_idx) else { continue };
            let renamed = key != cell.name();
            if let Some(slot) = state.saved.get_mut(cell_idx) {
                *slot = (!stale && !renamed).then_some(seq);
            }
            if let Some(slot) = state.renamed.get_mut(cell_idx) {
                *slot = renamed.then_some(key);
            }
        }
    }

    /// Lists the stored names that no cell claims, by its name or (for a value
    /// loaded under an alias and not yet saved again) that alias.
    pub(crate) fn refresh_orphans(&self, state: &mut State) {
        let mut used: BTreeSet<&str> = self.cells.iter().map(|cell| cell.name()).collect();
        used.extend(state.renamed.iter().flatten().map(String::as_str));
        let orphans = state.current.keys().filter(|name| !used.contains(name.as_str()));
        state.orphans = orphans.cloned().collect();
    }

    /// The value file a stored record points at and the size of its value.
    fn summary(&self, name: &str, bytes: &[u8]) -> Option<(Option<u64>, u64)> {
        let plain = self.sealer.open(&codec::cell_key(name), bytes).ok()?;
        let record = Record::decode(&plain).ok()?;
        Some((record.file(), record.value_len()))
    }

    /// How many of the oldest kept saves to prune when a save whose earlier values
    /// take `held` bytes joins the history: the history keeps at most `keep` saves,
    /// and beyond the newest, at most `keep_bytes` of earlier values.
    fn to_prune(&self, state: &State, held: u64) -> usize {
        let by_count = (state.history.len() + 1).saturating_sub(self.keep);
        let mut bytes = held + state.history.iter().map(|kept| kept.bytes).sum::<u64>();
        let mut pruned = 0;
        for kept in &state.history {
            if pruned >= by_count && bytes.saturating_sub(held) <= self.keep_bytes {
                break;
            }
            bytes -= kept.bytes;
            pruned += 1;
        }
        pruned
    }

    /// What the history keeps of a manifest split over `chunks` keys. Fails if a
    /// pre-image cannot be read, since its value file would then be unknown.
    fn kept(&self, manifest: codec::Manifest, chunks: u32) -> Result<Kept> {
        let mut files = Vec::new();
        let mut bytes = 0;
        for (name, pre) in &manifest.entries {
            let Some(pre) = pre else { continue };
            let (file, len) = self.summary(name, pre).ok_or_else(|| Error::Corrupt {
                cell: name.clone(),
                path: self.engine_path(),
                reason: format!(
                    "its earlier value in {} cannot be read",
                    codec::history_label(manifest.generation)
                ),
            })?;
            files.extend(file);
            bytes += len;
        }
        let changed = manifest.entries.into_iter().map(|(name, _)| name).collect();
        Ok(Kept {
            generation: manifest.generation,
            at_ms: manifest.at_ms,
            changed,
            files,
            chunks,
            bytes,
        })
    }

    /// Reads the manifest of save `generation` and its chunk count, through `get`
    /// (the records read at open, or the engine).
    pub(crate) fn read_manifest(
        &self,
        generation: u64,
        get: impl Fn(&[u8]) -> Result<Option<Vec<u8>>>,
    ) -> Result<(codec::Manifest, u32)> {
        let corrupt = |reason: String| Error::Corrupt {
            cell: codec::history_label(generation),
            path: self.engine_path(),
            reason,
        };
        let head = get(&codec::history_key(generation))?
            .ok_or_else(|| corrupt("history entry is missing".into()))?;
        let (chunks, first) = codec::manifest_head(&head)
            .ok_or_else(|| corrupt("history entry is truncated".into()))?;
        let mut bytes = first.to_vec();
        for chunk in 1..chunks {
            let part = get(&codec::history_chunk_key(generation, chunk))?
                .ok_or_else(|| corrupt(format!("chunk {chunk} of {chunks} is missing")))?;
            bytes.extend_from_slice(&part);
        }
        let manifest =
            codec::Manifest::decode(&bytes).map_err(|fault| corrupt(fault.to_string()))?;
        if manifest.generation != generation {
            return Err(corrupt(format!(
                "history entry is for generation {}",
                manifest.generation
            )));
        }
        Ok((manifest, chunks))
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
    pub(crate) fn remove_unreferenced_files(&self, state: &State) -> Result<()> {
        let Some(values) = &self.values else { return Ok(()) };
        let Some(keep) = self.referenced_files(state) else { return Ok(()) };
        values.remove_all_but(&keep).map_err(Error::io(values.path()))
    }

    /// The value files the stored records and the kept history point at, or `None`
    /// when an unreadable record or a damaged manifest might point at any file.
    pub(crate) fn referenced_files(&self, state: &State) -> Option<BTreeSet<u64>> {
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

    pub(crate) fn engine_path(&self) -> PathBuf {
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

/// Milliseconds since the Unix epoch, now.
pub(crate) fn now_ms() -> u64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

pub(crate) fn time_of(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// Splits the journaled cells off the others.
fn split_journaled(
    cells: Vec<&'static dyn ErasedCell>,
) -> (Vec<&'static dyn ErasedCell>, Vec<&'static dyn JournaledCell>) {
    let mut journaled = Vec::new();
    let mut others = Vec::with_capacity(cells.len());
    for cell in cells {
        match cell.journaled() {
            Some(cell) => journaled.push(cell),
            None => others.push(cell),
        }
    }
    (others, journaled)
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
    // An alias is a name too: two cells claiming one stored value would overwrite
    // (or, through the rename at the next save, delete) each other's saves.
    let mut aliases: BTreeMap<&str, &'static dyn ErasedCell> = BTreeMap::new();
    for &cell in &unique {
        for &alias in cell.aliases() {
            let first = by_name.get(alias).filter(|it| !std::ptr::addr_eq(**it, cell));
            let first =
                first.or_else(|| aliases.get(alias).filter(|it| !std::ptr::addr_eq(**it, cell)));
            if let Some(first) = first {
                return Err(Error::DuplicateName {
                    name: alias.to_owned(),
                    first: format!("{}: {}", first.origin(), first.type_name()),
                    second: format!("{}: {} (as an alias)", cell.origin(), cell.type_name()),
                });
            }
            aliases.insert(alias, cell);
        }
    }
    Ok(unique)
}

fn check_format(label: &Path, records: &Records) -> Result<()> {
    let expected = u32::from(FORMAT_VERSION);
    match meta(label, records, codec::FORMAT_KEY, codec::read_u32)? {
        Some(found) if found != expected && found != u32::from(FORMAT_V1) => {
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

/// Reverts every cell of the global store opened by [`open`] to save number
/// `generation`: see [`Store::revert_to`].
///
/// # Errors
/// [`Error::NotOpen`] when no global store is open, and every error of [`Store::revert_to`].
///
/// # Example
/// ```
/// assert!(matches!(instastate::revert_to(1), Err(instastate::Error::NotOpen)));
/// ```
pub fn revert_to(generation: u64) -> Result<()> {
    global()?.revert_to(generation)
}

/// The saves the history of the global store opened by [`open`] holds: see
/// [`Store::history`].
///
/// # Errors
/// [`Error::NotOpen`] when no global store is open.
///
/// # Example
/// ```
/// assert!(matches!(instastate::history(), Err(instastate::Error::NotOpen)));
/// ```
pub fn history() -> Result<Vec<Generation>> {
    Ok(global()?.history())
}

pub(crate) fn global() -> Result<Store> {
    let inner = GLOBAL.lock().upgrade().ok_or(Error::NotOpen)?;
    Ok(Store { inner })
}
