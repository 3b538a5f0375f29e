//! Saves racing with writers: `atomically` blocks are never split by a snapshot.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
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
// The same names, read back in a second store after the writers stop.
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
    // Every save stays in the history, so that each one can be read back.
    let mut builder = Store::builder().keep_history(usize::MAX).history_bytes(u64::MAX).cell(count);
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

/// One save made while the writers ran: the generation it made, and the transfer
/// count seen just before and just after it.
struct Save {
    generation: u64,
    before: u64,
    after: u64,
}

/// Waits until the writers have made a transfer beyond `count`, so that the next
/// save has something to write.
fn wait_for_transfer_beyond(count: u64) -> TestResult {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TRANSFERS.get() <= count {
        if Instant::now() > deadline {
            return Err(format!("the writers made no transfer beyond {count} in 10 s").into());
        }
        thread::yield_now();
    }
    Ok(())
}

#[test]
fn every_snapshot_keeps_an_invariant_across_cells() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut saves: Vec<Save> = Vec::new();
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
            // The writers are stopped even when a save fails, or the scope would wait
            // for them forever.
            let res = (|| -> TestResult {
                for _ in 0..25 {
                    // Every save then has a transfer to write, so it makes a generation.
                    wait_for_transfer_beyond(saves.last().map_or(0, |save| save.after))?;
                    let before = TRANSFERS.get();
                    store.save_all()?;
                    let after = TRANSFERS.get();
                    saves.push(Save { generation: store.generation(), before, after });
                }
                Ok(())
            })();
            stop.store(true, Ordering::Relaxed);
            res
        })?;
    }

    // Read every save back from disk, through cells the writers never touched.
    let check = open(&CHECK, &CHECK_TRANSFERS, dir.path())?;
    let kept: Vec<u64> = check.history().iter().map(|kept| kept.number).collect();
    let made: Vec<u64> = saves.iter().map(|save| save.generation).collect();
    assert_eq!(kept, made, "the history does not hold exactly one generation per save");
    for (save_idx, save) in saves.iter().enumerate() {
        check.revert_to(save.generation)?;
        let balances: Vec<i64> = CHECK.iter().map(StateCell::get).collect();
        let transfers = CHECK_TRANSFERS.get();
        assert_eq!(
            balances.iter().sum::<i64>(),
            TOTAL,
            "save {save_idx} (generation {}) split a transfer: {balances:?}",
            save.generation
        );
        assert!(
            (save.before..=save.after).contains(&transfers),
            "save {save_idx} (generation {}) holds {transfers} transfers, \
             outside the {}..={} seen around it",
            save.generation,
            save.before,
            save.after
        );
    }
    // The invariant means something only if transfers ran during the saves.
    let overlapped = saves.iter().filter(|save| save.after > save.before).count();
    assert!(
        overlapped >= saves.len() / 4,
        "transfers ran during only {overlapped} of {} saves",
        saves.len()
    );
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
