use instastate::defstate;

defstate!(static mut X: u64 = 0);

fn main() {
    // No secondary errors: the static is still emitted.
    let _ = X.get();
}
