//! Catch-up subscriptions: a subscription reads the events from where it starts
//! up to the head, says it caught up, then delivers each new event as it commits.
//!
//! A subscription is a cursor, not a queue: it reads what it delivers from the
//! store (a bounded chunk at a time, into a bounded buffer), and an append only
//! bumps a counter and wakes the subscriptions waiting for it. So a slow
//! subscription never holds an append back, nor another subscription; it only
//! falls behind, and says so. Since positions and versions are handed out and
//! committed in order without gaps, a cursor past an event has delivered it, and
//! no event committed later can come before it: nothing is skipped or repeated.

use std::{
    collections::{BTreeSet, VecDeque},
    marker::PhantomData,
    sync::{Arc, Weak},
    time::{Duration, Instant},
};

use parking_lot::{Condvar, Mutex};
use serde::{Serialize, de::DeserializeOwned};

use super::{
    Effect, Engine, EventStore, Position, RecordedEvent, Shared, codec::EventSchema,
    index::EffectRecord,
};
use crate::Result;

/// Events read from the store at a time, at most: the bound of a subscription's
/// buffer.
const CHUNK: u64 = 256;
/// How far a subscription that caught up may fall behind the head before it says
/// so and catches up again, by default.
const DEFAULT_MAX_LAG: u64 = 10_000;

/// What commits tell the subscriptions waiting for them.
#[derive(Default)]
pub(crate) struct Signal {
    state: Mutex<SignalState>,
    wake: Condvar,
}

#[derive(Default)]
struct SignalState {
    /// Journal events committed since the store opened.
    commits: u64,
    /// The store closed: its subscriptions stop.
    closed: bool,
}

impl Signal {
    /// Says that a journal event committed.
    pub(crate) fn committed(&self) {
        self.state.lock().commits += 1;
        self.wake.notify_all();
    }

    /// Says that the store closed.
    pub(crate) fn close(&self) {
        self.state.lock().closed = true;
        self.wake.notify_all();
    }

    /// Waits until a commit after the `seen`th, the store's close, or `deadline`;
    /// returns the commits seen and whether the store closed.
    fn wait(&self, seen: u64, deadline: Option<Instant>) -> (u64, bool) {
        let mut state = self.state.lock();
        while state.commits == seen && !state.closed {
            match deadline {
                Some(deadline) => {
                    if self.wake.wait_until(&mut state, deadline).timed_out() {
                        break;
                    }
                }
                None => self.wake.wait(&mut state),
            }
        }
        (state.commits, state.closed)
    }

    fn seen(&self) -> u64 {
        self.state.lock().commits
    }
}

/// What a subscription delivers.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Delivery<E> {
    /// The next event.
    Event(RecordedEvent<E>),
    /// Every event up to the head was delivered; new ones follow as they commit.
    CaughtUp,
    /// The subscription fell more than its allowed lag behind the head: it reads
    /// from the store again until it catches up (and says [`Delivery::CaughtUp`]).
    /// Nothing is skipped.
    FellBehind {
        /// How many events it was behind.
        lag: u64,
    },
    /// The store closed (its last handle went away); nothing follows.
    Stopped,
    /// An effect on a trigger ([`EventStore::append_effect`],
    /// `EventStore::forget_subject`), where it
    /// was appended among the events: drop what was built from its aggregates; the
    /// events to build them again from follow as [`Delivery::Replayed`]. Only
    /// subscriptions to `$all` deliver effects.
    Effect(Effect),
    /// An event before the last [`Delivery::Effect`], delivered again because it
    /// belongs to an aggregate the effect affects; as it reads now (its
    /// `Sealed` values shredded if their subject was forgotten).
    Replayed(RecordedEvent<E>),
}

/// What a subscription follows.
enum Target {
    /// Every stream, or those whose id starts with a prefix; the cursor is a
    /// position.
    All { prefix: Option<String> },
    /// One stream; the cursor is a version.
    Stream { name: String },
}

/// Options of a subscription to every event (`$all`); see
/// [`EventStore::subscribe_all`].
#[must_use]
pub struct SubscribeAll<'a, E> {
    store: &'a EventStore<E>,
    prefix: Option<String>,
    event_type: Option<String>,
    max_lag: u64,
}

/// Options of a subscription to one stream; see [`EventStore::subscribe_stream`].
#[must_use]
pub struct SubscribeStream<'a, E> {
    store: &'a EventStore<E>,
    stream: String,
    event_type: Option<String>,
    max_lag: u64,
}

/// A catch-up subscription: iterate it, or call [`next_timeout`](Self::next_timeout),
/// for its deliveries. It holds the store weakly: when the store's last handle goes
/// away, it delivers [`Delivery::Stopped`] and ends. Dropping it stops it.
///
/// # Example
/// ```
/// use std::time::Duration;
/// use instastate::events::{Delivery, EventStore, Expected, Position};
///
/// # fn main() -> instastate::Result<()> {
/// # let dir = tempfile::tempdir().unwrap();
/// let events = EventStore::<u32>::open(dir.path())?;
/// events.append("numbers", Expected::Any, [1, 2])?;
/// let mut numbers = events.subscribe_all().from(Position::START)?;
/// events.append("numbers", Expected::Any, [3])?;
/// let mut seen = Vec::new();
/// while let Some(delivery) = numbers.next_timeout(Duration::from_millis(100))? {
///     match delivery {
///         Delivery::Event(event) => seen.push(event.data),
///         Delivery::CaughtUp => {}
///         other => panic!("{other:?}"),
///     }
/// }
/// assert_eq!(seen, [1, 2, 3]);
/// # Ok(())
/// # }
/// ```
pub struct Subscription<E> {
    store: Weak<Shared>,
    schema: Arc<EventSchema<E>>,
    signal: Arc<Signal>,
    target: Target,
    event_type: Option<String>,
    /// The next position (or version, for a stream) to deliver.
    cursor: u64,
    buffer: VecDeque<Delivery<E>>,
    /// The effects of the store it has delivered (or started after).
    effects_seen: usize,
    /// Whether it caught up (and said so) and follows new commits.
    live: bool,
    max_lag: u64,
    /// The commits it has seen.
    seen: u64,
    stopped: bool,
    ended: bool,
    _events: PhantomData<fn(E) -> E>,
}

impl<'a, E> SubscribeAll<'a, E> {
    pub(crate) fn new(store: &'a EventStore<E>) -> SubscribeAll<'a, E> {
        SubscribeAll { store, prefix: None, event_type: None, max_lag: DEFAULT_MAX_LAG }
    }

    /// Delivers only the events of streams whose id starts with `prefix`.
    pub fn stream_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Some(prefix.into());
        self
    }

    /// Delivers only the events of type `event_type`.
    pub fn of_type(mut self, event_type: impl Into<String>) -> Self {
        self.event_type = Some(event_type.into());
        self
    }

    /// How many events a live subscription may fall behind the head before it
    /// says [`Delivery::FellBehind`]; 10,000 by default.
    pub fn max_lag(mut self, events: u64) -> Self {
        self.max_lag = events;
        self
    }

    /// Starts delivering from `position` (included): every event from there on, then
    /// [`Delivery::CaughtUp`], then each new one.
    ///
    /// # Errors
    /// In a database, [`Error::Io`](crate::Error::Io) when the thread that
    /// listens for commits cannot start.
    pub fn from(self, position: Position) -> Result<Subscription<E>> {
        let seen = match &self.store.shared.engine {
            Engine::Files(core) => {
                // The effects that came before the position are not delivered.
                let effects = &core.index.read().effects;
                effects.partition_point(|effect| effect.head < position.get())
            }
            #[cfg(feature = "postgres")]
            Engine::Database(db) => {
                let before = db.engine.effects_before(position.get())?;
                usize::try_from(before).unwrap_or(usize::MAX)
            }
        };
        self.start(position.get(), seen)
    }

    /// Starts at the head: only the events (and effects) appended from now on.
    ///
    /// # Errors
    /// As [`from`](Self::from), and [`Error::Database`](crate::Error::Database)
    /// when the head cannot be read.
    pub fn from_end(self) -> Result<Subscription<E>> {
        let (head, seen) = match &self.store.shared.engine {
            Engine::Files(core) => {
                let index = core.index.read();
                (index.committed, index.effects.len())
            }
            #[cfg(feature = "postgres")]
            Engine::Database(db) => {
                // Effects first: one appended between the two reads comes at or
                // after the head read, and is delivered.
                let effects = db.engine.effects_before(u64::MAX)?;
                (db.engine.head()?.get(), usize::try_from(effects).unwrap_or(usize::MAX))
            }
        };
        self.start(head, seen)
    }

    fn start(self, cursor: u64, effects_seen: usize) -> Result<Subscription<E>> {
        let target = Target::All { prefix: self.prefix };
        let mut subscription =
            Subscription::new(self.store, target, self.event_type, cursor, self.max_lag)?;
        subscription.effects_seen = effects_seen;
        Ok(subscription)
    }
}

impl<'a, E> SubscribeStream<'a, E> {
    pub(crate) fn new(store: &'a EventStore<E>, stream: &str) -> SubscribeStream<'a, E> {
        SubscribeStream {
            store,
            stream: stream.to_owned(),
            event_type: None,
            max_lag: DEFAULT_MAX_LAG,
        }
    }

    /// Delivers only the events of type `event_type`.
    pub fn of_type(mut self, event_type: impl Into<String>) -> Self {
        self.event_type = Some(event_type.into());
        self
    }

    /// How many events a live subscription may fall behind before it says
    /// [`Delivery::FellBehind`]; 10,000 by default.
    pub fn max_lag(mut self, events: u64) -> Self {
        self.max_lag = events;
        self
    }

    /// Starts delivering from version `version` (included) of the stream, which need
    /// not exist yet.
    ///
    /// # Errors
    /// [`Error::InvalidStreamId`](crate::Error::InvalidStreamId) for an id the store
    /// does not accept.
    pub fn from(self, version: u64) -> Result<Subscription<E>> {
        super::stream_id::check(&self.stream)?;
        let target = Target::Stream { name: self.stream };
        Subscription::new(self.store, target, self.event_type, version, self.max_lag)
    }

    /// Starts after the stream's last event: only its events appended from now on.
    ///
    /// # Errors
    /// As [`from`](Self::from).
    pub fn from_end(self) -> Result<Subscription<E>> {
        let len = stream_len(&self.store.shared, &self.stream)?;
        self.from(len)
    }
}

/// How many versions stream `name` holds (its next version).
#[cfg_attr(not(feature = "postgres"), allow(clippy::unnecessary_wraps))]
fn stream_len(shared: &Shared, name: &str) -> Result<u64> {
    match &shared.engine {
        Engine::Files(core) => {
            let index = core.index.read();
            Ok(index
                .stream(name)
                .and_then(|idx| index.get(idx))
                .map_or(0, |it| it.seqs.len() as u64))
        }
        #[cfg(feature = "postgres")]
        Engine::Database(db) => Ok(db.engine.stream_life(name)?.1),
    }
}

impl<E> Subscription<E> {
    #[cfg_attr(not(feature = "postgres"), allow(clippy::unnecessary_wraps))]
    fn new(
        store: &EventStore<E>,
        target: Target,
        event_type: Option<String>,
        cursor: u64,
        max_lag: u64,
    ) -> Result<Subscription<E>> {
        #[cfg(feature = "postgres")]
        if let Engine::Database(db) = &store.shared.engine {
            db.listen()?;
        }
        let signal = Arc::clone(store.shared.signal());
        let seen = signal.seen();
        Ok(Subscription {
            store: Arc::downgrade(&store.shared),
            schema: Arc::clone(&store.schema),
            signal,
            target,
            event_type,
            cursor,
            buffer: VecDeque::new(),
            effects_seen: usize::MAX,
            live: false,
            max_lag,
            seen,
            stopped: false,
            ended: false,
            _events: PhantomData,
        })
    }

    /// The next position (or, for a stream, version) it delivers.
    #[must_use]
    pub fn cursor(&self) -> u64 {
        self.cursor
    }
}

impl<E: Serialize + DeserializeOwned> Subscription<E> {
    /// The next delivery, waiting at most `timeout` for a new event once caught
    /// up; `None` when none came in time, or after [`Delivery::Stopped`].
    ///
    /// # Errors
    /// An error reading the store ([`Error::JournalCorrupt`](crate::Error::JournalCorrupt),
    /// [`Error::JournalDecode`](crate::Error::JournalDecode)); the subscription can be
    /// asked again, and tries the same events again.
    pub fn next_timeout(&mut self, timeout: Duration) -> Result<Option<Delivery<E>>> {
        self.next_until(Some(Instant::now() + timeout))
    }

    fn next_until(&mut self, deadline: Option<Instant>) -> Result<Option<Delivery<E>>> {
        loop {
            if let Some(delivery) = self.buffer.pop_front() {
                return Ok(Some(delivery));
            }
            if self.ended {
                return Ok(None);
            }
            if self.stopped {
                self.ended = true;
                return Ok(Some(Delivery::Stopped));
            }
            let Some(shared) = self.store.upgrade() else {
                self.stopped = true;
                continue;
            };
            let schema = Arc::clone(&self.schema);
            let store = EventStore::<E> { shared, schema, _events: PhantomData };
            // Seen before the head is read: a commit after it wakes the wait below.
            self.seen = self.signal.seen();
            let mut head = self.head(&store)?;
            // An effect comes before the events after it: the read stops there, and
            // the effect is delivered when the cursor reaches it.
            let effect = self.next_effect(&store)?;
            if let Some(effect) = effect.as_ref().filter(|effect| effect.head <= self.cursor) {
                self.replay(&store, effect)?;
                self.effects_seen = self.effects_seen.saturating_add(1);
                continue;
            }
            if let Some(effect) = &effect {
                head = head.min(effect.head);
            }
            if self.cursor < head {
                let lag = head - self.cursor;
                if self.live && self.max_lag < lag {
                    self.live = false;
                    return Ok(Some(Delivery::FellBehind { lag }));
                }
                self.fill(&store, head)?;
                continue;
            }
            if !self.live {
                self.live = true;
                return Ok(Some(Delivery::CaughtUp));
            }
            // Waiting must not keep the store open.
            drop(store);
            if deadline.is_some_and(|deadline| deadline <= Instant::now()) {
                return Ok(None);
            }
            let (_, closed) = self.signal.wait(self.seen, deadline);
            if closed {
                self.stopped = true;
            }
        }
    }

    /// The position (or stream version) the subscription reads up to.
    fn head(&self, store: &EventStore<E>) -> Result<u64> {
        match &self.target {
            Target::All { .. } => store.shared.head().map(Position::get),
            Target::Stream { name } => stream_len(&store.shared, name),
        }
    }

    /// The next effect to deliver, for a subscription to `$all`.
    #[cfg_attr(not(feature = "postgres"), allow(clippy::unnecessary_wraps))]
    fn next_effect(&self, store: &EventStore<E>) -> Result<Option<EffectRecord>> {
        match self.target {
            Target::All { .. } => match &store.shared.engine {
                Engine::Files(core) => {
                    Ok(core.index.read().effects.get(self.effects_seen).cloned())
                }
                // Read after the head: an effect comes before the events at and
                // after its head, which commit after it (it holds the head's lock).
                #[cfg(feature = "postgres")]
                Engine::Database(db) => db.engine.effect(self.effects_seen as u64),
            },
            Target::Stream { .. } => Ok(None),
        }
    }

    /// Buffers `effect`, then every event of the aggregates it affects: those the
    /// events linked to its trigger touch (and those events themselves), and those
    /// that any event replayed touches, until no new one comes.
    fn replay(&mut self, store: &EventStore<E>, effect: &EffectRecord) -> Result<()> {
        let linked = triggered(store, &effect.trigger, effect.head)?;
        // The aggregates of the linked events, removed ones included: what was
        // built from them is to be built again without them. An event replayed
        // for one of them is applied again to each of its aggregates, so each of
        // those is dropped and replayed whole too, or the event would count
        // twice in it (a transfer tagged with two accounts, say).
        let mut aggregates: Vec<String> = Vec::new();
        let mut known: BTreeSet<String> = BTreeSet::new();
        let mut positions: BTreeSet<u64> = linked.iter().copied().collect();
        let mut unread = linked;
        let mut next = 0;
        loop {
            for position in unread.drain(..) {
                for tag in store.tags_at(position)?.unwrap_or_default() {
                    if known.insert(tag.clone()) {
                        aggregates.push(tag);
                    }
                }
            }
            let Some(aggregate) = aggregates.get(next) else { break };
            next += 1;
            for position in tagged(store, aggregate, effect.head)? {
                if positions.insert(position) {
                    unread.push(position);
                }
            }
        }
        // Buffered only once every event is read: an error delivers nothing, and
        // the effect is replayed whole when the subscription is asked again.
        let mut deliveries = vec![Delivery::Effect(Effect {
            trigger: effect.trigger.clone(),
            reason: effect.reason.clone(),
            aggregates,
            position: Position::new(effect.head),
            number: self.effects_seen as u64,
        })];
        for position in positions {
            if let Some(event) = store.event_at(Position::new(position))?
                && self.wants(&event)
            {
                deliveries.push(Delivery::Replayed(event));
            }
        }
        self.buffer.extend(deliveries);
        Ok(())
    }

    /// Whether the subscription delivers `event`: its filters.
    fn wants(&self, event: &RecordedEvent<E>) -> bool {
        let prefix = match &self.target {
            Target::All { prefix } => prefix.as_deref(),
            Target::Stream { .. } => None,
        };
        prefix.is_none_or(|prefix| event.stream.starts_with(prefix))
            && self.event_type.as_deref().is_none_or(|wanted| wanted == event.event_type)
    }

    /// Reads up to `CHUNK` events from the cursor on (not past `head`) into the
    /// buffer, keeping those the subscription wants, and moves the cursor past them.
    fn fill(&mut self, store: &EventStore<E>, head: u64) -> Result<()> {
        let limit = CHUNK.min(head - self.cursor);
        let read: Vec<RecordedEvent<E>> = match &self.target {
            Target::All { .. } => store
                .read_all()
                .from(Position::new(self.cursor))
                .until(head)
                .limit(limit)
                .into_iter()
                .collect::<Result<_>>()?,
            Target::Stream { name } => {
                let read = store.read_stream(name).from(self.cursor).until(head).limit(limit);
                let read = read.into_iter().collect();
                match read {
                    // Tombstoned: nothing more will come.
                    Err(crate::Error::StreamTombstoned { .. }) => {
                        self.stopped = true;
                        return Ok(());
                    }
                    read => read?,
                }
            }
        };
        let next = match &self.target {
            Target::All { .. } => read.last().map(|event| event.position.get() + 1),
            Target::Stream { .. } => read.last().map(|event| event.version + 1),
        };
        // A read that found fewer events than it could went through every position
        // up to the head: those it did not yield were removed (deleted, truncated).
        let next =
            if (read.len() as u64) < limit { Some(next.unwrap_or(head).max(head)) } else { next };
        let next = next.ok_or_else(|| crate::Error::JournalCorrupt {
            path: store.shared.label().to_path_buf(),
            offset: 0,
            reason: format!(
                "the index holds events from {} to {head}, and none could be read",
                self.cursor
            ),
        })?;
        self.cursor = next.max(self.cursor);
        let wanted: Vec<Delivery<E>> =
            read.into_iter().filter(|event| self.wants(event)).map(Delivery::Event).collect();
        self.buffer.extend(wanted);
        Ok(())
    }
}

impl<E: Serialize + DeserializeOwned> Iterator for Subscription<E> {
    type Item = Result<Delivery<E>>;

    /// The next delivery, waiting as long as it takes; `None` after
    /// [`Delivery::Stopped`].
    fn next(&mut self) -> Option<Self::Item> {
        self.next_until(None).transpose()
    }
}

/// The positions below `before` of the events of `store` linked to `trigger`.
#[cfg_attr(not(feature = "postgres"), allow(clippy::unnecessary_wraps))]
fn triggered<E>(store: &EventStore<E>, trigger: &str, before: u64) -> Result<Vec<u64>> {
    match &store.shared.engine {
        Engine::Files(core) => {
            let index = core.index.read();
            let linked = index.triggered(trigger);
            Ok(linked.get(..linked.partition_point(|it| *it < before)).unwrap_or_default().to_vec())
        }
        #[cfg(feature = "postgres")]
        Engine::Database(db) => db.engine.triggered(trigger, before),
    }
}

/// The positions below `before` of the events of `store` tagged `tag`.
#[cfg_attr(not(feature = "postgres"), allow(clippy::unnecessary_wraps))]
fn tagged<E>(store: &EventStore<E>, tag: &str, before: u64) -> Result<Vec<u64>> {
    match &store.shared.engine {
        Engine::Files(core) => {
            let index = core.index.read();
            let tagged = index.tagged(tag);
            let below = tagged.partition_point(|it| it.position < before);
            Ok(tagged.get(..below).unwrap_or_default().iter().map(|it| it.position).collect())
        }
        #[cfg(feature = "postgres")]
        Engine::Database(db) => db.engine.tagged(tag, before),
    }
}
