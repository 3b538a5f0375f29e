use instastate::defstate;

defstate! {
    #[version = 2]
    #[version = 3]
    X: u64 = 0;
}

fn main() {
    let _ = X.get();
}
