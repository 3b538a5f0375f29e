use instastate::defstate;

defstate! {
    #[alias = ""]
    X: u64 = 0;

    #[alias]
    Y: u64 = 0;
}

fn main() {
    let _ = (X.get(), Y.get());
}
