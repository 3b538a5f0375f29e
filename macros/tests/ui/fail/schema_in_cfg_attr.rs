use instastate::defstate;

defstate! {
    #[cfg_attr(all(), version = 2)]
    X: u64 = 0;

    #[cfg_attr(all(), alias = "old")]
    Y: u64 = 0;
}

fn main() {
    let _ = (X.get(), Y.get());
}
