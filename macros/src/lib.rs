//! Implementation detail of [instastate](https://docs.rs/instastate): the
//! `defstate!` macro. Depend on `instastate`, which re-exports it, not on this crate.

#![forbid(unsafe_code)]

mod expand;
mod parse;
mod validate;

use proc_macro::TokenStream;

/// Declares state cells; see the `instastate` crate's documentation.
///
/// Each declaration is `attributes visibility static? IDENT: TYPE = INIT`, and
/// several are separated by `;`. The cell is a `static` `StateCell<TYPE>`,
/// registered before `main` for `instastate::open`.
///
/// # Attributes
///
/// Attributes other than these are passed through to the `static`.
/// None of these may be inside `cfg_attr`.
///
/// - `#[name = "..."]`: the name the cell's value is stored under.
///   By default it is the module path and the identifier, which change when the
///   static is moved or renamed.
/// - `#[version = N]`: the schema version of the cell's type, an integer of at
///   least 1; 1 by default.
///   Bump it when the type changes in a way serde cannot absorb.
///   A value saved by a newer version is refused, and left as it is.
/// - `#[migrate(OLD => function, ...)]`: how values saved by older versions are
///   read.
///   Each `function` is a path to a `fn(Old) -> TYPE`, where `Old` is the type as
///   version `OLD` saved it; `Old` is taken from the function's parameter.
///   Each `OLD` is at least 1, below the cell's version, and given once; list every
///   migration in one `#[migrate]`, which needs a `#[version]` above 1.
///   A migration goes straight from its version to the current type.
/// - `#[alias = "..."]`: an older name of the cell, to load its value from when
///   nothing is saved under the current name; the value is saved under the current
///   name at the next save.
///   Repeat it for several older names.
/// - `#[journaled]`: the cell's type implements `instastate::Prevalent`, and the cell
///   changes through `CELL.handle(event)`, every event journaled before it is
///   applied; its store keeps it in a journal of its own.
/// - `#[instastate(crate = path)]`: where the `instastate` crate is, for crates that
///   re-export it.
///
/// # Example
///
/// Version 1 of a program saved the theme alone, in a cell then named
/// `app::config::SETTINGS`; version 2 keeps a struct under a new name.
///
/// ```
/// use instastate::defstate;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// struct Settings {
///     theme: String,
///     font_size: u16,
/// }
///
/// /// Reads a value saved by version 1.
/// fn from_v1(theme: String) -> Settings {
///     Settings { theme, font_size: 12 }
/// }
///
/// defstate! {
///     #[name = "app::SETTINGS"]
///     #[version = 2]
///     #[migrate(1 => from_v1)]
///     #[alias = "app::config::SETTINGS"]
///     pub SETTINGS: Settings = Settings { theme: "light".to_owned(), font_size: 12 };
/// }
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("db");
/// # {
/// #     // What version 1 of the program declared and saved.
/// #     static OLD: instastate::StateCell<String> =
/// #         instastate::StateCell::new("app::config::SETTINGS", String::new);
/// #     let store = instastate::Store::builder().cell(&OLD).open(&path)?;
/// #     OLD.set("dark".to_owned());
/// #     store.save_all()?;
/// # }
/// // The store holds the theme that version 1 saved as `app::config::SETTINGS`.
/// let store = instastate::Store::builder().cell(&SETTINGS).open(&path)?;
/// assert_eq!(SETTINGS.get(), Settings { theme: "dark".to_owned(), font_size: 12 });
/// store.save_all()?; // now saved as `app::SETTINGS`, at version 2
/// # Ok(())
/// # }
/// ```
#[proc_macro]
pub fn defstate(input: TokenStream) -> TokenStream {
    let decls = syn::parse_macro_input!(input as parse::Decls);
    expand::expand(decls).into()
}
