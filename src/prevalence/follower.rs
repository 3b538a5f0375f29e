//! Followers: read-only replicas of a prevalent system kept in PostgreSQL, on
//! other machines (feature `postgres`).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use parking_lot::{Condvar, Mutex, RwLock};
use serde::{Serialize, de::DeserializeOwned};

use super::{
    ForEvents, Prevayler, PrevaylerBuilder, Reading, Rest, Slot, SystemFn, finish, replay,
};
use crate::{
    Error, Result,
    journal::{self, Replay, Replayed, Restored, Resume, Timestamp},
    postgres::{Location, PgJournal, PgReader},
};

/// A read-only replica of a prevalent system kept in PostgreSQL: it loads the
/// newest snapshot, then applies the writer's events in order as they commit
/// (woken by the commits' notifications, and polling), on a thread of its own.
/// Open one with [`PrevaylerBuilder::follow`].
///
/// It never writes and holds no lease: any number of followers, on any machines,
/// follow one writer. [`promote`](Follower::promote) makes it the writer once the
/// lease is free.
pub struct Follower<S: 'static, E: 'static, R: 'static = ()> {
    following: Following<S, E, R>,
    location: Location,
    /// The connection [`lag`](Follower::lag) asks on, made at its first call.
    asking: Mutex<Option<PgReader>>,
}

/// The following thread, stopped when dropped.
struct Following<S: 'static, E: 'static, R: 'static> {
    shared: Arc<Shared<S>>,
    thread: Option<JoinHandle<Parts<S, E, R>>>,
}

/// What the follower and its thread share.
struct Shared<S> {
    state: RwLock<Slot<S>>,
    /// Wakes those waiting for events to be applied.
    applied: Condvar,
    waiting: Mutex<()>,
    /// Why it stopped following, if it failed.
    failed: Mutex<Option<Error>>,
    stop: AtomicBool,
    poll: Duration,
}

/// What the following thread hands back: what a promotion needs.
struct Parts<S: 'static, E: 'static, R: 'static> {
    reading: Reading<S, E>,
    rest: Rest<S>,
    apply: Box<SystemFn<S, E, R>>,
}

/// How far a follower is behind its writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Lag {
    /// The events the follower has applied.
    pub applied: u64,
    /// The events the database holds: the writer's next event's number.
    pub head: u64,
    /// When the last event applied was handled by the writer (its timestamp).
    pub last_applied_at: Option<Timestamp>,
}

impl Lag {
    /// The events stored and not applied yet.
    #[must_use]
    pub fn events(&self) -> u64 {
        self.head.saturating_sub(self.applied)
    }
}

impl<S, M> PrevaylerBuilder<S, M> {
    /// Follows the prevalent system at the `postgres://` location `location`
    /// (see `postgres::Location`) as a read-only replica: loads its newest
    /// snapshot (or starts from `initial`) and applies its events through `apply`
    /// as the writer commits them, looking at least every `poll`. The builder's
    /// types, versions, migrations and key must be the writer's. Its
    /// durability, snapshots and background-error hook apply once promoted.
    ///
    /// # Errors
    /// [`Error::InvalidLocation`] for a location that is not a `postgres://` one;
    /// [`Error::Database`] when the database cannot be reached; and the errors of
    /// [`open`](Self::open) for what it reads.
    pub fn follow<E, R>(
        self,
        location: &str,
        initial: S,
        apply: impl Fn(&mut S, E, Timestamp) -> R + Send + Sync + 'static,
        poll: Duration,
    ) -> Result<Follower<S, E, R>>
    where
        S: Serialize + DeserializeOwned + Send + Sync + 'static,
        E: Serialize + DeserializeOwned + Send + 'static,
        R: Send + 'static,
        M: ForEvents<E>,
    {
        let location = Location::parse(location)?;
        let mut reader = PgReader::open(&location)?;
        let (reading, rest) = self.split::<E>(location.to_string().into());
        let label = reader.label();
        journal::check_database_header(
            reader.header()?,
            &label,
            &reading.identity,
            &reading.versions,
            &reading.sealer,
        )?;
        let slot = newest_snapshot(reader.newest_snapshot()?, &label, &reading)?.unwrap_or(Slot {
            value: initial,
            applied: 0,
            at: 0,
        });
        let shared = Arc::new(Shared {
            state: RwLock::new(slot),
            applied: Condvar::new(),
            waiting: Mutex::new(()),
            failed: Mutex::new(None),
            stop: AtomicBool::new(false),
            poll: poll.max(Duration::from_millis(1)),
        });
        let parts = Parts { reading, rest, apply: Box::new(apply) };
        // The events stored so far are applied before it returns.
        step(&shared, &mut reader, &parts)?;
        let thread = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("instastate-follower".to_owned())
                .spawn(move || follow(&shared, &mut reader, parts))
                .map_err(|source| Error::Io { path: label.into(), source })?
        };
        let following = Following { shared, thread: Some(thread) };
        Ok(Follower { following, location, asking: Mutex::new(None) })
    }
}

/// Applies the events stored from the state's next one on; whether it applied
/// any. Reloads the newest snapshot when the events it needs are gone (a
/// snapshot holds them now).
fn step<S, E, R>(shared: &Shared<S>, reader: &mut PgReader, parts: &Parts<S, E, R>) -> Result<bool>
where
    S: DeserializeOwned,
    E: DeserializeOwned,
{
    let Parts { reading, rest, apply } = parts;
    let label = reader.label();
    let (next, clock) = {
        let slot = shared.state.read();
        (slot.applied, slot.at)
    };
    let rows = reader.frames_from(next)?;
    let dir = reading.label.as_path();
    let digest = rest.settings.digest;
    let mut slot = shared.state.write();
    // Only this thread changes the state: it is where it was read.
    let mut apply_one = |state: &mut S, event: Replayed<'_>| {
        let decoded = reading.decode(&event)?;
        replay(dir, state, apply, digest, event, decoded)
    };
    let done = journal::replay_rows(
        &rows,
        next,
        clock,
        &reading.sealer,
        &label,
        &mut slot.value,
        &mut apply_one,
    )?;
    let advanced = match done {
        Replay::Done { next: after, clock, .. } if after > next => {
            slot.applied = after;
            slot.at = clock;
            // Not held while waking the waiters, who take the lock to look.
            drop(slot);
            true
        }
        // Nothing new, or the events it needs are gone: a snapshot newer than
        // the state holds them.
        Replay::Done { .. } | Replay::Gap { .. } => {
            drop(slot);
            let newer = reader.newest_snapshot_events()?.is_some_and(|events| next < events);
            let snapshot = if newer { reader.newest_snapshot()? } else { None };
            if snapshot.as_ref().is_none_or(|(events, _)| *events <= next) {
                if let Replay::Gap { first } = done {
                    return Err(Error::DatabaseCorrupt {
                        location: label,
                        reason: format!("events {next} to {} are missing", first - 1),
                    });
                }
                return Ok(false);
            }
            if let Some(slot) = newest_snapshot(snapshot, &label, reading)? {
                *shared.state.write() = slot;
            }
            true
        }
    };
    if advanced {
        let _waiting = shared.waiting.lock();
        shared.applied.notify_all();
    }
    Ok(advanced)
}

/// The state of the snapshot `found` (the events it covers, and its bytes) of the
/// journal at `label`, read as `reading` says.
fn newest_snapshot<S: DeserializeOwned, E: DeserializeOwned>(
    found: Option<(u64, Vec<u8>)>,
    label: &str,
    reading: &Reading<S, E>,
) -> Result<Option<Slot<S>>> {
    let expect = (&reading.identity, &reading.versions);
    let mut restore = |snapshot: Restored<'_>| reading.restore(snapshot);
    let loaded =
        journal::load_database_snapshot(found, label, expect, &reading.sealer, &mut restore)?;
    Ok(loaded.map(|(value, applied, at)| Slot { value, applied, at }))
}

/// The following thread: applies events until stopped or failed, then hands back
/// what a promotion needs.
fn follow<S, E, R>(
    shared: &Shared<S>,
    reader: &mut PgReader,
    parts: Parts<S, E, R>,
) -> Parts<S, E, R>
where
    S: DeserializeOwned,
    E: DeserializeOwned,
{
    while !shared.stop.load(Ordering::Acquire) {
        match step(shared, reader, &parts) {
            Ok(true) => {}
            Ok(false) => {
                // A failed wait is a broken connection: the next read makes another.
                let _ = reader.wait(shared.poll);
            }
            // The database unreachable for now: tried again at the next turn.
            Err(Error::Database { .. }) => thread::sleep(shared.poll),
            Err(err) => {
                *shared.failed.lock() = Some(err);
                let _waiting = shared.waiting.lock();
                shared.applied.notify_all();
                break;
            }
        }
    }
    parts
}

impl<S, E, R> Follower<S, E, R>
where
    S: Serialize + DeserializeOwned + Send + Sync + 'static,
    E: Serialize + DeserializeOwned + Send + 'static,
    R: Send + 'static,
{
    /// Runs `f` on the state as the follower has it now.
    pub fn read<T>(&self, f: impl FnOnce(&S) -> T) -> T {
        f(&self.following.shared.state.read().value)
    }

    /// The events applied so far: the number of the next one it applies.
    #[must_use]
    pub fn applied(&self) -> u64 {
        self.following.shared.state.read().applied
    }

    /// How far it is behind the writer, as the database holds it now.
    ///
    /// # Errors
    /// [`Error::Database`] when the database cannot be reached.
    pub fn lag(&self) -> Result<Lag> {
        let head = {
            let mut asking = self.asking.lock();
            let reader = match &mut *asking {
                Some(reader) => reader,
                None => asking.insert(PgReader::quiet(&self.location)?),
            };
            reader.head()?
        };
        let slot = self.following.shared.state.read();
        let last_applied_at = (0 < slot.applied).then(|| Timestamp::from_micros(slot.at));
        Ok(Lag { applied: slot.applied, head, last_applied_at })
    }

    /// Waits until it has applied `events` events, for at most `timeout`; whether
    /// it has.
    ///
    /// # Errors
    /// The error that stopped it following, if one did.
    pub fn wait_for(&self, events: u64, timeout: Duration) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        let mut waiting = self.following.shared.waiting.lock();
        loop {
            if let Some(err) = self.following.shared.failed.lock().take() {
                return Err(err);
            }
            if events <= self.applied() {
                return Ok(true);
            }
            if self.following.shared.applied.wait_until(&mut waiting, deadline).timed_out() {
                return Ok(events <= self.applied());
            }
        }
    }

    /// Makes this follower the system's writer: takes the lease (waiting for it as
    /// the builder said, `wait_for_lease`), applies the events it had not
    /// applied yet, and goes on as a [`Prevayler`] from its state, without
    /// loading a snapshot again.
    ///
    /// # Errors
    /// The error that stopped it following, if one did; [`Error::LeaseHeld`]
    /// while a writer holds the lease; and the errors of
    /// [`PrevaylerBuilder::open`].
    pub fn promote(self) -> Result<Prevayler<S, E, R>> {
        let Follower { following, location, .. } = self;
        let shared = Arc::clone(&following.shared);
        let parts = following.finish(&location)?;
        let shared = Arc::into_inner(shared)
            .ok_or_else(|| Error::Poisoned { path: location.to_string().into() })?;
        if let Some(err) = shared.failed.into_inner() {
            return Err(err);
        }
        let slot = shared.state.into_inner();
        let Parts { reading, rest, apply } = parts;
        let database = PgJournal::open(&location, rest.lease.0, rest.lease.1)?;
        let start = Resume { state: slot.value, applied: slot.applied, at: slot.at };
        let dir = reading.label.as_path();
        let digest = rest.settings.digest;
        let mut restore = |snapshot: Restored<'_>| reading.restore(snapshot);
        let mut replayed = |state: &mut S, event: Replayed<'_>| {
            let decoded = reading.decode(&event)?;
            replay(dir, state, &*apply, digest, event, decoded)
        };
        let config = journal::DatabaseConfig {
            identity: reading.identity.clone(),
            durability: rest.durability,
            sealer: reading.sealer.clone(),
        };
        // A follower's state is where it goes on from, unless a newer snapshot
        // holds events it lacks: then from that snapshot, never from scratch.
        let opened = journal::open_on_database(
            database,
            config,
            &reading.versions,
            Some(start),
            || Err(Error::ReplayPanicked { path: reading.label.clone(), event: 0 }),
            &mut restore,
            &mut replayed,
        )?;
        let slot = Slot { value: opened.state, applied: opened.applied, at: opened.at };
        Ok(finish(rest.settings, slot, apply, opened.journal, opened.recovered))
    }
}

impl<S, E, R> Following<S, E, R> {
    /// Stops the thread, and takes back what it held.
    fn finish(mut self, location: &Location) -> Result<Parts<S, E, R>> {
        self.shared.stop.store(true, Ordering::Release);
        let thread = self.thread.take();
        let joined = thread.map(JoinHandle::join);
        match joined {
            Some(Ok(parts)) => Ok(parts),
            // A panic of the thread (its system function) was caught and reported
            // as an error; a thread gone otherwise is a bug.
            _ => Err(Error::Poisoned { path: location.to_string().into() }),
        }
    }
}

impl<S, E, R> Drop for Following<S, E, R> {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl<S, E, R> std::fmt::Debug for Follower<S, E, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Follower")
            .field("location", &self.location)
            .field("applied", &self.following.shared.state.read().applied)
            .finish_non_exhaustive()
    }
}
