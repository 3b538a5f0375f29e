//! Schema versions, migrations and aliases: how a cell's stored value survives
//! changes to the cell's type and name.

use std::{any::type_name, fmt, path::Path};

use serde::de::DeserializeOwned;

use crate::{Result, journal::Replayed, shape::Shape};

/// How a cell reads values saved by older versions of the program.
///
/// - **version**: the schema version of the cell's type, 1 unless set. Bump it
///   whenever the type changes in a way serde cannot absorb, and add a migration
///   from the old version.
/// - **migrations**: one [`Migration`] per older version that can still be read,
///   each straight to the current type.
/// - **aliases**: names the cell's value may be saved under, from before it was
///   renamed or moved. The value is saved under the new name at the next save.
///
/// [`defstate!`](crate::defstate) sets these with `#[version = N]`,
/// `#[migrate(OLD => function, ...)]` and `#[alias = "old::NAME"]`.
///
/// # Example
/// ```
/// use instastate::{CellOptions, Migration, StateCell};
/// # #[derive(serde::Serialize, serde::Deserialize)]
/// # struct Settings { theme: String, font_size: u16 }
///
/// // Version 1 was a bare theme name.
/// fn from_v1(theme: String) -> Settings {
///     Settings { theme, font_size: 12 }
/// }
///
/// static SETTINGS: StateCell<Settings> = StateCell::with_options(
///     "app::SETTINGS",
///     || Settings { theme: "light".into(), font_size: 12 },
///     CellOptions::new()
///         .version(2)
///         .migrations(&[&Migration::new(1, from_v1)])
///         .aliases(&["app::config::SETTINGS"]),
/// );
/// # assert_eq!(SETTINGS.name(), "app::SETTINGS");
/// ```
pub struct CellOptions<T: 'static> {
    pub(crate) version: u32,
    pub(crate) migrations: &'static [&'static dyn Migrate<T>],
    pub(crate) aliases: &'static [&'static str],
    // Set by `CellOptions::journaled` (in `journaled.rs`), where `T: Prevalent` is known.
    pub(crate) journal: Option<JournalHooks<T>>,
}

/// What a store needs to journal a cell of type `T`, captured by
/// [`CellOptions::journaled`] where `T: Prevalent` is known: plain function
/// pointers, so that a cell's options name no journal machinery.
pub(crate) struct JournalHooks<T> {
    /// The stored name of the cell's event type.
    pub(crate) event_type: fn() -> &'static str,
    /// The structure of the cell's event type, if it can be traced.
    pub(crate) event_shape: fn() -> Option<crate::shape::Shape>,
    /// The events' current schema version.
    pub(crate) event_version: u32,
    /// The older versions of the events that can be read.
    pub(crate) older_events: fn() -> Vec<crate::journal::Older>,
    /// Decodes one journaled event and applies it to the value.
    pub(crate) replay: fn(&Path, &mut T, Replayed<'_>) -> Result<()>,
}

impl<T> Clone for JournalHooks<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for JournalHooks<T> {}

impl<T> CellOptions<T> {
    /// Version 1, no migrations, no aliases: what a cell has by default.
    #[must_use]
    pub const fn new() -> CellOptions<T> {
        CellOptions { version: 1, migrations: &[], aliases: &[], journal: None }
    }

    /// Sets the schema version of the cell's type.
    ///
    /// A value saved with an older version is read through the migration from that
    /// version; one saved with a newer version is refused with
    /// [`Error::SchemaVersion`](crate::Error::SchemaVersion), and left as it is.
    #[must_use]
    pub const fn version(self, version: u32) -> CellOptions<T> {
        CellOptions { version, ..self }
    }

    /// Sets the migrations from older versions, at most one per version.
    #[must_use]
    pub const fn migrations(
        self,
        migrations: &'static [&'static dyn Migrate<T>],
    ) -> CellOptions<T> {
        CellOptions { migrations, ..self }
    }

    /// Sets the names the cell's value may have been saved under before.
    #[must_use]
    pub const fn aliases(self, aliases: &'static [&'static str]) -> CellOptions<T> {
        CellOptions { aliases, ..self }
    }
}

impl<T> Clone for CellOptions<T> {
    fn clone(&self) -> CellOptions<T> {
        *self
    }
}

impl<T> Copy for CellOptions<T> {}

impl<T> Default for CellOptions<T> {
    fn default() -> CellOptions<T> {
        CellOptions::new()
    }
}

impl<T> fmt::Debug for CellOptions<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let from: Vec<u32> = self.migrations.iter().map(|it| it.version()).collect();
        f.debug_struct("CellOptions")
            .field("version", &self.version)
            .field("migrations_from", &from)
            .field("aliases", &self.aliases)
            .field("journaled", &self.journal.is_some())
            .finish()
    }
}

/// A migration of a saved value from schema version `from`, whose type was `Old`,
/// to the cell's current type `T`.
///
/// The stored bytes are decoded as `Old`, exactly as that version saved them, and
/// passed to the function. A migration trusts the version number: the stored type
/// name is not compared, so a migration is also how a type that moved to another
/// module keeps its data (bump the version, migrate with the identity function).
///
/// # Example
/// ```
/// use instastate::Migration;
///
/// fn from_v1(celsius: i32) -> f64 {
///     f64::from(celsius)
/// }
/// static FROM_V1: Migration<i32, f64> = Migration::new(1, from_v1);
/// ```
pub struct Migration<Old, T> {
    from: u32,
    migrate: fn(Old) -> T,
}

impl<Old, T> Migration<Old, T> {
    /// The migration from version `from` through `migrate`.
    #[must_use]
    pub const fn new(from: u32, migrate: fn(Old) -> T) -> Migration<Old, T> {
        Migration { from, migrate }
    }
}

impl<Old, T> fmt::Debug for Migration<Old, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Migration")
            .field("from", &self.from)
            .field("old_type", &type_name::<Old>())
            .field("new_type", &type_name::<T>())
            .finish_non_exhaustive()
    }
}

/// A [`Migration`] with its old type erased, so that one cell can list migrations
/// from several old types.
///
/// Implemented by [`Migration`]; it cannot be implemented outside this crate.
pub trait Migrate<T>: Sync + sealed::Sealed {
    /// The version this migration reads.
    fn version(&self) -> u32;

    /// Decodes `bytes` as the old type and migrates the value.
    #[doc(hidden)]
    fn migrate(&self, bytes: &[u8]) -> Result<T, postcard::Error>;

    /// Decodes `bytes`, JSON, as the old type and migrates the value.
    #[doc(hidden)]
    #[cfg(feature = "json")]
    fn migrate_json(&self, bytes: &[u8]) -> Result<T, serde_json::Error>;

    /// The old type's name.
    #[doc(hidden)]
    fn old_type(&self) -> &'static str;

    /// The old type's structure, when it can be traced.
    #[doc(hidden)]
    // Sealed and hidden: only this crate implements and calls it.
    #[allow(private_interfaces)]
    fn old_shape(&self) -> Option<Shape>;
}

impl<Old: DeserializeOwned, T> Migrate<T> for Migration<Old, T> {
    fn version(&self) -> u32 {
        self.from
    }

    fn migrate(&self, bytes: &[u8]) -> Result<T, postcard::Error> {
        crate::codec::decode_exact::<Old>(bytes).map(self.migrate)
    }

    #[cfg(feature = "json")]
    fn migrate_json(&self, bytes: &[u8]) -> Result<T, serde_json::Error> {
        serde_json::from_slice::<Old>(bytes).map(self.migrate)
    }

    fn old_type(&self) -> &'static str {
        type_name::<Old>()
    }

    #[allow(private_interfaces)]
    fn old_shape(&self) -> Option<Shape> {
        Shape::of::<Old>()
    }
}

mod sealed {
    pub trait Sealed {}
    impl<Old, T> Sealed for super::Migration<Old, T> {}
}

/// Why a stored value could not be turned into the cell's type.
#[derive(Debug)]
pub(crate) enum DecodeFault {
    /// The bytes do not decode as the type of their version.
    Codec(postcard::Error),
    /// The value was saved by a newer version of the program.
    Newer,
    /// The value is of an older version that no migration reads.
    NoMigration,
    /// The migration of the value from its older version panicked.
    Panicked,
}
