use instastate::defstate;

struct Plain {
    value: u32,
}

defstate!(X: Plain = Plain { value: 0 });

fn main() {
    let _ = X.read().value;
}
