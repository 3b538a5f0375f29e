use instastate::defstate;

fn from_v1(old: u32) -> u64 {
    u64::from(old)
}

defstate! {
    #[version = 2]
    #[migrate(0 => from_v1)]
    X: u64 = 0;
}

fn main() {
    let _ = X.get();
}
