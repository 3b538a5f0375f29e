//! Value files: large encoded values, one file each, outside the storage engine.
//!
//! A value larger than [`INLINE_MAX`] is streamed straight from the cell into a new
//! file while it is encoded, so a save never holds a second copy of a large state in
//! memory. The file is fsynced before the record that points at it is committed, and
//! the file it replaces is deleted only after that commit; files that no record
//! points at are leftovers of an interrupted save and are deleted on open.

use std::{
    collections::BTreeSet,
    io::{self, Read, Write},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use crate::{
    codec::{self, INLINE_MAX},
    crypt::{FileSealer, Sealer},
    io::{Io, IoFile, Open},
    lockfile::Access,
};

const EXTENSION: &str = "val";
// Spilled values are written in chunks of this size, which also bounds the memory a
// save of a large value needs beyond the value itself.
const CHUNK: usize = 256 * 1024;

/// The directory of value files of one store.
#[derive(Debug)]
pub(crate) struct ValueDir {
    path: PathBuf,
    next_id: AtomicU64,
    io: Io,
}

/// Why a value file could not be read back.
#[derive(Debug)]
pub(crate) enum ReadFault {
    Io(io::Error),
    Length { expected: u64, found: u64 },
    Checksum,
}

impl ValueDir {
    /// Opens the value directory `path`, and picks ids above every file in it; to
    /// change it, creating it if missing (its creation is durable once the caller
    /// syncs the directory holding it).
    pub(crate) fn open(io: &Io, path: PathBuf, access: Access) -> io::Result<ValueDir> {
        if access == Access::ReadWrite {
            io.create_dir(&path)?;
        }
        let max_id = list_ids(io, &path)?.last().copied().unwrap_or(0);
        let next_id = max_id.checked_add(1).ok_or_else(|| {
            io::Error::other(format!("value file id {max_id:016x} leaves no id for new files"))
        })?;
        Ok(ValueDir { path, next_id: AtomicU64::new(next_id), io: io.clone() })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn file_path(&self, id: u64) -> PathBuf {
        self.path.join(format!("{id:016x}.{EXTENSION}"))
    }

    /// Reads value file `id` and checks it against its record's length and checksum.
    pub(crate) fn read(&self, id: u64, len: u64, crc: u32) -> Result<Vec<u8>, ReadFault> {
        // The length is checked before reading, so a damaged record cannot make us
        // read a huge file into memory for nothing.
        let mut file = self.open_checked(id, len)?;
        let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
        file.read_to_end(&mut bytes).map_err(ReadFault::Io)?;
        if codec::checksum(&bytes) != crc {
            return Err(ReadFault::Checksum);
        }
        Ok(bytes)
    }

    /// Checks that value file `id` is there and holds its record's length, without
    /// reading it.
    pub(crate) fn check_len(&self, id: u64, len: u64) -> Result<(), ReadFault> {
        self.open_checked(id, len).map(drop)
    }

    /// Opens value file `id`, checked against its record's length.
    fn open_checked(&self, id: u64, len: u64) -> Result<IoFile, ReadFault> {
        let file = self.io.open(&self.file_path(id), Open::Read).map_err(ReadFault::Io)?;
        let found = file.len().map_err(ReadFault::Io)?;
        if found != len {
            return Err(ReadFault::Length { expected: len, found });
        }
        Ok(file)
    }

    /// Makes the creation and removal of value files durable.
    pub(crate) fn sync(&self) -> io::Result<()> {
        self.io.sync_dir(&self.path)
    }

    /// The ids of every value file, sorted.
    pub(crate) fn ids(&self) -> io::Result<Vec<u64>> {
        list_ids(&self.io, &self.path)
    }

    /// Deletes value file `id`; a file already gone is not an error.
    pub(crate) fn remove(&self, id: u64) -> io::Result<()> {
        match self.io.remove_file(&self.file_path(id)) {
            Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
            _ => Ok(()),
        }
    }

    /// Deletes every value file whose id is not in `keep`.
    pub(crate) fn remove_all_but(&self, keep: &BTreeSet<u64>) -> io::Result<()> {
        for id in self.ids()? {
            if !keep.contains(&id) {
                self.remove(id)?;
            }
        }
        Ok(())
    }

    fn create(&self) -> io::Result<(u64, IoFile)> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let file = self.io.open(&self.file_path(id), Open::CreateNew)?;
        Ok((id, file))
    }
}

fn list_ids(io: &Io, path: &Path) -> io::Result<Vec<u64>> {
    let mut ids = Vec::new();
    for entry in io.read_dir(path)? {
        let name = entry.name;
        let id = name
            .to_str()
            .and_then(|name| name.strip_suffix(EXTENSION)?.strip_suffix('.'))
            .and_then(|hex| u64::from_str_radix(hex, 16).ok());
        ids.extend(id);
    }
    ids.sort_unstable();
    Ok(ids)
}

/// Where an encoded value ended up.
#[derive(Debug)]
pub(crate) enum Encoded {
    Inline(Vec<u8>),
    File(Spilled),
}

impl Encoded {
    pub(crate) fn spilled(&self) -> Option<&Spilled> {
        match self {
            Encoded::Inline(_) => None,
            Encoded::File(spilled) => Some(spilled),
        }
    }
}

/// A value file written but not yet fsynced.
#[derive(Debug)]
pub(crate) struct Spilled {
    pub(crate) id: u64,
    pub(crate) len: u64,
    pub(crate) crc: u32,
    file: IoFile,
}

impl Spilled {
    pub(crate) fn sync(&self) -> io::Result<()> {
        self.file.sync_all()
    }
}

/// The writer a cell encodes into: memory for small values, a new value file for
/// large ones when the store has a [`ValueDir`].
pub(crate) struct ValueWriter<'a> {
    dir: Option<&'a ValueDir>,
    buf: Vec<u8>,
    file: Option<(u64, IoFile)>,
    hasher: crc32fast::Hasher,
    len: u64,
    // Seal the file's chunks in an encrypted store; the cell's name is the
    // associated data. Made when the file is, so unspilled values cost nothing.
    sealer: &'a Sealer,
    name: &'a str,
    chunks: Option<FileSealer>,
    // postcard turns every I/O error into `SerializeBufferFull`, so the real one is
    // kept here and reported instead.
    error: Option<io::Error>,
}

impl<'a> ValueWriter<'a> {
    /// A writer for the value of the cell named `name`, which spills into `dir`
    /// (if any), sealed by `sealer`.
    pub(crate) fn new(
        dir: Option<&'a ValueDir>,
        sealer: &'a Sealer,
        name: &'a str,
    ) -> ValueWriter<'a> {
        ValueWriter {
            dir,
            buf: Vec::new(),
            file: None,
            hasher: crc32fast::Hasher::new(),
            len: 0,
            sealer,
            name,
            chunks: None,
            error: None,
        }
    }

    /// Takes the I/O error that made encoding fail, if that is what happened.
    pub(crate) fn take_error(&mut self) -> Option<io::Error> {
        self.error.take()
    }

    /// The id of the value file this writer created, if any, so that a failed save
    /// can delete it.
    pub(crate) fn file_id(&self) -> Option<u64> {
        self.file.as_ref().map(|(id, _)| *id)
    }

    /// Finishes the value: small values stay in memory, large ones are completed on disk.
    pub(crate) fn finish(mut self) -> io::Result<Encoded> {
        let Some(dir) = self.dir else {
            return Ok(Encoded::Inline(self.buf));
        };
        if self.file.is_none() && self.buf.len() <= INLINE_MAX {
            return Ok(Encoded::Inline(self.buf));
        }
        self.spill(dir, true)?;
        let (id, file) = self.file.take().ok_or_else(|| io::Error::other("value file vanished"))?;
        Ok(Encoded::File(Spilled { id, len: self.len, crc: self.hasher.finalize(), file }))
    }

    /// Writes the buffer to the value file, creating it first if needed; `last` for
    /// the final write.
    fn spill(&mut self, dir: &ValueDir, last: bool) -> io::Result<()> {
        if self.file.is_none() {
            let created = dir.create()?;
            let file = &mut self.file.insert(created).1;
            self.chunks = self.sealer.file_sealer(&codec::cell_key(self.name));
            if let Some(chunks) = &self.chunks {
                let header = chunks.header();
                file.write_all(&header)?;
                self.hasher.update(&header);
                self.len += header.len() as u64;
            }
        }
        let Some((_, file)) = &mut self.file else { return Ok(()) };
        let sealed;
        let bytes = match &mut self.chunks {
            Some(chunks) => {
                sealed = chunks.chunk(&self.buf, last)?;
                &sealed
            }
            None => &self.buf,
        };
        file.write_all(bytes)?;
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
        self.buf.clear();
        Ok(())
    }
}

impl ValueWriter<'_> {
    #[cold]
    #[inline(never)]
    fn write_and_spill(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        if let Some(dir) = self.dir
            && CHUNK <= self.buf.len()
            && let Err(err) = self.spill(dir, false)
        {
            let kind = err.kind();
            self.error = Some(err);
            return Err(kind.into());
        }
        Ok(bytes.len())
    }
}

impl Write for ValueWriter<'_> {
    // postcard writes values a byte or a field at a time, so this fast path must
    // inline into the encoder: a call per byte made large saves 3x slower.
    #[inline]
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        if self.buf.len() + bytes.len() < CHUNK || self.dir.is_none() {
            self.buf.extend_from_slice(bytes);
            return Ok(bytes.len());
        }
        self.write_and_spill(bytes)
    }

    #[inline]
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.write(bytes).map(drop)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_all(writer: &mut ValueWriter<'_>, total: usize) {
        let chunk = [7u8; 1000];
        let mut left = total;
        while 0 < left {
            let n = left.min(chunk.len());
            writer
                .write_all(chunk.get(..n).unwrap_or_default())
                .expect("writing to memory or a temp dir");
            left -= n;
        }
    }

    #[test]
    fn small_values_stay_inline_and_large_ones_spill() -> io::Result<()> {
        let plain = Sealer::default();
        let tmp = tempfile::tempdir()?;
        let dir = ValueDir::open(&Io::default(), tmp.path().join("values"), Access::ReadWrite)?;
        let mut small = ValueWriter::new(Some(&dir), &plain, "test");
        write_all(&mut small, INLINE_MAX);
        assert!(matches!(small.finish()?, Encoded::Inline(bytes) if bytes.len() == INLINE_MAX));

        let mut large = ValueWriter::new(Some(&dir), &plain, "test");
        write_all(&mut large, 3 * CHUNK + 5);
        let Encoded::File(spilled) = large.finish()? else { panic!("a large value stayed inline") };
        spilled.sync()?;
        assert_eq!(spilled.len, 3 * CHUNK as u64 + 5);
        let bytes = dir
            .read(spilled.id, spilled.len, spilled.crc)
            .map_err(|err| io::Error::other(format!("{err:?}")))?;
        assert_eq!(bytes.len(), 3 * CHUNK + 5);
        assert!(matches!(
            dir.read(spilled.id, spilled.len, spilled.crc ^ 1),
            Err(ReadFault::Checksum)
        ));
        assert!(matches!(dir.read(spilled.id, 1, spilled.crc), Err(ReadFault::Length { .. })));
        Ok(())
    }

    #[test]
    fn without_a_dir_everything_stays_inline() -> io::Result<()> {
        let plain = Sealer::default();
        let mut writer = ValueWriter::new(None, &plain, "test");
        write_all(&mut writer, 2 * CHUNK);
        assert!(matches!(writer.finish()?, Encoded::Inline(bytes) if bytes.len() == 2 * CHUNK));
        Ok(())
    }

    #[test]
    fn ids_continue_after_existing_files_and_unreferenced_ones_go() -> io::Result<()> {
        let tmp = tempfile::tempdir()?;
        let dir = ValueDir::open(&Io::default(), tmp.path().to_path_buf(), Access::ReadWrite)?;
        let (first, _) = dir.create()?;
        let (second, _) = dir.create()?;
        std::fs::write(tmp.path().join("unrelated.txt"), b"kept")?;
        let reopened = ValueDir::open(&Io::default(), tmp.path().to_path_buf(), Access::ReadWrite)?;
        let (third, _) = reopened.create()?;
        assert!(first < second && second < third);
        reopened.remove_all_but(&BTreeSet::from([second]))?;
        assert_eq!(list_ids(&Io::default(), tmp.path())?, [second]);
        assert!(tmp.path().join("unrelated.txt").exists());
        Ok(())
    }
}
