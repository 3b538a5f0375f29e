//! Measures how big a store's directory gets under a save loop: the history is
//! pruned and sled reuses its log, so the size levels off instead of growing with
//! the number of saves.
//!
//! ```sh
//! cargo run --release --example growth            # 100,000 saves
//! cargo run --release --example growth -- 20000   # fewer
//! ```
//!
//! Every save is durable (fsynced), so the run takes as long as the disk needs
//! for that many fsyncs.

use std::{
    error::Error,
    fs,
    path::Path,
    time::{Duration, Instant},
};

use instastate::{StateCell, Store};

static COUNTER: StateCell<u64> = StateCell::new("growth::COUNTER", || 0);

fn main() -> Result<(), Box<dyn Error>> {
    let saves: u64 = match std::env::args().nth(1) {
        Some(arg) => arg.parse()?,
        None => 100_000,
    };
    let dir = tempfile::tempdir()?;
    let store = Store::builder().cell(&COUNTER).open(dir.path())?;
    let started = Instant::now();
    let mut largest = 0;
    let mut report = saves / 10;
    println!("{:>9}  {:>12}  {:>12}  {:>8}", "saves", "dir size", "largest yet", "elapsed");
    for save in 1..=saves {
        COUNTER.set(save);
        store.save_all()?;
        // Sampling the size on every save would dominate the run; every 100th
        // save still catches sled's log between its segment reclaims.
        if save % 100 == 0 || save == saves {
            largest = largest.max(dir_size(dir.path())?);
        }
        if save == report || save == saves {
            let size = dir_size(dir.path())?;
            println!(
                "{save:>9}  {:>12}  {:>12}  {:>7.1}s",
                kib(size),
                kib(largest),
                started.elapsed().as_secs_f64()
            );
            report += saves / 10;
        }
    }
    let per_save = started.elapsed() / u32::try_from(saves).unwrap_or(u32::MAX);
    println!(
        "history kept: {} saves; {:?} per durable save",
        store.history().len(),
        round(per_save)
    );
    Ok(())
}

fn dir_size(path: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(path)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() { dir_size(&entry.path())? } else { meta.len() };
    }
    Ok(total)
}

fn kib(bytes: u64) -> String {
    format!("{}.{} KiB", bytes / 1024, bytes % 1024 * 10 / 1024)
}

fn round(duration: Duration) -> Duration {
    Duration::from_micros(u64::try_from(duration.as_micros()).unwrap_or(u64::MAX))
}
