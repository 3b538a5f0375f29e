use instastate::defstate;

defstate! {
    #[name = 5]
    X: u64 = 0;
}

fn main() {
    let _ = X.get();
}
