//! Looking after a store: listing, verifying, backing up, exporting, importing,
//! pruning orphans and compacting. The `instastate` command-line tool is a thin
//! layer over these.

use std::{
    collections::BTreeMap,
    fmt,
    fs::{self, File},
    io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write},
    path::Path,
    time::SystemTime,
};

use crate::{
    Error, Result, Store,
    atomically::ensure_outside,
    backend::{Backend, Batch, Sled},
    codec::{self, Body, Record},
    fs::{create_dir_durably, sync_dir},
    journaled,
    store::{ENGINE_DIR, Inner, Missing, State, VALUES_DIR, now_ms, time_of},
    values::{Encoded, Spilled, ValueDir, ValueWriter},
};

/// What an export file starts with.
const EXPORT_MAGIC: &[u8; 17] = b"INSTASTATE-EXPORT";
/// The export format this build writes and reads.
const EXPORT_VERSION: u16 = 1;

/// A value as the store holds it; see [`Store::stored_cells`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoredCell {
    /// The cell's name.
    pub name: String,
    /// The type name recorded when it was saved.
    pub type_name: String,
    /// The schema version recorded when it was saved.
    pub schema: u32,
    /// The size of the encoded value in bytes.
    pub size: u64,
    /// The save that wrote it (`None` for values saved before history existed).
    pub generation: Option<u64>,
    /// When it was saved (`None` for values saved before history existed).
    pub saved_at: Option<SystemTime>,
    /// Whether a cell claims it: one of this store's cells, or for a store opened
    /// without cells, one of the cells of the program that saved last.
    pub claimed: bool,
    /// Why its record cannot be read, if it cannot.
    pub damage: Option<String>,
}

/// Something [`Store::verify`] found wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Problem {
    /// The record key or file that is damaged.
    pub location: String,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.reason)
    }
}

impl Store {
    /// Every value the store holds, claimed or not, by name.
    ///
    /// # Example
    /// ```
    /// # use instastate::{StateCell, Store};
    /// static NAME: StateCell<String> = StateCell::new("docs::stored::NAME", || "ada".into());
    /// # fn main() -> instastate::Result<()> {
    /// let store = Store::builder().cell(&NAME).in_memory()?;
    /// store.save_all()?;
    /// let stored = store.stored_cells();
    /// assert_eq!(stored[0].name, "docs::stored::NAME");
    /// assert_eq!(stored[0].type_name, "alloc::string::String");
    /// assert_eq!((stored[0].size, stored[0].generation), (4, Some(1)));
    /// # Ok(())
    /// # }
    /// ```
    #[must_use]
    pub fn stored_cells(&self) -> Vec<StoredCell> {
        let inner = &*self.inner;
        let state = inner.state.lock();
        let orphans = inner.orphan_names(&state);
        state
            .current
            .iter()
            .map(|(name, bytes)| {
                let claimed = !orphans.contains(name);
                let plain = inner.sealer.open(&codec::cell_key(name), bytes);
                let record = plain.map_err(|fault| fault.to_string()).and_then(|plain| {
                    let record = Record::decode(&plain).map_err(|fault| fault.to_string())?;
                    Ok((
                        record.type_name.to_owned(),
                        record.schema,
                        record.value_len(),
                        record.saved,
                    ))
                });
                match record {
                    Ok((type_name, schema, size, saved)) => StoredCell {
                        name: name.clone(),
                        type_name,
                        schema,
                        size,
                        generation: saved.map(|saved| saved.generation),
                        saved_at: saved.map(|saved| time_of(saved.at_ms)),
                        claimed,
                        damage: None,
                    },
                    Err(reason) => StoredCell {
                        name: name.clone(),
                        type_name: String::new(),
                        schema: 0,
                        size: bytes.len() as u64,
                        generation: None,
                        saved_at: None,
                        claimed,
                        damage: Some(reason),
                    },
                }
            })
            .collect()
    }

    /// Checks every header and checksum in the store: the records, the value files
    /// they point at (also those of the history), the history and the metadata.
    /// An empty list means the store is sound.
    ///
    /// # Errors
    /// [`Error::Storage`] when the engine cannot be read at all.
    ///
    /// # Example
    /// ```
    /// # fn main() -> instastate::Result<()> {
    /// let store = instastate::Store::builder().in_memory()?;
    /// assert!(store.verify()?.is_empty());
    /// # Ok(())
    /// # }
    /// ```
    pub fn verify(&self) -> Result<Vec<Problem>> {
        let inner = &*self.inner;
        let _state = inner.state.lock();
        let records = inner.backend.read_all()?;
        let mut problems = Vec::new();
        let mut problem = |location: String, reason: String| {
            problems.push(Problem { location, reason });
        };
        for (key, bytes) in &records {
            let location = String::from_utf8_lossy(key).into_owned();
            if let Some(name) = codec::cell_name(key) {
                if let Err(reason) = inner.check_record(name, bytes) {
                    problem(location, reason);
                }
            } else if let Some(generation) = codec::history_generation(key) {
                let location = codec::history_label(generation);
                match inner.read_manifest(generation, |key| Ok(records.get(key).cloned())) {
                    Err(err) => problem(location, err.to_string()),
                    Ok((manifest, _)) => {
                        for (name, pre) in manifest.entries {
                            let Some(pre) = pre else { continue };
                            if let Err(reason) = inner.check_record(&name, &pre) {
                                problem(format!("{location} (earlier value of {name})"), reason);
                            }
                        }
                    }
                }
            } else if let Some((generation, chunk)) = codec::history_chunk(key) {
                if !records.contains_key(&codec::history_key(generation)) {
                    let location = format!("{} chunk {chunk}", codec::history_label(generation));
                    problem(location, "belongs to no history entry".into());
                }
            } else if key == codec::FORMAT_KEY {
                if codec::read_u32(bytes).is_none() {
                    problem(location, format!("is {} bytes long, not 4", bytes.len()));
                }
            } else if key == codec::GENERATION_KEY {
                if codec::read_u64(bytes).is_none() {
                    problem(location, format!("is {} bytes long, not 8", bytes.len()));
                }
            } else if key == codec::CLAIMED_KEY {
                if let Err(fault) = codec::decode_claimed(bytes) {
                    problem(location, fault.to_string());
                }
            } else if key == codec::KEYCHECK_KEY {
                // Checked at open: the store would not be open otherwise.
            } else {
                problem(location, "is not a key instastate writes".into());
            }
        }
        Ok(problems)
    }

    /// Writes a consistent copy of the store, as of its last save, to the new
    /// directory `path`, while the program keeps running: cells stay usable, and
    /// only saves wait for the copy. The copy is a store of its own (with the same
    /// key, if encrypted), durable when this returns. Journaled cells are copied as
    /// they are now, every handled event included (a snapshot of each); exports
    /// ([`export_to`](Self::export_to)) hold only the plain cells.
    ///
    /// # Errors
    /// [`Error::Io`] when `path` exists and is not an empty directory, or when
    /// writing fails; [`Error::Storage`] when the engine fails.
    ///
    /// # Example
    /// ```
    /// # use instastate::{StateCell, Store};
    /// static TODO: StateCell<Vec<String>> = StateCell::new("docs::backup::TODO", Vec::new);
    /// # fn main() -> instastate::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let store = Store::builder().cell(&TODO).open(dir.path().join("live"))?;
    /// TODO.update(|todo| todo.push("backup".into()));
    /// store.save_all()?;
    /// store.backup_to(dir.path().join("copy"))?;
    ///
    /// let copy = Store::builder().open(dir.path().join("copy"))?;
    /// assert_eq!(copy.stored_cells().len(), 1);
    /// # Ok(())
    /// # }
    /// ```
    pub fn backup_to(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let inner = &*self.inner;
        let state = inner.state.lock();
        inner.check_poisoned(&state)?;
        if path.exists() {
            let empty = fs::read_dir(path).map_err(Error::io(path))?.next().is_none();
            if !empty {
                let source = io::Error::new(io::ErrorKind::AlreadyExists, "not an empty directory");
                return Err(Error::Io { path: path.to_path_buf(), source });
            }
        }
        // Built beside `path` and renamed into place when complete, so that a crash
        // never leaves a partial backup that opens as a store.
        let parent = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        create_dir_durably(parent).map_err(Error::io(parent))?;
        let temp = tempfile::Builder::new()
            .prefix(".instastate-backup-")
            .tempdir_in(parent)
            .map_err(Error::io(parent))?;
        inner.copy_to(&state, temp.path())?;
        for cell in &inner.journaled {
            cell.backup_into(&journaled::journal_dir(temp.path(), cell.name()))?;
        }
        sync_dir(temp.path()).map_err(Error::io(temp.path()))?;
        drop(state);
        let built = temp.keep();
        fs::rename(&built, path).map_err(Error::io(path))?;
        sync_dir(parent).map_err(Error::io(parent))
    }

    /// Writes the store's last save to one portable file at `path`: every stored
    /// value (claimed or not) with its name, type name and schema version, in a
    /// versioned format with a checksum. The file replaces `path` atomically.
    /// An encrypted store's export stays encrypted, and imports only with its key.
    ///
    /// # Errors
    /// [`Error::Io`] when writing fails; [`Error::Corrupt`] when a stored value is
    /// damaged (nothing is written then).
    ///
    /// # Example
    /// ```
    /// # use instastate::{StateCell, Store};
    /// static LEVEL: StateCell<u8> = StateCell::new("docs::export::LEVEL", || 3);
    /// # fn main() -> instastate::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let store = Store::builder().cell(&LEVEL).in_memory()?;
    /// store.save_all()?;
    /// store.export_to(dir.path().join("state.export"))?;
    ///
    /// LEVEL.set(9);
    /// let other = Store::builder().cell(&LEVEL).in_memory()?;
    /// other.import_from(dir.path().join("state.export"))?;
    /// assert_eq!(LEVEL.get(), 3);
    /// # Ok(())
    /// # }
    /// ```
    pub fn export_to(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let inner = &*self.inner;
        let state = inner.state.lock();
        let parent = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        let temp = tempfile::NamedTempFile::new_in(parent).map_err(Error::io(parent))?;
        inner.write_export(temp.as_file(), &state, path)?;
        temp.as_file().sync_all().map_err(Error::io(path))?;
        temp.persist(path)
            .map_err(|err| Error::Io { path: path.to_path_buf(), source: err.error })?;
        sync_dir(parent).map_err(Error::io(parent))
    }

    /// Reads an export file written by [`export_to`](Self::export_to) and stores its
    /// values as one new save, all or nothing; the store's cells named in the file
    /// take its values, other cells keep theirs. Names no cell claims are stored as
    /// orphans. Like any save, an import can be undone with
    /// [`revert_to`](Self::revert_to).
    ///
    /// Every value is decoded for its cell (migrating older schema versions) before
    /// anything is written, so a file that does not fit the cells changes nothing.
    ///
    /// # Errors
    /// - [`Error::BadExport`] when the file is not an export, is damaged, or has
    ///   another format version;
    /// - [`Error::Encryption`] when the file's and the store's encryption differ;
    /// - the decoding errors of [`reload_all`](Self::reload_all), and the writing
    ///   errors of [`save_all`](Self::save_all).
    ///
    /// # Example
    /// See [`export_to`](Self::export_to).
    pub fn import_from(&self, path: impl AsRef<Path>) -> Result<()> {
        ensure_outside("import_from")?;
        let path = path.as_ref();
        let entries = read_export(path, self.inner.sealer.is_on())?;
        let inner = &*self.inner;
        inner.take_background_error()?;
        let mut state = inner.state.lock();
        inner.check_poisoned(&state)?;
        state.now_ms = now_ms();
        let mut encoded = Vec::new();
        let res = inner.stage_import(&state, path, entries, &mut encoded);
        let (writes, target) = match res {
            Ok(it) => it,
            Err(err) => {
                for it in &encoded {
                    if let Some(spilled) = it.spilled() {
                        inner.remove_file(spilled.id);
                    }
                }
                return Err(err);
            }
        };
        let decoded = inner.decode_all(&target, Missing::Skip);
        let decoded = match decoded {
            Ok(decoded) => decoded,
            Err(err) => {
                for it in &encoded {
                    if let Some(spilled) = it.spilled() {
                        inner.remove_file(spilled.id);
                    }
                }
                return Err(err);
            }
        };
        let spilled: Vec<&Spilled> = encoded.iter().filter_map(Encoded::spilled).collect();
        inner.commit_generation(&mut state, writes, &spilled)?;
        inner.install(&mut state, decoded);
        inner.refresh_orphans(&mut state);
        Ok(())
    }

    /// Deletes the stored values that no cell claims (see [`orphans`](Self::orphans)),
    /// as one new save, which [`revert_to`](Self::revert_to) can undo while the
    /// history holds it. For a store opened without cells, as the command-line tool
    /// does, the claimants are the cells of the program that saved last. Returns the
    /// names deleted.
    ///
    /// # Errors
    /// The writing errors of [`save_all`](Self::save_all).
    ///
    /// # Example
    /// ```
    /// # fn main() -> instastate::Result<()> {
    /// let store = instastate::Store::builder().in_memory()?;
    /// assert!(store.prune_orphans()?.is_empty());
    /// # Ok(())
    /// # }
    /// ```
    pub fn prune_orphans(&self) -> Result<Vec<String>> {
        ensure_outside("prune_orphans")?;
        let inner = &*self.inner;
        let mut state = inner.state.lock();
        inner.check_poisoned(&state)?;
        let orphans = inner.orphan_names(&state);
        if orphans.is_empty() {
            return Ok(orphans);
        }
        state.now_ms = now_ms();
        let writes = orphans.iter().map(|name| (name.clone(), None)).collect();
        inner.commit_generation(&mut state, writes, &[])?;
        inner.refresh_orphans(&mut state);
        Ok(orphans)
    }

    /// Rewrites the storage engine's files to hold only live data, and deletes value
    /// files nothing points at. Crash-safe: an interrupted compaction is finished or
    /// undone at the next open.
    ///
    /// # Errors
    /// [`Error::Io`] or [`Error::Storage`] when rewriting fails.
    ///
    /// # Example
    /// ```
    /// # fn main() -> instastate::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let store = instastate::Store::builder().open(dir.path())?;
    /// store.compact()?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn compact(&self) -> Result<()> {
        let inner = &*self.inner;
        let state = inner.state.lock();
        inner.check_poisoned(&state)?;
        inner.backend.compact()?;
        inner.remove_unreferenced_files(&state)
    }
}

impl Inner {
    /// Copies the store's records and the value files they and the history point
    /// at into a new store in `dir`, durably.
    fn copy_to(&self, state: &State, dir: &Path) -> Result<()> {
        let records = self.backend.read_all()?;
        let values_path = dir.join(VALUES_DIR);
        let values = ValueDir::open(values_path.clone()).map_err(Error::io(&values_path))?;
        let files = match (self.referenced_files(state), &self.values) {
            (Some(files), _) => files.into_iter().collect(),
            // Unreadable data might point at any file: copy them all.
            (None, Some(source)) => source.ids().map_err(Error::io(source.path()))?,
            (None, None) => Vec::new(),
        };
        for id in files {
            copy_durably(self, id, &values.file_path(id))?;
        }
        sync_dir(&values_path).map_err(Error::io(&values_path))?;
        let batch: Batch = records.into_iter().map(|(key, bytes)| (key, Some(bytes))).collect();
        let engine = Sled::open(&dir.join(ENGINE_DIR))?;
        engine.commit(batch)
    }

    /// Writes the export of the last save, `state`, to `file`; `path` names it in errors.
    fn write_export(&self, file: &File, state: &State, path: &Path) -> Result<()> {
        let mut out = Checksummed::new(BufWriter::new(file));
        let mut header = Vec::new();
        header.extend_from_slice(EXPORT_MAGIC);
        header.extend_from_slice(&EXPORT_VERSION.to_be_bytes());
        header.push(u8::from(self.sealer.is_on()));
        header.extend_from_slice(&state.generation.to_be_bytes());
        header.extend_from_slice(&now_ms().to_be_bytes());
        let count = u32::try_from(state.current.len()).unwrap_or(u32::MAX);
        header.extend_from_slice(&count.to_be_bytes());
        out.write_all(&header).map_err(Error::io(path))?;
        for (name, bytes) in &state.current {
            // The record and its value file go in exactly as stored, once checked:
            // a damaged value must not travel, it would only fail at import.
            let file = self.checked_file(name, bytes).map_err(|reason| Error::Corrupt {
                cell: name.clone(),
                path: self.engine_path(),
                reason,
            })?;
            put_bytes16(&mut out, name.as_bytes())
                .and_then(|()| put_bytes64(&mut out, bytes))
                .and_then(|()| put_bytes64(&mut out, file.as_deref().unwrap_or_default()))
                .map_err(Error::io(path))?;
        }
        let Checksummed { inner: mut writer, hasher } = out;
        writer.write_all(&hasher.finalize().to_be_bytes()).map_err(Error::io(path))?;
        writer.flush().map_err(Error::io(path))
    }

    /// The stored names no cell claims.
    pub(crate) fn orphan_names(&self, state: &State) -> Vec<String> {
        if !self.cells.is_empty() {
            return state.orphans.clone();
        }
        let Some(claimed) = &state.claimed else { return Vec::new() };
        state.current.keys().filter(|name| !claimed.contains(name)).cloned().collect()
    }

    /// Checks one stored record and the value file it points at.
    fn check_record(&self, name: &str, bytes: &[u8]) -> std::result::Result<(), String> {
        self.checked_file(name, bytes).map(drop)
    }

    /// Checks one stored record and the value file it points at, and returns that
    /// file's bytes as stored.
    fn checked_file(
        &self,
        name: &str,
        bytes: &[u8],
    ) -> std::result::Result<Option<Vec<u8>>, String> {
        let plain = self.sealer.open(&codec::cell_key(name), bytes).map_err(|it| it.to_string())?;
        let record = Record::decode(&plain).map_err(|fault| fault.to_string())?;
        let Body::File { id, len, crc } = record.body else { return Ok(None) };
        let stored = self.read_stored(name, id, len, crc).map_err(|err| err.to_string())?;
        if self.sealer.is_on() {
            // Authenticated, and thrown away: the file travels sealed.
            self.open_value(name, name, id, stored.clone()).map_err(|err| err.to_string())?;
        }
        Ok(Some(stored))
    }

    /// Turns export entries into new records (writing value files as needed, into
    /// `encoded`), and returns the writes and the resulting records by name.
    #[allow(clippy::type_complexity)]
    fn stage_import(
        &self,
        state: &State,
        path: &Path,
        entries: Vec<ExportEntry>,
        encoded: &mut Vec<Encoded>,
    ) -> Result<(Vec<(String, Option<Vec<u8>>)>, BTreeMap<String, Vec<u8>>)> {
        let mut writes = Vec::new();
        let mut target = BTreeMap::new();
        for ExportEntry { name, record, file } in entries {
            let corrupt = |reason: String| Error::BadExport { path: path.to_path_buf(), reason };
            let plain = self
                .sealer
                .open(&codec::cell_key(&name), &record)
                .map_err(|fault| corrupt(format!("record of `{name}`: {fault}")))?;
            let record = Record::decode(&plain)
                .map_err(|fault| corrupt(format!("record of `{name}`: {fault}")))?;
            let value = match (record.body, file) {
                (Body::Inline(bytes), _) => bytes.to_vec(),
                (Body::File { len, crc, .. }, Some(file)) => {
                    if file.len() as u64 != len || codec::checksum(&file) != crc {
                        return Err(corrupt(format!(
                            "value of `{name}` does not match its record"
                        )));
                    }
                    self.sealer
                        .open_file(&codec::cell_key(&name), file)
                        .map_err(|fault| corrupt(format!("value of `{name}`: {fault}")))?
                }
                (Body::File { .. }, None) => {
                    return Err(corrupt(format!("value of `{name}` is missing")));
                }
            };
            let mut out = ValueWriter::new(self.values.as_ref(), &self.sealer, &name);
            let res = out.write_all(&value).and_then(|()| out.finish());
            let new = res.map_err(Error::io(self.label.clone()))?;
            let bytes = self.seal_record(&name, record.schema, record.type_name, &new, state);
            encoded.push(new);
            target.insert(name.clone(), bytes.clone());
            writes.push((name, Some(bytes)));
        }
        Ok((writes, target))
    }
}

/// One value of an export file.
struct ExportEntry {
    name: String,
    record: Vec<u8>,
    file: Option<Vec<u8>>,
}

/// Reads and checks a whole export file.
fn read_export(path: &Path, sealed: bool) -> Result<Vec<ExportEntry>> {
    let bad =
        |reason: &str| Error::BadExport { path: path.to_path_buf(), reason: reason.to_owned() };
    let file = File::open(path).map_err(Error::io(path))?;
    let len = file.metadata().map_err(Error::io(path))?.len();
    let mut reader = BufReader::new(file);
    // The magic, then the checksum over the whole file, before anything is parsed.
    {
        let mut magic = [0; EXPORT_MAGIC.len()];
        let body_len = len.saturating_sub(4);
        if body_len < magic.len() as u64
            || reader.read_exact(&mut magic).is_err()
            || &magic != EXPORT_MAGIC
        {
            return Err(bad("not an instastate export file"));
        }
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&magic);
        let mut left = body_len - magic.len() as u64;
        let mut buf = vec![0; 64 * 1024];
        while left > 0 {
            let want = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
            let chunk = buf.get_mut(..want).unwrap_or_default();
            reader.read_exact(chunk).map_err(Error::io(path))?;
            hasher.update(chunk);
            left -= want as u64;
        }
        let mut crc = [0; 4];
        reader.read_exact(&mut crc).map_err(Error::io(path))?;
        if hasher.finalize() != u32::from_be_bytes(crc) {
            return Err(bad("checksum does not match: the file is damaged or incomplete"));
        }
    }
    let truncated = |_: io::Error| bad("file ends in the middle of an entry");
    reader.seek(SeekFrom::Start(EXPORT_MAGIC.len() as u64)).map_err(Error::io(path))?;
    let version = u16::from_be_bytes(take(&mut reader).map_err(truncated)?);
    if version != EXPORT_VERSION {
        return Err(bad(&format!(
            "export format v{version} is unknown (this build reads v{EXPORT_VERSION})"
        )));
    }
    let [flag] = take::<1>(&mut reader).map_err(truncated)?;
    if (flag == 1) != sealed {
        return Err(Error::Encryption { path: path.to_path_buf(), encrypted: flag == 1 });
    }
    let _generation = u64::from_be_bytes(take(&mut reader).map_err(truncated)?);
    let _exported_at = u64::from_be_bytes(take(&mut reader).map_err(truncated)?);
    let count = u32::from_be_bytes(take(&mut reader).map_err(truncated)?);
    let mut entries = Vec::new();
    for _ in 0..count {
        let name = take_bytes16(&mut reader).map_err(truncated)?;
        let name = String::from_utf8(name).map_err(|_| bad("a cell name is not UTF-8"))?;
        let record = take_bytes64(&mut reader).map_err(truncated)?;
        let file = take_bytes64(&mut reader).map_err(truncated)?;
        let file = (!file.is_empty()).then_some(file);
        entries.push(ExportEntry { name, record, file });
    }
    Ok(entries)
}

fn take<const N: usize>(reader: &mut impl Read) -> io::Result<[u8; N]> {
    let mut bytes = [0; N];
    reader.read_exact(&mut bytes)?;
    Ok(bytes)
}

fn take_bytes16(reader: &mut impl Read) -> io::Result<Vec<u8>> {
    let len = u16::from_be_bytes(take(reader)?);
    let mut bytes = vec![0; usize::from(len)];
    reader.read_exact(&mut bytes)?;
    Ok(bytes)
}

fn take_bytes64(reader: &mut impl Read) -> io::Result<Vec<u8>> {
    let len = u64::from_be_bytes(take(reader)?);
    let mut bytes = Vec::new();
    // `take` bounds the read by what the file holds, whatever the length says.
    reader.take(len).read_to_end(&mut bytes)?;
    if bytes.len() as u64 != len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(bytes)
}

fn put_bytes16(out: &mut impl Write, bytes: &[u8]) -> io::Result<()> {
    let len = u16::try_from(bytes.len()).map_err(io::Error::other)?;
    out.write_all(&len.to_be_bytes())?;
    out.write_all(bytes)
}

fn put_bytes64(out: &mut impl Write, bytes: &[u8]) -> io::Result<()> {
    out.write_all(&(bytes.len() as u64).to_be_bytes())?;
    out.write_all(bytes)
}

/// A writer that checksums what it writes.
struct Checksummed<W> {
    inner: W,
    hasher: crc32fast::Hasher,
}

impl<W: Write> Checksummed<W> {
    fn new(inner: W) -> Checksummed<W> {
        Checksummed { inner, hasher: crc32fast::Hasher::new() }
    }
}

impl<W: Write> Write for Checksummed<W> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(bytes)?;
        self.hasher.update(bytes.get(..written).unwrap_or_default());
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Copies value file `id` of `inner` to `to`, and fsyncs the copy.
fn copy_durably(inner: &Inner, id: u64, to: &Path) -> Result<()> {
    let Some(values) = &inner.values else { return Ok(()) };
    let from = values.file_path(id);
    fs::copy(&from, to).map_err(Error::io(&from))?;
    File::open(to).and_then(|file| file.sync_all()).map_err(Error::io(to))
}
