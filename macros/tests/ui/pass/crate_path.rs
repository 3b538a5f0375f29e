//! A crate that re-exports instastate points the macro at the re-export.
#![deny(warnings)]

mod my_reexport {
    pub use instastate::*;
}

// Not imported under the name `instastate`, so the default path would not be
// what resolves here: the generated code must use the given path.
use my_reexport::defstate;

defstate! {
    #[instastate(crate = my_reexport)]
    VIA_REEXPORT: u16 = 16;

    #[instastate(crate = crate::my_reexport)]
    #[name = "absolute"]
    ABSOLUTE: u16 = 17;

    #[instastate(crate = ::instastate)]
    DIRECT: u16 = 18;
}

fn main() {
    assert_eq!(VIA_REEXPORT.name(), concat!(module_path!(), "::VIA_REEXPORT"));
    assert_eq!(ABSOLUTE.name(), "absolute");
    assert_eq!(DIRECT.name(), concat!(module_path!(), "::DIRECT"));
    assert_eq!(VIA_REEXPORT.get(), 16);
    assert_eq!(ABSOLUTE.get(), 17);
    assert_eq!(DIRECT.get(), 18);

    let store = my_reexport::Store::builder().registered_cells().in_memory().unwrap();
    store.save_all().unwrap();
    VIA_REEXPORT.set(0);
    ABSOLUTE.set(0);
    DIRECT.set(0);
    store.reload_all().unwrap();
    assert_eq!((VIA_REEXPORT.get(), ABSOLUTE.get(), DIRECT.get()), (16, 17, 18));
}
