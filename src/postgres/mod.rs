//! The PostgreSQL engine (feature `postgres`): stores kept in a PostgreSQL
//! database that several machines reach, at a `postgres://` location.
//!
//! Built so far, and used by the front doors as they move onto it:
//! - [`Location`]: a `postgres://` URL with the store's `namespace`, completed from
//!   the standard `PG*` environment variables, shown without its password;
//! - `schema.rs`: instastate's own tables, created and upgraded one step per
//!   version under an advisory lock, and a database whose tables are newer than
//!   this build refused ([`Error::DatabaseSchema`]);
//! - `lease.rs`: a store's one writer, fenced by the database: a lease with an
//!   epoch, judged by the database's clock, that every write checks in its own
//!   transaction ([`Error::Fenced`]).
//!
//! Many namespaces share one database: every table is keyed by namespace, and a
//! namespace records the kind of store it holds.

// The front doors take these up one by one; until then only the tests use some.
#![cfg_attr(not(test), allow(dead_code))]

mod events;
mod lease;
mod location;
mod schema;
#[cfg(test)]
pub(crate) mod test_server;
mod tls;

pub use location::Location;

use crate::{Error, StorageError};

/// An [`Error::Database`] for a failed call of the client, `action` saying what
/// it was doing.
pub(crate) fn failed(location: &Location, action: &str) -> impl FnOnce(postgres::Error) -> Error {
    let location = location.to_string();
    let action = action.to_owned();
    move |err| Error::Database { location, action, source: StorageError(Box::new(err)) }
}
