//! Bad data on disk and hostile directories: each a clear, typed error that names
//! what was wrong, with nothing on disk changed.

use std::{
    fs,
    path::{Path, PathBuf},
};

use instastate::{Error, StateCell, Store};

use crate::{Immutable, TestResult};

/// Opens the engine under a store directory directly, to damage it on purpose.
///
/// sled releases its lock lazily after a store closes, so the open is retried for a
/// while, as the backend itself does.
// clippy.toml keeps `sled::open` in the backend module; these tests bypass it deliberately.
#[allow(clippy::disallowed_methods)]
pub(crate) fn engine(dir: &Path) -> TestResult<sled::Db> {
    let started = std::time::Instant::now();
    loop {
        match sled::open(dir.join("sled")) {
            Err(err) if started.elapsed() < std::time::Duration::from_secs(5) => {
                assert!(err.to_string().contains("lock"), "{err}");
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            res => return Ok(res?),
        }
    }
}

fn record_bytes(dir: &Path, name: &str) -> TestResult<Vec<u8>> {
    let db = engine(dir)?;
    let bytes = db.get(format!("cell/{name}"))?.ok_or_else(|| format!("no record for {name}"))?;
    Ok(bytes.to_vec())
}

fn put_raw(dir: &Path, key: &str, bytes: &[u8]) -> TestResult {
    let db = engine(dir)?;
    db.insert(key, bytes)?;
    db.flush()?;
    Ok(())
}

/// Encodes an inline record the way `ARCHITECTURE.md` specifies it, independently of
/// the library's own encoder.
fn inline_record(type_name: &str, body: &[u8]) -> Vec<u8> {
    let mut out = b"IS".to_vec();
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&1u32.to_be_bytes());
    out.extend_from_slice(&u16::try_from(type_name.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(type_name.as_bytes());
    out.push(0);
    out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(body);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

fn only_value_file(dir: &Path) -> TestResult<PathBuf> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir.join("values"))? {
        files.push(entry?.path());
    }
    match files.as_slice() {
        [file] => Ok(file.clone()),
        _ => Err(format!("expected one value file, found {files:?}").into()),
    }
}

#[test]
fn a_record_in_the_documented_format_loads() -> TestResult {
    static CELL: StateCell<u64> = StateCell::new("bad_input::format::CELL", || 0);
    let dir = tempfile::tempdir()?;
    put_raw(dir.path(), "cell/bad_input::format::CELL", &inline_record("u64", &[0xac, 0x02]))?;
    let _store = Store::builder().cell(&CELL).open(dir.path())?;
    assert_eq!(CELL.get(), 300);
    Ok(())
}

#[test]
fn truncated_and_flipped_records_are_reported_and_left_alone() -> TestResult {
    static CELL: StateCell<String> = StateCell::new("bad_input::record::CELL", String::new);
    let dir = tempfile::tempdir()?;
    {
        let store = Store::builder().cell(&CELL).open(dir.path())?;
        CELL.set("a value that will be damaged".into());
        store.save_all()?;
    }
    let good = record_bytes(dir.path(), CELL.name())?;
    let truncated = good.get(..good.len() - 3).ok_or("short record")?.to_vec();
    let mut flipped = good.clone();
    *flipped.get_mut(12).ok_or("short record")? ^= 0x10;

    for damaged in [truncated, flipped] {
        put_raw(dir.path(), "cell/bad_input::record::CELL", &damaged)?;
        CELL.set("in memory".into());
        let err =
            Store::builder().cell(&CELL).open(dir.path()).err().ok_or("damage went unnoticed")?;
        let Error::Corrupt { cell, path, .. } = &err else { panic!("{err:?}") };
        assert_eq!(cell, CELL.name());
        assert!(path.ends_with("sled"), "{}", path.display());
        assert!(err.to_string().contains("bad_input::record::CELL"), "{err}");
        assert_eq!(CELL.get(), "in memory", "a failed open changed the cell");
        assert_eq!(
            record_bytes(dir.path(), CELL.name())?,
            damaged,
            "a failed open rewrote the record"
        );
    }
    Ok(())
}

#[test]
fn damaged_value_files_are_reported_and_left_alone() -> TestResult {
    static BIG: StateCell<Vec<u32>> = StateCell::new("bad_input::file::BIG", Vec::new);
    let dir = tempfile::tempdir()?;
    {
        let store = Store::builder().cell(&BIG).open(dir.path())?;
        BIG.set((0..50_000).collect());
        store.save_all()?;
    }
    let file = only_value_file(dir.path())?;
    let good = fs::read(&file)?;
    let mut flipped = good.clone();
    *flipped.get_mut(good.len() / 2).ok_or("empty value file")? ^= 1;
    let truncated = good.get(..good.len() - 1).ok_or("empty value file")?.to_vec();

    for (damaged, reason) in [(flipped, "checksum"), (truncated, "bytes")] {
        fs::write(&file, &damaged)?;
        let err =
            Store::builder().cell(&BIG).open(dir.path()).err().ok_or("damage went unnoticed")?;
        let Error::Corrupt { cell, path, reason: why, .. } = &err else { panic!("{err:?}") };
        assert_eq!((cell.as_str(), path), (BIG.name(), &file));
        assert!(why.contains(reason), "{err}");
        assert_eq!(fs::read(&file)?, damaged, "a failed open changed the value file");
    }

    fs::remove_file(&file)?;
    let err = Store::builder()
        .cell(&BIG)
        .open(dir.path())
        .err()
        .ok_or("a missing file went unnoticed")?;
    let Error::Corrupt { cell, path, reason, .. } = &err else { panic!("{err:?}") };
    assert_eq!((cell.as_str(), path), (BIG.name(), &file));
    assert!(reason.contains("missing"), "{err}");

    fs::write(&file, &good)?;
    BIG.set(Vec::new());
    let _store = Store::builder().cell(&BIG).open(dir.path())?;
    assert_eq!(BIG.read().len(), 50_000);
    Ok(())
}

#[test]
fn a_changed_type_is_refused_naming_both_types() -> TestResult {
    static AS_NUMBER: StateCell<u64> = StateCell::new("bad_input::shape", || 0);
    static AS_TEXT: StateCell<String> = StateCell::new("bad_input::shape", || "default".into());
    let dir = tempfile::tempdir()?;
    {
        let store = Store::builder().cell(&AS_NUMBER).open(dir.path())?;
        AS_NUMBER.set(42);
        store.save_all()?;
    }
    let before = record_bytes(dir.path(), "bad_input::shape")?;
    let err =
        Store::builder().cell(&AS_TEXT).open(dir.path()).err().ok_or("type change accepted")?;
    let Error::TypeMismatch { cell, stored_type, expected_type, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(cell, "bad_input::shape");
    assert_eq!(stored_type, "u64");
    assert_eq!(expected_type, "alloc::string::String");
    assert_eq!(AS_TEXT.get(), "default");
    assert_eq!(record_bytes(dir.path(), "bad_input::shape")?, before);

    AS_NUMBER.set(0);
    let _store = Store::builder().cell(&AS_NUMBER).open(dir.path())?;
    assert_eq!(AS_NUMBER.get(), 42, "the stored value did not survive the refused open");
    Ok(())
}

#[test]
fn undecodable_bytes_under_the_right_type_name_are_a_decode_error() -> TestResult {
    static CELL: StateCell<(u8, String)> =
        StateCell::new("bad_input::decode::CELL", Default::default);
    let dir = tempfile::tempdir()?;
    let type_name = std::any::type_name::<(u8, String)>();
    // A string length of 200 with only 3 bytes after it.
    put_raw(
        dir.path(),
        "cell/bad_input::decode::CELL",
        &inline_record(type_name, &[1, 200, 1, 1, 1]),
    )?;
    let err = Store::builder().cell(&CELL).open(dir.path()).err().ok_or("garbage decoded")?;
    assert!(matches!(&err, Error::Decode { cell, .. } if cell == CELL.name()), "{err:?}");

    // Trailing bytes mean another type's encoding: refused rather than misread.
    put_raw(
        dir.path(),
        "cell/bad_input::decode::CELL",
        &inline_record(type_name, &[1, 1, b'x', 0]),
    )?;
    let err =
        Store::builder().cell(&CELL).open(dir.path()).err().ok_or("trailing bytes accepted")?;
    assert!(matches!(&err, Error::Decode { .. }), "{err:?}");
    Ok(())
}

#[test]
fn every_failing_cell_is_listed() -> TestResult {
    static ONE: StateCell<u8> = StateCell::new("bad_input::many::ONE", || 0);
    static TWO: StateCell<u8> = StateCell::new("bad_input::many::TWO", || 0);
    let dir = tempfile::tempdir()?;
    put_raw(dir.path(), "cell/bad_input::many::ONE", b"junk")?;
    put_raw(dir.path(), "cell/bad_input::many::TWO", &inline_record("i8", &[1]))?;
    let err = Store::builder().cell(&ONE).cell(&TWO).open(dir.path()).err().ok_or("accepted")?;
    let Error::Several(errors) = &err else { panic!("{err:?}") };
    assert!(
        matches!(errors.as_slice(), [Error::Corrupt { .. }, Error::TypeMismatch { .. }]),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(message.contains("ONE") && message.contains("TWO"), "{message}");
    Ok(())
}

#[test]
fn a_store_from_another_format_version_is_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    put_raw(dir.path(), "meta/format", &99u32.to_be_bytes())?;
    let err = Store::builder().open(dir.path()).err().ok_or("future format accepted")?;
    assert!(matches!(err, Error::FormatVersion { found: 99, expected: 3, .. }), "{err:?}");
    Ok(())
}

#[test]
fn a_locked_directory_is_refused_naming_it() -> TestResult {
    let dir = tempfile::tempdir()?;
    let first = Store::builder().open(dir.path())?;
    let err = Store::builder().open(dir.path()).err().ok_or("opened a locked store")?;
    assert!(matches!(&err, Error::Locked { path, .. } if path == dir.path()), "{err:?}");
    assert!(err.to_string().contains(&*dir.path().to_string_lossy()), "{err}");
    drop(first);
    let _again = Store::builder().open(dir.path())?;
    Ok(())
}

#[test]
fn an_unwritable_directory_is_refused_naming_the_path() -> TestResult {
    let dir = tempfile::tempdir()?;
    let target = dir.path().join("store");
    fs::create_dir(&target)?;
    let _immutable = Immutable::new(&target)?;
    let err = Store::builder().open(&target).err().ok_or("opened an unwritable directory")?;
    let Error::Io { path, .. } = &err else { panic!("{err:?}") };
    assert!(path.starts_with(&target), "{err:?}");
    assert_eq!(fs::read_dir(&target)?.count(), 0, "a failed open left files behind");
    Ok(())
}

#[test]
fn a_failed_save_poisons_the_store_and_keeps_the_last_good_save() -> TestResult {
    static BIG: StateCell<Vec<u64>> = StateCell::new("bad_input::poison::BIG", Vec::new);
    static SMALL: StateCell<u64> = StateCell::new("bad_input::poison::SMALL", || 0);
    let dir = tempfile::tempdir()?;
    let store = Store::builder().cell(&BIG).cell(&SMALL).open(dir.path())?;
    BIG.set(vec![1; 10_000]);
    SMALL.set(1);
    store.save_all()?;
    BIG.set(vec![2; 10_000]);
    SMALL.set(2);
    {
        let values = dir.path().join("values");
        let _immutable = Immutable::new(&values)?;
        let err = store.save_all().err().ok_or("saved into an unwritable directory")?;
        assert!(matches!(&err, Error::Io { path, .. } if path.starts_with(&values)), "{err:?}");
        let err = store.save_all().err().ok_or("a poisoned store saved")?;
        assert!(matches!(&err, Error::Poisoned { path, .. } if path == dir.path()), "{err:?}");
    }
    let err = store.save_all().err().ok_or("a poisoned store saved once writable again")?;
    assert!(matches!(err, Error::Poisoned { .. }), "{err:?}");
    let err = store.reload_all().err().ok_or("a poisoned store reloaded")?;
    assert!(matches!(err, Error::Poisoned { .. }), "{err:?}");
    assert_eq!((BIG.read().first(), SMALL.get()), (Some(&2), 2), "a failed save changed the cells");
    drop(store);

    let store = Store::builder().cell(&BIG).cell(&SMALL).open(dir.path())?;
    assert_eq!((BIG.read().first(), BIG.read().len(), SMALL.get()), (Some(&1), 10_000, 1));
    BIG.set(vec![3; 10]);
    store.save_all()?;
    Ok(())
}

#[test]
fn a_value_that_cannot_be_encoded_fails_the_save_without_poisoning() -> TestResult {
    #[derive(Debug, Default, serde::Deserialize)]
    struct Picky(bool);
    impl serde::Serialize for Picky {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            if self.0 {
                serializer.serialize_bool(true)
            } else {
                Err(serde::ser::Error::custom("not yet"))
            }
        }
    }
    static PICKY: StateCell<Picky> = StateCell::new("bad_input::encode::PICKY", Picky::default);
    let store = Store::builder().cell(&PICKY).in_memory()?;
    let err = store.save_all().err().ok_or("an unencodable value was saved")?;
    assert!(matches!(&err, Error::Encode { cell, .. } if cell == PICKY.name()), "{err:?}");
    PICKY.set(Picky(true));
    store.save_all()?;
    Ok(())
}

#[test]
fn a_malformed_generation_or_stray_file_id_is_an_error_not_a_panic() -> TestResult {
    let dir = tempfile::tempdir()?;
    put_raw(dir.path(), "meta/generation", &[1, 2, 3])?;
    let err = Store::builder().open(dir.path()).err().ok_or("a 3-byte generation was accepted")?;
    assert!(
        matches!(&err, Error::Corrupt { reason, .. } if reason.contains("generation")),
        "{err:?}"
    );

    let dir = tempfile::tempdir()?;
    fs::create_dir_all(dir.path().join("values"))?;
    fs::write(dir.path().join("values").join("ffffffffffffffff.val"), b"")?;
    let err =
        Store::builder().open(dir.path()).err().ok_or("an exhausted id space was accepted")?;
    assert!(matches!(&err, Error::Io { .. }), "{err:?}");
    Ok(())
}

#[test]
fn a_new_store_in_new_parent_directories_opens() -> TestResult {
    static CELL: StateCell<u8> = StateCell::new("bad_input::parents::CELL", || 7);
    let dir = tempfile::tempdir()?;
    let nested = dir.path().join("a").join("b").join("store");
    {
        let store = Store::builder().cell(&CELL).open(&nested)?;
        store.save_all()?;
    }
    CELL.set(0);
    let _store = Store::builder().cell(&CELL).open(&nested)?;
    assert_eq!(CELL.get(), 7);
    Ok(())
}

#[test]
fn an_alias_that_names_another_cell_is_refused() -> TestResult {
    static A: StateCell<u8> = StateCell::new("bad::alias::A", || 1);
    static B: StateCell<u8> = StateCell::with_options(
        "bad::alias::B",
        || 2,
        instastate::CellOptions::new().aliases(&["bad::alias::A"]),
    );
    static C: StateCell<u8> = StateCell::with_options(
        "bad::alias::C",
        || 3,
        instastate::CellOptions::new().aliases(&["bad::alias::A"]),
    );
    let err = Store::builder().cell(&A).cell(&B).in_memory().err().ok_or("accepted")?;
    assert!(
        matches!(&err, Error::DuplicateName { name, .. } if name == "bad::alias::A"),
        "{err:?}"
    );
    assert!(err.to_string().contains("as an alias"), "{err}");
    let err = Store::builder().cell(&B).cell(&C).in_memory().err().ok_or("accepted")?;
    assert!(matches!(err, Error::DuplicateName { .. }), "{err:?}");
    drop(Store::builder().cell(&B).in_memory()?);
    Ok(())
}

#[test]
fn a_damaged_old_history_entry_shortens_the_history_but_the_store_opens() -> TestResult {
    static N: StateCell<u64> = StateCell::new("bad::history::N", || 0);
    let dir = tempfile::tempdir()?;
    {
        let store = Store::builder().cell(&N).open(dir.path())?;
        for n in 1..=4 {
            N.set(n);
            store.save_all()?;
        }
    }
    {
        let db = engine(dir.path())?;
        let key = [&b"hist/"[..], &2u64.to_be_bytes()].concat();
        let mut bytes = db.get(&key)?.ok_or("no manifest for save 2")?.to_vec();
        let last = bytes.last_mut().ok_or("empty manifest")?;
        *last ^= 1;
        db.insert(key, bytes)?;
        db.flush()?;
    }
    N.set(0);
    let store = Store::builder().cell(&N).open(dir.path())?;
    assert_eq!(N.get(), 4, "the current value does not depend on the history");
    let kept: Vec<u64> = store.history().iter().map(|saved| saved.number).collect();
    assert_eq!(kept, [3, 4], "the history ends at the damaged entry");
    let problems = store.verify()?;
    assert!(
        problems.iter().any(|it| it.location == "hist/2" && it.reason.contains("checksum")),
        "{problems:?}"
    );
    // The next save deletes the damaged entry (and the older one, which it hid).
    N.set(5);
    store.save_all()?;
    assert!(store.verify()?.is_empty(), "{:?}", store.verify()?);
    Ok(())
}

#[test]
fn a_database_location_is_refused_and_never_taken_for_a_directory() -> TestResult {
    let url = "postgres://app:s3cret@127.0.0.1:1/prod?namespace=orders";
    let results = [instastate::events::RawEvents::open(url).map(drop)];
    let dir = tempfile::tempdir()?;
    let store = instastate::Store::builder().open(dir.path().join("cells"))?;
    let events = instastate::events::EventStore::<u64>::open(dir.path().join("events"))?;
    let copies =
        [store.backup_to(url), store.export_to(url), store.import_from(url), events.backup_to(url)];
    for res in results.into_iter().chain(copies) {
        let Err(instastate::Error::InvalidLocation { location, .. }) = &res else {
            return Err(format!("{res:?}").into());
        };
        assert!(!location.contains("s3cret"), "{location}");
    }
    // A store of cells, a prevalent system and an event store run on PostgreSQL
    // with the feature: here nothing listens.
    let cells = instastate::Store::builder().open(url);
    let prevalent =
        instastate::prevalence::Prevayler::open(url, 0u64, |n: &mut u64, e: u64, _| *n += e);
    let event_store = instastate::events::EventStore::<u64>::open(url);
    for res in [cells.map(drop), prevalent.map(drop), event_store.map(drop)] {
        match &res {
            Err(instastate::Error::InvalidLocation { location, .. })
                if cfg!(not(feature = "postgres")) =>
            {
                assert!(!location.contains("s3cret"), "{location}");
            }
            Err(instastate::Error::Database { location, .. }) if cfg!(feature = "postgres") => {
                assert!(!location.contains("s3cret"), "{location}");
            }
            other => return Err(format!("{other:?}").into()),
        }
    }
    assert!(!std::path::Path::new("postgres:").exists(), "a directory postgres: was made");
    Ok(())
}
