//! Prevalence: a whole system state in memory, changed only by events that are
//! journaled before they are applied (Prevayler's model).
//!
//! [`Prevayler`] keeps one state `S` and a journal of events `E` in a directory.
//! [`handle`](Prevayler::handle) gives the event a number and a [`Timestamp`],
//! writes it to the journal, makes it durable (per [`Durability`]), and only then
//! runs the system function `fn(&mut S, E, Timestamp) -> R` and returns its result.
//! Opening the directory again loads the newest sound snapshot and replays the
//! journal after it, giving exactly the state of every acknowledged event.
//!
//! ```
//! use std::collections::BTreeMap;
//! use instastate::{Prevayler, Timestamp};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Default, Serialize, Deserialize)]
//! struct Bank { balances: BTreeMap<String, i64> }
//!
//! #[derive(Serialize, Deserialize)]
//! enum Command { Deposit { who: String, amount: i64 } }
//!
//! fn apply(bank: &mut Bank, command: Command, _at: Timestamp) -> Result<i64, String> {
//!     match command {
//!         Command::Deposit { amount, .. } if amount <= 0 => Err(format!("cannot deposit {amount}")),
//!         Command::Deposit { who, amount } => {
//!             let balance = bank.balances.entry(who).or_default();
//!             *balance += amount;
//!             Ok(*balance)
//!         }
//!     }
//! }
//!
//! # fn main() -> instastate::Result<()> {
//! # let dir = tempfile::tempdir().unwrap();
//! let bank = Prevayler::open(dir.path(), Bank::default(), apply)?;
//! let balance = bank.handle(Command::Deposit { who: "alice".into(), amount: 100 })?;
//! assert_eq!(balance, Ok(100));
//! let total: i64 = bank.read(|bank| bank.balances.values().sum());
//! assert_eq!(total, 100);
//! bank.snapshot()?;
//! # Ok(())
//! # }
//! ```
//!
//! # Semantics
//!
//! - **Journal first.** An event is written to the journal before the system
//!   function sees it, and in the default [`Durability::SyncEach`] (and
//!   [`Durability::GroupCommit`]) it is `fdatasync`ed first too: no caller ever
//!   receives a result for an event that is not durable.
//! - **Rejected events.** The system function returns any `R`, often a `Result`.
//!   An event it rejects is still in the journal (it was written before the function
//!   ran) and is rejected again on replay, which runs the same function on the same
//!   state with the same timestamp. So a function must **decide before it changes
//!   anything**: whatever it changed before returning an error is changed again on
//!   replay (consistently, but probably not what was meant). Unlike prevayler-clj,
//!   which applies first and journals only events that succeed, this never lets
//!   memory run ahead of the journal.
//! - **Determinism.** Replay must reproduce the state: the function may use only the
//!   state, the event and the timestamp (no clock, no randomness, no I/O, no
//!   iteration order of a `HashMap` with a random seed). [`PrevaylerBuilder::replay_check`]
//!   checks this.
//! - **Failures.** If writing the journal fails, the events of that write are not
//!   applied, their callers get [`Error::JournalWrite`], and every later call gets
//!   [`Error::Poisoned`]: in the durable modes the state never holds an event the
//!   journal might not. (The failed write may still have reached the disk; reopening
//!   shows whether it did.) In [`Durability::Periodic`] and [`Durability::Unsynced`]
//!   events are applied before they are written, so a failed write or a crash loses
//!   the buffered ones. Reopen the directory to go on.
//! - **Panics.** If the system function panics, the panic reaches the caller of
//!   `handle`, the event (and any written after it but not applied) is voided in the
//!   journal, and later calls get [`Error::Poisoned`]; so do snapshots, which never
//!   write a half-changed state. Reopening gives the state without the voided events.
//!   If the process dies before the void is written (or is built with
//!   `panic = "abort"`), replay panics on that event ([`Error::ReplayPanicked`]);
//!   [`Recovery::Salvage`] then skips it, replays again without it and voids it.
//! - **Snapshots** ([`Prevayler::snapshot`], or automatically by
//!   [`PrevaylerBuilder::snapshot_every`] and [`PrevaylerBuilder::snapshot_every_bytes`])
//!   hold `handle` back only while the state is encoded in memory (under a read
//!   lock, so `read` goes on). The file is written to a temporary name, fsynced and
//!   renamed, and only after that are older snapshots and the journal files they
//!   alone needed deleted. [`PrevaylerBuilder::keep_snapshots`] (default 2) sets how
//!   many are kept; the journal is kept back to the oldest, so a damaged newest
//!   snapshot falls back to the one before it.
//! - **The journal** is a series of files of checksummed frames. A torn last write
//!   (a crash mid-append) is cut off on open and reported in [`Prevayler::recovered`];
//!   damage anywhere else is [`Error::JournalCorrupt`] naming the file and byte
//!   offset, and nothing is changed unless [`Recovery::Salvage`] is asked for.
//! - **Exclusive.** The directory is locked while open; a second open, in this
//!   process or another, fails with [`Error::Locked`].
//! - **Types.** The journal and snapshots record the state's and event's type names,
//!   their structure and a schema version of each (1 unless set); opening with other
//!   types fails with [`Error::JournalType`] and changes nothing. See below for how
//!   the types change.
//!
//! # Schema versions
//!
//! postcard, the encoding of events and snapshots, is compact and not
//! self-describing: an event type that gains a field cannot read the events
//! journaled before, and opening refuses them ([`Error::JournalType`] names the
//! change). To change a type, keep the old one, bump the type's schema version and
//! register a migration (an *upcaster*) from the old version to the current type:
//!
//! ```
//! use instastate::{Prevayler, Timestamp};
//! use serde::{Deserialize, Serialize};
//!
//! mod v1 {
//!     #[derive(serde::Serialize, serde::Deserialize)]
//!     pub enum Command { Deposit { amount: i64 } }
//! }
//!
//! #[derive(Serialize, Deserialize)]
//! enum Command { Deposit { amount: i64, memo: String } }
//!
//! impl From<v1::Command> for Command {
//!     fn from(old: v1::Command) -> Command {
//!         match old {
//!             v1::Command::Deposit { amount } => Command::Deposit { amount, memo: String::new() },
//!         }
//!     }
//! }
//!
//! fn apply(total: &mut i64, command: Command, _: Timestamp) {
//!     let Command::Deposit { amount, .. } = command;
//!     *total += amount;
//! }
//!
//! # fn main() -> instastate::Result<()> {
//! # let dir = tempfile::tempdir().unwrap();
//! // Version 1 of the program journaled `v1::Command`s:
//! # {
//! #     let v1 = Prevayler::open(dir.path(), 0i64, |total: &mut i64, command: v1::Command, _| {
//! #         let v1::Command::Deposit { amount } = command;
//! #         *total += amount;
//! #     })?;
//! #     v1.handle(v1::Command::Deposit { amount: 5 })?;
//! # }
//! let bank = Prevayler::builder()
//!     .event_version(2)
//!     .migrate_event(1, |old: v1::Command| Command::from(old))
//!     .open(dir.path(), 0i64, apply)?;
//! assert_eq!(bank.read(|total| *total), 5); // replayed through the migration
//! bank.handle(Command::Deposit { amount: 2, memo: "tip".into() })?; // journaled as v2
//! # Ok(())
//! # }
//! ```
//!
//! - Each journal file and snapshot records the versions it was written with, and is
//!   read with them: as the current type, or as the old type of the migration from
//!   its version, migrated. New files are written with the current versions (after
//!   an upgrade, the journal goes on in a new file), so a directory may hold files
//!   of several versions until a snapshot retires the old ones.
//! - A migration goes straight from its version to the current type; chain the
//!   steps in the function if there were several. Like the system function, it must
//!   be deterministic: replay runs it again on every opening.
//! - A file of an older version is checked against the structure of its migration's
//!   old type, so an old type that changed is refused as well
//!   ([`Error::JournalType`]). A file of a newer version than the program's, or of an
//!   older one without a migration, is [`Error::JournalSchema`]; a migration that
//!   panics is [`Error::MigrationPanicked`]. Either way nothing is changed.
//! - The state is versioned the same way: [`PrevaylerBuilder::state_version`] and
//!   [`PrevaylerBuilder::migrate_state`] read snapshots of older versions.
//! - Journaled cells use their cell's [`version`](crate::CellOptions::version) and
//!   [`migrations`](crate::CellOptions::migrations) for their snapshots, and
//!   [`Prevalent::EVENT_VERSION`] and [`Prevalent::EVENT_MIGRATIONS`] for their events.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
};

use parking_lot::{Mutex, RwLock};
use serde::{Serialize, de::DeserializeOwned};

use crate::{
    Error, Migrate, Migration, Result,
    crypt::Sealer,
    io::Io,
    journal::{
        self, Config, Files, Identity, Job, Journal, Older, Place, Replayed, Restored, Taint,
        Versions,
    },
    lockfile::{Access, DirLock, Hold, Kind},
    shape::Shape,
};
pub use crate::{
    journal::{Durability, JournalReport, Recovered, Recovery, Timestamp},
    journaled::Prevalent,
};

#[cfg(feature = "postgres")]
mod follower;

#[cfg(feature = "postgres")]
pub use self::follower::{Follower, Lag};

/// The schema version of the state and events unless the builder sets another.
const SCHEMA: u32 = 1;
/// Snapshots kept unless [`PrevaylerBuilder::keep_snapshots`] says otherwise.
const DEFAULT_KEEP: usize = 2;

type SystemFn<S, E, R> = dyn Fn(&mut S, E, Timestamp) -> R + Send + Sync;
type Hook = Arc<dyn Fn(&Error) + Send + Sync>;
type Migrations<T> = Vec<Box<dyn Migrate<T> + Send>>;

/// A state that changes only through journaled events; see the [module docs](self).
///
/// `S` is the state, `E` the event type and `R` what the system function returns.
/// `Prevayler` is `Send + Sync`: share it between threads by reference or in an `Arc`.
/// Dropping it makes every handled event durable (errors go to the
/// [error hook](PrevaylerBuilder::on_background_error)); [`close`](Prevayler::close)
/// does the same and returns the error.
pub struct Prevayler<S: 'static, E: 'static, R: 'static = ()> {
    core: Arc<Core<S, E, R>>,
}

struct Core<S: 'static, E: 'static, R: 'static> {
    state: RwLock<Slot<S>>,
    apply: Box<SystemFn<S, E, R>>,
    digest: Option<fn(&S) -> u64>,
    journal: Arc<Journal>,
    recovered: Recovered,
    policy: Policy,
    /// Held while a snapshot is written, so that one is written at a time.
    snapshotting: Mutex<()>,
    /// Set when the system function panicked: the state may be half-changed.
    tainted: AtomicBool,
    /// Whether an automatic snapshot is under way.
    automatic: AtomicBool,
    /// The events and framed bytes at the last snapshot (or at open).
    last_events: AtomicU64,
    last_bytes: AtomicU64,
    hook: Hook,
}

/// The state, and the number of events applied to it.
struct Slot<S> {
    value: S,
    applied: u64,
    at: u64,
}

#[derive(Debug, Clone, Copy)]
struct Policy {
    every_events: Option<u64>,
    every_bytes: Option<u64>,
    keep: usize,
}

/// Options for opening a [`Prevayler`]: `Prevayler::builder()`.
///
/// # Example
/// ```
/// use instastate::{Prevayler, prevalence::Durability};
///
/// # fn main() -> instastate::Result<()> {
/// # let dir = tempfile::tempdir().unwrap();
/// let log = Prevayler::builder()
///     .durability(Durability::GroupCommit)
///     .snapshot_every(10_000)
///     .keep_snapshots(3)
///     .replay_check(|lines: &Vec<String>| lines.len() as u64)
///     .open(dir.path(), Vec::new(), |lines: &mut Vec<String>, line: String, _| lines.push(line))?;
/// log.handle("hello".to_owned())?;
/// # Ok(())
/// # }
/// ```
///
/// `M` holds the migrations of older event versions: [`NoEventMigrations`] until
/// [`migrate_event`](PrevaylerBuilder::migrate_event) fixes the event type, then
/// [`EventMigrations<E>`].
#[must_use]
pub struct PrevaylerBuilder<S: 'static, M = NoEventMigrations> {
    durability: Durability,
    recovery: Recovery,
    policy: Policy,
    digest: Option<fn(&S) -> u64>,
    hook: Option<Hook>,
    io: Io,
    #[cfg(feature = "encryption")]
    key: Option<crate::EncryptionKey>,
    state_version: u32,
    state_migrations: Migrations<S>,
    event_version: u32,
    event_migrations: M,
    /// In a database: the lease's settings, and how long opening waits for it.
    #[cfg(feature = "postgres")]
    lease: (crate::postgres::LeaseSettings, std::time::Duration),
}

/// Where a prevalent system is kept.
enum Target<'a> {
    Dir(&'a Path),
    #[cfg(feature = "postgres")]
    Database(Box<crate::postgres::Location>),
}

impl Target<'_> {
    /// Where `dir` says: a directory, or (with the feature `postgres`) a
    /// `postgres://` location.
    fn of(dir: &Path) -> Result<Target<'_>> {
        #[cfg(feature = "postgres")]
        if let Some(location) = crate::location::database(dir)? {
            return Ok(Target::Database(Box::new(location)));
        }
        crate::location::refuse_database(dir, "a prevalent system")?;
        Ok(Target::Dir(dir))
    }

    /// What errors name: the directory, or the location without its password.
    fn label(&self) -> PathBuf {
        match self {
            Target::Dir(dir) => dir.to_path_buf(),
            #[cfg(feature = "postgres")]
            Target::Database(location) => PathBuf::from(location.to_string()),
        }
    }
}

/// How long opening a system in a database waits for its lease, by default.
#[cfg(feature = "postgres")]
const LEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The event migrations of a [`PrevaylerBuilder`] that has none: it opens a system
/// of any event type.
#[derive(Debug, Default)]
pub struct NoEventMigrations(());

/// The migrations of older versions of the event type `E` that a
/// [`PrevaylerBuilder`] holds; see [`PrevaylerBuilder::migrate_event`].
pub struct EventMigrations<E: 'static>(Migrations<E>);

impl<E> std::fmt::Debug for EventMigrations<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let from: Vec<u32> = self.0.iter().map(|it| it.version()).collect();
        f.debug_struct("EventMigrations").field("from", &from).finish()
    }
}

/// What a [`PrevaylerBuilder`]'s event migrations are for: events of type `E`.
/// Implemented by [`NoEventMigrations`] (for every `E`) and [`EventMigrations<E>`];
/// it cannot be implemented outside this crate.
pub trait ForEvents<E: 'static>: sealed::Sealed {
    /// The migrations.
    #[doc(hidden)]
    fn into_migrations(self) -> Vec<Box<dyn Migrate<E> + Send>>;
}

impl<E: 'static> ForEvents<E> for NoEventMigrations {
    fn into_migrations(self) -> Vec<Box<dyn Migrate<E> + Send>> {
        Vec::new()
    }
}

impl<E: 'static> ForEvents<E> for EventMigrations<E> {
    fn into_migrations(self) -> Vec<Box<dyn Migrate<E> + Send>> {
        self.0
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::NoEventMigrations {}
    impl<E> Sealed for super::EventMigrations<E> {}
}

impl Prevayler<(), (), ()> {
    /// Options for opening a `Prevayler`; see [`PrevaylerBuilder`].
    pub fn builder<S>() -> PrevaylerBuilder<S> {
        PrevaylerBuilder::new()
    }
}

impl<S> Default for PrevaylerBuilder<S> {
    fn default() -> Self {
        PrevaylerBuilder::new()
    }
}

impl<S> PrevaylerBuilder<S> {
    /// The default options: [`Durability::SyncEach`], [`Recovery::Strict`], no
    /// automatic snapshots, two snapshots kept, no replay check, the state and the
    /// events at schema version 1 without migrations.
    pub fn new() -> PrevaylerBuilder<S> {
        PrevaylerBuilder {
            durability: Durability::default(),
            recovery: Recovery::default(),
            policy: Policy { every_events: None, every_bytes: None, keep: DEFAULT_KEEP },
            digest: None,
            hook: None,
            io: Io::default(),
            #[cfg(feature = "encryption")]
            key: None,
            state_version: SCHEMA,
            state_migrations: Vec::new(),
            event_version: SCHEMA,
            event_migrations: NoEventMigrations(()),
            #[cfg(feature = "postgres")]
            lease: (crate::postgres::LeaseSettings::default(), LEASE_WAIT),
        }
    }
}

impl<S, M> PrevaylerBuilder<S, M> {
    /// Sets the schema version of the state type, 1 unless set; see the
    /// [module docs](self#schema-versions).
    ///
    /// Snapshots are written with it. One of an older version is read through the
    /// migration from that version ([`migrate_state`](Self::migrate_state)); one of a
    /// newer version is refused with [`Error::JournalSchema`], and left as it is.
    pub fn state_version(mut self, version: u32) -> Self {
        self.state_version = version;
        self
    }

    /// Reads snapshots of the state's schema version `from`, whose type was `Old`,
    /// through `migrate`; it replaces a migration from the same version given before.
    ///
    /// The snapshot's bytes are decoded as `Old`, exactly as that version wrote them,
    /// and `migrate` turns the value into the current state. The file's record of
    /// `Old`'s structure must match `Old` (the names need not).
    ///
    /// # Example
    /// ```
    /// use instastate::Prevayler;
    ///
    /// // Version 1 of the state was a count; version 2 adds a total.
    /// #[derive(Default, serde::Serialize, serde::Deserialize)]
    /// struct Stats { count: u64, total: u64 }
    ///
    /// # fn main() -> instastate::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let stats = Prevayler::builder()
    ///     .state_version(2)
    ///     .migrate_state(1, |count: u64| Stats { count, total: 0 })
    ///     .open(dir.path(), Stats::default(), |stats: &mut Stats, n: u64, _| {
    ///         stats.count += 1;
    ///         stats.total += n;
    ///     })?;
    /// # drop(stats);
    /// # Ok(())
    /// # }
    /// ```
    pub fn migrate_state<Old: serde::de::DeserializeOwned + 'static>(
        mut self,
        from: u32,
        migrate: fn(Old) -> S,
    ) -> Self {
        self.state_migrations.retain(|it| it.version() != from);
        self.state_migrations.push(Box::new(Migration::new(from, migrate)));
        self
    }

    /// Sets the schema version of the event type, 1 unless set; see the
    /// [module docs](self#schema-versions).
    ///
    /// New journal files are written with it. The events of a file of an older
    /// version are read through the migration from that version
    /// ([`migrate_event`](Self::migrate_event)); a file of a newer version is refused
    /// with [`Error::JournalSchema`], and left as it is.
    pub fn event_version(mut self, version: u32) -> Self {
        self.event_version = version;
        self
    }

    /// Reads journaled events of the event type's schema version `from`, whose type
    /// was `Old`, through `migrate` (an upcaster); it replaces a migration from the
    /// same version given before. It fixes the event type to `E`.
    ///
    /// Every event of that version is decoded as `Old`, exactly as it was journaled,
    /// and `migrate` turns it into an `E`, which the system function applies. The
    /// file's record of `Old`'s structure must match `Old` (the names need not).
    /// See the [module docs](self#schema-versions) for an example.
    pub fn migrate_event<Old, E>(
        self,
        from: u32,
        migrate: fn(Old) -> E,
    ) -> PrevaylerBuilder<S, EventMigrations<E>>
    where
        Old: serde::de::DeserializeOwned + 'static,
        E: 'static,
        M: ForEvents<E>,
    {
        let mut migrations = self.event_migrations.into_migrations();
        migrations.retain(|it| it.version() != from);
        migrations.push(Box::new(Migration::new(from, migrate)));
        PrevaylerBuilder {
            durability: self.durability,
            recovery: self.recovery,
            policy: self.policy,
            digest: self.digest,
            hook: self.hook,
            io: self.io,
            #[cfg(feature = "encryption")]
            key: self.key,
            state_version: self.state_version,
            state_migrations: self.state_migrations,
            event_version: self.event_version,
            event_migrations: EventMigrations(migrations),
            #[cfg(feature = "postgres")]
            lease: self.lease,
        }
    }

    /// In a database: how long the writer's lease lasts without renewal (it is
    /// renewed every third of it), 5 s by default. A standby takes over within
    /// about this long once the writer is gone; a writer paused for longer is
    /// fenced.
    #[cfg(feature = "postgres")]
    pub fn lease_time(mut self, ttl: std::time::Duration) -> Self {
        self.lease.0.ttl = ttl.max(std::time::Duration::from_millis(100));
        self
    }

    /// In a database: how long opening waits for the lease while another writer
    /// holds it ([`Error::LeaseHeld`] after that), 30 s by default. A standby
    /// waits for as long as it is willing to stand by; it also asks for the lease
    /// every `poll` (250 ms by default).
    #[cfg(feature = "postgres")]
    pub fn wait_for_lease(mut self, wait: std::time::Duration, poll: std::time::Duration) -> Self {
        self.lease.1 = wait;
        self.lease.0.poll = poll.max(std::time::Duration::from_millis(1));
        self
    }

    /// When a handled event is durable; [`Durability::SyncEach`] by default.
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// What to do about damage in the journal; [`Recovery::Strict`] by default.
    pub fn recovery(mut self, recovery: Recovery) -> Self {
        self.recovery = recovery;
        self
    }

    /// Takes a snapshot in the background once `events` events were journaled since
    /// the last one.
    pub fn snapshot_every(mut self, events: u64) -> Self {
        self.policy.every_events = Some(events.max(1));
        self
    }

    /// Takes a snapshot in the background once the journal grew by `bytes` since the
    /// last one.
    pub fn snapshot_every_bytes(mut self, bytes: u64) -> Self {
        self.policy.every_bytes = Some(bytes.max(1));
        self
    }

    /// How many snapshots to keep, at least one; 2 by default. The journal is kept
    /// back to the oldest of them.
    pub fn keep_snapshots(mut self, snapshots: usize) -> Self {
        self.policy.keep = snapshots.max(1);
        self
    }

    /// Turns on the replay check: after every event, `digest` of the state is
    /// journaled, and replay compares it, failing with [`Error::ReplayDiverged`] at
    /// the first event whose replay gives another digest.
    ///
    /// The digest should be cheap and cover what matters (a count, a sum, a hash of
    /// the fields); it runs once per event, with the state locked.
    pub fn replay_check(mut self, digest: fn(&S) -> u64) -> Self {
        self.digest = Some(digest);
        self
    }

    /// Where errors of background work go: automatic snapshots and the timer of
    /// [`Durability::Periodic`] (whose failure also poisons the journal). By default
    /// they are printed to standard error.
    pub fn on_background_error(mut self, hook: impl Fn(&Error) + Send + Sync + 'static) -> Self {
        self.hook = Some(Arc::new(hook));
        self
    }

    /// Encrypts the journal and snapshots with `key` (XChaCha20-Poly1305, as
    /// [`StoreBuilder::encryption_key`](crate::StoreBuilder::encryption_key)); a
    /// directory written with a key can only be opened with it.
    #[cfg(feature = "encryption")]
    pub fn encryption_key(mut self, key: crate::EncryptionKey) -> Self {
        self.key = Some(key);
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

    /// Checks the journal in directory `dir` as opening it would, without its types
    /// and without changing anything: every header, frame and checksum from the
    /// newest sound snapshot on, the numbering of the events, the links between the
    /// journal files, the end a clean close recorded, and with the key (set on this
    /// builder) every sealed event. It takes a shared lock, so the directory must not
    /// be open; the builder's other settings and its state type play no part.
    ///
    /// # Errors
    /// What opening would fail with for the journal's bytes: [`Error::JournalCorrupt`],
    /// [`Error::FormatVersion`], [`Error::Encryption`] or [`Error::WrongKey`]; and
    /// [`Error::WrongDirectory`] when `dir` holds no journal, [`Error::Locked`] when
    /// it is open, [`Error::Io`] for the file system's errors.
    ///
    /// # Example
    /// ```
    /// use instastate::Prevayler;
    ///
    /// # fn main() -> instastate::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let counter = Prevayler::open(dir.path(), 0u64, |n: &mut u64, by: u64, _| *n += by)?;
    /// counter.handle(2)?;
    /// counter.close()?;
    /// let report = Prevayler::builder::<u64>().inspect(dir.path())?;
    /// assert_eq!((report.events, report.state_type.as_str()), (1, "u64"));
    /// assert!(report.closed_cleanly);
    /// # Ok(())
    /// # }
    /// ```
    pub fn inspect(&self, dir: impl AsRef<Path>) -> Result<JournalReport> {
        crate::location::refuse_database(dir.as_ref(), "inspecting a journal")?;
        journal::inspect(&self.io, dir.as_ref(), &self.sealer())
    }

    /// Opens (or creates) the prevalent system in directory `dir`: loads the newest
    /// sound snapshot, or starts from `initial`, and replays the journal after it
    /// through `apply`.
    ///
    /// With the feature `postgres`, `dir` may be a `postgres://` location instead
    /// (see `postgres::Location`): the journal and the snapshots are rows of that
    /// database, and this system is the namespace's one writer. Opening waits for
    /// the namespace's lease (`wait_for_lease`) and keeps it renewed; a writer
    /// that lost it (paused, cut off, or taken over) is refused by the database,
    /// and every later call gets [`Error::Fenced`]. Every write is one statement
    /// and a commit, so every durability mode is durable there, and
    /// [`Durability::SyncEach`] groups concurrent callers into one commit as
    /// [`Durability::GroupCommit`] does; [`Recovery::Salvage`] acts as
    /// [`Recovery::Strict`] (a database holds no torn write).
    ///
    /// # Errors
    /// [`Error::Locked`] if the directory is open elsewhere; [`Error::JournalType`]
    /// if it was written for other types; [`Error::JournalSchema`] if it was written
    /// with a newer schema version, or an older one without a migration;
    /// [`Error::JournalCorrupt`] for damage other than a torn last write;
    /// [`Error::JournalDecode`] if an event or the snapshot does not decode;
    /// [`Error::MigrationPanicked`] if a migration panics; [`Error::ReplayDiverged`]
    /// or [`Error::ReplayPanicked`] if replay is not deterministic; [`Error::Io`] for
    /// the file system's errors. In a database: [`Error::LeaseHeld`] when another
    /// writer kept the lease, [`Error::InvalidLocation`], [`Error::Database`],
    /// [`Error::DatabaseCorrupt`] and [`Error::DatabaseSchema`].
    pub fn open<E, R>(
        self,
        dir: impl AsRef<Path>,
        initial: S,
        apply: impl Fn(&mut S, E, Timestamp) -> R + Send + Sync + 'static,
    ) -> Result<Prevayler<S, E, R>>
    where
        S: Serialize + DeserializeOwned + Send + Sync + 'static,
        E: Serialize + DeserializeOwned + Send + 'static,
        R: Send + 'static,
        M: ForEvents<E>,
    {
        let target = Target::of(dir.as_ref())?;
        let (reading, rest) = self.split::<E>(target.label());
        let Rest { durability, recovery, settings, io, .. } = rest;
        let dir = reading.label.as_path();
        // Salvage may replay more than once (see `open_versioned`), each time from the
        // initial state: keep it encoded for the second time.
        let spare = match recovery {
            Recovery::Salvage => Some(journal::encode(&initial, || dir.to_path_buf())?),
            _ => None,
        };
        let mut initial = Some(initial);
        let initial = move || match (initial.take(), &spare) {
            (Some(initial), _) => Ok(initial),
            (None, Some(spare)) => journal::decode(spare, dir, || "the initial state".to_owned()),
            // Only `Salvage` replays twice, and it kept the spare.
            (None, None) => Err(Error::ReplayPanicked { path: dir.to_path_buf(), event: 0 }),
        };
        let mut restore = |snapshot: Restored<'_>| reading.restore(snapshot);
        let digest = settings.digest;
        let mut replayed = |state: &mut S, event: Replayed<'_>| {
            let decoded = reading.decode(&event)?;
            replay(dir, state, &apply, digest, event, decoded)
        };
        let (identity, versions, sealer) =
            (reading.identity.clone(), &reading.versions, reading.sealer.clone());
        let opened = match &target {
            Target::Dir(path) => {
                let lock = DirLock::acquire(&io, path, Kind::Journal)?;
                let path = *path;
                let config = Config {
                    dir: Some(path.to_path_buf()),
                    identity,
                    durability,
                    recovery,
                    sealer,
                    io,
                    access: Access::ReadWrite,
                };
                journal::open_versioned(
                    config,
                    versions,
                    Some(Hold::Exclusive(lock)),
                    initial,
                    &mut restore,
                    &mut replayed,
                )?
            }
            #[cfg(feature = "postgres")]
            Target::Database(location) => {
                let database =
                    crate::postgres::PgJournal::open(location, rest.lease.0, rest.lease.1)?;
                let config = journal::DatabaseConfig { identity, durability, sealer };
                journal::open_on_database(
                    database,
                    config,
                    versions,
                    None,
                    initial,
                    &mut restore,
                    &mut replayed,
                )?
            }
        };
        let slot = Slot { value: opened.state, applied: opened.applied, at: opened.at };
        Ok(finish(settings, slot, Box::new(apply), opened.journal, opened.recovered))
    }

    /// Splits the builder into how a journal of events `E` is read (its errors
    /// naming `label`), and the rest.
    fn split<E>(self, label: PathBuf) -> (Reading<S, E>, Rest<S>)
    where
        S: DeserializeOwned,
        E: DeserializeOwned,
        M: ForEvents<E>,
    {
        let sealer = self.sealer();
        let PrevaylerBuilder {
            durability,
            recovery,
            policy,
            digest,
            hook,
            io,
            state_version,
            state_migrations,
            event_version,
            event_migrations,
            #[cfg(feature = "postgres")]
            lease,
            ..
        } = self;
        let event_migrations = event_migrations.into_migrations();
        let identity = Identity { schema: state_version, ..identity::<S, E>() };
        let versions = Versions {
            event: event_version,
            older_states: Older::of(state_migrations.iter().map(|it| &**it as &dyn Migrate<S>)),
            older_events: Older::of(event_migrations.iter().map(|it| &**it as &dyn Migrate<E>)),
        };
        let reading = Reading {
            label,
            identity,
            versions,
            state_version,
            state_migrations,
            event_version,
            event_migrations,
            sealer,
        };
        let settings = Settings { policy, digest, hook };
        let rest = Rest {
            durability,
            recovery,
            settings,
            io,
            #[cfg(feature = "postgres")]
            lease,
        };
        (reading, rest)
    }

    /// A prevalent system without a directory, for tests: events are encoded (so an
    /// event that could not be journaled fails here too) and applied, nothing is
    /// written, and snapshots do nothing.
    pub fn transient<E, R>(
        self,
        initial: S,
        apply: impl Fn(&mut S, E, Timestamp) -> R + Send + Sync + 'static,
    ) -> Prevayler<S, E, R>
    where
        S: Serialize + DeserializeOwned + Send + Sync + 'static,
        E: Serialize + DeserializeOwned + Send + 'static,
        R: Send + 'static,
        M: ForEvents<E>,
    {
        let identity = Identity { schema: self.state_version, ..identity::<S, E>() };
        let journal = Journal::transient(identity);
        let settings = Settings { policy: self.policy, digest: self.digest, hook: self.hook };
        let slot = Slot { value: initial, applied: 0, at: 0 };
        finish(settings, slot, Box::new(apply), journal, Recovered::default())
    }
}

/// How a system's journal is read: its types, versions and migrations, its key,
/// and what its errors name.
struct Reading<S: 'static, E: 'static> {
    label: PathBuf,
    identity: Identity,
    versions: Versions,
    state_version: u32,
    state_migrations: Migrations<S>,
    event_version: u32,
    event_migrations: Migrations<E>,
    sealer: Sealer,
}

impl<S: DeserializeOwned, E: DeserializeOwned> Reading<S, E> {
    /// The state of a snapshot read back, migrated from its version.
    fn restore(&self, snapshot: Restored<'_>) -> Result<S> {
        let place = Place { path: snapshot.path, what: &|| "the snapshot".to_owned() };
        let migrations = self.state_migrations.iter().map(|it| &**it as &dyn Migrate<S>);
        journal::decode_versioned(
            snapshot.bytes,
            snapshot.schema,
            self.state_version,
            migrations,
            place,
        )
    }

    /// An event read back, migrated from its version.
    fn decode(&self, event: &Replayed<'_>) -> Result<E> {
        let what = || format!("event {}", event.seq);
        let place = Place { path: &self.label, what: &what };
        let migrations = self.event_migrations.iter().map(|it| &**it as &dyn Migrate<E>);
        journal::decode_versioned(event.bytes, event.schema, self.event_version, migrations, place)
    }
}

/// The builder's settings besides how the journal is read.
struct Rest<S> {
    durability: Durability,
    recovery: Recovery,
    settings: Settings<S>,
    io: Io,
    #[cfg(feature = "postgres")]
    lease: (crate::postgres::LeaseSettings, std::time::Duration),
}

/// What a system keeps of its builder's settings once open.
struct Settings<S> {
    policy: Policy,
    digest: Option<fn(&S) -> u64>,
    hook: Option<Hook>,
}

fn finish<S, E, R>(
    settings: Settings<S>,
    slot: Slot<S>,
    apply: Box<SystemFn<S, E, R>>,
    journal: Journal,
    recovered: Recovered,
) -> Prevayler<S, E, R> {
    let Settings { policy, digest, hook } = settings;
    let hook = hook.unwrap_or_else(|| Arc::new(|err: &Error| eprintln!("instastate: {err}")));
    let journal = Arc::new(journal);
    let timer_hook = Arc::clone(&hook);
    Journal::start_timer(&journal, move |err| timer_hook(err));
    let framed = journal.framed();
    let applied = slot.applied;
    Prevayler {
        core: Arc::new(Core {
            state: RwLock::new(slot),
            apply,
            digest,
            journal,
            recovered,
            policy,
            snapshotting: Mutex::new(()),
            tainted: AtomicBool::new(false),
            automatic: AtomicBool::new(false),
            last_events: AtomicU64::new(applied),
            last_bytes: AtomicU64::new(framed),
            hook,
        }),
    }
}

pub(crate) fn identity<S: DeserializeOwned, E: DeserializeOwned>() -> Identity {
    Identity {
        state_type: crate::codec::stored_type_name(std::any::type_name::<S>()),
        event_type: crate::codec::stored_type_name(std::any::type_name::<E>()),
        schema: SCHEMA,
        state_shape: Shape::of::<S>(),
        event_shape: Shape::of::<E>(),
    }
}

/// Applies one replayed event, `decoded`, to the state being recovered.
fn replay<S, E, R>(
    dir: &Path,
    state: &mut S,
    apply: &(impl Fn(&mut S, E, Timestamp) -> R + ?Sized),
    digest: Option<fn(&S) -> u64>,
    event: Replayed<'_>,
    decoded: E,
) -> Result<Option<u64>> {
    journal::replay_caught(dir, event.seq, || {
        let _ = apply(state, decoded, event.at);
    })?;
    Ok(digest.map(|digest| digest(state)))
}

/// The job of one handled event: apply it to the state.
struct Apply<S: 'static, E: 'static, R: 'static> {
    core: Arc<Core<S, E, R>>,
    event: E,
}

impl<S, E, R> Job for Apply<S, E, R>
where
    S: Send + Sync + 'static,
    E: Send + 'static,
    R: Send + 'static,
{
    type Output = R;

    fn run(self, seq: u64, at: Timestamp) -> (R, Option<u64>) {
        let mut slot = self.core.state.write();
        let _taint = Taint(&self.core.tainted);
        let output = (self.core.apply)(&mut slot.value, self.event, at);
        slot.applied = seq + 1;
        slot.at = at.as_micros();
        (output, self.core.digest.map(|digest| digest(&slot.value)))
    }
}

impl<S, E, R> Prevayler<S, E, R>
where
    S: Serialize + DeserializeOwned + Send + Sync + 'static,
    E: Serialize + DeserializeOwned + Send + 'static,
    R: Send + 'static,
{
    /// Opens (or creates) the prevalent system in `dir` with the default options;
    /// see [`PrevaylerBuilder::open`].
    ///
    /// # Errors
    /// As [`PrevaylerBuilder::open`].
    pub fn open(
        dir: impl AsRef<Path>,
        initial: S,
        apply: impl Fn(&mut S, E, Timestamp) -> R + Send + Sync + 'static,
    ) -> Result<Self> {
        PrevaylerBuilder::new().open(dir, initial, apply)
    }

    /// Journals `event`, makes it durable as the [`Durability`] asks, applies it,
    /// and returns what the system function returned.
    ///
    /// # Errors
    /// [`Error::EventEncode`] if the event cannot be encoded (nothing was journaled);
    /// [`Error::JournalWrite`] if writing the journal failed (the event was not
    /// applied); [`Error::Poisoned`] after such a failure or a panic.
    ///
    /// # Panics
    /// If the system function panics; see the [module docs](self).
    pub fn handle(&self, event: E) -> Result<R> {
        let bytes = journal::encode(&event, || self.core.journal.label())?;
        let output =
            self.core.journal.commit(bytes, Apply { core: Arc::clone(&self.core), event })?;
        self.snapshot_if_due();
        Ok(output)
    }

    /// Runs `f` on the state, under a read lock, and returns its result.
    ///
    /// Readers run side by side; `handle` waits for them only while it applies.
    pub fn read<T>(&self, f: impl FnOnce(&S) -> T) -> T {
        f(&self.core.state.read().value)
    }

    /// Writes a snapshot of the state now, and returns the number of events it covers.
    ///
    /// `handle` is held back only while the state is encoded; then the journal is
    /// synced, the snapshot written and made durable, and only then are older
    /// snapshots (beyond [`PrevaylerBuilder::keep_snapshots`]) and the journal files
    /// no kept snapshot needs deleted. Does nothing in a transient system.
    ///
    /// # Errors
    /// [`Error::EventEncode`] (naming the state's type) if the state cannot be
    /// encoded; [`Error::JournalWrite`] if syncing the journal first fails (which
    /// poisons it); [`Error::Io`] if writing the snapshot fails (the journal is whole
    /// then, and no older snapshot was deleted); [`Error::Poisoned`] after a failed
    /// journal write or a panicking event.
    pub fn snapshot(&self) -> Result<u64> {
        self.core.snapshot()
    }

    /// Writes and `fdatasync`s every event handled so far: for [`Durability::Periodic`]
    /// and [`Durability::Unsynced`]; in the other modes they are durable already.
    ///
    /// # Errors
    /// [`Error::JournalWrite`] if the write fails (which poisons the journal), or
    /// [`Error::Poisoned`].
    pub fn sync(&self) -> Result<()> {
        self.core.journal.sync()
    }

    /// The number of events journaled so far, which is also the number the next one gets.
    #[must_use]
    pub fn events(&self) -> u64 {
        self.core.journal.next()
    }

    /// The directory, or `None` for a transient system or one kept in a database.
    #[must_use]
    pub fn path(&self) -> Option<&Path> {
        self.core.journal.dir()
    }

    /// What opening found: the snapshot used, the events replayed, a torn tail cut.
    #[must_use]
    pub fn recovered(&self) -> &Recovered {
        &self.core.recovered
    }

    /// Makes every handled event durable and closes the journal; the directory is
    /// unlocked once the last handle (including a running automatic snapshot) is gone.
    ///
    /// # Errors
    /// As [`sync`](Self::sync).
    pub fn close(self) -> Result<()> {
        self.core.journal.close()
    }

    fn snapshot_if_due(&self) {
        let core = &self.core;
        let policy = core.policy;
        if policy.every_events.is_none() && policy.every_bytes.is_none() {
            return;
        }
        let events = core.journal.next().saturating_sub(core.last_events.load(Ordering::Relaxed));
        let bytes = core.journal.framed().saturating_sub(core.last_bytes.load(Ordering::Relaxed));
        let due = policy.every_events.is_some_and(|every| events >= every)
            || policy.every_bytes.is_some_and(|every| bytes >= every);
        if !due || !core.journal.is_persistent() || core.automatic.swap(true, Ordering::AcqRel) {
            return;
        }
        let background = Arc::clone(core);
        let spawned =
            thread::Builder::new().name("instastate-snapshot".to_owned()).spawn(move || {
                if let Err(err) = background.snapshot() {
                    (background.hook)(&err);
                }
                background.automatic.store(false, Ordering::Release);
            });
        if let Err(source) = spawned {
            core.automatic.store(false, Ordering::Release);
            (core.hook)(&Error::Io { path: core.journal.label(), source });
        }
    }
}

impl<S, E, R> Core<S, E, R>
where
    S: Serialize + Send + Sync + 'static,
{
    fn snapshot(&self) -> Result<u64> {
        let _one = self.snapshotting.lock();
        // Read first: the counters may only move on once this snapshot covers them.
        let framed = self.journal.framed();
        let (body, events, at) = {
            // Recursive: a snapshot taken inside `read` must not queue behind a writer
            // that waits for that very read.
            let slot = self.state.read_recursive();
            if self.tainted.load(Ordering::SeqCst) {
                return Err(Error::Poisoned { path: self.journal.label() });
            }
            if !self.journal.is_persistent() {
                return Ok(slot.applied);
            }
            let body = journal::encode(&slot.value, || self.journal.label())?;
            (body, slot.applied, slot.at)
        };
        self.journal.snapshot(body, events, at, self.policy.keep, Files::Retire)?;
        self.last_events.store(events, Ordering::Relaxed);
        self.last_bytes.store(framed, Ordering::Relaxed);
        Ok(events)
    }
}

impl<S, E, R> Drop for Core<S, E, R> {
    fn drop(&mut self) {
        if let Err(err) = self.journal.close() {
            (self.hook)(&err);
        }
    }
}

impl<S, E, R> std::fmt::Debug for Prevayler<S, E, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prevayler")
            .field("path", &self.core.journal.label())
            .field("events", &self.core.journal.next())
            .finish_non_exhaustive()
    }
}
