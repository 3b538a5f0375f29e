//! Counts its own runs: run it twice and the count goes on where it stopped.
//!
//! ```text
//! cargo run --example counter             # keeps its state in ./counter-db
//! cargo run --example counter -- /tmp/db  # or in a directory of your choice
//! ```

use instastate::defstate;

defstate! {
    /// How many times this program has run to completion.
    RUNS: u64 = 0;
    /// A counter that starts at 150 and is set to 1000 by the first run.
    COUNTER: u64 = 150;
    /// Set once, shown every time.
    pub GREETING: String = String::from("abc");
}

fn main() -> instastate::Result<()> {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "counter-db".to_owned());
    let _store = instastate::open(&dir)?; // loads every saved cell

    let runs = RUNS.update(|runs| {
        *runs += 1;
        *runs
    });
    println!("run #{runs}; state kept in `{dir}`");
    println!("COUNTER starts at {} and GREETING is {:?}", *COUNTER.read(), *GREETING.read());

    *COUNTER.write() = 1000;
    instastate::save_all()?; // one atomic, durable, consistent snapshot
    *COUNTER.write() = 7;
    instastate::reload_all()?; // revert every cell to the last save
    assert_eq!(COUNTER.get(), 1000);
    println!("after save, change and reload, COUNTER is {}", COUNTER.get());
    Ok(())
}
