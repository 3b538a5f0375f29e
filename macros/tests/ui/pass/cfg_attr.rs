//! `cfg_attr` that removes a cell removes its registration too, and other
//! `cfg_attr`s pass through; ctor's own item names do not shadow a cell's.

use instastate::defstate;

defstate! {
    #[cfg_attr(all(), cfg(any()))]
    REMOVED: NoSuchType = NoSuchType;
    #[cfg_attr(all(), allow(non_upper_case_globals))]
    kept: u8 = 1;
    __ctor_private_inner: u64 = 2;
}

fn main() {
    assert_eq!(kept.get(), 1);
    assert_eq!(__ctor_private_inner.get(), 2);
    let store = instastate::Store::builder().registered_cells().in_memory().unwrap();
    store.save_all().unwrap();
    drop(store);
    let names: Vec<&str> = vec![kept.name(), __ctor_private_inner.name()];
    assert!(names.iter().all(|name| name.starts_with(module_path!())));
}
