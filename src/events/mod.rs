//! The third front door: an embedded event store. Streams of events with versions,
//! a global order (`$all`), optimistic concurrency and idempotent appends, on the
//! journal engine of prevalence.
//!
//! ```
//! use instastate::events::{EventStore, Expected};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Serialize, Deserialize)]
//! enum Bank {
//!     Opened { owner: String },
//!     Deposited { amount: i64 },
//! }
//!
//! # fn main() -> instastate::Result<()> {
//! # let dir = tempfile::tempdir().unwrap();
//! let events = EventStore::<Bank>::open(dir.path())?;
//! events.append("account-42", Expected::NoStream, [Bank::Opened { owner: "alice".into() }])?;
//! events.append("account-42", Expected::Exact(0), [Bank::Deposited { amount: 100 }])?;
//!
//! // A writer that also read version 0 is refused, and told where the stream is.
//! let late = events.append("account-42", Expected::Exact(0), [Bank::Deposited { amount: 5 }]);
//! assert!(matches!(late, Err(instastate::Error::WrongExpectedVersion { actual: Some(1), .. })));
//!
//! for event in events.read_stream("account-42") {
//!     let event = event?;
//!     println!("{} v{} at {}: {:?}", event.stream, event.version, event.position, event.data);
//! }
//! let last_two: Vec<_> = events.read_all().backward().limit(2).into_iter().collect::<Result<_, _>>()?;
//! assert_eq!(last_two[0].event_type, "Deposited");
//! # Ok(())
//! # }
//! ```
//!
//! # Guarantees
//!
//! - **Atomic**: an append, of one stream or of several
//!   ([`append_all`](EventStore::append_all)), is one journal event: after a crash it
//!   is there whole or not at all.
//! - **Durable** as its [`Durability`] promises, before it is acknowledged and
//!   before any reader sees it: [`Durability::SyncEach`] by default,
//!   [`Durability::GroupCommit`] to share one `fdatasync` between concurrent
//!   appenders.
//! - **Ordered**: every event has a version in its stream and a position in the
//!   store, both from 0 and without gaps; readers see appends in position order,
//!   never a later one before an earlier one.
//! - **Checked**: an expectation that does not hold is
//!   [`Error::WrongExpectedVersion`] with the stream's actual version, also when
//!   two writers create one stream at once; a retry of an append whose events'
//!   ids are already in place returns the earlier result and writes nothing.
//!
//! The events stay in the journal files; memory holds an index of them (about 24
//! bytes per event, and a bounded window of recent ids), which a checkpoint (a
//! journal snapshot) saves now and then so that opening replays only what came
//! after it.
//!
//! # What else it does
//!
//! - **Conflicts**: [`EventStore::append_if`] refuses an append when an event
//!   carrying one of its tags came since the caller's base ([`Condition`]), and
//!   [`EventStore::check_append_if`] answers the same without writing.
//! - **Removal**: [`EventStore::delete_stream`], [`EventStore::tombstone_stream`],
//!   [`EventStore::truncate_stream`], [`EventStore::set_retention`]; reads pass over
//!   what is removed, and [`EventStore::compact`] reclaims its disk.
//! - **Effects**: [`EventStore::append_effect`] makes subscriptions replay the
//!   aggregates linked to a trigger ([`Delivery::Effect`], [`Delivery::Replayed`]);
//!   with the `encryption` feature, `Sealed` data and `EventStore::forget_subject`
//!   shred a subject's data for good.
//! - **Projections** into cells, checkpointed with the cell: [`EventStore::project`].
//! - **Schema versions** of the event type with migrations
//!   ([`EventStoreBuilder::migrate_event`]), and a JSON codec with the `json`
//!   feature ([`Codec`]).
//! - **An untyped, read-only view** for tools: [`RawEvents`].
//!
//! # On PostgreSQL
//!
//! With the `postgres` feature, a `postgres://` location opens the store in a
//! PostgreSQL database (`EventStore::<E>::open("postgres://app@db/prod?namespace=bank-events")`),
//! where any number of processes append to it at once: expected versions,
//! idempotent ids and conditions are checked in the append's transaction,
//! positions are gap-free and in commit order (a subscription never skips an
//! event that committed late), and subscriptions wake at every commit of any
//! process (`LISTEN`/`NOTIFY`). Every append is committed before it returns,
//! whatever the [`Durability`]. Effects, and subject keys with crypto-shredding,
//! work there too, the keys kept in the database, and so do deletes, tombstones,
//! truncations and retention rules (each a transaction that locks the head, as
//! appends do; readers pass over what they removed), and so does compaction.
//! A store key seals each event's data. Backups are the database's own:
//! [`EventStore::backup_to`] returns [`Error::Unsupported`] there.

pub(crate) mod append;
pub(crate) mod batch;
mod chunks;
mod codec;
mod compact;
pub(crate) mod condition;
#[cfg(feature = "postgres")]
mod database;
mod delete;
mod effect;
mod event;
pub(crate) mod index;
mod locate;
mod project;
mod raw;
mod read;
#[cfg(feature = "encryption")]
mod seal;
mod stream_id;
mod subscribe;

use std::{
    marker::PhantomData,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
};

use parking_lot::{Mutex, RwLock};
use serde::{Serialize, de::DeserializeOwned};

#[cfg(feature = "encryption")]
pub use self::seal::Sealed;
pub use self::{
    append::{Append, Appended, Expected},
    codec::Codec,
    compact::Compacted,
    condition::{Condition, EventRef},
    delete::Retention,
    effect::{Effect, FORGOTTEN},
    event::{EventId, Metadata, NewEvent, Position, RecordedEvent},
    project::{Projected, Projection, ProjectionBuilder},
    raw::{
        Damage, Locking, RawEvent, RawEventIter, RawEvents, RawEventsBuilder, RawRead,
        StreamSummary, Verified,
    },
    read::{Events, ReadAll, ReadStream},
    subscribe::{Delivery, SubscribeAll, SubscribeStream, Subscription},
};
use self::{
    append::{Commit, Encoded, Plan, Request},
    index::{Checkpoint, Frames, Index},
    locate::{FrameCache, Locator},
    subscribe::Signal,
};
pub use crate::journal::{Durability, Recovered, Recovery};
pub use crate::shape::value::{Fields, RawValue};
use crate::{
    Error, Result, Timestamp,
    crypt::Sealer,
    io::Io,
    journal::{self, Config, Files, Identity, Job, Journal, Replayed},
    lockfile::{Access, DirLock, Hold, Kind},
    shape::Shape,
};

/// The format of the event store's commands, recorded as the journal's schema.
const SCHEMA: u32 = 1;
/// How many checkpoints are kept.
const KEEP_CHECKPOINTS: usize = 2;
/// Journal events between checkpoints, by default.
const DEFAULT_CHECKPOINT_EVERY: u64 = 100_000;
/// Recent event ids kept for idempotent appends, by default.
const DEFAULT_RECENT_IDS: usize = 100_000;
/// Bytes of batches read at random kept in memory, by default.
const DEFAULT_READ_CACHE: u64 = 64 << 20;
/// The largest batch kept in the cache as it commits.
const REMEMBERED_BATCH: usize = 64 * 1024;
/// The file of the subject keys, in the store's directory unless the builder
/// says otherwise.
#[cfg(feature = "encryption")]
const SUBJECT_KEYS: &str = "subject-keys";

/// An event store in a directory (or, with the `postgres` feature, a PostgreSQL
/// database): streams of events of type `E`.
///
/// Cheap to clone: clones share the store. Open with [`EventStore::open`] or
/// [`EventStore::builder`]; a directory is locked while the store is open.
pub struct EventStore<E> {
    shared: Arc<Shared>,
    /// The event type's version and migrations, which only typed handles know.
    schema: Arc<codec::EventSchema<E>>,
    _events: PhantomData<fn(E) -> E>,
}

impl<E> Clone for EventStore<E> {
    fn clone(&self) -> Self {
        EventStore {
            shared: Arc::clone(&self.shared),
            schema: Arc::clone(&self.schema),
            _events: PhantomData,
        }
    }
}

impl<E> std::fmt::Debug for EventStore<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStore").field("location", &self.shared.label()).finish_non_exhaustive()
    }
}

/// What the user's handles share: the store, and its background checkpoint, which
/// the last handle waits for, so that the store is closed (and its directory
/// unlocked) when that handle is gone.
struct Shared {
    engine: Engine,
    background: Mutex<Option<JoinHandle<()>>>,
}

/// Where a store keeps its events.
enum Engine {
    /// Journal files in a directory.
    Files(Arc<Core>),
    /// Tables of a PostgreSQL database.
    #[cfg(feature = "postgres")]
    Database(Arc<database::DbCore>),
}

impl Shared {
    /// The store in files, for `operation`, which only it offers.
    #[cfg_attr(not(feature = "postgres"), allow(clippy::unnecessary_wraps, unused_variables))]
    fn files(&self, operation: &str) -> Result<&Arc<Core>> {
        match &self.engine {
            Engine::Files(core) => Ok(core),
            #[cfg(feature = "postgres")]
            Engine::Database(db) => Err(db.unsupported(operation)),
        }
    }

    /// The position the next event appended will have.
    #[cfg_attr(not(feature = "postgres"), allow(clippy::unnecessary_wraps))]
    fn head(&self) -> Result<Position> {
        match &self.engine {
            Engine::Files(core) => Ok(Position::new(core.index.read().committed)),
            #[cfg(feature = "postgres")]
            Engine::Database(db) => db.engine.head(),
        }
    }

    /// What errors name: the directory, or the location without its password.
    fn label(&self) -> &Path {
        match &self.engine {
            Engine::Files(core) => &core.dir,
            #[cfg(feature = "postgres")]
            Engine::Database(db) => &db.label,
        }
    }

    /// What wakes the subscriptions at each commit.
    fn signal(&self) -> &Arc<Signal> {
        match &self.engine {
            Engine::Files(core) => &core.signal,
            #[cfg(feature = "postgres")]
            Engine::Database(db) => &db.signal,
        }
    }

    /// How new events' data is encoded.
    fn codec(&self) -> Codec {
        match &self.engine {
            Engine::Files(core) => core.codec,
            #[cfg(feature = "postgres")]
            Engine::Database(db) => db.codec,
        }
    }

    /// Where background errors go.
    fn hook(&self) -> &Hook {
        match &self.engine {
            Engine::Files(core) => &core.hook,
            #[cfg(feature = "postgres")]
            Engine::Database(db) => &db.hook,
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(thread) = self.background.get_mut().take() {
            // The last handle can be dropped by the checkpoint's own hook: that
            // thread cannot wait for itself.
            if thread.thread().id() != thread::current().id() {
                // A panic there was reported by the thread itself.
                let _ = thread.join();
            }
        }
    }
}

/// Clears its flag when dropped.
struct Clear<'a>(&'a AtomicBool);

impl Drop for Clear<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Core {
    /// Closes the journal (its last sync), the subject key file first: a key
    /// record written in part (a write that failed) is written away, since after
    /// a clean close a short end is taken for damage.
    fn close(&self) -> Result<()> {
        #[cfg(feature = "encryption")]
        let keys = if self.keys.torn() { self.keys.persist() } else { Ok(()) };
        #[cfg(not(feature = "encryption"))]
        let keys = Ok(());
        // Closed (and synced) whatever became of the keys.
        let closed = self.journal.close();
        keys.and(closed)
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        self.signal.close();
        // The last sync of the buffered modes; `close` reports it to its caller.
        if let Err(err) = self.close() {
            (self.hook)(&err);
        }
    }
}

/// Where the errors of background checkpoints go.
type Hook = Arc<dyn Fn(&Error) + Send + Sync>;

/// What the handles of one store share.
struct Core {
    dir: PathBuf,
    journal: Arc<Journal>,
    index: Arc<RwLock<Index>>,
    locator: Locator,
    /// The events of streams read before, parsed (none without a read cache).
    chunks: Option<Arc<chunks::Chunks>>,
    recovered: Recovered,
    checkpoint_every: u64,
    /// The journal events at the last checkpoint (or at open).
    checkpointed: AtomicU64,
    /// Whether a checkpoint is under way.
    checkpointing: AtomicBool,
    hook: Hook,
    /// Wakes the subscriptions at each commit.
    signal: Arc<Signal>,
    io: Io,
    /// How new events' data is encoded.
    codec: Codec,
    /// The keys of the subjects whose data is sealed.
    #[cfg(feature = "encryption")]
    keys: Arc<seal::KeyRing>,
}

/// Options for opening an [`EventStore`]: `EventStore::<E>::builder()`.
///
/// # Example
/// ```
/// use instastate::events::{Durability, EventStore};
///
/// # fn main() -> instastate::Result<()> {
/// # let dir = tempfile::tempdir().unwrap();
/// let events = EventStore::<String>::builder()
///     .durability(Durability::GroupCommit)
///     .checkpoint_every(10_000)
///     .open(dir.path())?;
/// # Ok(())
/// # }
/// ```
#[must_use]
pub struct EventStoreBuilder<E> {
    durability: Durability,
    recovery: Recovery,
    checkpoint_every: u64,
    recent_ids: usize,
    read_cache: u64,
    hook: Option<Hook>,
    io: Io,
    codec: Codec,
    event_version: u32,
    migrations: codec::Migrations<E>,
    #[cfg(feature = "encryption")]
    key: Option<crate::EncryptionKey>,
    #[cfg(feature = "encryption")]
    subject_keys: Option<PathBuf>,
    _events: PhantomData<fn(E) -> E>,
}

impl<E> Default for EventStoreBuilder<E> {
    fn default() -> Self {
        EventStoreBuilder {
            durability: Durability::default(),
            recovery: Recovery::default(),
            checkpoint_every: DEFAULT_CHECKPOINT_EVERY,
            recent_ids: DEFAULT_RECENT_IDS,
            read_cache: DEFAULT_READ_CACHE,
            hook: None,
            io: Io::default(),
            codec: Codec::default(),
            event_version: batch::FIRST_SCHEMA,
            migrations: Vec::new(),
            #[cfg(feature = "encryption")]
            key: None,
            #[cfg(feature = "encryption")]
            subject_keys: None,
            _events: PhantomData,
        }
    }
}

impl<E> EventStoreBuilder<E> {
    /// When an append is durable; [`Durability::SyncEach`] by default. Whatever the
    /// mode, readers see an append only once it is as durable as the mode promises.
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// What to do about damage in the journal; [`Recovery::Strict`] by default.
    ///
    /// It applies to what opening reads: the journal from the last checkpoint on.
    /// Damage in what a checkpoint covers is not read at open: each read that
    /// reaches it fails with [`Error::JournalCorrupt`] naming the file and byte
    /// offset, and [`RawEventsBuilder::verify`] (the tool's `verify`) finds it
    /// beforehand.
    pub fn recovery(mut self, recovery: Recovery) -> Self {
        self.recovery = recovery;
        self
    }

    /// Saves a checkpoint of the index (in the background) once `appends` appends
    /// were journaled since the last one, so that opening replays at most about
    /// that many; 100,000 by default.
    pub fn checkpoint_every(mut self, appends: u64) -> Self {
        self.checkpoint_every = appends.max(1);
        self
    }

    /// How many of the most recent event ids the store keeps in memory (about 60
    /// bytes each) to recognise a retried append whose expectation names no version
    /// ([`Expected::Any`], [`Expected::StreamExists`]) and to refuse an id used
    /// twice; 100,000 by default. A retry with [`Expected::NoStream`] or
    /// [`Expected::Exact`] is recognised within that window too.
    pub fn recent_ids(mut self, ids: usize) -> Self {
        self.recent_ids = ids;
        self
    }

    /// How many bytes the store keeps in memory of what it read at random, to
    /// read it again without the files: half for the events of the streams read
    /// (parsed), half for batches (backward reads of `$all`, the batches just
    /// committed that subscriptions read); 64 MiB by default, 0 for none. Reads
    /// going forward through `$all` neither use nor fill it much: they read the
    /// files in large chunks.
    pub fn read_cache(mut self, bytes: u64) -> Self {
        self.read_cache = bytes;
        self
    }

    /// How new events' data is encoded: [`Codec::Postcard`] by default,
    /// `Codec::Json` (feature `json`) for a store whose events other tools read
    /// (with the `instastate` tool, or from the journal's frames). Each event
    /// records its codec: a store written with one reads back with the other set.
    pub fn codec(mut self, codec: Codec) -> Self {
        self.codec = codec;
        self
    }

    /// The schema version of the event type, which new events are written with;
    /// 1 by default. Bump it when `E` changes in a way that older events no longer
    /// decode as (a field added, a variant's fields changed), and register a
    /// migration ([`migrate_event`](Self::migrate_event)) from the older version.
    pub fn event_version(mut self, version: u32) -> Self {
        self.event_version = version;
        self
    }

    /// Reads the events written with version `from` of the event type, whose type
    /// was then `Old`, through `migrate` (an upcaster), on every read and
    /// subscription; it replaces a migration from the same version given before.
    /// The journal's record of `Old`'s structure must match `Old` (the names need
    /// not). An event of a version newer than the program's is
    /// [`Error::JournalSchema`]; one of an older version without a migration too.
    ///
    /// # Example
    /// ```
    /// use instastate::events::{EventStore, Expected};
    /// use serde::{Deserialize, Serialize};
    ///
    /// mod v1 {
    ///     #[derive(serde::Serialize, serde::Deserialize)]
    ///     pub enum Bank { Deposited { amount: i64 } }
    /// }
    /// #[derive(Debug, PartialEq, Serialize, Deserialize)]
    /// enum Bank { Deposited { amount: i64, memo: String } }
    ///
    /// # fn main() -> instastate::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let old = EventStore::<v1::Bank>::open(dir.path())?;
    /// old.append("a", Expected::Any, [v1::Bank::Deposited { amount: 5 }])?;
    /// drop(old);
    ///
    /// let events = EventStore::<Bank>::builder()
    ///     .event_version(2)
    ///     .migrate_event(1, |old: v1::Bank| match old {
    ///         v1::Bank::Deposited { amount } => Bank::Deposited { amount, memo: String::new() },
    ///     })
    ///     .open(dir.path())?;
    /// let first = events.event("a", 0)?.expect("an event");
    /// assert_eq!(first.data, Bank::Deposited { amount: 5, memo: String::new() });
    /// # Ok(())
    /// # }
    /// ```
    pub fn migrate_event<Old>(mut self, from: u32, migrate: fn(Old) -> E) -> Self
    where
        Old: DeserializeOwned + 'static,
        E: 'static,
    {
        self.migrations.retain(|it| it.version() != from);
        self.migrations.push(Box::new(crate::Migration::new(from, migrate)));
        self
    }

    /// Where the errors of background work go: checkpoints, and the timer of
    /// [`Durability::Periodic`]. By default they are printed to standard error.
    pub fn on_background_error(mut self, hook: impl Fn(&Error) + Send + Sync + 'static) -> Self {
        self.hook = Some(Arc::new(hook));
        self
    }

    /// Encrypts the journal and checkpoints with `key` (XChaCha20-Poly1305, as
    /// [`StoreBuilder::encryption_key`](crate::StoreBuilder::encryption_key)).
    ///
    /// In a database, each event's data is sealed with it, for its store and its
    /// id; its stream, type, tags, triggers and metadata stay in the clear, for
    /// the database to index and check them (and so do the subjects' keys, which
    /// only [`Sealed`] values use). The store then opens only with its key.
    #[cfg(feature = "encryption")]
    pub fn encryption_key(mut self, key: crate::EncryptionKey) -> Self {
        self.key = Some(key);
        self
    }

    /// Keeps the keys of the subjects whose data is [`Sealed`] in file `path`,
    /// instead of `subject-keys` in the store's directory: on a volume of its own,
    /// or the live store's key file when opening a backup (which holds no key).
    #[cfg(feature = "encryption")]
    pub fn subject_keys(mut self, path: impl Into<PathBuf>) -> Self {
        self.subject_keys = Some(path.into());
        self
    }

    /// Runs the journal's file operations through `io` (a simulator, in tests).
    #[cfg(test)]
    pub(crate) fn io(mut self, io: Io) -> Self {
        self.io = io;
        self
    }

    #[cfg(feature = "encryption")]
    fn sealer(&self) -> Sealer {
        Sealer::new(self.key.as_ref())
    }

    #[cfg(not(feature = "encryption"))]
    #[allow(clippy::unused_self)] // With the feature, the key is in `self`.
    fn sealer(&self) -> Sealer {
        Sealer::default()
    }

    /// Opens (or creates) the event store in directory `dir`: loads the newest
    /// checkpoint of its index and replays the journal after it. With the
    /// `postgres` feature, `dir` may be a `postgres://` location: the store is then
    /// the location's namespace of that database (durability, recovery, checkpoint
    /// and cache settings do not apply there: every append is a commit).
    ///
    /// # Errors
    /// [`Error::Locked`] when the directory is open elsewhere;
    /// [`Error::WrongDirectory`] when it holds something else; [`Error::JournalType`]
    /// when it was written for another event type (or one whose structure changed);
    /// [`Error::JournalSchema`] for a newer version of it;
    /// [`Error::JournalCorrupt`] for damage other than a torn last write;
    /// [`Error::Io`] for the file system's errors. In a database:
    /// [`Error::InvalidLocation`], [`Error::Database`], [`Error::DatabaseSchema`],
    /// [`Error::Encryption`] and [`Error::WrongKey`] as for files, and
    /// [`Error::Unsupported`] for a subject keys' file.
    pub fn open(self, dir: impl AsRef<Path>) -> Result<EventStore<E>>
    where
        E: Serialize + DeserializeOwned,
    {
        let dir = dir.as_ref();
        #[cfg(feature = "postgres")]
        if let Some(location) = crate::location::database(dir)? {
            return self.open_database(location);
        }
        crate::location::refuse_database(dir, "an event store")?;
        let io = self.io.clone();
        let sealer = self.sealer();
        let lock = DirLock::acquire(&io, dir, Kind::Journal)?;
        #[cfg(feature = "encryption")]
        let closed_cleanly = lock.clean_end().is_some();
        let config = Config {
            dir: Some(dir.to_path_buf()),
            identity: identity::<E>(),
            durability: self.durability,
            recovery: self.recovery,
            sealer: sealer.clone(),
            io: io.clone(),
            access: Access::ReadWrite,
        };
        let recent = self.recent_ids;
        let migrations = self.migrations.iter().map(|it| &**it as &dyn crate::Migrate<E>);
        let versions = journal::Versions {
            event: self.event_version,
            older_states: Vec::new(),
            older_events: journal::Older::of(migrations),
        };
        let mut restore = |snapshot: journal::Restored<'_>| {
            let place =
                journal::Place { path: snapshot.path, what: &|| "the checkpoint".to_owned() };
            journal::decode_versioned::<Loaded>(snapshot.bytes, snapshot.schema, SCHEMA, [], place)
        };
        let opened = journal::open_versioned(
            config,
            &versions,
            Some(Hold::Exclusive(lock)),
            || Ok(Loaded::empty(recent)),
            &mut restore,
            &mut |loaded: &mut Loaded, event| loaded.replay(dir, recent, event).map(|()| None),
        )?;
        let mut loaded = opened.state;
        loaded.restore(dir, recent)?;
        let Loaded { mut index, frames, .. } = loaded;
        index.settle();
        #[cfg(feature = "encryption")]
        let keys = {
            let path = self.subject_keys.clone().unwrap_or_else(|| dir.join(SUBJECT_KEYS));
            let keys = seal::KeyRing::open(io.clone(), path, sealer.clone(), closed_cleanly)?;
            // A subject forgotten whose keys the file still holds: the program
            // stopped between the effect and the key file.
            let mut stale = false;
            for effect in index.effects.iter().filter(|it| it.forgotten > 0) {
                stale |= keys.forgotten(&effect.trigger, effect.forgotten);
            }
            // A torn end is written away now: once this session closes cleanly,
            // a short end is taken for damage.
            if stale || keys.torn() {
                keys.persist()?;
            }
            Arc::new(keys)
        };
        let checkpointed = index.journal_events();
        let hook: Hook =
            self.hook.unwrap_or_else(|| Arc::new(|err: &Error| eprintln!("instastate: {err}")));
        let journal = Arc::new(opened.journal);
        let timer_hook = Arc::clone(&hook);
        Journal::start_timer(&journal, move |err| timer_hook(err));
        let core = Core {
            dir: dir.to_path_buf(),
            journal,
            index: Arc::new(RwLock::new(index)),
            // Half of the read cache for frames, half for streams' events.
            locator: Locator::new(
                dir.to_path_buf(),
                io.clone(),
                sealer,
                frames,
                self.read_cache / 2,
            ),
            chunks: chunks::new(self.read_cache / 2),
            recovered: opened.recovered,
            checkpoint_every: self.checkpoint_every,
            checkpointed: AtomicU64::new(checkpointed),
            checkpointing: AtomicBool::new(false),
            hook,
            signal: Arc::default(),
            io,
            codec: self.codec,
            #[cfg(feature = "encryption")]
            keys,
        };
        let shared = Shared { engine: Engine::Files(Arc::new(core)), background: Mutex::new(None) };
        let schema =
            codec::EventSchema { version: self.event_version, migrations: self.migrations };
        Ok(EventStore { shared: Arc::new(shared), schema: Arc::new(schema), _events: PhantomData })
    }

    /// Opens the event store at `location`, in a PostgreSQL database.
    #[cfg(feature = "postgres")]
    fn open_database(self, location: crate::postgres::Location) -> Result<EventStore<E>>
    where
        E: Serialize + DeserializeOwned,
    {
        #[cfg(feature = "encryption")]
        if self.subject_keys.is_some() {
            return Err(Error::Unsupported {
                location: location.to_string(),
                operation: "keep its subject keys in a file".to_owned(),
                reason: "an event store on PostgreSQL keeps them in its database".to_owned(),
            });
        }
        let versions = {
            let migrations = self.migrations.iter().map(|it| &**it as &dyn crate::Migrate<E>);
            journal::Versions {
                event: self.event_version,
                older_states: Vec::new(),
                older_events: journal::Older::of(migrations),
            }
        };
        let sealer = self.sealer();
        let hook: Hook =
            self.hook.unwrap_or_else(|| Arc::new(|err: &Error| eprintln!("instastate: {err}")));
        let db = database::DbCore::open(
            location,
            &identity::<E>(),
            &versions,
            hook,
            self.codec,
            sealer,
        )?;
        drop(versions);
        let shared =
            Shared { engine: Engine::Database(Arc::new(db)), background: Mutex::new(None) };
        let schema =
            codec::EventSchema { version: self.event_version, migrations: self.migrations };
        Ok(EventStore { shared: Arc::new(shared), schema: Arc::new(schema), _events: PhantomData })
    }
}

/// What the journal records the store's files were written for: the index as
/// state, and the event type with its structure.
fn identity<E: DeserializeOwned>() -> Identity {
    Identity {
        state_type: "instastate::events::Index",
        event_type: crate::codec::stored_type_name(std::any::type_name::<E>()),
        schema: SCHEMA,
        state_shape: None,
        event_shape: Shape::of::<E>(),
    }
}

/// The index and frame table while the journal is read back: from a checkpoint,
/// or empty, and then the journal events after it.
#[derive(serde::Deserialize)]
#[serde(from = "Checkpoint")]
struct Loaded {
    /// A checkpoint read back, until the window of recent ids it is restored with
    /// is known.
    checkpoint: Option<Checkpoint>,
    index: Index,
    frames: Frames,
}

impl From<Checkpoint> for Loaded {
    fn from(checkpoint: Checkpoint) -> Loaded {
        Loaded { checkpoint: Some(checkpoint), index: Index::default(), frames: Frames::default() }
    }
}

impl Loaded {
    fn empty(recent: usize) -> Loaded {
        Loaded { checkpoint: None, index: Index::new(recent), frames: Frames::default() }
    }

    /// The index and frame table, restoring a checkpoint's with a window of the
    /// last `recent` ids.
    fn restore(&mut self, dir: &Path, recent: usize) -> Result<()> {
        if let Some(checkpoint) = self.checkpoint.take() {
            (self.index, self.frames) =
                Index::restore(checkpoint, recent).map_err(|reason| Error::JournalCorrupt {
                    path: dir.to_path_buf(),
                    offset: 0,
                    reason: format!("the checkpoint used does not hold together: {reason}"),
                })?;
        }
        Ok(())
    }

    /// Commits a replayed journal event.
    fn replay(&mut self, dir: &Path, recent: usize, event: Replayed<'_>) -> Result<()> {
        self.restore(dir, recent)?;
        let bad = |reason: String| Error::JournalCorrupt {
            path: dir.join(journal::format::journal_name(event.file)),
            offset: event.offset,
            reason: format!("event {}: {reason}", event.seq),
        };
        let index = &mut self.index;
        index.replay(event.seq, event.bytes).map_err(bad)?;
        index.last_at = event.at.as_micros();
        self.frames.record(event.file, event.seq, event.offset);
        Ok(())
    }
}

impl<E> EventStore<E> {
    /// Options for opening an event store; see [`EventStoreBuilder`].
    pub fn builder() -> EventStoreBuilder<E> {
        EventStoreBuilder::default()
    }
}

impl<E: Serialize + DeserializeOwned> EventStore<E> {
    /// Opens (or creates) the event store in directory `dir` with the default
    /// options; see [`EventStoreBuilder::open`].
    ///
    /// # Errors
    /// Those of [`EventStoreBuilder::open`].
    pub fn open(dir: impl AsRef<Path>) -> Result<EventStore<E>> {
        EventStoreBuilder::default().open(dir)
    }

    /// Appends `events` to `stream`, all or nothing, if the stream is as `expected`
    /// says; returns the versions and positions they got.
    ///
    /// Appending events whose ids are already in the stream where this append would
    /// put them returns the earlier result and writes nothing: a retry after a lost
    /// reply never duplicates (give the events their ids with [`NewEvent::with_id`]
    /// before the first try).
    ///
    /// # Errors
    /// [`Error::WrongExpectedVersion`] when the stream is not as expected (nothing is
    /// written); [`Error::InvalidStreamId`] for an id the store does not accept;
    /// [`Error::DuplicateEventId`] for an id already used elsewhere;
    /// [`Error::EventEncode`] when an event cannot be encoded; [`Error::JournalWrite`]
    /// when the journal cannot be written (the store then refuses later appends,
    /// [`Error::Poisoned`]).
    pub fn append(
        &self,
        stream: &str,
        expected: Expected,
        events: impl IntoIterator<Item = impl Into<NewEvent<E>>>,
    ) -> Result<Appended> {
        let appended = self.append_all([Append::new(stream, expected, events)])?;
        appended.into_iter().next().ok_or_else(|| Error::InvalidAppend {
            reason: "the append returned no result".to_owned(),
        })
    }

    /// Appends to several streams at once, all or nothing: each with its own
    /// expectation, in one journal event. Returns what each stream got, in order.
    ///
    /// # Errors
    /// Those of [`append`](Self::append), for any of the streams (nothing is written
    /// for any), and [`Error::InvalidAppend`] when a stream comes twice.
    pub fn append_all(
        &self,
        appends: impl IntoIterator<Item = Append<E>>,
    ) -> Result<Vec<Appended>> {
        self.append_checked(appends, None)
    }

    /// Appends to one or more streams, all or nothing, if `condition` holds: no
    /// event carrying one of its tags was appended at or after its base, except
    /// those it lists as resolved (coherence's rebase). Each stream's expectation
    /// is checked too.
    ///
    /// # Example
    /// ```
    /// use instastate::events::{Append, Condition, EventStore, Expected, NewEvent};
    ///
    /// # fn main() -> instastate::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let events = EventStore::<String>::open(dir.path())?;
    /// let base = events.head()?; // Alice and Bob both read the store here.
    /// let edit = |text: &str| NewEvent::new(text.to_owned()).tagged(["book:Neuromancer"]);
    ///
    /// let alice = [Append::new("alice", Expected::Any, [edit("genre: SciFi")])];
    /// events.append_if(&Condition::since(base), alice)?;
    ///
    /// let bob = || [Append::new("bob", Expected::Any, [edit("genre: Cyberpunk")])];
    /// let refused = events.append_if(&Condition::since(base), bob());
    /// let Err(instastate::Error::Conflict { theirs, .. }) = refused else { panic!() };
    /// assert_eq!(theirs.stream, "alice");
    ///
    /// // Bob reads Alice's change, resolves it, and tries again.
    /// let resolved = Condition::since(base).resolved([theirs.position]);
    /// events.append_if(&resolved, bob())?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`Error::Conflict`] when the condition does not hold, naming the first of
    /// the appended events that conflicts and the first event it conflicts with;
    /// otherwise those of [`append_all`](Self::append_all). Nothing is written.
    pub fn append_if(
        &self,
        condition: &Condition,
        appends: impl IntoIterator<Item = Append<E>>,
    ) -> Result<Vec<Appended>> {
        self.append_checked(appends, Some(condition))
    }

    /// Answers what [`append_if`](Self::append_if) would do now, writing nothing
    /// (a dry run): the versions and positions the events would get, or the error
    /// the append would be refused with. Another append may of course come
    /// between this answer and a real append.
    ///
    /// # Errors
    /// Those of [`append_if`](Self::append_if).
    pub fn check_append_if(
        &self,
        condition: &Condition,
        appends: impl IntoIterator<Item = Append<E>>,
    ) -> Result<Vec<Appended>> {
        let requests = appends
            .into_iter()
            .map(|append| self.encode(&append, true))
            .collect::<Result<Vec<_>>>()?;
        append::check_requests(&requests)?;
        match &self.shared.engine {
            Engine::Files(core) => append::dry_run(&core.index.read(), &requests, Some(condition)),
            #[cfg(feature = "postgres")]
            Engine::Database(db) => db.engine.dry_run(requests, Some(condition.clone())),
        }
    }

    #[cfg_attr(not(feature = "postgres"), allow(clippy::infallible_destructuring_match))]
    fn append_checked(
        &self,
        appends: impl IntoIterator<Item = Append<E>>,
        condition: Option<&Condition>,
    ) -> Result<Vec<Appended>> {
        let appends: Vec<Append<E>> = appends.into_iter().collect();
        let encode_all = || -> Result<Vec<Request>> {
            let requests = appends
                .iter()
                .map(|append| self.encode(append, false))
                .collect::<Result<Vec<_>>>()?;
            append::check_requests(&requests)?;
            Ok(requests)
        };
        let core = match &self.shared.engine {
            Engine::Files(core) => core,
            #[cfg(feature = "postgres")]
            Engine::Database(db) => return db.append(encode_all, condition),
        };
        // Sealed again under the journal's lock when a key went meanwhile.
        #[cfg_attr(not(feature = "encryption"), allow(unused_mut))]
        let mut requests = encode_all()?;
        let index = Arc::clone(&core.index);
        let done = core.journal.commit_with(|_, _| {
            // A subject forgotten between the encoding and the journal's lock left
            // events sealed with a key that is gone: they are sealed again, under
            // the lock (which a forget takes too), with the subject's new key.
            #[cfg(feature = "encryption")]
            {
                let mut sealed =
                    requests.iter().flat_map(|it| &it.events).flat_map(|it| &it.sealed_with);
                if sealed.any(|(subject, generation)| {
                    core.keys.live_generation(subject) != Some(*generation)
                }) {
                    requests = encode_all()?;
                }
            }
            let mut guard = index.write();
            match append::plan(&mut guard, &requests, condition)? {
                Plan::Write { bytes, commit } => {
                    drop(guard);
                    // A small batch is kept for the subscriptions that read it next.
                    let cache = core.locator.cache().filter(|_| bytes.len() <= REMEMBERED_BATCH);
                    let remembered = cache.map(|cache| (cache, bytes.clone()));
                    let job = CommitJob {
                        index: Arc::clone(&index),
                        signal: Arc::clone(&core.signal),
                        remembered,
                        commit,
                    };
                    Ok(journal::Prepared::Event(bytes, job))
                }
                Plan::Done(appended) => Ok(journal::Prepared::Done(appended)),
            }
        })?;
        self.maybe_checkpoint();
        Ok(done)
    }

    /// Reads stream `stream`, forward from its first event unless the returned
    /// [`ReadStream`] is told otherwise. Iterating it yields each event, or the
    /// error that stopped the read; a stream that does not exist yields nothing,
    /// and an id no stream can have yields [`Error::InvalidStreamId`] (as
    /// [`append`](Self::append) refuses it). Only the stream's own events are
    /// read.
    pub fn read_stream(&self, stream: &str) -> ReadStream<'_, E> {
        ReadStream::new(self, stream)
    }

    /// Subscribes to every event (`$all`), or to those of some streams and types:
    /// from a position, every event up to the head, then
    /// [`Delivery::CaughtUp`], then each new event as it commits.
    pub fn subscribe_all(&self) -> SubscribeAll<'_, E> {
        SubscribeAll::new(self)
    }

    /// Subscribes to stream `stream` (which need not exist yet), as
    /// [`subscribe_all`](Self::subscribe_all) does to every stream.
    pub fn subscribe_stream(&self, stream: &str) -> SubscribeStream<'_, E> {
        SubscribeStream::new(self, stream)
    }

    /// Reads every event of the store in position order (`$all`), forward from the
    /// first unless the returned [`ReadAll`] is told otherwise.
    pub fn read_all(&self) -> ReadAll<'_, E> {
        ReadAll::new(self)
    }

    /// The event at `position`, if the store holds one there.
    ///
    /// # Errors
    /// [`Error::JournalCorrupt`] when its bytes are damaged; [`Error::JournalDecode`]
    /// when they do not decode as an `E`.
    pub fn event_at(&self, position: Position) -> Result<Option<RecordedEvent<E>>> {
        // Only this position: a removed event reads as none, without a read on.
        let read = self.read_all().from(position).until(position.get().saturating_add(1));
        read.into_iter().next().transpose()
    }

    /// Event `version` of stream `stream`, if the stream holds it.
    ///
    /// # Errors
    /// As [`event_at`](Self::event_at).
    pub fn event(&self, stream: &str, version: u64) -> Result<Option<RecordedEvent<E>>> {
        let read = self.read_stream(stream).from(version).until(version.saturating_add(1));
        let found = read.limit(1).into_iter().next().transpose()?;
        Ok(found.filter(|event| event.version == version))
    }

    /// The version of the last event of stream `stream`, or `None` when it has
    /// none (or was deleted).
    ///
    /// # Errors
    /// [`Error::InvalidStreamId`] for an id no stream can have; in a database,
    /// [`Error::Database`] when it cannot be read.
    #[cfg_attr(not(feature = "postgres"), allow(clippy::infallible_destructuring_match))]
    pub fn stream_version(&self, stream: &str) -> Result<Option<u64>> {
        stream_id::check(stream)?;
        let core = match &self.shared.engine {
            Engine::Files(core) => core,
            #[cfg(feature = "postgres")]
            Engine::Database(db) => return db.engine.stream_version(stream),
        };
        let index = core.index.read();
        let Some(stream) = index.stream(stream).and_then(|idx| index.get(idx)) else {
            return Ok(None);
        };
        let deleted = stream.life.deleted || stream.life.tombstoned;
        Ok((stream.seqs.len() as u64).checked_sub(1).filter(|_| !deleted))
    }

    /// The position the next event appended will have: how many events the store
    /// holds.
    ///
    /// # Errors
    /// As [`stream_version`](Self::stream_version).
    pub fn head(&self) -> Result<Position> {
        self.shared.head()
    }

    /// The streams the store holds, with their last version, in the order of
    /// their first events (rules set on a stream before it has any do not count);
    /// deleted ones are left out.
    ///
    /// # Errors
    /// In files, [`Error::JournalCorrupt`] when the index and the journal do not
    /// say where a stream begins, or [`Error::Io`] when a journal file cannot be
    /// read; in a database, as [`stream_version`](Self::stream_version).
    #[cfg_attr(not(feature = "postgres"), allow(clippy::infallible_destructuring_match))]
    pub fn streams(&self) -> Result<Vec<(String, u64)>> {
        let core = match &self.shared.engine {
            Engine::Files(core) => core,
            #[cfg(feature = "postgres")]
            Engine::Database(db) => return db.engine.streams(),
        };
        let index = core.index.read();
        // A stream is created by its first event, not by rules set on it before:
        // listed by where its first event is, as in a database.
        let mut listed = Vec::new();
        for stream in &index.streams {
            let Some(&seq) = stream.seqs.first() else { continue };
            if stream.life.deleted || stream.life.tombstoned {
                continue;
            }
            // Every journal event has its first position in the index.
            let first = index.start_of(seq).ok_or_else(|| Error::JournalCorrupt {
                path: core.dir.clone(),
                offset: 0,
                reason: format!(
                    "the index holds no journal event {seq}, where stream `{}` begins",
                    stream.name
                ),
            })?;
            listed.push((first, seq, stream.name.clone(), stream.seqs.len() as u64 - 1));
        }
        drop(index);
        listed.sort_by_key(|(first, seq, ..)| (*first, *seq));
        // Streams that one append began: in the order of their parts in it (the
        // index may have known one of them before, by its rules).
        for begun in listed.chunk_by_mut(|a, b| a.1 == b.1).filter(|it| 1 < it.len()) {
            let Some(&(_, seq, ..)) = begun.first() else { continue };
            let places = read::first_events_in(core, seq)?;
            if let Some((_, _, name, _)) = begun.iter().find(|it| !places.contains_key(&it.2)) {
                let reason = format!(
                    "it holds no first event of stream `{name}`, which the index says begins there"
                );
                return Err(core.locator.corrupt_at(None, seq, reason));
            }
            begun.sort_by_key(|it| places.get(&it.2).copied());
        }
        Ok(listed.into_iter().map(|(_, _, name, last)| (name, last)).collect())
    }

    /// What opening found: the checkpoint used, the journal events replayed, a torn
    /// write cut off (in a database, nothing: it holds whole transactions).
    #[must_use]
    pub fn recovered(&self) -> &Recovered {
        match &self.shared.engine {
            Engine::Files(core) => &core.recovered,
            #[cfg(feature = "postgres")]
            Engine::Database(db) => &db.recovered,
        }
    }

    /// The store's directory (in a database, its location without the password).
    #[must_use]
    pub fn path(&self) -> &Path {
        self.shared.label()
    }

    /// Makes every append so far durable, whatever the [`Durability`] (in a
    /// database, every append is committed before it returns: nothing to do).
    ///
    /// # Errors
    /// [`Error::JournalWrite`] when writing fails; [`Error::Poisoned`] after an
    /// earlier failure.
    pub fn sync(&self) -> Result<()> {
        match &self.shared.engine {
            Engine::Files(core) => core.journal.sync(),
            #[cfg(feature = "postgres")]
            Engine::Database(_) => Ok(()),
        }
    }

    /// Writes a copy of the store, as of this call, to the new directory `path`,
    /// while appends go on: the journal files and checkpoints, durable when this
    /// returns. The subject keys are left out: a backup holds sealed data that only
    /// the live key file opens (`EventStoreBuilder::subject_keys`, with the `encryption` feature), so that
    /// forgetting a subject also shreds its data in every backup.
    ///
    /// # Errors
    /// [`Error::Io`] when `path` exists and is not an empty directory, or when
    /// reading or writing fails; [`Error::JournalWrite`] when the journal cannot be
    /// synced first; [`Error::InvalidLocation`] when `path` is a `postgres://` URL.
    pub fn backup_to(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        crate::location::refuse_database(path, "a backup")?;
        let core = self.shared.files("back up (the database's own backups hold it)")?;
        let io = &core.io;
        // Everything acknowledged so far is in the files.
        self.sync()?;
        if path.exists() {
            let empty = io.read_dir(path).map_err(Error::io(path))?.is_empty();
            if !empty {
                let source = std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "not an empty directory",
                );
                return Err(Error::Io { path: path.to_path_buf(), source });
            }
        }
        let parent = crate::io::parent_of(path);
        io.create_dir_durably(parent).map_err(Error::io(parent))?;
        // Built beside `path` and renamed into place when complete, so that a crash
        // never leaves a partial backup that opens as a store.
        let temp = tempfile::Builder::new()
            .prefix(".instastate-backup-")
            .tempdir_in(parent)
            .map_err(Error::io(parent))?;
        let entries = io.read_dir(&core.dir).map_err(Error::io(&core.dir))?;
        for entry in entries {
            let Some(name) = entry.name.to_str() else { continue };
            let wanted =
                |prefix: &str, suffix: &str| name.starts_with(prefix) && name.ends_with(suffix);
            if !wanted("journal-", ".log") && !wanted("snapshot-", ".snap") {
                continue;
            }
            let from = core.dir.join(name);
            match io.copy_durably(&from, &temp.path().join(name)) {
                Ok(()) => {}
                // A checkpoint that a newer one replaced meanwhile: the newer one
                // covers it, or the journal does.
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(Error::Io { path: from, source }),
            }
        }
        io.sync_dir(temp.path()).map_err(Error::io(temp.path()))?;
        let built = temp.keep();
        io.rename(&built, path).map_err(Error::io(path))?;
        io.sync_dir(parent).map_err(Error::io(parent))
    }

    /// Saves a checkpoint of the index now: opening then replays only the appends
    /// after it (in a database, there is no index to save: nothing to do). A
    /// checkpoint that was being saved in the background finishes first: none is
    /// still being written when this returns (unless an append starts one).
    ///
    /// # Errors
    /// [`Error::Io`] or [`Error::JournalWrite`] when writing it fails.
    pub fn checkpoint(&self) -> Result<()> {
        match &self.shared.engine {
            Engine::Files(core) => {
                let running = self.shared.background.lock().take();
                if let Some(thread) = running {
                    // Its error went to the hook.
                    let _ = thread.join();
                }
                core.checkpoint()
            }
            #[cfg(feature = "postgres")]
            Engine::Database(_) => Ok(()),
        }
    }

    /// Closes this handle; the store closes (syncing everything appended) when its
    /// last handle is gone.
    ///
    /// # Errors
    /// Those of [`sync`](Self::sync), when this was the last handle.
    pub fn close(self) -> Result<()> {
        let Ok(mut shared) = Arc::try_unwrap(self.shared) else { return Ok(()) };
        if let Some(thread) = shared.background.get_mut().take() {
            let _ = thread.join();
        }
        #[allow(irrefutable_let_patterns)] // Without the `postgres` feature.
        let Engine::Files(core) = &shared.engine else { return Ok(()) };
        let core = Arc::clone(core);
        drop(shared);
        // Closed here, its error returned; the drop that follows finds it closed.
        match Arc::try_unwrap(core) {
            Ok(core) => core.close(),
            Err(_) => Ok(()),
        }
    }

    /// Encodes the events of `append`.
    /// Encodes the events of `append`; a `dry` run makes no subject key.
    fn encode(&self, append: &Append<E>, dry: bool) -> Result<Request> {
        let Append { stream, expected, events } = append;
        let events = events
            .iter()
            .map(|event| {
                let codec = self.shared.codec();
                let encode = || codec.encode(&event.data, self.shared.label());
                let (data, sealed_with) = match &self.shared.engine {
                    #[cfg(feature = "encryption")]
                    Engine::Files(core) => seal::sealing(&core.keys, dry, encode)?,
                    #[cfg(not(feature = "encryption"))]
                    Engine::Files(_) => (encode()?, Vec::new()),
                    #[cfg(all(feature = "postgres", feature = "encryption"))]
                    Engine::Database(db) => {
                        let (data, sealed_with) = seal::sealing(&db.keys, dry, encode)?;
                        (db.seal_data(event.id, data), sealed_with)
                    }
                    #[cfg(all(feature = "postgres", not(feature = "encryption")))]
                    Engine::Database(db) => (db.seal_data(event.id, encode()?), Vec::new()),
                };
                #[cfg(not(feature = "encryption"))]
                let _ = dry;
                let mut triggers = event.triggers.clone();
                for (subject, _) in &sealed_with {
                    if !triggers.contains(subject) {
                        triggers.push(subject.clone());
                    }
                }
                let event_type = serde_variant::to_variant_name(&event.data)
                    .map_or_else(|_| std::any::type_name::<E>().to_owned(), str::to_owned);
                Ok(Encoded {
                    id: event.id,
                    event_type,
                    causation: event.metadata.causation,
                    correlation: event.metadata.correlation,
                    tags: event.tags.clone(),
                    triggers,
                    json: codec.is_json(),
                    schema: self.schema.version,
                    sealed_with,
                    data,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Request { stream: stream.clone(), expected: *expected, events })
    }

    /// Starts a checkpoint in the background when enough appends came since the last.
    fn maybe_checkpoint(&self) {
        #[allow(irrefutable_let_patterns)] // Without the `postgres` feature.
        let Engine::Files(core) = &self.shared.engine else { return };
        let events = core.index.read().journal_events();
        let due = core.checkpointed.load(Ordering::Relaxed).saturating_add(core.checkpoint_every)
            <= events;
        if !due || core.checkpointing.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut background = self.shared.background.lock();
        if let Some(done) = background.take() {
            // It finished: `checkpointing` was clear.
            let _ = done.join();
        }
        let spawned = thread::Builder::new().name("instastate-checkpoint".to_owned()).spawn({
            let core = Arc::clone(core);
            move || {
                // Cleared whatever happens, a panicking hook included.
                let _clear = Clear(&core.checkpointing);
                if let Err(err) = core.checkpoint() {
                    (core.hook)(&err);
                }
            }
        });
        match spawned {
            Ok(thread) => *background = Some(thread),
            Err(source) => {
                core.checkpointing.store(false, Ordering::Release);
                (core.hook)(&Error::Io { path: core.dir.clone(), source });
            }
        }
    }
}

impl Core {
    fn checkpoint(&self) -> Result<()> {
        let (body, events, at) = {
            let index = self.index.read();
            let events = index.journal_events();
            let frames = self.locator.frames.lock().below(events);
            let checkpoint = index.checkpoint(&frames);
            let body = journal::encode(&checkpoint, || self.dir.clone())?;
            (body, events, index.last_at)
        };
        // The checkpoint holds only the index: the events it covers must be in the
        // journal first. In the buffered modes they may still be in its buffer. (Not
        // under the index's lock: the journal's leader holds its own lock while the
        // commit jobs wait for the index.)
        self.journal.sync()?;
        self.journal.snapshot(body, events, at, KEEP_CHECKPOINTS, Files::Keep)?;
        self.checkpointed.fetch_max(events, Ordering::Relaxed);
        Ok(())
    }

    /// Writes out what a buffered mode holds, so that a reader finds it in the file.
    fn write_out(&self) -> Result<()> {
        self.journal.write_out()
    }

    /// Decodes the data of an event, `what` naming it on failure: its
    /// [`Sealed`] values open with the subject keys.
    /// `json` and `stored` say how it was written (JSON or postcard, and the
    /// schema version of its type).
    fn decode_data<E: DeserializeOwned>(
        &self,
        schema: &codec::EventSchema<E>,
        (json, stored): (bool, u32),
        data: &[u8],
        what: impl Fn() -> String,
    ) -> Result<E> {
        let decode = || {
            codec::decode_event(
                json,
                stored,
                schema.version,
                &schema.migrations,
                data,
                &self.dir,
                &what,
            )
        };
        #[cfg(feature = "encryption")]
        return seal::opening(&self.keys, decode);
        #[cfg(not(feature = "encryption"))]
        decode()
    }
}

/// Commits a durable batch to the index, and wakes the subscriptions.
struct CommitJob {
    index: Arc<RwLock<Index>>,
    signal: Arc<Signal>,
    /// The cache to keep the batch in, and its bytes.
    remembered: Option<(Arc<FrameCache>, Vec<u8>)>,
    commit: Commit,
}

impl Job for CommitJob {
    type Output = Vec<Appended>;

    fn run(self, seq: u64, at: Timestamp) -> (Vec<Appended>, Option<u64>) {
        let CommitJob { index, signal, remembered, commit } = self;
        // In the cache before the index says it is there: a reader finds it.
        if let Some((cache, bytes)) = remembered {
            locate::remember(&cache, seq, at.as_micros(), bytes);
        }
        {
            let mut index = index.write();
            let res = index.commit_planned(seq, commit.first_position, &commit.parts);
            // The batch was planned against this index under the journal's lock, in
            // journal order: it follows what the index holds. A failure is a bug;
            // the panic voids the batch and stops the store, as for any job that
            // fails.
            #[allow(clippy::expect_used)]
            res.expect("a planned batch commits");
            index.last_at = at.as_micros();
        }
        signal.committed();
        (commit.appended, None)
    }
}
