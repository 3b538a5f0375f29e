//! Shutting a store down: [`Store::close`], and what happens when its last handle
//! goes away (the final save of a running autosave, and closing the journals).

use crate::{
    Error, Result, Store,
    atomically::{ensure_outside, inside},
    store::Inner,
};

impl Store {
    /// Shuts the store down cleanly: stops [`autosave`](Self::autosave) if it runs,
    /// saves what changed, and drops this handle (the store closes when its last
    /// handle is gone).
    ///
    /// # Errors
    /// A background save's error that no call has returned yet
    /// ([`Error::Background`]; the final save is still made), and every error of
    /// [`save_all`](Self::save_all).
    ///
    /// # Example
    /// ```
    /// # use instastate::{StateCell, Store};
    /// static LOG: StateCell<Vec<String>> = StateCell::new("docs::close::LOG", Vec::new);
    /// # fn main() -> instastate::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let store = Store::builder().cell(&LOG).open(dir.path())?;
    /// LOG.update(|log| log.push("bye".into()));
    /// store.close()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn close(self) -> Result<()> {
        ensure_outside("close")?;
        let inner = &self.inner;
        inner.background.stop();
        let pending = inner.take_background_error();
        if inner.is_read_only() {
            // Nothing can have changed on disk, nor be saved.
            return pending;
        }
        let saved = inner.save();
        pending.and(saved)
    }
}

impl Inner {
    /// Closes the journals of the journaled cells: every handled event is synced,
    /// and `handle` fails until the store is opened again.
    pub(super) fn close_journals(&self) -> Result<()> {
        if !self.journals_attached {
            return Ok(());
        }
        let errors = self.journaled.iter().filter_map(|cell| cell.close_journal().err()).collect();
        Error::from_list(errors).map_or(Ok(()), Err)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle went away while autosave ran: that is a shutdown too.
        if self.background.stop() {
            let res = if inside() {
                // The save would wait for the block this drop runs in, and the store
                // will be gone when the block ends.
                ensure_outside("the final save of a store dropped inside `atomically`")
            } else {
                self.save()
            };
            if let Err(err) = res {
                self.background.report(&self.label, err);
            }
        }
        if let Err(err) = self.close_journals() {
            self.background.report(&self.label, err);
        }
        if let Err(err) = self.backend.close() {
            self.background.report(&self.label, err);
        }
    }
}
