use instastate::defstate;

defstate! {
    #[version = "2"]
    X: u64 = 0;

    #[version(2)]
    Y: u64 = 0;

    #[version = 2u8]
    Z: u64 = 0;

    #[version = 4294967296]
    W: u64 = 0;
}

fn main() {
    let _ = (X.get(), Y.get(), Z.get(), W.get());
}
