use instastate::defstate;

fn from_v1(old: u32) -> u64 {
    u64::from(old)
}

defstate! {
    #[migrate(1 => from_v1)]
    X: u64 = 0;

    #[version = 1]
    #[migrate(1 => from_v1)]
    Y: u64 = 0;
}

fn main() {
    let _ = (X.get(), Y.get());
}
