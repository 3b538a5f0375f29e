//! The event store's engine on PostgreSQL: any number of writers, in any number
//! of processes, with positions gap-free and in commit order.
//!
//! Every append transaction first locks the namespace's head row
//! (`instastate.event_heads`, `FOR UPDATE`), takes its positions from it, and
//! moves it on before it commits. Appends of one namespace are so serialized by
//! the database, and a transaction that takes positions commits before the next
//! one can take any: a reader that sees position `p` sees every position below it,
//! so a catch-up reader never skips an event that committed late (what readers of
//! stores that take positions from a sequence, committed in any order, hit). The
//! cost is one append transaction at a time per namespace; within a process,
//! concurrent appends share one transaction (group commit), so that cost is paid
//! once per group, not per append.
//!
//! Expected versions, idempotent retries (the same ids at the same place return
//! the earlier result) and duplicate ids are checked inside that transaction,
//! against the tables, as the embedded engine checks them against its index; a
//! refused append leaves the others of its group unharmed. Each commit notifies
//! the namespace's channel (see [`channel`](super::channel)) with the next
//! position, for live readers.

use std::{
    collections::HashMap,
    ops::Range,
    panic::{self, AssertUnwindSafe},
    sync::{
        Condvar, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use postgres::{Client, Row, Transaction};

use super::{
    Location, channel, column, count, failed, i64_of, listen, schema, spend_notifications,
    wait_for_commit,
};
use crate::{
    Error, Result, StorageError, Timestamp,
    events::{
        Appended, Condition, EventId, EventRef, Expected, Metadata, Position, RawEvent,
        append::{Encoded, Request, check_requests},
        condition,
    },
};

/// The kind a namespace of this engine records.
const KIND: &str = "an event store";

/// An event store's engine on PostgreSQL.
pub(crate) struct PgEvents {
    location: Location,
    group: Mutex<Group>,
    done: Condvar,
    /// Connections for reads, taken and put back.
    readers: Mutex<Vec<Client>>,
}

/// The appends waiting for a transaction, and who runs it.
#[derive(Default)]
struct Group {
    next_ticket: u64,
    queue: Vec<Member>,
    /// Whether a caller runs a transaction now (it holds the writer).
    leading: bool,
    writer: Option<Client>,
    results: HashMap<u64, Result<Vec<Appended>>>,
}

impl PgEvents {
    /// Opens the event store at `location`: upgrades instastate's tables and
    /// records the namespace as an event store's.
    pub(crate) fn open(location: &Location) -> Result<PgEvents> {
        let mut client = location.connect()?;
        schema::prepare(&mut client, location, KIND)?;
        client
            .execute(
                "INSERT INTO instastate.event_heads (namespace, next_position, last_at)
                 VALUES ($1, 0, 0) ON CONFLICT DO NOTHING",
                &[&location.namespace()],
            )
            .map_err(failed(location, "record the event store's head"))?;
        Ok(PgEvents {
            location: location.clone(),
            group: Mutex::new(Group { writer: Some(client), ..Group::default() }),
            done: Condvar::new(),
            readers: Mutex::new(Vec::new()),
        })
    }

    /// Appends `requests` (one or more streams), all or nothing, if each stream is
    /// as its request expects; returns what each got. Concurrent callers share one
    /// transaction.
    pub(crate) fn append(&self, requests: Vec<Request>) -> Result<Vec<Appended>> {
        self.append_if(requests, None)
    }

    /// Appends as [`append`](Self::append) does, if `condition` also holds: no
    /// event carrying one of its tags was appended at or after its base but those
    /// it resolved (checked in the append's transaction, under the head's lock).
    pub(crate) fn append_if(
        &self,
        requests: Vec<Request>,
        condition: Option<Condition>,
    ) -> Result<Vec<Appended>> {
        check_requests(&requests)?;
        let mut group = self.lock();
        let ticket = group.next_ticket;
        group.next_ticket += 1;
        group.queue.push(Member { ticket, requests, condition });
        loop {
            if let Some(result) = group.results.remove(&ticket) {
                return result;
            }
            if group.leading {
                group = self.done.wait(group).unwrap_or_else(std::sync::PoisonError::into_inner);
                continue;
            }
            // This caller runs the next transaction, for every append waiting.
            group.leading = true;
            let batch = std::mem::take(&mut group.queue);
            let writer = group.writer.take();
            drop(group);
            let mut leader = Leader { engine: self, writer, results: Vec::new() };
            // A panic in the transaction's code must not leave the others waiting
            // for a leader that is gone: each gets an error, and the panic goes on.
            let ran = panic::catch_unwind(AssertUnwindSafe(|| leader.run(&batch)));
            group = self.lock();
            group.writer = leader.writer.take();
            group.results.extend(std::mem::take(&mut leader.results));
            if ran.is_err() {
                for member in &batch {
                    let err = group_failed(
                        &self.location,
                        "append",
                        "the transaction of its group panicked",
                    );
                    group.results.entry(member.ticket).or_insert(Err(err));
                }
            }
            group.leading = false;
            self.done.notify_all();
            if let Err(payload) = ran {
                group.results.remove(&ticket);
                drop(group);
                panic::resume_unwind(payload);
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Group> {
        // A panic while the lock was held left nothing half-changed that matters:
        // the group's fields are replaced whole.
        self.group.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Answers what [`append_if`](Self::append_if) would do now, writing nothing:
    /// the same transaction, rolled back.
    pub(crate) fn dry_run(
        &self,
        requests: Vec<Request>,
        condition: Option<Condition>,
    ) -> Result<Vec<Appended>> {
        check_requests(&requests)?;
        let batch = [Member { ticket: 0, requests, condition }];
        let mut results =
            self.with_reader(|client| commit(client, &self.location, &batch, true))?;
        results.pop().map_or_else(
            || Err(group_failed(&self.location, "check an append", "the check returned nothing")),
            |(_, result)| result,
        )
    }

    /// The next position: one past the last event committed.
    pub(crate) fn head(&self) -> Result<Position> {
        let row = self.with_reader(|client| {
            client
                .query_one(
                    "SELECT next_position FROM instastate.event_heads WHERE namespace = $1",
                    &[&self.location.namespace()],
                )
                .map_err(failed(&self.location, "read the head"))
        })?;
        let what = || "the event store's head".to_owned();
        Ok(Position::new(count(&self.location, &row, "next_position", &what)?))
    }

    /// The last version of `stream`, or `None` when it has no event.
    pub(crate) fn stream_version(&self, stream: &str) -> Result<Option<u64>> {
        let row = self.with_reader(|client| {
            client
                .query_opt(
                    "SELECT next_version FROM instastate.streams
                      WHERE namespace = $1 AND stream = $2",
                    &[&self.location.namespace(), &stream],
                )
                .map_err(failed(&self.location, "read a stream's version"))
        })?;
        let what = || format!("the next version of stream `{stream}`");
        Ok(row
            .map(|row| count(&self.location, &row, "next_version", &what))
            .transpose()?
            .and_then(|next| next.checked_sub(1)))
    }

    /// Every stream with its last version, in the order they were created (of
    /// their first events' positions).
    pub(crate) fn streams(&self) -> Result<Vec<(String, u64)>> {
        let rows = self.with_reader(|client| {
            client
                .query(
                    "SELECT s.stream, s.next_version FROM instastate.streams s
                       JOIN instastate.events e ON e.namespace = s.namespace
                        AND e.stream = s.stream AND e.version = 0
                      WHERE s.namespace = $1 AND s.next_version > 0
                      ORDER BY e.position",
                    &[&self.location.namespace()],
                )
                .map_err(failed(&self.location, "list the streams"))
        })?;
        rows.iter()
            .map(|row| {
                let stream: String =
                    column(&self.location, row, "stream", &|| "a stream".to_owned())?;
                let what = || format!("stream `{stream}`");
                let next = count(&self.location, row, "next_version", &what)?;
                Ok((stream.clone(), next.saturating_sub(1)))
            })
            .collect()
    }

    /// The events `query` asks for, in its order.
    pub(crate) fn read(&self, query: &Query<'_>) -> Result<Vec<RawEvent>> {
        let (order, place) = match query.stream {
            Some(_) => ("version", "version"),
            None => ("position", "position"),
        };
        let (compare, direction) = if query.backward { ("<=", "DESC") } else { (">=", "") };
        let stream =
            if query.stream.is_some() { "AND stream = $2" } else { "AND $2::text IS NULL" };
        let sql = format!(
            "SELECT * FROM instastate.events WHERE namespace = $1 {stream}
                AND {place} {compare} $3 AND ($4::bigint IS NULL OR position < $4)
                AND ($5::text IS NULL OR event_type = $5)
                AND ($6::text IS NULL OR starts_with(stream, $6))
              ORDER BY {order} {direction} LIMIT $7"
        );
        let until = query.until.map(i64_of);
        let rows = self.with_reader(|client| {
            let params: [&(dyn postgres::types::ToSql + Sync); 7] = [
                &self.location.namespace(),
                &query.stream,
                &i64_of(query.from),
                &until,
                &query.event_type,
                &query.prefix,
                &i64_of(query.limit),
            ];
            client.query(sql.as_str(), &params).map_err(failed(&self.location, "read events"))
        })?;
        rows.iter().map(|row| event_of(&self.location, row)).collect()
    }

    /// Up to `limit` events of every stream from position `from` on, in position
    /// order (`backward`: from `from` down).
    pub(crate) fn read_all(&self, from: u64, limit: u64, backward: bool) -> Result<Vec<RawEvent>> {
        self.read(&Query { from, limit, backward, ..Query::default() })
    }

    /// Up to `limit` events of `stream` from version `from` on, in version order
    /// (`backward`: from `from` down).
    pub(crate) fn read_stream(
        &self,
        stream: &str,
        from: u64,
        limit: u64,
        backward: bool,
    ) -> Result<Vec<RawEvent>> {
        self.read(&Query { stream: Some(stream), from, limit, backward, ..Query::default() })
    }

    /// The header of the event store's types, if it has one yet (kept as a
    /// journal's, in `journal_heads`).
    pub(crate) fn header(&self) -> Result<Option<Vec<u8>>> {
        self.with_reader(|client| super::journal::read_header(client, &self.location))
    }

    /// Records `header` as the event store's.
    pub(crate) fn set_header(&self, header: &[u8]) -> Result<()> {
        self.with_reader(|client| {
            client
                .execute(
                    "INSERT INTO instastate.journal_heads (namespace, header) VALUES ($1, $2)
                     ON CONFLICT (namespace) DO UPDATE SET header = EXCLUDED.header",
                    &[&self.location.namespace(), &header],
                )
                .map_err(failed(&self.location, "record the event store's header"))
        })?;
        Ok(())
    }

    /// Runs `read` on a reader connection (a new one when none is free); once
    /// more on a new connection when the one taken broke (every read is safe to
    /// repeat).
    fn with_reader<T>(&self, read: impl Fn(&mut Client) -> Result<T>) -> Result<T> {
        let pooled = self.readers.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop();
        let mut client = match pooled.filter(|client| !client.is_closed()) {
            Some(client) => client,
            None => self.location.connect()?,
        };
        let mut res = read(&mut client);
        if let Err(err) = &res
            && super::broke(err, &client)
        {
            client = self.location.connect()?;
            res = read(&mut client);
        }
        if !client.is_closed() {
            self.readers.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(client);
        }
        res
    }
}

/// What a read of events asks for.
#[derive(Default)]
pub(crate) struct Query<'a> {
    /// One stream (from a version), else every stream (from a position).
    pub(crate) stream: Option<&'a str>,
    /// The first version or position read (going backward: the last).
    pub(crate) from: u64,
    pub(crate) limit: u64,
    pub(crate) backward: bool,
    /// No position at or past it.
    pub(crate) until: Option<u64>,
    pub(crate) event_type: Option<&'a str>,
    /// Streams whose id starts with it.
    pub(crate) prefix: Option<&'a str>,
}

/// The [`Error::Database`] each append of a failed group gets: `reason` as text,
/// since the client's error is not cloned.
fn group_failed(location: &Location, action: &str, reason: &str) -> Error {
    Error::Database {
        location: location.to_string(),
        action: action.to_owned(),
        source: StorageError(reason.to_owned().into()),
    }
}

/// One append waiting in a group: its ticket, its streams, its condition.
struct Member {
    ticket: u64,
    requests: Vec<Request>,
    condition: Option<Condition>,
}

/// Follows an event store's events as they commit: it reads from where it got
/// to, and waits for a commit's notification (or polls, should one be missed).
pub(crate) struct PgFollower {
    location: Location,
    client: Client,
    next: u64,
    poll: Duration,
    /// Whether its connection listens to the namespace's channel: only while it
    /// waits for commits, since a listener that is not read (a follower whose
    /// caller has stopped asking) holds up the server's notification queue.
    listening: bool,
}

impl PgEvents {
    /// A follower of the events from position `from` on, on a connection of its
    /// own; when it has caught up, it waits for a commit's notification, and looks
    /// again at least every `poll`.
    pub(crate) fn follow(&self, from: u64, poll: Duration) -> Result<PgFollower> {
        let client = self.location.connect()?;
        Ok(PgFollower {
            location: self.location.clone(),
            client,
            next: from,
            poll,
            listening: false,
        })
    }
}

impl PgFollower {
    /// The position of the next event it yields.
    pub(crate) fn position(&self) -> u64 {
        self.next
    }

    /// Up to `limit` events from its position on, in order; when there is none,
    /// waits up to `timeout` for a commit, and returns none if it brought none.
    pub(crate) fn next_batch(&mut self, limit: u64, timeout: Duration) -> Result<Vec<RawEvent>> {
        let deadline = Instant::now() + timeout;
        loop {
            let events = self.read(limit)?;
            if !events.is_empty() {
                if self.listening {
                    self.listen(false)?;
                }
                return Ok(events);
            }
            if !self.listening {
                // Listening from now on, it reads again before it waits: a commit
                // made before it listened is not notified to it.
                self.listen(true)?;
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Vec::new());
            }
            wait_for_commit(&mut self.client, &self.location, left.min(self.poll))?;
        }
    }

    /// The events from its position on, up to `limit`, and moves past them.
    /// Notifications that came before are spent: the read sees what they
    /// announced.
    fn read(&mut self, limit: u64) -> Result<Vec<RawEvent>> {
        spend_notifications(&mut self.client, &self.location)?;
        let rows = self
            .client
            .query(
                "SELECT * FROM instastate.events WHERE namespace = $1 AND position >= $2
                  ORDER BY position LIMIT $3",
                &[&self.location.namespace(), &i64_of(self.next), &i64_of(limit)],
            )
            .map_err(failed(&self.location, "read new events"))?;
        let events =
            rows.iter().map(|row| event_of(&self.location, row)).collect::<Result<Vec<_>>>()?;
        self.next = events.last().map_or(self.next, |it| it.position.get() + 1);
        Ok(events)
    }

    fn listen(&mut self, on: bool) -> Result<()> {
        listen(&mut self.client, &self.location, on)?;
        self.listening = on;
        Ok(())
    }
}

/// Calls `on_commit` at each commit to `location`'s namespace, as its
/// notification comes, until `stop` is set (looked at least every `poll`). A
/// broken connection is made again, and `on_commit` called then too, since a
/// commit may have come while none listened.
pub(crate) fn watch_commits(
    location: &Location,
    stop: &AtomicBool,
    poll: Duration,
    on_commit: &dyn Fn(),
) {
    use postgres::fallible_iterator::FallibleIterator;
    let mut client: Option<Client> = None;
    while !stop.load(Ordering::Acquire) {
        let Some(listening) = client.as_mut().filter(|client| !client.is_closed()) else {
            let connected = location.connect().and_then(|mut client| {
                listen(&mut client, location, true)?;
                Ok(client)
            });
            client = connected.ok();
            if client.is_none() {
                std::thread::sleep(poll);
            }
            on_commit();
            continue;
        };
        let woke = listening.notifications().timeout_iter(poll).next();
        match woke {
            Ok(Some(_)) => {
                // The others that came meanwhile are announced by this one call.
                let mut notifications = listening.notifications();
                let mut rest = notifications.iter();
                while let Ok(Some(_)) = rest.next() {}
                on_commit();
            }
            Ok(None) => {}
            Err(_) => client = None,
        }
    }
}

/// The caller that runs a group's transaction.
struct Leader<'a> {
    engine: &'a PgEvents,
    writer: Option<Client>,
    results: Vec<(u64, Result<Vec<Appended>>)>,
}

/// A stream as a group's transaction sees it: its next version.
type Streams = HashMap<String, u64>;
/// Where each id the group names is: stream, version, position.
type Ids = HashMap<[u8; 16], (String, u64, u64)>;

impl Leader<'_> {
    /// Runs one transaction for `batch`, and records each append's result.
    fn run(&mut self, batch: &[Member]) {
        let location = &self.engine.location;
        let client = match self.writer.take().filter(|client| !client.is_closed()) {
            Some(client) => Ok(client),
            None => location.connect(),
        };
        let outcome = client.and_then(|mut client| {
            let outcome = commit(&mut client, location, batch, false);
            if !client.is_closed() {
                self.writer = Some(client);
            }
            outcome
        });
        match outcome {
            Ok(results) => self.results.extend(results),
            Err(err) => {
                // Every append of the group failed with the transaction.
                let message = err.to_string();
                for Member { ticket, .. } in batch {
                    let action = "append (the transaction of its group failed)";
                    self.results.push((*ticket, Err(group_failed(location, action, &message))));
                }
            }
        }
    }
}

/// The group's transaction: plans each append in order against the tables and the
/// appends before it, writes the events of those that hold, and commits (a `dry`
/// run writes nothing, and rolls back).
fn commit(
    client: &mut Client,
    location: &Location,
    batch: &[Member],
    dry: bool,
) -> Result<Vec<(u64, Result<Vec<Appended>>)>> {
    let namespace = location.namespace();
    let mut tx = client.transaction().map_err(failed(location, "begin an append"))?;
    let head = tx
        .query_one(
            "SELECT next_position, last_at FROM instastate.event_heads
              WHERE namespace = $1 FOR UPDATE",
            &[&namespace],
        )
        .map_err(failed(location, "lock the event store's head"))?;
    let what = || "the event store's head".to_owned();
    let first_position = count(location, &head, "next_position", &what)?;
    let now = tx
        .query_one("SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint AS now", &[])
        .map_err(failed(location, "read the database's clock"))?;
    // Timestamps never go back along positions, whatever the clock does.
    let clock = count(location, &now, "now", &|| "the database's clock".to_owned())?;
    let at = clock.max(count(location, &head, "last_at", &what)?);
    let mut streams = load_streams(&mut tx, location, batch)?;
    let mut ids = load_ids(&mut tx, location, batch)?;
    let mut next = first_position;
    let mut rows: Vec<(u64, &str, u64, &Encoded)> = Vec::new();
    let mut results = Vec::with_capacity(batch.len());
    // The tagged events of the group so far, in position order: a condition is
    // checked against them too.
    let mut group_tags: Vec<(&str, EventRef)> = Vec::new();
    for Member { ticket, requests, condition } in batch {
        let mut planned = plan(requests, &streams, &ids, next);
        if let (Ok(appended), Some(condition)) = (&planned, condition)
            && appended.iter().any(|it| next <= it.positions.start && !it.positions.is_empty())
        {
            let layout: Vec<(u64, u64)> =
                appended.iter().map(|it| (it.versions.start, it.positions.start)).collect();
            let mut lookup =
                |tag: &str| first_tagged(&mut tx, location, condition, tag, &group_tags);
            if let Err(err) = condition::check_with(condition, requests, &layout, &mut lookup) {
                planned = Err(err);
            }
        }
        if let Ok(planned) = &planned {
            for (request, appended) in requests.iter().zip(planned) {
                if appended.positions.start < next {
                    continue; // a retry: written before
                }
                streams.insert(request.stream.clone(), appended.versions.end);
                for ((event, version), position) in request
                    .events
                    .iter()
                    .zip(appended.versions.clone())
                    .zip(appended.positions.clone())
                {
                    ids.insert(*event.id.as_bytes(), (request.stream.clone(), version, position));
                    rows.push((position, &request.stream, version, event));
                    for tag in &event.tags {
                        let stream = request.stream.clone();
                        let place = EventRef { stream, version, position: Position::new(position) };
                        group_tags.push((tag, place));
                    }
                }
                next = next.max(appended.positions.end);
            }
        }
        results.push((*ticket, planned));
    }
    if rows.is_empty() || dry {
        tx.rollback().map_err(failed(location, "end an append that writes nothing"))?;
        return Ok(results);
    }
    write(&mut tx, location, &rows, next, at)?;
    tx.commit().map_err(failed(location, "commit an append"))?;
    Ok(results)
}

/// Writes the planned `rows` (position, stream, version, event), moves their
/// streams past the versions written and the head to `next` (at `at`), and
/// notifies the live readers, in the append's transaction `tx`.
fn write(
    tx: &mut Transaction<'_>,
    location: &Location,
    rows: &[(u64, &str, u64, &Encoded)],
    next: u64,
    at: u64,
) -> Result<()> {
    let namespace = location.namespace();
    let at = i64_of(at);
    let insert = tx
        .prepare(
            "INSERT INTO instastate.events (namespace, position, stream, version, id, event_type,
                at_us, causation, correlation, tags, triggers, schema, json, data)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
        )
        .map_err(failed(location, "prepare the append"))?;
    for (position, stream, version, event) in rows {
        let causation = event.causation.as_ref().map(|id| &id.as_bytes()[..]);
        let correlation = event.correlation.as_ref().map(|id| &id.as_bytes()[..]);
        let schema = i64::from(event.schema);
        let params: [&(dyn postgres::types::ToSql + Sync); 14] = [
            &namespace,
            &i64_of(*position),
            stream,
            &i64_of(*version),
            &&event.id.as_bytes()[..],
            &event.event_type,
            &at,
            &causation,
            &correlation,
            &event.tags,
            &event.triggers,
            &schema,
            &event.json,
            &event.data,
        ];
        tx.execute(&insert, &params).map_err(failed(location, "write an event"))?;
    }
    let (tags, positions): (Vec<&str>, Vec<i64>) = rows
        .iter()
        .flat_map(|(position, _, _, event)| {
            event.tags.iter().map(move |tag| (tag.as_str(), i64_of(*position)))
        })
        .unzip();
    if !tags.is_empty() {
        // An event may carry a tag twice; it is tagged once.
        tx.execute(
            "INSERT INTO instastate.event_tags (namespace, tag, position)
             SELECT $1, * FROM UNNEST($2::text[], $3::bigint[]) ON CONFLICT DO NOTHING",
            &[&namespace, &tags, &positions],
        )
        .map_err(failed(location, "index the events' tags"))?;
    }
    // Each stream written to goes on past the last version written.
    let mut touched: HashMap<&str, u64> = HashMap::new();
    for (_, stream, version, _) in rows {
        let next = touched.entry(stream).or_default();
        *next = (*next).max(version + 1);
    }
    let (names, versions): (Vec<&str>, Vec<i64>) =
        touched.into_iter().map(|(stream, next)| (stream, i64_of(next))).unzip();
    tx.execute(
        "INSERT INTO instastate.streams (namespace, stream, next_version)
         SELECT $1, * FROM UNNEST($2::text[], $3::bigint[])
         ON CONFLICT (namespace, stream) DO UPDATE SET next_version = EXCLUDED.next_version",
        &[&namespace, &names, &versions],
    )
    .map_err(failed(location, "move the streams' versions on"))?;
    tx.execute(
        "UPDATE instastate.event_heads SET next_position = $2, last_at = $3 WHERE namespace = $1",
        &[&namespace, &i64_of(next), &at],
    )
    .map_err(failed(location, "move the event store's head on"))?;
    tx.execute("SELECT pg_notify($1, $2)", &[&channel(location), &next.to_string()])
        .map_err(failed(location, "notify the live readers"))?;
    Ok(())
}

/// The first event tagged `tag` at or after `condition`'s base and not resolved:
/// stored, or planned earlier in the group (`group`).
fn first_tagged(
    tx: &mut Transaction<'_>,
    location: &Location,
    condition: &Condition,
    tag: &str,
    group: &[(&str, EventRef)],
) -> Result<Option<EventRef>> {
    let base = condition.base().get();
    let resolved: Vec<i64> = condition::resolved(condition).map(|it| i64_of(it.get())).collect();
    let row = tx
        .query_opt(
            "SELECT e.stream, e.version, e.position
               FROM instastate.event_tags t
               JOIN instastate.events e ON e.namespace = t.namespace AND e.position = t.position
              WHERE t.namespace = $1 AND t.tag = $2 AND t.position >= $3
                AND NOT (t.position = ANY($4))
              ORDER BY t.position LIMIT 1",
            &[&location.namespace(), &tag, &i64_of(base), &resolved],
        )
        .map_err(failed(location, "look for a conflicting event"))?;
    if let Some(row) = row {
        let (stream, version, position) = event_place(location, &row)?;
        return Ok(Some(EventRef { stream, version, position: Position::new(position) }));
    }
    let resolved: Vec<u64> = condition::resolved(condition).map(Position::get).collect();
    Ok(group
        .iter()
        .find(|(it, place)| {
            *it == tag && base <= place.position.get() && !resolved.contains(&place.position.get())
        })
        .map(|(_, place)| place.clone()))
}

/// The next version of every stream the group appends to (absent: none yet).
fn load_streams(
    tx: &mut Transaction<'_>,
    location: &Location,
    batch: &[Member],
) -> Result<Streams> {
    let names: Vec<&str> =
        batch.iter().flat_map(|member| &member.requests).map(|it| it.stream.as_str()).collect();
    let rows = tx
        .query(
            "SELECT stream, next_version FROM instastate.streams
              WHERE namespace = $1 AND stream = ANY($2)",
            &[&location.namespace(), &names],
        )
        .map_err(failed(location, "read the streams appended to"))?;
    rows.iter()
        .map(|row| {
            let stream: String = column(location, row, "stream", &|| "a stream".to_owned())?;
            let next = count(location, row, "next_version", &|| format!("stream `{stream}`"))?;
            Ok((stream, next))
        })
        .collect()
}

/// Where each id the group names is stored already.
fn load_ids(tx: &mut Transaction<'_>, location: &Location, batch: &[Member]) -> Result<Ids> {
    let ids: Vec<&[u8]> = batch
        .iter()
        .flat_map(|member| &member.requests)
        .flat_map(|request| &request.events)
        .map(|event| &event.id.as_bytes()[..])
        .collect();
    let rows = tx
        .query(
            "SELECT id, stream, version, position FROM instastate.events
              WHERE namespace = $1 AND id = ANY($2)",
            &[&location.namespace(), &ids],
        )
        .map_err(failed(location, "look the appended ids up"))?;
    rows.iter()
        .map(|row| {
            let event = event_place(location, row)?;
            let id: &[u8] =
                column(location, row, "id", &|| format!("the event at position {}", event.2))?;
            let id = <[u8; 16]>::try_from(id).map_err(|_| Error::DatabaseCorrupt {
                location: location.to_string(),
                reason: format!("the id of the event at position {} is not 16 bytes", event.2),
            })?;
            Ok((id, event))
        })
        .collect()
}

/// The stream, version and position of a row of `load_ids` (after its id) or
/// `first_tagged`.
fn event_place(location: &Location, row: &Row) -> Result<(String, u64, u64)> {
    let position = count(location, row, "position", &|| "an event".to_owned())?;
    let what = || format!("the event at position {position}");
    let version = count(location, row, "version", &what)?;
    Ok((column(location, row, "stream", &what)?, version, position))
}

/// Plans one append (all its streams) at position `next`: what each stream gets,
/// or the earlier result of a retry (positions below `next`), or why it is refused.
fn plan(requests: &[Request], streams: &Streams, ids: &Ids, next: u64) -> Result<Vec<Appended>> {
    let mut planned = Vec::with_capacity(requests.len());
    let mut position = next;
    let mut retries = 0;
    for request in requests {
        let stream_next = streams.get(&request.stream).copied().unwrap_or(0);
        let last = stream_next.checked_sub(1);
        let first_seen = request
            .events
            .first()
            .and_then(|event| ids.get(event.id.as_bytes()))
            .filter(|seen| seen.0 == request.stream);
        // Where a retry's events would be.
        let place = match request.expected {
            Expected::NoStream => Some(first_seen.map_or(0, |seen| seen.1)),
            Expected::Exact(version) => version.checked_add(1),
            Expected::Any | Expected::StreamExists => first_seen.map(|seen| seen.1),
        };
        if let (Some(place), false) = (place, request.events.is_empty()) {
            match retry_of(request, ids, place) {
                Match::All(appended) => {
                    retries += 1;
                    planned.push(appended);
                    continue;
                }
                Match::Some
                    if matches!(request.expected, Expected::Any | Expected::StreamExists) =>
                {
                    let id = request.events.first().map_or_else(EventId::new, |event| event.id);
                    return Err(Error::DuplicateEventId { stream: request.stream.clone(), id });
                }
                Match::Some | Match::None => {}
            }
        }
        if !request.expected.holds(last) {
            return Err(Error::WrongExpectedVersion {
                stream: request.stream.clone(),
                expected: request.expected,
                actual: last,
            });
        }
        if let Some(event) =
            request.events.iter().find(|event| ids.contains_key(event.id.as_bytes()))
        {
            return Err(Error::DuplicateEventId { stream: request.stream.clone(), id: event.id });
        }
        let count = request.events.len() as u64;
        planned.push(Appended {
            stream: request.stream.clone(),
            versions: stream_next..stream_next + count,
            positions: position..position + count,
        });
        position += count;
    }
    // Part of an append retried and part new: no retry of one append.
    if 0 < retries && retries < planned.len() && position != next {
        let id =
            requests.iter().flat_map(|it| &it.events).next().map_or_else(EventId::new, |it| it.id);
        let stream = requests.first().map(|it| it.stream.clone()).unwrap_or_default();
        return Err(Error::DuplicateEventId { stream, id });
    }
    Ok(planned)
}

enum Match {
    All(Appended),
    Some,
    None,
}

/// Whether every event of `request` is stored in its stream from version `place`
/// on.
fn retry_of(request: &Request, ids: &Ids, place: u64) -> Match {
    let mut positions: Range<u64> = 0..0;
    for (k, event) in request.events.iter().enumerate() {
        let in_place = ids.get(event.id.as_bytes()).filter(|(stream, version, _)| {
            *stream == request.stream && *version == place + k as u64
        });
        match in_place {
            Some((_, _, position)) if k == 0 => positions = *position..position + 1,
            Some((_, _, position)) => positions.end = position + 1,
            None if k == 0 => return Match::None,
            None => return Match::Some,
        }
    }
    Match::All(Appended {
        stream: request.stream.clone(),
        versions: place..place + request.events.len() as u64,
        positions,
    })
}

/// An event of `instastate.events`, read back.
fn event_of(location: &Location, row: &Row) -> Result<RawEvent> {
    let position = count(location, row, "position", &|| "an event".to_owned())?;
    let what = || format!("the event at position {position}");
    let damaged = |column: &str, reason: &str| Error::DatabaseCorrupt {
        location: location.to_string(),
        reason: format!("column `{column}` of {} {reason}", what()),
    };
    let id = |at: &str| -> Result<Option<EventId>> {
        let bytes: Option<&[u8]> = column(location, row, at, &what)?;
        bytes
            .map(|bytes| {
                <[u8; 16]>::try_from(bytes)
                    .map(EventId::from_bytes)
                    .map_err(|_| damaged(at, "is not 16 bytes"))
            })
            .transpose()
    };
    let schema: i64 = column(location, row, "schema", &what)?;
    Ok(RawEvent {
        stream: column(location, row, "stream", &what)?,
        version: count(location, row, "version", &what)?,
        position: Position::new(position),
        at: Timestamp::from_micros(count(location, row, "at_us", &what)?),
        id: id("id")?.ok_or_else(|| damaged("id", "is NULL"))?,
        event_type: column(location, row, "event_type", &what)?,
        metadata: Metadata { causation: id("causation")?, correlation: id("correlation")? },
        tags: column(location, row, "tags", &what)?,
        json: column(location, row, "json", &what)?,
        schema: u32::try_from(schema).map_err(|_| damaged("schema", &format!("is {schema}")))?,
        triggers: column(location, row, "triggers", &what)?,
        removed: false,
        dropped: false,
        data: column(location, row, "data", &what)?,
    })
}

#[cfg(test)]
mod tests;
