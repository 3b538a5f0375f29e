//! Encryption at rest (feature `encryption`).
#![cfg(feature = "encryption")]

use std::fs;

use instastate::{EncryptionKey, Error, StateCell, Store};

use crate::TestResult;

const KEY: [u8; 32] = [0x5a; 32];

fn key() -> EncryptionKey {
    EncryptionKey::from_bytes(KEY)
}

/// Every byte of every file under `dir`.
fn all_bytes(dir: &std::path::Path) -> TestResult<Vec<u8>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            out.extend(all_bytes(&entry.path())?);
        } else {
            out.extend(fs::read(entry.path())?);
        }
    }
    Ok(out)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle)
}

#[test]
fn an_encrypted_store_round_trips_and_holds_no_plaintext() -> TestResult {
    static SECRET: StateCell<String> = StateCell::new("crypt::rt::SECRET", String::new);
    static BIG: StateCell<Vec<String>> = StateCell::new("crypt::rt::BIG", Vec::new);
    let dir = tempfile::tempdir()?;
    {
        let store =
            Store::builder().cell(&SECRET).cell(&BIG).encryption_key(key()).open(dir.path())?;
        SECRET.set("attack at dawn".into());
        BIG.set((0..2_000).map(|n| format!("confidential line {n}")).collect());
        store.save_all()?;
        SECRET.set("attack at dusk".into());
        store.save_all()?;
    }
    let bytes = all_bytes(dir.path())?;
    assert!(!contains(&bytes, b"attack at"), "a small value is readable on disk");
    assert!(!contains(&bytes, b"confidential line"), "a value file is readable on disk");
    assert!(fs::read_dir(dir.path().join("values"))?.count() >= 1, "the large value has a file");

    SECRET.set(String::new());
    BIG.set(Vec::new());
    let store = Store::builder().cell(&SECRET).cell(&BIG).encryption_key(key()).open(dir.path())?;
    assert_eq!(SECRET.get(), "attack at dusk");
    assert_eq!(BIG.read().len(), 2_000);
    store.revert_to(1)?;
    assert_eq!(SECRET.get(), "attack at dawn", "history is encrypted and readable too");
    assert!(store.verify()?.is_empty());
    Ok(())
}

#[test]
fn a_wrong_or_missing_key_is_a_clear_error_and_changes_nothing() -> TestResult {
    static CELL: StateCell<u64> = StateCell::new("crypt::keys::CELL", || 0);
    let dir = tempfile::tempdir()?;
    {
        let store = Store::builder().cell(&CELL).encryption_key(key()).open(dir.path())?;
        CELL.set(41);
        store.save_all()?;
    }
    let wrong = EncryptionKey::from_bytes([0xa5; 32]);
    let err = Store::builder().cell(&CELL).encryption_key(wrong).open(dir.path()).err();
    assert!(matches!(err, Some(Error::WrongKey { .. })), "{err:?}");
    let err = Store::builder().cell(&CELL).open(dir.path()).err().ok_or("opened without key")?;
    assert!(matches!(err, Error::Encryption { encrypted: true, .. }), "{err:?}");
    assert!(err.to_string().contains("is encrypted"), "{err}");
    assert_eq!(CELL.get(), 41, "a refused open changed the cell");

    let _store = Store::builder().cell(&CELL).encryption_key(key()).open(dir.path())?;
    assert_eq!(CELL.get(), 41);
    Ok(())
}

#[test]
fn a_key_for_a_plain_store_is_refused() -> TestResult {
    static CELL: StateCell<u64> = StateCell::new("crypt::plain::CELL", || 7);
    let dir = tempfile::tempdir()?;
    {
        let store = Store::builder().cell(&CELL).open(dir.path())?;
        store.save_all()?;
    }
    let err = Store::builder().cell(&CELL).encryption_key(key()).open(dir.path()).err();
    assert!(matches!(err, Some(Error::Encryption { encrypted: false, .. })), "{err:?}");
    // A new, empty store with a key is encrypted from its first open.
    let fresh = tempfile::tempdir()?;
    drop(Store::builder().encryption_key(key()).open(fresh.path())?);
    let err = Store::builder().open(fresh.path()).err();
    assert!(matches!(err, Some(Error::Encryption { encrypted: true, .. })), "{err:?}");
    Ok(())
}

#[test]
fn a_tampered_value_file_fails_to_load() -> TestResult {
    static BIG: StateCell<Vec<u64>> = StateCell::new("crypt::tamper::BIG", Vec::new);
    let dir = tempfile::tempdir()?;
    {
        let store = Store::builder().cell(&BIG).encryption_key(key()).open(dir.path())?;
        BIG.set((0..10_000).collect());
        store.save_all()?;
    }
    let file = fs::read_dir(dir.path().join("values"))?.next().ok_or("no value file")??.path();
    let original = fs::read(&file)?;
    for offset in [0, 3, 30, original.len() / 2, original.len() - 1] {
        let mut flipped = original.clone();
        if let Some(byte) = flipped.get_mut(offset) {
            *byte ^= 0x10;
        }
        fs::write(&file, &flipped)?;
        BIG.set(Vec::new());
        let err = Store::builder().cell(&BIG).encryption_key(key()).open(dir.path()).err();
        assert!(matches!(err, Some(Error::Corrupt { .. })), "offset {offset}: {err:?}");
        assert!(BIG.read().is_empty(), "offset {offset}: a damaged value was loaded");
    }
    fs::write(&file, &original)?;
    let _store = Store::builder().cell(&BIG).encryption_key(key()).open(dir.path())?;
    assert_eq!(BIG.read().len(), 10_000);
    Ok(())
}
