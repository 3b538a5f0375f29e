//! [`StoreFollower`]: a read-only replica of a store of cells kept in
//! PostgreSQL, on any machine, that loads each save as the writer commits it.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use parking_lot::{Condvar, Mutex};

use super::{
    Inner, StoreBuilder,
    open::{Read, meta_value},
};
use crate::{
    Error, Result, Store, codec,
    postgres::{Location, watch_commits},
};

/// A read-only replica of a store of cells kept in PostgreSQL: its cells hold the
/// values of the last save it loaded, and a thread of its own loads each new save
/// as the writer commits it (woken by the save's notification, and polling).
/// Open one with [`StoreBuilder::follow`].
///
/// It never writes and holds no lease: any number of followers, on any machines,
/// follow one writer. [`promote`](StoreFollower::promote) makes it the writer once
/// the lease is free. Its cells change only when a save is loaded, all of them
/// at once, as [`Store::reload_all`] changes them.
pub struct StoreFollower {
    builder: StoreBuilder,
    location: Location,
    /// The location as given, password included, for the promotion to open.
    url: String,
    store: Store,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// What the follower and its thread share.
struct Shared {
    /// The generation loaded, and why following stopped, if it failed.
    progress: Mutex<Progress>,
    loaded: Condvar,
    stop: AtomicBool,
}

struct Progress {
    generation: u64,
    failed: Option<Error>,
}

impl StoreBuilder {
    /// Follows the store of cells at the `postgres://` location `location` (see
    /// `postgres::Location`) as a read-only replica: loads its last save into the
    /// builder's cells, then each save the writer commits, looking at least every
    /// `poll`. Journaled cells cannot be followed yet.
    ///
    /// # Errors
    /// [`Error::InvalidLocation`] for a location that is not a `postgres://` one,
    /// or whose namespace holds no store of cells; [`Error::Database`] when the
    /// database cannot be reached; and the errors of
    /// [`open_read_only`](Self::open_read_only) for what it reads.
    pub fn follow(self, location: &str, poll: Duration) -> Result<StoreFollower> {
        let parsed = Location::parse(location)?;
        let store = self.clone().open_read_only(location)?;
        let shared = Arc::new(Shared {
            progress: Mutex::new(Progress { generation: store.generation(), failed: None }),
            loaded: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let thread = {
            let (store, shared, location) = (store.clone(), Arc::clone(&shared), parsed.clone());
            std::thread::Builder::new()
                .name("instastate-store-follower".to_owned())
                .spawn(move || {
                    watch_commits(&location, &shared.stop, poll, &|| shared.load(&store));
                })
                .map_err(|source| Error::Io { path: "instastate-store-follower".into(), source })?
        };
        Ok(StoreFollower {
            builder: self,
            location: parsed,
            url: location.to_owned(),
            store,
            shared,
            thread: Some(thread),
        })
    }
}

impl Shared {
    /// Loads the store's last save into its cells, unless it has it already.
    fn load(&self, store: &Store) {
        let loaded = self.progress.lock().generation;
        let res = store.inner.load_newer(loaded);
        let mut progress = self.progress.lock();
        match res {
            Ok(Some(generation)) => progress.generation = generation,
            Ok(None) => return,
            // The next commit, or the next poll, tries again: a connection lost
            // for a moment is no failure.
            Err(err) if crate::postgres::lost_connection(&err) => return,
            // What it found is kept for `wait_for`, which reports it once.
            Err(err) => progress.failed = Some(err),
        }
        self.loaded.notify_all();
    }
}

impl Inner {
    /// Reads the store's records anew and installs every cell's value, all or
    /// nothing, if the last save is newer than `generation`; the generation
    /// loaded, if it did.
    fn load_newer(&self, generation: u64) -> Result<Option<u64>> {
        if self.stored_generation()? <= generation {
            return Ok(None);
        }
        // One statement: the records of one save, whole.
        let records = self.backend.read_all()?;
        let Read { mut state, decoded, .. } = self.read(&records)?;
        if state.generation <= generation {
            return Ok(None);
        }
        let mut current = self.state.lock();
        state.pending.clear();
        self.install(&mut state, decoded);
        self.refresh_orphans(&mut state);
        let loaded = state.generation;
        *current = state;
        Ok(Some(loaded))
    }

    /// The number of the last save the store holds (0 before the first); a
    /// damaged record of it is an error, never taken for 0.
    fn stored_generation(&self) -> Result<u64> {
        let stored = self.backend.get(codec::GENERATION_KEY)?;
        let read =
            meta_value(&self.label, codec::GENERATION_KEY, stored.as_deref(), codec::read_u64);
        Ok(read?.unwrap_or(0))
    }
}

impl StoreFollower {
    /// The read-only store it follows through: [`history`](Store::history),
    /// [`revert_to`](Store::revert_to) (of its cells) and the admin reads work on
    /// it; every change is refused ([`Error::ReadOnly`]).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The number of the last save it loaded.
    #[must_use]
    pub fn generation(&self) -> u64 {
        self.shared.progress.lock().generation
    }

    /// How many saves it is behind the writer, as the database holds them now.
    ///
    /// # Errors
    /// [`Error::Database`] when the database cannot be reached;
    /// [`Error::Corrupt`] when the record of the last save is damaged.
    pub fn lag(&self) -> Result<u64> {
        let head = self.store.inner.stored_generation()?;
        Ok(head.saturating_sub(self.generation()))
    }

    /// Waits until it has loaded save `generation` (or a later one), for at most
    /// `timeout`; whether it has.
    ///
    /// # Errors
    /// What made the last load fail (a damaged record, a newer format), once;
    /// it goes on trying at each commit.
    pub fn wait_for(&self, generation: u64, timeout: Duration) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        let mut progress = self.shared.progress.lock();
        loop {
            if let Some(err) = progress.failed.take() {
                return Err(err);
            }
            if generation <= progress.generation {
                return Ok(true);
            }
            if self.shared.loaded.wait_until(&mut progress, deadline).timed_out() {
                return Ok(generation <= progress.generation);
            }
        }
    }

    /// Makes this follower the store's writer: stops following, takes the lease
    /// (waiting for it as the builder said, `wait_for_lease`), and opens the
    /// store, loading its last save.
    ///
    /// # Errors
    /// [`Error::LeaseHeld`] while a writer holds the lease; and the errors of
    /// [`StoreBuilder::open`].
    pub fn promote(mut self) -> Result<Store> {
        self.stop();
        let (builder, url) = (self.builder.clone(), std::mem::take(&mut self.url));
        // The cells are the read-only store's until it is gone.
        drop(self);
        builder.open(url)
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for StoreFollower {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::fmt::Debug for StoreFollower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreFollower")
            .field("location", &self.location)
            .field("generation", &self.generation())
            .finish_non_exhaustive()
    }
}
