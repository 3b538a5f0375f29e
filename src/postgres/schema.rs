//! instastate's tables in a database: created and upgraded one step per version,
//! and never used when they are newer than this build.
//!
//! Every table is in the schema `instastate` and keyed by namespace. The version
//! is a row of `instastate.meta`. Opening a store runs [`prepare`]: it reads the
//! version and refuses a newer one. Only when the tables are older does it take a
//! transaction-scoped advisory lock (so that processes opening at once upgrade
//! once), read the version again, and run each missing step in order, in the same
//! transaction: an upgrade happens whole or not at all.

use postgres::{Client, GenericClient};

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
        schema bigint NOT NULL CHECK (schema >= 0),
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
    // 3: a journal (of a prevalent system): the header of its types, its frames as
    // the journal's files hold them (an event, a void or a check, each checksummed),
    // and its snapshots as snapshot files hold them.
    "CREATE TABLE instastate.journal_heads (
        namespace text PRIMARY KEY REFERENCES instastate.namespaces,
        header bytea NOT NULL
    );
    CREATE TABLE instastate.journal_frames (
        namespace text NOT NULL REFERENCES instastate.namespaces,
        seq bigint NOT NULL CHECK (seq >= 0),
        kind smallint NOT NULL,
        schema bigint NOT NULL CHECK (schema >= 0),
        frame bytea NOT NULL,
        PRIMARY KEY (namespace, seq, kind)
    );
    CREATE TABLE instastate.journal_snapshots (
        namespace text NOT NULL REFERENCES instastate.namespaces,
        events bigint NOT NULL CHECK (events >= 0),
        snapshot bytea NOT NULL,
        PRIMARY KEY (namespace, events)
    );",
    // 4: an append is one statement, which writes only under the head's lock of a
    // recorded namespace: the foreign keys of the event store's rows, checked by a
    // trigger per row, cost more than that statement's other work and guard
    // nothing it could break.
    "ALTER TABLE instastate.events DROP CONSTRAINT events_namespace_fkey;
    ALTER TABLE instastate.streams DROP CONSTRAINT streams_namespace_fkey;
    ALTER TABLE instastate.event_tags DROP CONSTRAINT event_tags_namespace_position_fkey;",
    // 5: a store of cells: its records (`backend/mod.rs`), each in one or more
    // parts, written only under the lease of a recorded namespace.
    "CREATE TABLE instastate.records (
        namespace text NOT NULL,
        key bytea NOT NULL,
        part integer NOT NULL CHECK (part >= 0),
        parts integer NOT NULL CHECK (parts > part),
        bytes bytea NOT NULL,
        PRIMARY KEY (namespace, key, part)
    );",
    // 6: an event store's effects, and its subjects' keys (a forgotten key's row
    // keeps its generation, without its key); events found by their triggers.
    "CREATE TABLE instastate.effects (
        namespace text NOT NULL,
        number bigint NOT NULL CHECK (number >= 0),
        head bigint NOT NULL CHECK (head >= 0),
        trigger text NOT NULL,
        reason text NOT NULL,
        forgotten bigint NOT NULL CHECK (forgotten >= 0),
        at_us bigint NOT NULL,
        PRIMARY KEY (namespace, number)
    );
    CREATE TABLE instastate.subject_keys (
        namespace text NOT NULL,
        subject text NOT NULL,
        generation bigint NOT NULL CHECK (generation >= 0),
        key bytea CHECK (length(key) = 32),
        PRIMARY KEY (namespace, subject, generation)
    );
    CREATE INDEX events_triggers ON instastate.events USING gin (triggers)
        WHERE cardinality(triggers) > 0;",
    // 7: removals: each stream's life (0 live, 1 deleted, 2 tombstoned), the
    // versions below its floor gone, its retention rules; the head counts the
    // removals (so that a writer's plan sees them, see `events.rs`), and says
    // whether any stream has anything removed (else reads check nothing); an
    // event's data is NULL once compaction dropped it.
    "ALTER TABLE instastate.streams
        ADD COLUMN life smallint NOT NULL DEFAULT 0 CHECK (life BETWEEN 0 AND 2),
        ADD COLUMN floor bigint NOT NULL DEFAULT 0 CHECK (floor >= 0),
        ADD COLUMN max_count bigint CHECK (max_count >= 0),
        ADD COLUMN max_age bigint CHECK (max_age >= 0);
    ALTER TABLE instastate.event_heads
        ADD COLUMN removals bigint NOT NULL DEFAULT 0 CHECK (removals >= 0),
        ADD COLUMN ruled boolean NOT NULL DEFAULT false;
    ALTER TABLE instastate.events ALTER COLUMN data DROP NOT NULL;",
];

/// The newest version of the tables this build knows.
pub(crate) const KNOWN_VERSION: u64 = STEPS.len() as u64;

/// The advisory lock key under which the tables are created and upgraded.
const UPGRADE_LOCK: i64 = 0x696e_7374_6173_7461; // "instasta"

/// Makes the tables of `location`'s database this build's version, and records
/// `location`'s namespace as holding a store of `kind` (refusing one that holds
/// another kind). Returns the version the tables had before: that of this build
/// unless this call upgraded them.
///
/// # Errors
/// [`Error::DatabaseSchema`] when the tables are newer (nothing changes);
/// [`Error::InvalidLocation`] when the namespace holds another kind of store;
/// [`Error::Database`] when a statement fails.
pub(crate) fn prepare(client: &mut Client, location: &Location, kind: &str) -> Result<u64> {
    // Most opens find the tables current: they read, and take no lock.
    let mut found = version(client, location)?;
    if found != KNOWN_VERSION {
        found = upgrade(client, location, found)?;
    }
    record_namespace(client, location, kind)?;
    Ok(found)
}

/// Checks, writing nothing, that `location`'s database has tables this build
/// reads and that its namespace holds a store of `kind`: what a read-only open
/// needs.
///
/// # Errors
/// [`Error::DatabaseSchema`] when the tables are newer; [`Error::InvalidLocation`]
/// when the namespace holds no store, or another kind; [`Error::Database`] when a
/// statement fails.
pub(crate) fn check(client: &mut Client, location: &Location, kind: &str) -> Result<()> {
    let found = version(client, location)?;
    refuse_newer(location, found)?;
    let held = if found == 0 { None } else { namespace_kind(client, location)? };
    match held {
        Some(held) if held == kind => Ok(()),
        Some(held) => Err(Error::InvalidLocation {
            location: location.to_string(),
            reason: format!("its namespace holds {held}, not {kind}"),
        }),
        None => Err(Error::InvalidLocation {
            location: location.to_string(),
            reason: format!("its namespace holds no store: {kind} is opened to write first"),
        }),
    }
}

/// The kind of store `location`'s namespace holds, if any.
fn namespace_kind(client: &mut Client, location: &Location) -> Result<Option<String>> {
    let row = client
        .query_opt(
            "SELECT kind FROM instastate.namespaces WHERE namespace = $1",
            &[&location.namespace()],
        )
        .map_err(failed(location, "read the namespace's kind"))?;
    row.map(|row| row.try_get(0)).transpose().map_err(failed(location, "read the namespace's kind"))
}

/// Runs the steps from the version the tables are at once they are locked (`seen`
/// before) to this build's, in one transaction; returns the version they were at.
fn upgrade(client: &mut Client, location: &Location, seen: u64) -> Result<u64> {
    refuse_newer(location, seen)?;
    let mut tx = client.transaction().map_err(failed(location, "begin a transaction"))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&UPGRADE_LOCK])
        .map_err(failed(location, "lock instastate's tables to upgrade them"))?;
    tx.batch_execute(
        "CREATE SCHEMA IF NOT EXISTS instastate;
         CREATE TABLE IF NOT EXISTS instastate.meta (key text PRIMARY KEY, value bigint NOT NULL);",
    )
    .map_err(failed(location, "create instastate's schema"))?;
    // Another process may have upgraded them meanwhile; a table just made holds no
    // version yet.
    let found = stored_version(&mut tx, location)?.unwrap_or(0);
    refuse_newer(location, found)?;
    let done = usize::try_from(found).map_err(|_| newer(location, found))?;
    for (step, sql) in STEPS.iter().enumerate().skip(done) {
        tx.batch_execute(sql).map_err(failed(
            location,
            &format!("upgrade instastate's tables to version {}", step + 1),
        ))?;
    }
    let known = i64::try_from(KNOWN_VERSION).map_err(|_| newer(location, KNOWN_VERSION))?;
    tx.execute(
        "INSERT INTO instastate.meta (key, value) VALUES ('version', $1)
         ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
        &[&known],
    )
    .map_err(failed(location, "record the version of instastate's tables"))?;
    tx.commit().map_err(failed(location, "commit the upgrade of instastate's tables"))?;
    Ok(found)
}

/// Records `location`'s namespace as holding a store of `kind`, unless it is;
/// refuses one that holds another kind.
fn record_namespace(client: &mut Client, location: &Location, kind: &str) -> Result<()> {
    let namespace = location.namespace();
    let read = |client: &mut Client| namespace_kind(client, location);
    let held = if let Some(held) = read(client)? {
        held
    } else {
        client
            .execute(
                "INSERT INTO instastate.namespaces (namespace, kind) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&namespace, &kind],
            )
            .map_err(failed(location, "record the namespace"))?;
        read(client)?.ok_or_else(|| Error::DatabaseCorrupt {
            location: location.to_string(),
            reason: format!("namespace `{namespace}` vanished as it was recorded"),
        })?
    };
    if held != kind {
        return Err(Error::InvalidLocation {
            location: location.to_string(),
            reason: format!("its namespace holds {held}, not {kind}"),
        });
    }
    Ok(())
}

fn newer(location: &Location, found: u64) -> Error {
    Error::DatabaseSchema { location: location.to_string(), found, known: KNOWN_VERSION }
}

fn refuse_newer(location: &Location, found: u64) -> Result<()> {
    if KNOWN_VERSION < found { Err(newer(location, found)) } else { Ok(()) }
}

/// The version the tables are at: 0 before the first step.
fn version(client: &mut Client, location: &Location) -> Result<u64> {
    let meta = client
        .query_one("SELECT to_regclass('instastate.meta') IS NOT NULL", &[])
        .and_then(|row| row.try_get::<_, bool>(0))
        .map_err(failed(location, "read the version of instastate's tables"))?;
    if !meta {
        return Ok(0);
    }
    // The table and its row are made in one transaction: one without the other is
    // damage, not a fresh database.
    stored_version(client, location)?.ok_or_else(|| Error::DatabaseCorrupt {
        location: location.to_string(),
        reason: "instastate.meta holds no version".to_owned(),
    })
}

/// The version `instastate.meta` holds, if it holds one.
fn stored_version(client: &mut impl GenericClient, location: &Location) -> Result<Option<u64>> {
    let read = failed(location, "read the version of instastate's tables");
    let row = client
        .query_opt("SELECT value FROM instastate.meta WHERE key = 'version'", &[])
        .map_err(&read)?;
    let Some(row) = row else { return Ok(None) };
    let value: i64 = row.try_get(0).map_err(&read)?;
    u64::try_from(value).map(Some).map_err(|_| Error::DatabaseCorrupt {
        location: location.to_string(),
        reason: format!("instastate.meta holds version {value}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postgres::test_server;

    #[test]
    fn tables_are_made_once_even_by_racing_openers_and_a_namespace_keeps_its_kind() -> Result<()> {
        // A database of its own, so that the openers find it without tables.
        let location = test_server::database("schema_race")?.with_namespace("n")?;
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
        let found = opened.into_iter().collect::<Result<Vec<u64>>>()?;
        let upgrades = found.iter().filter(|found| **found == 0).count();
        let current = found.iter().filter(|found| **found == KNOWN_VERSION).count();
        assert_eq!((upgrades, current), (1, 3), "the versions the openers found: {found:?}");
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
