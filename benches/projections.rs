//! Checkpointed projections: how fast one folds the store's events into a cell,
//! against a plain fold of `read_all`, and how soon it applies a new event.
//!
//! Rows:
//! 1. catching up with 200,000 events from position 0, against folding `read_all`
//!    by hand (the same handler, no lock, no thread, no position);
//!    and against folding what a subscription delivers (what a projection reads);
//! 2. the same, saving the cell through its store every 1,000 events;
//! 3. a live event: from the return of its durable append to its application in the
//!    cell (`Projection::wait_for`), one append at a time.
//!
//! Run with `cargo bench --bench projections`; about ten seconds.

// A benchmark: its counts convert to floating point for rates (far below 2^52).
#![allow(clippy::cast_precision_loss)]

// Shared with the other benchmarks, which use what this one does not.
#[allow(dead_code)]
mod common;

use std::{collections::BTreeMap, time::Instant};

use instastate::{
    StateCell, Store,
    events::{Delivery, Durability, EventStore, Expected, Position, Projected, RecordedEvent},
};

use crate::common::{Res, median};

const EVENTS: u64 = 200_000;
const BATCH: u64 = 1_000;
const STREAMS: u64 = 1_000;
const RUNS: usize = 5;
const LIVE_EVENTS: usize = 300;

type Balances = BTreeMap<u64, i64>;

static BALANCES: StateCell<Projected<Balances>> =
    StateCell::new("bench::BALANCES", || Projected::new(BTreeMap::new()));
static LIVE: StateCell<Projected<Balances>> =
    StateCell::new("bench::LIVE", || Projected::new(BTreeMap::new()));

type HandlerError = Box<dyn std::error::Error + Send + Sync>;

#[allow(clippy::unnecessary_wraps)] // The shape of a projection's handler.
fn apply(balances: &mut Balances, event: &RecordedEvent<i64>) -> Result<(), HandlerError> {
    let account = event.position.get() % STREAMS;
    *balances.entry(account).or_default() += event.data;
    Ok(())
}

fn catch_up(events: &EventStore<i64>, store: Option<&Store>) -> Res<f64> {
    BALANCES.set(Projected::new(BTreeMap::new()));
    let started = Instant::now();
    let mut builder = events.projection(&BALANCES).save_every(BATCH);
    if let Some(store) = store {
        builder = builder.save_with(store);
    }
    let projection = builder.start(apply)?;
    projection.wait_for(Position::new(EVENTS))?;
    let secs = started.elapsed().as_secs_f64();
    projection.stop()?;
    Ok(secs)
}

fn fold(events: &EventStore<i64>) -> Res<f64> {
    let started = Instant::now();
    let mut balances = BTreeMap::new();
    for event in events.read_all() {
        apply(&mut balances, &event?)?;
    }
    Ok(started.elapsed().as_secs_f64())
}

fn subscribe(events: &EventStore<i64>) -> Res<f64> {
    let started = Instant::now();
    let mut balances = BTreeMap::new();
    for delivery in events.subscribe_all().from(Position::START)? {
        match delivery? {
            Delivery::Event(event) => apply(&mut balances, &event)?,
            Delivery::CaughtUp => break,
            other => return Err(format!("{other:?}").into()),
        }
    }
    Ok(started.elapsed().as_secs_f64())
}

fn main() -> Res {
    let dir = tempfile::tempdir()?;
    let events = EventStore::<i64>::builder()
        .durability(Durability::Unsynced)
        .open(dir.path().join("events"))?;
    for batch in 0..EVENTS / BATCH {
        let amounts: Vec<i64> =
            (0..BATCH).map(|k| (batch * BATCH + k).cast_signed() % 100 - 50).collect();
        events.append(&format!("s{}", batch % STREAMS), Expected::Any, amounts)?;
    }
    events.sync()?;
    let store = Store::builder().cell(&BALANCES).open(dir.path().join("cells"))?;
    let (mut folds, mut subscriptions) = (Vec::new(), Vec::new());
    let (mut projections, mut saving) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        folds.push(fold(&events)?);
        subscriptions.push(subscribe(&events)?);
        projections.push(catch_up(&events, None)?);
        saving.push(catch_up(&events, Some(&store))?);
    }
    let rate = |secs: f64| EVENTS as f64 / secs / 1e6;
    println!("catching up with {EVENTS} events (median of {RUNS}):");
    println!("  fold of read_all by hand      {:>6.2} M events/s", rate(median(&folds)));
    println!("  fold of a subscription        {:>6.2} M events/s", rate(median(&subscriptions)));
    println!("  projection                    {:>6.2} M events/s", rate(median(&projections)));
    println!("  projection, saving every {BATCH} {:>6.2} M events/s", rate(median(&saving)));

    let dir = tempfile::tempdir()?;
    let events = EventStore::<i64>::open(dir.path())?;
    let projection = events.project(&LIVE, apply)?;
    let mut lags = Vec::with_capacity(LIVE_EVENTS);
    for n in 0..LIVE_EVENTS {
        let appended = events.append("live", Expected::Any, [1])?;
        let acknowledged = Instant::now();
        projection.wait_for(Position::new(appended.positions.end))?;
        lags.push(acknowledged.elapsed().as_secs_f64() * 1e6);
        if n == 0 {
            lags.clear();
        }
    }
    lags.sort_by(f64::total_cmp);
    let p99 = lags.get(lags.len() * 99 / 100).copied().unwrap_or(f64::NAN);
    println!(
        "a live event, from its acknowledged append to its application: median {:.0} µs, p99 {p99:.0} µs",
        median(&lags)
    );
    projection.stop()?;
    Ok(())
}
