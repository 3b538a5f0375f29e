use instastate::defstate;

defstate! {
    #[version = 0]
    X: u64 = 0;
}

fn main() {
    let _ = X.get();
}
