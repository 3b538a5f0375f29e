//! Behaviour tests through the public API; one binary, run in parallel.
//!
//! Every test uses its own cells and its own store (on disk in a temp dir, or in
//! memory), so tests never share state. Only `global` uses the global store.

mod backup;
mod bad_input;
mod compaction;
mod compat;
mod concurrency;
mod conflicts;
mod contract;
mod crypt;
mod events;
mod global;
mod history;
mod journaled;
mod model;
#[cfg(feature = "postgres")]
mod pg_events;
mod prevalence;
mod projections;
mod read_only;
mod save_reload;
mod schema;
#[cfg(feature = "encryption")]
mod shredding;
mod trust;
mod upcast;

#[path = "../common/tree.rs"]
mod tree;

#[cfg(feature = "postgres")]
#[path = "../common/postgres.rs"]
#[allow(dead_code)] // The failover test uses the rest.
mod server;

use std::{path::Path, process::Command};

/// What every test returns: any error fails the test with its message.
pub(crate) type TestResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

/// Sets or clears the immutable attribute of `path`, which stops even root from
/// creating or deleting entries in a directory.
pub(crate) fn set_immutable(path: &Path, immutable: bool) -> std::io::Result<()> {
    let flag = if immutable { "+i" } else { "-i" };
    let status = Command::new("chattr").arg(flag).arg(path).status()?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("chattr {flag} {} failed: {status}", path.display())))
    }
}

/// Makes `path` immutable until dropped.
pub(crate) struct Immutable<'a>(&'a Path);

impl<'a> Immutable<'a> {
    pub(crate) fn new(path: &'a Path) -> std::io::Result<Immutable<'a>> {
        set_immutable(path, true)?;
        Ok(Immutable(path))
    }
}

impl Drop for Immutable<'_> {
    fn drop(&mut self) {
        // Without this the temp dir could not be deleted; failing loudly is all we can do.
        if let Err(err) = set_immutable(self.0, false) {
            eprintln!("could not make {} writable again: {err}", self.0.display());
        }
    }
}
