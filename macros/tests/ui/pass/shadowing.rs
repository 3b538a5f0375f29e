//! Names in the user's code that the generated code could shadow, or be shadowed by.
#![deny(warnings)]

use std::borrow::Cow;

use instastate::defstate;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
struct Value(u8);

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[allow(non_camel_case_types)]
struct Value_(u8);

defstate! {
    /// A type named like the trait the macro checks types with.
    NAMED_VALUE: Value = Value(1);

    /// Both names the check could use.
    BOTH: (Value, Value_) = (Value(2), Value_(3));

    /// Cells named like the generated items.
    #[allow(non_upper_case_globals)]
    instastate: u8 = 4;

    #[allow(non_upper_case_globals)]
    __instastate_register: u8 = 5;

    /// An elided lifetime, which is `'static` in a `static`.
    TEXT: Cow<str> = Cow::Borrowed("text");

    /// A deprecated cell: its registration does not use it with a warning.
    #[deprecated = "use another cell"]
    OLD: u8 = 6;
}

fn main() {
    assert_eq!(NAMED_VALUE.get(), Value(1));
    assert_eq!(BOTH.get(), (Value(2), Value_(3)));
    assert_eq!(instastate.get(), 4);
    assert_eq!(instastate.name(), concat!(module_path!(), "::instastate"));
    assert_eq!(__instastate_register.get(), 5);
    assert_eq!(TEXT.get(), "text");
    #[allow(deprecated)]
    let old = OLD.get();
    assert_eq!(old, 6);

    // Every cell above is registered, and only those.
    let dir = tempfile::tempdir().unwrap();
    let store = instastate::Store::builder().registered_cells().open(dir.path()).unwrap();
    store.save_all().unwrap();
    drop(store);
    let store = instastate::Store::builder().open(dir.path()).unwrap();
    let mut names = store.orphans();
    names.sort();
    let prefix = concat!(module_path!(), "::");
    let expected = ["BOTH", "NAMED_VALUE", "OLD", "TEXT", "__instastate_register", "instastate"];
    assert_eq!(names, expected.map(|name| format!("{prefix}{name}")));
}
