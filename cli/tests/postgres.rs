//! The `instastate` tool on a store of cells kept in PostgreSQL: the same
//! commands as on a directory, given the store's `postgres://` location, which
//! it never shows with its password.

#![cfg(feature = "postgres")]

use std::{error::Error, process::Command};

use instastate::{StateCell, Store};

#[path = "../../tests/common/postgres.rs"]
#[allow(dead_code)]
mod server;

type TestResult<T = ()> = Result<T, Box<dyn Error>>;

/// Runs the tool with `args`: its exit code and standard output.
fn instastate(args: &[&str]) -> TestResult<(Option<i32>, String)> {
    let output = Command::new(env!("CARGO_BIN_EXE_instastate")).args(args).output()?;
    let stdout = String::from_utf8(output.stdout)?;
    let stderr = String::from_utf8(output.stderr)?;
    Ok((output.status.code(), format!("{stdout}{stderr}")))
}

#[test]
fn a_store_in_postgres_is_listed_verified_exported_and_imported_by_the_tool() -> TestResult {
    static NAME: StateCell<String> = StateCell::new("cli::pg::NAME", String::new);
    static COUNT: StateCell<u64> = StateCell::new("cli::pg::COUNT", || 0);
    // A password the tool must never show (the test server trusts every user).
    let url = server::address("cli-pg").replacen("postgres@", "postgres:hunter2@", 1);
    assert!(url.contains("hunter2"), "the server's URL has no user `postgres`: {url}");
    {
        let store = Store::builder().cell(&NAME).cell(&COUNT).open(&url)?;
        NAME.set("first".into());
        COUNT.set(1);
        store.save_all()?;
        COUNT.set(2);
        store.save_all()?;
    }
    let (code, out) = instastate(&["list", &url])?;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("cli::pg::NAME") && out.contains("cli::pg::COUNT"), "{out}");
    assert!(out.contains("at save 2"), "{out}");
    assert!(!out.contains("hunter2"), "the password is shown: {out}");
    let (code, out) = instastate(&["history", &url])?;
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(out.lines().count(), 3, "two saves: {out}");
    let (code, out) = instastate(&["verify", &url])?;
    assert_eq!(code, Some(0), "{out}");

    let dir = tempfile::tempdir()?;
    let export = dir.path().join("export.json");
    let export = export.to_str().ok_or("a path that is not UTF-8")?;
    let (code, out) = instastate(&["export", &url, export])?;
    assert_eq!(code, Some(0), "{out}");
    {
        let store = Store::builder().cell(&NAME).cell(&COUNT).open(&url)?;
        COUNT.set(3);
        store.save_all()?;
    }
    let (code, out) = instastate(&["import", &url, export])?;
    assert_eq!(code, Some(0), "{out}");
    COUNT.set(0);
    let store = Store::builder().cell(&NAME).cell(&COUNT).open(&url)?;
    assert_eq!((COUNT.get(), store.generation()), (2, 4), "the import is save 4");
    drop(store);

    // A namespace without a store is refused, and not created.
    let empty = server::address("cli-pg-empty").replacen("postgres@", "postgres:hunter2@", 1);
    let (code, out) = instastate(&["list", &empty])?;
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("holds no store"), "{out}");
    let (code, out) = instastate(&["import", &empty, export])?;
    assert_eq!(code, Some(2), "{out}");
    let (code, out) = instastate(&["list", &empty])?;
    assert!(code == Some(2) && out.contains("holds no store"), "the import created it: {out}");
    assert!(!out.contains("hunter2"), "the password is shown: {out}");
    // `import --create` makes a new store in an empty namespace, and refuses one
    // that holds a store.
    let (code, out) = instastate(&["import", "--create", &empty, export])?;
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = instastate(&["import", "--create", &url, export])?;
    assert!(code == Some(2) && out.contains("already exists"), "{out}");
    assert!(!out.contains("hunter2"), "the password is shown: {out}");
    Ok(())
}
