//! Looking after a store: listing, verifying, backing up, exporting, importing,
//! pruning orphans and compacting. The `instastate` command-line tool is a thin
//! layer over these.

use std::{
    fmt,
    io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write},
    path::Path,
    time::SystemTime,
};

use crate::{
    Error, Result, Store,
    atomically::ensure_outside,
    codec::{self, Record},
    io::{IoFile, Open, parent_of},
    journaled,
    store::{Imported, LastSave, now_ms, time_of},
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
    /// Why it cannot be read back, if it cannot: its record is damaged (the
    /// other fields are then empty), or the value file the record points at is
    /// missing or of another length ([`Store::verify`] also checks its bytes).
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
        let saved = self.inner.last_save();
        let orphans = saved.orphans();
        saved
            .records()
            .iter()
            .map(|(name, bytes)| {
                let claimed = !orphans.contains(name);
                let record = saved.open_record(name, bytes).and_then(|plain| {
                    let record = Record::decode(&plain).map_err(|fault| fault.to_string())?;
                    // A value file is looked for, not read: `verify` checks its bytes.
                    let file = record.file().map_or(Ok(()), |id| {
                        self.inner.check_stored_len(name, id, record.value_len())
                    });
                    Ok((
                        record.type_name.to_owned(),
                        record.schema,
                        record.value_len(),
                        record.saved,
                        file.err().map(|err| err.to_string()),
                    ))
                });
                match record {
                    Ok((type_name, schema, size, saved, damage)) => StoredCell {
                        name: name.clone(),
                        type_name,
                        schema,
                        size,
                        generation: saved.map(|saved| saved.generation),
                        saved_at: saved.map(|saved| time_of(saved.at_ms)),
                        claimed,
                        damage,
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
    /// they point at (also those of the history), the history and the metadata, and
    /// the journals of journaled cells that this store has not opened (as when it is
    /// opened without cells), as opening them would. An empty list means the store is
    /// sound.
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
        let saved = self.inner.last_save();
        let records = saved.engine_records()?;
        let mut problems = Vec::new();
        let mut problem = |location: String, reason: String| {
            problems.push(Problem { location, reason });
        };
        for (key, bytes) in &records {
            let location = String::from_utf8_lossy(key).into_owned();
            if let Some(name) = codec::cell_name(key) {
                if let Err(reason) = saved.checked_file(name, bytes) {
                    problem(location, reason);
                }
            } else if let Some(generation) = codec::history_generation(key) {
                let location = codec::history_label(generation);
                match saved.manifest(generation, &records) {
                    Err(err) => problem(location, err.to_string()),
                    Ok(manifest) => {
                        for (name, pre) in manifest.entries {
                            let Some(pre) = pre else { continue };
                            if let Err(reason) = saved.checked_file(&name, &pre) {
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
            } else if let Some(crc) = codec::shape_crc(key) {
                let location = format!("shape/{crc:08x}");
                let joined = codec::join_value(key, |key| Ok::<_, ()>(records.get(key).cloned()));
                let shape = joined.ok().flatten().map(|bytes| crate::shape::Shape::decode(&bytes));
                let reason = match shape {
                    Some(Ok(shape)) if shape.checksum() == crc => None,
                    Some(Ok(_)) => Some("the structure's checksum does not match its key".into()),
                    Some(Err(fault)) => Some(format!("the structure cannot be read: {fault}")),
                    None => Some("a chunk of the structure is missing".into()),
                };
                if let Some(reason) = reason {
                    problem(location, reason);
                }
            } else if let Some((crc, chunk)) = codec::shape_chunk(key) {
                if !records.contains_key(&codec::shape_key(crc)) {
                    problem(format!("shape/{crc:08x}/{chunk}"), "belongs to no structure".into());
                }
            } else if codec::claim_name(key).is_some() {
                if !bytes.is_empty() {
                    problem(location, format!("a claim holds {} bytes, not none", bytes.len()));
                }
            } else if key == codec::KEYCHECK_KEY {
                // Checked at open: the store would not be open otherwise.
            } else {
                problem(location, "is not a key instastate writes".into());
            }
        }
        for (dir, inspected) in saved.inspect_journals()? {
            let name = dir.file_name().and_then(|it| it.to_str()).unwrap_or_default();
            let location = match journaled::cell_name_of(name) {
                Some(cell) => format!("journal of cell {cell} ({})", dir.display()),
                None => format!("{} (no cell's journal has this name)", dir.display()),
            };
            match inspected {
                Err(err) => problem(location, err.to_string()),
                Ok(report) => {
                    for path in report.unsound_snapshots {
                        let reason = format!(
                            "snapshot {} is damaged; opening passes over it",
                            path.display()
                        );
                        problem(location.clone(), reason);
                    }
                }
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
    /// writing fails; [`Error::Storage`] when the engine fails;
    /// [`Error::InvalidLocation`] when `path` is a `postgres://` URL.
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
        crate::location::refuse_database(path, "a backup")?;
        let io = self.inner.io();
        let saved = self.inner.last_save();
        saved.check_poisoned()?;
        if path.exists() {
            let empty = io.read_dir(path).map_err(Error::io(path))?.is_empty();
            if !empty {
                let source = io::Error::new(io::ErrorKind::AlreadyExists, "not an empty directory");
                return Err(Error::Io { path: path.to_path_buf(), source });
            }
        }
        // Built beside `path` and renamed into place when complete, so that a crash
        // never leaves a partial backup that opens as a store.
        let parent = parent_of(path);
        io.create_dir_durably(parent).map_err(Error::io(parent))?;
        let temp = tempfile::Builder::new()
            .prefix(".instastate-backup-")
            .tempdir_in(parent)
            .map_err(Error::io(parent))?;
        saved.copy_to(temp.path())?;
        io.sync_dir(temp.path()).map_err(Error::io(temp.path()))?;
        drop(saved);
        let built = temp.keep();
        io.rename(&built, path).map_err(Error::io(path))?;
        io.sync_dir(parent).map_err(Error::io(parent))
    }

    /// The names of the journaled cells the store holds: those it was opened with,
    /// and those whose journals its directory keeps (a store opened without its
    /// journaled cells, as the tool opens one, still lists them). Their state is in
    /// their journals, not in the store's saves.
    #[must_use]
    pub fn journaled_cells(&self) -> Vec<String> {
        self.inner.journaled_names().into_iter().collect()
    }

    /// Writes the store's last save to one portable file at `path`: every stored
    /// value (claimed or not) with its name, type name and schema version, in a
    /// versioned format with a checksum. The file replaces `path` atomically.
    /// An encrypted store's export stays encrypted, and imports only with its key.
    ///
    /// The journaled cells ([`journaled_cells`](Self::journaled_cells)) are not
    /// in it: their journals hold their state, which
    /// [`backup_to`](Self::backup_to) copies.
    ///
    /// # Errors
    /// [`Error::Io`] when writing fails; [`Error::Corrupt`] when a stored value is
    /// damaged (nothing is written then); [`Error::InvalidLocation`] when `path`
    /// is a `postgres://` URL.
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
    /// drop(store); // a cell is in one open store at a time
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
        crate::location::refuse_database(path, "an export")?;
        let io = self.inner.io();
        let saved = self.inner.last_save();
        let parent = parent_of(path);
        // A temporary file beside `path`, deleted if anything fails before the rename.
        let mut temp = tempfile::Builder::new()
            .prefix(".instastate-export-")
            .make_in(parent, |temp| io.open(temp, Open::CreateNew))
            .map_err(Error::io(parent))?;
        write_export(&saved, temp.as_file_mut(), path)?;
        temp.as_file().sync_all().map_err(Error::io(path))?;
        let (_, temp) = temp.into_parts();
        io.rename(&temp, path).map_err(Error::io(path))?;
        // Renamed: there is nothing left to delete.
        let _ = temp.keep();
        io.sync_dir(parent).map_err(Error::io(parent))
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
    /// - [`Error::InvalidLocation`] when `path` is a `postgres://` URL;
    /// - the decoding errors of [`reload_all`](Self::reload_all), and the writing
    ///   errors of [`save_all`](Self::save_all).
    ///
    /// # Example
    /// See [`export_to`](Self::export_to).
    pub fn import_from(&self, path: impl AsRef<Path>) -> Result<()> {
        ensure_outside("import_from")?;
        let path = path.as_ref();
        crate::location::refuse_database(path, "an import")?;
        let entries = read_export(self.inner.io(), path, self.inner.is_sealed())?;
        self.inner.take_background_error()?;
        self.inner.last_save().import(path, entries)
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
        self.inner.last_save().prune_orphans()
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
        self.inner.last_save().compact()
    }
}

/// Writes the export of the last save, `saved`, to `file`; `path` names it in errors.
fn write_export(saved: &LastSave<'_>, file: &mut IoFile, path: &Path) -> Result<()> {
    let mut out = Checksummed::new(BufWriter::new(file));
    let mut header = Vec::new();
    header.extend_from_slice(EXPORT_MAGIC);
    header.extend_from_slice(&EXPORT_VERSION.to_be_bytes());
    header.push(u8::from(saved.is_sealed()));
    header.extend_from_slice(&saved.generation().to_be_bytes());
    header.extend_from_slice(&now_ms().to_be_bytes());
    let count = u32::try_from(saved.records().len()).map_err(|_| {
        let reason = "an export file holds at most 4,294,967,295 values";
        Error::io(path)(io::Error::new(io::ErrorKind::FileTooLarge, reason))
    })?;
    header.extend_from_slice(&count.to_be_bytes());
    out.write_all(&header).map_err(Error::io(path))?;
    for (name, bytes) in saved.records() {
        // The record and its value file go in exactly as stored, once checked:
        // a damaged value must not travel, it would only fail at import.
        let file = saved.checked_file(name, bytes).map_err(|reason| Error::Corrupt {
            cell: name.clone(),
            path: saved.engine_path(),
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

/// Reads and checks a whole export file.
fn read_export(io: &crate::io::Io, path: &Path, sealed: bool) -> Result<Vec<Imported>> {
    let bad =
        |reason: &str| Error::BadExport { path: path.to_path_buf(), reason: reason.to_owned() };
    let file = io.open(path, Open::Read).map_err(Error::io(path))?;
    let len = file.len().map_err(Error::io(path))?;
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
    if 1 < flag {
        return Err(bad(&format!("its encryption flag is {flag}, neither 0 nor 1")));
    }
    if (flag == 1) != sealed {
        return Err(Error::Encryption { path: path.to_path_buf(), encrypted: flag == 1 });
    }
    let _generation = u64::from_be_bytes(take(&mut reader).map_err(truncated)?);
    let _exported_at = u64::from_be_bytes(take(&mut reader).map_err(truncated)?);
    let count = u32::from_be_bytes(take(&mut reader).map_err(truncated)?);
    let mut entries = Vec::new();
    let mut names = std::collections::BTreeSet::new();
    for _ in 0..count {
        let name = take_bytes16(&mut reader).map_err(truncated)?;
        let name = String::from_utf8(name).map_err(|_| bad("a cell name is not UTF-8"))?;
        // An export writes each cell once: a second entry would leave the store
        // two records for one save.
        if !names.insert(name.clone()) {
            return Err(bad(&format!("cell `{name}` comes twice")));
        }
        let record = take_bytes64(&mut reader).map_err(truncated)?;
        let file = take_bytes64(&mut reader).map_err(truncated)?;
        let file = (!file.is_empty()).then_some(file);
        entries.push(Imported { name, record, file });
    }
    let end = reader.stream_position().map_err(Error::io(path))?;
    if end != len.saturating_sub(4) {
        return Err(bad(&format!(
            "{} bytes follow its last entry, before the checksum",
            len.saturating_sub(4).saturating_sub(end)
        )));
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
