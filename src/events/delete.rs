//! Removing events: deleting a stream (softly, or for good with a tombstone),
//! truncating it, and its retention rules. Each is a command in the journal,
//! planned under the journal's lock like an append, and seen by readers once it
//! is committed.

use std::{sync::Arc, time::Duration};

use parking_lot::RwLock;
use serde::{Serialize, de::DeserializeOwned};

#[cfg(feature = "postgres")]
use super::Engine;
use super::{
    EventStore, Expected,
    batch::{self, Removal, Rules},
    index::{Index, Life},
    stream_id,
};
use crate::{
    Error, Result, Timestamp,
    journal::{Job, Prepared},
};

/// A stream's retention rules: how many of its last events it keeps, and for how
/// long. Events outside them are no longer read (nor delivered to
/// subscriptions); see [`EventStore::set_retention`]. A bound above `i64::MAX`
/// (events, or microseconds) is kept as `i64::MAX`, which a database holds.
///
/// # Example
/// ```
/// use std::time::Duration;
///
/// use instastate::events::Retention;
///
/// let rules = Retention::default().max_count(1_000).max_age(Duration::from_hours(1));
/// assert_eq!(rules.count(), Some(1_000));
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Retention {
    max_count: Option<u64>,
    max_age: Option<Duration>,
}

impl Retention {
    /// Keeps only the stream's last `n` events.
    #[must_use]
    pub fn max_count(mut self, n: u64) -> Retention {
        self.max_count = Some(n);
        self
    }

    /// Keeps only the events appended less than `age` ago (to the microsecond).
    #[must_use]
    pub fn max_age(mut self, age: Duration) -> Retention {
        self.max_age = Some(age);
        self
    }

    /// How many of its last events the stream keeps, if bounded.
    #[must_use]
    pub fn count(&self) -> Option<u64> {
        self.max_count
    }

    /// How long the stream keeps its events, if bounded.
    #[must_use]
    pub fn age(&self) -> Option<Duration> {
        self.max_age
    }

    /// The rules as stored: each bound at most `i64::MAX` (events, or
    /// microseconds: 292,000 years), which a database holds as it is.
    fn rules(self) -> Rules {
        const MAX: u64 = i64::MAX.unsigned_abs();
        let micros = |age: Duration| u64::try_from(age.as_micros()).unwrap_or(MAX).min(MAX);
        Rules { max_count: self.max_count.map(|n| n.min(MAX)), max_age: self.max_age.map(micros) }
    }
}

impl From<Rules> for Retention {
    fn from(rules: Rules) -> Retention {
        Retention { max_count: rules.max_count, max_age: rules.max_age.map(Duration::from_micros) }
    }
}

/// What a command changes of a stream's life.
#[derive(Debug, Clone, Copy)]
enum Change {
    Remove(Removal, u64),
    Rules(Rules),
}

impl Change {
    fn apply(self, life: &mut Life) {
        match self {
            Change::Remove(removal, before) => life.remove(removal, before),
            Change::Rules(rules) => life.rules = rules,
        }
    }
}

impl<E: Serialize + DeserializeOwned> EventStore<E> {
    /// Deletes stream `stream` softly, if it is as `expected` says: its events are
    /// no longer read, and it counts as a stream with no event. An append brings it
    /// back, its versions going on where they were (with [`Expected::NoStream`] or
    /// [`Expected::Any`]); only the events appended after the delete are read then.
    /// Deleting a stream that has no event writes nothing.
    ///
    /// # Example
    /// ```
    /// use instastate::events::{EventStore, Expected};
    ///
    /// # fn main() -> instastate::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let events = EventStore::<u32>::open(dir.path())?;
    /// events.append("cart-7", Expected::NoStream, [1, 2])?;
    /// events.delete_stream("cart-7", Expected::Exact(1))?;
    /// assert_eq!(events.read_stream("cart-7").into_iter().count(), 0);
    ///
    /// let again = events.append("cart-7", Expected::NoStream, [3])?;
    /// assert_eq!(again.versions, 2..3);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`Error::WrongExpectedVersion`] when the stream is not as expected (nothing
    /// is written); [`Error::StreamTombstoned`]; [`Error::InvalidStreamId`];
    /// [`Error::JournalWrite`] as for an append; in a database,
    /// [`Error::Database`] when it cannot be reached (a removal whose connection
    /// broke may have been made or not: it is not made again, and reading the
    /// stream tells).
    pub fn delete_stream(&self, stream: &str, expected: Expected) -> Result<()> {
        self.remove(stream, Some(expected), Removal::Soft, None)
    }

    /// Deletes stream `stream` for good, if it is as `expected` says: its events
    /// are no longer read, and every later append, delete or read of it is
    /// [`Error::StreamTombstoned`]. A stream that never had an event can be
    /// tombstoned too, so that it never will.
    ///
    /// # Errors
    /// As [`delete_stream`](Self::delete_stream).
    pub fn tombstone_stream(&self, stream: &str, expected: Expected) -> Result<()> {
        self.remove(stream, Some(expected), Removal::Tombstone, None)
    }

    /// Removes the events of stream `stream` below version `before`: they are no
    /// longer read. The stream's versions stay as they are; a truncation never
    /// brings back what an earlier one removed.
    ///
    /// # Errors
    /// [`Error::StreamTombstoned`]; [`Error::InvalidStreamId`];
    /// [`Error::JournalWrite`] as for an append; [`Error::Database`] as for
    /// [`delete_stream`](Self::delete_stream).
    pub fn truncate_stream(&self, stream: &str, before: u64) -> Result<()> {
        self.remove(stream, None, Removal::Truncate, Some(before))
    }

    /// Sets the retention rules of stream `stream` (which need not exist yet),
    /// replacing its earlier ones: its events beyond the last
    /// [`max_count`](Retention::max_count) or older than
    /// [`max_age`](Retention::max_age) are no longer read. `Retention::default()`
    /// lifts every rule.
    ///
    /// # Errors
    /// As [`truncate_stream`](Self::truncate_stream).
    pub fn set_retention(&self, stream: &str, retention: Retention) -> Result<()> {
        stream_id::check(stream)?;
        let rules = retention.rules();
        self.change(stream, |life, _| {
            living(stream, life)?;
            Ok((life.rules != rules).then_some(Change::Rules(rules)))
        })
    }

    /// The retention rules of stream `stream`.
    ///
    /// # Errors
    /// [`Error::InvalidStreamId`] for an id no stream can have; in a database,
    /// [`Error::Database`] when it cannot be read.
    pub fn retention(&self, stream: &str) -> Result<Retention> {
        stream_id::check(stream)?;
        #[cfg(feature = "postgres")]
        if let Engine::Database(db) = &self.shared.engine {
            return Ok(db.engine.stream_life(stream)?.0.rules.into());
        }
        let index = self.shared.files("keep retention rules")?.index.read();
        let life = index.stream(stream).and_then(|idx| index.get(idx)).map(|it| it.life);
        Ok(life.unwrap_or_default().rules.into())
    }

    fn remove(
        &self,
        stream: &str,
        expected: Option<Expected>,
        removal: Removal,
        before: Option<u64>,
    ) -> Result<()> {
        stream_id::check(stream)?;
        self.change(stream, |life, next| {
            living(stream, life)?;
            let last = if life.deleted { None } else { next.checked_sub(1) };
            if let Some(expected) = expected
                && !expected.holds(last)
            {
                let stream = stream.to_owned();
                return Err(Error::WrongExpectedVersion { stream, expected, actual: last });
            }
            // Never past the stream's end: versions appended later are not hidden
            // by a truncation made before them.
            let before = before.map_or(next, |before| before.min(next));
            let needed = match removal {
                Removal::Soft => last.is_some(),
                Removal::Tombstone => true,
                Removal::Truncate => life.floor < before,
            };
            Ok(needed.then_some(Change::Remove(removal, before)))
        })
    }

    /// Makes the change `decide` makes of the life of `stream` and its next
    /// version (as the appends planned so far leave them); `None` writes nothing.
    /// In files, a command journaled and planned; in a database, a transaction.
    fn change(
        &self,
        stream: &str,
        decide: impl Fn(Life, u64) -> Result<Option<Change>>,
    ) -> Result<()> {
        #[cfg(feature = "postgres")]
        if let Engine::Database(db) = &self.shared.engine {
            return db.engine.change_life(stream, |mut life, next| {
                let change = decide(life, next)?;
                Ok(change.map(|change| {
                    change.apply(&mut life);
                    life
                }))
            });
        }
        let core = self.shared.files("delete, truncate or set retention rules")?;
        let index = Arc::clone(&core.index);
        core.journal.commit_with(|_, _| {
            let mut guard = index.write();
            let stream_at = guard.stream(stream).and_then(|idx| guard.get(idx));
            let life = stream_at.map(|it| it.planned).unwrap_or_default();
            let next = stream_at.map_or(0, |it| it.reserved);
            let Some(change) = decide(life, next)? else { return Ok(Prepared::Done(())) };
            let idx = guard.stream_or_new(stream);
            if let Some(it) = guard.get_mut(idx) {
                change.apply(&mut it.planned);
            }
            let bytes = match change {
                Change::Remove(removal, before) => batch::encode_delete(stream, removal, before),
                Change::Rules(rules) => batch::encode_retention(stream, rules),
            };
            let job = CommandJob { index: Arc::clone(&index), stream: stream.to_owned(), change };
            Ok(Prepared::Event(bytes, job))
        })?;
        self.maybe_checkpoint();
        Ok(())
    }
}

/// Refuses a change to `stream` if its `life` is over: a tombstoned stream takes
/// none.
fn living(stream: &str, life: Life) -> Result<()> {
    if life.tombstoned {
        return Err(Error::StreamTombstoned { stream: stream.to_owned() });
    }
    Ok(())
}

/// Commits a durable command to the index.
struct CommandJob {
    index: Arc<RwLock<Index>>,
    stream: String,
    change: Change,
}

impl Job for CommandJob {
    type Output = ();

    fn run(self, seq: u64, at: Timestamp) -> ((), Option<u64>) {
        let mut index = self.index.write();
        let change = self.change;
        let res = index.commit_command(seq, &self.stream, |life| change.apply(life));
        // Planned under the journal's lock, in journal order: a failure is a bug,
        // and the panic stops the store, as for an append's job.
        #[allow(clippy::expect_used)]
        res.expect("a planned command commits");
        index.last_at = at.as_micros();
        ((), None)
    }
}
