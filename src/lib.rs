//! Keep your program's state in plain memory, and never lose it.
//!
//! instastate gives global values — *cells* — that live in memory like any
//! `static`, and saves them to an embedded database in one atomic, durable and
//! consistent step whenever you ask. On the next run they come back.
//!
//! ```
//! use instastate::defstate;
//!
//! defstate!(COUNTER: u64 = 150);
//! defstate!(pub GREETING: String = String::from("abc"));
//!
//! fn main() -> instastate::Result<()> {
//! #   let dir = tempfile::tempdir().unwrap();
//! #   let db = dir.path().join("db");
//!     let _store = instastate::open(db)?;      // loads every saved cell
//!     assert_eq!(*COUNTER.read(), 150);        // the default, or the saved value
//!     *COUNTER.write() = 1000;
//!     instastate::save_all()?;                 // one atomic, durable, consistent snapshot
//!     *COUNTER.write() = 7;
//!     instastate::reload_all()?;               // revert every cell to the last save
//!     assert_eq!(COUNTER.get(), 1000);
//!     Ok(())
//! }
//! ```
//!
//! Run it again and `COUNTER` starts at 1000.
//!
//! # Cells
//!
//! [`defstate!`] declares a `static` [`StateCell`] and registers it before `main`
//! (registration does no I/O and cannot fail). A cell's type must be
//! `Serialize + DeserializeOwned + Send + Sync + 'static` (the [`Value`] trait).
//! The initializer runs lazily, at most once, and not at all when a saved value is
//! loaded first. Cells are read and written through a [`parking_lot`]-style
//! `RwLock`: [`read`](StateCell::read), [`write`](StateCell::write),
//! [`get`](StateCell::get), [`set`](StateCell::set), [`replace`](StateCell::replace),
//! [`update`](StateCell::update), [`with`](StateCell::with).
//!
//! A cell is stored under its *name*, by default its module path and identifier
//! (`my_app::settings::THEME`). **Moving or renaming the static changes its name**,
//! and the old saved value is then an orphan (kept on disk, listed by
//! [`Store::orphans`], no longer loaded) unless the cell lists the old name as an
//! alias (`#[alias = "old::NAME"]`). Pin the name to keep it stable:
//!
//! ```
//! instastate::defstate! {
//!     /// The colour theme; its name survives refactoring.
//!     #[name = "theme"]
//!     pub THEME: String = "dark".to_owned();
//! }
//! assert_eq!(THEME.name(), "theme");
//! ```
//!
//! # Guarantees
//!
//! - **Atomic.** [`save_all`] writes every changed cell in one batch of the storage
//!   engine. A crash at any instant — process killed, machine powered off — leaves
//!   the previous save or the new one, never a mix. Large values go to value files
//!   that are written and fsynced *before* the batch that points at them.
//! - **Durable.** When `save_all` returns `Ok`, the save survives power loss: the
//!   engine's log is fsynced (sled's own flush only uses `sync_file_range`, which
//!   is not enough), and so is every new file and the directory holding it. A save
//!   of small cells costs one fsync of the log (about 0.1–0.5 ms on an SSD), however
//!   many cells it writes; each large value written adds its own file's fsync.
//! - **Consistent.** Changes made inside one [`atomically`] call are in every save
//!   whole or not at all, so invariants across cells hold in every snapshot. A save
//!   holds `atomically` blocks back only while it encodes the changed cells, not
//!   while it writes them.
//! - **Incremental.** A save writes only the cells written to since the last save
//!   (every [`write`](StateCell::write) access counts), plus cells never saved. One
//!   small change beside a large state costs one small write, not the whole state.
//! - **Checked.** Every record carries the format version, the value's type name and
//!   schema version, and a CRC-32; value files carry their length and CRC-32 in the
//!   record. A value saved as another type is refused with
//!   [`Error::TypeMismatch`] instead of being misread, and damaged data is reported
//!   as [`Error::Corrupt`]. A failed load changes no cell and no stored value.
//! - **Poisoning.** If a save fails with an I/O error, the store refuses further
//!   saves and reloads ([`Error::Poisoned`]) until it is reopened. Cells keep their
//!   values; the disk holds the last good save or the failed one, whole, never a mix
//!   (the engine may have taken the batch before the failure).
//! - **Exclusive.** A store directory is locked while open; a second open, in this
//!   process or another, fails at once with [`Error::Locked`].
//! - **History.** The last saves (10 unless [`StoreBuilder::keep_history`] says
//!   otherwise, within 64 MiB of earlier values: [`StoreBuilder::history_bytes`])
//!   are kept, each costing only the earlier values of the cells it wrote;
//!   [`Store::revert_to`] restores any of them, all or nothing.
//! - **Sealed** (feature `encryption`). With `StoreBuilder::encryption_key`,
//!   every record and value file is authenticated and encrypted; a wrong key or a
//!   tampered byte is an error, never garbage.
//!
//! What is not promised: changes made to a plain cell since the last save are lost
//! when the process dies ([`autosave`] narrows that window; a journal, below, closes
//! it), and a store is for one process at a time.
//!
//! # Prevalence
//!
//! When nothing may be lost between saves, change the state only through events,
//! each journaled before it is applied: [`Prevayler`] keeps a whole system state and
//! its journal in a directory, and a `#[journaled]` cell whose type implements
//! [`Prevalent`] does the same inside its store through [`StateCell::handle`]. Both
//! run on one journal engine; the [`prevalence`] module has the details: durability
//! modes, group commit, snapshots, torn tails and damage, the replay check.
//!
//! # Recipes
//!
//! **Tests and libraries** should not use the global store: a [`StoreBuilder`] opens
//! a store over just the cells you list, on disk or in memory, so tests running in
//! parallel in one binary never share cells or files.
//!
//! ```
//! use instastate::{StateCell, Store};
//!
//! static BALANCE: StateCell<i64> = StateCell::new("test::BALANCE", || 0);
//!
//! # fn main() -> instastate::Result<()> {
//! let store = Store::builder().cell(&BALANCE).in_memory()?;
//! BALANCE.set(10);
//! store.save_all()?;
//! BALANCE.set(-5);
//! store.reload_all()?;
//! assert_eq!(BALANCE.get(), 10);
//! # Ok(())
//! # }
//! ```
//!
//! **Invariants across cells**: change them inside [`atomically`].
//!
//! **Saving without thinking about it**: keep the guard of [`autosave`] alive in
//! `main`. It saves in the background when something changed, and once more when
//! it is dropped, also when `main` returns early or panics.
//!
//! ```
//! # use std::time::Duration;
//! # use instastate::{StateCell, Store};
//! static SCORE: StateCell<u32> = StateCell::new("docs::recipe::SCORE", || 0);
//! # fn main() -> instastate::Result<()> {
//! # let dir = tempfile::tempdir().unwrap();
//! let store = Store::builder().cell(&SCORE).open(dir.path())?;
//! let _autosave = store.autosave(Duration::from_secs(1))?;
//! SCORE.set(10);
//! # Ok(())
//! # }
//! ```
//!
//! **Undo in a REPL or editor**: [`Store::history`] lists the kept saves and
//! [`Store::revert_to`] goes back to one; [`Store::reload_all`] drops the changes
//! since the last save. `examples/repl.rs` is a whole session.
//!
//! **Changing a cell's type**: bump its schema version and give a migration from
//! the old type (`#[version = 2]`, `#[migrate(1 => from_v1)]`, or [`CellOptions`]).
//! postcard, the value encoding, is not self-describing, so adding a field needs a
//! version bump too; its migration fills the field in (`examples/evolve.rs`).
//! A [`Prevayler`]'s or journaled cell's events and state are versioned the same
//! way, each journal file and snapshot read through the migration (upcaster) from
//! the version it was written with (see [schema versions](prevalence#schema-versions)).
//!
//! **Backups**: [`Store::backup_to`] copies the last save to a new directory while
//! the program runs; [`Store::export_to`] and [`Store::import_from`] move a
//! snapshot through one portable file. The `instastate` command-line tool (in
//! `cli/`) lists, verifies, exports, imports and compacts a stopped program's store.
//!
//! # F.A.Q.
//!
//! **Why does `defstate!` not compile in my `#![forbid(unsafe_code)]` crate?**
//! Registration before `main` uses the [`ctor`](https://docs.rs/ctor) crate, whose
//! expansion contains an `unsafe` link section attribute, and `forbid` cannot be
//! overridden (E0453). Use `#![deny(unsafe_code)]`, or build cells with
//! [`StateCell::new`] and list them in a [`StoreBuilder`].
//!
//! **What happens to a cell that was never saved?** It keeps its initial value on
//! open, is written by the next [`save_all`], and makes [`reload_all`] fail with
//! [`Error::NeverSaved`] until then.
//!
//! **Can I change a cell's type?** Not silently: a saved value of another type is
//! refused at open. Bump the cell's schema version and add a migration from the old
//! type; a value saved by a newer version is refused with [`Error::SchemaVersion`]
//! and left as it is.
//!
//! **What counts as "another type"?** The type's name as
//! [`std::any::type_name`] spells it, including its module path. Moving a type to
//! another module changes it, and the standard library does not promise that the
//! spelling stays the same across compiler versions (in practice it has, for the
//! standard types). Such a change makes the open fail with [`Error::TypeMismatch`],
//! and nothing is lost: the old program still reads the store. To move a type, bump
//! the schema version with the identity function as the migration: a migration
//! trusts the version number, not the type name.
//!
//! **What must I not do while holding a cell's guard?** Open or reload a store with
//! that cell (they need its write lock), save while holding its *write* guard, or
//! enter [`atomically`]. Inside `atomically`, do not wait for another thread that
//! itself enters `atomically` or saves: a save waiting for your block holds that
//! thread back. A save (or reload) on a thread holding a read guard that an
//! `atomically` block on another thread waits for would wait for that block
//! forever: it fails with [`Error::GuardHeld`] instead, and saves nothing.
//!
//! # Feature flags
//!
//! - `encryption` (off by default): `StoreBuilder::encryption_key` and
//!   `EncryptionKey`, through the `chacha20poly1305` crate of the `RustCrypto` project.
//! - `fuzz` (off by default): the entry points of the fuzz targets in `fuzz/`. Not
//!   public API, and exempt from semantic versioning.
//!
//! # MSRV
//!
//! The minimum supported Rust version is the one CI builds with, 1.95; raising it is
//! not a breaking change.

#![deny(unsafe_code)]
#![warn(missing_docs)]

mod admin;
mod atomically;
mod autosave;
mod backend;
mod cell;
mod codec;
mod crypt;
mod error;
pub mod events;
#[cfg(feature = "fuzz")]
#[doc(hidden)]
pub mod fuzz;
mod held;
mod io;
mod journal;
mod journaled;
mod location;
mod lockfile;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod prevalence;
mod registry;
mod schema;
// Nothing records or checks shapes yet: the store will, in the step that integrates them.
#[allow(dead_code)]
mod shape;
mod store;
mod values;

pub use instastate_macros::defstate;

#[cfg(feature = "encryption")]
pub use crate::crypt::EncryptionKey;
#[cfg(feature = "postgres")]
pub use crate::store::StoreFollower;
pub use crate::{
    admin::{Problem, StoredCell},
    atomically::atomically,
    autosave::{Autosave, autosave},
    cell::{Ref, RefMut, StateCell, Value},
    error::{CodecError, Error, Result, StorageError},
    journaled::Prevalent,
    prevalence::{Prevayler, Timestamp},
    schema::{CellOptions, Migrate, Migration},
    store::{Generation, Store, StoreBuilder, history, open, reload_all, revert_to, save_all},
};

// The README's examples are compiled and run as doctests (with every feature on,
// as the README's test command has it).
#[cfg(all(doctest, feature = "encryption"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

// Not public API. Used by generated code.
#[doc(hidden)]
pub mod __private {
    pub use ctor;

    use crate::{CellOptions, StateCell, Value};

    /// Creates the cell `defstate!` declares; `origin` is where it was declared.
    #[must_use]
    pub const fn new_cell<T>(
        name: &'static str,
        origin: &'static str,
        init: fn() -> T,
        options: CellOptions<T>,
    ) -> StateCell<T> {
        StateCell::with_origin(name, origin, init, options)
    }

    /// Registers a cell for `instastate::open`; runs before `main`.
    pub fn register<T: Value>(cell: &'static StateCell<T>) {
        crate::registry::register(cell);
    }
}
