use instastate::defstate;

defstate!(X: u64 = "text");

fn main() {
    let _ = X.get();
}
