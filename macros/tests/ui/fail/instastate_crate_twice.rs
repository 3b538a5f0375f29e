use instastate::defstate;

defstate! {
    #[instastate(crate = instastate)]
    #[instastate(crate = ::instastate)]
    X: u64 = 0;
}

fn main() {
    let _ = X.get();
}
