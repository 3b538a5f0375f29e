//! [`StateCell`]: a named, lock-protected value that a [`Store`](crate::Store) can save.

use std::{
    any::TypeId,
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    ops::{Deref, DerefMut},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use once_cell::sync::OnceCell;
use parking_lot::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use serde::{Serialize, de::DeserializeOwned};

use crate::{
    codec::decode_exact,
    held::{self, Holding},
    schema::{CellOptions, DecodeFault},
    shape::Shape,
    values::ValueWriter,
};

/// The bounds every cell's type must meet: it is encoded and decoded by serde, and
/// shared between threads through a `static`.
///
/// Implemented for every type that meets them; there is nothing to implement by hand.
///
/// # Example
/// ```
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct Settings {
///     theme: String,
/// }
/// fn assert_value<T: instastate::Value>() {}
/// assert_value::<Settings>();
/// ```
///
/// Types that are not `Sync`, or not serializable, are not:
/// ```compile_fail
/// fn assert_value<T: instastate::Value>() {}
/// assert_value::<std::rc::Rc<u32>>();
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be the type of a state cell",
    label = "a cell's type must be `Serialize + DeserializeOwned + Send + Sync + 'static`",
    note = "derive `serde::Serialize` and `serde::Deserialize` for it, and avoid `Rc`, `Cell` and borrowed fields"
)]
pub trait Value: Serialize + DeserializeOwned + Send + Sync + 'static {}

// `do_not_recommend` makes rustc report a type that is not a `Value` with the
// message above, once, instead of one error per missing bound.
#[diagnostic::do_not_recommend]
impl<T: Serialize + DeserializeOwned + Send + Sync + 'static> Value for T {}

/// A named global value that a [`Store`](crate::Store) loads, saves and reloads.
///
/// Usually declared with [`defstate!`](crate::defstate), which also registers it for
/// [`open`](crate::open).
/// The value is created from its initializer on first use, unless a store loads a
/// saved value first, in which case the initializer never runs.
///
/// Access mirrors [`RwLock`](std::sync::RwLock): [`read`](Self::read) and
/// [`write`](Self::write) return guards, and [`get`](Self::get), [`set`](Self::set),
/// [`replace`](Self::replace), [`update`](Self::update) and [`with`](Self::with)
/// take the lock for one call.
/// Every write access marks the cell as changed, so the next save writes it.
///
/// # Example
/// ```
/// use instastate::StateCell;
///
/// static HITS: StateCell<u64> = StateCell::new("docs::HITS", || 0);
///
/// HITS.update(|hits| *hits += 1);
/// assert_eq!(HITS.get(), 1);
/// assert_eq!(HITS.name(), "docs::HITS");
/// ```
pub struct StateCell<T: 'static> {
    name: &'static str,
    origin: &'static str,
    pub(crate) init: fn() -> T,
    pub(crate) options: CellOptions<T>,
    value: OnceCell<RwLock<T>>,
    // Bumped under the write lock on every write access; a store compares it with
    // the value it last saved to know whether the cell changed since.
    seq: AtomicU64,
    // Whether the cell's address is in `CHANGED`: set by the first write after a
    // store took it from there.
    queued: AtomicBool,
}

/// The cells written since a store last took them, by address: a save looks at
/// these, not at every cell, so that its cost follows what changed.
static CHANGED: Mutex<BTreeSet<usize>> = Mutex::new(BTreeSet::new());

/// Takes, from the cells written since they were last taken, those of `mine` (cell
/// addresses to indexes into `cells`), and returns their indexes.
pub(crate) fn take_changed(
    mine: &HashMap<usize, usize>,
    cells: &[&'static dyn ErasedCell],
) -> Vec<usize> {
    let mut changed = CHANGED.lock();
    let taken: Vec<usize> =
        changed.iter().filter_map(|address| mine.get(address).copied()).collect();
    for &cell_idx in &taken {
        if let Some(cell) = cells.get(cell_idx) {
            changed.remove(&cell.address());
            // Under the lock: a write that finds the flag still set has bumped the
            // counter already, and the save that took the cell sees its value.
            cell.unqueue();
        }
    }
    taken
}

/// The structure of each type of cell traced so far; `None` for a type that cannot
/// be traced. Once per type, not per cell: tracing takes a millisecond or so.
static SHAPES: Mutex<BTreeMap<TypeId, Option<Arc<Shape>>>> = Mutex::new(BTreeMap::new());

/// The structure of `T`, traced once per process.
fn shape_of<T: Value>() -> Option<Arc<Shape>> {
    let id = TypeId::of::<T>();
    if let Some(known) = SHAPES.lock().get(&id) {
        return known.clone();
    }
    // Traced without the lock: tracing runs the type's own `Deserialize`.
    let traced = Shape::of::<T>().map(Arc::new);
    SHAPES.lock().entry(id).or_insert(traced).clone()
}

/// Whether any cell of `mine` was written since a store last took it.
pub(crate) fn any_changed(mine: &HashMap<usize, usize>) -> bool {
    CHANGED.lock().iter().any(|address| mine.contains_key(address))
}

impl<T> StateCell<T> {
    /// Creates a cell stored under `name`, whose value starts as `init()`.
    ///
    /// The cell is not registered for [`open`](crate::open); list it in a
    /// [`StoreBuilder`](crate::StoreBuilder) instead, or declare it with
    /// [`defstate!`](crate::defstate).
    ///
    /// # Example
    /// ```
    /// # use instastate::StateCell;
    /// static NAMES: StateCell<Vec<String>> = StateCell::new("app::NAMES", Vec::new);
    /// assert!(NAMES.read().is_empty());
    /// ```
    #[must_use]
    pub const fn new(name: &'static str, init: fn() -> T) -> StateCell<T> {
        StateCell::with_origin(name, name, init, CellOptions::new())
    }

    /// A cell like [`new`](Self::new)'s, with a schema version, migrations from
    /// older versions or aliases: see [`CellOptions`].
    ///
    /// # Example
    /// ```
    /// use instastate::{CellOptions, StateCell};
    ///
    /// static LIMIT: StateCell<u32> = StateCell::with_options(
    ///     "docs::LIMIT",
    ///     || 10,
    ///     CellOptions::new().aliases(&["docs::old::LIMIT"]),
    /// );
    /// assert_eq!(LIMIT.get(), 10);
    /// ```
    #[must_use]
    pub const fn with_options(
        name: &'static str,
        init: fn() -> T,
        options: CellOptions<T>,
    ) -> StateCell<T> {
        StateCell::with_origin(name, name, init, options)
    }

    pub(crate) const fn with_origin(
        name: &'static str,
        origin: &'static str,
        init: fn() -> T,
        options: CellOptions<T>,
    ) -> StateCell<T> {
        StateCell {
            name,
            origin,
            init,
            options,
            value: OnceCell::new(),
            seq: AtomicU64::new(0),
            queued: AtomicBool::new(false),
        }
    }

    /// The name the cell's value is stored under.
    ///
    /// # Example
    /// ```
    /// # use instastate::StateCell;
    /// static LEVEL: StateCell<u8> = StateCell::new("game::LEVEL", || 1);
    /// assert_eq!(LEVEL.name(), "game::LEVEL");
    /// ```
    #[must_use]
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Locks the cell for reading, blocking while a writer holds it.
    ///
    /// # Example
    /// ```
    /// # use instastate::StateCell;
    /// static TAGS: StateCell<Vec<&'static str>> = StateCell::new("docs::TAGS", || vec!["a"]);
    /// assert_eq!(TAGS.read().len(), 1);
    /// ```
    pub fn read(&self) -> Ref<'_, T> {
        let lock = self.lock();
        let guard = match lock.try_read() {
            Some(guard) => guard,
            None => self.wait(|| lock.read()),
        };
        Ref(guard, self.holding())
    }

    /// Locks the cell for reading even while a writer waits, for a store's own reads:
    /// a thread that saves while holding a read guard must not queue behind a writer
    /// that waits for that guard.
    pub(crate) fn read_recursive(&self) -> Ref<'_, T> {
        Ref(self.lock().read_recursive(), self.holding())
    }

    /// Locks the cell for writing and marks it changed, blocking while anyone else holds it.
    ///
    /// # Example
    /// ```
    /// # use instastate::StateCell;
    /// static TAGS: StateCell<Vec<&'static str>> = StateCell::new("docs::TAGS", Vec::new);
    /// TAGS.write().push("new");
    /// assert_eq!(*TAGS.read(), ["new"]);
    /// ```
    pub fn write(&self) -> RefMut<'_, T> {
        let lock = self.lock();
        let guard = match lock.try_write() {
            Some(guard) => guard,
            None => self.wait(|| lock.write()),
        };
        // Relaxed is enough: the write lock orders this with the save's read of `seq`,
        // which happens under the read lock.
        self.seq.fetch_add(1, Ordering::Relaxed);
        if !self.queued.swap(true, Ordering::Relaxed) {
            CHANGED.lock().insert(std::ptr::from_ref(self).addr());
        }
        RefMut(guard, self.holding())
    }

    /// Returns a clone of the value.
    ///
    /// # Example
    /// ```
    /// # use instastate::StateCell;
    /// static NAME: StateCell<String> = StateCell::new("docs::NAME", || "abc".into());
    /// assert_eq!(NAME.get(), "abc");
    /// ```
    #[must_use]
    pub fn get(&self) -> T
    where
        T: Clone,
    {
        self.read().clone()
    }

    /// Replaces the value.
    ///
    /// # Example
    /// ```
    /// # use instastate::StateCell;
    /// static LIMIT: StateCell<u32> = StateCell::new("docs::LIMIT", || 10);
    /// LIMIT.set(20);
    /// assert_eq!(LIMIT.get(), 20);
    /// ```
    pub fn set(&self, value: T) {
        drop(self.replace(value));
    }

    /// Replaces the value and returns the old one.
    ///
    /// # Example
    /// ```
    /// # use instastate::StateCell;
    /// static LIMIT: StateCell<u32> = StateCell::new("docs::LIMIT", || 10);
    /// assert_eq!(LIMIT.replace(20), 10);
    /// ```
    pub fn replace(&self, value: T) -> T {
        std::mem::replace(&mut *self.write(), value)
    }

    /// Changes the value in place under the write lock, returning what `f` returns.
    ///
    /// # Example
    /// ```
    /// # use instastate::StateCell;
    /// static COUNT: StateCell<u64> = StateCell::new("docs::COUNT", || 1);
    /// let now = COUNT.update(|count| {
    ///     *count += 1;
    ///     *count
    /// });
    /// assert_eq!(now, 2);
    /// ```
    pub fn update<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        f(&mut self.write())
    }

    /// Calls `f` with the value under the read lock.
    ///
    /// # Example
    /// ```
    /// # use instastate::StateCell;
    /// static WORDS: StateCell<Vec<String>> = StateCell::new("docs::WORDS", Vec::new);
    /// assert_eq!(WORDS.with(Vec::len), 0);
    /// ```
    pub fn with<R>(&self, f: impl FnOnce(&T) -> R) -> R {
        f(&self.read())
    }

    fn lock(&self) -> &RwLock<T> {
        self.value.get_or_init(|| RwLock::new((self.init)()))
    }

    /// Runs `lock`, which waits for the cell: inside `atomically`, counted as
    /// waited for meanwhile, so that a save or reload on a thread holding this
    /// cell's guard refuses to wait for this block rather than wait forever.
    fn wait<G>(&self, lock: impl FnOnce() -> G) -> G {
        if crate::atomically::inside() {
            held::waiting(std::ptr::from_ref(self).addr(), self.name, lock)
        } else {
            lock()
        }
    }

    /// Counts a new guard of the cell as held by this thread.
    fn holding(&self) -> Holding {
        Holding::new(std::ptr::from_ref(self).addr(), self.name)
    }
}

impl<T: fmt::Debug> fmt::Debug for StateCell<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut it = f.debug_struct("StateCell");
        it.field("name", &self.name);
        match self.value.get().map(RwLock::try_read) {
            Some(Some(value)) => it.field("value", &&*value),
            Some(None) => it.field("value", &format_args!("<locked>")),
            None => it.field("value", &format_args!("<not yet initialized>")),
        };
        it.finish_non_exhaustive()
    }
}

/// A read guard of a [`StateCell`], returned by [`StateCell::read`].
///
/// # Example
/// ```
/// # use instastate::StateCell;
/// static LIST: StateCell<Vec<u8>> = StateCell::new("docs::ref::LIST", || vec![1, 2]);
/// let list = LIST.read();
/// assert_eq!(list.len(), 2);
/// ```
#[must_use = "the cell stays locked until the guard is dropped"]
pub struct Ref<'a, T>(
    RwLockReadGuard<'a, T>,
    // Kept for its drop: the guard is held until then.
    #[allow(dead_code)] Holding,
);

impl<T> Deref for Ref<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: fmt::Debug> fmt::Debug for Ref<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

/// A write guard of a [`StateCell`], returned by [`StateCell::write`].
///
/// # Example
/// ```
/// # use instastate::StateCell;
/// static LIST: StateCell<Vec<u8>> = StateCell::new("docs::refmut::LIST", Vec::new);
/// let mut list = LIST.write();
/// list.push(3);
/// assert_eq!(*list, [3]);
/// ```
#[must_use = "the cell stays locked until the guard is dropped"]
pub struct RefMut<'a, T>(
    RwLockWriteGuard<'a, T>,
    // Kept for its drop: the guard is held until then.
    #[allow(dead_code)] Holding,
);

impl<T> Deref for RefMut<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> DerefMut for RefMut<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

impl<T: fmt::Debug> fmt::Debug for RefMut<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

/// A decoded value waiting to be put into its cell.
pub(crate) type Install<'a> = Box<dyn Installing + 'a>;

/// A decoded value waiting to be put into its cell, which it locks first.
pub(crate) trait Installing: Send {
    /// Takes the cell's write lock, and returns what puts the value in under it and
    /// returns the cell's new change counter: at once, or `None` when someone holds
    /// the lock and `wait` is false (the value then stays here).
    fn lock(&mut self, wait: bool) -> Option<Box<dyn FnOnce() -> u64 + '_>>;
    /// Waits until no one holds the cell's lock, and lets it go at once.
    fn wait(&self);
}

/// The value decoded for `cell`, until it is put in.
struct Waiting<'a, T: 'static> {
    cell: &'a StateCell<T>,
    value: Option<T>,
}

impl<T: Value> Installing for Waiting<'_, T> {
    fn lock(&mut self, wait: bool) -> Option<Box<dyn FnOnce() -> u64 + '_>> {
        let cell = self.cell;
        let value = self.value.take()?;
        // Never read: the value goes in now, as its first, with no lock to wait
        // for. Put in later, it could meet a thread that read the cell meanwhile
        // and holds its guard, and wait for it with the other cells' locks held.
        let value = match cell.publish_first(value) {
            Ok(seq) => return Some(Box::new(move || seq)),
            Err(value) => value,
        };
        let lock = cell.lock();
        let guard = if wait {
            lock.write()
        } else if let Some(guard) = lock.try_write() {
            guard
        } else {
            self.value = Some(value);
            return None;
        };
        Some(Box::new(move || cell.install_under(guard, value)))
    }

    fn wait(&self) {
        drop(self.cell.lock().write());
    }
}

/// What a store needs of a cell, without knowing its type.
pub(crate) trait ErasedCell: Send + Sync {
    fn name(&self) -> &'static str;
    /// Where the cell was declared, for error messages.
    fn origin(&self) -> &'static str;
    fn type_name(&self) -> &'static str;
    fn schema(&self) -> u32;
    fn aliases(&self) -> &'static [&'static str];
    /// The cell's change counter: it differs from the one a save returned exactly
    /// when the cell was written since.
    fn seq(&self) -> u64;
    /// The cell's address, its key in the set of changed cells.
    fn address(&self) -> usize;
    /// Lets the next write put the cell in the set of changed cells again.
    fn unqueue(&self);
    /// Encodes the value into `out` unless it is unchanged since change counter
    /// `saved` (`None` always encodes); returns the counter of what it encoded.
    fn encode_if_changed(
        &self,
        saved: Option<u64>,
        out: &mut ValueWriter<'_>,
    ) -> Result<Option<u64>, postcard::Error>;
    /// The structure of the cell's type, if it can be traced.
    fn shape(&self) -> Option<Arc<Shape>>;
    /// The old type of the migration that reads a value of schema version
    /// `schema`, and its structure if it can be traced; `None` without one.
    fn migration_of(&self, schema: u32) -> Option<(&'static str, Option<Shape>)>;
    /// Decodes a value saved with schema version `schema`, migrating it if older.
    fn decode(&self, bytes: &[u8], schema: u32) -> Result<Install<'_>, DecodeFault>;
}

impl<T: Value> ErasedCell for StateCell<T> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn origin(&self) -> &'static str {
        self.origin
    }

    fn type_name(&self) -> &'static str {
        std::any::type_name::<T>()
    }

    fn schema(&self) -> u32 {
        self.options.version
    }

    fn aliases(&self) -> &'static [&'static str] {
        self.options.aliases
    }

    fn seq(&self) -> u64 {
        self.seq.load(Ordering::Relaxed)
    }

    fn address(&self) -> usize {
        std::ptr::from_ref(self).addr()
    }

    fn unqueue(&self) {
        self.queued.store(false, Ordering::Relaxed);
    }

    fn shape(&self) -> Option<Arc<Shape>> {
        shape_of::<T>()
    }

    fn migration_of(&self, schema: u32) -> Option<(&'static str, Option<Shape>)> {
        let migration = self.options.migrations.iter().find(|it| it.version() == schema)?;
        Some((migration.old_type(), migration.old_shape()))
    }

    fn encode_if_changed(
        &self,
        saved: Option<u64>,
        out: &mut ValueWriter<'_>,
    ) -> Result<Option<u64>, postcard::Error> {
        // Recursive: a thread that calls `save_all` while holding a read guard of
        // this cell must not queue behind a writer that waits for that guard.
        let guard = self.lock().read_recursive();
        let seq = self.seq.load(Ordering::Relaxed);
        if saved == Some(seq) {
            return Ok(None);
        }
        postcard::to_io(&*guard, out)?;
        Ok(Some(seq))
    }

    fn decode(&self, bytes: &[u8], schema: u32) -> Result<Install<'_>, DecodeFault> {
        let current = self.options.version;
        let value = match schema.cmp(&current) {
            std::cmp::Ordering::Equal => decode_exact::<T>(bytes).map_err(DecodeFault::Codec)?,
            std::cmp::Ordering::Greater => return Err(DecodeFault::Newer),
            std::cmp::Ordering::Less => {
                let migrations = self.options.migrations.iter();
                let migration = migrations.into_iter().find(|it| it.version() == schema);
                let migration = migration.ok_or(DecodeFault::NoMigration)?;
                // The user's code: its panic is an error of the open or reload.
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| migration.migrate(bytes)))
                    .map_err(|_| DecodeFault::Panicked)?
                    .map_err(DecodeFault::Codec)?
            }
        };
        Ok(Box::new(Waiting { cell: self, value: Some(value) }))
    }
}

impl<T> StateCell<T> {
    pub(crate) fn install(&self, value: T) -> u64 {
        match self.publish_first(value) {
            Ok(seq) => seq,
            Err(value) => self.install_under(self.lock().write(), value),
        }
    }

    /// Puts `value` into the cell as its first value, if it was never read (or
    /// given one); returns the cell's new change counter, or `value` back.
    fn publish_first(&self, value: T) -> Result<u64, T> {
        if self.value.get().is_some() {
            return Err(value);
        }
        // Counted before the value is published: a write that lands right after
        // publication must move the counter past the one returned, or it would
        // never be saved.
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        match self.value.set(RwLock::new(value)) {
            Ok(()) => Ok(seq),
            Err(lock) => Err(lock.into_inner()),
        }
    }

    /// Puts `value` into the cell under its write lock `guard`; returns the cell's
    /// new change counter.
    fn install_under(&self, mut guard: RwLockWriteGuard<'_, T>, value: T) -> u64 {
        let old = std::mem::replace(&mut *guard, value);
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        drop(guard);
        // Large values are dropped after the lock is released, so readers wait
        // only for the swap.
        drop(old);
        seq
    }
}
