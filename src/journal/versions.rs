//! Schema versions of a journal's two types, the state and the events: what a
//! front door writes and reads, the check of a file's header against them, and
//! the reading of an older version through its migration.
//!
//! Every journal file and snapshot records the schema version of each type it was
//! written with. A file of the current version is read as the current type; one of
//! an older version, through the migration (an upcaster) the front door registered
//! from that version, whose old type the file must still match; one of a newer
//! version is refused. The state's current version is [`Identity::schema`]; the
//! events' is [`Versions::event`].

use std::{
    cmp::Ordering,
    panic::{self, AssertUnwindSafe},
    path::Path,
};

use serde::de::DeserializeOwned;

use super::{Identity, format::Header};
use crate::{Error, Migrate, Result, error::CodecError, shape::Shape};

/// One of a journal's two types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    State,
    Events,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::State => "the state",
            Side::Events => "the events",
        }
    }
}

/// The schema versions a journal writes and reads beyond its [`Identity`] (whose
/// `schema` is the state's current version): the events' current version, and the
/// older versions of each type that its front door reads through a migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Versions {
    /// The events' current version, which new files are written with.
    pub(crate) event: u32,
    /// The older versions of the state that can be read.
    pub(crate) older_states: Vec<Older>,
    /// The older versions of the events that can be read.
    pub(crate) older_events: Vec<Older>,
}

impl Default for Versions {
    /// Events of version 1, and no older version of either type.
    fn default() -> Versions {
        Versions {
            event: super::format::FIRST_SCHEMA,
            older_states: Vec::new(),
            older_events: Vec::new(),
        }
    }
}

/// An older version of a type that can be read, and the structure of its type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Older {
    pub(crate) version: u32,
    /// The old type's structure, when it can be traced.
    pub(crate) shape: Option<Shape>,
}

impl Older {
    /// The versions `migrations` read, each with its old type's structure (traced
    /// here: call it once per opening).
    pub(crate) fn of<'m, T: 'm>(
        migrations: impl IntoIterator<Item = &'m dyn Migrate<T>>,
    ) -> Vec<Older> {
        migrations
            .into_iter()
            .map(|migration| Older { version: migration.version(), shape: migration.old_shape() })
            .collect()
    }
}

/// Refuses a file whose header records a schema version this journal cannot read:
/// a newer one than the current, or an older one without a migration for the type
/// the file holds (`holds`; the other type's older versions are not read from it),
/// both [`Error::JournalSchema`]. Refuses as [`Error::JournalType`] a header whose
/// type of the current version has another name or structure than the current
/// type, or whose type of an older version has another structure than the old type
/// of its migration (a migration trusts the version, not the name).
pub(crate) fn check_header(
    header: &Header,
    path: &Path,
    identity: &Identity,
    versions: &Versions,
    holds: Side,
) -> Result<()> {
    let sides = [
        (
            Side::State,
            header.schema,
            identity.schema,
            (&header.state_type, identity.state_type),
            (&header.state_shape, &identity.state_shape),
            &versions.older_states,
        ),
        (
            Side::Events,
            header.event_schema,
            versions.event,
            (&header.event_type, identity.event_type),
            (&header.event_shape, &identity.event_shape),
            &versions.older_events,
        ),
    ];
    let mut renamed = false;
    let mut changes = Vec::new();
    for (side, found, current, (stored_name, name), (stored_shape, shape), older) in sides {
        let what = || format!("{} `{stored_name}`", side.name());
        let compared = match found.cmp(&current) {
            Ordering::Greater => {
                return Err(Error::JournalSchema {
                    path: path.to_path_buf(),
                    what: what(),
                    found,
                    current,
                });
            }
            Ordering::Equal if *stored_name != name => {
                renamed = true;
                continue;
            }
            Ordering::Equal => (shape.as_ref(), side.name().to_owned()),
            // The file holds nothing of this type: its old version is only a record.
            Ordering::Less if side != holds => continue,
            Ordering::Less => {
                let Some(older) = older.iter().find(|it| it.version == found) else {
                    return Err(Error::JournalSchema {
                        path: path.to_path_buf(),
                        what: what(),
                        found,
                        current,
                    });
                };
                let label =
                    format!("{} of schema v{found}, read through its migration", side.name());
                (older.shape.as_ref(), label)
            }
        };
        // A type that could not be traced (now or then) is checked by version alone.
        let (label, (false, Some(expected))) = (compared.1, (stored_shape.is_empty(), compared.0))
        else {
            continue;
        };
        match Shape::decode(stored_shape) {
            Ok(stored) => {
                // An old type is often renamed to be kept beside the new one: its
                // containers' names are not encoded, so they are paired by place.
                let renamed;
                let expected = if found < current {
                    renamed = expected.renamed_like(&stored);
                    &renamed
                } else {
                    expected
                };
                let differences = Shape::differences(&stored, expected);
                changes.extend(differences.into_iter().map(|it| format!("{label}: {it}")));
            }
            Err(fault) => {
                changes.push(format!("{label}: the recorded structure is unreadable ({fault})"));
            }
        }
    }
    if !renamed && changes.is_empty() {
        return Ok(());
    }
    Err(Error::JournalType {
        path: path.to_path_buf(),
        stored: describe(
            &header.state_type,
            header.schema,
            &header.event_type,
            header.event_schema,
        ),
        expected: describe(
            identity.state_type,
            identity.schema,
            identity.event_type,
            versions.event,
        ),
        changes,
    })
}

/// A journal's types and their schema versions, as error messages name them.
pub(crate) fn describe(
    state_type: &str,
    schema: u32,
    event_type: &str,
    event_schema: u32,
) -> String {
    format!(
        "state `{state_type}` (schema v{schema}) with events `{event_type}` (schema v{event_schema})"
    )
}

/// Where bytes being decoded come from, for error messages: the journal file or
/// snapshot, and which event or the snapshot (`what`).
#[derive(Clone, Copy)]
pub(crate) struct Place<'a> {
    pub(crate) path: &'a Path,
    pub(crate) what: &'a dyn Fn() -> String,
}

/// Decodes `bytes`, written with schema version `found` of a type whose current
/// version is `current` and current type `T`: as a `T`, or as the old type of the
/// migration from `found`, migrated.
///
/// # Errors
/// [`Error::JournalSchema`] for a newer version or an older one without a
/// migration; [`Error::JournalDecode`] when the bytes do not decode as the type of
/// their version; [`Error::MigrationPanicked`] when the migration panics.
pub(crate) fn decode<'m, T: DeserializeOwned + 'm>(
    bytes: &[u8],
    found: u32,
    current: u32,
    migrations: impl IntoIterator<Item = &'m dyn Migrate<T>>,
    place: Place<'_>,
) -> Result<T> {
    if found == current {
        return super::decode(bytes, place.path, place.what);
    }
    let refused = || Error::JournalSchema {
        path: place.path.to_path_buf(),
        what: (place.what)(),
        found,
        current,
    };
    if current < found {
        return Err(refused());
    }
    let migration = migrations.into_iter().find(|it| it.version() == found).ok_or_else(refused)?;
    match panic::catch_unwind(AssertUnwindSafe(|| migration.migrate(bytes))) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(Error::JournalDecode {
            path: place.path.to_path_buf(),
            what: (place.what)(),
            type_name: migration.old_type().to_owned(),
            source: CodecError::from(source),
        }),
        Err(_) => Err(Error::MigrationPanicked {
            path: place.path.to_path_buf(),
            what: (place.what)(),
            from: found,
        }),
    }
}
