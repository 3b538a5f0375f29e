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
//! the earlier result) and duplicate ids are decided as the embedded engine
//! decides them against its index: against what the writer's connection last saw
//! of the tables, by one statement that writes only if that still holds under the
//! head's lock (and else says what it found, to decide again), or, for the first
//! append and conditional ones, in a transaction that locks the head first. A
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

use postgres::{Client, Row, Statement, Transaction};

use super::{
    Location, channel, column, count, failed, i64_of, listen, schema, spend_notifications,
    wait_for_commit,
};
use crate::{
    Error, Result, StorageError, Timestamp,
    events::{
        Appended, Condition, EventId, EventRef, Expected, Metadata, Position, RawEvent,
        RecordedEvent,
        append::{Encoded, Request, check_requests},
        condition,
    },
};

use removal::VISIBLE;

/// How long a leader waits at most for the appends of its group to come back.
const GATHER: Duration = Duration::from_micros(200);

/// The kind a namespace of this engine records.
const KIND: &str = "an event store";

/// An event store's engine on PostgreSQL.
pub(crate) struct PgEvents {
    location: Location,
    group: Mutex<Group>,
    done: Condvar,
    /// Raised when an append joins the queue, for a leader gathering its group.
    arrived: Condvar,
    /// Connections for short reads and removals, taken and put back.
    readers: Pool,
    /// Connections for reads of events a page at a time (see [`connect_pager`]).
    pagers: Pool,
    /// Connections for dry runs of appends.
    checkers: Pool<Checker>,
}

/// Free connections of one use, taken and put back.
struct Pool<C = Client>(Mutex<Vec<C>>);

impl<C> Default for Pool<C> {
    fn default() -> Self {
        Pool(Mutex::new(Vec::new()))
    }
}

/// A connection a [`Pool`] keeps, with what it prepared on it.
trait Pooled {
    fn client(&self) -> &Client;
}

impl Pooled for Client {
    fn client(&self) -> &Client {
        self
    }
}

/// A connection that checks appends ([`PgEvents::dry_run`]), its statements
/// prepared once.
struct Checker {
    client: Client,
    statements: Statements,
}

impl Pooled for Checker {
    fn client(&self) -> &Client {
        &self.client
    }
}

/// The free connections a pool keeps at most; one more put back is closed.
const POOLED: usize = 4;

impl<C: Pooled> Pool<C> {
    /// A free connection, or a new one (`connect`).
    fn take(&self, connect: impl FnOnce() -> Result<C>) -> Result<C> {
        let pooled = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop();
        match pooled.filter(|it| !it.client().is_closed()) {
            Some(it) => Ok(it),
            None => connect(),
        }
    }

    /// Puts `it` back among the free connections, unless it broke or enough are
    /// free.
    fn put_back(&self, it: C) {
        let mut free = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !it.client().is_closed() && free.len() < POOLED {
            free.push(it);
        }
    }

    /// Runs `read` on a connection of the pool; again on a new connection when
    /// the one it ran on broke (every read is safe to repeat), up to `ATTEMPTS`
    /// times in all.
    fn run<T>(
        &self,
        connect: impl Fn() -> Result<C>,
        read: impl Fn(&mut C) -> Result<T>,
    ) -> Result<T> {
        self.run_again_if(connect, read, || true)
    }

    /// Runs `work` on a connection of the pool; again on a new connection when
    /// the one it ran on broke, if `again` says the work may run again then, up
    /// to `ATTEMPTS` times in all. A break also closes the free connections: a
    /// server that ended one (a restart, an administrator) most likely ended
    /// them all, and a connection taken from the pool finds that out only when
    /// it is used.
    fn run_again_if<T>(
        &self,
        connect: impl Fn() -> Result<C>,
        work: impl Fn(&mut C) -> Result<T>,
        again: impl Fn() -> bool,
    ) -> Result<T> {
        let mut it = self.take(&connect)?;
        let mut res = work(&mut it);
        let mut attempts = 1;
        while let Err(err) = &res
            && attempts < ATTEMPTS
            && super::broke(err, it.client())
            && again()
        {
            // Closed once the pool's lock is let go: closing one says goodbye
            // to the server, which may take a moment.
            let free = std::mem::take(
                &mut *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
            );
            drop(free);
            it = connect()?;
            res = work(&mut it);
            attempts += 1;
        }
        self.put_back(it);
        res
    }
}

/// How many times a pool runs a piece of work at most, each time on a new
/// connection after the last one broke: enough for a read that took a
/// connection the server had ended, and whose new one the server ended again
/// (a restart that ends every connection twice, or two in a row).
const ATTEMPTS: usize = 3;

/// The appends waiting for a transaction, and who runs it.
#[derive(Default)]
struct Group {
    next_ticket: u64,
    queue: Vec<Member>,
    /// Whether a caller runs a transaction now (it holds the writer).
    leading: bool,
    writer: Option<Writer>,
    results: HashMap<u64, Result<Vec<Appended>>>,
    /// How many appends the last transaction carried.
    last_size: usize,
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
            group: Mutex::new(Group {
                writer: Some(Writer::new(client, location)?),
                ..Group::default()
            }),
            done: Condvar::new(),
            arrived: Condvar::new(),
            readers: Pool::default(),
            pagers: Pool::default(),
            checkers: Pool::default(),
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
        self.arrived.notify_one();
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
            group = self.gather(group);
            let batch = std::mem::take(&mut group.queue);
            group.last_size = batch.len();
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

    /// Waits, a moment at most, for as many appends as the last transaction
    /// carried: the callers it answered come back one by one, and a leader that
    /// left at once would take only the first of them.
    fn gather<'a>(&self, mut group: MutexGuard<'a, Group>) -> MutexGuard<'a, Group> {
        let deadline = Instant::now() + GATHER;
        while group.queue.len() < group.last_size {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            group = self
                .arrived
                .wait_timeout(group, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        group
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
        let connect = || {
            let mut client = self.location.connect()?;
            let statements = Statements::prepare(&mut client, &self.location)?;
            Ok(Checker { client, statements })
        };
        let mut results = self.checkers.run(connect, |Checker { client, statements }| {
            commit(client, statements, &self.location, &batch, true).map(|(results, _)| results)
        })?;
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

    /// The last version of `stream`, or `None` when it has no event (or was
    /// deleted).
    pub(crate) fn stream_version(&self, stream: &str) -> Result<Option<u64>> {
        let (life, next) = self.stream_life(stream)?;
        let deleted = life.deleted || life.tombstoned;
        Ok(next.checked_sub(1).filter(|_| !deleted))
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
                      WHERE s.namespace = $1 AND s.next_version > 0 AND s.life = 0
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
    pub(crate) fn read(&self, query: &Query<'_>) -> Result<Vec<EventRow>> {
        let sql = read_sql(query);
        let until = query.until.map(i64_of);
        let rows = self.pagers.run(
            || connect_pager(&self.location),
            |client| {
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
            },
        )?;
        Ok(rows.into_iter().map(EventRow).collect())
    }

    /// Up to `limit` events of every stream from position `from` on, in position
    /// order (`backward`: from `from` down).
    pub(crate) fn read_all(&self, from: u64, limit: u64, backward: bool) -> Result<Vec<RawEvent>> {
        let rows = self.read(&Query { from, limit, backward, ..Query::default() })?;
        rows.iter().map(|row| row.raw(&self.location)).collect()
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
        let rows =
            self.read(&Query { stream: Some(stream), from, limit, backward, ..Query::default() })?;
        rows.iter().map(|row| row.raw(&self.location)).collect()
    }

    /// Settles the header of the event store's types (kept as a journal's, in
    /// `journal_heads`): `settle` gets the one recorded, if any, and says the one
    /// to record (or refuses), under the lock of the store's head, so that two
    /// programs opening the store at once do not both pass a check that only one
    /// header can satisfy. Written only when it changes.
    pub(crate) fn settle_header(
        &self,
        settle: impl FnOnce(Option<Vec<u8>>) -> Result<Vec<u8>>,
    ) -> Result<()> {
        let location = &self.location;
        let mut client = location.connect()?;
        let mut tx = client.transaction().map_err(failed(location, "begin to check the types"))?;
        lock_head(&mut tx, location)?;
        let recorded = super::journal::read_header(&mut tx, location)?;
        let header = settle(recorded.clone())?;
        if recorded.as_ref() != Some(&header) {
            super::journal::write_header(&mut tx, location, &header)?;
        }
        tx.commit().map_err(failed(location, "commit the event store's header"))
    }

    /// Runs `read` on a reader connection (a new one when none is free); once
    /// more on a new connection when the one taken broke (every read is safe to
    /// repeat).
    fn with_reader<T>(&self, read: impl Fn(&mut Client) -> Result<T>) -> Result<T> {
        self.readers.run(|| self.location.connect(), read)
    }
}

/// The statement of a read of `query`: `$1` the namespace, `$2` the stream (or
/// NULL), `$3` the first version or position, `$4` the one it stops before (or
/// NULL), `$5` the event type and `$6` the stream prefix (or NULL), `$7` the
/// limit.
fn read_sql(query: &Query<'_>) -> String {
    let (order, place) = match query.stream {
        Some(_) => ("version", "version"),
        None => ("position", "position"),
    };
    let (compare, direction) = if query.backward { ("<=", "DESC") } else { (">=", "") };
    let stream = if query.stream.is_some() { "AND stream = $2" } else { "AND $2::text IS NULL" };
    format!(
        "SELECT {EVENT_COLUMNS} FROM instastate.events e WHERE namespace = $1 {stream}
            AND {place} {compare} $3 AND ($4::bigint IS NULL OR {place} < $4)
            AND ($5::text IS NULL OR event_type = $5)
            AND ($6::text IS NULL OR starts_with(stream, $6))
            AND {VISIBLE}
          ORDER BY {order} {direction} LIMIT $7"
    )
}

/// The statement of a follower's read: `$1` the namespace, `$2` the first
/// position, `$3` the limit.
fn follow_sql() -> String {
    format!(
        "SELECT {EVENT_COLUMNS} FROM instastate.events e
          WHERE namespace = $1 AND position >= $2 AND {VISIBLE}
          ORDER BY position LIMIT $3"
    )
}

/// A new connection that only reads events a page at a time (reads and
/// followers), whose planner walks an index in the page's order rather than
/// sort: a namespace that grew since the database last analyzed the events'
/// table can look nearly empty to the planner, which would then read and sort
/// every event from the page's start on, for every page (a read of `$all`
/// quadratic in the events). Other statements, which may well be better off
/// sorting, run on other connections.
fn connect_pager(location: &Location) -> Result<Client> {
    location.connect_with("SET enable_sort = off;")
}

/// Locks the head of `location`'s event store until `tx` ends: what every
/// transaction that appends, removes or checks the store's types takes first.
fn lock_head(tx: &mut Transaction<'_>, location: &Location) -> Result<()> {
    tx.execute(
        "SELECT 1 FROM instastate.event_heads WHERE namespace = $1 FOR UPDATE",
        &[&location.namespace()],
    )
    .map_err(failed(location, "lock the event store's head"))?;
    Ok(())
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
    /// No version (of a stream read) or position (of a read of every stream) at
    /// or past it.
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

impl Member {
    /// Whether an event of it holds data sealed with a subject's key.
    fn is_sealed(&self) -> bool {
        self.requests.iter().flat_map(|it| &it.events).any(|event| !event.sealed_with.is_empty())
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
        let client = connect_pager(&self.location)?;
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
            .query(&follow_sql(), &[&self.location.namespace(), &i64_of(self.next), &i64_of(limit)])
            .map_err(failed(&self.location, "read new events"))?;
        let events = rows
            .into_iter()
            .map(|row| EventRow(row).raw(&self.location))
            .collect::<Result<Vec<_>>>()?;
        self.next = events.last().map_or(self.next, |it| it.position.get() + 1);
        Ok(events)
    }

    fn listen(&mut self, on: bool) -> Result<()> {
        listen(&mut self.client, &self.location, on)?;
        self.listening = on;
        Ok(())
    }
}

/// How long a watcher of commits may take to see that it must stop.
const STOP_CHECK: Duration = Duration::from_millis(100);

/// Calls `on_commit` at each commit to `location`'s namespace, as its
/// notification comes, and after every `poll` without one, until `stop` is set
/// (looked at every [`STOP_CHECK`] at most). A broken connection is made again,
/// and `on_commit` called then too, since a commit may have come while none
/// listened.
pub(crate) fn watch_commits(
    location: &Location,
    stop: &AtomicBool,
    poll: Duration,
    on_commit: &dyn Fn(),
) {
    use postgres::fallible_iterator::FallibleIterator;
    let mut client: Option<Client> = None;
    let mut quiet_since = std::time::Instant::now();
    while !stop.load(Ordering::Acquire) {
        if poll <= quiet_since.elapsed() {
            on_commit();
            quiet_since = std::time::Instant::now();
        }
        let Some(listening) = client.as_mut().filter(|client| !client.is_closed()) else {
            let connected = location.connect().and_then(|mut client| {
                listen(&mut client, location, true)?;
                Ok(client)
            });
            client = connected.ok();
            if client.is_none() {
                std::thread::sleep(poll.min(STOP_CHECK));
            }
            on_commit();
            continue;
        };
        let woke = listening.notifications().timeout_iter(poll.min(STOP_CHECK)).next();
        match woke {
            Ok(Some(_)) => {
                // The others that came meanwhile are announced by this one call.
                let mut notifications = listening.notifications();
                let mut rest = notifications.iter();
                while let Ok(Some(_)) = rest.next() {}
                on_commit();
                quiet_since = std::time::Instant::now();
            }
            Ok(None) => {}
            Err(_) => client = None,
        }
    }
}

/// The caller that runs a group's transaction.
struct Leader<'a> {
    engine: &'a PgEvents,
    writer: Option<Writer>,
    results: Vec<(u64, Result<Vec<Appended>>)>,
}

/// The connection that appends, with its statements prepared, and what it knows
/// of the tables from its last statement.
struct Writer {
    client: Client,
    statements: Statements,
    known: Option<Known>,
}

/// The head and some streams' next versions as the writer last saw them commit:
/// an append planned against them is written in one statement, which checks that
/// they still hold (see [`Statements::write`]).
///
/// **Invariant:** every transaction that stores an event moves the head on, and
/// every one that changes a stream's life (a removal, a retention rule) counts
/// itself in the head's `removals`, so that a head unchanged since it was seen
/// vouches for the rest.
struct Known {
    head: u64,
    streams: Streams,
}

/// Streams whose versions a writer keeps, at most (it forgets them all past it).
const KNOWN_STREAMS: usize = 100_000;

impl Known {
    /// What it knows of `stream`: none is a stream with no version.
    fn stream(&self, stream: &str) -> StreamAt {
        self.streams.get(stream).copied().unwrap_or_default()
    }

    /// Takes in `streams`, at head `head`.
    fn learn(&mut self, head: u64, streams: impl IntoIterator<Item = (String, StreamAt)>) {
        if KNOWN_STREAMS < self.streams.len() {
            self.streams.clear();
        }
        self.head = head;
        self.streams.extend(streams);
    }
}

impl Writer {
    fn new(mut client: Client, location: &Location) -> Result<Writer> {
        // The statements are written for plans made once (they probe indexes by
        // key): planning each execution again would cost more than running it.
        client
            .batch_execute("SET plan_cache_mode = force_generic_plan")
            .map_err(failed(location, "set up the appends' connection"))?;
        let statements = Statements::prepare(&mut client, location)?;
        Ok(Writer { client, statements, known: None })
    }
}

/// The statements of the appends, prepared once per connection.
struct Statements {
    /// Locks the head, and looks the streams and ids of a group up.
    lock: Statement,
    /// Looks the streams and ids of a group up (`LOOKUP`).
    lookup: Statement,
    /// Writes a group's events if what it was planned against holds, and commits
    /// (outside a transaction): one round trip. Its snapshot is taken before it
    /// locks the head, so the head it locks may be newer: then, or if a stream or
    /// id is not as planned, it writes nothing and says what it found.
    write: Statement,
    first_tagged: Statement,
}

/// The streams appended to (`id` NULL), and where the ids named are. Each looked
/// up by its key (`LATERAL .. LIMIT 1`): the plan cached for the statement then
/// probes the indexes, whatever the tables' statistics (a `= ANY(..)` plan made
/// before the first `ANALYZE` scans every event of the namespace).
const LOOKUP: &str = "SELECT s.stream, s.next_version AS version, NULL::bytea AS id,
        NULL::bigint AS position, s.life
   FROM unnest($2::text[]) AS n(stream) CROSS JOIN LATERAL (
        SELECT stream, next_version, life FROM instastate.streams
         WHERE namespace = $1 AND stream = n.stream LIMIT 1) s
 UNION ALL
 SELECT e.stream, e.version, e.id, e.position, NULL::smallint
   FROM unnest($3::bytea[]) AS i(id) CROSS JOIN LATERAL (
        SELECT stream, version, id, position FROM instastate.events
         WHERE namespace = $1 AND id = i.id LIMIT 1) e";

/// The write: `$1` namespace, `$2` the group's streams, `$3` its ids (for the
/// lookup), `$4` the head planned from, `$5` each stream's next version and life
/// planned from (`next_version * 4 + life`), `$6` the ids planned as not stored
/// (none may be; each probed by its key, as in [`LOOKUP`]), then the events column by column (each event's tags and
/// triggers a slice of one flat array), the tags to index, the streams moved on,
/// the next head and the notification. A removal committed after the statement's
/// snapshot was taken (which its checks of the streams would miss) shows in the
/// head's `removals`, locked, and it then writes nothing. The row of kind 0 says
/// whether it wrote (`ok`), the head locked (`version`), the head the snapshot saw
/// (`position`; NULL when a removal came since) and the timestamp; the rows of
/// kind 1 are the lookup, made only when it did not write.
const WRITE: &str = "WITH head AS (
    SELECT next_position, last_at, removals FROM instastate.event_heads
     WHERE namespace = $1 FOR UPDATE
 ), state AS (
    SELECT h.next_position AS locked,
           (SELECT next_position FROM instastate.event_heads
             WHERE namespace = $1 AND removals = h.removals) AS seen,
           GREATEST(h.last_at, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint) AS at,
           h.next_position = $4
             AND h.removals = (SELECT removals FROM instastate.event_heads WHERE namespace = $1)
             AND NOT EXISTS (
                 SELECT 1 FROM unnest($2::text[], $5::bigint[]) AS a(stream, next)
                  WHERE COALESCE((SELECT next_version * 4 + life FROM instastate.streams
                                   WHERE namespace = $1 AND stream = a.stream), 0) <> a.next)
             AND NOT EXISTS (
                 SELECT 1 FROM unnest($6::bytea[]) AS i(id) CROSS JOIN LATERAL (
                        SELECT 1 FROM instastate.events
                         WHERE namespace = $1 AND id = i.id LIMIT 1) e)
             AS ok
      FROM head h
 ), written AS (
    INSERT INTO instastate.events (namespace, position, stream, version, id, event_type, at_us,
        causation, correlation, tags, triggers, schema, json, data)
    SELECT $1, e.position, e.stream, e.version, e.id, e.event_type, s.at, e.causation,
           e.correlation, ($7::text[])[e.tags_from:e.tags_to],
           ($8::text[])[e.triggers_from:e.triggers_to], e.schema, e.json, e.data
      FROM state s, unnest($9::bigint[], $10::text[], $11::bigint[], $12::bytea[], $13::text[],
                           $14::bytea[], $15::bytea[], $16::int[], $17::int[], $18::int[],
                           $19::int[], $20::bigint[], $21::bool[], $22::bytea[])
        AS e(position, stream, version, id, event_type, causation, correlation, tags_from,
             tags_to, triggers_from, triggers_to, schema, json, data)
     WHERE s.ok
 ), tagged AS (
    INSERT INTO instastate.event_tags (namespace, tag, position)
    SELECT $1, t.tag, t.position FROM state s, unnest($23::text[], $24::bigint[]) AS t(tag, position)
     WHERE s.ok
    ON CONFLICT DO NOTHING
 ), moved AS (
    INSERT INTO instastate.streams (namespace, stream, next_version)
    SELECT $1, m.stream, m.next FROM state s, unnest($25::text[], $26::bigint[]) AS m(stream, next)
     WHERE s.ok
    ON CONFLICT (namespace, stream) DO UPDATE SET next_version = EXCLUDED.next_version, life = 0
 ), moved_head AS (
    UPDATE instastate.event_heads h SET next_position = $27, last_at = s.at
      FROM state s WHERE h.namespace = $1 AND s.ok AND $4 < $27
 ), notified AS (
    SELECT pg_notify($28, $29) FROM state s WHERE s.ok AND $4 < $27
 )
 SELECT 0 AS kind, NULL::text AS stream, s.locked AS version, NULL::bytea AS id,
        s.seen AS position, NULL::smallint AS life, s.at, s.ok,
        (SELECT count(*) FROM notified) AS notified
   FROM state s
 UNION ALL
 SELECT 1, *, NULL, NULL, NULL FROM (";

impl Statements {
    fn prepare(client: &mut Client, location: &Location) -> Result<Statements> {
        let mut prepare =
            |sql: &str| client.prepare(sql).map_err(failed(location, "prepare the appends"));
        Ok(Statements {
            // The head, locked (the newest version of its row, once the lock is
            // taken), and the head as the statement's snapshot saw it (`seen`); then
            // the lookup, in that snapshot.
            lock: prepare(&format!(
                "SELECT 0 AS kind, NULL::text AS stream, h.next_position AS version,
                        NULL::bytea AS id, NULL::bigint AS position, NULL::smallint AS life,
                        (SELECT next_position FROM instastate.event_heads
                          WHERE namespace = $1 AND removals = h.removals) AS seen
                   FROM (SELECT next_position, removals FROM instastate.event_heads
                          WHERE namespace = $1 FOR UPDATE) h
                 UNION ALL
                 SELECT 1, *, NULL FROM ({LOOKUP}) l"
            ))?,
            lookup: prepare(LOOKUP)?,
            // The lookup only when the write did not go in: a write that did
            // leaves what its writer planned.
            write: prepare(&format!("{WRITE}{LOOKUP}) l WHERE NOT (SELECT ok FROM state)"))?,
            first_tagged: prepare(
                "SELECT e.stream, e.version, e.position
                   FROM instastate.event_tags t
                   JOIN instastate.events e ON e.namespace = t.namespace AND e.position = t.position
                  WHERE t.namespace = $1 AND t.tag = $2 AND t.position >= $3
                    AND NOT (t.position = ANY($4))
                  ORDER BY t.position LIMIT 1",
            )?,
        })
    }
}

/// The streams of a group, as its transaction sees them.
type Streams = HashMap<String, StreamAt>;

/// A stream as an append plans against it: its next version, and whether it is
/// deleted or tombstoned (a row of `instastate.streams`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct StreamAt {
    next: u64,
    life: i16,
}

/// A stream's `life`: deleted (softly), or tombstoned.
const DELETED: i16 = 1;
const TOMBSTONED: i16 = 2;

impl StreamAt {
    /// How the write statement checks it: `next_version * 4 + life`.
    fn checked(self) -> i64 {
        i64_of(self.next.saturating_mul(4).saturating_add(u64::from(self.life.unsigned_abs())))
    }
}
/// Where each id the group names is: stream, version, position.
type Ids = HashMap<[u8; 16], (String, u64, u64)>;
/// Each append's result, by ticket.
type Results = Vec<(u64, Result<Vec<Appended>>)>;

impl Leader<'_> {
    /// Runs one transaction for `batch`, and records each append's result.
    fn run(&mut self, batch: &[Member]) {
        let location = &self.engine.location;
        let mut outcome = self.try_once(batch);
        // A broken connection may have committed the transaction or not: run on a
        // new one, the events already stored (by their ids) are then a retry, which
        // returns what they got.
        if outcome.is_err() && self.writer.is_none() {
            outcome = self.try_once(batch);
        }
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

    /// Writes the group on the writer (a new one if it has none, or if its
    /// connection closed): in one statement when what the writer knows holds,
    /// else in a transaction that locks the head first. Keeps the writer unless its
    /// connection broke (or none could be made).
    fn try_once(&mut self, batch: &[Member]) -> Result<Results> {
        let location = &self.engine.location;
        let mut writer = match self.writer.take().filter(|it| !it.client.is_closed()) {
            Some(writer) => writer,
            None => Writer::new(location.connect()?, location)?,
        };
        // Conditions, and the keys sealed events were sealed with, are checked
        // under the head's lock: in the transaction.
        let locked = batch.iter().any(|member| member.condition.is_some() || member.is_sealed());
        let outcome = if locked { Ok(None) } else { write_known(&mut writer, location, batch) };
        let outcome = match outcome {
            Ok(Some(results)) => Ok(results),
            Ok(None) => {
                let Writer { client, statements, known } = &mut writer;
                commit(client, statements, location, batch, false).map(|(results, learnt)| {
                    *known = learnt;
                    results
                })
            }
            Err(err) => Err(err),
        };
        if outcome.is_err() {
            writer.known = None;
        }
        let broke = outcome.as_ref().err().is_some_and(|err| super::broke(err, &writer.client));
        if !broke {
            self.writer = Some(writer);
        }
        outcome
    }
}

/// Writes the group in one statement, planned against what the writer knows:
/// `None` when it knows nothing, or when the tables changed under it three times
/// running (the caller then locks the head first).
fn write_known(
    writer: &mut Writer,
    location: &Location,
    batch: &[Member],
) -> Result<Option<Results>> {
    // The ids of the group found stored, by the last statement that looked.
    let mut stored = Ids::new();
    for _ in 0..3 {
        let Some(known) = writer.known.as_mut() else { return Ok(None) };
        // Planning adds the group's own ids: to a copy, or a second try would take
        // them for stored ones (a retry) and acknowledge what it never wrote.
        let mut ids = stored.clone();
        let mut streams: Streams = batch
            .iter()
            .flat_map(|member| &member.requests)
            .map(|it| (it.stream.clone(), known.stream(&it.stream)))
            .collect();
        let assumed = streams.clone();
        let planned =
            plan_group(batch, &[], &mut streams, &mut ids, known.head, |_, _, _| Ok(None));
        let found = write(
            &mut writer.client,
            &writer.statements.write,
            location,
            &planned,
            known.head,
            &assumed,
        )?;
        match found {
            Found::Wrote => {
                known.learn(planned.next, streams);
                return Ok(Some(planned.results));
            }
            // Fresh: what it found is the tables as of now; planned again against it.
            Found::Other { locked, seen, streams: now, ids: found } if Some(locked) == seen => {
                let absent: Vec<(String, StreamAt)> = assumed
                    .into_keys()
                    .filter(|it| !now.contains_key(it))
                    .map(|it| (it, StreamAt::default()))
                    .collect();
                known.learn(locked, now.into_iter().chain(absent));
                stored = found;
            }
            // Another writer committed while this one waited for the lock: what it
            // found is older than the head. Tried again from that head (the check
            // finds out what else changed).
            Found::Other { locked, .. } => known.head = locked,
        }
    }
    writer.known = None;
    Ok(None)
}

/// A group planned: each append's result, the rows to write (position, stream,
/// version, event) and the head after them.
struct Planned<'a> {
    /// Every id of the group.
    ids: Vec<&'a [u8]>,
    /// The ids it was planned as not stored (those of `ids` the map it was planned
    /// against lacked).
    absent: Vec<&'a [u8]>,
    results: Results,
    rows: Vec<(u64, &'a str, u64, &'a Encoded)>,
    next: u64,
}

/// Plans each append of `batch` in order from position `first`, against `streams`
/// and `ids` (and the appends before it, which it adds to them); `first_tagged`
/// finds the first stored event that conflicts with a condition.
fn plan_group<'a>(
    batch: &'a [Member],
    stale: &[u64],
    streams: &mut Streams,
    ids: &mut Ids,
    first: u64,
    mut first_tagged: impl FnMut(&Condition, &str, &[(&str, EventRef)]) -> Result<Option<EventRef>>,
) -> Planned<'a> {
    let events = || batch.iter().flat_map(|member| &member.requests).flat_map(|it| &it.events);
    let all: Vec<&[u8]> = events().map(|event| &event.id.as_bytes()[..]).collect();
    let absent = events()
        .filter(|event| !ids.contains_key(event.id.as_bytes()))
        .map(|event| &event.id.as_bytes()[..])
        .collect();
    let mut next = first;
    let mut rows = Vec::new();
    let mut results = Vec::with_capacity(batch.len());
    // The tagged events of the group so far, in position order: a condition is
    // checked against them too.
    let mut group_tags: Vec<(&str, EventRef)> = Vec::new();
    for Member { ticket, requests, condition } in batch {
        if stale.contains(ticket) {
            let reason = effects::STALE_KEYS.to_owned();
            results.push((*ticket, Err(Error::InvalidAppend { reason })));
            continue;
        }
        let mut planned = plan(requests, streams, ids, next);
        if let (Ok(appended), Some(condition)) = (&planned, condition)
            && appended.iter().any(|it| next <= it.positions.start && !it.positions.is_empty())
        {
            let layout: Vec<(u64, u64)> =
                appended.iter().map(|it| (it.versions.start, it.positions.start)).collect();
            let mut lookup = |tag: &str| first_tagged(condition, tag, &group_tags);
            if let Err(err) = condition::check_with(condition, requests, &layout, &mut lookup) {
                planned = Err(err);
            }
        }
        if let Ok(planned) = &planned {
            for (request, appended) in requests.iter().zip(planned) {
                if appended.positions.start < next {
                    continue; // a retry: written before
                }
                let at = StreamAt { next: appended.versions.end, life: 0 };
                streams.insert(request.stream.clone(), at);
                for ((event, version), position) in request
                    .events
                    .iter()
                    .zip(appended.versions.clone())
                    .zip(appended.positions.clone())
                {
                    ids.insert(*event.id.as_bytes(), (request.stream.clone(), version, position));
                    rows.push((position, request.stream.as_str(), version, event));
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
    Planned { ids: all, absent, results, rows, next }
}

/// The group's transaction: locks the head, plans each append in order against the
/// tables and the appends before it, writes the events of those that hold, and
/// commits (a `dry` run writes nothing, and rolls back). Returns the results and,
/// unless it was a dry run, what the writer knows of the tables after it.
fn commit(
    client: &mut Client,
    statements: &Statements,
    location: &Location,
    batch: &[Member],
    dry: bool,
) -> Result<(Results, Option<Known>)> {
    let namespace = location.namespace();
    let mut tx = client.transaction().map_err(failed(location, "begin an append"))?;
    let requests = || batch.iter().flat_map(|member| &member.requests);
    let names: Vec<&str> = requests().map(|it| it.stream.as_str()).collect();
    let wanted: Vec<&[u8]> =
        requests().flat_map(|it| &it.events).map(|event| &event.id.as_bytes()[..]).collect();
    let params: [&(dyn postgres::types::ToSql + Sync); 3] = [&namespace, &names, &wanted];
    let rows = tx
        .query(&statements.lock, &params)
        .map_err(failed(location, "lock the event store's head"))?;
    let what = || "the event store's head".to_owned();
    let (head, looked_up) = split_state(location, &rows)?;
    let first_position = count(location, head, "version", &what)?;
    // The statement's snapshot was taken before the lock: if an append or a
    // removal committed meanwhile (the head moved on, or its count of removals),
    // the streams and ids are looked up again, in a snapshot taken under the lock
    // (`seen` is then another position, or NULL).
    let seen = column::<Option<i64>>(location, head, "seen", &what)?;
    let (mut streams, mut ids) = if seen == Some(i64_of(first_position)) {
        looked_up_in(location, looked_up)?
    } else {
        let rows = tx
            .query(&statements.lookup, &params)
            .map_err(failed(location, "read the streams and ids appended"))?;
        looked_up_in(location, rows.iter())?
    };
    for name in &names {
        streams.entry((*name).to_owned()).or_default();
    }
    let assumed = streams.clone();
    // Sealed with a key forgotten before the head was locked: refused, to be
    // sealed again with the subject's new key.
    let mut stale = Vec::new();
    for member in batch.iter().filter(|member| member.is_sealed()) {
        let requests: Vec<&Request> = member.requests.iter().collect();
        if effects::sealed_with_stale_keys(&mut tx, location, &requests)? {
            stale.push(member.ticket);
        }
    }
    let planned = plan_group(
        batch,
        &stale,
        &mut streams,
        &mut ids,
        first_position,
        |condition, tag, group| {
            first_tagged(&mut tx, &statements.first_tagged, location, condition, tag, group)
        },
    );
    if planned.rows.is_empty() || dry {
        tx.rollback().map_err(failed(location, "end an append that writes nothing"))?;
        let known = (!dry).then_some(Known { head: first_position, streams: assumed });
        return Ok((planned.results, known));
    }
    // Under the head's lock, what it was planned against holds.
    match write(&mut tx, &statements.write, location, &planned, first_position, &assumed)? {
        Found::Wrote => {}
        Found::Other { locked, .. } => {
            return Err(Error::DatabaseCorrupt {
                location: location.to_string(),
                reason: format!(
                    "the event store changed under the lock of its head (at {locked}, planned at {first_position})"
                ),
            });
        }
    }
    tx.commit().map_err(failed(location, "commit an append"))?;
    Ok((planned.results, Some(Known { head: planned.next, streams })))
}

/// The row of kind 0 of `rows` (the head), and the others (the lookup).
fn split_state<'a>(location: &Location, rows: &'a [Row]) -> Result<(&'a Row, Vec<&'a Row>)> {
    let what = || "the event store's head".to_owned();
    let mut heads = Vec::with_capacity(1);
    let mut looked_up = Vec::with_capacity(rows.len());
    for row in rows {
        match column::<i32>(location, row, "kind", &what)? {
            0 => heads.push(row),
            _ => looked_up.push(row),
        }
    }
    match heads[..] {
        [head] => Ok((head, looked_up)),
        _ => Err(Error::DatabaseCorrupt {
            location: location.to_string(),
            reason: format!("the event store has {} heads", heads.len()),
        }),
    }
}

/// What the write statement found.
enum Found {
    /// It wrote (if it had anything to write); outside a transaction, committed.
    Wrote,
    /// The tables were not as planned: it wrote nothing. The head it locked, the
    /// head its snapshot saw (`None` when a stream's life changed since), and the
    /// streams and ids as that snapshot has them.
    Other { locked: u64, seen: Option<u64>, streams: Streams, ids: Ids },
}

/// Writes the `planned` rows, moves their streams on and the head to the planned
/// next, and notifies the live readers, if the head is still `head`, the
/// streams' next versions still `assumed`, and no id planned as absent stored: one
/// statement (see [`Statements::write`]), a commit of its own outside a
/// transaction (`client` may be a transaction).
fn write(
    client: &mut impl postgres::GenericClient,
    statement: &Statement,
    location: &Location,
    planned: &Planned<'_>,
    head: u64,
    assumed: &Streams,
) -> Result<Found> {
    let rows = &planned.rows;
    let next = planned.next;
    // Column by column; tags and triggers flat, each event's a slice (from 1).
    let mut positions = Vec::with_capacity(rows.len());
    let mut streams = Vec::with_capacity(rows.len());
    let mut versions = Vec::with_capacity(rows.len());
    let mut ids = Vec::with_capacity(rows.len());
    let mut types = Vec::with_capacity(rows.len());
    let mut causations = Vec::with_capacity(rows.len());
    let mut correlations = Vec::with_capacity(rows.len());
    let (mut tags, mut tags_from, mut tags_to) = (Vec::new(), Vec::new(), Vec::new());
    let (mut triggers, mut triggers_from, mut triggers_to) = (Vec::new(), Vec::new(), Vec::new());
    let mut schemas = Vec::with_capacity(rows.len());
    let mut json = Vec::with_capacity(rows.len());
    let mut data = Vec::with_capacity(rows.len());
    let (mut tag_names, mut tag_positions) = (Vec::new(), Vec::new());
    for (position, stream, version, event) in rows {
        positions.push(i64_of(*position));
        streams.push(*stream);
        versions.push(i64_of(*version));
        ids.push(&event.id.as_bytes()[..]);
        types.push(event.event_type.as_str());
        causations.push(event.causation.as_ref().map(|id| &id.as_bytes()[..]));
        correlations.push(event.correlation.as_ref().map(|id| &id.as_bytes()[..]));
        slice(&mut tags, &mut tags_from, &mut tags_to, &event.tags);
        slice(&mut triggers, &mut triggers_from, &mut triggers_to, &event.triggers);
        schemas.push(i64::from(event.schema));
        json.push(event.json);
        data.push(event.data.as_slice());
        for tag in &event.tags {
            tag_names.push(tag.as_str());
            tag_positions.push(i64_of(*position));
        }
    }
    // Each stream written to goes on past the last version written.
    let mut touched: HashMap<&str, u64> = HashMap::new();
    for (_, stream, version, _) in rows {
        let next = touched.entry(stream).or_default();
        *next = (*next).max(version + 1);
    }
    let (moved, moved_to): (Vec<&str>, Vec<i64>) =
        touched.into_iter().map(|(stream, next)| (stream, i64_of(next))).unzip();
    let (names, nexts): (Vec<&str>, Vec<i64>) =
        assumed.iter().map(|(name, at)| (name.as_str(), at.checked())).unzip();
    let params: [&(dyn postgres::types::ToSql + Sync); 29] = [
        &location.namespace(),
        &names,
        &planned.ids,
        &i64_of(head),
        &nexts,
        &planned.absent,
        &tags,
        &triggers,
        &positions,
        &streams,
        &versions,
        &ids,
        &types,
        &causations,
        &correlations,
        &tags_from,
        &tags_to,
        &triggers_from,
        &triggers_to,
        &schemas,
        &json,
        &data,
        &tag_names,
        &tag_positions,
        &moved,
        &moved_to,
        &i64_of(next),
        &channel(location),
        &next.to_string(),
    ];
    let found = client.query(statement, &params).map_err(failed(location, "write the events"))?;
    let (state, looked_up) = split_state(location, &found)?;
    let what = || "the event store's head".to_owned();
    if column::<bool>(location, state, "ok", &what)? {
        return Ok(Found::Wrote);
    }
    let (streams, ids) = looked_up_in(location, looked_up)?;
    Ok(Found::Other {
        locked: count(location, state, "version", &what)?,
        seen: column::<Option<i64>>(location, state, "position", &what)?
            .and_then(|seen| u64::try_from(seen).ok()),
        streams,
        ids,
    })
}

/// Appends `of` to `flat`, and where it went (from 1, both ends included, as an
/// array's slice has it) to `from` and `to`.
fn slice<'a>(flat: &mut Vec<&'a str>, from: &mut Vec<i32>, to: &mut Vec<i32>, of: &'a [String]) {
    from.push(i32::try_from(flat.len() + 1).unwrap_or(i32::MAX));
    flat.extend(of.iter().map(String::as_str));
    to.push(i32::try_from(flat.len()).unwrap_or(i32::MAX));
}

/// The first event tagged `tag` at or after `condition`'s base and not resolved:
/// stored, or planned earlier in the group (`group`).
fn first_tagged(
    tx: &mut Transaction<'_>,
    statement: &Statement,
    location: &Location,
    condition: &Condition,
    tag: &str,
    group: &[(&str, EventRef)],
) -> Result<Option<EventRef>> {
    let base = condition.base().get();
    let resolved: Vec<i64> = condition::resolved(condition).map(|it| i64_of(it.get())).collect();
    let row = tx
        .query_opt(statement, &[&location.namespace(), &tag, &i64_of(base), &resolved])
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

/// What the lookup's `rows` say: the next version of every stream the group
/// appends to (absent: none yet), and where each id the group names is stored
/// already.
fn looked_up_in<'a>(
    location: &Location,
    rows: impl IntoIterator<Item = &'a Row>,
) -> Result<(Streams, Ids)> {
    let (mut streams, mut found) = (Streams::new(), Ids::new());
    for row in rows {
        let stream: String = column(location, row, "stream", &|| "a stream".to_owned())?;
        let what = || format!("an event or the head of stream `{stream}`");
        let version = count(location, row, "version", &what)?;
        let Some(id) = column::<Option<&[u8]>>(location, row, "id", &what)? else {
            let life = column::<i16>(location, row, "life", &what)?;
            if !(0..=TOMBSTONED).contains(&life) {
                return Err(Error::DatabaseCorrupt {
                    location: location.to_string(),
                    reason: format!("stream `{stream}` has an unknown life ({life})"),
                });
            }
            streams.insert(stream, StreamAt { next: version, life });
            continue;
        };
        let position = count(location, row, "position", &what)?;
        let id = <[u8; 16]>::try_from(id).map_err(|_| Error::DatabaseCorrupt {
            location: location.to_string(),
            reason: format!("the id of the event at position {position} is not 16 bytes"),
        })?;
        found.insert(id, (stream, version, position));
    }
    Ok((streams, found))
}

/// The stream, version and position of a row of `first_tagged`.
fn event_place(location: &Location, row: &Row) -> Result<(String, u64, u64)> {
    let position = count(location, row, "position", &|| "an event".to_owned())?;
    let what = || format!("the event at position {position}");
    let version = count(location, row, "version", &what)?;
    Ok((column(location, row, "stream", &what)?, version, position))
}

/// Plans one append (all its streams) at position `next`: what each stream gets,
/// or the earlier result of a retry (positions below `next`), or why it is refused.
fn plan(requests: &[Request], streams: &Streams, ids: &Ids, next: u64) -> Result<Vec<Appended>> {
    if let Some(retried) = retried_whole(requests, streams, ids, next) {
        return Ok(retried);
    }
    let mut planned = Vec::with_capacity(requests.len());
    let mut position = next;
    let mut retries = 0;
    for request in requests {
        let at = streams.get(&request.stream).copied().unwrap_or_default();
        if at.life == TOMBSTONED {
            return Err(Error::StreamTombstoned { stream: request.stream.clone() });
        }
        let stream_next = at.next;
        // A deleted stream has no event, and its versions go on where they were.
        let last = if at.life == DELETED { None } else { stream_next.checked_sub(1) };
        if let (Some(place), false) = (retry_place(request, ids), request.events.is_empty()) {
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

/// Where the events of `request` would be, were it a retry of an append stored:
/// right after the version it expected, or where its first event is.
fn retry_place(request: &Request, ids: &Ids) -> Option<u64> {
    let first_seen = request
        .events
        .first()
        .and_then(|event| ids.get(event.id.as_bytes()))
        .filter(|seen| seen.0 == request.stream);
    match request.expected {
        Expected::NoStream => Some(first_seen.map_or(0, |seen| seen.1)),
        Expected::Exact(version) => version.checked_add(1),
        Expected::Any | Expected::StreamExists => first_seen.map(|seen| seen.1),
    }
}

/// The earlier result of an append of several streams that is stored whole
/// (each of its parts with events where it would be as a retry), whose parts
/// without events only stated an expectation: those are not checked again, since
/// their streams may have moved on since it committed (a group run again after
/// its connection broke, or a caller's retry after a lost reply), as in files:
/// a part with events on a tombstoned stream is no retry, and a part without
/// gets the stream's next version and the head (`next`). `None` otherwise, for
/// [`plan`] to decide.
fn retried_whole(
    requests: &[Request],
    streams: &Streams,
    ids: &Ids,
    next: u64,
) -> Option<Vec<Appended>> {
    let empty = |request: &Request| request.events.is_empty();
    if !requests.iter().any(empty) || requests.iter().all(empty) {
        return None;
    }
    let mut planned = Vec::with_capacity(requests.len());
    for request in requests {
        if request.events.is_empty() {
            planned.push(None);
            continue;
        }
        let life = streams.get(&request.stream).map_or(0, |at| at.life);
        let place = retry_place(request, ids).filter(|_| life != TOMBSTONED)?;
        let Match::All(appended) = retry_of(request, ids, place) else { return None };
        planned.push(Some(appended));
    }
    let filled = requests.iter().zip(planned).map(|(request, appended)| {
        appended.unwrap_or_else(|| {
            let version = streams.get(&request.stream).map_or(0, |at| at.next);
            Appended {
                stream: request.stream.clone(),
                versions: version..version,
                positions: next..next,
            }
        })
    });
    Some(filled.collect())
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

/// The columns of `instastate.events` that an [`EventRow`] holds, in its order.
const EVENT_COLUMNS: &str = "position, stream, version, id, event_type, at_us, causation, \
    correlation, tags, triggers, schema, json, data";
const POSITION: usize = 0;
const STREAM: usize = 1;
const VERSION: usize = 2;
const ID: usize = 3;
const EVENT_TYPE: usize = 4;
const AT: usize = 5;
const CAUSATION: usize = 6;
const CORRELATION: usize = 7;
const TAGS: usize = 8;
const TRIGGERS: usize = 9;
const SCHEMA: usize = 10;
const JSON: usize = 11;
const DATA: usize = 12;

/// An event of `instastate.events` as read (the columns of `EVENT_COLUMNS`),
/// decoded when asked: a read decodes the data straight from the row.
pub(crate) struct EventRow(Row);

impl EventRow {
    /// Column `at` (named `name`), of the event at `position` (if known yet).
    fn get<'a, T: postgres::types::FromSql<'a>>(
        &'a self,
        location: &Location,
        at: usize,
        name: &str,
    ) -> Result<T> {
        self.0.try_get(at).map_err(|err| Error::DatabaseCorrupt {
            location: location.to_string(),
            reason: format!("column `{name}` of an event cannot be read: {err}"),
        })
    }

    /// A `bigint` column that holds a count: never negative.
    fn count(&self, location: &Location, at: usize, name: &str) -> Result<u64> {
        let value: i64 = self.get(location, at, name)?;
        u64::try_from(value).map_err(|_| Error::DatabaseCorrupt {
            location: location.to_string(),
            reason: format!("column `{name}` of an event is {value}"),
        })
    }

    /// Whether it is linked to a trigger (a subject whose key sealed its data,
    /// among others); a row that cannot say counts as linked.
    #[cfg(feature = "encryption")]
    pub(crate) fn is_linked(&self) -> bool {
        self.0.try_get::<_, Vec<&str>>(TRIGGERS).map_or(true, |triggers| !triggers.is_empty())
    }

    /// Its position and version.
    pub(crate) fn place(&self, location: &Location) -> Result<(Position, u64)> {
        Ok((
            Position::new(self.count(location, POSITION, "position")?),
            self.count(location, VERSION, "version")?,
        ))
    }

    fn id(&self, location: &Location, at: usize, name: &str) -> Result<Option<EventId>> {
        let bytes: Option<&[u8]> = self.get(location, at, name)?;
        bytes
            .map(|bytes| {
                <[u8; 16]>::try_from(bytes).map(EventId::from_bytes).map_err(|_| {
                    Error::DatabaseCorrupt {
                        location: location.to_string(),
                        reason: format!("column `{name}` of an event is not 16 bytes"),
                    }
                })
            })
            .transpose()
    }

    /// The event, its data decoded by `decode` from its bytes, whether they are
    /// JSON, the schema version they were written with, and the event's id.
    pub(crate) fn decode<E>(
        &self,
        location: &Location,
        decode: impl FnOnce(&[u8], bool, u32, EventId) -> Result<E>,
    ) -> Result<RecordedEvent<E>> {
        let (position, version) = self.place(location)?;
        let schema = self.count(location, SCHEMA, "schema")?;
        let schema = u32::try_from(schema).map_err(|_| Error::DatabaseCorrupt {
            location: location.to_string(),
            reason: format!("the schema version of the event at position {position} is {schema}"),
        })?;
        // Compaction drops only what readers pass over: a dropped event read is
        // damage (or a bug), never data to decode.
        let stored: Option<&[u8]> = self.get(location, DATA, "data")?;
        let stored = stored.ok_or_else(|| Error::DatabaseCorrupt {
            location: location.to_string(),
            reason: format!(
                "compaction dropped the data of the event at position {position}, which the store still reads"
            ),
        })?;
        let id = self.id(location, ID, "id")?.ok_or_else(|| Error::DatabaseCorrupt {
            location: location.to_string(),
            reason: format!("the event at position {position} has no id"),
        })?;
        let data = decode(stored, self.get(location, JSON, "json")?, schema, id)?;
        Ok(RecordedEvent {
            stream: self.get(location, STREAM, "stream")?,
            version,
            position,
            at: Timestamp::from_micros(self.count(location, AT, "at_us")?),
            id,
            event_type: self.get(location, EVENT_TYPE, "event_type")?,
            metadata: Metadata {
                causation: self.id(location, CAUSATION, "causation")?,
                correlation: self.id(location, CORRELATION, "correlation")?,
            },
            tags: self.get(location, TAGS, "tags")?,
            triggers: self.get(location, TRIGGERS, "triggers")?,
            data,
        })
    }

    /// The event, its data as stored.
    fn raw(&self, location: &Location) -> Result<RawEvent> {
        let mut stored = (false, 0);
        let event = self.decode(location, |data, json, schema, _| {
            stored = (json, schema);
            Ok(data.to_vec())
        })?;
        let (json, schema) = stored;
        Ok(RawEvent {
            stream: event.stream,
            version: event.version,
            position: event.position,
            at: event.at,
            id: event.id,
            event_type: event.event_type,
            metadata: event.metadata,
            tags: event.tags,
            json,
            schema,
            triggers: event.triggers,
            removed: false,
            dropped: false,
            data: event.data,
        })
    }
}

pub(crate) mod effects;
mod removal;
#[cfg(test)]
mod tests;
