use std::cell::Cell;

use instastate::defstate;

// `Cell<u32>` is `Serialize + Deserialize + Send`, but not `Sync`.
defstate!(X: Cell<u32> = Cell::new(0));

fn main() {
    let _ = X.read().get();
}
