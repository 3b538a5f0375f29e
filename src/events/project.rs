//! Checkpointed projections: a projection folds the store's events, in position
//! order, into the state of a named cell, and keeps in that same cell the position
//! of the next event to apply.
//!
//! The cell holds a [`Projected<T>`]: the state *and* its position, one value. A save
//! of the cell (by [`Store::save_all`], by [`autosave`](crate::autosave), or by the
//! projection itself through [`ProjectionBuilder::save_with`]) writes them in one
//! record of one atomic save, so what is on disk is always a state together with
//! exactly the events folded into it. After a crash the cell loads that pair and the
//! projection goes on from the saved position: every event after it is applied
//! once, none before it again.
//!
//! A projection runs on a thread of its own, reading the store through a catch-up
//! subscription. Each event is applied under the cell's write lock, and the position
//! moves in the same critical section, after a check that the event is the one at
//! the cell's position:
//!
//! - an event below it was applied already (a rebuild swapped in a state that was
//!   ahead) and is passed over;
//! - an event above it means the cell went back (a `reload_all` or `revert_to` of its
//!   store loaded an older save): the projection reads again from the cell's position.
//!
//! So the cell's state is a fold of exactly the events below its position, whatever
//! loads, saves or swaps happen around it. One projection at a time projects into a
//! cell.

use std::{
    collections::BTreeMap,
    marker::PhantomData,
    ops::Deref,
    panic::{self, AssertUnwindSafe},
    sync::{
        Arc, Weak,
        atomic::{self, AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use super::{
    Delivery, Effect, EventStore, Hook, Position, RecordedEvent, Shared, Subscription,
    codec::EventSchema,
};
use crate::{Error, Result, StateCell, Store, Value};

/// How long a projection's thread waits for an event before it looks at its stop
/// flag (and, when it saves, saves what it applied): the most [`Projection::stop`]
/// and dropping a projection wait.
const POLL: Duration = Duration::from_millis(20);
/// Events applied between the saves of a projection that saves, by default.
const DEFAULT_SAVE_EVERY: u64 = 1_000;
/// The longest a projection that saves keeps applied events unsaved, by default.
const DEFAULT_SAVE_INTERVAL: Duration = Duration::from_secs(1);

/// What the handler of a projection returns when it refuses an event: any error.
type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// The cause of a projection's failure, shared by every error that reports it.
type Cause = Arc<dyn std::error::Error + Send + Sync>;

/// What a projection does with an effect: drops what its state holds of the
/// affected aggregates.
type EffectHandler<T> = Box<dyn FnMut(&mut T, &Effect) -> Result<(), HandlerError> + Send>;

/// The projections running, by the address of the cell they project into: one
/// projection per cell.
static OWNERS: Mutex<BTreeMap<usize, Owner>> = Mutex::new(BTreeMap::new());
/// The id of the next projection.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A projection's state and the position of the next event to apply to it: the
/// value of a cell that [`EventStore::project`] keeps.
///
/// Every event below [`position`](Self::position) was applied to the state, once,
/// in position order, and no other. It derefs to the state, so a reader of the cell
/// reads the state as it would a plain cell's.
///
/// # Example
/// ```
/// use std::collections::BTreeMap;
/// use instastate::{defstate, events::{Position, Projected}};
///
/// defstate!(BALANCES: Projected<BTreeMap<String, i64>> = Projected::new(BTreeMap::new()));
///
/// let balances = BALANCES.read();
/// assert_eq!(balances.position(), Position::START);
/// assert!(balances.is_empty()); // a `BTreeMap` method, through `Deref`
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Projected<T> {
    /// The position of the next event to apply.
    position: u64,
    /// The effects taken into account: the number of the next one to take.
    effects: u64,
    state: T,
}

impl<T> Projected<T> {
    /// The state `state`, to which no event was applied yet.
    pub const fn new(state: T) -> Projected<T> {
        Projected { position: 0, effects: 0, state }
    }

    /// The position of the next event to apply: every event before it was applied.
    #[must_use]
    pub fn position(&self) -> Position {
        Position::new(self.position)
    }

    /// The state.
    #[must_use]
    pub fn state(&self) -> &T {
        &self.state
    }

    /// The state, without its position.
    #[must_use]
    pub fn into_state(self) -> T {
        self.state
    }
}

impl<T> Deref for Projected<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.state
    }
}

/// Options of a projection; see [`EventStore::projection`].
#[must_use]
pub struct ProjectionBuilder<'a, E, T: 'static> {
    events: &'a EventStore<E>,
    cell: &'static StateCell<Projected<T>>,
    spare: Option<&'static StateCell<Projected<T>>>,
    store: Option<Store>,
    save_every: u64,
    save_interval: Duration,
    hook: Option<Hook>,
    on_effect: Option<EffectHandler<T>>,
}

/// A running projection: a thread folding the store's events into a cell. See
/// [`EventStore::project`].
///
/// Dropping it stops it (waiting for its thread, which then makes its last save);
/// [`stop`](Self::stop) does the same and returns the error that stopped it
/// earlier, if one did. A projection also stops when its handler fails (which stops
/// no other projection, nor the appends), and when the event store's last handle is
/// dropped. One projection at a time projects into a cell.
///
/// # What is durable, when
///
/// - The checkpoint is the cell's save: the state and the position of the next event
///   to apply, one value in one record of one atomic save. Whoever saves the cell
///   ([`Store::save_all`], [`autosave`](crate::autosave), or the projection itself
///   with [`ProjectionBuilder::save_with`]) saves a state with exactly the events
///   folded into it.
/// - A projection applies an event only once the event is durable in the event
///   store: in the buffered [`Durability`](super::Durability) modes it syncs the
///   journal first (once per batch of events). So no save of the cell counts an
///   event that a crash could take from the store.
/// - After a crash the store loads the cell's last save, and a projection started on
///   it applies the events from the saved position on: those applied after the save
///   are applied again, to the state saved without them. Each event's effect is in
///   the state once. (Open the cell's store before starting the projection: a
///   projection started first works on the initial state until the load, and then
///   goes on from the loaded position.)
/// - The cell's position moves only under its write lock, with the state: a
///   `reload_all` or `revert_to` of its store takes it back to a save, and the
///   projection goes on from there.
///
/// # Example
/// ```
/// use std::collections::BTreeMap;
/// use instastate::{StateCell, Store, events::{EventStore, Expected, Position, Projected}};
///
/// static WORDS: StateCell<Projected<BTreeMap<String, u64>>> =
///     StateCell::new("docs::WORDS", || Projected::new(BTreeMap::new()));
///
/// # fn main() -> instastate::Result<()> {
/// # let dir = tempfile::tempdir().unwrap();
/// let events = EventStore::<String>::open(dir.path().join("events"))?;
/// let store = Store::builder().cell(&WORDS).open(dir.path().join("cells"))?;
/// let words = events.project(&WORDS, |words, event| {
///     *words.entry(event.data.clone()).or_default() += 1;
///     Ok(())
/// })?;
/// events.append("text", Expected::Any, ["to", "be", "or", "not", "to", "be"].map(String::from))?;
/// words.wait_for(Position::new(6))?;
/// store.save_all()?; // the counts and their position, 6, in one save
/// assert_eq!(WORDS.read()["be"], 2);
/// # Ok(())
/// # }
/// ```
#[must_use = "the projection stops when its handle is dropped"]
pub struct Projection {
    control: Arc<Control>,
    store: Weak<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl<'a, E, T: Value> ProjectionBuilder<'a, E, T> {
    fn new(events: &'a EventStore<E>, cell: &'static StateCell<Projected<T>>) -> Self {
        ProjectionBuilder {
            events,
            cell,
            spare: None,
            store: None,
            save_every: DEFAULT_SAVE_EVERY,
            save_interval: DEFAULT_SAVE_INTERVAL,
            hook: None,
            on_effect: None,
        }
    }

    /// How the projection takes an effect ([`Delivery::Effect`]: a subject
    /// forgotten, say): `forget` drops what the state holds of the effect's
    /// [`aggregates`](Effect::aggregates), and the handler then gets their events
    /// again ([`Delivery::Replayed`], as they read now, shredded data included),
    /// without the position moving. Both run under the cell's write lock, so readers
    /// never see an aggregate half rebuilt.
    ///
    /// Without it, an effect makes the projection start again from position 0, from
    /// the cell's initial state: slower, but nothing built from data that is gone
    /// stays in the state.
    pub fn on_effect(
        mut self,
        forget: impl FnMut(&mut T, &Effect) -> Result<(), HandlerError> + Send + 'static,
    ) -> Self {
        self.on_effect = Some(Box::new(forget));
        self
    }

    /// Saves the cell through `store` (which must hold it): once
    /// [`save_every`](Self::save_every) events were applied since the last save, once
    /// an applied event waited [`save_interval`](Self::save_interval) unsaved, as soon
    /// as the projection has applied every event there is, and when it stops.
    ///
    /// Each save first makes every event appended so far durable
    /// ([`EventStore::sync`]), so that a saved position never counts an event that a
    /// crash could take from the store, whatever the store's [`Durability`](super::Durability).
    /// A save is a whole [`Store::save_all`]: it also saves the store's other changed
    /// cells. Without this option, the cell is saved by whatever saves its store.
    pub fn save_with(mut self, store: &Store) -> Self {
        self.store = Some(store.clone());
        self
    }

    /// Saves (with [`save_with`](Self::save_with)) after this many events applied;
    /// 1,000 by default.
    pub fn save_every(mut self, events: u64) -> Self {
        self.save_every = events.max(1);
        self
    }

    /// Saves (with [`save_with`](Self::save_with)) once an applied event has waited
    /// this long unsaved; one second by default.
    pub fn save_interval(mut self, interval: Duration) -> Self {
        self.save_interval = interval;
        self
    }

    /// Where the error that stops the projection goes, as well as to
    /// [`Projection::error`] and [`Projection::stop`]; by default, where the event
    /// store sends its background errors
    /// ([`EventStoreBuilder::on_background_error`](super::EventStoreBuilder::on_background_error)).
    /// It is called before the failure shows ([`Projection::wait_for`] returning
    /// it, [`Projection::is_running`] turning false).
    pub fn on_error(mut self, hook: impl Fn(&Error) + Send + Sync + 'static) -> Self {
        self.hook = Some(Arc::new(hook));
        self
    }

    /// Rebuilds the state from position 0 in `spare` (blue/green), without stopping
    /// appends, nor the projection into the cell if one runs; when the rebuild has
    /// caught up with the store's head and with the cell, it swaps the rebuilt state
    /// and its position into the cell, in one critical section under the cell's
    /// write lock, and goes on projecting into the cell with its handler. The
    /// projection that ran there stops ([`Projection::is_running`] turns false,
    /// with no error).
    ///
    /// `spare` starts from its initializer's state (at position 0, whatever it held),
    /// and is set back to it after the swap, so that the replaced state is dropped.
    /// Readers of the cell see the old state or the rebuilt one, never a half-built
    /// one; readers of `spare` see the rebuild's progress.
    pub fn rebuild_in(mut self, spare: &'static StateCell<Projected<T>>) -> Self {
        self.spare = Some(spare);
        self
    }
}

impl<E, T> ProjectionBuilder<'_, E, T>
where
    E: Serialize + DeserializeOwned + Send + 'static,
    T: Value,
{
    /// Starts the projection on a thread of its own: `handler` is called with the
    /// state and each event in position order, from the cell's position on (from 0
    /// into the spare cell when rebuilding), and then with each new event as it is
    /// appended.
    ///
    /// The handler runs under the cell's write lock. It must not save the cell's
    /// store or wait for the projection. When it returns an error (or panics), the
    /// projection stops at that event, which it does not count as applied: the
    /// handler must leave the state as it found it when it refuses an event (check,
    /// then change), or the state would hold part of an event that a restart applies
    /// again. The projection does not save after such a failure.
    ///
    /// # Errors
    /// [`Error::ProjectionRunning`] when a projection already runs into the cell (or,
    /// when rebuilding, into the spare cell); [`Error::InvalidProjection`] when the
    /// store given to [`save_with`](Self::save_with) does not hold the cell, or the
    /// spare cell is the cell itself; [`Error::ProjectionAhead`] when the cell's
    /// position is past the store's head (the store lost events the cell applied);
    /// [`Error::Io`] when the thread cannot be started.
    pub fn start<F>(self, handler: F) -> Result<Projection>
    where
        F: FnMut(&mut T, &RecordedEvent<E>) -> Result<(), HandlerError> + Send + 'static,
    {
        let ProjectionBuilder {
            events,
            cell,
            spare,
            store,
            save_every,
            save_interval,
            hook,
            on_effect,
        } = self;
        let name = cell.name();
        let invalid = |reason: String| Error::InvalidProjection { cell: name.to_owned(), reason };
        if let Some(store) = &store
            && !store.inner.holds(address(cell))
        {
            return Err(invalid(format!(
                "the store `{}` given to save it does not hold it",
                store.inner.label().display()
            )));
        }
        if spare.is_some_and(|spare| address(spare) == address(cell)) {
            return Err(invalid("it cannot be rebuilt in itself".to_owned()));
        }
        let head = events.head()?;
        if spare.is_none() {
            let position = cell.read().position();
            if head < position {
                return Err(Error::ProjectionAhead { cell: name.to_owned(), position, head });
            }
        }
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let control = Arc::new(Control {
            cell: name,
            position: Box::new(move || cell.read().position),
            stop: AtomicBool::new(false),
            rebuilding: AtomicBool::new(spare.is_some()),
            end: Mutex::new(None),
            wanted: AtomicU64::new(u64::MAX),
            changed: Condvar::new(),
        });
        let claimed = spare.unwrap_or(cell);
        {
            let mut owners = OWNERS.lock();
            if owners.contains_key(&address(claimed)) {
                return Err(Error::ProjectionRunning { cell: claimed.name().to_owned() });
            }
            owners.insert(address(claimed), Owner { id, control: Arc::downgrade(&control) });
        }
        let owned = Owned(id);
        if let Some(spare) = spare {
            let fresh = Projected::new((spare.init)().into_state());
            drop(spare.replace(fresh));
        }
        let shared = &events.shared;
        let saver = store.map(|store| Saver {
            store,
            every: save_every,
            interval: save_interval,
            unsaved: 0,
            since: Instant::now(),
        });
        let worker = Worker {
            store: Arc::downgrade(&events.shared),
            schema: Arc::clone(&events.schema),
            live: cell,
            spare,
            handler,
            id,
            control: Arc::clone(&control),
            saver,
            hook: hook.unwrap_or_else(|| Arc::clone(shared.hook())),
            caught_up: false,
            durable: 0,
            on_effect,
            next: 0,
            pending: None,
            _events: PhantomData::<fn(E) -> E>,
        };
        let spawned = thread::Builder::new()
            .name("instastate-projection".to_owned())
            .spawn(move || worker.run(owned));
        let thread =
            spawned.map_err(|source| Error::Io { path: shared.label().to_path_buf(), source })?;
        Ok(Projection { control, store: Arc::downgrade(&events.shared), thread: Some(thread) })
    }
}

impl<E: Serialize + DeserializeOwned + Send + 'static> EventStore<E> {
    /// Projects every event of the store into `cell`, checkpointed: the cell holds
    /// the state and the position of the next event to apply, saved together by any
    /// save of the cell. Shorthand for `self.projection(cell).start(handler)`; see
    /// [`ProjectionBuilder::start`].
    ///
    /// # Errors
    /// Those of [`ProjectionBuilder::start`].
    ///
    /// # Example
    /// ```
    /// use std::collections::BTreeMap;
    /// use instastate::{defstate, events::{EventStore, Expected, Projected}};
    ///
    /// defstate!(TOTALS: Projected<BTreeMap<String, i64>> = Projected::new(BTreeMap::new()));
    ///
    /// # fn main() -> instastate::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let store = instastate::Store::builder().cell(&TOTALS).open(dir.path().join("cells"))?;
    /// let events = EventStore::<i64>::open(dir.path().join("events"))?;
    /// let totals = events.projection(&TOTALS).save_with(&store).start(|totals, event| {
    ///     *totals.entry(event.stream.clone()).or_default() += event.data;
    ///     Ok(())
    /// })?;
    /// events.append("alice", instastate::events::Expected::Any, [100, -30])?;
    /// totals.catch_up()?;
    /// assert_eq!(TOTALS.read()["alice"], 70);
    /// totals.stop()?; // saves the state and its position, 2
    /// # Ok(())
    /// # }
    /// ```
    pub fn project<T, F>(
        &self,
        cell: &'static StateCell<Projected<T>>,
        handler: F,
    ) -> Result<Projection>
    where
        T: Value,
        F: FnMut(&mut T, &RecordedEvent<E>) -> Result<(), HandlerError> + Send + 'static,
    {
        self.projection(cell).start(handler)
    }
}

impl<E> EventStore<E> {
    /// Options of a projection into `cell`: saving, error reporting, rebuilding;
    /// start it with [`ProjectionBuilder::start`].
    pub fn projection<T: Value>(
        &self,
        cell: &'static StateCell<Projected<T>>,
    ) -> ProjectionBuilder<'_, E, T> {
        ProjectionBuilder::new(self, cell)
    }
}

impl Projection {
    /// The name of the cell it projects into.
    #[must_use]
    pub fn cell(&self) -> &'static str {
        self.control.cell
    }

    /// The cell's position: every event before it is applied to the cell's state.
    #[must_use]
    pub fn position(&self) -> Position {
        Position::new((self.control.position)())
    }

    /// Whether it still runs: it was not stopped, did not fail, was not replaced by
    /// a rebuild, and the store is open.
    #[must_use]
    pub fn is_running(&self) -> bool {
        self.control.end.lock().is_none()
    }

    /// Whether it is a rebuild that has not yet swapped its state into the cell.
    #[must_use]
    pub fn is_rebuilding(&self) -> bool {
        self.control.rebuilding.load(Ordering::Acquire)
    }

    /// The error that stopped it, if one did: [`Error::ProjectionFailed`].
    #[must_use]
    pub fn error(&self) -> Option<Error> {
        match &*self.control.end.lock() {
            Some(End::Failed(failure)) => Some(failure.to_error(self.control.cell)),
            _ => None,
        }
    }

    /// Waits until the cell's position is at least `position` (the projection has
    /// applied every event before it), and a rebuild has swapped its state in.
    ///
    /// # Errors
    /// [`Error::ProjectionFailed`] when it failed first; [`Error::ProjectionStopped`]
    /// when it stopped otherwise first (stopped, replaced, or the store closed).
    pub fn wait_for(&self, position: Position) -> Result<()> {
        self.wait_until(position, None).map(|_| ())
    }

    /// As [`wait_for`](Self::wait_for), waiting at most `timeout`; returns whether
    /// the position was reached.
    ///
    /// # Errors
    /// Those of [`wait_for`](Self::wait_for).
    pub fn wait_for_timeout(&self, position: Position, timeout: Duration) -> Result<bool> {
        self.wait_until(position, Some(Instant::now() + timeout))
    }

    /// Waits until it has applied every event appended before the call, and
    /// returns the position it waited for (the store's head at the call).
    ///
    /// # Errors
    /// Those of [`wait_for`](Self::wait_for); [`Error::ProjectionStopped`] when the
    /// store is closed.
    pub fn catch_up(&self) -> Result<Position> {
        let Some(shared) = self.store.upgrade() else {
            return Err(self.stopped());
        };
        let head = shared.head()?;
        drop(shared);
        self.wait_for(head)?;
        Ok(head)
    }

    /// Stops it, waiting for its thread (which makes its last save, when it saves),
    /// and returns the error that stopped it earlier, if one did. Do not call it (nor
    /// drop the projection) while holding a guard of its cell: its thread may be
    /// waiting for the cell's lock, and would never stop.
    ///
    /// # Errors
    /// [`Error::ProjectionFailed`]: its handler failed, or reading the store or
    /// saving the cell (its last save included) did.
    pub fn stop(mut self) -> Result<()> {
        self.halt();
        match self.error() {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }

    fn halt(&mut self) {
        self.control.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            // The thread catches the handler's panics, and records its end whatever
            // the hook does; the hook's own panic is all that could come back here.
            let _ = thread.join();
        }
    }

    fn wait_until(&self, position: Position, deadline: Option<Instant>) -> Result<bool> {
        let control = &self.control;
        let mut end = control.end.lock();
        loop {
            control.wanted.fetch_min(position.get(), Ordering::SeqCst);
            let rebuilding = control.rebuilding.load(Ordering::Acquire);
            if !rebuilding && position.get() <= (control.position)() {
                return Ok(true);
            }
            match &*end {
                Some(End::Failed(failure)) => return Err(failure.to_error(control.cell)),
                Some(_) => return Err(self.stopped()),
                None => {}
            }
            let now = Instant::now();
            if deadline.is_some_and(|deadline| deadline <= now) {
                return Ok(false);
            }
            // A change of the cell made by something else than the projection (a
            // reload, a swap) wakes no one: look again now and then.
            let slice = now + POLL;
            let until = deadline.map_or(slice, |deadline| deadline.min(slice));
            control.changed.wait_until(&mut end, until);
        }
    }

    fn stopped(&self) -> Error {
        Error::ProjectionStopped { cell: self.control.cell.to_owned(), position: self.position() }
    }
}

impl Drop for Projection {
    fn drop(&mut self) {
        self.halt();
    }
}

impl std::fmt::Debug for Projection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Projection")
            .field("cell", &self.control.cell)
            .field("position", &self.position())
            .field("running", &self.is_running())
            .field("rebuilding", &self.is_rebuilding())
            .finish_non_exhaustive()
    }
}

/// What a projection's handle and its thread share.
struct Control {
    /// The name of the cell it projects into.
    cell: &'static str,
    /// Reads that cell's position.
    position: Box<dyn Fn() -> u64 + Send + Sync>,
    stop: AtomicBool,
    /// Whether it is a rebuild that has not swapped its state in yet.
    rebuilding: AtomicBool,
    /// Why it ended, once it did; what waiters wait on.
    end: Mutex<Option<End>>,
    /// The smallest position a waiter waits for (`u64::MAX`: none).
    wanted: AtomicU64,
    changed: Condvar,
}

impl Control {
    /// Says that the cell's position moved to `position`: wakes the waiters if one
    /// waits for it (the others sleep on; waking each at each event would cost a
    /// thread switch per event).
    fn moved(&self, position: u64) {
        // Pairs with the waiter's `fetch_min` before it reads the position: either
        // it reads the new position, or this reads its wish.
        atomic::fence(Ordering::SeqCst);
        if position < self.wanted.load(Ordering::SeqCst) {
            return;
        }
        // Under the lock the waiters wait with, so that none misses it; each one
        // still waiting says again what it waits for.
        let _end = self.end.lock();
        self.wanted.store(u64::MAX, Ordering::SeqCst);
        self.changed.notify_all();
    }
}

/// Why a projection ended.
enum End {
    /// Its handle asked it to.
    Stopped,
    /// A rebuild swapped its state into the cell and projects there now.
    Replaced,
    /// The event store's last handle went away.
    Closed,
    Failed(Failure),
}

/// The error that stopped a projection: at which position, and why.
struct Failure {
    position: u64,
    source: Cause,
}

impl Failure {
    fn new(position: u64, source: impl Into<HandlerError>) -> Failure {
        Failure { position, source: Arc::from(source.into()) }
    }

    fn to_error(&self, cell: &str) -> Error {
        Error::ProjectionFailed {
            cell: cell.to_owned(),
            position: Position::new(self.position),
            source: Arc::clone(&self.source),
        }
    }
}

/// A handler's panic, as the error it stops its projection with.
#[derive(Debug)]
struct Panicked(String);

impl std::fmt::Display for Panicked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the handler panicked: {}", self.0)
    }
}

impl std::error::Error for Panicked {}

/// The projection that projects into a cell.
struct Owner {
    id: u64,
    /// What it shares with its handle: a rebuild that replaces it says so there.
    control: Weak<Control>,
}

/// A projection's claim on the cells it projects into, let go when its thread ends.
struct Owned(u64);

impl Drop for Owned {
    fn drop(&mut self) {
        OWNERS.lock().retain(|_, owner| owner.id != self.0);
    }
}

fn address<T>(cell: &'static StateCell<T>) -> usize {
    std::ptr::from_ref(cell).addr()
}

/// Whether projection `id` is the one projecting into `cell`.
fn owns<T>(id: u64, cell: &'static StateCell<T>) -> bool {
    OWNERS.lock().get(&address(cell)).is_some_and(|owner| owner.id == id)
}

/// The saving of a projection that saves.
struct Saver {
    store: Store,
    every: u64,
    interval: Duration,
    /// Events applied since the last save.
    unsaved: u64,
    /// When the first of them was applied (or the last save).
    since: Instant,
}

/// What applying an event to a state did.
enum Step {
    Applied,
    /// The state is past it already.
    Skipped,
    /// The state is before it: the events between are to be read first.
    Behind,
}

/// A projection's thread.
struct Worker<E, T: 'static, F> {
    store: Weak<Shared>,
    schema: Arc<EventSchema<E>>,
    /// The cell it projects into.
    live: &'static StateCell<Projected<T>>,
    /// The cell it rebuilds in, until it swaps.
    spare: Option<&'static StateCell<Projected<T>>>,
    handler: F,
    id: u64,
    control: Arc<Control>,
    saver: Option<Saver>,
    hook: Hook,
    /// Whether the subscription has caught up with the head (and not fallen behind).
    caught_up: bool,
    /// The events below this position are durable.
    durable: u64,
    on_effect: Option<EffectHandler<T>>,
    /// The position the subscription delivers from next, as far as the deliveries
    /// tell: a delivery past it means the events between were removed.
    next: u64,
    /// An effect delivered, and the events replayed after it so far: taken in one
    /// critical section when the next delivery comes.
    pending: Option<(Effect, Vec<RecordedEvent<E>>)>,
    _events: PhantomData<fn(E) -> E>,
}

impl<E, T, F> Worker<E, T, F>
where
    E: Serialize + DeserializeOwned + Send + 'static,
    T: Value,
    F: FnMut(&mut T, &RecordedEvent<E>) -> Result<(), HandlerError>,
{
    fn run(mut self, owned: Owned) {
        let mut end = self.project();
        if !matches!(end, End::Failed(_)) {
            // The last save; after a failure the state may hold part of the event
            // the handler refused.
            if let Err(failure) = self.save(true) {
                end = End::Failed(failure);
            }
        }
        // Let go before the end is told: who sees it may start another projection.
        drop(owned);
        let error = match &end {
            End::Failed(failure) => Some(failure.to_error(self.control.cell)),
            _ => None,
        };
        // The hook runs before the end is told, so that whoever sees the failure
        // finds it reported; a panic of the hook goes on once the end is told.
        let hooked =
            error.map(|error| panic::catch_unwind(AssertUnwindSafe(|| (self.hook)(&error))));
        // A rebuild that replaced it said so already.
        self.control.end.lock().get_or_insert(end);
        self.control.changed.notify_all();
        if let Some(Err(payload)) = hooked {
            panic::resume_unwind(payload);
        }
    }

    /// The cell it applies events to now: the spare one while rebuilding.
    fn cell(&self) -> &'static StateCell<Projected<T>> {
        self.spare.unwrap_or(self.live)
    }

    fn position(&self) -> u64 {
        self.cell().read().position
    }

    fn events(&self) -> Option<EventStore<E>> {
        let schema = Arc::clone(&self.schema);
        Some(EventStore { shared: self.store.upgrade()?, schema, _events: PhantomData })
    }

    /// A subscription from the cell's position.
    fn subscribe(&mut self) -> Result<Option<Subscription<E>>, Failure> {
        let Some(events) = self.events() else { return Ok(None) };
        let position = self.cell().read().position();
        let head = events.head().map_err(|err| Failure::new(position.get(), err))?;
        if head < position {
            let err =
                Error::ProjectionAhead { cell: self.cell().name().to_owned(), position, head };
            return Err(Failure::new(position.get(), err));
        }
        self.caught_up = false;
        self.next = position.get();
        self.pending = None;
        let subscription = events.subscribe_all().from(position);
        subscription.map(Some).map_err(|err| Failure::new(position.get(), err))
    }

    fn project(&mut self) -> End {
        match self.follow() {
            Ok(end) => end,
            Err(failure) => End::Failed(failure),
        }
    }

    fn follow(&mut self) -> Result<End, Failure> {
        let Some(mut subscription) = self.subscribe()? else { return Ok(End::Closed) };
        loop {
            if self.control.stop.load(Ordering::Acquire) {
                return Ok(End::Stopped);
            }
            if !owns(self.id, self.cell()) {
                return Ok(End::Replaced);
            }
            let delivery = subscription
                .next_timeout(POLL)
                .map_err(|err| Failure::new(self.position(), err))?;
            if !matches!(delivery, Some(Delivery::Replayed(_))) {
                self.take_effect()?;
            }
            match delivery {
                None => {
                    self.pass_removed(subscription.cursor());
                    if self.caught_up && self.swap()? {
                        continue;
                    }
                    self.save(true)?;
                }
                Some(Delivery::Effect(effect)) => {
                    let taken = self.cell().read().effects;
                    if effect.number < taken {
                        continue;
                    }
                    if self.on_effect.is_some() {
                        self.pending = Some((effect, Vec::new()));
                        continue;
                    }
                    // No effect handler: built again from the start, from what the
                    // store reads now, which takes this effect into account.
                    self.restart(effect.number + 1);
                    self.unsaved();
                    match self.subscribe()? {
                        Some(again) => subscription = again,
                        None => return Ok(End::Closed),
                    }
                }
                Some(Delivery::Replayed(event)) => {
                    if let Some((_, replayed)) = &mut self.pending {
                        replayed.push(event);
                    }
                }
                Some(Delivery::Event(event)) => {
                    self.pass_removed(event.position.get());
                    self.next = self.next.max(event.position.get() + 1);
                    match self.apply(&event)? {
                        Step::Applied => {
                            self.control.moved(event.position.get() + 1);
                            self.unsaved();
                            if self.caught_up {
                                self.swap()?;
                            }
                            self.save(false)?;
                        }
                        Step::Skipped => {}
                        Step::Behind => match self.subscribe()? {
                            Some(again) => subscription = again,
                            None => return Ok(End::Closed),
                        },
                    }
                }
                Some(Delivery::CaughtUp) => {
                    self.pass_removed(subscription.cursor());
                    self.caught_up = true;
                    if !self.swap()? {
                        self.save(true)?;
                    }
                }
                Some(Delivery::FellBehind { .. }) => self.caught_up = false,
                Some(Delivery::Stopped) => return Ok(End::Closed),
            }
        }
    }

    /// Moves the cell's position to `upto` when the subscription went past the
    /// positions between without delivering them: their events were removed
    /// (deleted, truncated, past a retention rule). Only when the cell is where
    /// the subscription was: a cell moved back (a reload) is read again instead.
    fn pass_removed(&mut self, upto: u64) {
        let cell = self.cell();
        let moved = {
            let mut projected = cell.write();
            let passes = owns(self.id, cell) && projected.position == self.next && self.next < upto;
            if passes {
                projected.position = upto;
            }
            passes
        };
        if moved {
            self.next = upto;
            self.control.moved(upto);
            self.unsaved();
        }
    }

    /// Sets the cell back to its initial state at position 0, the effects before
    /// `effects` taken into account.
    fn restart(&mut self, effects: u64) {
        let cell = self.cell();
        let mut projected = cell.write();
        if owns(self.id, cell) {
            *projected = Projected::new((cell.init)().into_state());
            projected.effects = effects;
        }
    }

    /// Takes the pending effect, if any: its handler and then the events replayed
    /// after it, in one critical section under the cell's lock, so that readers
    /// never see an aggregate dropped and not built again.
    fn take_effect(&mut self) -> Result<(), Failure> {
        let Some((effect, replayed)) = self.pending.take() else { return Ok(()) };
        let cell = self.cell();
        let mut projected = cell.write();
        if !owns(self.id, cell) || effect.number < projected.effects {
            return Ok(());
        }
        let position = projected.position;
        let Some(forget) = &mut self.on_effect else { return Ok(()) };
        let state = &mut projected.state;
        guarded(position, || forget(state, &effect))?;
        for event in replayed.iter().filter(|event| event.position.get() < position) {
            let handler = &mut self.handler;
            guarded(position, || handler(state, event))?;
        }
        projected.effects = effect.number + 1;
        drop(projected);
        self.unsaved();
        Ok(())
    }

    /// Counts a change to save.
    fn unsaved(&mut self) {
        if let Some(saver) = &mut self.saver {
            if saver.unsaved == 0 {
                saver.since = Instant::now();
            }
            saver.unsaved += 1;
        }
    }

    /// Applies `event` to the cell, if it is the one at the cell's position.
    fn apply(&mut self, event: &RecordedEvent<E>) -> Result<Step, Failure> {
        self.make_durable(event.position.get())?;
        let cell = self.cell();
        let mut projected = cell.write();
        // Under the cell's lock: a rebuild that took the cell over did so under it.
        if !owns(self.id, cell) {
            return Ok(Step::Skipped);
        }
        apply_to(&mut self.handler, &mut projected, event)
    }

    /// When rebuilding, and the rebuild has caught up with the live cell, swaps the
    /// rebuilt state in; returns whether it did.
    fn swap(&mut self) -> Result<bool, Failure> {
        let Some(spare) = self.spare else { return Ok(false) };
        let live = self.live;
        let Some(events) = self.events() else { return Ok(false) };
        let head = events.head().map_err(|err| Failure::new(self.next, err))?;
        let (handler, durable) = (&mut self.handler, &mut self.durable);
        let swapped_at = {
            let mut old = live.write();
            let mut new = spare.write();
            // A live position past the head was lost by the store: the rebuild
            // replaces it with the fold of what the store holds.
            let target = old.position.min(head.get());
            if let Some(last) = target.checked_sub(1) {
                make_durable(durable, &events, last)?;
            }
            if new.position < target {
                let read = events.read_all().from(Position::new(new.position)).until(target);
                for event in read {
                    let event = event.map_err(|err| Failure::new(new.position, err))?;
                    // The positions the read passed over hold removed events.
                    new.position = new.position.max(event.position.get());
                    apply_to(handler, &mut new, &event)?;
                }
                // The read went through every position up to the target.
                new.position = target;
            }
            // What the rebuild read takes every effect so far into account.
            new.effects = new.effects.max(old.effects);
            std::mem::swap(&mut *old, &mut *new);
            let mut owners = OWNERS.lock();
            let mine = owners.remove(&address(spare));
            let replaced = mine.and_then(|mine| owners.insert(address(live), mine));
            // The projection replaced can apply nothing more (it checks that it owns
            // the cell under the cell's lock), and says so at once.
            if let Some(control) = replaced.and_then(|replaced| replaced.control.upgrade()) {
                control.end.lock().get_or_insert(End::Replaced);
                control.changed.notify_all();
            }
            old.position
        };
        self.spare = None;
        self.control.rebuilding.store(false, Ordering::Release);
        // The replaced state goes, outside the cells' locks.
        drop(spare.replace(Projected::new((spare.init)().into_state())));
        self.control.moved(swapped_at);
        if let Some(saver) = &mut self.saver {
            saver.unsaved = saver.unsaved.max(1);
        }
        self.save(true)?;
        Ok(true)
    }

    /// Makes the event at `position` durable, and every event before it, if they may
    /// not be: a cell applies only durable events, so that whoever saves it, its
    /// position never counts an event a crash could take from the store. In the
    /// durable modes a committed event is durable already, and this costs a look at
    /// the journal's buffer per batch of events; in the buffered modes it syncs the
    /// journal (once for every event committed so far).
    fn make_durable(&mut self, position: u64) -> Result<(), Failure> {
        if position < self.durable {
            return Ok(());
        }
        let Some(events) = self.events() else { return Ok(()) };
        make_durable(&mut self.durable, &events, position)
    }

    /// Saves, when it saves and has something unsaved that is due: always when
    /// `idle`, else once enough events or time went by.
    fn save(&mut self, idle: bool) -> Result<(), Failure> {
        let Some(saver) = &mut self.saver else { return Ok(()) };
        let due = idle || saver.every <= saver.unsaved || saver.interval <= saver.since.elapsed();
        if saver.unsaved == 0 || !due {
            return Ok(());
        }
        let position = self.live.read().position;
        // The events the cell applied are durable: `make_durable` saw to it.
        saver.store.save_all().map_err(|err| Failure::new(position, err))?;
        saver.unsaved = 0;
        saver.since = Instant::now();
        Ok(())
    }
}

/// Makes the events of `events` up to `position` durable, unless `durable` (the
/// position below which they are known to be) says they are; moves `durable` on.
fn make_durable<E>(durable: &mut u64, events: &EventStore<E>, position: u64) -> Result<(), Failure>
where
    E: Serialize + DeserializeOwned,
{
    if position < *durable {
        return Ok(());
    }
    // Read before the sync: every event below it is in the journal's buffer or file,
    // and the sync makes them durable.
    let head = events.head().map_err(|err| Failure::new(position, err))?.get();
    events.sync().map_err(|err| Failure::new(position, err))?;
    *durable = head;
    Ok(())
}

/// Applies `event` to `projected` if it is the one at its position.
fn apply_to<T, E, F>(
    handler: &mut F,
    projected: &mut Projected<T>,
    event: &RecordedEvent<E>,
) -> Result<Step, Failure>
where
    F: FnMut(&mut T, &RecordedEvent<E>) -> Result<(), HandlerError>,
{
    let at = projected.position;
    match event.position.get().cmp(&at) {
        std::cmp::Ordering::Less => return Ok(Step::Skipped),
        std::cmp::Ordering::Greater => return Ok(Step::Behind),
        std::cmp::Ordering::Equal => {}
    }
    let state = &mut projected.state;
    guarded(at, || handler(state, event))?;
    projected.position = at + 1;
    Ok(Step::Applied)
}

/// Runs a handler at `position`: its error, or its panic, is the failure.
fn guarded(
    position: u64,
    handler: impl FnOnce() -> Result<(), HandlerError>,
) -> Result<(), Failure> {
    match panic::catch_unwind(AssertUnwindSafe(handler)) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(Failure::new(position, err)),
        Err(payload) => {
            let message = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("no message");
            Err(Failure::new(position, Panicked(message.to_owned())))
        }
    }
}
