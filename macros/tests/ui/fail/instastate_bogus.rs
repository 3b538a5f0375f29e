use instastate::defstate;

defstate! {
    #[instastate(bogus)]
    X: u64 = 0;
}

fn main() {
    let _ = X.get();
}
