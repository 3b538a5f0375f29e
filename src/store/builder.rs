//! [`StoreBuilder`]: which cells a store holds, its options, and where it lives.

use std::{
    collections::{BTreeMap, BTreeSet, btree_map::Entry},
    fmt,
    path::{Path, PathBuf},
};

use parking_lot::Mutex;

use super::{
    DEFAULT_HISTORY, DEFAULT_HISTORY_BYTES, ENGINE_DIR, Inner, MEMORY_LABEL, VALUES_DIR,
    witness::Older,
};
use crate::{
    Error, Result, StateCell, Store,
    autosave::Background,
    backend::{Backend, Memory, Sled},
    cell::{ErasedCell, Value},
    codec,
    crypt::Sealer,
    io::Io,
    journal::{Durability, Recovery},
    journaled::{self, JournalOptions, JournalPlace, JournaledCell},
    lockfile::{Access, DirLock, Hold, Kind, Look},
    registry,
    values::ValueDir,
};

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
#[derive(Clone)]
pub struct StoreBuilder {
    cells: Vec<Member>,
    keep: usize,
    keep_bytes: u64,
    journal: JournalOptions,
    older: Older,
    io: Io,
    #[cfg(feature = "encryption")]
    key: Option<crate::EncryptionKey>,
    /// In a database: the lease's settings, and how long opening waits for it.
    #[cfg(feature = "postgres")]
    lease: (crate::postgres::LeaseSettings, std::time::Duration),
}

/// How long opening a store in a database waits for its lease, by default.
#[cfg(feature = "postgres")]
const LEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Where a store's records and files live.
struct Place {
    label: PathBuf,
    backend: Box<dyn Backend>,
    values: Option<ValueDir>,
    lock: Option<Hold>,
    // Whether opening created directories that a sync of the store's must make durable.
    created: bool,
    access: Access,
    journals: JournalPlace,
}

/// The cells open in some store, by address: a cell is in one open store at a time,
/// or two stores would save, reload and revert it behind each other's backs.
static OPEN_CELLS: parking_lot::Mutex<BTreeSet<usize>> = parking_lot::Mutex::new(BTreeSet::new());

/// A store's hold on its cells, let go when the store closes.
pub(super) struct Held(Vec<usize>);

impl Held {
    /// Holds `cells`, unless one of them is open in another store.
    ///
    /// # Errors
    /// [`Error::CellInUse`] naming the first cell held elsewhere.
    fn take(cells: &[Member]) -> Result<Held> {
        let mut open = OPEN_CELLS.lock();
        if let Some(member) = cells.iter().find(|member| open.contains(&member.cell.address())) {
            return Err(Error::CellInUse { cell: member.cell.name().to_owned() });
        }
        let held: Vec<usize> = cells.iter().map(|member| member.cell.address()).collect();
        open.extend(held.iter().copied());
        Ok(Held(held))
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut open = OPEN_CELLS.lock();
        for address in &self.0 {
            open.remove(address);
        }
    }
}

/// A cell as a store takes it: erased, and seen as a journaled cell if it is one.
/// Made where the cell's type is known ([`StoreBuilder::cell`] and the registry).
#[derive(Clone, Copy)]
pub(crate) struct Member {
    cell: &'static dyn ErasedCell,
    journaled: Option<&'static dyn JournaledCell>,
}

impl Member {
    pub(crate) fn of<T: Value>(cell: &'static StateCell<T>) -> Member {
        Member { cell, journaled: journaled::as_journaled(cell) }
    }
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
            older: Older::Refuse,
            io: Io::default(),
            #[cfg(feature = "encryption")]
            key: None,
            #[cfg(feature = "postgres")]
            lease: (crate::postgres::LeaseSettings::default(), LEASE_WAIT),
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
        self.cells.push(Member::of(cell));
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
    /// This is what [`open`](crate::open) uses; it is here for a store of all cells
    /// that is not the global one, such as an in-memory store in a test.
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

    /// Opens a store that holds an older save than its witness says was
    /// acknowledged, and goes on from there: the saves after it are lost.
    ///
    /// Without it, opening such a store fails with [`Error::Corrupt`] naming the lost
    /// saves, and changes nothing: a flipped bit in the engine's log, or a zeroed page,
    /// can make the engine open at the save before without an error of its own, and
    /// instastate refuses to let a store be silently older than what it acknowledged.
    /// Take a copy of the directory first (the lost saves are gone from it once the
    /// next save is made).
    ///
    /// # Example
    /// ```
    /// # use instastate::Store;
    /// # fn main() -> instastate::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// // Only after `Error::Corrupt` said that saves were lost:
    /// let store = Store::builder().accept_older_save().open(dir.path())?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn accept_older_save(mut self) -> StoreBuilder {
        self.older = Older::Accept;
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
    /// With the feature `postgres`, `path` may be a `postgres://` location instead
    /// (`postgres://app@db/prod?namespace=orders`, see `postgres::Location`): the records are rows of that
    /// namespace, and each save is one transaction, durable when it commits. The
    /// store has one writer: opening takes the namespace's lease, waiting for it
    /// (`wait_for_lease`), and every save checks it in its
    /// own transaction, so that a writer whose lease was taken over is refused
    /// (`Error::Fenced`) and changes nothing. A journaled cell's journal is kept
    /// in the namespace `<namespace>/<cell name>`, under a lease of its own.
    ///
    /// # Errors
    /// - [`Error::Locked`] when another store, in this or another process, has `path` open
    ///   ([`Error::LeaseHeld`] in a database, once the wait for the lease ran out);
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
        self.open_as(path.as_ref(), Access::ReadWrite)
    }

    /// Opens the existing store in directory `path` to read it, and loads every cell
    /// that has a saved value there, as [`open`](Self::open) does, while writing,
    /// creating and deleting nothing in the directory: what a tool, a report or a
    /// second look at a store wants. Several read-only opens may share a directory;
    /// none can while a program has it open with `open`, and the other way round.
    ///
    /// The store refuses every change with [`Error::ReadOnly`]: saves, imports,
    /// pruning, compaction, autosave and [`StateCell::handle`] on its journaled
    /// cells. It can still be read, verified, listed, exported and backed up, and
    /// [`reload_all`](Store::reload_all) and [`revert_to`](Store::revert_to) change
    /// its cells (not the store) as usual. Damage that opening would repair or
    /// refuse (a torn journal write is left in place, and journals are read as
    /// [`Recovery::Strict`] reads them) is seen exactly as `open` sees it.
    ///
    /// The engine cannot read its files in place without writing to them, so they
    /// are read from a copy in the system's temporary directory, deleted before this
    /// returns.
    ///
    /// # Errors
    /// [`Error::WrongDirectory`] when `path` holds no store; [`Error::Locked`] when a
    /// program has it open to change it; otherwise those of [`open`](Self::open).
    ///
    /// # Example
    /// ```
    /// # use instastate::{Error, StateCell, Store};
    /// static NOTE: StateCell<String> = StateCell::new("docs::read_only::NOTE", String::new);
    /// # fn main() -> instastate::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// {
    ///     let store = Store::builder().cell(&NOTE).open(dir.path())?;
    ///     NOTE.set("kept".into());
    ///     store.save_all()?;
    /// }
    /// NOTE.set(String::new());
    /// let store = Store::builder().cell(&NOTE).open_read_only(dir.path())?;
    /// assert_eq!(NOTE.get(), "kept");
    /// assert!(matches!(store.save_all(), Err(Error::ReadOnly { .. })));
    /// # Ok(())
    /// # }
    /// ```
    pub fn open_read_only(self, path: impl AsRef<Path>) -> Result<Store> {
        self.open_as(path.as_ref(), Access::ReadOnly)
    }

    fn open_as(mut self, path: &Path, access: Access) -> Result<Store> {
        #[cfg(feature = "postgres")]
        if let Some(location) = crate::location::database(path)? {
            return self.open_database(&location, access);
        }
        crate::location::refuse_database(path, "a store of cells")?;
        let cells = check_names(std::mem::take(&mut self.cells))?;
        let held = Held::take(&cells)?;
        let io = self.io.clone();
        let (engine_path, values_path) = (path.join(ENGINE_DIR), path.join(VALUES_DIR));
        let place = match access {
            Access::ReadWrite => {
                let mut lock = Hold::Exclusive(DirLock::acquire(&io, path, Kind::Store)?);
                lock.note_kind();
                // Made durable by one sync of the store directory, once the open is done.
                let created = !engine_path.is_dir() || !values_path.is_dir();
                let backend = Sled::open(&io, &engine_path)?;
                let values = ValueDir::open(&io, values_path.clone(), access);
                Place {
                    label: path.to_path_buf(),
                    backend: Box::new(backend),
                    values: Some(values.map_err(Error::io(values_path))?),
                    lock: Some(lock),
                    created,
                    access,
                    journals: JournalPlace::Dir(path.to_path_buf()),
                }
            }
            Access::ReadOnly => {
                let look = Look::take(&io, path, Kind::Store)?;
                let records = Sled::read_copy(&io, &engine_path)?;
                let values = ValueDir::open(&io, values_path.clone(), access);
                Place {
                    label: path.to_path_buf(),
                    backend: Box::new(Memory::holding(records)),
                    values: Some(values.map_err(Error::io(values_path))?),
                    lock: Some(Hold::Shared(look)),
                    created: false,
                    access,
                    journals: JournalPlace::Dir(path.to_path_buf()),
                }
            }
        };
        self.load(cells, held, place)
    }

    /// Opens the store at a `postgres://` location: its records are rows of the
    /// location's namespace, written by this store alone while it holds the
    /// namespace's lease (or read, without the lease, by a read-only open).
    #[cfg(feature = "postgres")]
    fn open_database(
        mut self,
        location: &crate::postgres::Location,
        access: Access,
    ) -> Result<Store> {
        use crate::postgres::{PgRecords, PgRecordsReader};
        let cells = check_names(std::mem::take(&mut self.cells))?;
        let label = PathBuf::from(location.to_string());
        let held = Held::take(&cells)?;
        let (settings, wait) = self.lease;
        let backend: Box<dyn Backend> = match access {
            Access::ReadWrite => Box::new(PgRecords::open(location, settings, wait)?),
            Access::ReadOnly => Box::new(PgRecordsReader::open(location)?),
        };
        let journals = JournalPlace::Database(Box::new((location.clone(), settings, wait)));
        let place =
            Place { label, backend, values: None, lock: None, created: false, access, journals };
        self.load(cells, held, place)
    }

    /// In a database: how long the writer's lease lasts without renewal (it is
    /// renewed every third of it), 5 s by default. A standby takes over within
    /// about this long once the writer is gone; a writer paused for longer is
    /// fenced: its saves fail with [`Error::Fenced`], and the store is poisoned.
    #[cfg(feature = "postgres")]
    pub fn lease_time(mut self, ttl: std::time::Duration) -> StoreBuilder {
        self.lease.0.ttl = ttl.max(std::time::Duration::from_millis(100));
        self
    }

    /// In a database: how long opening waits for the lease while another writer
    /// holds it ([`Error::LeaseHeld`] after that), 30 s by default, asking every
    /// `poll` (250 ms by default).
    #[cfg(feature = "postgres")]
    pub fn wait_for_lease(
        mut self,
        wait: std::time::Duration,
        poll: std::time::Duration,
    ) -> StoreBuilder {
        self.lease.1 = wait;
        self.lease.0.poll = poll.max(std::time::Duration::from_millis(1));
        self
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
    pub fn in_memory(mut self) -> Result<Store> {
        let cells = check_names(std::mem::take(&mut self.cells))?;
        let held = Held::take(&cells)?;
        let place = Place {
            label: PathBuf::from(MEMORY_LABEL),
            backend: Box::new(Memory::default()),
            values: None,
            lock: None,
            created: false,
            access: Access::ReadWrite,
            journals: JournalPlace::Memory,
        };
        self.load(cells, held, place)
    }

    /// Opens the store of `cells` (which `held` holds) in `place`, and loads the
    /// cells' values.
    fn load(self, cells: Vec<Member>, held: Held, place: Place) -> Result<Store> {
        let sealer = self.sealer();
        let (cells, journaled) = split_journaled(cells);
        let Place { label, backend, values, lock, created, access, journals } = place;
        let inner = Inner {
            label,
            backend,
            values,
            sealer,
            names: cells.iter().map(|cell| cell.name()).collect(),
            by_address: cells.iter().enumerate().map(|(idx, cell)| (cell.address(), idx)).collect(),
            cells,
            journaled,
            journal: self.journal,
            journals,
            journals_attached: false,
            keep: self.keep,
            keep_bytes: self.keep_bytes,
            witness: None,
            created,
            access,
            state: Mutex::default(),
            background: Background::default(),
            io: self.io,
            _held: held,
            _lock: lock,
        };
        Store::load(self.older, inner)
    }

    /// Runs the store's file operations through `io` (a simulator, in tests).
    #[cfg(test)]
    pub(crate) fn io(mut self, io: Io) -> StoreBuilder {
        self.io = io;
        self
    }

    #[cfg_attr(not(feature = "encryption"), allow(clippy::unused_self))]
    fn sealer(&self) -> Sealer {
        #[cfg(feature = "encryption")]
        return Sealer::new(self.key.as_ref());
        #[cfg(not(feature = "encryption"))]
        Sealer::default()
    }
}

impl fmt::Debug for StoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.cells.iter().map(|member| member.cell.name()).collect();
        f.debug_struct("StoreBuilder")
            .field("cells", &names)
            .field("keep_history", &self.keep)
            .field("history_bytes", &self.keep_bytes)
            .finish_non_exhaustive()
    }
}

/// Splits the journaled cells off the others.
fn split_journaled(
    members: Vec<Member>,
) -> (Vec<&'static dyn ErasedCell>, Vec<&'static dyn JournaledCell>) {
    let mut journaled = Vec::new();
    let mut others = Vec::with_capacity(members.len());
    for member in members {
        match member.journaled {
            Some(cell) => journaled.push(cell),
            None => others.push(member.cell),
        }
    }
    (others, journaled)
}

/// Drops cells listed twice, and refuses two cells that claim one name (their own,
/// or an alias).
fn check_names(members: Vec<Member>) -> Result<Vec<Member>> {
    let mut by_name: BTreeMap<&str, &'static dyn ErasedCell> = BTreeMap::new();
    let mut unique = Vec::with_capacity(members.len());
    for member in members {
        let cell = member.cell;
        let invalid =
            |fault: codec::BadName| Error::InvalidName { name: fault.name, reason: fault.reason };
        for name in std::iter::once(cell.name()).chain(cell.aliases().iter().copied()) {
            codec::check_name(name).map_err(invalid)?;
        }
        if member.journaled.is_some() {
            journaled::check_dir_name(cell.name()).map_err(invalid)?;
        }
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
                unique.push(member);
            }
        }
    }
    // An alias is a name too: two cells claiming one stored value would overwrite
    // (or, through the rename at the next save, delete) each other's saves.
    let mut aliases: BTreeMap<&str, &'static dyn ErasedCell> = BTreeMap::new();
    for cell in unique.iter().map(|member| member.cell) {
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
