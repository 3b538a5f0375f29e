use instastate::defstate;

struct Plain;

defstate! {
    GOOD: u64 = 0;
    BAD: Plain = Plain;
}

fn main() {
    let _ = GOOD.get();
}
