//! The global store behind [`open`], [`save_all`], [`reload_all`], [`revert_to`]
//! and [`history`].

use std::{
    path::Path,
    sync::{Arc, Weak},
};

use parking_lot::Mutex;

use super::{Generation, Inner};
use crate::{Error, Result, Store};

// The store `open` installed; weak, so that dropping the last `Store` closes it.
static GLOBAL: Mutex<Weak<Inner>> = Mutex::new(Weak::new());

/// Opens the global store in directory `path` for every cell declared with
/// [`defstate!`](crate::defstate), and loads each cell's saved value.
///
/// [`save_all`] and [`reload_all`] act on this store while the returned [`Store`]
/// (or a clone of it) is alive; dropping the last one closes the store.
/// See [`StoreBuilder::open`](crate::StoreBuilder::open) for what loading does.
///
/// # Errors
/// [`Error::AlreadyOpen`] while the global store is open, and every error of
/// [`StoreBuilder::open`](crate::StoreBuilder::open).
///
/// # Example
/// ```
/// instastate::defstate!(VISITS: u64 = 0);
///
/// # fn main() -> instastate::Result<()> {
/// # let dir = tempfile::tempdir().unwrap();
/// let _store = instastate::open(dir.path())?;
/// VISITS.update(|visits| *visits += 1);
/// instastate::save_all()?;
/// # Ok(())
/// # }
/// ```
pub fn open(path: impl AsRef<Path>) -> Result<Store> {
    let mut global = GLOBAL.lock();
    if let Some(open) = global.upgrade() {
        return Err(Error::AlreadyOpen { path: open.label.clone() });
    }
    let store = Store::builder().registered_cells().open(path)?;
    *global = Arc::downgrade(&store.inner);
    Ok(store)
}

/// Saves the global store opened by [`open`]: see [`Store::save_all`].
///
/// # Errors
/// [`Error::NotOpen`] when no global store is open, and every error of [`Store::save_all`].
///
/// # Example
/// ```
/// assert!(matches!(instastate::save_all(), Err(instastate::Error::NotOpen)));
/// ```
pub fn save_all() -> Result<()> {
    global()?.save_all()
}

/// Reverts every cell of the global store opened by [`open`] to its last save: see
/// [`Store::reload_all`].
///
/// # Errors
/// [`Error::NotOpen`] when no global store is open, and every error of [`Store::reload_all`].
///
/// # Example
/// ```
/// assert!(matches!(instastate::reload_all(), Err(instastate::Error::NotOpen)));
/// ```
pub fn reload_all() -> Result<()> {
    global()?.reload_all()
}

/// Reverts every cell of the global store opened by [`open`] to save number
/// `generation`: see [`Store::revert_to`].
///
/// # Errors
/// [`Error::NotOpen`] when no global store is open, and every error of [`Store::revert_to`].
///
/// # Example
/// ```
/// assert!(matches!(instastate::revert_to(1), Err(instastate::Error::NotOpen)));
/// ```
pub fn revert_to(generation: u64) -> Result<()> {
    global()?.revert_to(generation)
}

/// The saves the history of the global store opened by [`open`] holds: see
/// [`Store::history`].
///
/// # Errors
/// [`Error::NotOpen`] when no global store is open.
///
/// # Example
/// ```
/// assert!(matches!(instastate::history(), Err(instastate::Error::NotOpen)));
/// ```
pub fn history() -> Result<Vec<Generation>> {
    Ok(global()?.history())
}

pub(crate) fn global() -> Result<Store> {
    let inner = GLOBAL.lock().upgrade().ok_or(Error::NotOpen)?;
    Ok(Store { inner })
}
