//! The records of a store of cells in a PostgreSQL database, written by one
//! writer fenced by its lease.
//!
//! A store keeps small records under byte-string keys (`backend/mod.rs`); here
//! each is one or more rows of `instastate.records`: a record longer than
//! [`PART`] is cut into parts, numbered from 0, each row saying how many parts
//! its record has, so that a value of any size is stored without one message
//! holding all of it, and a missing part is seen as damage. A commit (a save) is
//! one transaction: [`Lease::fence`] first, then the rows of every key it
//! changes deleted and the new ones inserted, in statements of at most
//! [`STATEMENT_BYTES`], then a notification on the namespace's channel. It is
//! durable once it commits (`synchronous_commit` on).
//!
//! A commit whose connection broke may or may not have happened: it is settled
//! by reading every key of it back on a new connection once the lease row is
//! locked (so that the broken transaction has ended), and made again if it did
//! not happen. A save always changes the store's generation record, so a save
//! read back whole is that save.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use parking_lot::Mutex;
use postgres::{Client, GenericClient, types::ToSql};

use super::{
    Location, column, failed,
    lease::{self, Lease, LeaseSettings, Renewer},
    schema,
};
use crate::{
    Error, Result,
    backend::{Backend, Batch, Records},
};

/// The kind a namespace of this engine records.
const KIND: &str = "a store of cells";

/// The most bytes of a record one row holds.
const PART: usize = 1024 * 1024;

/// About the most bytes of rows one statement carries (at least one row).
const STATEMENT_BYTES: usize = 16 * 1024 * 1024;

/// Inserts rows: `$1` the namespace, then their keys, parts, part counts and
/// bytes.
const INSERT: &str = "
    INSERT INTO instastate.records (namespace, key, part, parts, bytes)
    SELECT $1, r.key, r.part, r.parts, r.bytes
      FROM unnest($2::bytea[], $3::int[], $4::int[], $5::bytea[]) AS r(key, part, parts, bytes)";

/// A store's records in a database, held by its one writer.
pub(crate) struct PgRecords {
    location: Location,
    /// The writer's connection. The store commits one save at a time.
    client: Mutex<Client>,
    lease: Arc<Lease>,
    /// Stopped once closed.
    renewer: Renewer,
}

impl PgRecords {
    /// Opens the store at `location` to write it: prepares the tables, and takes
    /// the namespace's lease, waiting up to `wait` for it.
    ///
    /// # Errors
    /// [`Error::LeaseHeld`] when another writer held the lease all that time;
    /// [`Error::InvalidLocation`] when the namespace holds another kind of
    /// store; [`Error::Database`] and the errors of `schema::prepare`.
    pub(crate) fn open(
        location: &Location,
        settings: LeaseSettings,
        wait: Duration,
    ) -> Result<PgRecords> {
        let (client, lease, renewer) = lease::take(location, KIND, settings, wait)?;
        Ok(PgRecords { location: location.clone(), client: Mutex::new(client), lease, renewer })
    }

    /// Runs `run` on the writer's connection, once more on a new one if that
    /// broke meanwhile; only reads are run so.
    fn reading<T>(&self, run: impl Fn(&mut Client) -> Result<T>) -> Result<T> {
        reading(&self.client, &|| self.lease.connect(), run)
    }

    /// The commit's transaction on `client`: the fence, the rows, the
    /// notification.
    fn write(&self, client: &mut Client, batch: &Batch) -> Result<()> {
        let location = &self.location;
        let namespace = location.namespace();
        let mut tx = client.transaction().map_err(failed(location, "begin a save"))?;
        self.lease.fence(&mut tx)?;
        let keys: Vec<&[u8]> = batch.iter().map(|(key, _)| key.as_slice()).collect();
        tx.execute(
            "DELETE FROM instastate.records WHERE namespace = $1 AND key = ANY($2)",
            &[&namespace, &keys],
        )
        .map_err(failed(location, "delete the records a save replaces"))?;
        let insert = tx.prepare(INSERT).map_err(failed(location, "prepare a save"))?;
        let mut rows = Rows::default();
        for (key, bytes) in batch {
            let Some(bytes) = bytes else { continue };
            let parts: Vec<&[u8]> =
                if bytes.is_empty() { vec![&[]] } else { bytes.chunks(PART).collect() };
            let count = i32::try_from(parts.len()).map_err(|_| self.too_long(key, bytes.len()))?;
            for (part, chunk) in (0..count).zip(parts) {
                if STATEMENT_BYTES < rows.bytes + chunk.len() && !rows.keys.is_empty() {
                    rows.insert(&mut tx, &insert, location)?;
                }
                rows.push(key, part, count, chunk);
            }
        }
        if !rows.keys.is_empty() {
            rows.insert(&mut tx, &insert, location)?;
        }
        tx.execute("SELECT pg_notify($1, '')", &[&super::channel(location)])
            .map_err(failed(location, "notify the store's followers"))?;
        tx.commit().map_err(failed(location, "commit a save"))
    }

    /// Settles a commit of `batch` whose connection broke: on a new connection,
    /// which replaces the broken one, once the lease row is locked (so that the
    /// broken transaction has ended, committed or not), reads every key of it
    /// back. Whether the store holds what `batch` wrote; `Err(Some(..))` when the
    /// lease is lost ([`Error::Fenced`]) or the database fails, `Err(None)` when
    /// no new connection can be made.
    fn resolve(
        &self,
        client: &mut Client,
        batch: &Batch,
    ) -> std::result::Result<bool, Option<Error>> {
        let location = &self.location;
        let Ok(mut fresh) = self.lease.connect() else { return Err(None) };
        let stored = {
            let mut tx = fresh.transaction().map_err(failed(location, "begin a read back"))?;
            tx.execute(
                "SELECT 1 FROM instastate.leases WHERE namespace = $1 FOR UPDATE",
                &[&location.namespace()],
            )
            .map_err(failed(location, "wait for the broken save to end"))?;
            let keys: Vec<Vec<u8>> = batch.iter().map(|(key, _)| key.clone()).collect();
            let found = read(&mut tx, location, Some(&keys))?;
            let stored = batch.iter().all(|(key, bytes)| found.get(key) == bytes.as_ref());
            if !stored {
                self.lease.fence(&mut tx)?;
            }
            stored
        };
        *client = fresh;
        Ok(stored)
    }

    fn too_long(&self, key: &[u8], len: usize) -> Error {
        Error::DatabaseCorrupt {
            location: self.location.to_string(),
            reason: format!(
                "record `{}` is {len} bytes long, more than a store holds",
                String::from_utf8_lossy(key)
            ),
        }
    }
}

impl Backend for PgRecords {
    fn read_all(&self) -> Result<Records> {
        self.reading(|client| read(client, &self.location, None))
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.reading(|client| read_one(client, &self.location, key))
    }

    fn commit(&self, batch: Batch) -> Result<()> {
        if self.renewer.is_stopped() {
            return Err(self.lease.fenced(None));
        }
        let mut client = self.client.lock();
        self.lease.reconnect(&mut client)?;
        match self.write(&mut client, &batch) {
            // The connection broke: the commit may or may not have happened.
            Err(err) if super::broke(&err, &client) => match self.resolve(&mut client, &batch) {
                Ok(true) => Ok(()),
                Ok(false) => self.write(&mut client, &batch),
                Err(Some(other)) => Err(other),
                Err(None) => Err(err),
            },
            done => done,
        }
    }

    /// The database reclaims the space of deleted rows by itself (autovacuum).
    fn compact(&self) -> Result<()> {
        Ok(())
    }

    /// Stops renewing the lease and gives it up, so that a standby takes over at
    /// once; later commits are refused ([`Error::Fenced`]).
    fn close(&self) -> Result<()> {
        if !self.renewer.stop() {
            return Ok(());
        }
        let mut client = self.client.lock();
        self.lease.reconnect(&mut client)?;
        self.lease.release(&mut client)
    }
}

/// A store's records in a database, read by a program that writes none of them
/// and holds no lease: a read-only store, or a follower.
pub(crate) struct PgRecordsReader {
    location: Location,
    client: Mutex<Client>,
}

impl PgRecordsReader {
    /// Opens the store at `location` to read it, writing nothing.
    ///
    /// # Errors
    /// [`Error::InvalidLocation`] when the namespace holds no store of cells;
    /// [`Error::DatabaseSchema`] when the tables are newer than this build;
    /// [`Error::Database`].
    pub(crate) fn open(location: &Location) -> Result<PgRecordsReader> {
        let mut client = location.connect()?;
        schema::check(&mut client, location, KIND)?;
        Ok(PgRecordsReader { location: location.clone(), client: Mutex::new(client) })
    }

    /// Runs `run` on the connection, made again if it broke (reads only).
    fn reading<T>(&self, run: impl Fn(&mut Client) -> Result<T>) -> Result<T> {
        reading(&self.client, &|| self.location.connect(), run)
    }

    fn refused(&self, operation: &'static str) -> Error {
        Error::ReadOnly { path: self.location.to_string().into(), operation }
    }
}

impl Backend for PgRecordsReader {
    fn read_all(&self) -> Result<Records> {
        self.reading(|client| read(client, &self.location, None))
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.reading(|client| read_one(client, &self.location, key))
    }

    fn commit(&self, _: Batch) -> Result<()> {
        Err(self.refused("save_all"))
    }

    fn compact(&self) -> Result<()> {
        Err(self.refused("compact"))
    }

    fn close(&self) -> Result<()> {
        Ok(())
    }
}

/// Rows gathered for one insert.
#[derive(Default)]
struct Rows<'a> {
    keys: Vec<&'a [u8]>,
    parts: Vec<i32>,
    counts: Vec<i32>,
    chunks: Vec<&'a [u8]>,
    bytes: usize,
}

impl<'a> Rows<'a> {
    fn push(&mut self, key: &'a [u8], part: i32, count: i32, chunk: &'a [u8]) {
        self.keys.push(key);
        self.parts.push(part);
        self.counts.push(count);
        self.chunks.push(chunk);
        self.bytes += key.len() + chunk.len();
    }

    /// Inserts the rows gathered, and starts over.
    fn insert(
        &mut self,
        client: &mut impl GenericClient,
        insert: &postgres::Statement,
        location: &Location,
    ) -> Result<()> {
        let namespace = location.namespace();
        let params: [&(dyn ToSql + Sync); 5] =
            [&namespace, &self.keys, &self.parts, &self.counts, &self.chunks];
        client.execute(insert, &params).map_err(failed(location, "write a save's records"))?;
        *self = Rows::default();
        Ok(())
    }
}

/// Runs `run` on `client`, made again by `connect` if it broke before or
/// during the run (reads only, which are safe to repeat).
fn reading<T>(
    client: &Mutex<Client>,
    connect: &dyn Fn() -> Result<Client>,
    run: impl Fn(&mut Client) -> Result<T>,
) -> Result<T> {
    let mut client = client.lock();
    if client.is_closed() {
        *client = connect()?;
    }
    match run(&mut client) {
        Err(err) if super::broke(&err, &client) => {
            *client = connect()?;
            run(&mut client)
        }
        done => done,
    }
}

/// The record `key` of `location`'s namespace, if there is one.
fn read_one(
    client: &mut impl GenericClient,
    location: &Location,
    key: &[u8],
) -> Result<Option<Vec<u8>>> {
    Ok(read(client, location, Some(&[key.to_vec()]))?.remove(key))
}

/// The records of `location`'s namespace: every one, or those of `keys`. A
/// record whose parts are not all there, or disagree on their count, is damage.
fn read(
    client: &mut impl GenericClient,
    location: &Location,
    keys: Option<&[Vec<u8>]>,
) -> Result<Records> {
    let namespace = location.namespace();
    let rows = match keys {
        None => client.query(
            "SELECT key, part, parts, bytes FROM instastate.records WHERE namespace = $1
              ORDER BY key, part",
            &[&namespace],
        ),
        Some(keys) => client.query(
            "SELECT key, part, parts, bytes FROM instastate.records
              WHERE namespace = $1 AND key = ANY($2) ORDER BY key, part",
            &[&namespace, &keys],
        ),
    };
    let rows = rows.map_err(failed(location, "read the store's records"))?;
    let mut records = BTreeMap::new();
    // The record being put together: its key, its part count, its bytes so far,
    // and the next part expected.
    let mut open: Option<(Vec<u8>, i32, Vec<u8>, i32)> = None;
    let damaged = |key: &[u8], reason: &str| Error::DatabaseCorrupt {
        location: location.to_string(),
        reason: format!("record `{}` {reason}", String::from_utf8_lossy(key)),
    };
    for row in &rows {
        let what = || "a record's row".to_owned();
        let key: Vec<u8> = column(location, row, "key", &what)?;
        let part: i32 = column(location, row, "part", &what)?;
        let parts: i32 = column(location, row, "parts", &what)?;
        let bytes: &[u8] = column(location, row, "bytes", &what)?;
        let (at, count, mut held, next) = match open.take() {
            Some((at, count, held, next)) if at == key => (at, count, held, next),
            Some((at, count, _, next)) => {
                return Err(damaged(&at, &format!("has {next} of its {count} parts")));
            }
            None => (key, parts, Vec::new(), 0),
        };
        if part != next || parts != count {
            return Err(damaged(
                &at,
                &format!("has part {part} of {parts} where {next} of {count} belongs"),
            ));
        }
        held.extend_from_slice(bytes);
        if next + 1 == count {
            records.insert(at, held);
        } else {
            open = Some((at, count, held, next + 1));
        }
    }
    if let Some((at, count, _, next)) = open {
        return Err(damaged(&at, &format!("has {next} of its {count} parts")));
    }
    Ok(records)
}

#[cfg(test)]
mod tests;
