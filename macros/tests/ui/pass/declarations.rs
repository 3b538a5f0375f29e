//! Several declarations in one call, with everything the grammar allows.
#![deny(warnings, missing_docs)]

use instastate::defstate;

defstate! {
    /// A documented private cell without `static`.
    COUNTER: u64 = 150;

    /// A public cell with the `static` keyword.
    pub static GREETING: String = String::from("abc");

    /// A cell whose stored name is pinned.
    #[name = "theme"]
    pub(crate) static THEME: String = "dark".to_owned();

    /// A lowercase identifier, allowed by a passed-through attribute.
    #[allow(non_upper_case_globals)]
    lowercase: Vec<u8> = vec![1, 2, 3];
}

defstate!(SINGLE: (u8, bool) = (7, true));

defstate! {
    /// A trailing `;` is accepted.
    TRAILING: Option<i32> = None;
}

/// Forwards to `defstate!` through fragments, as a crate's own macro might.
macro_rules! forwarded {
    ($(#[$attr:meta])* $name:ident: $ty:ty = $init:expr) => {
        defstate!($(#[$attr])* $name: $ty = $init);
    };
}

forwarded!(
    /// Declared through `macro_rules!`.
    FORWARDED: Vec<String> = vec!["a".to_owned()]
);

fn main() {
    assert_eq!(COUNTER.name(), concat!(module_path!(), "::COUNTER"));
    assert_eq!(GREETING.name(), concat!(module_path!(), "::GREETING"));
    assert_eq!(THEME.name(), "theme");
    assert_eq!(lowercase.name(), concat!(module_path!(), "::lowercase"));
    assert_eq!(SINGLE.name(), concat!(module_path!(), "::SINGLE"));
    assert_eq!(TRAILING.name(), concat!(module_path!(), "::TRAILING"));
    assert_eq!(FORWARDED.name(), concat!(module_path!(), "::FORWARDED"));

    assert_initial_values();
    assert_eq!(FORWARDED.get(), ["a"]);

    // Every declaration above is registered for `open`, and only those.
    let store = instastate::Store::builder().registered_cells().in_memory().unwrap();
    store.save_all().unwrap();
    COUNTER.set(1);
    GREETING.set("changed".to_owned());
    THEME.set("light".to_owned());
    lowercase.set(Vec::new());
    SINGLE.set((0, false));
    TRAILING.set(Some(-1));
    store.reload_all().unwrap();
    assert_initial_values();
}

fn assert_initial_values() {
    assert_eq!(COUNTER.get(), 150);
    assert_eq!(GREETING.get(), "abc");
    assert_eq!(THEME.get(), "dark");
    assert_eq!(lowercase.get(), [1, 2, 3]);
    assert_eq!(SINGLE.get(), (7, true));
    assert_eq!(TRAILING.get(), None);
}
