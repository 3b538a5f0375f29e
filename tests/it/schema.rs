//! Schema changes: versions, migrations, aliases, and what happens without them.
//!
//! `tests/fixtures/schema-v1` was written by a program whose cells were all at
//! schema version 1, through `Store::builder().cell(..)...open(dir)` and one
//! `save_all`:
//!
//! ```text
//! struct SettingsV1 { theme: String }          // "fixture::SETTINGS" = { theme: "dark" }
//! struct Point { x: i32, y: i32 }              // "fixture::MOVED" = { x: 3, y: -4 },
//!                                              //   type `fixture_writer::Point`
//! u32                                          // "fixture::old::LIMIT" = 7
//! ```

use serde::{Deserialize, Serialize};

use instastate::{CellOptions, Error, Migration, StateCell, Store};

use crate::{TestResult, compat::copy_dir};

/// Version 2 of the settings: a field added, whose value for old saves is chosen
/// by the migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Settings {
    theme: String,
    font_size: u16,
}

#[derive(Serialize, Deserialize)]
struct SettingsV1 {
    theme: String,
}

fn settings_from_v1(old: SettingsV1) -> Settings {
    Settings { theme: old.theme, font_size: 12 }
}

/// The fixture's `Point`, which has moved to this module since.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Point {
    x: i32,
    y: i32,
}

static SETTINGS: StateCell<Settings> = StateCell::with_options(
    "fixture::SETTINGS",
    || Settings { theme: "light".into(), font_size: 10 },
    CellOptions::new().version(2).migrations(&[&Migration::new(1, settings_from_v1)]),
);
static LIMIT: StateCell<u32> = StateCell::with_options(
    "fixture::LIMIT",
    || 0,
    CellOptions::new().aliases(&["fixture::old::LIMIT"]),
);
// A moved type keeps its data through a version bump and the identity migration.
static MOVED: StateCell<Point> = StateCell::with_options(
    "fixture::MOVED",
    || Point { x: 0, y: 0 },
    CellOptions::new().version(2).migrations(&[&Migration::new(1, std::convert::identity)]),
);

fn fixture() -> TestResult<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    let from = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schema-v1");
    copy_dir(&from, dir.path())?;
    Ok(dir)
}

#[test]
fn a_store_written_by_an_older_schema_migrates_renames_and_is_rewritten() -> TestResult {
    let dir = fixture()?;
    {
        let store = Store::builder().cell(&SETTINGS).cell(&LIMIT).cell(&MOVED).open(dir.path())?;
        assert_eq!(SETTINGS.get(), Settings { theme: "dark".into(), font_size: 12 });
        assert_eq!(LIMIT.get(), 7, "the value saved under the alias was not found");
        assert_eq!(MOVED.get(), Point { x: 3, y: -4 });
        assert!(store.orphans().is_empty(), "the alias's record counts as claimed");
        assert!(store.has_unsaved_changes(), "migrated and renamed values must be rewritten");
        store.save_all()?;
        let stored = store.stored_cells();
        let names: Vec<&str> = stored.iter().map(|cell| cell.name.as_str()).collect();
        assert_eq!(names, ["fixture::LIMIT", "fixture::MOVED", "fixture::SETTINGS"]);
        assert!(stored.iter().all(|cell| cell.schema == cell_schema(&cell.name)));
        // The save that renamed and migrated is in the history, and can be undone.
        store.revert_to(1)?;
        assert_eq!(SETTINGS.get().font_size, 12, "reverting re-migrates the old value");
    }
    // The rewritten store loads without migrations.
    SETTINGS.set(Settings { theme: String::new(), font_size: 0 });
    let _store = Store::builder().cell(&SETTINGS).cell(&LIMIT).open(dir.path())?;
    assert_eq!(SETTINGS.get(), Settings { theme: "dark".into(), font_size: 12 });
    assert_eq!(LIMIT.get(), 7);
    Ok(())
}

fn cell_schema(name: &str) -> u32 {
    if name == "fixture::LIMIT" { 1 } else { 2 }
}

#[test]
fn a_value_from_a_newer_program_is_refused_and_left_alone() -> TestResult {
    static NEW: StateCell<u64> =
        StateCell::with_options("schema::newer::CELL", || 5, CellOptions::new().version(3));
    static OLD: StateCell<u64> = StateCell::new("schema::newer::CELL", || 0);
    let dir = tempfile::tempdir()?;
    {
        let store = Store::builder().cell(&NEW).open(dir.path())?;
        store.save_all()?;
    }
    let err = Store::builder().cell(&OLD).open(dir.path()).err().ok_or("loaded a newer schema")?;
    assert!(
        matches!(&err, Error::SchemaVersion { cell, found: 3, current: 1, .. } if cell == "schema::newer::CELL"),
        "{err:?}"
    );
    assert!(err.to_string().contains("newer"), "{err}");
    // Nothing was changed: the newer program still reads its value.
    NEW.set(0);
    let _store = Store::builder().cell(&NEW).open(dir.path())?;
    assert_eq!(NEW.get(), 5);
    Ok(())
}

#[test]
fn an_older_version_without_a_migration_is_refused() -> TestResult {
    static V1: StateCell<u64> = StateCell::new("schema::nomig::CELL", || 5);
    static V2: StateCell<String> =
        StateCell::with_options("schema::nomig::CELL", String::new, CellOptions::new().version(2));
    let store = Store::builder().cell(&V1).in_memory()?;
    store.save_all()?;
    drop(store);
    let dir = tempfile::tempdir()?;
    {
        let store = Store::builder().cell(&V1).open(dir.path())?;
        store.save_all()?;
    }
    let err =
        Store::builder().cell(&V2).open(dir.path()).err().ok_or("loaded without migration")?;
    assert!(matches!(err, Error::SchemaVersion { found: 1, current: 2, .. }), "{err:?}");
    assert!(err.to_string().contains("no migration from v1"), "{err}");
    Ok(())
}

/// postcard, the value encoding, is compact and not self-describing: a field added
/// without a version bump cannot be told from a damaged value, so it is refused
/// (never misread), and `#[serde(default)]` alone does not help. The evolution that
/// works is a version bump whose migration fills in the new field's default.
#[test]
fn adding_a_field_needs_a_version_bump_whose_migration_fills_the_default() -> TestResult {
    #[derive(Serialize, Deserialize, Default)]
    struct Before {
        name: String,
    }
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
    struct After {
        name: String,
        #[serde(default)]
        tags: Vec<String>,
    }
    fn after_from_before(old: Before) -> After {
        After { name: old.name, ..After::default() }
    }
    static BEFORE: StateCell<Before> =
        StateCell::new("schema::field::CELL", || Before { name: "ada".into() });
    static UNBUMPED: StateCell<After> = StateCell::new("schema::field::CELL", After::default);
    static BUMPED: StateCell<After> = StateCell::with_options(
        "schema::field::CELL",
        After::default,
        CellOptions::new().version(2).migrations(&[&Migration::new(1, after_from_before)]),
    );
    let dir = tempfile::tempdir()?;
    {
        let store = Store::builder().cell(&BEFORE).open(dir.path())?;
        store.save_all()?;
    }
    // In a real program the type keeps its path and the bytes fail to decode
    // (`Error::Decode`); here the two versions are two types, so the type check
    // refuses first. Either way nothing is misread and nothing changes.
    let err = Store::builder().cell(&UNBUMPED).open(dir.path()).err().ok_or("misread")?;
    assert!(matches!(err, Error::Decode { .. } | Error::TypeMismatch { .. }), "{err:?}");

    let _store = Store::builder().cell(&BUMPED).open(dir.path())?;
    assert_eq!(BUMPED.get(), After { name: "ada".into(), tags: Vec::new() });
    Ok(())
}

/// A migration reads the bytes of its version as its old type: a value saved as
/// another type (here `u64`, read through a migration from `i64`, where 3 would
/// come back as -2) is refused, naming the cell, the saved type and the one the
/// migration reads, and nothing changes.
#[test]
fn a_migration_whose_old_type_is_not_the_saved_one_is_refused_not_misread() -> TestResult {
    fn from_signed(old: i64) -> i64 {
        old
    }
    static SAVED: StateCell<u64> = StateCell::new("schema::wrong_old::CELL", || 3);
    static MIGRATED: StateCell<i64> = StateCell::with_options(
        "schema::wrong_old::CELL",
        || 0,
        CellOptions::new().version(2).migrations(&[&Migration::new(1, from_signed)]),
    );
    let dir = tempfile::tempdir()?;
    Store::builder().cell(&SAVED).open(dir.path())?.save_all()?;
    match Store::builder().cell(&MIGRATED).open(dir.path()) {
        Err(err @ Error::TypeMismatch { .. }) => {
            let text = err.to_string();
            for part in ["schema::wrong_old::CELL", "u64", "i64", "migration"] {
                assert!(text.contains(part), "{part} is not in: {text}");
            }
        }
        other => return Err(format!("expected TypeMismatch, got {other:?}").into()),
    }
    assert_eq!(MIGRATED.get(), 0, "nothing was installed");
    // The store still holds the saved value, for the right program.
    let _store = Store::builder().cell(&SAVED).open(dir.path())?;
    assert_eq!(SAVED.get(), 3);
    Ok(())
}

/// A migration is the program's code: its panic is an error of the open, naming
/// the cell and the version, and the store is closed again, nothing changed.
#[test]
fn a_migration_that_panics_is_an_error_of_the_open_and_changes_nothing() -> TestResult {
    fn refuse(old: u64) -> u64 {
        assert!(old == 0, "cannot migrate {old}");
        old
    }
    static SAVED: StateCell<u64> = StateCell::new("schema::panicky::CELL", || 3);
    static MIGRATED: StateCell<u64> = StateCell::with_options(
        "schema::panicky::CELL",
        || 0,
        CellOptions::new().version(2).migrations(&[&Migration::new(1, refuse)]),
    );
    let dir = tempfile::tempdir()?;
    Store::builder().cell(&SAVED).open(dir.path())?.save_all()?;
    match Store::builder().cell(&MIGRATED).open(dir.path()) {
        Err(err @ Error::MigrationPanicked { from: 1, .. }) => {
            assert!(err.to_string().contains("schema::panicky::CELL"), "{err}");
        }
        other => return Err(format!("expected MigrationPanicked, got {other:?}").into()),
    }
    assert_eq!(MIGRATED.get(), 0, "nothing was installed");
    // Closed again at once: the same process opens it.
    let store = Store::builder().cell(&SAVED).open(dir.path())?;
    assert_eq!((SAVED.get(), store.generation()), (3, 1));
    Ok(())
}

#[test]
fn a_renamed_cell_finds_its_value_under_the_old_name_and_moves_it() -> TestResult {
    static OLD_NAME: StateCell<Vec<u8>> = StateCell::new("schema::alias::old::QUEUE", Vec::new);
    static NEW_NAME: StateCell<Vec<u8>> = StateCell::with_options(
        "schema::alias::QUEUE",
        Vec::new,
        CellOptions::new().aliases(&["schema::alias::older::QUEUE", "schema::alias::old::QUEUE"]),
    );
    let dir = tempfile::tempdir()?;
    {
        let store = Store::builder().cell(&OLD_NAME).open(dir.path())?;
        OLD_NAME.set(vec![1, 2, 3]);
        store.save_all()?;
    }
    {
        let store = Store::builder().cell(&NEW_NAME).open(dir.path())?;
        assert_eq!(NEW_NAME.get(), [1, 2, 3]);
        store.save_all()?;
        let names: Vec<String> = store.stored_cells().into_iter().map(|cell| cell.name).collect();
        assert_eq!(names, ["schema::alias::QUEUE"], "the old record should be gone");
        assert_eq!(store.history().pop().ok_or("no save")?.changed.len(), 2);
    }
    NEW_NAME.set(Vec::new());
    let _store = Store::builder().cell(&NEW_NAME).open(dir.path())?;
    assert_eq!(NEW_NAME.get(), [1, 2, 3]);
    Ok(())
}
