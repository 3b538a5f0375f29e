//! The simulator behind [`Io`](super::Io) in this crate's tests.
//!
//! - **Faults**: the Nth call (of some kinds of call, under the simulated root)
//!   fails with `EIO` or `ENOSPC`, once or from then on.
//! - **Power loss**: the simulator models what survives one. A file written through
//!   [`Io`](super::Io) keeps the contents it had at its last sync (plus, to model a
//!   torn write, a random part of what was appended since); a directory keeps the
//!   entries it had at its last sync. A power loss at call N *materializes* that
//!   durable state into a new directory, which a test then opens with the real file
//!   system, and fails every later call, as a machine that is off would.
//! - **Skipped sync**: the Nth sync succeeds without making anything durable, so a
//!   test can show that a power loss after it loses acknowledged data: that sync is
//!   needed.
//!
//! Files are identified by keys rather than inode numbers, since a deleted file's
//! inode number is soon reused while a directory's durable entries may still name
//! the deleted file. Files that no write went through (sled's own, which bypass the
//! layer) are taken as they are on disk.

use std::{
    collections::{BTreeMap, HashMap},
    ffi::OsString,
    fs::{self, File},
    io,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use parking_lot::Mutex;

use super::{Op, Open};

/// Which calls fail, and how.
#[derive(Debug, Clone)]
pub(crate) struct Fault {
    /// The matching call that fails, from 1.
    pub(crate) nth: u64,
    /// The kinds of call that count; empty: every kind.
    pub(crate) ops: Vec<Op>,
    /// `ENOSPC` rather than `EIO`.
    pub(crate) no_space: bool,
    /// Every matching call from the Nth on fails, as on a dead disk.
    pub(crate) sticky: bool,
}

/// The simulator; see the module docs.
pub(crate) struct Sim {
    root: PathBuf,
    state: Mutex<State>,
}

/// A file's or directory's identity in the model.
type Key = u64;

#[derive(Default)]
struct State {
    /// Calls so far, of every kind.
    calls: u64,
    fault: Option<Fault>,
    /// Calls so far that match the fault.
    matched: u64,
    /// The calls a fault failed.
    fired: Vec<(Op, PathBuf)>,
    /// A power loss just before this call (from 1), into this directory.
    crash_at: Option<(u64, PathBuf)>,
    /// Set once the power is lost: every later call fails.
    crashed: bool,
    /// The sync (from 1) that makes nothing durable.
    skip_sync: Option<u64>,
    /// The call that made that sync, and what it synced.
    skipped: Option<(u64, PathBuf)>,
    syncs: u64,
    /// Seeds the torn part of unsynced appends.
    seed: u64,
    model: Model,
}

#[derive(Default)]
struct Model {
    next_key: Key,
    /// The key of every inode number seen and not removed since.
    keys: HashMap<u64, Key>,
    /// The files written through the layer, with their durable contents.
    durable: HashMap<Key, Vec<u8>>,
    /// The durable entries of each directory: name, key, whether a directory.
    listings: HashMap<Key, Vec<(OsString, Key, bool)>>,
}

impl Sim {
    /// A simulator of the tree under `root`, which counts everything in it now as
    /// durable.
    pub(crate) fn new(root: &Path) -> io::Result<std::sync::Arc<Sim>> {
        let sim = Sim { root: root.to_path_buf(), state: Mutex::new(State::default()) };
        {
            let mut state = sim.state.lock();
            let mut dirs = vec![root.to_path_buf()];
            while let Some(dir) = dirs.pop() {
                let listing = state.model.listing(&dir)?;
                for (name, _, is_dir) in &listing {
                    if *is_dir {
                        dirs.push(dir.join(name));
                    }
                }
                let key = state.model.key(ino(&dir)?);
                state.model.listings.insert(key, listing);
            }
        }
        Ok(std::sync::Arc::new(sim))
    }

    /// Fails calls as `fault` says, from now on.
    pub(crate) fn fail(&self, fault: Fault) {
        let mut state = self.state.lock();
        state.matched = 0;
        state.fault = Some(fault);
    }

    /// Loses the power just before call number `call` (counting every call since
    /// the simulator was made, from 1), keeping the durable state in `out`.
    pub(crate) fn crash_at(&self, call: u64, out: &Path) {
        self.state.lock().crash_at = Some((call, out.to_path_buf()));
    }

    /// Makes sync number `sync` (from 1) succeed without making anything durable.
    pub(crate) fn skip_sync(&self, sync: u64) {
        self.state.lock().skip_sync = Some(sync);
    }

    /// Seeds the random part of unsynced appends that a power loss keeps.
    pub(crate) fn seed(&self, seed: u64) {
        self.state.lock().seed = seed;
    }

    /// Makes everything durable, as the kernel's writeback does when time passes:
    /// every file's contents and every directory's entries as they are now.
    pub(crate) fn writeback(&self) -> io::Result<()> {
        let mut state = self.state.lock();
        let model = &mut state.model;
        let mut dirs = vec![self.root.clone()];
        while let Some(dir) = dirs.pop() {
            let listing = model.listing(&dir)?;
            for (name, key, is_dir) in &listing {
                let path = dir.join(name);
                if *is_dir {
                    dirs.push(path);
                } else if model.durable.contains_key(key) {
                    model.durable.insert(*key, fs::read(path)?);
                }
            }
            let key = model.key(ino(&dir)?);
            model.listings.insert(key, listing);
        }
        Ok(())
    }

    /// Loses the power now, keeping the durable state in `out`.
    pub(crate) fn power_loss(&self, out: &Path) -> io::Result<()> {
        let mut state = self.state.lock();
        state.crashed = true;
        self.materialize(&mut state, out)
    }

    /// Calls made so far.
    pub(crate) fn calls(&self) -> u64 {
        self.state.lock().calls
    }

    /// Syncs made so far.
    pub(crate) fn syncs(&self) -> u64 {
        self.state.lock().syncs
    }

    /// The calls a fault failed.
    pub(crate) fn fired(&self) -> Vec<(Op, PathBuf)> {
        self.state.lock().fired.clone()
    }

    /// The sync that was skipped, if it came: the number of the call that made it,
    /// and the path it synced.
    pub(crate) fn skipped(&self) -> Option<(u64, PathBuf)> {
        self.state.lock().skipped.clone()
    }

    /// Whether the power was lost.
    pub(crate) fn crashed(&self) -> bool {
        self.state.lock().crashed
    }

    pub(super) fn check(&self, op: Op, path: &Path) -> io::Result<()> {
        let mut state = self.state.lock();
        state.calls += 1;
        if state.crashed {
            return Err(io::Error::other("simulated power loss: the machine is off"));
        }
        if let Some((call, out)) = state.crash_at.clone()
            && call == state.calls
        {
            state.crashed = true;
            self.materialize(&mut state, &out)?;
            return Err(io::Error::other("simulated power loss"));
        }
        if op == Op::Remove {
            // The inodes go away: a new file that reuses a number is another file.
            state.model.forget_tree(path);
        }
        let Some(fault) = state.fault.clone() else { return Ok(()) };
        if !path.starts_with(&self.root) || !(fault.ops.is_empty() || fault.ops.contains(&op)) {
            return Ok(());
        }
        state.matched += 1;
        let hit = state.matched == fault.nth || (fault.sticky && state.matched > fault.nth);
        if !hit {
            return Ok(());
        }
        state.fired.push((op, path.to_path_buf()));
        Err(if fault.no_space {
            io::Error::from_raw_os_error(28) // ENOSPC
        } else {
            io::Error::from_raw_os_error(5) // EIO
        })
    }

    /// Before a rename onto `target`: the inode it replaces goes away. Until the
    /// directory is synced, a power loss may still find it there, with the contents
    /// it has now if it was never written through the layer (a file seen for the
    /// first time counts as durable as is).
    pub(super) fn before_rename(&self, target: &Path) {
        let mut state = self.state.lock();
        if let Ok(meta) = fs::metadata(target)
            && meta.is_file()
        {
            let key = state.model.key(meta.ino());
            if !state.model.durable.contains_key(&key)
                && let Ok(bytes) = fs::read(target)
            {
                state.model.durable.insert(key, bytes);
            }
        }
        state.model.forget_tree(target);
    }

    pub(super) fn done(&self, op: Op, path: &Path) {
        let mut state = self.state.lock();
        if op == Op::Sync
            && !state.skipped(path)
            && let Ok(listing) = state.model.listing(path)
            && let Ok(ino) = ino(path)
        {
            let key = state.model.key(ino);
            state.model.listings.insert(key, listing);
        }
    }

    pub(super) fn before_open(&self, path: &Path, how: Open) {
        if how == Open::Read || how == Open::CreateNew {
            return;
        }
        let mut state = self.state.lock();
        // A file that is about to be written keeps its present contents until the
        // writes are synced; a file seen for the first time counts as durable as is.
        if let Ok(meta) = fs::metadata(path) {
            let key = state.model.key(meta.ino());
            if !state.model.durable.contains_key(&key)
                && let Ok(bytes) = fs::read(path)
            {
                state.model.durable.insert(key, bytes);
            }
        }
    }

    pub(super) fn opened(&self, _path: &Path, how: Open, file: &File) {
        if how == Open::Read {
            return;
        }
        let mut state = self.state.lock();
        if let Ok(meta) = file.metadata() {
            let key = state.model.key(meta.ino());
            // A new file is empty until its writes are synced.
            state.model.durable.entry(key).or_default();
        }
    }

    pub(super) fn synced(&self, path: &Path, file: &File) {
        let mut state = self.state.lock();
        if state.skipped(path) {
            return;
        }
        let Ok(meta) = file.metadata() else { return };
        let key = state.model.key(meta.ino());
        // A file never written through the layer (the engine's log, synced through
        // a read handle) is the engine's: taken as it is on disk.
        if !state.model.durable.contains_key(&key) {
            return;
        }
        // Read through the descriptor, which may be write-only and whose path may
        // have changed since it was opened.
        if let Ok(bytes) = fs::read(format!("/proc/self/fd/{}", file.as_raw_fd())) {
            state.model.durable.insert(key, bytes);
        }
    }

    /// Writes the durable state of the tree into `out`, which must not exist.
    ///
    /// A directory keeps the entries of its last sync, except that any of the
    /// changes made since (a file created, renamed or removed) may have reached the
    /// disk on their own, in any order: the seed chooses which did.
    fn materialize(&self, state: &mut State, out: &Path) -> io::Result<()> {
        let model = &mut state.model;
        let mut current: HashMap<Key, PathBuf> = HashMap::new();
        let mut dirs = vec![self.root.clone()];
        while let Some(dir) = dirs.pop() {
            for entry in super::list(&dir)? {
                let path = dir.join(&entry.name);
                current.insert(model.key(entry.ino), path.clone());
                if entry.is_dir {
                    dirs.push(path);
                }
            }
        }
        let root = model.key(ino(&self.root)?);
        current.insert(root, self.root.clone());
        let mut random = Random(state.seed | 1);
        // Every third seed keeps nothing unsynced of any file: the worst case.
        let strict = state.seed.is_multiple_of(3);
        fs::create_dir_all(out)?;
        let mut pending = vec![(root, out.to_path_buf())];
        while let Some((dir, target)) = pending.pop() {
            let durable: BTreeMap<OsString, (Key, bool)> = model
                .listings
                .get(&dir)
                .into_iter()
                .flatten()
                .map(|(name, key, is_dir)| (name.clone(), (*key, *is_dir)))
                .collect();
            let now: BTreeMap<OsString, (Key, bool)> = match current.get(&dir) {
                Some(path) => model
                    .listing(path)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(name, key, is_dir)| (name, (key, is_dir)))
                    .collect(),
                None => BTreeMap::new(),
            };
            let names: std::collections::BTreeSet<&OsString> =
                durable.keys().chain(now.keys()).collect();
            for name in names {
                let (old, new) = (durable.get(name), now.get(name));
                let chosen = if old == new || random.coin() { old } else { new };
                let Some(&(key, is_dir)) = chosen else { continue };
                let path = target.join(name);
                if is_dir {
                    fs::create_dir(&path)?;
                    pending.push((key, path));
                    continue;
                }
                let now = current.get(&key).and_then(|path| fs::read(path).ok());
                let bytes = match (model.durable.get(&key), now) {
                    (Some(durable), Some(now)) if now.starts_with(durable) && !strict => {
                        // Part of what was appended since the last sync may have
                        // reached the disk: a torn write.
                        let extra = (now.len() - durable.len()) as u64;
                        let kept = usize::try_from(random.below(extra + 1)).unwrap_or(0);
                        now.get(..durable.len() + kept).unwrap_or_default().to_vec()
                    }
                    // Written in place since its last sync: the write may have
                    // reached the disk, or not.
                    (Some(_), Some(now)) if !strict && random.coin() => now,
                    (Some(durable), _) => durable.clone(),
                    (None, Some(now)) => now,
                    // A file that is gone and was never written through the layer.
                    (None, None) => continue,
                };
                fs::write(&path, bytes)?;
            }
        }
        Ok(())
    }
}

/// xorshift64: the simulator's choices, repeatable from a seed.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn coin(&mut self) -> bool {
        self.next() & 1 == 0
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound.max(1)
    }
}

impl State {
    /// Counts a sync of `path`; whether it is the one to skip.
    fn skipped(&mut self, path: &Path) -> bool {
        self.syncs += 1;
        let skip = self.skip_sync == Some(self.syncs);
        if skip {
            self.skipped = Some((self.calls, path.to_path_buf()));
        }
        skip
    }
}

impl Model {
    fn key(&mut self, ino: u64) -> Key {
        let next = &mut self.next_key;
        *self.keys.entry(ino).or_insert_with(|| {
            *next += 1;
            *next
        })
    }

    /// Forgets the inode numbers of `path` and everything under it, which are about
    /// to be freed.
    fn forget_tree(&mut self, path: &Path) {
        let mut paths = vec![path.to_path_buf()];
        while let Some(path) = paths.pop() {
            let Ok(meta) = fs::symlink_metadata(&path) else { continue };
            self.keys.remove(&meta.ino());
            if meta.is_dir()
                && let Ok(entries) = super::list(&path)
            {
                paths.extend(entries.into_iter().map(|entry| path.join(entry.name)));
            }
        }
    }

    /// The entries of directory `dir` now, keyed.
    fn listing(&mut self, dir: &Path) -> io::Result<Vec<(OsString, Key, bool)>> {
        let mut listing = Vec::new();
        for entry in super::list(dir)? {
            listing.push((entry.name, self.key(entry.ino), entry.is_dir));
        }
        Ok(listing)
    }
}

fn ino(path: &Path) -> io::Result<u64> {
    Ok(fs::metadata(path)?.ino())
}

/// Every file under `dir` with its contents, by path relative to `dir`: for
/// comparing trees in tests.
pub(crate) fn snapshot_tree(dir: &Path) -> io::Result<BTreeMap<PathBuf, Vec<u8>>> {
    let mut files = BTreeMap::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(current) = dirs.pop() {
        for entry in super::list(&current)? {
            let path = current.join(&entry.name);
            if entry.is_dir {
                dirs.push(path);
            } else {
                let relative = path.strip_prefix(dir).map(Path::to_path_buf).unwrap_or_default();
                files.insert(relative, fs::read(&path)?);
            }
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::io::Io;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    #[test]
    fn a_power_loss_keeps_synced_data_and_synced_entries_only() -> TestResult {
        let tmp = tempfile::tempdir()?;
        let root = tmp.path().join("root");
        fs::create_dir(&root)?;
        let sim = Sim::new(&root)?;
        let io = Io::simulated(std::sync::Arc::clone(&sim));
        // Synced file, synced entry: survives.
        let mut kept = io.open(&root.join("kept"), Open::CreateNew)?;
        kept.write_all(b"durable")?;
        kept.sync_all()?;
        io.sync_dir(&root)?;
        kept.write_all(b" and more")?;
        // Synced file, entry never synced: gone.
        let mut lost = io.open(&root.join("lost"), Open::CreateNew)?;
        lost.write_all(b"x")?;
        lost.sync_all()?;
        sim.seed(7);
        let out = tmp.path().join("out");
        sim.power_loss(&out)?;
        let files = snapshot_tree(&out)?;
        let kept = files.get(Path::new("kept")).ok_or("the synced file is gone")?;
        assert!(kept.starts_with(b"durable") && b"durable and more".starts_with(kept));
        // The entry of `lost` was never synced: whether it reached the disk is the
        // seed's choice; its data, synced, came with it if it did.
        if let Some(lost) = files.get(Path::new("lost")) {
            assert_eq!(lost, b"x");
        }
        assert!(io.open(&root.join("after"), Open::CreateNew).is_err(), "the machine is off");
        Ok(())
    }

    #[test]
    fn a_rename_is_durable_only_once_its_directory_is_synced() -> TestResult {
        let tmp = tempfile::tempdir()?;
        let root = tmp.path().join("root");
        fs::create_dir(&root)?;
        fs::write(root.join("old"), b"old contents")?;
        let sim = Sim::new(&root)?;
        let io = Io::simulated(std::sync::Arc::clone(&sim));
        io.write_durably(&root.join("old"), b"new contents")?;
        let mut part = io.open(&root.join("second.part"), Open::Create)?;
        part.write_all(b"second")?;
        part.sync_all()?;
        drop(part);
        io.sync_dir(&root)?;
        io.rename(&root.join("second.part"), &root.join("second"))?;
        let out = tmp.path().join("out");
        sim.power_loss(&out)?;
        let files = snapshot_tree(&out)?;
        assert_eq!(files.get(Path::new("old")).map(Vec::as_slice), Some(&b"new contents"[..]));
        // The rename was never made durable: the file has one of its two names.
        let named: Vec<&Vec<u8>> =
            ["second", "second.part"].iter().filter_map(|it| files.get(Path::new(it))).collect();
        assert_eq!(named, [b"second"]);
        Ok(())
    }

    #[test]
    fn the_nth_call_fails_once_or_for_good() -> TestResult {
        let tmp = tempfile::tempdir()?;
        let sim = Sim::new(tmp.path())?;
        let io = Io::simulated(std::sync::Arc::clone(&sim));
        sim.fail(Fault { nth: 2, ops: vec![Op::Sync], no_space: true, sticky: false });
        let file = io.open(&tmp.path().join("f"), Open::CreateNew)?;
        file.sync_all()?;
        let err = file.sync_all().err().ok_or("the second sync did not fail")?;
        assert_eq!(err.raw_os_error(), Some(28));
        file.sync_all()?;
        sim.fail(Fault { nth: 1, ops: vec![Op::Sync], no_space: false, sticky: true });
        assert!(file.sync_all().is_err() && file.sync_all().is_err());
        assert_eq!(sim.fired().len(), 3);
        Ok(())
    }
}
