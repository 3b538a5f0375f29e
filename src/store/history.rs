//! The kept saves: [`Store::history`], [`Store::revert_to`] and the manifests that
//! make them possible.

use std::{collections::BTreeMap, time::SystemTime};

use super::{Inner, State, time_of};
use crate::{Error, Result, Store, atomically::ensure_outside, codec};

/// A save the history holds.
pub(super) struct Kept {
    pub(super) generation: u64,
    pub(super) at_ms: u64,
    pub(super) changed: Vec<String>,
    // The value files its pre-images point at, deleted when it is pruned.
    pub(super) files: Vec<u64>,
    // How many keys its manifest is split over.
    pub(super) chunks: u32,
    // The size of the earlier values it holds.
    pub(super) bytes: u64,
}

/// One save in a store's history: see [`Store::history`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Generation {
    /// The save's number; each save numbers one more than the one before.
    pub number: u64,
    /// When the save was made.
    pub saved_at: SystemTime,
    /// The names of the cells the save wrote.
    pub changed: Vec<String>,
}

impl Store {
    /// Reverts every cell to its value in save number `generation`, all or nothing:
    /// the REPL's undo.
    ///
    /// Like [`reload_all`](Self::reload_all), which is `revert_to` the last save, it
    /// changes the cells and not the store: the next save writes the reverted values
    /// as a new save, and until then `reload_all` still returns to the last one.
    /// [`history`](Self::history) lists the generations it accepts.
    ///
    /// # Errors
    /// - [`Error::UnknownGeneration`] when the history does not hold `generation`;
    /// - [`Error::NeverSaved`] when a cell had no saved value yet in that save;
    /// - every error of [`reload_all`](Self::reload_all).
    ///
    /// # Example
    /// ```
    /// # use instastate::{StateCell, Store};
    /// static DOC: StateCell<String> = StateCell::new("docs::revert::DOC", String::new);
    /// # fn main() -> instastate::Result<()> {
    /// let store = Store::builder().cell(&DOC).in_memory()?;
    /// DOC.set("draft".into());
    /// store.save_all()?;
    /// let draft = store.generation();
    /// DOC.set("final".into());
    /// store.save_all()?;
    ///
    /// store.revert_to(draft)?;
    /// assert_eq!(DOC.get(), "draft");
    /// # Ok(())
    /// # }
    /// ```
    pub fn revert_to(&self, generation: u64) -> Result<()> {
        ensure_outside("revert_to")?;
        let inner = &*self.inner;
        inner.take_background_error()?;
        let mut state = inner.state.lock();
        inner.check_poisoned(&state)?;
        let target = inner.records_at(&state, generation)?;
        inner.restore(&mut state, Some(&target))
    }

    /// The saves the history holds, oldest first, each with its time and the cells
    /// it wrote. A store written before history existed starts one at its next save.
    ///
    /// # Example
    /// ```
    /// # use instastate::{StateCell, Store};
    /// static N: StateCell<u8> = StateCell::new("docs::history::N", || 0);
    /// # fn main() -> instastate::Result<()> {
    /// let store = Store::builder().cell(&N).in_memory()?;
    /// store.save_all()?;
    /// let last = store.history().pop().expect("one save");
    /// assert_eq!((last.number, last.changed), (1, vec!["docs::history::N".to_owned()]));
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn history(&self) -> Vec<Generation> {
        let state = self.inner.state.lock();
        state
            .history
            .iter()
            .map(|kept| Generation {
                number: kept.generation,
                saved_at: time_of(kept.at_ms),
                changed: kept.changed.clone(),
            })
            .collect()
    }
}

impl Inner {
    /// The cell records as they were at save `generation`, by name.
    fn records_at(&self, state: &State, generation: u64) -> Result<BTreeMap<String, Vec<u8>>> {
        let held = state.history.iter().any(|kept| kept.generation == generation);
        if !held {
            return Err(Error::UnknownGeneration {
                path: self.label.clone(),
                generation,
                oldest: state.history.front().map(|kept| kept.generation),
                newest: state.history.back().map(|kept| kept.generation),
            });
        }
        let mut target = state.current.clone();
        // Undo the later saves, newest first, by putting back their pre-images.
        for kept in state.history.iter().rev().take_while(|kept| kept.generation > generation) {
            let (manifest, _) = self.read_manifest(kept.generation, |key| self.backend.get(key))?;
            for (name, pre) in manifest.entries {
                match pre {
                    Some(pre) => target.insert(name, pre),
                    None => target.remove(&name),
                };
            }
        }
        Ok(target)
    }

    /// How many of the oldest kept saves to prune when a save whose earlier values
    /// take `held` bytes joins the history: the history keeps at most `keep` saves,
    /// and beyond the newest, at most `keep_bytes` of earlier values.
    pub(super) fn to_prune(&self, state: &State, held: u64) -> usize {
        let by_count = (state.history.len() + 1).saturating_sub(self.keep);
        let mut bytes = held + state.history.iter().map(|kept| kept.bytes).sum::<u64>();
        let mut pruned = 0;
        for kept in &state.history {
            if pruned >= by_count && bytes.saturating_sub(held) <= self.keep_bytes {
                break;
            }
            bytes -= kept.bytes;
            pruned += 1;
        }
        pruned
    }

    /// What the history keeps of a manifest split over `chunks` keys. Fails if a
    /// pre-image cannot be read, since its value file would then be unknown.
    pub(super) fn kept(&self, manifest: codec::Manifest, chunks: u32) -> Result<Kept> {
        let mut files = Vec::new();
        let mut bytes = 0;
        for (name, pre) in &manifest.entries {
            let Some(pre) = pre else { continue };
            let (file, len) = self.summary(name, pre).ok_or_else(|| Error::Corrupt {
                cell: name.clone(),
                path: self.engine_path(),
                reason: format!(
                    "its earlier value in {} cannot be read",
                    codec::history_label(manifest.generation)
                ),
            })?;
            files.extend(file);
            bytes += len;
        }
        let changed = manifest.entries.into_iter().map(|(name, _)| name).collect();
        Ok(Kept {
            generation: manifest.generation,
            at_ms: manifest.at_ms,
            changed,
            files,
            chunks,
            bytes,
        })
    }

    /// Reads the manifest of save `generation` and its chunk count, through `get`
    /// (the records read at open, or the engine).
    pub(super) fn read_manifest(
        &self,
        generation: u64,
        get: impl Fn(&[u8]) -> Result<Option<Vec<u8>>>,
    ) -> Result<(codec::Manifest, u32)> {
        let corrupt = |reason: String| Error::Corrupt {
            cell: codec::history_label(generation),
            path: self.engine_path(),
            reason,
        };
        let head = get(&codec::history_key(generation))?
            .ok_or_else(|| corrupt("history entry is missing".into()))?;
        let (chunks, first) = codec::manifest_head(&head)
            .ok_or_else(|| corrupt("history entry is truncated".into()))?;
        let mut bytes = first.to_vec();
        for chunk in 1..chunks {
            let part = get(&codec::history_chunk_key(generation, chunk))?
                .ok_or_else(|| corrupt(format!("chunk {chunk} of {chunks} is missing")))?;
            bytes.extend_from_slice(&part);
        }
        let manifest =
            codec::Manifest::decode(&bytes).map_err(|fault| corrupt(fault.to_string()))?;
        if manifest.generation != generation {
            return Err(corrupt(format!(
                "history entry is for generation {}",
                manifest.generation
            )));
        }
        Ok((manifest, chunks))
    }
}
