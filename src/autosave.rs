//! Saving in the background: [`Store::autosave`] and the guard that stops it.
//!
//! One thread per autosaving store wakes every period and saves if a cell changed.
//! Whoever stops it (the guard, [`Store::close`], or the store's last handle
//! going away) makes the final save. Background errors go to a hook and wait to be
//! returned by the next explicit call.

use std::{
    path::Path,
    sync::{Arc, Weak},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use parking_lot::{Condvar, Mutex};

use crate::{
    Error, Result, Store,
    atomically::{defer, ensure_outside, inside},
    store::{Inner, global},
};

type Hook = Arc<dyn Fn(&Error) + Send + Sync>;

/// A store's background-saving state.
#[derive(Default)]
pub(crate) struct Background {
    // The first error of a background save that no explicit call has returned yet.
    pending: Mutex<Option<Error>>,
    hook: Mutex<Option<Hook>>,
    // The running autosave, if any.
    running: Mutex<Option<Arc<Control>>>,
}

struct Control {
    stopped: Mutex<bool>,
    wake: Condvar,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Control {
    /// Stops the thread and waits for it, unless called from it: then the handle
    /// stays for whoever stops it next (the guard), who must wait for the final
    /// save this thread is making.
    fn stop(&self) {
        *self.stopped.lock() = true;
        self.wake.notify_all();
        let mut slot = self.thread.lock();
        if slot.as_ref().is_some_and(|handle| handle.thread().id() == thread::current().id()) {
            return;
        }
        let handle = slot.take();
        drop(slot);
        if let Some(handle) = handle {
            // The thread catches nothing, so it ends either way; a panic in it has
            // already been reported by the panic hook.
            let _ = handle.join();
        }
    }
}

/// Saves a store in the background while it lives; see [`Store::autosave`].
///
/// Dropping it stops the thread and makes a final save, whose error goes to the
/// store's error hook; [`stop`](Self::stop) does the same and returns the error.
/// Do not drop it while holding a cell's guard: the final save would wait for that
/// cell forever.
#[must_use = "autosave stops, after a final save, when the guard is dropped"]
pub struct Autosave {
    store: Weak<Inner>,
    control: Arc<Control>,
    finished: bool,
}

impl Autosave {
    /// Stops saving in the background and makes a final save.
    ///
    /// Inside [`atomically`](crate::atomically), where a save would wait for the
    /// block forever, it returns [`Error::InsideAtomically`], and the final save is
    /// made on this thread as soon as the outermost block ends (dropping the guard
    /// there does the same).
    ///
    /// # Errors
    /// A background save's error that no call has returned yet
    /// ([`Error::Background`]; the final save is still made), or the final save's
    /// error. Nothing is saved if the store was closed in the meantime.
    ///
    /// # Example
    /// ```
    /// # use std::time::Duration;
    /// # use instastate::{StateCell, Store};
    /// static DRAFT: StateCell<String> = StateCell::new("docs::stop::DRAFT", String::new);
    /// # fn main() -> instastate::Result<()> {
    /// let store = Store::builder().cell(&DRAFT).in_memory()?;
    /// let autosave = store.autosave(Duration::from_secs(60))?;
    /// DRAFT.set("typed".into());
    /// autosave.stop()?;
    /// assert!(!store.has_unsaved_changes());
    /// # Ok(())
    /// # }
    /// ```
    pub fn stop(mut self) -> Result<()> {
        self.finished = true;
        if inside() {
            // The save would wait for the block this call runs in.
            let (store, control) = (self.store.clone(), Arc::clone(&self.control));
            defer(move || final_save(&store, &control));
            return ensure_outside("Autosave::stop");
        }
        let Some(inner) = release(&self.store, &self.control) else { return Ok(()) };
        let pending = inner.take_background_error();
        let saved = inner.save();
        pending.and(saved)
    }
}

/// Stops the thread and returns the store, unless it is gone or someone else
/// (`Store::close`) stopped it and made the final save.
fn release(store: &Weak<Inner>, control: &Arc<Control>) -> Option<Arc<Inner>> {
    control.stop();
    let inner = store.upgrade()?;
    inner.background().release(control).then_some(inner)
}

/// Stops the thread and makes the final save, reporting its error.
fn final_save(store: &Weak<Inner>, control: &Arc<Control>) {
    let Some(inner) = release(store, control) else { return };
    // A pending error stays pending for the next explicit call; the hook has seen it.
    if let Err(err) = inner.save() {
        inner.background().report(inner.label(), err);
    }
}

impl Drop for Autosave {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if inside() {
            // The save would wait for the block this drop runs in: it is made on
            // this thread as soon as the outermost block ends.
            let (store, control) = (self.store.clone(), Arc::clone(&self.control));
            defer(move || final_save(&store, &control));
            return;
        }
        final_save(&self.store, &self.control);
    }
}

impl std::fmt::Debug for Autosave {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let path = self.store.upgrade().map(|inner| inner.label().to_path_buf());
        f.debug_struct("Autosave").field("store", &path).finish_non_exhaustive()
    }
}

impl Background {
    /// Stops the running autosave, if any, and waits for its thread; returns
    /// whether one was running. Whoever calls it makes the final save.
    pub(crate) fn stop(&self) -> bool {
        let control = self.running.lock().take();
        let Some(control) = control else { return false };
        control.stop();
        true
    }

    /// Returns the pending background error, if any, and forgets it.
    pub(crate) fn take_pending(&self) -> Result<()> {
        match self.pending.lock().take() {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }

    /// Forgets `control` as the running autosave; returns whether it was.
    fn release(&self, control: &Arc<Control>) -> bool {
        let mut running = self.running.lock();
        if running.as_ref().is_some_and(|it| Arc::ptr_eq(it, control)) {
            *running = None;
            return true;
        }
        false
    }

    /// Keeps a background error for the next explicit call, then hands it to the
    /// hook (in that order, so that a call the hook makes sees it too).
    pub(crate) fn report(&self, label: &Path, err: Error) {
        let err = Arc::new(err);
        {
            let mut pending = self.pending.lock();
            if pending.is_none() {
                *pending =
                    Some(Error::Background { path: label.to_path_buf(), source: Arc::clone(&err) });
            }
        }
        let hook = self.hook.lock().clone();
        match hook {
            Some(hook) => hook(&err),
            // The error's message carries its causes.
            None => eprintln!("instastate: {err}"),
        }
    }
}

impl Store {
    /// Starts saving this store in the background: every `period`, one thread
    /// saves if (and only if) a cell changed since the last save.
    ///
    /// Stopping it makes a final save: dropping the returned guard (also when
    /// `main` returns or panics with the guard alive), [`Autosave::stop`],
    /// [`close`](Self::close), or dropping the store's last handle.
    /// A failed background save is handed to the
    /// [error hook](Self::on_background_error) and returned, as
    /// [`Error::Background`], by the next explicit call ([`save_all`](Self::save_all),
    /// [`reload_all`](Self::reload_all), [`revert_to`](Self::revert_to) or
    /// [`close`](Self::close)) instead of doing its work. A save that poisons the
    /// store also ends the thread.
    ///
    /// # Errors
    /// [`Error::AutosaveRunning`] when this store already autosaves;
    /// [`Error::ReadOnly`] when it was opened read-only.
    ///
    /// # Example
    /// ```
    /// # use std::time::Duration;
    /// # use instastate::{StateCell, Store};
    /// static COUNT: StateCell<u64> = StateCell::new("docs::autosave::COUNT", || 0);
    /// # fn main() -> instastate::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let store = Store::builder().cell(&COUNT).open(dir.path())?;
    /// let _autosave = store.autosave(Duration::from_millis(500))?;
    /// COUNT.update(|count| *count += 1);
    /// // ... saved within half a second, and again when `_autosave` is dropped.
    /// # Ok(())
    /// # }
    /// ```
    pub fn autosave(&self, period: Duration) -> Result<Autosave> {
        let inner = &self.inner;
        inner.check_writable("autosave")?;
        let mut running = inner.background().running.lock();
        if running.is_some() {
            return Err(Error::AutosaveRunning { path: inner.label().to_path_buf() });
        }
        let control = Arc::new(Control {
            stopped: Mutex::new(false),
            wake: Condvar::new(),
            thread: Mutex::new(None),
        });
        let store = Arc::downgrade(inner);
        let handle = {
            let (store, control) = (store.clone(), Arc::clone(&control));
            thread::Builder::new()
                .name("instastate-autosave".into())
                .spawn(move || run(&store, &control, period))
                .map_err(Error::io(inner.label()))?
        };
        *control.thread.lock() = Some(handle);
        *running = Some(Arc::clone(&control));
        Ok(Autosave { store, control, finished: false })
    }

    /// Sets the function that background saves report their errors to; by default
    /// they are printed to standard error. The error is also returned by the next
    /// explicit call, so the hook is for logging, not for recovery.
    ///
    /// # Example
    /// ```
    /// # fn main() -> instastate::Result<()> {
    /// let store = instastate::Store::builder().in_memory()?;
    /// store.on_background_error(|err| eprintln!("autosave failed: {err}"));
    /// # Ok(())
    /// # }
    /// ```
    pub fn on_background_error(&self, hook: impl Fn(&Error) + Send + Sync + 'static) {
        *self.inner.background().hook.lock() = Some(Arc::new(hook));
    }
}

/// The autosave thread.
fn run(store: &Weak<Inner>, control: &Arc<Control>, period: Duration) {
    loop {
        {
            let deadline = Instant::now() + period;
            let mut stopped = control.stopped.lock();
            while !*stopped && !control.wake.wait_until(&mut stopped, deadline).timed_out() {}
            if *stopped {
                return;
            }
        }
        let Some(inner) = store.upgrade() else { return };
        if !inner.is_dirty() {
            continue;
        }
        let res = inner.save();
        if let Err(err) = res {
            let poisoned = inner.is_poisoned();
            inner.background().report(inner.label(), err);
            if poisoned {
                // Every later save would fail too; a new autosave may be started
                // once the store is reopened.
                inner.background().release(control);
                return;
            }
        }
    }
}

/// Starts saving the global store opened by [`open`](crate::open) in the
/// background: see [`Store::autosave`].
///
/// # Errors
/// [`Error::NotOpen`] when no global store is open, and every error of
/// [`Store::autosave`].
///
/// # Example
/// ```
/// # use std::time::Duration;
/// instastate::defstate!(TICKS: u64 = 0);
///
/// # fn main() -> instastate::Result<()> {
/// # let dir = tempfile::tempdir().unwrap();
/// let store = instastate::open(dir.path())?;
/// let autosave = instastate::autosave(Duration::from_secs(5))?;
/// TICKS.update(|ticks| *ticks += 1);
/// autosave.stop()?; // or let it drop at the end of `main`
/// # drop(store);
/// # Ok(())
/// # }
/// ```
pub fn autosave(period: Duration) -> Result<Autosave> {
    global()?.autosave(period)
}
