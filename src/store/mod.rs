//! The named-cells front door: [`Store`] loads, saves and reloads a set of cells.
//!
//! Split by concept: `builder` (choosing the cells and options), `open` (recovery:
//! reading, checking and installing what is stored), `commit` (a save: one
//! generation, atomically and durably), `history` (kept saves and `revert_to`),
//! `records` (decoding stored records into values), `close` (shutting a store down)
//! and `global` (the store behind [`open`], [`save_all`] and [`reload_all`]).

mod builder;
mod claims;
mod close;
mod commit;
#[cfg(feature = "postgres")]
mod follow;
mod global;
mod history;
mod open;
mod records;
mod view;
mod witness;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque},
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use parking_lot::{Mutex, MutexGuard, RwLockWriteGuard};

#[cfg(feature = "postgres")]
pub use self::follow::StoreFollower;
pub(crate) use self::{
    builder::Member,
    global::global,
    view::{Imported, LastSave},
};
pub use self::{
    builder::StoreBuilder,
    global::{history, open, reload_all, revert_to, save_all},
    history::Generation,
};
use self::{claims::Claims, history::Kept, witness::WitnessFile};
use crate::{
    Error, Result, atomically,
    autosave::Background,
    backend::{Backend, Sled},
    cell::ErasedCell,
    codec::Digest,
    crypt::Sealer,
    io::Io,
    journaled::{JournalOptions, JournalPlace, JournaledCell},
    lockfile::{Access, Hold},
    values::ValueDir,
};

/// How long a save or reload waits for the `atomically` blocks that run to end
/// while it holds the store's lock (new blocks wait behind it, so it is not
/// starved by them); past that it lets the store go while it waits.
const GATE_UNDER_STATE: Duration = Duration::from_millis(50);

const ENGINE_DIR: &str = "sled";
const VALUES_DIR: &str = "values";
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

/// An open store, shared by its handles. Its fields are the store module's own;
/// the rest of the crate goes through its methods (and [`LastSave`]).
pub(crate) struct Inner {
    // The store directory, or `:memory:`; names the store in errors.
    label: PathBuf,
    backend: Box<dyn Backend>,
    values: Option<ValueDir>,
    sealer: Sealer,
    cells: Vec<&'static dyn ErasedCell>,
    // The names of `cells`.
    names: HashSet<&'static str>,
    // The index of each cell of `cells`, by its address.
    by_address: HashMap<usize, usize>,
    // The journaled cells, which are kept in journals of their own, not in `cells`.
    journaled: Vec<&'static dyn JournaledCell>,
    journal: JournalOptions,
    // Where the journaled cells' journals are (a journal's place is of its cell).
    journals: JournalPlace,
    // Whether this store attached the journaled cells' journals (a failed open did not).
    journals_attached: bool,
    // How many saves the history keeps (at least 1).
    keep: usize,
    // How many bytes of earlier values the history keeps beyond the last save.
    keep_bytes: u64,
    // The witness of the last acknowledged save; `None` in memory.
    witness: Option<WitnessFile>,
    // Whether opening created entries in the store directory (the engine's and value
    // files' directories) that a sync of it must make durable.
    created: bool,
    // A read-only store changes nothing in its directory, and refuses what would.
    access: Access,
    // Held for the whole of a save, reload or load, which therefore never overlap.
    state: Mutex<State>,
    background: Background,
    io: Io,
    // This store's hold on its cells, let go when it closes.
    _held: builder::Held,
    // The directory's lock, which the OS releases when the store is dropped.
    _lock: Option<Hold>,
}

/// What a store knows of what it holds; behind [`Inner::state`].
#[derive(Default)]
struct State {
    // Per cell, by index into `Inner::cells`: the change counter its stored value
    // was taken at, or `None` when the next save must write it.
    saved: Vec<Option<u64>>,
    // Per cell: the other name (an alias) its stored value was loaded from, whose
    // record the next save of the cell deletes.
    renamed: Vec<Option<String>>,
    // The cells the next save must look at, by index: those never saved or whose
    // stored value is stale, and those taken from the changed cells by a save that
    // failed. Cells written since are in the changed cells of `cell.rs`.
    pending: BTreeSet<usize>,
    // Every stored cell record, by name, exactly as stored.
    current: BTreeMap<String, Vec<u8>>,
    // The saves the history holds, oldest first.
    history: VecDeque<Kept>,
    // The count and hash of the cell records, which the witness records.
    digest: Digest,
    // The stored names some program's cells claim.
    claims: Claims,
    // The checksums of the types' structures the store holds.
    shapes: BTreeSet<u32>,
    // Manifests found damaged at open, and the older ones after them: not in the
    // history, and deleted by the next save. The files they point at are unknown.
    damaged_history: Vec<u64>,
    generation: u64,
    // The time the next generation is stamped with, set just before it is made.
    now_ms: u64,
    poisoned: bool,
    orphans: Vec<String>,
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
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.label)
            .field("cells", &self.inner.cells.len())
            .finish_non_exhaustive()
    }
}

impl Inner {
    /// Whether the store holds the cell at `address` (a plain cell, not a journaled one).
    pub(crate) fn holds(&self, address: usize) -> bool {
        self.by_address.contains_key(&address)
    }

    /// The store directory, or `:memory:`: what errors name.
    pub(crate) fn label(&self) -> &Path {
        &self.label
    }

    /// The names of the journaled cells the store holds: those it opened with, and
    /// those whose journals its directory keeps.
    pub(crate) fn journaled_names(&self) -> BTreeSet<String> {
        let mut names: BTreeSet<String> =
            self.journaled.iter().map(|cell| cell.name().to_owned()).collect();
        if let Ok(entries) = std::fs::read_dir(self.label.join(crate::journaled::JOURNALS_DIR)) {
            let found = entries.filter_map(|entry| entry.ok()?.file_name().into_string().ok());
            names.extend(found.filter_map(|escaped| crate::journaled::cell_name_of(&escaped)));
        }
        names
    }

    /// The file system the store works through.
    pub(crate) fn io(&self) -> &Io {
        &self.io
    }

    /// The store's background-saving state, which `autosave` runs.
    pub(crate) fn background(&self) -> &Background {
        &self.background
    }

    /// Whether a failed save poisoned the store.
    pub(crate) fn is_poisoned(&self) -> bool {
        self.state.lock().poisoned
    }

    /// Returns the pending background error, if any, and forgets it.
    pub(crate) fn take_background_error(&self) -> Result<()> {
        self.background.take_pending()
    }

    /// Refuses `operation` in a read-only store.
    pub(crate) fn check_writable(&self, operation: &'static str) -> Result<()> {
        match self.access {
            Access::ReadWrite => Ok(()),
            Access::ReadOnly => Err(Error::ReadOnly { path: self.label.clone(), operation }),
        }
    }

    /// Whether the store was opened read-only.
    pub(crate) fn is_read_only(&self) -> bool {
        self.access == Access::ReadOnly
    }

    /// The store's state and the gate that excludes `atomically` blocks, taken so
    /// that neither is held for long while the other is waited for: a thread
    /// holding a guard that a block waits for may need the store meanwhile (to
    /// read its history, say) before it lets the guard go. [`Error::GuardHeld`]
    /// when this thread holds such a guard itself (`operation` names what is
    /// refused).
    fn lock_with_gate(
        &self,
        operation: &'static str,
    ) -> Result<(MutexGuard<'_, State>, RwLockWriteGuard<'static, ()>)> {
        let mut state = self.state.lock();
        loop {
            if let Some(gate) = atomically::try_exclusive_for(GATE_UNDER_STATE) {
                return Ok((state, gate));
            }
            drop(state);
            let gate = atomically::exclusive_for(operation)?;
            if let Some(state) = self.state.try_lock() {
                return Ok((state, gate));
            }
            drop(gate);
            state = self.state.lock();
        }
    }

    fn check_poisoned(&self, state: &State) -> Result<()> {
        // The engine of a poisoned store may hold records it never made durable.
        if state.poisoned {
            return Err(Error::Poisoned { path: self.label.clone() });
        }
        Ok(())
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

/// Milliseconds since the Unix epoch, now.
pub(crate) fn now_ms() -> u64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

/// The time `ms` milliseconds after the Unix epoch.
pub(crate) fn time_of(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}
