use instastate::defstate;

mod old {
    pub fn returns_other_type(old: u32) -> u32 {
        old
    }

    pub fn takes_two(a: u32, b: u32) -> u64 {
        u64::from(a + b)
    }
}

struct NotDeserialize;

fn from_plain(_: NotDeserialize) -> u64 {
    0
}

defstate! {
    #[version = 4]
    #[migrate(1 => old::returns_other_type, 2 => old::takes_two, 3 => from_plain)]
    X: u64 = 0;
}

fn main() {
    let _ = X.get();
}
