use instastate::defstate;

fn from_v1(old: u32) -> u64 {
    u64::from(old)
}

defstate! {
    #[version = 3]
    #[migrate(1 => from_v1)]
    #[migrate(2 => from_v1)]
    X: u64 = 0;
}

fn main() {
    let _ = X.get();
}
