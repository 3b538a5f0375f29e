//! A journal (of a prevalent system) in a PostgreSQL database, written by one
//! writer fenced by its lease.
//!
//! The journal's writer (`journal/writer.rs`) numbers, stamps and frames events,
//! groups concurrent callers and runs their jobs as it does for files; what it
//! would write to a file it hands to [`PgJournal::write`], which stores each frame
//! (an event, a void, a check: the same checksummed bytes a file holds) as a row
//! of `instastate.journal_frames`, all of one write in one statement ([`WRITE`],
//! one round trip and one transaction) that reads the writer's lease row `FOR
//! SHARE` and inserts nothing unless the lease is the writer's and live, as
//! [`Lease::fence`] does. A write is durable when that statement commits
//! (`synchronous_commit` on): in every durability mode, a write the writer makes
//! is a commit. A snapshot is a row of
//! `instastate.journal_snapshots` holding the bytes a snapshot file would, written
//! in a fenced transaction, and only once it committed does the journal count it
//! (the snapshot generation never runs ahead of what is stored). The journal's
//! header (its types, schema versions and key check) is the row of
//! `instastate.journal_heads`, checked at every opening as a file's header is.
//!
//! Opening takes the namespace's lease, waiting for it, and a thread renews it;
//! a renewal or a write that finds the lease lost makes every later write fail
//! with [`Error::Fenced`].

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use parking_lot::Mutex;
use postgres::{Client, Statement};

use super::{
    Location, column, count, failed, i64_of,
    lease::{self, Lease, LeaseSettings, Renewer},
    schema,
};
use crate::{
    Error, Result,
    journal::format::{self, Frame, Read},
};

/// The kind a namespace of this engine records.
const KIND: &str = "a prevalent system";

/// The frames' kinds, as the rows hold them.
const KIND_EVENT: i16 = 0;
const KIND_VOID: i16 = 1;
const KIND_CHECK: i16 = 2;

/// A journal's place in a database, held by its one writer.
pub(crate) struct PgJournal {
    location: Location,
    /// The connection the journal's writes go through (under the writer's output
    /// lock), and another for everything else: a snapshot must not wait for a
    /// write, whose jobs may wait for the state the snapshot holds.
    writes: Mutex<Writes>,
    others: Mutex<Client>,
    lease: Arc<Lease>,
    /// The events' schema version the frames written now record.
    event_schema: AtomicU32,
    renewer: Renewer,
}

/// The writes' connection, and its prepared statement.
struct Writes {
    client: Client,
    insert: Option<Statement>,
}

/// One write, in one statement (so in one transaction, and one round trip): it
/// reads the lease row `FOR SHARE` (a takeover waits for the write), inserts the
/// frames only if the lease is the writer's epoch (`$2`) and live, and notifies
/// the followers if it did; it returns the lease's epoch (none without a lease
/// row) and the frames written.
const WRITE: &str = "
    WITH lease AS (
        SELECT epoch, expires > clock_timestamp() AS live FROM instastate.leases
         WHERE namespace = $1 FOR SHARE
    ), written AS (
        INSERT INTO instastate.journal_frames (namespace, seq, kind, schema, frame)
        SELECT $1, f.seq, f.kind, $3, f.frame
          FROM unnest($4::bigint[], $5::smallint[], $6::bytea[]) AS f(seq, kind, frame)
         WHERE EXISTS (SELECT 1 FROM lease WHERE epoch = $2 AND live)
        RETURNING 1
    )
    SELECT (SELECT epoch FROM lease) AS epoch,
           (SELECT count(*) FROM written) AS written,
           CASE WHEN (SELECT count(*) FROM written) > 0 THEN pg_notify($7, '') END AS notified";

/// A frame row read back.
pub(crate) struct FrameRow {
    pub(crate) seq: u64,
    pub(crate) schema: u32,
    pub(crate) frame: Vec<u8>,
}

impl PgJournal {
    /// Opens the journal at `location`: prepares the tables, and takes the
    /// namespace's lease, waiting up to `wait` for it.
    ///
    /// # Errors
    /// [`Error::LeaseHeld`] when another writer held the lease all that time;
    /// [`Error::Database`] and the errors of `schema::prepare`.
    pub(crate) fn open(
        location: &Location,
        settings: LeaseSettings,
        wait: Duration,
    ) -> Result<PgJournal> {
        let (client, lease, renewer) = lease::take(location, KIND, settings, wait)?;
        let others = lease.connect()?;
        Ok(PgJournal {
            location: location.clone(),
            writes: Mutex::new(Writes { client, insert: None }),
            others: Mutex::new(others),
            lease,
            event_schema: AtomicU32::new(0),
            renewer,
        })
    }

    /// Runs `run` on the connection for everything but the journal's writes;
    /// once more on a new connection if that one broke meanwhile (the database
    /// restarted, or ended it). Everything run so is idempotent.
    fn with_others<T>(&self, run: impl Fn(&mut Client) -> Result<T>) -> Result<T> {
        let mut client = self.others.lock();
        self.lease.reconnect(&mut client)?;
        match run(&mut client) {
            Err(err) if super::broke(&err, &client) => {
                *client = self.lease.connect()?;
                run(&mut client)
            }
            done => done,
        }
    }

    /// The location, without its password, as errors name it.
    pub(crate) fn label(&self) -> String {
        self.location.to_string()
    }

    /// The journal's header, if it has one yet.
    pub(crate) fn header(&self) -> Result<Option<Vec<u8>>> {
        self.with_others(|client| read_header(client, &self.location))
    }

    /// The newest snapshot: the events it covers and its bytes.
    pub(crate) fn newest_snapshot(&self) -> Result<Option<(u64, Vec<u8>)>> {
        self.with_others(|client| read_newest_snapshot(client, &self.location))
    }

    /// The events the newest snapshot covers, without reading it.
    pub(crate) fn newest_snapshot_events(&self) -> Result<Option<u64>> {
        self.with_others(|client| read_newest_snapshot_events(client, &self.location))
    }

    /// The frames of the events from `from` on, and every void and check frame
    /// that may concern them, in order of event number.
    pub(crate) fn frames_from(&self, from: u64) -> Result<Vec<FrameRow>> {
        self.with_others(|client| read_frames(client, &self.location, from))
    }

    /// Records `header` (the journal's types, versions and key check, encoded as
    /// a file's header) as the journal's, and `event_schema` as the events'
    /// schema version of the frames written from now on.
    pub(crate) fn set_header(&self, header: &[u8], event_schema: u32) -> Result<()> {
        let location = &self.location;
        self.with_others(|client| {
            let mut tx = client.transaction().map_err(failed(location, "begin a write"))?;
            self.lease.fence(&mut tx)?;
            write_header(&mut tx, location, header)?;
            tx.commit().map_err(failed(location, "commit the journal's header"))
        })?;
        self.event_schema.store(event_schema, Ordering::Release);
        Ok(())
    }

    /// Stores the frames `bytes` holds (as the writer frames them for a file),
    /// durably, in one transaction fenced by the lease.
    ///
    /// # Errors
    /// [`Error::Fenced`] when the lease is lost; [`Error::Database`] when the
    /// database fails; [`Error::DatabaseCorrupt`] for bytes that are not frames
    /// (a bug).
    pub(crate) fn write(&self, bytes: &[u8]) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let mut rows: Vec<(i64, i16, &[u8])> = Vec::new();
        let mut at = 0;
        while let Read::Frame(frame, len) = format::read_frame(bytes.get(at..).unwrap_or_default())
        {
            let (seq, kind) = match frame {
                Frame::Event { seq, .. } => (seq, KIND_EVENT),
                Frame::Void { first, .. } => (first, KIND_VOID),
                Frame::Check { seq, .. } => (seq, KIND_CHECK),
                // Links join files: a database has none.
                Frame::Link { .. } => {
                    at += len;
                    continue;
                }
            };
            rows.push((i64_of(seq), kind, bytes.get(at..at + len).unwrap_or_default()));
            at += len;
        }
        if at != bytes.len() {
            return Err(Error::DatabaseCorrupt {
                location: self.location.to_string(),
                reason: format!("the journal was handed bytes that are not frames at byte {at}"),
            });
        }
        let mut writes = self.writes.lock();
        if self.lease.reconnect(&mut writes.client)? {
            writes.insert = None;
        }
        let written = self.insert(&mut writes, &rows);
        let Some(&last) = rows.last() else { return written };
        match written {
            // The connection broke: the commit may or may not have happened. Read
            // back, the write is done, or it is made again on a new connection.
            Err(err) if super::broke(&err, &writes.client) => match self.resolve(&mut writes, last)
            {
                Ok(true) => Ok(()),
                Ok(false) => self.insert(&mut writes, &rows),
                Err(Some(fenced)) => Err(fenced),
                Err(None) => Err(err),
            },
            written => written,
        }
    }

    /// The write's one statement ([`WRITE`]): the fence, the frames `rows`, the
    /// notification.
    fn insert(&self, writes: &mut Writes, rows: &[(i64, i16, &[u8])]) -> Result<()> {
        let location = &self.location;
        let statement = if let Some(statement) = &writes.insert {
            statement.clone()
        } else {
            let statement = writes
                .client
                .prepare(WRITE)
                .map_err(failed(location, "prepare the journal's write"))?;
            writes.insert = Some(statement.clone());
            statement
        };
        let epoch = i64::try_from(self.lease.epoch()).unwrap_or(i64::MAX);
        let schema = i64::from(self.event_schema.load(Ordering::Acquire));
        let seqs: Vec<i64> = rows.iter().map(|row| row.0).collect();
        let kinds: Vec<i16> = rows.iter().map(|row| row.1).collect();
        let frames: Vec<&[u8]> = rows.iter().map(|row| row.2).collect();
        let channel = super::channel(location);
        let params: [&(dyn postgres::types::ToSql + Sync); 7] =
            [&location.namespace(), &epoch, &schema, &seqs, &kinds, &frames, &channel];
        let row = writes
            .client
            .query_one(&statement, &params)
            .map_err(failed(location, "write to the journal"))?;
        let what = || "the journal's write".to_owned();
        let written = count(location, &row, "written", &what)?;
        if written == rows.len() as u64 {
            return Ok(());
        }
        let current: Option<i64> = column(location, &row, "epoch", &what)?;
        Err(self.lease.fenced(current.and_then(|it| u64::try_from(it).ok())))
    }

    /// Settles a write whose connection broke, whose last frame is `last` (its
    /// number, kind and bytes): on a new connection, which replaces the broken
    /// one, once the lease row is locked (so that the broken write's transaction
    /// has ended, committed or not), reads the frame back. Whether it is stored
    /// (the same bytes: a successor that took the lease over meanwhile numbers its
    /// own events from the same place); `Err(Some(..))` when the lease is lost
    /// ([`Error::Fenced`]) or the database fails, `Err(None)` when no new
    /// connection can be made.
    fn resolve(
        &self,
        writes: &mut Writes,
        (seq, kind, frame): (i64, i16, &[u8]),
    ) -> std::result::Result<bool, Option<Error>> {
        let location = &self.location;
        let Ok(mut fresh) = location.connect() else { return Err(None) };
        self.lease.guard(&mut fresh)?;
        let stored = {
            let mut tx = fresh.transaction().map_err(failed(location, "begin a read back"))?;
            tx.execute(
                "SELECT 1 FROM instastate.leases WHERE namespace = $1 FOR UPDATE",
                &[&location.namespace()],
            )
            .map_err(failed(location, "wait for the broken write to end"))?;
            let stored = tx
                .query_opt(
                    "SELECT 1 FROM instastate.journal_frames
                      WHERE namespace = $1 AND seq = $2 AND kind = $3 AND frame = $4",
                    &[&location.namespace(), &seq, &kind, &frame],
                )
                .map_err(failed(location, "read a write back"))?
                .is_some();
            if !stored {
                self.lease.fence(&mut tx)?;
            }
            stored
        };
        *writes = Writes { client: fresh, insert: None };
        Ok(stored)
    }

    /// Stores the snapshot `bytes` covering `events` events, then deletes the
    /// snapshots beyond the newest `keep`, and the frames of events the oldest
    /// kept one covers (`retire`), in one transaction fenced by the lease.
    pub(crate) fn snapshot(
        &self,
        bytes: &[u8],
        events: u64,
        keep: usize,
        retire: bool,
    ) -> Result<()> {
        self.with_others(|client| self.store_snapshot(client, bytes, events, keep, retire))
    }

    /// [`snapshot`](Self::snapshot)'s transaction, on `client`.
    fn store_snapshot(
        &self,
        client: &mut Client,
        bytes: &[u8],
        events: u64,
        keep: usize,
        retire: bool,
    ) -> Result<()> {
        let location = &self.location;
        let namespace = location.namespace();
        let mut tx = client.transaction().map_err(failed(location, "begin a snapshot"))?;
        self.lease.fence(&mut tx)?;
        tx.execute(
            "INSERT INTO instastate.journal_snapshots (namespace, events, snapshot) VALUES ($1, $2, $3)
             ON CONFLICT (namespace, events) DO UPDATE SET snapshot = EXCLUDED.snapshot",
            &[&namespace, &i64_of(events), &bytes],
        )
        .map_err(failed(location, "write a snapshot"))?;
        let keep = i64::try_from(keep.max(1)).unwrap_or(i64::MAX);
        let oldest = tx
            .query_one(
                "SELECT min(events) AS oldest FROM (SELECT events FROM instastate.journal_snapshots
                  WHERE namespace = $1 ORDER BY events DESC LIMIT $2) kept",
                &[&namespace, &keep],
            )
            .map_err(failed(location, "find the snapshots kept"))?;
        let oldest: Option<i64> =
            column(location, &oldest, "oldest", &|| "the snapshots kept".to_owned())?;
        if let Some(oldest) = oldest {
            tx.execute(
                "DELETE FROM instastate.journal_snapshots WHERE namespace = $1 AND events < $2",
                &[&namespace, &oldest],
            )
            .map_err(failed(location, "delete old snapshots"))?;
            if retire {
                tx.execute(
                    "DELETE FROM instastate.journal_frames WHERE namespace = $1 AND seq < $2
                       AND kind <> $3",
                    &[&namespace, &oldest, &KIND_VOID],
                )
                .map_err(failed(location, "delete the frames the snapshots hold"))?;
            }
        }
        tx.commit().map_err(failed(location, "commit a snapshot"))
    }

    /// Stops renewing the lease and gives it up, so that a standby takes over at
    /// once. Once closed, every write is refused by the fence.
    pub(crate) fn close(&self) -> Result<()> {
        if !self.renewer.stop() {
            return Ok(());
        }
        self.with_others(|client| self.lease.release(client))
    }
}

/// A follower's connection to a journal in a database: it reads, writes nothing,
/// and holds no lease. It listens to the namespace's channel, which each of the
/// writer's commits notifies.
pub(crate) struct PgReader {
    location: Location,
    client: Client,
    /// Whether it listens to the namespace's channel (a follower's does; one that
    /// only asks where the journal is does not).
    listening: bool,
}

impl PgReader {
    /// Connects to the journal at `location`, recording the namespace as a
    /// prevalent system's if it is new.
    pub(crate) fn open(location: &Location) -> Result<PgReader> {
        let mut client = location.connect()?;
        schema::prepare(&mut client, location, KIND)?;
        super::listen(&mut client, location, true)?;
        Ok(PgReader { location: location.clone(), client, listening: true })
    }

    /// A reader of the journal at `location` that does not listen, for questions
    /// (the namespace is one `open` prepared already).
    pub(crate) fn quiet(location: &Location) -> Result<PgReader> {
        let client = location.connect()?;
        Ok(PgReader { location: location.clone(), client, listening: false })
    }

    /// The location, without its password, as errors name it.
    pub(crate) fn label(&self) -> String {
        self.location.to_string()
    }

    /// Runs `run`; once more on a new connection if this one broke meanwhile.
    fn read<T>(&mut self, run: impl Fn(&mut Client, &Location) -> Result<T>) -> Result<T> {
        match run(&mut self.client, &self.location) {
            Err(err) if super::broke(&err, &self.client) => {
                let mut client = self.location.connect()?;
                if self.listening {
                    super::listen(&mut client, &self.location, true)?;
                }
                self.client = client;
                run(&mut self.client, &self.location)
            }
            done => done,
        }
    }

    pub(crate) fn header(&mut self) -> Result<Option<Vec<u8>>> {
        self.read(read_header)
    }

    pub(crate) fn newest_snapshot(&mut self) -> Result<Option<(u64, Vec<u8>)>> {
        self.read(read_newest_snapshot)
    }

    /// The events the newest snapshot covers, without reading it.
    pub(crate) fn newest_snapshot_events(&mut self) -> Result<Option<u64>> {
        self.read(read_newest_snapshot_events)
    }

    pub(crate) fn frames_from(&mut self, from: u64) -> Result<Vec<FrameRow>> {
        self.read(|client, location| read_frames(client, location, from))
    }

    /// The number of the writer's next event, as far as the database holds: one
    /// past the last event stored, or the events the newest snapshot covers.
    pub(crate) fn head(&mut self) -> Result<u64> {
        self.read(|client, location| {
            let row = client
                .query_one(
                    "SELECT greatest(
                        (SELECT max(seq) + 1 FROM instastate.journal_frames
                          WHERE namespace = $1 AND kind = $2),
                        (SELECT max(events) FROM instastate.journal_snapshots
                          WHERE namespace = $1),
                        0) AS head",
                    &[&location.namespace(), &KIND_EVENT],
                )
                .map_err(failed(location, "read the journal's head"))?;
            count(location, &row, "head", &|| "the journal's head".to_owned())
        })
    }

    /// Waits up to `timeout` for a commit's notification (any that came since the
    /// last wait ends it at once).
    pub(crate) fn wait(&mut self, timeout: Duration) -> Result<()> {
        super::wait_for_commit(&mut self.client, &self.location, timeout)?;
        super::spend_notifications(&mut self.client, &self.location)
    }
}

/// The journal's header at `location`, if it has one yet.
/// Records `header` as the header of `location`'s namespace.
pub(super) fn write_header(
    client: &mut impl postgres::GenericClient,
    location: &Location,
    header: &[u8],
) -> Result<()> {
    client
        .execute(
            "INSERT INTO instastate.journal_heads (namespace, header) VALUES ($1, $2)
             ON CONFLICT (namespace) DO UPDATE SET header = EXCLUDED.header",
            &[&location.namespace(), &header],
        )
        .map_err(failed(location, "record the header of the stored types"))?;
    Ok(())
}

pub(super) fn read_header(
    client: &mut impl postgres::GenericClient,
    location: &Location,
) -> Result<Option<Vec<u8>>> {
    let row = client
        .query_opt(
            "SELECT header FROM instastate.journal_heads WHERE namespace = $1",
            &[&location.namespace()],
        )
        .map_err(failed(location, "read the journal's header"))?;
    row.map(|row| column(location, &row, "header", &|| "the journal's header".to_owned()))
        .transpose()
}

/// The newest snapshot at `location`: the events it covers and its bytes.
fn read_newest_snapshot(
    client: &mut Client,
    location: &Location,
) -> Result<Option<(u64, Vec<u8>)>> {
    let row = client
        .query_opt(
            "SELECT events, snapshot FROM instastate.journal_snapshots
              WHERE namespace = $1 ORDER BY events DESC LIMIT 1",
            &[&location.namespace()],
        )
        .map_err(failed(location, "read the newest snapshot"))?;
    let Some(row) = row else { return Ok(None) };
    let what = || "the newest snapshot".to_owned();
    Ok(Some((count(location, &row, "events", &what)?, column(location, &row, "snapshot", &what)?)))
}

/// The events the newest snapshot at `location` covers, without reading it.
fn read_newest_snapshot_events(client: &mut Client, location: &Location) -> Result<Option<u64>> {
    let row = client
        .query_one(
            "SELECT max(events) AS events FROM instastate.journal_snapshots WHERE namespace = $1",
            &[&location.namespace()],
        )
        .map_err(failed(location, "look for a newer snapshot"))?;
    let events: Option<i64> =
        column(location, &row, "events", &|| "the newest snapshot".to_owned())?;
    Ok(events.and_then(|it| u64::try_from(it).ok()))
}

/// The frames at `location` of the events from `from` on, and every void frame,
/// in order of event number.
fn read_frames(client: &mut Client, location: &Location, from: u64) -> Result<Vec<FrameRow>> {
    let rows = client
        .query(
            "SELECT seq, schema, frame FROM instastate.journal_frames
              WHERE namespace = $1 AND (seq >= $2 OR kind = $3) ORDER BY seq, kind",
            &[&location.namespace(), &i64_of(from), &KIND_VOID],
        )
        .map_err(failed(location, "read the journal"))?;
    rows.iter()
        .map(|row| {
            let seq = count(location, row, "seq", &|| "a frame".to_owned())?;
            let what = || format!("the frame of event {seq}");
            let schema = count(location, row, "schema", &what)?;
            Ok(FrameRow {
                seq,
                schema: u32::try_from(schema).map_err(|_| Error::DatabaseCorrupt {
                    location: location.to_string(),
                    reason: format!("{} records schema version {schema}", what()),
                })?,
                frame: column(location, row, "frame", &what)?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests;
