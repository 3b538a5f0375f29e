//! instastate's tables in a database: created and upgraded one step per version,
//! and never used when they are newer than this build.
//!
//! Every table is in the schema `instastate` and keyed by namespace. The version
//! is a row of `instastate.meta`. Opening a store runs [`prepare`]: under a
//! transaction-scoped advisory lock (so that processes opening at once upgrade
//! once), it reads the version, refuses a newer one, and runs each missing step in
//! order, in the same transaction: an upgrade happens whole or not at all.

use postgres::{Client, Transaction};

use super::{Location, failed};
use crate::{Error, Result};

/// The steps, in order: step `k` takes the tables from version `k` to `k + 1`.
const STEPS: &[&str] = &[
    // 1: namespaces, and the writer's lease of each.
    "CREATE TABLE instastate.namespaces (
        namespace text PRIMARY KEY,
        kind text NOT NULL,
        created timestamptz NOT NULL DEFAULT clock_timestamp()
    );
    CREATE TABLE instastate.leases (
        namespace text PRIMARY KEY REFERENCES instastate.namespaces,
        epoch bigint NOT NULL,
        holder text NOT NULL,
        expires timestamptz NOT NULL
    );",
    // 2: the event store: its head (the next position, taken under its row lock by
    // every append), its streams, its events.
    "CREATE TABLE instastate.event_heads (
        namespace text PRIMARY KEY REFERENCES instastate.namespaces,
        next_position bigint NOT NULL CHECK (next_position >= 0),
        last_at bigint NOT NULL CHECK (last_at >= 0)
    );
    CREATE TABLE instastate.streams (
        namespace text NOT NULL REFERENCES instastate.namespaces,
        stream text NOT NULL,
        next_version bigint NOT NULL CHECK (next_version >= 0),
        PRIMARY KEY (namespace, stream)
    );
    CREATE TABLE instastate.events (
        namespace text NOT NULL REFERENCES instastate.namespaces,
        position bigint NOT NULL CHECK (position >= 0),
        stream text NOT NULL,
        version bigint NOT NULL CHECK (version >= 0),
        id bytea NOT NULL CHECK (length(id) = 16),
        event_type text NOT NULL,
        at_us bigint NOT NULL CHECK (at_us >= 0),
        causation bytea CHECK (length(causation) = 16),
        correlation bytea CHECK (length(correlation) = 16),
        tags text[] NOT NULL,
        triggers text[] NOT NULL,
        schema integer NOT NULL CHECK (schema >= 0),
        json boolean NOT NULL,
        data bytea NOT NULL,
        PRIMARY KEY (namespace, position),
        UNIQUE (namespace, stream, version),
        UNIQUE (namespace, id)
    );
    CREATE TABLE instastate.event_tags (
        namespace text NOT NULL,
        tag text NOT NULL,
        position bigint NOT NULL,
        PRIMARY KEY (namespace, tag, position),
        FOREIGN KEY (namespace, position) REFERENCES instastate.events
    );",
];

/// The newest version of the tables this build knows.
pub(crate) const KNOWN_VERSION: u64 = STEPS.len() as u64;

/// The advisory lock key under which the tables are created and upgraded.
const UPGRADE_LOCK: i64 = 0x696e_7374_6173_7461; // "instasta"

/// Makes the tables of `location`'s database this build's version, and records
/// `location`'s namespace as holding a store of `kind` (refusing one that holds
/// another kind). Returns the version the tables had.
///
/// # Errors
/// [`Error::DatabaseSchema`] when the tables are newer (nothing changes);
/// [`Error::InvalidLocation`] when the namespace holds another kind of store;
/// [`Error::Database`] when a statement fails.
pub(crate) fn prepare(client: &mut Client, location: &Location, kind: &str) -> Result<u64> {
    let mut tx = client.transaction().map_err(failed(location, "begin a transaction"))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&UPGRADE_LOCK])
        .map_err(failed(location, "lock instastate's tables to upgrade them"))?;
    tx.batch_execute(
        "CREATE SCHEMA IF NOT EXISTS instastate;
         CREATE TABLE IF NOT EXISTS instastate.meta (key text PRIMARY KEY, value bigint NOT NULL);",
    )
    .map_err(failed(location, "create instastate's schema"))?;
    let found = version(&mut tx, location)?;
    if KNOWN_VERSION < found {
        return Err(Error::DatabaseSchema {
            location: location.to_string(),
            found,
            known: KNOWN_VERSION,
        });
    }
    for (step, sql) in STEPS.iter().enumerate().skip(usize::try_from(found).unwrap_or(usize::MAX)) {
        tx.batch_execute(sql).map_err(failed(
            location,
            &format!("upgrade instastate's tables to version {}", step + 1),
        ))?;
    }
    let known = i64::try_from(KNOWN_VERSION).unwrap_or(i64::MAX);
    tx.execute(
        "INSERT INTO instastate.meta (key, value) VALUES ('version', $1)
         ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
        &[&known],
    )
    .map_err(failed(location, "record the version of instastate's tables"))?;
    let namespace = location.namespace();
    tx.execute(
        "INSERT INTO instastate.namespaces (namespace, kind) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        &[&namespace, &kind],
    )
    .map_err(failed(location, "record the namespace"))?;
    let held: String = tx
        .query_one("SELECT kind FROM instastate.namespaces WHERE namespace = $1", &[&namespace])
        .map_err(failed(location, "read the namespace's kind"))?
        .get(0);
    if held != kind {
        return Err(Error::InvalidLocation {
            location: location.to_string(),
            reason: format!("its namespace holds {held}, not {kind}"),
        });
    }
    tx.commit().map_err(failed(location, "commit the upgrade of instastate's tables"))?;
    Ok(found)
}

/// The version the tables are at; 0 before the first step.
fn version(tx: &mut Transaction<'_>, location: &Location) -> Result<u64> {
    let row = tx
        .query_opt("SELECT value FROM instastate.meta WHERE key = 'version'", &[])
        .map_err(failed(location, "read the version of instastate's tables"))?;
    let value: i64 = row.map_or(0, |row| row.get(0));
    u64::try_from(value).map_err(|_| Error::DatabaseSchema {
        location: location.to_string(),
        found: u64::MAX,
        known: KNOWN_VERSION,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postgres::test_server;

    #[test]
    fn tables_are_made_once_even_by_racing_openers_and_a_namespace_keeps_its_kind() -> Result<()> {
        let location = test_server::location("schema-race")?;
        let opened: Vec<Result<u64>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let location = location.clone();
                    scope.spawn(move || {
                        prepare(&mut location.connect()?, &location, "an event store")
                    })
                })
                .collect();
            handles.into_iter().map(|it| it.join().expect("an opener")).collect()
        });
        for res in opened {
            assert!(res? <= KNOWN_VERSION);
        }
        let mut client = location.connect()?;
        assert_eq!(prepare(&mut client, &location, "an event store")?, KNOWN_VERSION);
        let other = prepare(&mut client, &location, "a store of cells");
        assert!(
            matches!(&other, Err(Error::InvalidLocation { reason, .. }) if reason.contains("an event store")),
            "{other:?}"
        );
        Ok(())
    }

    #[test]
    fn tables_newer_than_this_build_are_refused_and_left_as_they_are() -> Result<()> {
        // A database of its own: the version is shared by every namespace of one.
        let location = test_server::database("schema_newer")?.with_namespace("n")?;
        let mut client = location.connect()?;
        prepare(&mut client, &location, "an event store")?;
        let newer = i64::try_from(KNOWN_VERSION + 1).unwrap_or(i64::MAX);
        client
            .execute("UPDATE instastate.meta SET value = $1 WHERE key = 'version'", &[&newer])
            .map_err(failed(&location, "test"))?;
        let res = prepare(&mut client, &location.with_namespace("m")?, "an event store");
        assert!(
            matches!(res, Err(Error::DatabaseSchema { found, known, .. }) if found == KNOWN_VERSION + 1 && known == KNOWN_VERSION),
            "{res:?}"
        );
        let row = client
            .query_one("SELECT count(*) FROM instastate.namespaces WHERE namespace = 'm'", &[])
            .map_err(failed(&location, "test"))?;
        assert_eq!(row.get::<_, i64>(0), 0, "a refused open recorded its namespace");
        Ok(())
    }
}
