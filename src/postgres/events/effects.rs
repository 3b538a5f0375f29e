//! Effects and subject keys of an event store in a database.
//!
//! An effect is a row of `instastate.effects`, numbered from 0, at the head (the
//! next position) it was appended at: it comes after the events before it. It is
//! appended in a transaction that locks the head `FOR UPDATE`, as every append
//! does, so effects and appends are ordered, and an append that commits after an
//! effect is at or past its head. It does not move the head: it changes no
//! stream and no id, which is what a writer's snapshot of the tables (`Known`)
//! plans appends against.
//!
//! A subject's keys are rows of `instastate.subject_keys` (subject, generation,
//! key); a forgotten key's row keeps its generation and loses its key. Forgetting
//! a subject sets its keys to NULL and appends its effect in one transaction, so
//! that every process sees both or neither. The database still holds the old
//! row versions, with the keys' bytes, until it vacuums them: forgetting asks
//! for a `VACUUM` of the keys' table after it commits, which removes them once
//! no open snapshot can see them (the role must own the table, or the database
//! skips it with a warning; autovacuum does it later either way). The
//! database's WAL and its backups keep what they hold as long as the operator
//! keeps them. An append whose events were sealed with a key forgotten before
//! its transaction locked the head is refused with [`STALE_KEYS`], and sealed
//! again with the subject's new key by its caller.

use postgres::Transaction;

use super::PgEvents;
use crate::{
    Error, Result,
    events::{append::Request, index::EffectRecord},
    postgres::{column, count, failed, i64_of},
};

/// The reason of the [`Error::InvalidAppend`] of an append sealed with a key
/// forgotten meanwhile: its caller seals it again and retries.
pub(crate) const STALE_KEYS: &str = "the subject keys of an event kept changing";

/// A subject's key, as the database holds it: `None` once forgotten.
#[cfg(feature = "encryption")]
pub(crate) type StoredKey = Option<[u8; 32]>;

impl PgEvents {
    /// Appends an effect on `trigger` for `reason` at the head; first, for a
    /// subject forgotten (`forget`), destroys every key of `trigger` (recording
    /// generation 0 as forgotten when it had none). Returns the generation below
    /// which the subject's keys are forgotten (0 when none were).
    pub(crate) fn append_effect(&self, trigger: &str, reason: &str, forget: bool) -> Result<u64> {
        let location = &self.location;
        let mut client = location.connect()?;
        let forgotten = {
            let mut tx = client.transaction().map_err(failed(location, "begin an effect"))?;
            let head = tx
                .query_one(
                    "SELECT next_position FROM instastate.event_heads WHERE namespace = $1 FOR UPDATE",
                    &[&location.namespace()],
                )
                .map_err(failed(location, "lock the event store's head"))?;
            let head = count(location, &head, "next_position", &|| "the head".to_owned())?;
            let forgotten = if forget { self.destroy_keys(&mut tx, trigger)? } else { 0 };
            tx.execute(
                "INSERT INTO instastate.effects (namespace, number, head, trigger, reason, forgotten, at_us)
                 SELECT $1, coalesce(max(number) + 1, 0), $2, $3, $4, $5,
                        (extract(epoch from clock_timestamp()) * 1000000)::bigint
                   FROM instastate.effects WHERE namespace = $1",
                &[&location.namespace(), &i64_of(head), &trigger, &reason, &i64_of(forgotten)],
            )
            .map_err(failed(location, "append an effect"))?;
            tx.execute("SELECT pg_notify($1, '')", &[&crate::postgres::channel(location)])
                .map_err(failed(location, "notify the event store's readers"))?;
            tx.commit().map_err(failed(location, "commit an effect"))?;
            forgotten
        };
        if forget {
            // The old row versions holding the keys go as soon as no snapshot
            // sees them, not at the next autovacuum (see the module's docs). It
            // cannot run in a transaction, and failing loses nothing: the keys
            // are forgotten for every reader either way.
            let _ = client.batch_execute("VACUUM instastate.subject_keys");
        }
        Ok(forgotten)
    }

    /// Destroys every key of `subject` in `tx`; the generation below which its
    /// keys are gone.
    fn destroy_keys(&self, tx: &mut Transaction<'_>, subject: &str) -> Result<u64> {
        let location = &self.location;
        let namespace = location.namespace();
        lock_subject(tx, location, subject)?;
        tx.execute(
            "UPDATE instastate.subject_keys SET key = NULL
              WHERE namespace = $1 AND subject = $2 AND key IS NOT NULL",
            &[&namespace, &subject],
        )
        .map_err(failed(location, "destroy a subject's keys"))?;
        let row = tx
            .query_one(
                "SELECT max(generation) AS newest FROM instastate.subject_keys
                  WHERE namespace = $1 AND subject = $2",
                &[&namespace, &subject],
            )
            .map_err(failed(location, "read a subject's keys"))?;
        let newest: Option<i64> = column(location, &row, "newest", &|| "a subject's keys".into())?;
        if let Some(newest) = newest {
            return Ok(u64::try_from(newest).unwrap_or(0) + 1);
        }
        // A subject without keys: its first generation is recorded as forgotten.
        tx.execute(
            "INSERT INTO instastate.subject_keys (namespace, subject, generation, key)
             VALUES ($1, $2, 0, NULL) ON CONFLICT DO NOTHING",
            &[&namespace, &subject],
        )
        .map_err(failed(location, "record a subject forgotten"))?;
        Ok(1)
    }

    /// The effects numbered `from` on, in order.
    #[cfg(feature = "encryption")]
    pub(crate) fn effects_from(&self, from: u64) -> Result<Vec<EffectRecord>> {
        self.effects_between(from, None)
    }

    /// The effects numbered `from` on, in order, `limit` of them at most.
    fn effects_between(&self, from: u64, limit: Option<i64>) -> Result<Vec<EffectRecord>> {
        let location = &self.location;
        let rows = self.with_reader(|client| {
            client
                .query(
                    "SELECT number, head, trigger, reason, forgotten FROM instastate.effects
                      WHERE namespace = $1 AND number >= $2 ORDER BY number LIMIT $3",
                    &[&location.namespace(), &i64_of(from), &limit],
                )
                .map_err(failed(location, "read the effects"))
        })?;
        let mut effects = Vec::with_capacity(rows.len());
        for (row, expected) in rows.iter().zip(from..) {
            let what = || format!("effect {expected}");
            let number = count(location, row, "number", &what)?;
            if number != expected {
                return Err(Error::DatabaseCorrupt {
                    location: location.to_string(),
                    reason: format!("effect {expected} is missing (the next one is {number})"),
                });
            }
            effects.push(EffectRecord {
                head: count(location, row, "head", &what)?,
                trigger: column(location, row, "trigger", &what)?,
                reason: column(location, row, "reason", &what)?,
                forgotten: count(location, row, "forgotten", &what)?,
            });
        }
        Ok(effects)
    }

    /// Effect number `number`, if it was appended.
    pub(crate) fn effect(&self, number: u64) -> Result<Option<EffectRecord>> {
        Ok(self.effects_between(number, Some(1))?.into_iter().next())
    }

    /// How many effects came before position `position`.
    pub(crate) fn effects_before(&self, position: u64) -> Result<u64> {
        let location = &self.location;
        let row = self.with_reader(|client| {
            client
                .query_one(
                    "SELECT count(*) AS before FROM instastate.effects
                      WHERE namespace = $1 AND head < $2",
                    &[&location.namespace(), &i64_of(position)],
                )
                .map_err(failed(location, "count the effects"))
        })?;
        count(location, &row, "before", &|| "the effects".to_owned())
    }

    /// The positions below `before` of the events linked to `trigger`, in order.
    pub(crate) fn triggered(&self, trigger: &str, before: u64) -> Result<Vec<u64>> {
        self.positions(
            "SELECT position FROM instastate.events
              WHERE namespace = $1 AND cardinality(triggers) > 0 AND triggers @> ARRAY[$2]
                AND position < $3 ORDER BY position",
            trigger,
            before,
        )
    }

    /// The positions below `before` of the events tagged `tag`, in order.
    pub(crate) fn tagged(&self, tag: &str, before: u64) -> Result<Vec<u64>> {
        self.positions(
            "SELECT position FROM instastate.event_tags
              WHERE namespace = $1 AND tag = $2 AND position < $3 ORDER BY position",
            tag,
            before,
        )
    }

    /// The tags of the event at `position`, if there is one.
    pub(crate) fn tags_at(&self, position: u64) -> Result<Option<Vec<String>>> {
        let location = &self.location;
        let row = self.with_reader(|client| {
            client
                .query_opt(
                    "SELECT tags FROM instastate.events WHERE namespace = $1 AND position = $2",
                    &[&location.namespace(), &i64_of(position)],
                )
                .map_err(failed(location, "read an event's tags"))
        })?;
        let what = || format!("the event at position {position}");
        row.map(|row| column(location, &row, "tags", &what)).transpose()
    }

    fn positions(&self, sql: &str, key: &str, before: u64) -> Result<Vec<u64>> {
        let location = &self.location;
        let rows = self.with_reader(|client| {
            client
                .query(sql, &[&location.namespace(), &key, &i64_of(before)])
                .map_err(failed(location, "find the events an effect replays"))
        })?;
        rows.iter().map(|row| count(location, row, "position", &|| "an event".to_owned())).collect()
    }
}

/// The subjects' keys (feature `encryption`, which seals data with them).
#[cfg(feature = "encryption")]
impl PgEvents {
    /// The newest key of `subject` and its generation, as the database holds them.
    fn read_newest_key(
        &self,
        client: &mut impl postgres::GenericClient,
        subject: &str,
    ) -> Result<Option<(u64, StoredKey)>> {
        let location = &self.location;
        let row = client
            .query_opt(
                "SELECT generation, key FROM instastate.subject_keys
                  WHERE namespace = $1 AND subject = $2 ORDER BY generation DESC LIMIT 1",
                &[&location.namespace(), &subject],
            )
            .map_err(failed(location, "read a subject's key"))?;
        let Some(row) = row else { return Ok(None) };
        let what = || format!("the key of subject `{subject}`");
        let generation = count(location, &row, "generation", &what)?;
        Ok(Some((generation, self.key_of(&row, &what)?)))
    }

    /// Key `generation` of `subject`: `None` when the database has none,
    /// `Some(None)` when it was forgotten.
    pub(crate) fn key(&self, subject: &str, generation: u64) -> Result<Option<StoredKey>> {
        let location = &self.location;
        let row = self.with_reader(|client| {
            client
                .query_opt(
                    "SELECT key FROM instastate.subject_keys
                      WHERE namespace = $1 AND subject = $2 AND generation = $3",
                    &[&location.namespace(), &subject, &i64_of(generation)],
                )
                .map_err(failed(location, "read a subject's key"))
        })?;
        let what = || format!("key {generation} of subject `{subject}`");
        row.map(|row| self.key_of(&row, &what)).transpose()
    }

    /// Stores `key` as the next generation of `subject`'s keys, unless it has a
    /// live key already (made by another process meanwhile); returns the newest
    /// key, live.
    pub(crate) fn create_key(&self, subject: &str, key: [u8; 32]) -> Result<(u64, [u8; 32])> {
        let location = &self.location;
        self.with_reader(|client| {
            // Repeating it is harmless: it inserts only where no live key is. The
            // subject's lock keeps a forget from running between the insert and
            // its look at the keys (it would miss the new one).
            let mut tx = client.transaction().map_err(failed(location, "begin to make a key"))?;
            lock_subject(&mut tx, location, subject)?;
            tx.execute(
                "INSERT INTO instastate.subject_keys (namespace, subject, generation, key)
                     SELECT $1, $2, coalesce(max(generation) + 1, 0), $3
                       FROM instastate.subject_keys WHERE namespace = $1 AND subject = $2
                     HAVING NOT (bool_or(key IS NOT NULL) IS TRUE)
                     ON CONFLICT DO NOTHING",
                &[&location.namespace(), &subject, &&key[..]],
            )
            .map_err(failed(location, "store a subject's key"))?;
            let newest = self.read_newest_key(&mut tx, subject)?;
            tx.commit().map_err(failed(location, "commit a subject's key"))?;
            match newest {
                Some((generation, Some(key))) => Ok((generation, key)),
                other => Err(Error::DatabaseCorrupt {
                    location: location.to_string(),
                    reason: format!(
                        "subject `{subject}` has no live key right after one was made: {}",
                        other.map_or("none".to_owned(), |it| format!("generation {}", it.0))
                    ),
                }),
            }
        })
    }

    fn key_of(&self, row: &postgres::Row, what: &dyn Fn() -> String) -> Result<StoredKey> {
        let key: Option<Vec<u8>> = column(&self.location, row, "key", what)?;
        key.map(|key| {
            <[u8; 32]>::try_from(key.as_slice()).map_err(|_| Error::DatabaseCorrupt {
                location: self.location.to_string(),
                reason: format!("{} is {} bytes long, not 32", what(), key.len()),
            })
        })
        .transpose()
    }
}

/// Takes, until `tx` ends, the lock of `subject`'s keys: making a key and
/// forgetting the subject take turns.
fn lock_subject(
    tx: &mut Transaction<'_>,
    location: &crate::postgres::Location,
    subject: &str,
) -> Result<()> {
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1 || '/' || $2, 7))",
        &[&location.namespace(), &subject],
    )
    .map_err(failed(location, "lock a subject's keys"))?;
    Ok(())
}

/// Whether an event of `requests` was sealed with a key that `tx` (which holds
/// the head's lock) finds forgotten.
pub(super) fn sealed_with_stale_keys(
    tx: &mut Transaction<'_>,
    location: &crate::postgres::Location,
    requests: &[&Request],
) -> Result<bool> {
    let (mut subjects, mut generations) = (Vec::new(), Vec::new());
    for event in requests.iter().flat_map(|it| &it.events) {
        for (subject, generation) in &event.sealed_with {
            subjects.push(subject.as_str());
            generations.push(i64_of(*generation));
        }
    }
    if subjects.is_empty() {
        return Ok(false);
    }
    let row = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM instastate.subject_keys k
                  JOIN unnest($2::text[], $3::bigint[]) AS s(subject, generation)
                    ON k.subject = s.subject AND k.generation = s.generation
                 WHERE k.namespace = $1 AND k.key IS NULL) AS stale",
            &[&location.namespace(), &subjects, &generations],
        )
        .map_err(failed(location, "check the keys an append was sealed with"))?;
    column(location, &row, "stale", &|| "the keys of an append".to_owned())
}
