//! Two processes share one bank through PostgreSQL (feature `postgres`): a writer
//! process handles transfers; this process follows them as a read-only replica (as
//! another machine would), reporting its lag; then the writer is killed with
//! `SIGKILL`, and the follower takes over as the writer once the lease runs out,
//! with every transfer the writer acknowledged.
//!
//! ```text
//! cargo run --example pg_bank --features postgres              # a throwaway server
//! cargo run --example pg_bank --features postgres -- URL       # a server of yours
//! ```
//!
//! Without a URL it uses the server `INSTASTATE_TEST_POSTGRES` names, or starts a
//! throwaway cluster with `.ci/postgres` (PostgreSQL's server binaries must be
//! installed). Each run uses a namespace of its own.

#[path = "../tests/common/postgres.rs"]
#[allow(dead_code)]
mod server;

use std::{
    collections::BTreeMap,
    env,
    io::{BufRead, BufReader, Write},
    process::{Command, ExitCode, Stdio},
    thread,
    time::{Duration, Instant},
};

use instastate::{
    Prevayler, Timestamp,
    prevalence::{Follower, PrevaylerBuilder},
};
use serde::{Deserialize, Serialize};

/// The writer's lease: a standby takes over within about this long.
const LEASE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Bank {
    balances: BTreeMap<String, i64>,
    transfers: u64,
}

#[derive(Debug, Serialize, Deserialize)]
enum Order {
    Open { account: String, balance: i64 },
    Transfer { from: String, to: String, amount: i64 },
}

fn apply(bank: &mut Bank, command: Order, _: Timestamp) -> Result<(), String> {
    match command {
        Order::Open { account, balance } => {
            bank.balances.insert(account, balance);
        }
        Order::Transfer { from, to, amount } => {
            let available = bank.balances.get(&from).copied().unwrap_or_default();
            if available < amount {
                return Err(format!("{from} has {available}, not {amount}"));
            }
            *bank.balances.entry(from).or_default() -= amount;
            *bank.balances.entry(to).or_default() += amount;
            bank.transfers += 1;
        }
    }
    Ok(())
}

fn builder() -> PrevaylerBuilder<Bank> {
    Prevayler::builder::<Bank>()
        .lease_time(LEASE)
        .wait_for_lease(Duration::from_secs(30), Duration::from_millis(20))
}

fn main() -> ExitCode {
    let res = match env::var("PG_BANK_WRITER") {
        Ok(url) => writer(&url),
        Err(_) => run(),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

/// The writer process: opens the accounts, then transfers between them until
/// killed, printing the number of each transfer acknowledged.
fn writer(url: &str) -> Result<(), Box<dyn std::error::Error>> {
    let bank = builder().open(url, Bank::default(), apply)?;
    for account in ["alice", "bob", "carol"] {
        if bank.read(|bank| !bank.balances.contains_key(account)) {
            bank.handle(Order::Open { account: account.into(), balance: 1_000 })??;
        }
    }
    let mut out = std::io::stdout().lock();
    let accounts = ["alice", "bob", "carol"];
    for (from, to) in accounts.iter().zip(accounts.iter().skip(1)).cycle() {
        let transfer = Order::Transfer { from: (*from).into(), to: (*to).into(), amount: 7 };
        if bank.handle(transfer)?.is_ok() {
            writeln!(out, "{}", bank.read(|bank| bank.transfers))?;
            out.flush()?;
        }
        thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let base = env::args().nth(1).unwrap_or_else(|| server::url().to_owned());
    let separator = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{separator}namespace={}", server::unique("pg-bank"));
    println!("the bank: {}", url.split('?').nth(1).unwrap_or_default());

    let mut child = Command::new(env::current_exe()?)
        .env("PG_BANK_WRITER", &url)
        .stdout(Stdio::piped())
        .spawn()?;
    let mut acknowledged = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
    let mut last_ack = 0;
    // The writer has started once it acknowledged a transfer.
    if let Some(line) = acknowledged.next() {
        last_ack = line?.parse()?;
    }
    let follower = builder().follow(&url, Bank::default(), apply, Duration::from_millis(100))?;
    println!("writer: process {}; follower: this process", child.id());
    for _ in 0..4 {
        thread::sleep(Duration::from_millis(250));
        report("following", &follower)?;
    }

    // The writer dies without a word; what it acknowledged before is all stored.
    child.kill()?;
    child.wait()?;
    for line in acknowledged {
        last_ack = line?.parse()?;
    }
    let killed = Instant::now();
    println!("writer killed after acknowledging transfer {last_ack}");
    let bank = follower.promote()?;
    println!(
        "the follower took over in {} ms (lease {} ms), with {} transfers",
        killed.elapsed().as_millis(),
        LEASE.as_millis(),
        bank.read(|bank| bank.transfers)
    );
    assert!(bank.read(|bank| bank.transfers) >= last_ack, "an acknowledged transfer is missing");
    let transfer = Order::Transfer { from: "carol".into(), to: "alice".into(), amount: 1 };
    bank.handle(transfer)??;
    let (total, balances) =
        bank.read(|bank| (bank.balances.values().sum::<i64>(), bank.balances.clone()));
    println!("as the new writer, one more transfer: {balances:?}, {total} in all");
    assert_eq!(total, 3_000, "money was made or lost");
    bank.close()?;
    Ok(())
}

fn report(
    what: &str,
    follower: &Follower<Bank, Order, Result<(), String>>,
) -> instastate::Result<()> {
    let lag = follower.lag()?;
    println!(
        "{what}: {} transfers applied, {} events behind the writer",
        follower.read(|bank| bank.transfers),
        lag.events()
    );
    Ok(())
}
