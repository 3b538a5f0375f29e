use instastate::defstate;

defstate! {
    #[name = "first"]
    #[name = "second"]
    X: u64 = 0;
}

fn main() {
    let _ = X.get();
}
