//! `#[version]`, `#[migrate]` and `#[alias]`: a cell whose type and name changed
//! reads the value an older program saved.
#![deny(warnings)]

use instastate::{StateCell, Store, defstate};
use serde::{Deserialize, Serialize};

/// The settings as version 2 stores them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Settings {
    theme: String,
    font_size: u16,
}

/// Version 1 was a bare theme name.
fn from_v1(theme: String) -> Settings {
    Settings { theme, font_size: 12 }
}

mod migrations {
    /// Version 2 was a theme and a font size.
    pub(crate) fn from_v2((theme, font_size): (String, u16)) -> super::Settings {
        super::Settings { theme, font_size }
    }
}

defstate! {
    /// Attributes in any order, beside `#[name]` and passed-through ones.
    #[alias = "app::config::SETTINGS"]
    #[migrate(1 => from_v1, 2 => self::migrations::from_v2,)]
    #[name = "app::SETTINGS"]
    #[alias = "app::old::SETTINGS"]
    #[version = 3]
    #[allow(dead_code)]
    static SETTINGS: Settings = Settings { theme: "light".to_owned(), font_size: 10 };

    /// Each attribute on its own.
    #[version = 2u32]
    ONLY_VERSION: u8 = 0;

    #[alias = "OLD_ONLY_ALIAS"]
    ONLY_ALIAS: u8 = 0;

    /// A migration through a qualified path.
    #[version = 2]
    #[migrate(1 => <u64 as ::core::convert::From<u32>>::from)]
    WIDENED: u64 = 0;
}

/// What version 1 of the program declared.
static OLD_SETTINGS: StateCell<String> = StateCell::new("app::config::SETTINGS", String::new);

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("db");
    {
        let store = Store::builder().cell(&OLD_SETTINGS).open(&path)?;
        OLD_SETTINGS.set("dark".to_owned());
        store.save_all()?;
    }
    let store = Store::builder().cell(&SETTINGS).open(&path)?;
    assert_eq!(SETTINGS.name(), "app::SETTINGS");
    assert_eq!(SETTINGS.get(), Settings { theme: "dark".to_owned(), font_size: 12 });
    store.save_all()?;
    assert_eq!(u64::from(ONLY_VERSION.get() + ONLY_ALIAS.get()) + WIDENED.get(), 0);
    Ok(())
}
