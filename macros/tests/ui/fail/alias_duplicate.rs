use instastate::defstate;

defstate! {
    #[alias = "old::X"]
    #[alias = "older::X"]
    #[alias = "old::X"]
    X: u64 = 0;

    #[alias = "pinned"]
    #[name = "pinned"]
    Y: u64 = 0;
}

fn main() {
    let _ = (X.get(), Y.get());
}
