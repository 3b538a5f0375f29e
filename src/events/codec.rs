//! How an event's data is encoded: postcard by default, compact and fast; JSON
//! (feature `json`) for stores whose events other tools read. Each event records
//! which one it was written with, so a store can change codec and read both.

use std::path::Path;

use serde::{Serialize, de::DeserializeOwned};

use crate::{Migrate, Result, error::CodecError};

/// The encoding of the events' data an event store writes: see
/// [`EventStoreBuilder::codec`](super::EventStoreBuilder::codec). Every event
/// records its codec, so events written with either read back whatever the store
/// writes now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Codec {
    /// postcard: compact and fast, read only with the Rust type.
    #[default]
    Postcard,
    /// JSON (`serde_json`), which any tool reads; larger and slower.
    #[cfg(feature = "json")]
    Json,
}

impl Codec {
    /// Whether it is JSON.
    pub(crate) fn is_json(self) -> bool {
        match self {
            Codec::Postcard => false,
            #[cfg(feature = "json")]
            Codec::Json => true,
        }
    }

    /// Encodes `data` of an event of the store in `dir`.
    pub(crate) fn encode<E: Serialize>(self, data: &E, dir: &Path) -> Result<Vec<u8>> {
        match self {
            Codec::Postcard => crate::journal::encode(data, || dir.to_path_buf()),
            #[cfg(feature = "json")]
            Codec::Json => serde_json::to_vec(data).map_err(|err| crate::Error::EventEncode {
                path: dir.to_path_buf(),
                type_name: std::any::type_name::<E>().to_owned(),
                source: err.into(),
            }),
        }
    }
}

/// The migrations of an event store's event type, from its older versions.
pub(crate) type Migrations<E> = Vec<Box<dyn Migrate<E> + Send>>;

/// The event type's schema: its current version, and the migrations (upcasters)
/// from the older ones. Held by the typed handles of a store.
pub(crate) struct EventSchema<E> {
    pub(crate) version: u32,
    pub(crate) migrations: Migrations<E>,
}

/// Decodes the data of an event written with JSON (`json`) or postcard, with
/// version `found` of the event type, whose current version is `current`: as an
/// `E`, or through the migration from `found`. `what` names the event.
pub(crate) fn decode_event<E: DeserializeOwned>(
    json: bool,
    found: u32,
    current: u32,
    migrations: &Migrations<E>,
    bytes: &[u8],
    path: &Path,
    what: &dyn Fn() -> String,
) -> crate::Result<E> {
    let undecoded = |type_name: &str, source: CodecError| crate::Error::JournalDecode {
        path: path.to_path_buf(),
        what: what(),
        type_name: type_name.to_owned(),
        source,
    };
    if found == current {
        return decode::<E>(json, bytes).map_err(|err| undecoded(std::any::type_name::<E>(), err));
    }
    let refused =
        || crate::Error::JournalSchema { path: path.to_path_buf(), what: what(), found, current };
    if current < found {
        return Err(refused());
    }
    let migration = migrations.iter().find(|it| it.version() == found).ok_or_else(refused)?;
    let migrate = || -> std::result::Result<E, CodecError> {
        if json {
            #[cfg(feature = "json")]
            return migration.migrate_json(bytes).map_err(CodecError::from);
            #[cfg(not(feature = "json"))]
            return Err(CodecError(crate::error::CodecFault::NeedsJson));
        }
        migration.migrate(bytes).map_err(CodecError::from)
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(migrate)) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(undecoded(migration.old_type(), source)),
        Err(_) => Err(crate::Error::MigrationPanicked {
            path: path.to_path_buf(),
            what: what(),
            from: found,
        }),
    }
}

/// Decodes the data of an event written with JSON (`json`) or postcard.
pub(crate) fn decode<E: DeserializeOwned>(
    json: bool,
    bytes: &[u8],
) -> std::result::Result<E, CodecError> {
    if json {
        #[cfg(feature = "json")]
        return serde_json::from_slice(bytes).map_err(CodecError::from);
        #[cfg(not(feature = "json"))]
        return Err(CodecError(crate::error::CodecFault::NeedsJson));
    }
    crate::codec::decode_exact::<E>(bytes).map_err(CodecError::from)
}
