//! Saves racing with writers: `atomically` blocks are never split by a snapshot.

use std::{
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    thread,
};

use instastate::{StateCell, Store, atomically};

use crate::TestResult;

const TOTAL: i64 = 1000;

static ACCOUNTS: [StateCell<i64>; 4] = [
    StateCell::new("concurrency::A", || TOTAL),
    StateCell::new("concurrency::B", || 0),
    StateCell::new("concurrency::C", || 0),
    StateCell::new("concurrency::D", || 0),
];
// The same names, read back in a second store after each round.
static CHECK: [StateCell<i64>; 4] = [
    StateCell::new("concurrency::A", || i64::MIN),
    StateCell::new("concurrency::B", || i64::MIN),
    StateCell::new("concurrency::C", || i64::MIN),
    StateCell::new("concurrency::D", || i64::MIN),
];
static TRANSFERS: StateCell<u64> = StateCell::new("concurrency::TRANSFERS", || 0);
static CHECK_TRANSFERS: StateCell<u64> = StateCell::new("concurrency::TRANSFERS", || 0);

fn open(
    cells: &'static [StateCell<i64>; 4],
    count: &'static StateCell<u64>,
    dir: &std::path::Path,
) -> instastate::Result<Store> {
    let mut builder = Store::builder().cell(count);
    for cell in cells {
        builder = builder.cell(cell);
    }
    builder.open(dir)
}

/// A small xorshift generator: enough to vary the transfers, and reproducible.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn every_snapshot_keeps_an_invariant_across_cells() -> TestResult {
    let dir = tempfile::tempdir()?;
    let saves = AtomicU64::new(0);
    for round in 0..8u64 {
        let store = open(&ACCOUNTS, &TRANSFERS, dir.path())?;
        let stop = AtomicBool::new(false);
        thread::scope(|scope| -> TestResult {
            for writer in 0..3u64 {
                let stop = &stop;
                scope.spawn(move || {
                    let mut rng = (round << 8 | writer).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                    while !stop.load(Ordering::Relaxed) {
                        let from = usize::try_from(next(&mut rng) % 4).unwrap_or(0);
                        let to = usize::try_from(next(&mut rng) % 4).unwrap_or(0);
                        let amount = i64::try_from(next(&mut rng) % 50).unwrap_or(0);
                        atomically(|| {
                            if let (Some(from), Some(to)) = (ACCOUNTS.get(from), ACCOUNTS.get(to)) {
                                from.update(|balance| *balance -= amount);
                                // A pause between the two halves makes a split snapshot likely
                                // if `atomically` did not prevent it.
                                thread::yield_now();
                                to.update(|balance| *balance += amount);
                                TRANSFERS.update(|count| *count += 1);
                            }
                        });
                    }
                });
            }
            for _ in 0..25 {
                store.save_all()?;
                saves.fetch_add(1, Ordering::Relaxed);
                thread::yield_now();
            }
            stop.store(true, Ordering::Relaxed);
            Ok(())
        })?;
        drop(store);

        let check = open(&CHECK, &CHECK_TRANSFERS, dir.path())?;
        let balances: Vec<i64> = CHECK.iter().map(StateCell::get).collect();
        assert_eq!(
            balances.iter().sum::<i64>(),
            TOTAL,
            "round {round}: snapshot split a transfer: {balances:?}"
        );
        assert!(CHECK_TRANSFERS.get() > 0 || round > 0, "round {round}: no transfer was saved");
        drop(check);
    }
    assert_eq!(saves.load(Ordering::Relaxed), 200);
    Ok(())
}

#[test]
fn readers_and_writers_of_one_cell_see_whole_values() -> TestResult {
    static PAIR: StateCell<(u64, u64)> = StateCell::new("concurrency::PAIR", || (0, 0));
    let store = Store::builder().cell(&PAIR).in_memory()?;
    thread::scope(|scope| -> TestResult {
        let writer = scope.spawn(|| {
            for n in 1..=20_000u64 {
                PAIR.set((n, n * 2));
            }
        });
        for _ in 0..200 {
            store.save_all()?;
            store.reload_all()?;
            let (a, b) = PAIR.get();
            assert_eq!(b, a * 2, "a torn value was seen");
        }
        writer.join().map_err(|_| "writer panicked")?;
        Ok(())
    })?;
    Ok(())
}
