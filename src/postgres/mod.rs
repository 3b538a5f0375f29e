//! The PostgreSQL engine (feature `postgres`): stores kept in a PostgreSQL
//! database that several machines reach, at a `postgres://` location.
//!
//! Built so far, and used by the front doors as they move onto it:
//! - [`Location`]: a `postgres://` URL with the store's `namespace`, completed from
//!   the standard `PG*` environment variables, shown without its password;
//! - `schema.rs`: instastate's own tables, created and upgraded one step per
//!   version under an advisory lock, and a database whose tables are newer than
//!   this build refused ([`Error::DatabaseSchema`]);
//! - `tls.rs`: TLS with rustls, as libpq's `sslmode` asks;
//! - `lease.rs`: a store's one writer, fenced by the database: a lease with an
//!   epoch, judged by the database's clock, that every write checks in its own
//!   transaction ([`Error::Fenced`]);
//! - `events.rs`: the event store's engine, for any number of writers: positions
//!   gap-free and in commit order under one head row, expected versions,
//!   idempotent ids and conditional appends checked in the append's transaction,
//!   group commit, and followers woken by `LISTEN`/`NOTIFY`;
//! - `records.rs`: a store of cells' records, in parts, each save one
//!   transaction fenced by the writer's lease;
//! - `journal.rs`: a prevalent system's (or a journaled cell's) journal and
//!   snapshots, written by one writer fenced by its lease.
//!
//! Many namespaces share one database: every table is keyed by namespace, and a
//! namespace records the kind of store it holds.

// The front doors take these up one by one; until then only the tests use some.
#![cfg_attr(not(test), allow(dead_code))]

mod events;
mod journal;
mod lease;
mod location;
mod records;
mod schema;
#[cfg(test)]
#[path = "../../tests/common/postgres.rs"]
mod server;
#[cfg(test)]
pub(crate) mod test_server;
mod tls;

pub(crate) use events::{
    EventRow, PgEvents, Query as EventQuery, effects::STALE_KEYS, watch_commits,
};
pub(crate) use journal::{FrameRow, PgJournal, PgReader};
pub(crate) use lease::LeaseSettings;
pub use location::Location;
pub(crate) use records::{PgRecords, PgRecordsReader};

use crate::{Error, Result, StorageError};

/// An [`Error::Database`] for a failed call of the client, `action` saying what
/// it was doing.
pub(crate) fn failed(location: &Location, action: &str) -> impl Fn(postgres::Error) -> Error {
    let location = location.to_string();
    let action = action.to_owned();
    move |err| Error::Database {
        location: location.clone(),
        action: action.clone(),
        source: StorageError(Box::new(err)),
    }
}

/// Column `at` of `row`, read from `location`'s tables; `what` names the row for
/// the error. A value of another type, or a NULL where the tables allow none,
/// is damage: an error, never a panic.
pub(crate) fn column<'a, T: postgres::types::FromSql<'a>>(
    location: &Location,
    row: &'a postgres::Row,
    at: &str,
    what: &dyn Fn() -> String,
) -> crate::Result<T> {
    row.try_get(at).map_err(|err| Error::DatabaseCorrupt {
        location: location.to_string(),
        reason: format!("column `{at}` of {} cannot be read: {err}", what()),
    })
}

/// A count, version, position or epoch stored as `bigint` in column `at` of
/// `row`: the tables' checks keep it from being negative, and one that is anyway
/// is damage.
pub(crate) fn count(
    location: &Location,
    row: &postgres::Row,
    at: &str,
    what: &dyn Fn() -> String,
) -> crate::Result<u64> {
    let value: i64 = column(location, row, at, what)?;
    u64::try_from(value).map_err(|_| Error::DatabaseCorrupt {
        location: location.to_string(),
        reason: format!("column `{at}` of {} is {value}", what()),
    })
}

/// The channel a commit to `location`'s namespace notifies: `instastate:` and the
/// namespace, cut to the 63 bytes a channel's name holds (namespaces that share
/// their first 52 characters share a channel, and their followers wake for each
/// other's commits, which costs a read and nothing else).
pub(crate) fn channel(location: &Location) -> String {
    let mut channel = format!("instastate:{}", location.namespace());
    // A namespace is ASCII: any cut is a character boundary.
    channel.truncate(63);
    channel
}

/// Whether `err`, from a call on `client`, means that the connection broke (the
/// database restarted or ended it, or the network failed) rather than that the
/// database refused the statement: the client says it is closed, or the error
/// has no SQL state (an I/O error), or one of class 08 (connection exception) or
/// 57 (operator intervention: the server shutting down or ending the session),
/// but for 57014 (a statement cancelled, its connection sound).
/// A broken connection's last statement may or may not have taken effect.
pub(crate) fn broke(err: &Error, client: &postgres::Client) -> bool {
    client.is_closed() || lost_connection(err)
}

/// Whether `err` says that a connection broke, whatever client it came from (see
/// [`broke`]).
pub(crate) fn lost_connection(err: &Error) -> bool {
    let Error::Database { source, .. } = err else { return false };
    let Some(err) = source.0.downcast_ref::<postgres::Error>() else { return false };
    match err.code() {
        None => true,
        // 57014: a statement cancelled (a timeout), on a connection still sound.
        Some(code) => {
            code.code().starts_with("08")
                || (code.code().starts_with("57") && code.code() != "57014")
        }
    }
}

/// `value` as a `bigint` parameter: a count, position or limit past `i64::MAX`
/// (none is stored) reads as `i64::MAX`.
pub(crate) fn i64_of(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Has `client` listen to `location`'s channel (`on`), or stop.
pub(crate) fn listen(client: &mut postgres::Client, location: &Location, on: bool) -> Result<()> {
    let verb = if on { "LISTEN" } else { "UNLISTEN" };
    client
        .batch_execute(&format!("{verb} \"{}\"", channel(location)))
        .map_err(failed(location, "listen for commits"))
}

/// Waits up to `timeout` for a notification on `client` (at once when one came
/// already).
pub(crate) fn wait_for_commit(
    client: &mut postgres::Client,
    location: &Location,
    timeout: std::time::Duration,
) -> Result<()> {
    use postgres::fallible_iterator::FallibleIterator;
    let mut notifications = client.notifications();
    let mut waiting = notifications.timeout_iter(timeout);
    waiting.next().map_err(failed(location, "wait for a commit"))?;
    Ok(())
}

/// Spends the notifications `client` has received: a read after this sees what
/// they announced.
pub(crate) fn spend_notifications(
    client: &mut postgres::Client,
    location: &Location,
) -> Result<()> {
    use postgres::fallible_iterator::FallibleIterator;
    let mut notifications = client.notifications();
    let mut spent = notifications.iter();
    while spent.next().map_err(failed(location, "take notifications"))?.is_some() {}
    Ok(())
}
