//! A save: the changed cells encoded, then committed as one generation, atomically
//! and durably.

use std::sync::Arc;

use super::{Inner, State, history::Kept, now_ms};
use crate::{
    Error, Result, Store,
    atomically::ensure_outside,
    backend::Batch,
    cell,
    cell::ErasedCell,
    codec::{self, Body, FORMAT_VERSION, Record, STORE_FORMAT, Witness},
    error::CodecError,
    shape::Shape,
    values::{Encoded, Spilled, ValueWriter},
};

/// A cell's value, encoded by a save and waiting for the commit.
struct Staged {
    cell_idx: usize,
    seq: u64,
    encoded: Encoded,
}

impl Store {
    /// Saves every cell changed since the last save, plus every cell never saved, in
    /// one atomic, durable and consistent step.
    ///
    /// - Atomic: if the process or machine dies during the save, the store holds
    ///   either the previous save or this one, never a mix.
    /// - Durable: once this returns `Ok`, the save survives power loss (the files
    ///   written are fsynced, and so is their directory).
    /// - Consistent: the save sees each [`atomically`](crate::atomically) block
    ///   whole or not at all; it waits for running blocks and holds new ones back
    ///   while it encodes (not while it writes to disk).
    ///
    /// A save with nothing changed does no I/O. After an I/O failure the store is
    /// poisoned: every later save or reload fails with [`Error::Poisoned`] until the
    /// store is reopened. Cells are never changed by a save, successful or not.
    ///
    /// Do not call it while holding a cell's [`write`](crate::StateCell::write) guard on
    /// the same thread: the save would wait for that cell forever.
    ///
    /// # Errors
    /// - [`Error::Encode`] when a cell's value cannot be encoded (nothing is saved);
    /// - [`Error::Io`] or [`Error::Storage`] when writing fails (the store is poisoned);
    /// - [`Error::Poisoned`] after an earlier failure;
    /// - [`Error::ReadOnly`] when the store was opened read-only;
    /// - [`Error::InsideAtomically`] when called inside [`atomically`](crate::atomically);
    /// - [`Error::GuardHeld`] when this thread holds a cell's guard that an
    ///   `atomically` block on another thread waits for: the save would wait for
    ///   that block forever (nothing is saved).
    ///
    /// # Example
    /// ```
    /// # use instastate::{StateCell, Store};
    /// static HITS: StateCell<u64> = StateCell::new("docs::save::HITS", || 0);
    /// # fn main() -> instastate::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let store = Store::builder().cell(&HITS).open(dir.path())?;
    /// HITS.update(|hits| *hits += 1);
    /// store.save_all()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn save_all(&self) -> Result<()> {
        ensure_outside("save_all")?;
        self.inner.take_background_error()?;
        self.inner.save()
    }
}

impl Inner {
    /// Whether a save would write something.
    pub(crate) fn is_dirty(&self) -> bool {
        let state = self.state.lock();
        !state.pending.is_empty()
            || cell::any_changed(&self.by_address)
            || self.journaled.iter().any(|cell| cell.is_dirty())
    }

    /// Saves every changed cell as one new generation, then snapshots the journaled
    /// cells that handled events since their last snapshot; see [`Store::save_all`].
    pub(crate) fn save(&self) -> Result<()> {
        self.save_records()?;
        let errors =
            self.journaled.iter().filter_map(|cell| cell.snapshot_journal().err()).collect();
        Error::from_list(errors).map_or(Ok(()), Err)
    }

    fn save_records(&self) -> Result<()> {
        self.check_writable("save_all")?;
        let (mut state, gate) = self.lock_with_gate("save_all")?;
        self.check_poisoned(&state)?;
        let mut staged = Vec::new();
        let encoded = {
            let _exclusive = gate;
            // Taken under the gate: no `atomically` block is half done.
            let taken = cell::take_changed(&self.by_address, &self.cells);
            state.pending.extend(taken);
            self.encode_changed(&state, &mut staged)
        };
        if let Err(err) = encoded {
            self.discard(&staged);
            state.poisoned = matches!(err, Error::Io { .. });
            return Err(err);
        }
        if staged.is_empty() {
            state.pending.clear();
            return Ok(());
        }
        state.now_ms = now_ms();
        let mut writes = Vec::new();
        let mut shapes: Vec<Arc<Shape>> = Vec::new();
        for Staged { cell_idx, encoded, .. } in &staged {
            let Some(cell) = self.cells.get(*cell_idx) else { continue };
            let shape = cell.shape();
            let crc = shape.as_ref().map_or(0, |shape| shape.checksum());
            writes.push((cell.name().to_owned(), Some(self.record(*cell, crc, encoded, &state))));
            if let Some(alias) = state.renamed.get(*cell_idx).cloned().flatten() {
                writes.push((alias, None));
            }
            if let Some(shape) = shape
                && crc != 0
                && !state.shapes.contains(&crc)
                && !shapes.iter().any(|it| it.checksum() == crc)
            {
                shapes.push(shape);
            }
        }
        let spilled: Vec<&Spilled> = staged.iter().filter_map(|it| it.encoded.spilled()).collect();
        self.commit_generation(&mut state, writes, &shapes, &spilled)?;
        state.pending.clear();
        for Staged { cell_idx, seq, .. } in staged {
            if let Some(slot) = state.saved.get_mut(cell_idx) {
                *slot = Some(seq);
            }
            if let Some(slot) = state.renamed.get_mut(cell_idx) {
                *slot = None;
            }
        }
        Ok(())
    }

    /// The sealed record of `cell`'s value `encoded`, whose type's structure has the
    /// checksum `shape`, for the next generation.
    fn record(
        &self,
        cell: &dyn ErasedCell,
        shape: u32,
        encoded: &Encoded,
        state: &State,
    ) -> Vec<u8> {
        self.seal_record(cell.name(), cell.schema(), cell.type_name(), shape, encoded, state)
    }

    pub(super) fn seal_record(
        &self,
        name: &str,
        schema: u32,
        type_name: &str,
        shape: u32,
        encoded: &Encoded,
        state: &State,
    ) -> Vec<u8> {
        let body = match encoded {
            Encoded::Inline(bytes) => Body::Inline(bytes),
            Encoded::File(spilled) => {
                Body::File { id: spilled.id, len: spilled.len, crc: spilled.crc }
            }
        };
        let record = Record {
            format: FORMAT_VERSION,
            schema,
            saved: Some(codec::Saved {
                generation: state.generation.wrapping_add(1),
                at_ms: state.now_ms,
            }),
            type_name,
            shape: Some(shape),
            body,
        };
        let key = codec::cell_key(name);
        self.sealer.seal(&key, record.encode())
    }

    /// Commits `writes` (a new record, or a deletion, per cell name) as the next
    /// generation, with its history manifest, after making `spilled` durable; prunes
    /// the history to its length. Poisons the store if the commit fails.
    pub(super) fn commit_generation(
        &self,
        state: &mut State,
        writes: Vec<(String, Option<Vec<u8>>)>,
        shapes: &[Arc<Shape>],
        spilled: &[&Spilled],
    ) -> Result<()> {
        let generation = state.generation.wrapping_add(1);
        let at_ms = state.now_ms;
        let mut batch = Batch::new();
        let mut entries = Vec::new();
        let mut files = Vec::new();
        let mut held = 0;
        let mut digest = state.digest;
        for (name, bytes) in &writes {
            let pre = state.current.get(name).cloned();
            if let Some(record) = pre.as_deref().and_then(|pre| self.summary(name, pre)) {
                files.extend(record.0);
                held += record.1;
            }
            if let Some(pre) = &pre {
                digest.toggle(name, pre, false);
            }
            if let Some(bytes) = bytes {
                digest.toggle(name, bytes, true);
            }
            entries.push((name.clone(), pre));
            batch.push((codec::cell_key(name), bytes.clone()));
        }
        let manifest = codec::Manifest { generation, at_ms, entries };
        let encoded = manifest
            .encode()
            .map_err(|fault| Error::InvalidName { name: fault.name, reason: fault.reason })?;
        let parts = codec::split_manifest(generation, &encoded);
        // `split_value` numbers its chunks with a `u32`: their count fits one.
        #[allow(clippy::expect_used)]
        let chunks = u32::try_from(parts.len()).expect("a manifest's chunks fit a u32");
        batch.extend(parts.into_iter().map(|(key, bytes)| (key, Some(bytes))));
        let pruned = self.to_prune(state, held);
        for kept in state.history.iter().take(pruned) {
            batch.push((codec::history_key(kept.generation), None));
            for chunk in 1..kept.chunks {
                batch.push((codec::history_chunk_key(kept.generation, chunk), None));
            }
        }
        // A damaged manifest's chunk count may be wrong too: its chunk keys are
        // left behind, and `verify` reports them.
        for damaged in &state.damaged_history {
            batch.push((codec::history_key(*damaged), None));
        }
        let format = codec::u32_bytes(STORE_FORMAT).to_vec();
        batch.push((codec::FORMAT_KEY.to_vec(), Some(format)));
        batch.push((codec::GENERATION_KEY.to_vec(), Some(codec::u64_bytes(generation).to_vec())));
        let claims = state.claims.stage(&writes, &self.names, &mut batch);
        // The structures of the types of the values written, each stored once.
        for shape in shapes {
            let key = codec::shape_key(shape.checksum());
            batch.extend(
                codec::split_value(&key, &shape.encode())
                    .into_iter()
                    .map(|(key, bytes)| (key, Some(bytes))),
            );
        }
        if let Err(err) = self.commit(spilled, batch) {
            // The new files stay: the engine may have taken the batch before failing
            // and may still make it durable, and its records point at them. The next
            // open deletes whichever files end up unreferenced.
            state.poisoned = true;
            return Err(err);
        }
        state.generation = generation;
        state.digest = digest;
        state.claims.apply(claims);
        state.shapes.extend(shapes.iter().map(|shape| shape.checksum()));
        for (name, bytes) in writes {
            match bytes {
                Some(bytes) => state.current.insert(name, bytes),
                None => state.current.remove(&name),
            };
        }
        state.damaged_history.clear();
        let changed = manifest.entries.into_iter().map(|(name, _)| name).collect();
        state.history.push_back(Kept { generation, at_ms, changed, files, chunks, bytes: held });
        let pruned: Vec<Kept> = state.history.drain(..pruned).collect();
        // The save is durable; the witness now records it. If that fails, the witness
        // stays one save behind, which the next open accepts (the engine's history
        // leads back to it), but no later save may go on.
        if let Some(witness) = &self.witness
            && let Err(err) = witness.record(&Witness { generation, digest })
        {
            state.poisoned = true;
            return Err(err);
        }
        for kept in pruned {
            for id in kept.files {
                self.remove_file(id);
            }
        }
        Ok(())
    }

    fn encode_changed(&self, state: &State, staged: &mut Vec<Staged>) -> Result<()> {
        for &cell_idx in &state.pending {
            let Some(&cell) = self.cells.get(cell_idx) else { continue };
            let saved = state.saved.get(cell_idx).copied().flatten();
            let mut writer = ValueWriter::new(self.values.as_ref(), &self.sealer, cell.name());
            let res = cell.encode_if_changed(saved, &mut writer);
            let seq = match res {
                Ok(Some(seq)) => seq,
                Ok(None) => continue,
                Err(source) => {
                    if let Some(id) = writer.file_id() {
                        self.remove_file(id);
                    }
                    return Err(match writer.take_error() {
                        Some(source) => Error::Io { path: self.values_path(), source },
                        None => Error::Encode {
                            cell: cell.name().to_owned(),
                            type_name: cell.type_name().to_owned(),
                            source: CodecError::from(source),
                        },
                    });
                }
            };
            let encoded = writer.finish().map_err(Error::io(self.values_path()))?;
            staged.push(Staged { cell_idx, seq, encoded });
        }
        Ok(())
    }

    fn commit(&self, spilled: &[&Spilled], batch: Batch) -> Result<()> {
        for file in spilled {
            file.sync().map_err(Error::io(self.values_path()))?;
        }
        if let (false, Some(values)) = (spilled.is_empty(), &self.values) {
            values.sync().map_err(Error::io(values.path()))?;
        }
        self.backend.commit(batch)
    }

    /// Deletes the value files of a save that failed before its commit began.
    fn discard(&self, staged: &[Staged]) {
        for Staged { encoded, .. } in staged {
            if let Some(spilled) = encoded.spilled() {
                self.remove_file(spilled.id);
            }
        }
    }

    /// Deletes a value file no record points at any more. A file that cannot be
    /// deleted now is unreferenced, and goes at the next open.
    pub(super) fn remove_file(&self, id: u64) {
        if let Some(values) = &self.values {
            let _ = values.remove(id);
        }
    }
}
