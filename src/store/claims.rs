//! Which stored names some program's cells claim, so that a store opened over a
//! subset of the cells (or none, as the tool opens it) never takes a live value for
//! an orphan.
//!
//! Each claimed name is a key of its own, `claim/<name>`, with an empty value: a save
//! adds the keys of this store's cells that have none yet and deletes those of the
//! names whose values it deletes and that no cell of this store has. The cost of a
//! save follows what it changes, not how many cells there are. Stores written before
//! the keys existed kept one list under `meta/claimed`; it is read, and the next
//! save turns it into keys.

use std::collections::{BTreeSet, HashSet};

use crate::{
    Error, Result,
    backend::{Batch, Records},
    codec,
};

#[derive(Debug, Default)]
pub(super) struct Claims {
    names: BTreeSet<String>,
    // Whether any program recorded its claims: a store last saved before they were
    // kept has none, and then no value counts as an orphan.
    known: bool,
    // The legacy list under `meta/claimed` is still stored.
    legacy: bool,
    // This store's cells that no key claims yet.
    pending: Vec<&'static str>,
}

/// What a save does to the claims, applied once it is durable.
pub(super) struct Change {
    added: Vec<String>,
    dropped: Vec<String>,
}

impl Claims {
    /// The claims `records` hold, and this store's `cells` they lack.
    pub(super) fn read(
        records: &Records,
        cells: impl Iterator<Item = &'static str>,
        engine: &std::path::Path,
    ) -> Result<Claims> {
        let mut claims = Claims::default();
        for key in records.keys() {
            if let Some(name) = codec::claim_name(key) {
                claims.names.insert(name.to_owned());
                claims.known = true;
            }
        }
        if let Some(bytes) = records.get(codec::CLAIMED_KEY) {
            let legacy = codec::decode_claimed(bytes).map_err(|fault| Error::Corrupt {
                cell: String::from_utf8_lossy(codec::CLAIMED_KEY).into_owned(),
                path: engine.to_path_buf(),
                reason: fault.to_string(),
            })?;
            claims.names.extend(legacy);
            claims.known = true;
            claims.legacy = true;
        }
        claims.pending = cells.filter(|name| !claims.names.contains(*name)).collect();
        Ok(claims)
    }

    /// Whether some program's cell claims `name`; `None` when no program recorded
    /// its claims.
    pub(super) fn claims(&self, name: &str) -> Option<bool> {
        self.known.then(|| self.names.contains(name))
    }

    /// Adds to `batch` what a save writing `writes` does to the claims, given the
    /// names of this store's cells.
    pub(super) fn stage(
        &self,
        writes: &[(String, Option<Vec<u8>>)],
        cells: &HashSet<&'static str>,
        batch: &mut Batch,
    ) -> Change {
        let mut added: Vec<String> = self.pending.iter().map(|name| (*name).to_owned()).collect();
        if self.legacy {
            // Every name of the legacy list becomes a key, and the list goes.
            added.extend(self.names.iter().cloned());
            batch.push((codec::CLAIMED_KEY.to_vec(), None));
        }
        let dropped: Vec<String> = writes
            .iter()
            .filter(|(name, bytes)| {
                bytes.is_none() && !cells.contains(name.as_str()) && self.names.contains(name)
            })
            .map(|(name, _)| name.clone())
            .collect();
        added.retain(|name| !dropped.contains(name));
        for name in &added {
            batch.push((codec::claim_key(name), Some(Vec::new())));
        }
        for name in &dropped {
            batch.push((codec::claim_key(name), None));
        }
        Change { added, dropped }
    }

    /// Applies a change once its save is durable.
    pub(super) fn apply(&mut self, change: Change) {
        self.names.extend(change.added);
        for name in &change.dropped {
            self.names.remove(name);
        }
        self.pending.clear();
        self.legacy = false;
        self.known = true;
    }
}
