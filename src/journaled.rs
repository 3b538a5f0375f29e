//! The second front door of prevalence: a named cell whose type is a prevalent
//! system, changed by [`StateCell::handle`] through the same journal engine as
//! [`Prevayler`](crate::Prevayler).
//!
//! A journaled cell is declared with `#[journaled]` in [`defstate!`](crate::defstate)
//! (or [`CellOptions::journaled`]) and its type implements [`Prevalent`]. Its
//! store keeps it in a journal directory of its own, `journals/<name>/` inside the
//! store, instead of in the store's records: every handled event is journaled
//! before it is applied, [`Store::save_all`](crate::Store::save_all) writes a
//! snapshot of the cell (shortening its journal) rather than a record, and opening
//! the store loads that snapshot and replays the journal after it.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use serde::{Serialize, de::DeserializeOwned};

use parking_lot::RwLock;

use crate::{
    CellOptions, Error, Migrate, Result, StateCell, Value,
    cell::ErasedCell,
    codec::{BadName, stored_type_name},
    crypt::Sealer,
    error::CodecError,
    io::Io,
    journal::{
        self, Config, Durability, Files, Identity, Job, Older, Place, Recovery, Replayed, Restored,
        Taint, Timestamp, Versions,
    },
    lockfile::{Access, Hold, Kind},
    schema::JournalHooks,
    shape::Shape,
};

/// Snapshots of a journaled cell kept beside its journal.
const KEEP_SNAPSHOTS: usize = 2;
/// The directory of the store holding the journaled cells' directories.
pub(crate) const JOURNALS_DIR: &str = "journals";

/// A type whose values change only through events: the system function of
/// prevalence, as a trait, for journaled cells (and usable as the function of a
/// [`Prevayler`](crate::Prevayler): `Prevayler::open(dir, Bank::default(), Bank::apply)`).
///
/// The same rules hold as for a `Prevayler`: `apply` must be deterministic, and
/// should decide before it changes anything, because an event it rejects is
/// journaled and replayed too (see the [`prevalence`](crate::prevalence) docs).
///
/// The cell's [`version`](CellOptions::version) and
/// [`migrations`](CellOptions::migrations) are its state's, read from its
/// snapshots; [`EVENT_VERSION`](Prevalent::EVENT_VERSION) and
/// [`EVENT_MIGRATIONS`](Prevalent::EVENT_MIGRATIONS) are its events', read from its
/// journal (see [schema versions](crate::prevalence#schema-versions)).
///
/// # Example
/// ```
/// use instastate::{Prevalent, Timestamp, defstate};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Default, Serialize, Deserialize)]
/// pub struct Counter { total: u64 }
///
/// impl Prevalent for Counter {
///     type Event = u64;
///     type Output = u64;
///     fn apply(&mut self, by: u64, _at: Timestamp) -> u64 {
///         self.total += by;
///         self.total
///     }
/// }
///
/// defstate! {
///     #[journaled]
///     COUNTER: Counter = Counter::default();
/// }
///
/// # fn main() -> instastate::Result<()> {
/// # let dir = tempfile::tempdir().unwrap();
/// let store = instastate::Store::builder().cell(&COUNTER).open(dir.path())?;
/// assert_eq!(COUNTER.handle(5)?, 5); // durable before it returns
/// # Ok(())
/// # }
/// ```
pub trait Prevalent: Value {
    /// What changes the value.
    type Event: Serialize + DeserializeOwned + Send + 'static;
    /// What [`StateCell::handle`] returns: often a `Result`.
    type Output: Send + 'static;

    /// The schema version of [`Event`](Prevalent::Event), 1 unless set. Bump it
    /// whenever the event type changes in a way its encoding cannot absorb, and add
    /// a migration from the old version to
    /// [`EVENT_MIGRATIONS`](Prevalent::EVENT_MIGRATIONS).
    const EVENT_VERSION: u32 = 1;

    /// The migrations (upcasters) of events journaled with older versions of
    /// [`Event`](Prevalent::Event), at most one per version, each straight to the
    /// current type. A journal file of an older version without one, or of a newer
    /// version, is refused with [`Error::JournalSchema`] when the store opens.
    ///
    /// # Example
    /// ```
    /// use instastate::{CellOptions, Migrate, Migration, Prevalent, StateCell, Timestamp};
    ///
    /// # #[derive(Default, serde::Serialize, serde::Deserialize)]
    /// # pub struct Ledger { total: i64 }
    /// #[derive(serde::Serialize, serde::Deserialize)]
    /// pub struct Entry { amount: i64, memo: String }
    ///
    /// // Version 1 journaled bare amounts.
    /// fn from_v1(amount: i64) -> Entry {
    ///     Entry { amount, memo: String::new() }
    /// }
    ///
    /// impl Prevalent for Ledger {
    ///     type Event = Entry;
    ///     type Output = i64;
    ///     const EVENT_VERSION: u32 = 2;
    ///     const EVENT_MIGRATIONS: &'static [&'static dyn Migrate<Entry>] =
    ///         &[&Migration::new(1, from_v1)];
    ///
    ///     fn apply(&mut self, entry: Entry, _at: Timestamp) -> i64 {
    ///         self.total += entry.amount;
    ///         self.total
    ///     }
    /// }
    ///
    /// static LEDGER: StateCell<Ledger> =
    ///     StateCell::with_options("app::LEDGER", Ledger::default, CellOptions::new().journaled());
    /// # assert_eq!(LEDGER.name(), "app::LEDGER");
    /// ```
    const EVENT_MIGRATIONS: &'static [&'static dyn Migrate<Self::Event>] = &[];

    /// Applies `event`, handled at time `at`, to the value.
    fn apply(&mut self, event: Self::Event, at: Timestamp) -> Self::Output;
}

impl<T: Prevalent> CellOptions<T> {
    /// Makes the cell journaled: changed by [`StateCell::handle`], every event
    /// journaled before it is applied, and kept in a journal directory of its own in
    /// the store (see [`Prevalent`]). `defstate!` sets it with `#[journaled]`.
    ///
    /// The cell's schema version and migrations are its snapshots': one written
    /// with an older version is read through the migration from it, and one of a
    /// newer version is refused with [`Error::JournalSchema`]. Its events are
    /// versioned by [`Prevalent::EVENT_VERSION`] and [`Prevalent::EVENT_MIGRATIONS`].
    #[must_use]
    pub const fn journaled(self) -> CellOptions<T> {
        let hooks = JournalHooks {
            event_type: event_type::<T>,
            event_shape: Shape::of::<T::Event>,
            event_version: T::EVENT_VERSION,
            older_events: older_events::<T>,
            replay: replay_event::<T>,
        };
        CellOptions { journal: Some(hooks), ..self }
    }
}

fn event_type<T: Prevalent>() -> &'static str {
    stored_type_name(std::any::type_name::<T::Event>())
}

fn older_events<T: Prevalent>() -> Vec<Older> {
    Older::of(T::EVENT_MIGRATIONS.iter().copied())
}

fn replay_event<T: Prevalent>(dir: &Path, value: &mut T, event: Replayed<'_>) -> Result<()> {
    let what = || format!("event {}", event.seq);
    let place = Place { path: dir, what: &what };
    let migrations = T::EVENT_MIGRATIONS.iter().copied();
    let decoded: T::Event =
        journal::decode_versioned(event.bytes, event.schema, T::EVENT_VERSION, migrations, place)?;
    journal::replay_caught(dir, event.seq, || {
        let _ = value.apply(decoded, event.at);
    })
}

/// The journals attached to open journaled cells, by the cell's address: kept
/// here rather than in the cell, so that a plain cell carries no journal machinery.
static ATTACHED: RwLock<BTreeMap<usize, Arc<Attached>>> = RwLock::new(BTreeMap::new());

/// The key of `cell` in [`ATTACHED`].
fn address<T>(cell: &StateCell<T>) -> usize {
    std::ptr::from_ref(cell).addr()
}

/// The journal attached to `cell`, if it is open in a store.
fn attached<T>(cell: &StateCell<T>) -> Option<Arc<Attached>> {
    ATTACHED.read().get(&address(cell)).cloned()
}

/// `cell` as a journaled cell, if its options make it one.
pub(crate) fn as_journaled<T: Value>(
    cell: &'static StateCell<T>,
) -> Option<&'static dyn JournaledCell> {
    cell.options.journal.is_some().then_some(cell as &'static dyn JournaledCell)
}

/// A journaled cell's open journal, and how far its value has got.
pub(crate) struct Attached {
    journal: Arc<journal::Journal>,
    /// Set when `apply` panicked: the value may be half-changed.
    tainted: AtomicBool,
    /// Events applied to the value, and the last one's timestamp.
    applied: AtomicU64,
    at: AtomicU64,
    /// The cell's change counter when the last snapshot was written.
    snapshotted: AtomicU64,
}

/// What a store does with its journaled cells, without knowing their types.
pub(crate) trait JournaledCell: Send + Sync {
    fn name(&self) -> &'static str;
    /// Reads the cell's snapshot and journal in `dir` (`None`: a transient journal)
    /// into a new value; the returned function installs it and attaches the journal.
    fn open_journal(
        &'static self,
        place: JournalPlace,
        options: JournalOptions,
        sealer: Sealer,
        io: &Io,
        access: Access,
    ) -> Result<Box<dyn FnOnce() + Send>>;
    /// Whether the value changed since the last snapshot.
    fn is_dirty(&self) -> bool;
    /// Writes a snapshot if the value changed since the last one.
    fn snapshot_journal(&self) -> Result<()>;
    /// Writes the cell's current value into `dir` as a journal of its own: a
    /// snapshot and an empty journal file after it.
    fn backup_into(&self, dir: &Path) -> Result<()>;
    /// Syncs and detaches the journal: `handle` fails from now on.
    fn close_journal(&self) -> Result<()>;
}

impl<T: Value> JournaledCell for StateCell<T> {
    fn name(&self) -> &'static str {
        StateCell::name(self)
    }

    fn open_journal(
        &'static self,
        place: JournalPlace,
        options: JournalOptions,
        sealer: Sealer,
        io: &Io,
        access: Access,
    ) -> Result<Box<dyn FnOnce() + Send>> {
        let Some(hooks) = self.options.journal else { return Ok(Box::new(|| {})) };
        if attached(self).is_some() {
            return Err(Error::CellInUse { cell: self.name().to_owned() });
        }
        let identity = Identity {
            state_type: stored_type_name(std::any::type_name::<T>()),
            event_type: (hooks.event_type)(),
            schema: self.options.version,
            state_shape: Shape::of::<T>(),
            event_shape: (hooks.event_shape)(),
        };
        let (current, migrations) = (self.options.version, self.options.migrations);
        let versions = Versions {
            event: hooks.event_version,
            older_states: Older::of(migrations.iter().copied()),
            older_events: (hooks.older_events)(),
        };
        let mut restore = |snapshot: Restored<'_>| {
            let place = Place { path: snapshot.path, what: &|| "the snapshot".to_owned() };
            let migrations = migrations.iter().copied();
            journal::decode_versioned(snapshot.bytes, snapshot.schema, current, migrations, place)
        };
        let label = place.label();
        let mut replay = |value: &mut T, event: Replayed<'_>| {
            (hooks.replay)(&label, value, event)?;
            Ok(None)
        };
        let JournalOptions { durability, recovery } = options;
        let initial = || Ok((self.init)());
        let dir = match place {
            JournalPlace::Memory => None,
            JournalPlace::Dir(dir) => Some(dir),
            #[cfg(feature = "postgres")]
            JournalPlace::Database(database) => {
                let (location, settings, wait) = *database;
                if access == Access::ReadOnly {
                    // Without the journal's lease, writing nothing.
                    let mut reader = crate::postgres::PgReader::quiet(&location)?;
                    let config = journal::DatabaseConfig { identity, durability, sealer };
                    let opened = journal::read_on_database(
                        &mut reader,
                        config,
                        &versions,
                        initial,
                        &mut restore,
                        &mut replay,
                    )?;
                    return Ok(self.attach(opened));
                }
                let database = crate::postgres::PgJournal::open(&location, settings, wait)?;
                let config = journal::DatabaseConfig { identity, durability, sealer };
                let (start, versions) = (None, &versions);
                let opened = journal::open_on_database(
                    database,
                    config,
                    versions,
                    start,
                    initial,
                    &mut restore,
                    &mut replay,
                )?;
                return Ok(self.attach(opened));
            }
        };
        // The store's lock covers the journal too; its own lock keeps a `Prevayler`
        // out of it, and records how it was closed.
        let lock = match &dir {
            Some(dir) => Hold::take(io, dir, Kind::Journal, access)?,
            None => None,
        };
        let io = io.clone();
        let config = Config { dir, identity, durability, recovery, sealer, io, access };
        let opened =
            journal::open_versioned(config, &versions, lock, initial, &mut restore, &mut replay)?;
        Ok(self.attach(opened))
    }

    fn is_dirty(&self) -> bool {
        let Some(attached) = attached(self) else { return false };
        attached.journal.persistent()
            && attached.snapshotted.load(Ordering::Relaxed) != ErasedCell::seq(self)
    }

    fn snapshot_journal(&self) -> Result<()> {
        let Some(attached) = attached(self) else { return Ok(()) };
        let Some(encoded) = self.encode_applied(&attached, Unchanged::Skip)? else {
            return Ok(());
        };
        let Encoded { body, events, at, seq } = encoded;
        attached.journal.snapshot(body, events, at, KEEP_SNAPSHOTS, Files::Retire)?;
        attached.snapshotted.store(seq, Ordering::Relaxed);
        Ok(())
    }

    fn backup_into(&self, dir: &Path) -> Result<()> {
        let Some(attached) = attached(self) else { return Ok(()) };
        let Some(encoded) = self.encode_applied(&attached, Unchanged::Write)? else {
            return Ok(());
        };
        attached.journal.copy_to(dir, encoded.body, encoded.events, encoded.at)
    }

    fn close_journal(&self) -> Result<()> {
        let Some(attached) = ATTACHED.write().remove(&address(self)) else { return Ok(()) };
        attached.journal.close()
    }
}

/// Whether to encode a journaled cell's value that is unchanged since its last snapshot.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Unchanged {
    Skip,
    Write,
}

/// A journaled cell's value, encoded, with the events it holds, the last one's
/// timestamp and the cell's change counter.
struct Encoded {
    body: Vec<u8>,
    events: u64,
    at: u64,
    seq: u64,
}

/// No change counter: a snapshot is due.
const NEVER: u64 = u64::MAX;

/// Where a store keeps a journaled cell's journal.
pub(crate) enum JournalPlace {
    /// In memory, as an in-memory store keeps everything.
    Memory,
    /// In this directory.
    Dir(PathBuf),
    /// In this namespace of a database, written by the holder of its lease (with
    /// these settings, waiting this long for it).
    #[cfg(feature = "postgres")]
    Database(Box<(crate::postgres::Location, crate::postgres::LeaseSettings, std::time::Duration)>),
}

impl JournalPlace {
    /// Where a store kept here keeps the journal of its cell `name`: in memory, in
    /// `journals/<name>/` of its directory, or in the namespace `<namespace>/<name>`.
    pub(crate) fn of_cell(&self, name: &str) -> JournalPlace {
        match self {
            JournalPlace::Memory => JournalPlace::Memory,
            JournalPlace::Dir(store) => JournalPlace::Dir(journal_dir(store, name)),
            #[cfg(feature = "postgres")]
            JournalPlace::Database(database) => {
                let (location, settings, wait) = &**database;
                JournalPlace::Database(Box::new((location.beside(name), *settings, *wait)))
            }
        }
    }

    /// What errors name: the directory, or the location without its password.
    fn label(&self) -> PathBuf {
        match self {
            JournalPlace::Memory => PathBuf::new(),
            JournalPlace::Dir(dir) => dir.clone(),
            #[cfg(feature = "postgres")]
            JournalPlace::Database(database) => PathBuf::from(database.0.to_string()),
        }
    }
}

/// How a store opens its journaled cells' journals.
#[derive(Clone, Copy)]
pub(crate) struct JournalOptions {
    pub(crate) durability: Durability,
    pub(crate) recovery: Recovery,
}

impl<T: Value> StateCell<T> {
    /// Attaches the journal `opened` recovered to the cell; the returned function
    /// installs its value (once every journal of the store opened).
    fn attach(&'static self, opened: journal::Opened<T>) -> Box<dyn FnOnce() + Send> {
        let journal = Arc::new(opened.journal);
        journal::Journal::start_timer(&journal, |err| eprintln!("instastate: {err}"));
        let attached = Arc::new(Attached {
            journal,
            tainted: AtomicBool::new(false),
            applied: AtomicU64::new(opened.applied),
            at: AtomicU64::new(opened.at),
            snapshotted: AtomicU64::new(NEVER),
        });
        // The value is its snapshot's unless events were replayed after it.
        let fresh = opened.recovered.replayed() == 0 && opened.recovered.snapshot().is_some();
        let value = opened.state;
        Box::new(move || {
            let seq = self.install(value);
            if fresh {
                attached.snapshotted.store(seq, Ordering::Relaxed);
            }
            ATTACHED.write().insert(address(self), attached);
        })
    }

    /// Encodes the value and how far it has got, under its read lock; nothing for a
    /// transient journal, or when `unchanged` says to skip an unchanged value.
    fn encode_applied(&self, attached: &Attached, unchanged: Unchanged) -> Result<Option<Encoded>> {
        // Recursive: a thread that saves while holding a read guard of this cell
        // must not queue behind a writer that waits for that guard.
        let value = self.read_recursive();
        if attached.tainted.load(Ordering::SeqCst) {
            return Err(Error::Poisoned { path: attached.journal.label() });
        }
        let seq = ErasedCell::seq(self);
        let same = seq == attached.snapshotted.load(Ordering::Relaxed);
        if !attached.journal.persistent() || (same && unchanged == Unchanged::Skip) {
            return Ok(None);
        }
        let body = postcard::to_allocvec(&*value).map_err(|source| Error::Encode {
            cell: self.name().to_owned(),
            type_name: std::any::type_name::<T>().to_owned(),
            source: CodecError::from(source),
        })?;
        let events = attached.applied.load(Ordering::Acquire);
        Ok(Some(Encoded { body, events, at: attached.at.load(Ordering::Acquire), seq }))
    }
}

impl<T: Prevalent> StateCell<T> {
    /// Journals `event`, makes it durable as the store's journal
    /// [`Durability`](crate::prevalence::Durability) asks ([`Sync`](Durability::SyncEach)
    /// unless [`StoreBuilder::journal_durability`](crate::StoreBuilder::journal_durability)
    /// says otherwise), applies it with [`Prevalent::apply`] under the cell's write
    /// lock, and returns what that returned.
    ///
    /// # Errors
    /// [`Error::NotJournaled`] unless the cell is declared `#[journaled]` and open in
    /// a store; [`Error::EventEncode`], [`Error::JournalWrite`] and
    /// [`Error::Poisoned`] as for [`Prevayler::handle`](crate::Prevayler::handle).
    ///
    /// Do not call it while holding a guard of the cell: applying the event needs
    /// its write lock.
    ///
    /// A journaled cell should change only through `handle`. A direct
    /// [`write`](StateCell::write) is not journaled: it is lost when the process dies
    /// unless a snapshot ([`Store::save_all`](crate::Store::save_all)) caught it,
    /// and events journaled after it are replayed onto a value without it.
    ///
    /// # Panics
    /// If [`Prevalent::apply`] panics: the event is voided and the journal refuses
    /// later events until the store is reopened.
    pub fn handle(&'static self, event: T::Event) -> Result<T::Output> {
        let not_journaled = || Error::NotJournaled { cell: self.name().to_owned() };
        let attached = attached(self).ok_or_else(not_journaled)?;
        let bytes = journal::encode(&event, || attached.journal.label())?;
        let job = CellApply { cell: self, attached: Arc::clone(&attached), event };
        attached.journal.commit(bytes, job)
    }
}

/// The job of one event handled by a cell: apply it under the cell's write lock.
struct CellApply<T: Prevalent> {
    cell: &'static StateCell<T>,
    attached: Arc<Attached>,
    event: T::Event,
}

impl<T: Prevalent> Job for CellApply<T> {
    type Output = T::Output;

    fn run(self, seq: u64, at: Timestamp) -> (T::Output, Option<u64>) {
        let mut value = self.cell.write();
        let _taint = Taint(&self.attached.tainted);
        let output = Prevalent::apply(&mut *value, self.event, at);
        self.attached.applied.store(seq + 1, Ordering::Release);
        self.attached.at.store(at.as_micros(), Ordering::Release);
        (output, None)
    }
}

/// Where the store in `store_dir` keeps the journal of the cell named `name`:
/// the name with every byte but ASCII letters, digits, `_` and `-` escaped as `%XX`.
pub(crate) fn journal_dir(store_dir: &Path, name: &str) -> PathBuf {
    let mut escaped = String::with_capacity(escaped_len(name));
    for byte in name.bytes() {
        if is_kept(byte) {
            escaped.push(char::from(byte));
        } else {
            let _ = write!(escaped, "%{byte:02X}");
        }
    }
    store_dir.join(JOURNALS_DIR).join(escaped)
}

/// The name of the cell whose journal directory is named `escaped`, as
/// [`journal_dir`] names it; `None` for a name it does not make.
pub(crate) fn cell_name_of(escaped: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(escaped.len());
    let mut rest = escaped.as_bytes();
    while let Some((&byte, tail)) = rest.split_first() {
        if byte == b'%' {
            let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
            let byte = u8::from_str_radix(hex, 16).ok()?;
            if is_kept(byte) || hex.bytes().any(|it| it.is_ascii_lowercase()) {
                return None;
            }
            bytes.push(byte);
            rest = tail.get(2..)?;
        } else if is_kept(byte) {
            bytes.push(byte);
            rest = tail;
        } else {
            return None;
        }
    }
    String::from_utf8(bytes).ok()
}

/// The most bytes a file name may have (`NAME_MAX` of Linux and the BSDs).
const MAX_FILE_NAME: usize = 255;

/// Refuses a journaled cell's name whose journal directory's name, escaped, would be
/// longer than a file name may be: the journal could not be created, or worse, be
/// cut by a file system that truncates names.
pub(crate) fn check_dir_name(name: &str) -> std::result::Result<(), BadName> {
    let len = escaped_len(name);
    if MAX_FILE_NAME < len {
        let reason = format!(
            "a journaled cell's journal directory is named after it, escaped, and that is \
             {len} bytes long, over the {MAX_FILE_NAME} a file name may have"
        );
        return Err(BadName::new(name, reason));
    }
    Ok(())
}

/// The length of `name` escaped as [`journal_dir`] escapes it.
fn escaped_len(name: &str) -> usize {
    name.bytes().map(|byte| if is_kept(byte) { 1 } else { 3 }).sum()
}

/// Whether a byte of a cell name stands as it is in its journal directory's name.
fn is_kept(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-'
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_directory_names_map_back_to_their_cells_names() {
        for name in ["app::COUNTER", "a b%c", "ünïcode::名前", "-_09azAZ", "::"] {
            let dir = journal_dir(Path::new("store"), name);
            let escaped = dir.file_name().and_then(|it| it.to_str()).unwrap_or_default();
            assert_eq!(cell_name_of(escaped).as_deref(), Some(name), "{escaped}");
            assert!(check_dir_name(name).is_ok());
        }
        // Only names that `journal_dir` makes: no stray `%`, no lowercase or needless escape.
        for escaped in ["a%", "a%4", "a%zz", "a%3a", "%41", "a.b", "a%FF"] {
            assert_eq!(cell_name_of(escaped), None, "{escaped}");
        }
        assert!(check_dir_name(&".".repeat(85)).is_ok());
        assert!(check_dir_name(&".".repeat(86)).is_err());
    }
}
