//! A cell's type gains a field: version 1 of a program saves `Settings { theme }`,
//! version 2 reads it as `Settings { theme, font_size }` through a migration.
//!
//! ```sh
//! cargo run --example evolve
//! ```
//!
//! Both versions are in this one file (as two cells with the same stored name),
//! so one run shows the whole story: save with v1, load with v2, save again.
//!
//! postcard, the value encoding, is compact and not self-describing: a field added
//! without a version bump is refused as undecodable (never misread), even with
//! `#[serde(default)]`. So the evolution is: bump the version, and give a
//! migration from the old type that fills the new field with its default.
//!
//! The second half does the same for the events of a `Prevayler`: version 1
//! journals `Deposit { amount }`, version 2 adds a memo and reads the old events
//! through a migration (an upcaster).

use instastate::{CellOptions, Migration, Prevayler, StateCell, Store, Timestamp};
use serde::{Deserialize, Serialize};

/// The types as version 1 of the program had them.
mod v1 {
    #[derive(Debug, serde::Serialize, serde::Deserialize)]
    pub(crate) struct Settings {
        pub(crate) theme: String,
    }

    #[derive(Debug, serde::Serialize, serde::Deserialize)]
    pub(crate) struct Deposit {
        pub(crate) amount: u64,
    }
}

/// The event now: a field was added.
#[derive(Debug, Serialize, Deserialize)]
struct Deposit {
    amount: u64,
    memo: String,
}

/// Reads a version 1 event: no memo.
#[allow(clippy::needless_pass_by_value)] // A migration's signature: it owns the old value.
fn deposit_from_v1(old: v1::Deposit) -> Deposit {
    Deposit { amount: old.amount, memo: String::new() }
}

/// The system function of version 2: the state is the total, and a deposit with a
/// memo counts twice.
#[allow(clippy::needless_pass_by_value)] // A system function's signature: it owns the event.
fn apply(total: &mut u64, deposit: Deposit, _: Timestamp) {
    *total += if deposit.memo.is_empty() { deposit.amount } else { 2 * deposit.amount };
}

/// The type now: a field was added.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Settings {
    theme: String,
    font_size: u16,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings { theme: "light".into(), font_size: 12 }
    }
}

/// Reads a version 1 value: the new field takes its default.
fn from_v1(old: v1::Settings) -> Settings {
    Settings { theme: old.theme, ..Settings::default() }
}

// Version 1 of the program declared the cell like this:
static SETTINGS_V1: StateCell<v1::Settings> =
    StateCell::new("app::SETTINGS", || v1::Settings { theme: "dark".into() });

// Version 2 bumps the version and adds the migration. With `defstate!` it reads:
// `defstate!(#[name = "app::SETTINGS"] #[version = 2] #[migrate(1 => from_v1)]
//            SETTINGS: Settings = Settings::default());`
static SETTINGS: StateCell<Settings> = StateCell::with_options(
    "app::SETTINGS",
    Settings::default,
    CellOptions::new().version(2).migrations(&[&Migration::new(1, from_v1)]),
);

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;

    // Version 1 of the program runs and saves.
    {
        let store = Store::builder().cell(&SETTINGS_V1).open(dir.path())?;
        store.save_all()?;
        println!("v1 saved   {:?}", *SETTINGS_V1.read());
    }

    // Version 2 of the program opens the same store.
    let store = Store::builder().cell(&SETTINGS).open(dir.path())?;
    println!("v2 loaded  {:?}  (migrated from v1)", SETTINGS.get());
    let stored = store.stored_cells();
    let before = stored.first().map_or(0, |cell| cell.schema);
    SETTINGS.update(|settings| settings.font_size = 14);
    store.save_all()?;
    let after = store.stored_cells().first().map_or(0, |cell| cell.schema);
    println!("v2 saved   {:?}  (stored schema v{before} -> v{after})", SETTINGS.get());

    // Version 1 of a prevalent system journals two deposits.
    let journal = dir.path().join("bank");
    {
        let bank = Prevayler::open(&journal, 0u64, |total: &mut u64, d: v1::Deposit, _| {
            *total += d.amount;
        })?;
        bank.handle(v1::Deposit { amount: 5 })?;
        bank.handle(v1::Deposit { amount: 7 })?;
        println!("v1 journal {} events", bank.events());
    }
    // Version 2 bumps the events' version and reads the old ones through the migration;
    // its new events are journaled as version 2, in a new journal file.
    let bank = Prevayler::builder()
        .event_version(2)
        .migrate_event(1, deposit_from_v1)
        .open(&journal, 0, apply)?;
    bank.handle(Deposit { amount: 1, memo: "tip".into() })?;
    bank.read(|total| println!("v2 total   {total}  (2 events upcast from v1, 1 of v2)"));
    Ok(())
}
