//! Removals in an event store in a database: a stream's life (deleted or
//! tombstoned, the floor below which its versions are gone, its retention rules)
//! is its row of `instastate.streams`, changed in a transaction that locks the
//! head as appends do and counts the change in the head's `removals` (see
//! [`Known`](super::Known)); readers pass over what it hides ([`VISIBLE`]), and
//! compaction drops the data of what it hides for good.

use postgres::{Client, Row};

use super::{DELETED, PgEvents, TOMBSTONED, lock_head};
use crate::{
    Error, Result,
    events::{Compacted, batch::Rules, index::Life},
    postgres::{Location, column, count, failed, i64_of},
};

impl PgEvents {
    /// Drops the data of the events the store will never read again: those of
    /// tombstoned streams, and those below a stream's floor (deleted or
    /// truncated). What a retention rule hides is first made permanent, in a
    /// transaction that locks the head: each such stream's floor rises to the first
    /// version the rule still shows, as a truncation would. The data is then set
    /// to NULL in one statement that takes no lock appends wait for, and the
    /// events' table vacuumed, which makes the room free for the database to reuse
    /// (the role must own the table, or the database skips it with a warning;
    /// autovacuum does it later either way). Every read gives what it gave before.
    pub(crate) fn compact(&self) -> Result<Compacted> {
        let location = &self.location;
        let namespace = location.namespace();
        let mut client = location.connect()?;
        let streams_truncated = {
            let mut tx = client.transaction().map_err(failed(location, "begin a compaction"))?;
            lock_head(&mut tx, location)?;
            let truncated = tx
                .execute(SETTLE_RETENTION, &[&namespace])
                .map_err(failed(location, "make what retention rules hide permanent"))?;
            if 0 < truncated {
                tx.execute(COUNT_REMOVAL, &[&namespace])
                    .map_err(failed(location, "count a removal in the head"))?;
            }
            tx.commit().map_err(failed(location, "commit a compaction's truncations"))?;
            truncated
        };
        let what = || "the events' data".to_owned();
        let row = client
            .query_one(
                "SELECT COALESCE(sum(length(data)), 0)::bigint AS bytes FROM instastate.events
                  WHERE namespace = $1",
                &[&namespace],
            )
            .map_err(failed(location, "measure the events' data"))?;
        let bytes_before = count(location, &row, "bytes", &what)?;
        let row = client
            .query_one(DROP_DATA, &[&namespace])
            .map_err(failed(location, "drop the data of removed events"))?;
        let events_dropped = count(location, &row, "events", &what)?;
        let bytes_dropped = count(location, &row, "bytes", &what)?;
        if 0 < events_dropped {
            client
                .batch_execute("VACUUM instastate.events")
                .map_err(failed(location, "vacuum the events' table"))?;
        }
        Ok(Compacted {
            files: 0,
            bytes_before,
            bytes_after: bytes_before.saturating_sub(bytes_dropped),
            events_dropped,
            streams_truncated,
        })
    }

    /// The life of `stream` (what was removed of it, its retention rules) and its
    /// next version.
    pub(crate) fn stream_life(&self, stream: &str) -> Result<(Life, u64)> {
        let row = self.with_reader(|client| {
            client
                .query_opt(
                    &format!(
                        "SELECT {LIFE_COLUMNS} FROM instastate.streams
                          WHERE namespace = $1 AND stream = $2"
                    ),
                    &[&self.location.namespace(), &stream],
                )
                .map_err(failed(&self.location, "read a stream's life"))
        })?;
        row.map_or(Ok((Life::default(), 0)), |row| life_of(&self.location, &row, stream))
    }

    /// Changes the life of `stream` (what is removed of it, its retention rules)
    /// to what `decide` makes of it and of its next version, if anything. In a
    /// transaction that first locks the head, as appends do, and counts the
    /// change in it (see [`Known`]). A connection found broken before the commit
    /// was asked for (a pooled one the server closed meanwhile) changed nothing:
    /// the transaction runs again on a new one. Not repeated when it breaks at the
    /// commit: the change may then be made or not, and the caller is told.
    pub(crate) fn change_life(
        &self,
        stream: &str,
        decide: impl Fn(Life, u64) -> Result<Option<Life>>,
    ) -> Result<()> {
        let committing = std::cell::Cell::new(false);
        self.readers.run_again_if(
            || self.location.connect(),
            |client| change_life_in(client, &self.location, stream, &decide, &committing),
            || !committing.get(),
        )
    }
}

/// Whether the event `e` of namespace `$1` is one readers see: not removed by its
/// stream's life (deleted or truncated below its floor, tombstoned, or outside its
/// retention rules, by the database's clock, which stamped it). Checked only in a
/// namespace where something was ever removed.
pub(super) const VISIBLE: &str =
    "(NOT (SELECT ruled FROM instastate.event_heads WHERE namespace = $1)
    OR NOT EXISTS (
        SELECT 1 FROM instastate.streams s
         WHERE s.namespace = $1 AND s.stream = e.stream
           AND (s.life = 2 OR e.version < s.floor
                OR e.version < s.next_version - s.max_count
                OR e.at_us < (extract(epoch FROM clock_timestamp()) * 1000000)::bigint
                             - s.max_age)))";

/// Raises the floor of each stream of namespace `$1` whose retention rules hide
/// versions above it to the first version the rules still show: the age rule's
/// by the events' timestamps, which never go down along a stream's versions.
const SETTLE_RETENTION: &str = "WITH due AS (
    SELECT s.stream, GREATEST(
        CASE WHEN s.max_count IS NULL THEN 0 ELSE s.next_version - s.max_count END,
        CASE WHEN s.max_age IS NULL THEN 0 ELSE COALESCE(
            (SELECT min(e.version) FROM instastate.events e
              WHERE e.namespace = $1 AND e.stream = s.stream
                AND e.at_us >= (extract(epoch FROM clock_timestamp()) * 1000000)::bigint
                               - s.max_age),
            s.next_version) END) AS visible
      FROM instastate.streams s
     WHERE s.namespace = $1 AND s.life <> 2
       AND (s.max_count IS NOT NULL OR s.max_age IS NOT NULL)
 )
 UPDATE instastate.streams s SET floor = d.visible FROM due d
  WHERE s.namespace = $1 AND s.stream = d.stream AND s.floor < d.visible";

/// Counts a change of streams' lives in the head of namespace `$1` (see
/// [`Known`](super::Known)), and marks it as one whose reads check them.
const COUNT_REMOVAL: &str =
    "UPDATE instastate.event_heads SET removals = removals + 1, ruled = true
  WHERE namespace = $1";

/// Sets to NULL the data of the events of namespace `$1` that no reader will see
/// again (tombstoned, or below their stream's floor), and says how many and how
/// many bytes of data. A row another compaction dropped meanwhile (which this one
/// waited for) is checked again, and neither dropped nor counted twice.
const DROP_DATA: &str = "WITH target AS (
    SELECT e.position, length(e.data) AS bytes
      FROM instastate.events e JOIN instastate.streams s
        ON s.namespace = e.namespace AND s.stream = e.stream
     WHERE e.namespace = $1 AND e.data IS NOT NULL AND (s.life = 2 OR e.version < s.floor)
 ), dropped AS (
    UPDATE instastate.events e SET data = NULL FROM target t
     WHERE e.namespace = $1 AND e.position = t.position AND e.data IS NOT NULL
    RETURNING t.bytes
 )
 SELECT count(*)::bigint AS events, COALESCE(sum(bytes), 0)::bigint AS bytes FROM dropped";

/// The columns of `instastate.streams` that [`life_of`] reads.
const LIFE_COLUMNS: &str = "next_version, life, floor, max_count, max_age";

/// The life and next version of stream `stream` in `row` (of `LIFE_COLUMNS`).
fn life_of(location: &Location, row: &Row, stream: &str) -> Result<(Life, u64)> {
    let what = || format!("stream `{stream}`");
    let next = count(location, row, "next_version", &what)?;
    let life = column::<i16>(location, row, "life", &what)?;
    let floor = count(location, row, "floor", &what)?;
    let rule = |name: &str| -> Result<Option<u64>> {
        let value = column::<Option<i64>>(location, row, name, &what)?;
        value
            .map(|value| {
                u64::try_from(value).map_err(|_| Error::DatabaseCorrupt {
                    location: location.to_string(),
                    reason: format!("{} has a negative {name}", what()),
                })
            })
            .transpose()
    };
    let (deleted, tombstoned) = match life {
        0 => (false, false),
        DELETED => (true, false),
        TOMBSTONED => (false, true),
        other => {
            return Err(Error::DatabaseCorrupt {
                location: location.to_string(),
                reason: format!("{} has an unknown life ({other})", what()),
            });
        }
    };
    let rules = Rules { max_count: rule("max_count")?, max_age: rule("max_age")? };
    Ok((Life { floor, deleted, tombstoned, rules }, next))
}

/// [`PgEvents::change_life`] on `client`; raises `committing` when it asks for
/// the commit.
fn change_life_in(
    client: &mut Client,
    location: &Location,
    stream: &str,
    decide: impl Fn(Life, u64) -> Result<Option<Life>>,
    committing: &std::cell::Cell<bool>,
) -> Result<()> {
    let namespace = location.namespace();
    let mut tx = client.transaction().map_err(failed(location, "begin a removal"))?;
    lock_head(&mut tx, location)?;
    // Read under the head's lock: as the last append left it.
    let row = tx
        .query_opt(
            &format!(
                "SELECT {LIFE_COLUMNS} FROM instastate.streams WHERE namespace = $1 AND stream = $2"
            ),
            &[&namespace, &stream],
        )
        .map_err(failed(location, "read a stream's life"))?;
    let (life, next) = match &row {
        Some(row) => life_of(location, row, stream)?,
        None => (Life::default(), 0),
    };
    let Some(changed) = decide(life, next)? else {
        return tx.rollback().map_err(failed(location, "end a removal that changes nothing"));
    };
    let code = if changed.tombstoned {
        TOMBSTONED
    } else if changed.deleted {
        DELETED
    } else {
        0
    };
    let rules = changed.rules;
    tx.execute(
        "INSERT INTO instastate.streams (namespace, stream, next_version, life, floor, max_count,
                                         max_age)
         VALUES ($1, $2, 0, $3, $4, $5, $6)
         ON CONFLICT (namespace, stream) DO UPDATE SET life = EXCLUDED.life,
            floor = EXCLUDED.floor, max_count = EXCLUDED.max_count, max_age = EXCLUDED.max_age",
        &[
            &namespace,
            &stream,
            &code,
            &i64_of(changed.floor),
            &rules.max_count.map(i64_of),
            &rules.max_age.map(i64_of),
        ],
    )
    .map_err(failed(location, "change a stream's life"))?;
    tx.execute(COUNT_REMOVAL, &[&namespace])
        .map_err(failed(location, "count a removal in the head"))?;
    committing.set(true);
    tx.commit().map_err(failed(location, "commit a removal"))
}
