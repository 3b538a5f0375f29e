//! The one public error type.

use std::{fmt, io, path::PathBuf};

/// A specialized [`Result`](std::result::Result) whose error defaults to [`Error`].
///
/// # Example
/// ```
/// fn start(dir: &std::path::Path) -> instastate::Result<instastate::Store> {
///     instastate::Store::builder().open(dir)
/// }
/// # let dir = tempfile::tempdir().unwrap();
/// # start(dir.path()).unwrap();
/// ```
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in instastate.
///
/// Every variant names what was wrong: the cell, the path or the version.
/// A failed `open` or `reload_all` changes no cell and no stored value; a failed
/// `save_all` changes no cell, and leaves the last save or the failed one whole on
/// disk (see [`Error::Poisoned`]).
///
/// # Example
/// ```
/// use instastate::{Error, Store};
///
/// # fn main() -> instastate::Result<()> {
/// # let dir = tempfile::tempdir().unwrap();
/// let first = Store::builder().open(dir.path())?;
/// match Store::builder().open(dir.path()) {
///     Err(Error::Locked { path, .. }) => assert_eq!(path, dir.path()),
///     other => panic!("expected a locked store, got {other:?}"),
/// }
/// # drop(first);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The directory given to open a store or a journal cannot be one: the path is
    /// empty, names a file, or a directory that holds the other kind, or other files.
    /// Nothing was changed.
    #[error("cannot open `{}` as {kind}: {reason}", path.display())]
    #[non_exhaustive]
    WrongDirectory {
        /// The path given.
        path: PathBuf,
        /// What it was to be opened as.
        kind: &'static str,
        /// Why it cannot be.
        reason: String,
    },
    /// Another [`Store`](crate::Store) or [`Prevayler`](crate::Prevayler), in this
    /// process or another, has the directory open (to change it, or, for an opening
    /// that would change it, to read it).
    #[error("{kind} `{}` is locked: it is open in this or another process", path.display())]
    #[non_exhaustive]
    Locked {
        /// The directory.
        path: PathBuf,
        /// What the directory holds: `store directory` or `journal directory`.
        kind: &'static str,
    },
    /// A store opened read-only ([`StoreBuilder::open_read_only`](crate::StoreBuilder::open_read_only))
    /// was asked to change what it holds. Nothing was changed.
    #[error("`{}` is open read-only, and `{operation}` would change it; open it with `open` to change it", path.display())]
    #[non_exhaustive]
    ReadOnly {
        /// The store directory, or the journal's.
        path: PathBuf,
        /// The operation that was refused.
        operation: &'static str,
    },
    /// Two cells of one store have the same name, so they would share a record.
    #[error(
        "cells `{first}` and `{second}` are both named `{name}`; give one a `#[name = \"...\"]`"
    )]
    #[non_exhaustive]
    DuplicateName {
        /// The name both cells have.
        name: String,
        /// Where the first cell was declared, and its type.
        first: String,
        /// Where the second cell was declared, and its type.
        second: String,
    },
    /// A saved value was written for another type than the cell's current one: one
    /// of another name, or of the same name and schema version whose structure has
    /// changed since (a field's type, say), which would misread it. Also a value of
    /// an older schema version whose structure is not that of the old type its
    /// migration reads (`expected_type` is then that old type).
    #[error(
        "cell `{cell}` holds a saved `{stored_type}` (schema v{stored_schema}), but {}",
        Migrate { expected_type, expected_schema: *expected_schema, stored_schema: *stored_schema, changes }
    )]
    #[non_exhaustive]
    TypeMismatch {
        /// The cell's name.
        cell: String,
        /// The type name recorded when the value was saved.
        stored_type: String,
        /// The schema version recorded when the value was saved.
        stored_schema: u32,
        /// The cell's current type (or, for a value of an older schema version, the
        /// old type its migration reads).
        expected_type: String,
        /// The cell's current schema version.
        expected_schema: u32,
        /// What changed in the type's structure, when the names and versions match.
        changes: Vec<String>,
    },
    /// A cell's name cannot be a stored name: it is empty, longer than 1024 bytes,
    /// or holds a NUL or another control character. Nothing was opened.
    #[error("cell name `{name}` cannot be stored: {reason}")]
    #[non_exhaustive]
    InvalidName {
        /// The name, cut to its first 80 characters if it is longer.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A saved value has a schema version the cell cannot read: a newer one, or an
    /// older one without a [`Migration`](crate::Migration). The value is left as it is.
    #[error(
        "cell `{cell}`: saved value has schema v{found}, {}",
        if found > current { format!("newer than this program's v{current}; it was saved by a newer version of the program") }
        else { format!("and the cell (now v{current}) has no migration from v{found}") }
    )]
    #[non_exhaustive]
    SchemaVersion {
        /// The cell's name.
        cell: String,
        /// The schema version recorded when the value was saved.
        found: u32,
        /// The cell's current schema version.
        current: u32,
    },
    /// A saved value's bytes do not decode as the cell's type.
    #[error(
        "cell `{cell}`: saved `{stored_type}` could not be decoded as `{expected_type}`: {source}; if the type changed, bump the cell's schema version and add a migration from the old type"
    )]
    #[non_exhaustive]
    Decode {
        /// The cell's name.
        cell: String,
        /// The type name recorded when the value was saved.
        stored_type: String,
        /// The cell's current type (or, for a value of an older schema version, the
        /// old type its migration reads).
        expected_type: String,
        /// What the decoder reported.
        #[source]
        source: CodecError,
    },
    /// A cell's value could not be encoded, so nothing was saved.
    #[error("cell `{cell}` of type `{type_name}` could not be encoded: {source}")]
    #[non_exhaustive]
    Encode {
        /// The cell's name.
        cell: String,
        /// The cell's type.
        type_name: String,
        /// What the encoder reported.
        #[source]
        source: CodecError,
    },
    /// A stored record or value file is damaged.
    #[error("cell `{cell}`: stored data at `{}` is corrupt: {reason}", path.display())]
    #[non_exhaustive]
    Corrupt {
        /// The cell's name, or the store key when no cell claims it.
        cell: String,
        /// The file that holds the damaged bytes.
        path: PathBuf,
        /// What is wrong with them.
        reason: String,
    },
    /// A file given to [`Store::import_from`](crate::Store::import_from) is not a
    /// sound export file; nothing was imported.
    #[error("cannot import `{}`: {reason}", path.display())]
    #[non_exhaustive]
    BadExport {
        /// The export file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The store was written by another version of the on-disk format.
    #[error("store `{}` was written by format v{found}, this build reads v{expected}", path.display())]
    #[non_exhaustive]
    FormatVersion {
        /// The store directory.
        path: PathBuf,
        /// The version found on disk.
        found: u32,
        /// The version this build reads and writes.
        expected: u32,
    },
    /// [`reload_all`](crate::reload_all) was asked to revert a cell that has no saved value.
    #[error("cell `{cell}` has never been saved, so it has no saved value to revert to")]
    #[non_exhaustive]
    NeverSaved {
        /// The cell's name.
        cell: String,
    },
    /// Several cells failed at once; each error names its cell.
    #[error("{} cells failed: {}", .0.len(), List(.0))]
    Several(Vec<Error>),
    /// A previous save failed part-way; this store refuses further saves and reloads
    /// until reopened, which loads whichever of the two saves the disk holds.
    /// A journal is poisoned the same way by a failed write or a panicking event.
    #[error("`{}` refuses changes after a failed write or a panicking event; reopen it", path.display())]
    #[non_exhaustive]
    Poisoned {
        /// The store directory, or `:memory:` for an in-memory store.
        path: PathBuf,
    },
    /// [`Store::revert_to`](crate::Store::revert_to) was asked for a generation the
    /// store's history does not hold.
    #[error(
        "store `{}` has no generation {generation} in its history (it holds {})",
        path.display(),
        match (oldest, newest) { (Some(oldest), Some(newest)) => format!("{oldest} to {newest}"), _ => "none".to_owned() }
    )]
    #[non_exhaustive]
    UnknownGeneration {
        /// The store directory, or `:memory:`.
        path: PathBuf,
        /// The generation asked for.
        generation: u64,
        /// The oldest generation kept, if any.
        oldest: Option<u64>,
        /// The newest generation kept, if any.
        newest: Option<u64>,
    },
    /// A save made in the background by [`autosave`](crate::autosave) failed; the
    /// next explicit call on the store returns its error instead of doing its work.
    #[error("a background save of `{}` failed: {source}", path.display())]
    #[non_exhaustive]
    Background {
        /// The store directory, or `:memory:`.
        path: PathBuf,
        /// The background save's error (shared with the error hook, which saw it first).
        #[source]
        source: std::sync::Arc<Error>,
    },
    /// [`autosave`](crate::autosave) was started on a store that already has it running.
    #[error("store `{}` already saves in the background", path.display())]
    #[non_exhaustive]
    AutosaveRunning {
        /// The store directory, or `:memory:`.
        path: PathBuf,
    },
    /// The store is encrypted and no key was given, or a key was given for a store
    /// that is not encrypted.
    #[error("{}", if *encrypted { format!("store `{}` is encrypted; open it with its key", path.display()) } else { format!("store `{}` is not encrypted, but a key was given", path.display()) })]
    #[non_exhaustive]
    Encryption {
        /// The store directory.
        path: PathBuf,
        /// Whether the store on disk is encrypted.
        encrypted: bool,
    },
    /// The key does not open this encrypted store.
    #[error("wrong key for encrypted store `{}`", path.display())]
    #[non_exhaustive]
    WrongKey {
        /// The store directory.
        path: PathBuf,
    },
    /// A journal file has damage that is not a torn last write: a bad frame with sound
    /// data after it, a missing stretch of events, or a damaged header. Nothing was
    /// changed; [`Recovery::Salvage`](crate::prevalence::Recovery::Salvage) keeps the
    /// events before the damage and moves the rest aside.
    #[error(
        "journal `{}` is damaged at byte {offset}: {reason}; nothing was changed (open with `Recovery::Salvage` to keep the events before the damage)",
        path.display()
    )]
    #[non_exhaustive]
    JournalCorrupt {
        /// The damaged file.
        path: PathBuf,
        /// The byte offset of the damage in that file.
        offset: u64,
        /// What is wrong there.
        reason: String,
    },
    /// A journal or snapshot was written for another state or event type than the one
    /// it is opened with, or for types of the same names and schema versions whose
    /// structure has changed since, or for an older schema version whose structure
    /// is not that of the old type its migration reads. Nothing was changed.
    #[error(
        "`{}` holds {stored}, but was opened for {expected}{}",
        path.display(),
        Changes(changes)
    )]
    #[non_exhaustive]
    JournalType {
        /// The journal file or snapshot.
        path: PathBuf,
        /// The state type, event type and their schema versions it was written for.
        stored: String,
        /// The types and schema versions it was opened with.
        expected: String,
        /// What changed in the types' structure, when the names and versions match
        /// (or the versions are older ones, read through migrations).
        changes: Vec<String>,
    },
    /// A journal file or snapshot was written with a schema version of its state or
    /// events that this program cannot read: a newer one than the current version
    /// (written by a newer version of the program), or an older one without a
    /// migration from it. Nothing was changed.
    #[error(
        "`{}`: {what}: written with schema v{found}, {}; nothing was changed",
        path.display(),
        if found > current { format!("newer than this program's v{current}; it was written by a newer version of the program") }
        else { format!("and this program (now v{current}) has no migration from v{found}") }
    )]
    #[non_exhaustive]
    JournalSchema {
        /// The journal file or snapshot.
        path: PathBuf,
        /// The state or the events, with the type name recorded, or which event.
        what: String,
        /// The schema version it was written with.
        found: u32,
        /// The program's current schema version of that type.
        current: u32,
    },
    /// A migration of a journaled event, a snapshot's state or a cell's saved value
    /// from an older schema version panicked. Nothing was changed.
    #[error(
        "`{}`: the migration of {what} from schema v{from} panicked; nothing was changed",
        path.display()
    )]
    #[non_exhaustive]
    MigrationPanicked {
        /// The journal directory, the snapshot, or the store of the cell.
        path: PathBuf,
        /// Which event, the snapshot, or the cell's value.
        what: String,
        /// The schema version it was migrating from.
        from: u32,
    },
    /// A journaled event or a snapshot does not decode as the type of its schema
    /// version (the current type, or the old type of its migration): the type
    /// changed without a schema version bump.
    #[error(
        "`{}`: {what} does not decode as `{type_name}`: {source}; the type changed without its schema version",
        path.display()
    )]
    #[non_exhaustive]
    JournalDecode {
        /// The journal file or snapshot.
        path: PathBuf,
        /// Which event, or the snapshot.
        what: String,
        /// The type it should decode as.
        type_name: String,
        /// What the decoder reported.
        #[source]
        source: CodecError,
    },
    /// An event could not be encoded for the journal; it was neither journaled nor applied.
    #[error("an event of type `{type_name}` for `{}` could not be encoded: {source}", path.display())]
    #[non_exhaustive]
    EventEncode {
        /// The journal directory, or `:memory:`.
        path: PathBuf,
        /// The event type.
        type_name: String,
        /// What the encoder reported.
        #[source]
        source: CodecError,
    },
    /// The replay check found that replaying the journal gave another state than the
    /// one the digest was taken of: the system function is not deterministic.
    #[error(
        "replaying `{}` diverged at event {event}: the state's digest was {stored:#018x} when the event was handled and is {replayed:#018x} on replay",
        path.display()
    )]
    #[non_exhaustive]
    ReplayDiverged {
        /// The journal directory.
        path: PathBuf,
        /// The first event after which the states differ.
        event: u64,
        /// The digest journaled when the event was handled.
        stored: u64,
        /// The digest after replaying it.
        replayed: u64,
    },
    /// The system function panicked while replaying an event that it had not panicked
    /// on when the event was handled: it is not deterministic.
    #[error("the system function panicked replaying event {event} of `{}`", path.display())]
    #[non_exhaustive]
    ReplayPanicked {
        /// The journal directory.
        path: PathBuf,
        /// The event it panicked on.
        event: u64,
    },
    /// Writing or syncing the journal failed, so the events of that write were not
    /// applied. The journal now refuses further events ([`Error::Poisoned`]); the
    /// events may or may not be on disk, and reopening shows which.
    #[error("writing the journal `{}` failed ({source}); the event was not applied", path.display())]
    #[non_exhaustive]
    JournalWrite {
        /// The journal file.
        path: PathBuf,
        /// The operating system's error, shared by every caller of the failed write.
        #[source]
        source: std::sync::Arc<io::Error>,
    },
    /// [`StateCell::handle`](crate::StateCell::handle) was called on a cell that is not
    /// journaled, or that is not open in a store.
    #[error(
        "cell `{cell}` is not journaled in an open store: declare it `#[journaled]` and open its store"
    )]
    #[non_exhaustive]
    NotJournaled {
        /// The cell's name.
        cell: String,
    },
    /// A cell was opened in a second store while still open in another: two stores
    /// would save, reload and revert it behind each other's backs.
    #[error("cell `{cell}` is open in another store; close that store first")]
    #[non_exhaustive]
    CellInUse {
        /// The cell's name.
        cell: String,
    },
    /// The global free functions were called while no store was opened with [`open`](crate::open).
    #[error("no store is open; call `instastate::open` first")]
    NotOpen,
    /// [`open`](crate::open) was called while the global store is still open.
    #[error("the global store is already open at `{}`; drop its `Store` first", path.display())]
    #[non_exhaustive]
    AlreadyOpen {
        /// The open store's directory.
        path: PathBuf,
    },
    /// `save_all` or `reload_all` was called inside [`atomically`](crate::atomically),
    /// which would wait for itself forever.
    #[error("`{operation}` cannot run inside `instastate::atomically`")]
    #[non_exhaustive]
    InsideAtomically {
        /// The operation that was refused.
        operation: &'static str,
    },
    /// A save or reload that would wait forever, refused: this thread holds a
    /// guard of `cell` (from [`read`](crate::StateCell::read),
    /// [`write`](crate::StateCell::write), or inside
    /// [`with`](crate::StateCell::with) or [`update`](crate::StateCell::update)),
    /// and an [`atomically`](crate::atomically) block on another thread waits
    /// for it, so the block cannot end, and the operation waits for every block
    /// to end. Nothing was saved or changed; drop the guard and try again.
    #[error(
        "`{operation}` would wait forever: this thread holds a guard of cell `{cell}`, which an `atomically` block on another thread waits for; drop the guard first"
    )]
    #[non_exhaustive]
    GuardHeld {
        /// The cell whose guard this thread holds.
        cell: String,
        /// The operation that was refused.
        operation: &'static str,
    },
    /// An append found its stream other than it expected: another writer appended
    /// meanwhile, or the stream is new or not. Nothing was written.
    #[error("stream `{stream}`: expected {expected}, but {}", match actual { Some(version) => format!("it is at version {version}"), None => "it does not exist".to_owned() })]
    #[non_exhaustive]
    WrongExpectedVersion {
        /// The stream.
        stream: String,
        /// What the append expected.
        expected: crate::events::Expected,
        /// The stream's version: its last event's, or `None` when it has none.
        actual: Option<u64>,
    },
    /// A stream id the event store does not accept.
    #[error("stream id `{stream}` is invalid: {reason}")]
    #[non_exhaustive]
    InvalidStreamId {
        /// The id (cut to 80 bytes when longer).
        stream: String,
        /// Why it is refused.
        reason: String,
    },
    /// An append that cannot be made as asked; nothing was written.
    #[error("invalid append: {reason}")]
    #[non_exhaustive]
    InvalidAppend {
        /// Why.
        reason: String,
    },
    /// An append holds an event whose id is already in the store elsewhere than a
    /// retry of the same append would put it (as far as the recent ids the store
    /// keeps tell). Nothing was written.
    #[error(
        "stream `{stream}`: event id {id} is already in the store, and this is no retry of the append that put it there"
    )]
    #[non_exhaustive]
    DuplicateEventId {
        /// The stream appended to.
        stream: String,
        /// The id.
        id: crate::events::EventId,
    },
    /// A [`Sealed`](crate::events::Sealed) value was sealed with a subject key
    /// that the subject key file lacks: not forgotten, missing (a backup opened
    /// without the live key file, or the wrong key file).
    #[cfg(feature = "encryption")]
    #[error(
        "the key of subject `{subject}` (generation {generation}) is not in `{}`",
        path.display()
    )]
    #[non_exhaustive]
    SubjectKeyMissing {
        /// The subject key file.
        path: PathBuf,
        /// The subject.
        subject: String,
        /// The key's generation.
        generation: u64,
    },
    /// The subject key file of an event store cannot be read.
    #[error("subject key file `{}` cannot be read: {reason}", path.display())]
    #[non_exhaustive]
    SubjectKeysCorrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The stream was tombstoned: it is gone for good, and takes no append, no
    /// delete and no read. Nothing was written.
    #[error("stream `{stream}` is tombstoned: it was deleted for good")]
    #[non_exhaustive]
    StreamTombstoned {
        /// The stream.
        stream: String,
    },
    /// A conditional append ([`EventStore::append_if`](crate::events::EventStore::append_if))
    /// whose aggregates changed since its base: an event carrying one of its tags
    /// was appended at or after the base, and is not among those it resolved.
    /// Nothing was written.
    #[error(
        "conflict on `{tag}`: {theirs} changed it at or after base {base}{}",
        ours.as_ref().map_or_else(String::new, |ours| format!(", before our event {ours}"))
    )]
    #[non_exhaustive]
    Conflict {
        /// The tag both carry.
        tag: String,
        /// The condition's base.
        base: crate::events::Position,
        /// The first of the appended events that conflicts, where it would have
        /// gone; `None` when the tag is one the condition named and none of the
        /// appended events carries.
        ours: Option<crate::events::EventRef>,
        /// The first event appended since the base that it conflicts with.
        theirs: crate::events::EventRef,
    },
    /// A directory given to read an event store's journal holds no event store:
    /// no journal, or the journal of a `Prevayler` or of a journaled cell.
    #[error("`{}` holds no event store: {reason}", path.display())]
    #[non_exhaustive]
    NotAnEventStore {
        /// The directory.
        path: PathBuf,
        /// What it holds instead.
        reason: String,
    },
    /// A journal changed under a reader that does not lock it in a way the reader
    /// cannot follow: a file it needs disappeared, or events it read were voided.
    #[error("the journal changed under its reader at `{}`: {reason}", path.display())]
    #[non_exhaustive]
    JournalChanged {
        /// The file or directory concerned.
        path: PathBuf,
        /// What changed.
        reason: String,
    },
    /// An event's data could not be read back without its Rust type, from the
    /// structure of its type that the journal records (or it records none).
    #[error(
        "the data of event {position} (of type `{event_type}`) cannot be read from its recorded structure: {reason}"
    )]
    #[non_exhaustive]
    EventData {
        /// The event's position.
        position: u64,
        /// The event's type.
        event_type: String,
        /// Why.
        reason: String,
    },
    /// A projection stopped: its handler refused an event (or panicked on it), or
    /// reading the event store or saving the projection's cell failed. The cell holds
    /// every event before `position`, and no later one.
    #[error("the projection into cell `{cell}` failed at position {position}: {source}")]
    #[non_exhaustive]
    ProjectionFailed {
        /// The cell it projects into.
        cell: String,
        /// The position of the event it was at: the cell's position.
        position: crate::events::Position,
        /// Why: the handler's error, or the store's.
        #[source]
        source: std::sync::Arc<dyn std::error::Error + Send + Sync>,
    },
    /// A projection stopped before the position waited for: it was stopped, a
    /// rebuild replaced it, or the event store closed.
    #[error("the projection into cell `{cell}` stopped at position {position}")]
    #[non_exhaustive]
    ProjectionStopped {
        /// The cell it projects into.
        cell: String,
        /// The cell's position.
        position: crate::events::Position,
    },
    /// A projection already runs into the cell; one projection at a time projects
    /// into a cell.
    #[error("cell `{cell}` already has a projection running into it")]
    #[non_exhaustive]
    ProjectionRunning {
        /// The cell.
        cell: String,
    },
    /// A projection's cell has applied events up to a position past the event store's
    /// head: the store lost events that the cell's save counts (a buffered
    /// [`Durability`](crate::events::Durability) not synced before the cell was saved),
    /// or the cell was projected from another store. Nothing was changed; a rebuild
    /// ([`ProjectionBuilder::rebuild_in`](crate::events::ProjectionBuilder::rebuild_in))
    /// replaces the state with a fold of what the store holds.
    #[error(
        "cell `{cell}` holds a projection up to position {position}, past the event store's head {head}: the store lost events the cell applied, or the cell was projected from another store"
    )]
    #[non_exhaustive]
    ProjectionAhead {
        /// The cell.
        cell: String,
        /// The cell's position.
        position: crate::events::Position,
        /// The store's head: the position of its next event.
        head: crate::events::Position,
    },
    /// A projection that cannot run as asked; nothing was started.
    #[error("cell `{cell}` cannot be projected into: {reason}")]
    #[non_exhaustive]
    InvalidProjection {
        /// The cell.
        cell: String,
        /// Why.
        reason: String,
    },
    /// A file-system operation on the store failed.
    #[error("i/o failure on `{}`: {source}", path.display())]
    #[non_exhaustive]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The storage engine failed.
    #[error("storage engine failure in `{}`: {source}", path.display())]
    #[non_exhaustive]
    Storage {
        /// The store directory.
        path: PathBuf,
        /// The engine's error, kept opaque so the engine can change.
        #[source]
        source: StorageError,
    },
    /// A location that names no store this build can open: a `postgres://` URL
    /// that does not parse, lacks its namespace, or needs a feature left out.
    #[error("the location `{location}` cannot be used: {reason}")]
    #[non_exhaustive]
    InvalidLocation {
        /// The location, without its password.
        location: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A call to the database failed: it could not be reached, the connection
    /// dropped, or it refused a statement.
    #[error("the database at `{location}` failed to {action}: {source}")]
    #[non_exhaustive]
    Database {
        /// The database's location, without its password.
        location: String,
        /// What was being done.
        action: String,
        /// The database client's error, kept opaque so the client can change.
        #[source]
        source: StorageError,
    },
    /// What instastate's tables hold is damaged: a value its own writes never make.
    #[error("the database at `{location}` holds damaged data: {reason}")]
    #[non_exhaustive]
    DatabaseCorrupt {
        /// The database's location, without its password.
        location: String,
        /// What is damaged.
        reason: String,
    },
    /// The database holds instastate's tables in a newer version than this build
    /// knows: an upgraded program uses it. Nothing was changed.
    #[error(
        "the database at `{location}` holds instastate's tables in version {found}, newer than {known}, the newest this build knows: upgrade this program"
    )]
    #[non_exhaustive]
    DatabaseSchema {
        /// The database's location, without its password.
        location: String,
        /// The version of its tables.
        found: u64,
        /// The newest version this build knows.
        known: u64,
    },
    /// The writer of a store no longer holds its lease: another writer took the
    /// store over (or the lease ran out while this one was paused or cut off). The
    /// database refused the write, so nothing of it is stored; this writer must
    /// stop writing, and may open the store again to wait for the lease.
    #[error(
        "the writer of `{namespace}` at `{location}` is fenced: its lease (epoch {epoch}) {}",
        match current { Some(current) if current != epoch => format!("was taken over (epoch {current})"), _ => "ran out".to_owned() }
    )]
    #[non_exhaustive]
    Fenced {
        /// The database's location, without its password.
        location: String,
        /// The store's namespace.
        namespace: String,
        /// The epoch of this writer's lease.
        epoch: u64,
        /// The epoch of the lease as the database has it now, if any.
        current: Option<u64>,
    },
    /// An operation the store's engine does not offer: the event store on
    /// PostgreSQL does not delete, truncate, compact or shred yet. Nothing was
    /// changed.
    #[error("the store at `{location}` cannot {operation}: {reason}")]
    #[non_exhaustive]
    Unsupported {
        /// The store's location (a path, or a URL without its password).
        location: String,
        /// What was asked.
        operation: String,
        /// Why it is not offered.
        reason: String,
    },
    /// Another writer held the store's lease for as long as this one waited for
    /// it: the store has a live writer elsewhere. Nothing was changed.
    #[error(
        "another writer of `{namespace}` at `{location}` held its lease for the {waited:?} this one waited"
    )]
    #[non_exhaustive]
    LeaseHeld {
        /// The database's location, without its password.
        location: String,
        /// The store's namespace.
        namespace: String,
        /// How long this writer waited.
        waited: std::time::Duration,
    },
}

impl Error {
    /// Folds a list of per-cell errors into one: the error itself when there is one.
    pub(crate) fn from_list(mut errors: Vec<Error>) -> Option<Error> {
        match errors.len() {
            0 => None,
            1 => errors.pop(),
            _ => Some(Error::Several(errors)),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }
}

/// An error from the value encoding.
///
/// Opaque, like [`StorageError`], so that the encoding library is not part of the public API.
///
/// # Example
/// ```
/// use instastate::{Error, StateCell, Store};
///
/// #[derive(serde::Deserialize)]
/// struct Never;
/// impl serde::Serialize for Never {
///     fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
///         Err(serde::ser::Error::custom("refuses to be saved"))
///     }
/// }
/// static CELL: StateCell<Never> = StateCell::new("docs::codec::CELL", || Never);
///
/// # fn main() -> instastate::Result<()> {
/// let store = Store::builder().cell(&CELL).in_memory()?;
/// let Err(Error::Encode { source, .. }) = store.save_all() else { panic!("saved") };
/// println!("encoding failed: {source}");
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct CodecError(pub(crate) CodecFault);

/// What a codec reported.
#[derive(Debug)]
pub(crate) enum CodecFault {
    Postcard(postcard::Error),
    #[cfg(feature = "json")]
    Json(serde_json::Error),
    /// JSON data read by a build without the `json` feature.
    #[cfg(not(feature = "json"))]
    NeedsJson,
}

impl From<postcard::Error> for CodecError {
    fn from(err: postcard::Error) -> CodecError {
        CodecError(CodecFault::Postcard(err))
    }
}

#[cfg(feature = "json")]
impl From<serde_json::Error> for CodecError {
    fn from(err: serde_json::Error) -> CodecError {
        CodecError(CodecFault::Json(err))
    }
}

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            CodecFault::Postcard(err) => fmt::Display::fmt(err, f),
            #[cfg(feature = "json")]
            CodecFault::Json(err) => write!(f, "JSON: {err}"),
            #[cfg(not(feature = "json"))]
            CodecFault::NeedsJson => f.write_str(
                "the data is JSON, which this build (without feature `json`) does not read",
            ),
        }
    }
}

impl std::error::Error for CodecError {}

/// An error from the storage engine.
///
/// Opaque on purpose: the engine behind a [`Store`](crate::Store) is not part of
/// the public API, so its error types are not either.
/// Its [`source`](std::error::Error::source) chain still carries the engine's own error.
/// It displays the engine's error with that error's own sources (the database's
/// message, where the client's error alone says only `db error`).
///
/// # Example
/// ```
/// use instastate::Error;
///
/// fn explain(err: &Error) -> String {
///     match err {
///         Error::Storage { path, source, .. } => format!("engine failed in {}: {source}", path.display()),
///         other => other.to_string(),
///     }
/// }
/// assert_eq!(explain(&Error::NotOpen), "no store is open; call `instastate::open` first");
/// ```
#[derive(Debug)]
pub struct StorageError(pub(crate) Box<dyn std::error::Error + Send + Sync>);

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)?;
        let mut source = self.0.source();
        while let Some(err) = source {
            write!(f, ": {err}")?;
            source = err.source();
        }
        Ok(())
    }
}

impl std::error::Error for StorageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// What a saved value of a cell was expected to be (the cell's type, or the old
/// type of the migration that reads its schema version), what changed in its
/// structure, and how to migrate.
struct Migrate<'a> {
    expected_type: &'a str,
    expected_schema: u32,
    stored_schema: u32,
    changes: &'a [String],
}

impl fmt::Display for Migrate<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Migrate { expected_type, expected_schema, stored_schema, changes } = *self;
        if stored_schema < expected_schema {
            return write!(
                f,
                "the cell's migration to schema v{expected_schema} reads it as `{expected_type}`, whose structure is not the one saved ({}); reading it so would misread it: that migration must read the type the value was saved as",
                changes.join("; ")
            );
        }
        write!(f, "the cell's type is `{expected_type}` (schema v{expected_schema})")?;
        if changes.is_empty() {
            return f.write_str(
                "; to change a cell's type, bump its schema version and add a migration from the old type",
            );
        }
        let (old, new) = (stored_schema, stored_schema.saturating_add(1));
        write!(
            f,
            ", whose structure changed ({}); reading it as the new structure would misread it: keep the old type, and bump the cell's schema version with a migration from it (`#[version = {new}]` and `#[migrate({old} => from_v{old})]`, or `CellOptions::version` and `Migration::new`)",
            changes.join("; ")
        )
    }
}

/// What changed in a type's structure, and what to do about it; nothing when
/// nothing is listed.
struct Changes<'a>(&'a [String]);

impl fmt::Display for Changes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return Ok(());
        }
        write!(f, ": the types' structure changed ({})", self.0.join("; "))?;
        f.write_str(
            "; reading it with the new structure would misread it: open it with the types it was written for, or keep the old type and bump the changed type's schema version with a migration from it",
        )
    }
}

struct List<'a>(&'a [Error]);

impl fmt::Display for List<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (idx, error) in self.0.iter().enumerate() {
            if idx > 0 {
                f.write_str("; ")?;
            }
            fmt::Display::fmt(error, f)?;
        }
        Ok(())
    }
}
