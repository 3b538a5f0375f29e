//! Cells declared in nested modules are named after their module path.
#![deny(warnings)]

mod outer {
    pub mod inner {
        instastate::defstate! {
            /// Visible from the crate root.
            pub static DEEP: String = "deep".to_owned();

            #[name = "pinned"]
            pub(crate) PINNED: u8 = 9;
        }

        pub fn own_name() -> &'static str {
            DEEP.name()
        }
    }

    instastate::defstate!(pub(super) SHALLOW: i64 = -4);
}

fn main() {
    // A cell declared in a function body is named after the enclosing module.
    instastate::defstate!(LOCAL: u8 = 1);
    assert_eq!(LOCAL.name(), concat!(module_path!(), "::LOCAL"));
    assert_eq!(LOCAL.get(), 1);

    assert_eq!(outer::inner::DEEP.name(), concat!(module_path!(), "::outer::inner::DEEP"));
    assert_eq!(outer::inner::own_name(), outer::inner::DEEP.name());
    assert_eq!(outer::inner::PINNED.name(), "pinned");
    assert_eq!(outer::SHALLOW.name(), concat!(module_path!(), "::outer::SHALLOW"));

    assert_eq!(outer::inner::DEEP.get(), "deep");
    assert_eq!(outer::inner::PINNED.get(), 9);
    assert_eq!(outer::SHALLOW.get(), -4);
}
