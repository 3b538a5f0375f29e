//! The global store behind `instastate::open`, `save_all` and `reload_all`.
//!
//! This is the only test in this binary that uses the global store, and the
//! `defstate!` cells below are the only registered ones, so it runs in parallel
//! with the rest.

use instastate::{Error, defstate};

use crate::TestResult;

defstate! {
    /// A counter, as in the README.
    COUNTER: u64 = 150;
    pub(crate) GREETING: String = String::from("abc");
    #[name = "global::pinned"]
    static PINNED: Vec<u8> = vec![1, 2, 3];
}

#[test]
fn the_global_store_loads_saves_reloads_and_closes() -> TestResult {
    assert!(matches!(instastate::save_all(), Err(Error::NotOpen)));
    assert!(matches!(instastate::reload_all(), Err(Error::NotOpen)));
    assert_eq!(COUNTER.name(), concat!(module_path!(), "::COUNTER"));
    assert_eq!(PINNED.name(), "global::pinned");

    let dir = tempfile::tempdir()?;
    {
        let store = instastate::open(dir.path())?;
        let again = instastate::open(dir.path()).err().ok_or("opened the global store twice")?;
        assert!(
            matches!(&again, Error::AlreadyOpen { path, .. } if path == dir.path()),
            "{again:?}"
        );
        assert_eq!(*COUNTER.read(), 150);
        assert_eq!(GREETING.get(), "abc");
        *COUNTER.write() = 1000;
        instastate::save_all()?;
        *COUNTER.write() = 7;
        PINNED.write().clear();
        instastate::reload_all()?;
        assert_eq!(COUNTER.get(), 1000);
        assert_eq!(PINNED.get(), [1, 2, 3]);
        assert!(store.orphans().is_empty());
    }
    assert!(
        matches!(instastate::save_all(), Err(Error::NotOpen)),
        "dropping the store did not close it"
    );

    COUNTER.set(0);
    let _store = instastate::open(dir.path())?;
    assert_eq!(COUNTER.get(), 1000);
    Ok(())
}
