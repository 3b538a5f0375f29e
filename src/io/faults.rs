//! The durability claims, tested through the simulator: a power loss at every call
//! of a workload loses nothing acknowledged; every sync of ours is needed (skip it,
//! and some power loss after it loses acknowledged data or leaves a directory that
//! does not open); and a failure of any call is a typed error, poisons what it must,
//! and leaves a directory that opens with the last acknowledged data.
//!
//! Each test declares its own cells (statics inside the test function), so that
//! tests running in parallel share nothing.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use super::{
    Io, Op,
    sim::{Fault, Sim},
};
use crate::{
    Error, Prevayler, StateCell, Store,
    events::{EventStore, Expected},
    prevalence::Durability,
};

type TestResult<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

/// How many ways of reordering unsynced changes a search for harm tries at each
/// point of power loss.
const SEEDS: u64 = 6;

/// A directory for one run: the store or journal under `root`, which the simulator
/// models, and `out`, where a power loss puts what survives.
struct Run {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    out: PathBuf,
    sim: Arc<Sim>,
}

impl Run {
    fn new() -> TestResult<Run> {
        let tmp = tempfile::tempdir()?;
        let root = tmp.path().join("root");
        std::fs::create_dir(&root)?;
        let sim = Sim::new(&root)?;
        let out = tmp.path().join("out");
        Ok(Run { root, out, sim, _tmp: tmp })
    }

    fn io(&self) -> Io {
        Io::simulated(Arc::clone(&self.sim))
    }

    /// What survives the power loss: the one that came during the workload, or one
    /// just after it ended.
    fn survivor(&self, name: &str) -> TestResult<PathBuf> {
        if !self.sim.crashed() {
            self.sim.power_loss(&self.out)?;
        }
        Ok(self.out.join(name))
    }
}

/// What is wrong with a directory after a run, if anything: the harm a missing sync
/// would do.
type Harm = Option<String>;

// ---------------------------------------------------------------------------------
// The store
// ---------------------------------------------------------------------------------

/// The store workload: three saves of a small cell and a large one (a value file),
/// each save `n` writing `n` into both. Returns the last save acknowledged.
fn save_three(
    io: Io,
    dir: &Path,
    small: &'static StateCell<u64>,
    large: &'static StateCell<Vec<u64>>,
) -> u64 {
    let Ok(store) = Store::builder().cell(small).cell(large).io(io).open(dir) else { return 0 };
    let mut acked = 0;
    for n in 1..=3 {
        small.set(n);
        large.set(vec![n; 2_000]);
        if store.save_all().is_err() {
            break;
        }
        acked = n;
    }
    acked
}

/// Opens the store in `dir` for real and checks that it holds one whole save, no
/// older than `acked`.
fn check_store(
    dir: &Path,
    acked: u64,
    small: &'static StateCell<u64>,
    large: &'static StateCell<Vec<u64>>,
) -> Harm {
    small.set(0);
    large.set(Vec::new());
    let store = match Store::builder().cell(small).cell(large).open(dir) {
        Ok(store) => store,
        Err(err) => return Some(format!("the store does not open: {err}")),
    };
    let n = small.get();
    let whole = if n == 0 { large.read().is_empty() } else { *large.read() == vec![n; 2_000] };
    drop(store);
    if !whole {
        return Some(format!("the cells hold a mix of saves (small is {n})"));
    }
    (n < acked).then(|| format!("save {acked} was acknowledged, the store holds save {n}"))
}

#[test]
fn a_power_loss_at_any_call_of_a_save_loses_nothing_acknowledged() -> TestResult {
    static SMALL: StateCell<u64> = StateCell::new("faults::power::SMALL", || 0);
    static LARGE: StateCell<Vec<u64>> = StateCell::new("faults::power::LARGE", Vec::new);
    let calls = {
        let run = Run::new()?;
        save_three(run.io(), &run.root.join("store"), &SMALL, &LARGE);
        run.sim.calls()
    };
    assert!(calls > 20, "the workload made only {calls} calls");
    for call in 1..=calls + 1 {
        let run = Run::new()?;
        run.sim.seed(call);
        run.sim.crash_at(call, &run.out);
        let acked = save_three(run.io(), &run.root.join("store"), &SMALL, &LARGE);
        if let Some(harm) = check_store(&run.survivor("store")?, acked, &SMALL, &LARGE) {
            return Err(format!("power loss at call {call} of {calls}: {harm}").into());
        }
    }
    eprintln!("store: a power loss at each of {} calls, every one whole", calls + 1);
    Ok(())
}

#[test]
fn every_sync_of_a_save_is_needed() -> TestResult {
    static SMALL: StateCell<u64> = StateCell::new("faults::needed::SMALL", || 0);
    static LARGE: StateCell<Vec<u64>> = StateCell::new("faults::needed::LARGE", Vec::new);
    let (syncs, calls) = {
        let run = Run::new()?;
        save_three(run.io(), &run.root.join("store"), &SMALL, &LARGE);
        (run.sim.syncs(), run.sim.calls())
    };
    let mut unneeded = Vec::new();
    for sync in 1..=syncs {
        // Where this sync is, and whether it is one of ours (the engine's own files
        // are taken as they are on disk, so skipping their sync shows nothing).
        let (path, from) = {
            let run = Run::new()?;
            run.sim.skip_sync(sync);
            save_three(run.io(), &run.root.join("store"), &SMALL, &LARGE);
            let Some((call, path)) = run.sim.skipped() else { continue };
            (path, call)
        };
        if path.components().any(|it| it.as_os_str() == "sled") {
            continue;
        }
        // The witness's sync after a save guards against the engine losing a save
        // it had made durable (damage, which the corruption sweep covers), not
        // against a power loss: the witness may lag one save behind.
        if path.file_name().is_some_and(|name| name == "witness") {
            continue;
        }
        let mut harmed = false;
        'search: for call in from + 1..=calls + 1 {
            for seed in 0..SEEDS {
                let run = Run::new()?;
                run.sim.skip_sync(sync);
                run.sim.seed(call * SEEDS + seed);
                run.sim.crash_at(call, &run.out);
                let acked = save_three(run.io(), &run.root.join("store"), &SMALL, &LARGE);
                if check_store(&run.survivor("store")?, acked, &SMALL, &LARGE).is_some() {
                    harmed = true;
                    break 'search;
                }
            }
        }
        if !harmed {
            unneeded.push(path);
        }
    }
    assert!(unneeded.is_empty(), "skipping these syncs harmed nothing: {unneeded:?}");
    eprintln!(
        "store: each of {syncs} syncs skipped, then power losses: each of ours is needed \
         (the engine's own and the witness's are not judged)"
    );
    Ok(())
}

#[test]
fn a_failed_call_of_a_save_is_a_typed_error_that_poisons_and_loses_nothing() -> TestResult {
    static SMALL: StateCell<u64> = StateCell::new("faults::fail::SMALL", || 0);
    static LARGE: StateCell<Vec<u64>> = StateCell::new("faults::fail::LARGE", Vec::new);
    let calls = {
        let run = Run::new()?;
        save_three(run.io(), &run.root.join("store"), &SMALL, &LARGE);
        run.sim.calls()
    };
    let mut fired = 0;
    for nth in 1..=calls {
        for no_space in [false, true] {
            let run = Run::new()?;
            run.sim.fail(Fault { nth, ops: Vec::new(), no_space, sticky: false });
            let dir = run.root.join("store");
            let mut acked = 0;
            if let Ok(store) = Store::builder().cell(&SMALL).cell(&LARGE).io(run.io()).open(&dir) {
                for n in 1..=3 {
                    SMALL.set(n);
                    LARGE.set(vec![n; 2_000]);
                    match store.save_all() {
                        Ok(()) => acked = n,
                        Err(err) => {
                            // A failed save poisons the store: no later save may go on
                            // as if the failed one had not happened.
                            let again = store.save_all();
                            if !matches!(again, Err(Error::Poisoned { .. })) {
                                return Err(format!(
                                    "call {nth} failed a save ({err}), and the next save gave {again:?}"
                                )
                                .into());
                            }
                            break;
                        }
                    }
                }
            }
            if run.sim.fired().is_empty() {
                continue;
            }
            if let Some(harm) = check_store(&dir, acked, &SMALL, &LARGE) {
                return Err(format!("failing call {nth} ({:?}): {harm}", run.sim.fired()).into());
            }
            fired += 1;
        }
    }
    eprintln!(
        "store: {fired} failed calls (EIO, ENOSPC): none lost a save, each failed save poisoned"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------
// The journal
// ---------------------------------------------------------------------------------

/// The system function of the journal workloads: a running sum.
fn add(total: &mut u64, n: u64, _: crate::Timestamp) -> u64 {
    *total += n;
    *total
}

/// Handles events 1, 2, ... 12 in two sessions (the journal closed and opened again
/// after the 6th), with a snapshot after every 4th, keeping one (so that each
/// retires the one before and the journal before it); returns how many were
/// acknowledged.
fn handle_twelve(io: &Io, sim: &Sim, dir: &Path, durability: Durability) -> u64 {
    let mut acked = 0;
    for session in [1..=6, 7..=12] {
        // Time passes between the sessions: the kernel writes back what the first
        // left unsynced.
        if session.start() > &1 && !sim.crashed() && sim.writeback().is_err() {
            return acked;
        }
        let builder = Prevayler::builder().durability(durability).keep_snapshots(1).io(io.clone());
        let Ok(sum) = builder.open(dir, 0u64, add) else { return acked };
        for n in session {
            if sum.handle(n).is_err() {
                return acked;
            }
            acked = n;
            if n.is_multiple_of(4) && sum.snapshot().is_err() {
                return acked;
            }
        }
    }
    acked
}

/// Opens the journal in `dir` for real and checks that it holds the first `n`
/// events for some `n` no smaller than `acked`.
fn check_sum(dir: &Path, acked: u64) -> Harm {
    let sum = match Prevayler::open(dir, 0u64, add) {
        Ok(sum) => sum,
        Err(err) => return Some(format!("the journal does not open: {err}")),
    };
    let (total, events) = (sum.read(|total| *total), sum.events());
    if total != events * (events + 1) / 2 {
        return Some(format!("{events} events give a sum of {total}"));
    }
    (events < acked).then(|| format!("{acked} events were acknowledged, {events} came back"))
}

#[test]
fn a_power_loss_at_any_call_of_a_journal_loses_no_acknowledged_event() -> TestResult {
    for durability in [Durability::SyncEach, Durability::GroupCommit] {
        let calls = {
            let run = Run::new()?;
            handle_twelve(&run.io(), &run.sim, &run.root.join("journal"), durability);
            run.sim.calls()
        };
        for call in 1..=calls + 1 {
            let run = Run::new()?;
            run.sim.seed(call);
            run.sim.crash_at(call, &run.out);
            let acked = handle_twelve(&run.io(), &run.sim, &run.root.join("journal"), durability);
            if let Some(harm) = check_sum(&run.survivor("journal")?, acked) {
                return Err(format!("{durability:?}, power loss at call {call}: {harm}").into());
            }
        }
        eprintln!(
            "journal ({durability:?}): a power loss at each of {} calls, no event lost",
            calls + 1
        );
    }
    Ok(())
}

/// The journal workload of an upgrade: events 1 to 6 handled by version 1 of the
/// program (a snapshot after the 4th), closed, then 7 to 12 by version 2, whose
/// events are of schema version 2 and which reads version 1 through a migration:
/// it goes on in a new journal file. Returns how many were acknowledged.
fn handle_twelve_upgrading(io: &Io, sim: &Sim, dir: &Path) -> u64 {
    let mut acked = 0;
    for version in [1, 2] {
        if version == 2 && !sim.crashed() && sim.writeback().is_err() {
            return acked;
        }
        let builder = Prevayler::builder().keep_snapshots(1).io(io.clone());
        let opened = if version == 1 {
            builder.open(dir, 0u64, add)
        } else {
            builder.event_version(2).migrate_event(1, |n: u64| n).open(dir, 0u64, add)
        };
        let Ok(sum) = opened else { return acked };
        for n in (version - 1) * 6 + 1..=version * 6 {
            if sum.handle(n).is_err() {
                return acked;
            }
            acked = n;
            if n == 4 && sum.snapshot().is_err() {
                return acked;
            }
        }
    }
    acked
}

#[test]
fn a_power_loss_at_any_call_of_an_upgrade_loses_nothing_and_the_journal_opens() -> TestResult {
    let calls = {
        let run = Run::new()?;
        handle_twelve_upgrading(&run.io(), &run.sim, &run.root.join("journal"));
        run.sim.calls()
    };
    for call in 1..=calls + 1 {
        let run = Run::new()?;
        run.sim.seed(call);
        run.sim.crash_at(call, &run.out);
        let acked = handle_twelve_upgrading(&run.io(), &run.sim, &run.root.join("journal"));
        let dir = run.survivor("journal")?;
        let opened = Prevayler::builder()
            .event_version(2)
            .migrate_event(1, |n: u64| n)
            .open(&dir, 0u64, add);
        let harm = match opened {
            Err(err) => Some(format!("the journal does not open: {err}")),
            Ok(sum) => {
                let (total, events) = (sum.read(|total| *total), sum.events());
                if total == events * (events + 1) / 2 && acked <= events {
                    None
                } else {
                    Some(format!("{events} events give {total}, {acked} were acknowledged"))
                }
            }
        };
        if let Some(harm) = harm {
            return Err(format!("power loss at call {call}: {harm}").into());
        }
    }
    eprintln!("journal upgrade: a power loss at each of {} calls, no event lost", calls + 1);
    Ok(())
}

#[test]
fn every_sync_of_a_journal_is_needed() -> TestResult {
    let (syncs, calls) = {
        let run = Run::new()?;
        handle_twelve(&run.io(), &run.sim, &run.root.join("journal"), Durability::SyncEach);
        (run.sim.syncs(), run.sim.calls())
    };
    let mut unneeded = Vec::new();
    for sync in 1..=syncs {
        let (path, from) = {
            let run = Run::new()?;
            run.sim.skip_sync(sync);
            handle_twelve(&run.io(), &run.sim, &run.root.join("journal"), Durability::SyncEach);
            let Some((call, path)) = run.sim.skipped() else { continue };
            (path, call)
        };
        let mut harmed = false;
        'search: for call in from + 1..=calls + 1 {
            for seed in 0..SEEDS {
                let run = Run::new()?;
                run.sim.skip_sync(sync);
                run.sim.seed(call * SEEDS + seed);
                run.sim.crash_at(call, &run.out);
                let acked = handle_twelve(
                    &run.io(),
                    &run.sim,
                    &run.root.join("journal"),
                    Durability::SyncEach,
                );
                if check_sum(&run.survivor("journal")?, acked).is_some() {
                    harmed = true;
                    break 'search;
                }
            }
        }
        if !harmed {
            unneeded.push((sync, path));
        }
    }
    assert!(unneeded.is_empty(), "skipping these syncs harmed nothing: {unneeded:?}");
    eprintln!("journal: each of {syncs} syncs skipped, then power losses: each is needed");
    Ok(())
}

#[test]
fn a_failed_journal_call_poisons_the_journal_and_loses_nothing() -> TestResult {
    let calls = {
        let run = Run::new()?;
        handle_twelve(&run.io(), &run.sim, &run.root.join("journal"), Durability::SyncEach);
        run.sim.calls()
    };
    let mut fired = 0;
    for nth in 1..=calls {
        let run = Run::new()?;
        run.sim.fail(Fault { nth, ops: Vec::new(), no_space: false, sticky: false });
        let dir = run.root.join("journal");
        let mut acked = 0;
        let builder = Prevayler::builder().keep_snapshots(1).io(run.io());
        if let Ok(sum) = builder.open(&dir, 0u64, add) {
            for n in 1..=12 {
                match sum.handle(n) {
                    Ok(_) => acked = n,
                    Err(err) => {
                        let again = sum.handle(n);
                        if !matches!(again, Err(Error::Poisoned { .. })) {
                            return Err(format!(
                                "call {nth} failed event {n} ({err}); the next one gave {again:?}"
                            )
                            .into());
                        }
                        break;
                    }
                }
                // A failed snapshot leaves the journal whole and usable.
                if n.is_multiple_of(4) {
                    let _ = sum.snapshot();
                }
            }
        }
        if run.sim.fired().is_empty() {
            continue;
        }
        if let Some(harm) = check_sum(&dir, acked) {
            return Err(format!("failing call {nth} ({:?}): {harm}", run.sim.fired()).into());
        }
        fired += 1;
    }
    eprintln!("journal: {fired} failed calls: none lost an event, each failed write poisoned");
    Ok(())
}

#[test]
fn the_simulator_counts_the_calls_it_fails() -> TestResult {
    let run = Run::new()?;
    run.sim.fail(Fault { nth: 1, ops: vec![Op::Sync], no_space: false, sticky: true });
    let res = Prevayler::builder().io(run.io()).open(run.root.join("journal"), 0u64, add);
    assert!(res.is_err(), "a journal opened on a disk whose every sync fails");
    assert!(!run.sim.fired().is_empty());
    Ok(())
}

// ---------------------------------------------------------------------------------
// The event store
// ---------------------------------------------------------------------------------

/// Appends the events 1 to 12 through `io`, one per append, to two streams, with a
/// checkpoint after the sixth; returns how many were acknowledged.
fn append_twelve(io: &Io, dir: &Path, durability: Durability) -> u64 {
    let builder = EventStore::<u64>::builder().durability(durability).checkpoint_every(u64::MAX);
    let Ok(events) = builder.io(io.clone()).open(dir) else { return 0 };
    let mut acked = 0;
    for n in 1..=12 {
        let stream = if n % 2 == 0 { "even" } else { "odd" };
        if events.append(stream, Expected::Any, [n]).is_err() {
            break;
        }
        acked = n;
        if n == 6 && events.checkpoint().is_err() {
            break;
        }
    }
    acked
}

/// What is wrong with the event store in `dir` after `acked` events were
/// acknowledged, if anything: it must open and hold the events 1 to n, n at least
/// `acked`, at positions 0 to n - 1, each stream's versions without a gap.
fn check_events(dir: &Path, acked: u64) -> Option<String> {
    let events = match EventStore::<u64>::open(dir) {
        Ok(events) => events,
        Err(err) => return Some(format!("the store does not open: {err}")),
    };
    let all = match events.read_all().into_iter().collect::<crate::Result<Vec<_>>>() {
        Ok(all) => all,
        Err(err) => return Some(format!("the store cannot be read: {err}")),
    };
    let mut versions = std::collections::BTreeMap::<String, u64>::new();
    for (k, event) in all.iter().enumerate() {
        let version = versions.entry(event.stream.clone()).or_default();
        if event.data != k as u64 + 1
            || event.position.get() != k as u64
            || event.version != *version
        {
            return Some(format!("event {k} is {event:?}"));
        }
        *version += 1;
    }
    let n = all.len() as u64;
    (n < acked).then(|| format!("{acked} events were acknowledged, {n} came back"))
}

#[test]
fn a_power_loss_at_any_call_of_an_event_store_loses_no_acknowledged_event() -> TestResult {
    for durability in [Durability::SyncEach, Durability::GroupCommit] {
        let calls = {
            let run = Run::new()?;
            append_twelve(&run.io(), &run.root.join("events"), durability);
            run.sim.calls()
        };
        for call in 1..=calls + 1 {
            let run = Run::new()?;
            run.sim.seed(call);
            run.sim.crash_at(call, &run.out);
            let acked = append_twelve(&run.io(), &run.root.join("events"), durability);
            if let Some(harm) = check_events(&run.survivor("events")?, acked) {
                return Err(format!("{durability:?}, power loss at call {call}: {harm}").into());
            }
        }
        eprintln!(
            "events ({durability:?}): a power loss at each of {} calls, no event lost",
            calls + 1
        );
    }
    Ok(())
}

#[test]
fn a_failed_event_store_call_is_an_error_that_poisons_and_loses_nothing() -> TestResult {
    let calls = {
        let run = Run::new()?;
        append_twelve(&run.io(), &run.root.join("events"), Durability::SyncEach);
        run.sim.calls()
    };
    let mut fired = 0;
    for nth in 1..=calls {
        let run = Run::new()?;
        run.sim.fail(Fault { nth, ops: Vec::new(), no_space: false, sticky: false });
        let dir = run.root.join("events");
        let mut acked = 0;
        let builder = EventStore::<u64>::builder().checkpoint_every(u64::MAX).io(run.io());
        if let Ok(events) = builder.open(&dir) {
            for n in 1..=12 {
                match events.append("all", Expected::Any, [n]) {
                    Ok(_) => acked = n,
                    Err(err) => {
                        let again = events.append("all", Expected::Any, [n]);
                        if !matches!(again, Err(Error::Poisoned { .. })) {
                            return Err(format!(
                                "call {nth} failed append {n} ({err}); the next one gave {again:?}"
                            )
                            .into());
                        }
                        break;
                    }
                }
                // A failed checkpoint leaves the store whole and usable.
                if n == 6 {
                    let _ = events.checkpoint();
                }
            }
        }
        if run.sim.fired().is_empty() {
            continue;
        }
        if let Some(harm) = check_events(&dir, acked) {
            return Err(format!("failing call {nth} ({:?}): {harm}", run.sim.fired()).into());
        }
        fired += 1;
    }
    eprintln!("events: {fired} failed calls: none lost an event, each failed append poisoned");
    Ok(())
}

/// How many of `steps` succeed, one after the other, until one fails.
fn acknowledged(steps: &[&dyn Fn() -> crate::Result<()>]) -> u64 {
    steps.iter().take_while(|step| step().is_ok()).count() as u64
}

/// Removes and marks through `io`: three appends, a soft delete, an effect, a
/// truncation, an append, a tombstone; returns how many steps were acknowledged.
fn remove_and_mark(io: &Io, dir: &Path) -> u64 {
    let builder = EventStore::<u64>::builder().checkpoint_every(u64::MAX);
    let Ok(events) = builder.io(io.clone()).open(dir) else { return 0 };
    let steps: [&dyn Fn() -> crate::Result<()>; 8] = [
        &|| events.append("a", Expected::NoStream, [1]).map(drop),
        &|| events.append("b", Expected::NoStream, [2]).map(drop),
        &|| events.append("a", Expected::Exact(0), [3]).map(drop),
        &|| events.delete_stream("a", Expected::Exact(1)),
        &|| events.append_effect("t", "r"),
        &|| events.truncate_stream("b", 1),
        &|| events.append("b", Expected::Exact(0), [4]).map(drop),
        &|| events.tombstone_stream("c", Expected::NoStream),
    ];
    acknowledged(&steps)
}

/// What is wrong with the store in `dir` after `acked` steps of
/// [`remove_and_mark`] were acknowledged, if anything.
fn check_removed(dir: &Path, acked: u64) -> Option<String> {
    let events = match EventStore::<u64>::open(dir) {
        Ok(events) => events,
        Err(err) => return Some(format!("the store does not open: {err}")),
    };
    let read = |stream: &str| -> crate::Result<Vec<(u64, u64)>> {
        events
            .read_stream(stream)
            .into_iter()
            .map(|it| it.map(|it| (it.version, it.data)))
            .collect()
    };
    let (a, b) = match (read("a"), read("b")) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(err), _) | (_, Err(err)) => return Some(format!("the store cannot be read: {err}")),
    };
    let effects = events.subscribe_all().from_end().map(|_| ());
    let c = events.append("c", Expected::Any, [9]);
    let holds = [
        (1, !a.is_empty() || acked >= 4),
        (2, !b.is_empty() || acked >= 6),
        (3, a.len() == 2 || acked >= 4),
        (4, a.is_empty()),
        (5, effects.is_ok()),
        (6, b.first().is_none_or(|(version, _)| *version >= 1)),
        (7, b.contains(&(1, 4))),
        (8, matches!(c, Err(Error::StreamTombstoned { .. }))),
    ];
    holds.iter().find(|(step, holds)| *step <= acked && !holds).map(|(step, _)| {
        format!("step {step} was acknowledged and is not there: a {a:?}, b {b:?}, c {c:?}")
    })
}

#[test]
fn a_power_loss_at_any_call_of_deletes_and_effects_loses_none_acknowledged() -> TestResult {
    let calls = {
        let run = Run::new()?;
        remove_and_mark(&run.io(), &run.root.join("events"));
        run.sim.calls()
    };
    for call in 1..=calls + 1 {
        let run = Run::new()?;
        run.sim.seed(call);
        run.sim.crash_at(call, &run.out);
        let acked = remove_and_mark(&run.io(), &run.root.join("events"));
        if let Some(harm) = check_removed(&run.survivor("events")?, acked) {
            return Err(format!("power loss at call {call}: {harm}").into());
        }
    }
    eprintln!("deletes and effects: a power loss at each of {} calls, none lost", calls + 1);
    Ok(())
}

/// Seals, forgets and seals again through `io`; returns how many steps were
/// acknowledged.
#[cfg(feature = "encryption")]
fn seal_and_forget(io: &Io, dir: &Path) -> u64 {
    use crate::events::Sealed;
    let builder = EventStore::<Sealed<u64>>::builder().checkpoint_every(u64::MAX);
    let Ok(events) = builder.io(io.clone()).open(dir) else { return 0 };
    let steps: [&dyn Fn() -> crate::Result<()>; 4] = [
        &|| events.append("s", Expected::Any, [Sealed::new("ann", 1)]).map(drop),
        &|| events.append("s", Expected::Any, [Sealed::new("bob", 2)]).map(drop),
        &|| events.forget_subject("ann"),
        &|| events.append("s", Expected::Any, [Sealed::new("ann", 3)]).map(drop),
    ];
    acknowledged(&steps)
}

/// What is wrong with the store in `dir` after `seal_and_forget` acknowledged
/// `acked` steps, if anything: it must open and read what was acknowledged (a
/// forget acknowledged is kept; a step not acknowledged may be there too).
#[cfg(feature = "encryption")]
fn check_sealed(dir: &Path, acked: u64) -> Option<String> {
    use crate::events::Sealed;
    let events = match EventStore::<Sealed<u64>>::open(dir) {
        Ok(events) => events,
        Err(err) => return Some(format!("the store does not open: {err}")),
    };
    let read: crate::Result<Vec<Option<u64>>> =
        events.read_all().into_iter().map(|it| it.map(|it| it.data.value().copied())).collect();
    let read = match read {
        Ok(read) => read,
        Err(err) => return Some(format!("the store cannot be read: {err}")),
    };
    let expected: &[Option<u64>] = match acked {
        0 => &[],
        1 => &[Some(1)],
        2 => &[Some(1), Some(2)],
        3 => &[None, Some(2)],
        _ => &[None, Some(2), Some(3)],
    };
    let kept = read.get(..expected.len()).is_some_and(|it| it == expected)
        || (acked == 2 && read.first() == Some(&None));
    (!kept).then(|| format!("read {read:?}"))
}

#[cfg(feature = "encryption")]
#[test]
fn a_power_loss_at_any_call_of_sealing_and_forgetting_loses_nothing_and_forgets() -> TestResult {
    let calls = {
        let run = Run::new()?;
        seal_and_forget(&run.io(), &run.root.join("events"));
        run.sim.calls()
    };
    for call in 1..=calls + 1 {
        let run = Run::new()?;
        run.sim.seed(call);
        run.sim.crash_at(call, &run.out);
        let acked = seal_and_forget(&run.io(), &run.root.join("events"));
        let dir = run.survivor("events")?;
        if let Some(harm) = check_sealed(&dir, acked) {
            return Err(format!("power loss at call {call}, {acked} acknowledged: {harm}").into());
        }
    }
    eprintln!("sealing and forgetting: a power loss at each of {} calls, none lost", calls + 1);
    Ok(())
}

/// A failed call while sealing and forgetting, then a clean close: the store
/// opens again and reads what was acknowledged, with the keys it used. (The
/// simulator fails a call whole; a key record written in part, as a full disk
/// can leave, is written away by the close, which no test here reaches.)
#[cfg(feature = "encryption")]
#[test]
fn a_failed_call_while_sealing_leaves_a_store_that_opens_and_reads_what_was_acknowledged()
-> TestResult {
    let calls = {
        let run = Run::new()?;
        seal_and_forget(&run.io(), &run.root.join("events"));
        run.sim.calls()
    };
    let mut fired = 0;
    for nth in 1..=calls {
        let run = Run::new()?;
        run.sim.fail(Fault { nth, ops: Vec::new(), no_space: false, sticky: false });
        let dir = run.root.join("events");
        let acked = seal_and_forget(&run.io(), &dir);
        let failed = run.sim.fired();
        if failed.is_empty() {
            continue;
        }
        fired += 1;
        if let Some(harm) = check_sealed(&dir, acked) {
            let failed = format!("failing call {nth} ({failed:?}), {acked} acknowledged");
            return Err(format!("{failed}: {harm}").into());
        }
    }
    eprintln!("sealing and forgetting: {fired} failed calls, each store opens and reads");
    Ok(())
}

// ---------------------------------------------------------------------------------
// The event store's compaction// ---------------------------------------------------------------------------------
// The event store's compaction
// ---------------------------------------------------------------------------------

/// What the reads of an event store give: every event of `$all` (stream, version,
/// position, data), then each stream's events read backward.
type Contents = (Vec<(String, u64, u64, u64)>, Vec<Vec<u64>>);

const COMPACTED_STREAMS: [&str; 5] = ["kept", "deleted", "truncated", "counted", "gone"];

fn contents(events: &EventStore<u64>) -> crate::Result<Contents> {
    let all = events
        .read_all()
        .into_iter()
        .map(|it| it.map(|it| (it.stream, it.version, it.position.get(), it.data)))
        // What a test appended after the compaction.
        .filter(|it| !it.as_ref().is_ok_and(|it| it.0 == "later"))
        .collect::<crate::Result<_>>()?;
    let mut streams = Vec::new();
    for stream in COMPACTED_STREAMS.iter().filter(|it| **it != "gone") {
        let read = events.read_stream(stream).backward().into_iter();
        streams.push(read.map(|it| it.map(|it| it.data)).collect::<crate::Result<_>>()?);
    }
    Ok((all, streams))
}

/// Builds, for real, a store in `dir` with events removed every way over three
/// journal files (the last one holding one event); returns what its reads give.
fn removed_everywhere(dir: &Path) -> TestResult<Contents> {
    let events = EventStore::<u64>::builder().durability(Durability::Unsynced).open(dir)?;
    for round in 0..2 {
        for (k, stream) in COMPACTED_STREAMS.iter().enumerate() {
            events.append(stream, Expected::Any, [round * 10 + k as u64, 100 + k as u64])?;
        }
        events.checkpoint()?;
    }
    events.delete_stream("deleted", Expected::Any)?;
    events.append("deleted", Expected::Any, [7])?;
    events.truncate_stream("truncated", 3)?;
    events.tombstone_stream("gone", Expected::Any)?;
    events.set_retention("counted", crate::events::Retention::default().max_count(1))?;
    events.checkpoint()?;
    events.append("kept", Expected::Any, [99])?;
    let contents = contents(&events)?;
    events.close()?;
    Ok(contents)
}

/// Opens the store in `dir` through `io` and compacts it; whether the compaction
/// was acknowledged.
fn compact_once(io: &Io, dir: &Path, durability: Durability) -> bool {
    let builder = EventStore::<u64>::builder().durability(durability).io(io.clone());
    let Ok(events) = builder.open(dir) else { return false };
    events.compact().is_ok_and(|it| 0 < it.events_dropped)
}

/// What is wrong with the store in `dir` after a compaction that was stopped or
/// failed, if anything: it must open for real and read as `expected`, and a
/// compaction of it must finish (with nothing left to drop if the first one was
/// `acked`), read the same, and leave a store that verifies.
fn check_compacted(dir: &Path, expected: &Contents, acked: bool) -> Harm {
    let check = || -> crate::Result<Option<String>> {
        let found = contents(&EventStore::<u64>::open(dir)?)?;
        if found != *expected {
            return Ok(Some(format!("it reads {found:?}, not {expected:?}")));
        }
        // A checkpoint that the power loss cut (written unsynced until something
        // relies on it, and passed over by opening) is reported, as after any
        // checkpoint: the journal must verify, its dropped data of removed events
        // only.
        let verified = crate::events::RawEvents::builder().verify(dir)?;
        let mut problems = verified.problems;
        problems.retain(|it| it.path.extension().is_none_or(|it| it != "snap"));
        if !problems.is_empty() {
            return Ok(Some(format!("it does not verify: {problems:?}")));
        }
        let events = EventStore::<u64>::open(dir)?;
        let again = events.compact()?;
        if acked && again.events_dropped != 0 {
            return Ok(Some(format!("an acknowledged compaction left {again:?} to do")));
        }
        if contents(&events)? != *expected {
            return Ok(Some("a compaction after changed its reads".into()));
        }
        drop(events);
        if contents(&EventStore::<u64>::open(dir)?)? != *expected {
            return Ok(Some("it reads otherwise once reopened".into()));
        }
        Ok(None)
    };
    check().unwrap_or_else(|err| Some(format!("it fails: {err}")))
}

#[test]
fn a_power_loss_at_any_call_of_a_compaction_loses_no_event() -> TestResult {
    // In the buffered modes, the removals compaction acts on (and the truncations
    // it journals) may still be in the journal's buffer.
    for durability in [Durability::SyncEach, Durability::Unsynced] {
        let calls = {
            let run = Run::new()?;
            let dir = run.root.join("events");
            removed_everywhere(&dir)?;
            let sim = Sim::new(&run.root)?;
            let io = Io::simulated(Arc::clone(&sim));
            assert!(compact_once(&io, &dir, durability), "nothing was compacted");
            sim.calls()
        };
        assert!(calls > 30, "the compaction made only {calls} calls");
        for call in 1..=calls + 1 {
            let run = Run::new()?;
            let dir = run.root.join("events");
            let expected = removed_everywhere(&dir)?;
            // What the store holds now is durable; the compaction is what is cut.
            let sim = Sim::new(&run.root)?;
            sim.seed(call);
            sim.crash_at(call, &run.out);
            let acked = compact_once(&Io::simulated(Arc::clone(&sim)), &dir, durability);
            if !sim.crashed() {
                sim.power_loss(&run.out)?;
            }
            if let Some(harm) = check_compacted(&run.out.join("events"), &expected, acked) {
                return Err(format!(
                    "{durability:?}, power loss at call {call} of {calls}: {harm}"
                )
                .into());
            }
        }
        eprintln!(
            "compaction ({durability:?}): a power loss at each of {} calls, every store whole",
            calls + 1
        );
    }
    Ok(())
}

#[test]
fn a_failed_call_of_a_compaction_is_an_error_that_loses_nothing() -> TestResult {
    let calls = {
        let run = Run::new()?;
        let dir = run.root.join("events");
        removed_everywhere(&dir)?;
        let sim = Sim::new(&run.root)?;
        compact_once(&Io::simulated(Arc::clone(&sim)), &dir, Durability::SyncEach);
        sim.calls()
    };
    let mut fired = 0;
    for nth in 1..=calls {
        for no_space in [false, true] {
            let run = Run::new()?;
            let dir = run.root.join("events");
            let expected = removed_everywhere(&dir)?;
            let sim = Sim::new(&run.root)?;
            sim.fail(Fault { nth, ops: Vec::new(), no_space, sticky: false });
            let io = Io::simulated(Arc::clone(&sim));
            let mut acked = false;
            if let Ok(events) = EventStore::<u64>::builder().io(io).open(&dir) {
                let res = events.compact();
                acked = res.is_ok();
                // Failed or not, the store reads as before, and takes appends
                // unless the failure was of its journal (a truncation, the
                // checkpoint), which poisons it.
                let read = contents(&events);
                if read.as_ref().ok() != Some(&expected) {
                    return Err(format!(
                        "failing call {nth} ({:?}): compacted {res:?}, then it reads {read:?}",
                        sim.fired()
                    )
                    .into());
                }
                match events.append("later", Expected::Any, [1]) {
                    Ok(_) | Err(Error::Poisoned { .. } | Error::JournalWrite { .. }) => {}
                    Err(err) => {
                        return Err(format!("failing call {nth}: an append gave {err}").into());
                    }
                }
            }
            if sim.fired().is_empty() {
                continue;
            }
            // The append after it, if acknowledged, is in `later`, not read here.
            if let Some(harm) = check_compacted(&dir, &expected, acked) {
                return Err(format!("failing call {nth} ({:?}): {harm}", sim.fired()).into());
            }
            fired += 1;
        }
    }
    eprintln!("compaction: {fired} failed calls (EIO, ENOSPC): each left the store whole");
    Ok(())
}
