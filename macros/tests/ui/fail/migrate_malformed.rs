use instastate::defstate;

fn from_v1(old: u32) -> u64 {
    u64::from(old)
}

defstate! {
    #[version = 2]
    #[migrate(from_v1)]
    A: u64 = 0;

    #[version = 2]
    #[migrate(1, from_v1)]
    B: u64 = 0;

    #[version = 2]
    #[migrate(1 => 5)]
    C: u64 = 0;

    #[version = 2]
    #[migrate()]
    D: u64 = 0;

    #[version = 2]
    #[migrate = "1 => from_v1"]
    E: u64 = 0;
}

fn main() {
    let _ = (A.get(), B.get(), C.get(), D.get(), E.get());
}
