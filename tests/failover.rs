//! Failover of a prevalent system kept in PostgreSQL (feature `postgres`), with
//! real processes.
//!
//! This binary has no libtest harness (`harness = false`): it is both the test runner
//! and, when started by itself with `INSTASTATE_FAILOVER_ROLE` set, a child: a
//! writer (or a standby waiting to be one) that opens the system, prints
//! `ready`, then handles events numbered 0, 1, 2, ... (tagged with its id) and prints
//! `ack <n>` after each `handle` returned, until its lease is lost (`fenced`).
//!
//! - `failover::kill_and_freeze`: a writer and a standby. The writer is killed with
//!   `SIGKILL` at random moments, 20 times: each time the standby takes over (its
//!   lease time is 1 s) and a new standby starts. Then the writer is frozen with
//!   `SIGSTOP` past its lease: the standby takes over while it is frozen, and once
//!   thawed (`SIGCONT`) the old writer's next write is refused by the database
//!   (`Error::Fenced`). At the end, the system holds every acknowledged event
//!   exactly once, each writer's events a prefix of what it handled (nothing of a
//!   writer after it lost its lease). Prints how long each takeover took, from the
//!   kill to the new writer's first acknowledged event.
//!
//! The PostgreSQL server is the one `INSTASTATE_TEST_POSTGRES` names, or a throwaway
//! cluster started with `.ci/postgres` (`tests/common/postgres.rs`).

mod common;
#[path = "common/postgres.rs"]
#[allow(dead_code)] // The library's tests use the rest.
mod server;

use std::{
    collections::{BTreeMap, BTreeSet},
    env,
    io::{self, Write},
    process::{Command, ExitCode},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use instastate::{Error, Prevayler};

use crate::common::{Test, TestResult, Watched, XorShift};

/// Selects the child role; unset in the parent.
const ROLE_VAR: &str = "INSTASTATE_FAILOVER_ROLE";
/// The system's location, and the child's id.
const URL_VAR: &str = "INSTASTATE_FAILOVER_URL";
const ID_VAR: &str = "INSTASTATE_FAILOVER_ID";

/// The writers' lease time, and how often a standby asks for the lease.
const LEASE: Duration = Duration::from_secs(1);
const POLL: Duration = Duration::from_millis(20);
/// How many times the writer is killed.
const KILLS: u32 = 20;
/// A child stops by itself after this long, so that none outlives the parent.
const CHILD_LIFETIME: Duration = Duration::from_mins(2);
/// How long the parent waits for a child's next line (a takeover waits for the
/// lease to run out).
const LINE_TIMEOUT: Duration = Duration::from_secs(30);

type Log = Prevayler<Vec<u64>, u64, ()>;

fn main() -> ExitCode {
    if env::var_os(ROLE_VAR).is_some() {
        return match child() {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("child failed: {err}");
                ExitCode::FAILURE
            }
        };
    }
    let tests: &[Test] = &[("failover::kill_and_freeze", kill_and_freeze)];
    common::run(tests)
}

/// An event: the writer's id and its number.
fn event(id: u64, n: u64) -> u64 {
    (id << 32) | n
}

fn open(url: &str) -> instastate::Result<Log> {
    Prevayler::builder::<Vec<u64>>().lease_time(LEASE).wait_for_lease(CHILD_LIFETIME, POLL).open(
        url,
        Vec::new(),
        |log: &mut Vec<u64>, event: u64, _| log.push(event),
    )
}

fn child() -> TestResult {
    let url = env::var(URL_VAR)?;
    let id: u64 = env::var(ID_VAR)?.parse()?;
    let log = open(&url)?;
    let mut out = io::stdout().lock();
    writeln!(out, "ready")?;
    out.flush()?;
    let started = Instant::now();
    let mut n = 0;
    while started.elapsed() < CHILD_LIFETIME {
        match log.handle(event(id, n)) {
            Ok(()) => writeln!(out, "ack {n}")?,
            Err(Error::Fenced { .. }) => {
                writeln!(out, "fenced")?;
                out.flush()?;
                return Ok(());
            }
            Err(err) => return Err(err.into()),
        }
        out.flush()?;
        n += 1;
        thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// A child of id `id`, opening (or waiting to open) the system at `url`.
fn spawn(url: &str, id: u64) -> TestResult<Watched> {
    let mut command = Command::new(env::current_exe()?);
    command.env(ROLE_VAR, "writer").env(URL_VAR, url).env(ID_VAR, id.to_string());
    Watched::spawn(command, LINE_TIMEOUT)
}

/// What the parent learnt from the children: each one's acknowledged events.
#[derive(Default)]
struct Acks(BTreeMap<u64, BTreeSet<u64>>);

impl Acks {
    /// Takes in `line`, printed by child `id`; whether it was an `ack`.
    fn take(&mut self, id: u64, line: &str) -> TestResult<bool> {
        match line.split_once(' ') {
            Some(("ack", n)) => {
                self.0.entry(id).or_default().insert(n.parse()?);
                Ok(true)
            }
            _ if line == "ready" || line == "fenced" => Ok(false),
            _ => Err(format!("child {id} printed {line:?}").into()),
        }
    }

    /// Reads child `id`'s lines until it has acknowledged an event.
    fn first_ack(&mut self, id: u64, child: &Watched) -> TestResult {
        while !self.take(id, &child.next_line()?)? {}
        Ok(())
    }

    /// Reads child `id`'s lines for `time`, or until it says it was fenced;
    /// whether it did.
    fn for_a_while(&mut self, id: u64, child: &Watched, time: Duration) -> TestResult<bool> {
        let until = Instant::now() + time;
        while Instant::now() < until {
            let line = child.next_line()?;
            self.take(id, &line)?;
            if line == "fenced" {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Kills child `id` and takes in what it printed before.
    fn kill(&mut self, id: u64, child: &mut Watched) -> TestResult {
        child.kill()?;
        self.finish(id, child)?;
        Ok(())
    }

    /// Kills child `id` with `SIGKILL` if it still runs, and takes in what it
    /// printed before; whether it was killed. One that exited by itself must have
    /// been fenced (its lease ran out: its renewals stalled on a busy machine).
    fn kill_unless_fenced(&mut self, id: u64, child: &mut Watched) -> TestResult<bool> {
        let killed = match child.exited()? {
            Some(_) => false,
            None => {
                // It may still exit by itself before the signal lands.
                child.kill().is_ok()
            }
        };
        let fenced = self.finish(id, child)?;
        if !killed && !fenced {
            return Err(format!("child {id} exited before it was killed, not fenced").into());
        }
        Ok(killed)
    }

    /// Makes sure child `id` is dead and takes in the lines it printed that were
    /// not read yet; whether one said it was fenced.
    fn finish(&mut self, id: u64, child: &mut Watched) -> TestResult<bool> {
        let (lines, _) = child.finish();
        let mut fenced = false;
        for line in lines? {
            self.take(id, &line)?;
            fenced |= line == "fenced";
        }
        Ok(fenced)
    }
}

fn kill_and_freeze() -> TestResult {
    let url = server::address("failover");
    let seed = SystemTime::now().duration_since(UNIX_EPOCH)?.subsec_nanos().into();
    println!("    seed {seed}");
    let mut random = XorShift::new(seed);
    let mut acks = Acks::default();
    let mut next_id = 1;
    let mut writer = (next_id, spawn(&url, next_id)?);
    acks.first_ack(writer.0, &writer.1)?;
    next_id += 1;
    let mut standby = (next_id, spawn(&url, next_id)?);
    let mut takeovers = Vec::new();
    // Writers whose lease ran out by itself (its renewals stalled on a busy
    // machine): the standby takes over as after a kill, and the writer, fenced,
    // stops. Bounded, so that a writer that keeps losing its lease fails the test.
    let mut lapsed = 0;
    while takeovers.len() < KILLS as usize {
        let time = Duration::from_millis(50 + random.below(300));
        let killed = if acks.for_a_while(writer.0, &writer.1, time)? {
            acks.finish(writer.0, &mut writer.1)?;
            false
        } else {
            acks.kill_unless_fenced(writer.0, &mut writer.1)?
        };
        let at = Instant::now();
        if !killed {
            lapsed += 1;
            println!("    writer {} lost its lease before it was killed", writer.0);
            if KILLS / 4 < lapsed {
                return Err(format!("{lapsed} writers lost their lease unkilled").into());
            }
        }
        let (_, took) = take_over(&mut acks, &url, &mut writer, &mut standby, &mut next_id)?;
        if killed {
            takeovers.push(took - at);
        }
    }
    // Frozen past its lease, the writer is taken over; thawed, it is refused.
    while acks.for_a_while(writer.0, &writer.1, Duration::from_millis(100))? {
        acks.finish(writer.0, &mut writer.1)?;
        println!("    writer {} lost its lease before it was frozen", writer.0);
        take_over(&mut acks, &url, &mut writer, &mut standby, &mut next_id)?;
    }
    writer.1.signal("STOP")?;
    let (frozen, _) = take_over(&mut acks, &url, &mut writer, &mut standby, &mut next_id)?;
    acks.for_a_while(writer.0, &writer.1, Duration::from_millis(200))?;
    frozen.1.signal("CONT")?;
    let (thawed_id, mut thawed) = frozen;
    loop {
        let line = thawed.next_line()?;
        acks.take(thawed_id, &line)?;
        if line == "fenced" {
            break;
        }
    }
    acks.for_a_while(writer.0, &writer.1, Duration::from_millis(100))?;
    // The standby first: once the writer is gone, it would take the lease over
    // and hold it while the check waits for it.
    acks.kill(standby.0, &mut standby.1)?;
    acks.kill(writer.0, &mut writer.1)?;
    let (_, stderr) = thawed.finish();
    assert!(stderr.is_empty(), "the thawed writer failed: {stderr}");
    drop(thawed);
    check(&url, &acks)?;
    takeovers.sort();
    let ms = |it: &Duration| it.as_secs_f64() * 1e3;
    println!(
        "    {KILLS} takeovers with a {LEASE:?} lease: median {:.0} ms, slowest {:.0} ms; {} events acknowledged by {} writers",
        takeovers.get(takeovers.len() / 2).map_or(0.0, ms),
        takeovers.last().map_or(0.0, ms),
        acks.0.values().map(BTreeSet::len).sum::<usize>(),
        acks.0.len(),
    );
    Ok(())
}

/// Makes the standby the writer and starts a new standby; returns the writer it
/// replaced, and when the new one acknowledged its first event.
fn take_over(
    acks: &mut Acks,
    url: &str,
    writer: &mut (u64, Watched),
    standby: &mut (u64, Watched),
    next_id: &mut u64,
) -> TestResult<((u64, Watched), Instant)> {
    std::mem::swap(writer, standby);
    acks.first_ack(writer.0, &writer.1)?;
    let acknowledged = Instant::now();
    *next_id += 1;
    let replaced = std::mem::replace(standby, (*next_id, spawn(url, *next_id)?));
    Ok((replaced, acknowledged))
}

/// Opens the system and checks it holds every acknowledged event once, and of
/// each writer a prefix of its events.
fn check(url: &str, acks: &Acks) -> TestResult {
    let log = open(url)?;
    let events = log.read(Clone::clone);
    let mut held: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for event in &events {
        assert!(seen.insert(*event), "event {event:#x} is held twice");
        held.entry(event >> 32).or_default().push(event & 0xffff_ffff);
    }
    for (id, numbers) in &held {
        let prefix: Vec<u64> = (0..numbers.len() as u64).collect();
        assert_eq!(numbers, &prefix, "writer {id}'s events are not a prefix of what it handled");
    }
    for (id, acked) in &acks.0 {
        let count = held.get(id).map_or(0, Vec::len) as u64;
        if let Some(missing) = acked.iter().find(|n| count <= **n) {
            return Err(format!("writer {id}'s acknowledged event {missing} is missing").into());
        }
    }
    log.close()?;
    Ok(())
}
