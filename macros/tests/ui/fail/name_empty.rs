use instastate::defstate;

defstate! {
    #[name = ""]
    X: u64 = 0;
}

fn main() {
    let _ = X.get();
}
