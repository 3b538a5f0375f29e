//! A small bank that survives `kill -9`: every command is journaled, and durable,
//! before it is applied and acknowledged.
//!
//! ```text
//! cargo run --example bank -- deposit alice 100
//! cargo run --example bank -- transfer alice bob 30
//! cargo run --example bank -- show
//! cargo run --example bank -- stress      # deposits until killed; try `kill -9`
//! cargo run --example bank -- show        # every acknowledged deposit is there
//! ```
//!
//! The data lives in `bank-data/` (or the directory `BANK_DIR` names).

use std::{collections::BTreeMap, env, fmt, process::ExitCode};

use instastate::{Prevayler, Timestamp};
use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Serialize, Deserialize)]
struct Bank {
    balances: BTreeMap<String, i64>,
    /// When the last command was applied (the journaled timestamp, not the clock).
    last_change: Option<Timestamp>,
}

#[derive(Debug, Serialize, Deserialize)]
enum Command {
    Deposit { who: String, amount: i64 },
    Transfer { from: String, to: String, amount: i64 },
}

#[derive(Debug, PartialEq, Eq)]
enum BankError {
    NotPositive(i64),
    Insufficient { who: String, balance: i64 },
}

impl fmt::Display for BankError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BankError::NotPositive(amount) => write!(f, "amount {amount} is not positive"),
            BankError::Insufficient { who, balance } => write!(f, "{who} has only {balance}"),
        }
    }
}

impl std::error::Error for BankError {}

/// The system function: decides first, then changes the bank. A rejected command
/// is journaled too, and rejected again on replay.
fn apply(bank: &mut Bank, command: Command, at: Timestamp) -> Result<i64, BankError> {
    let new_balance = match command {
        Command::Deposit { amount, .. } | Command::Transfer { amount, .. } if amount <= 0 => {
            return Err(BankError::NotPositive(amount));
        }
        Command::Deposit { who, amount } => {
            let balance = bank.balances.entry(who).or_default();
            *balance += amount;
            *balance
        }
        Command::Transfer { from, to, amount } => {
            let balance = bank.balances.get(&from).copied().unwrap_or(0);
            if balance < amount {
                return Err(BankError::Insufficient { who: from, balance });
            }
            bank.balances.insert(from, balance - amount);
            *bank.balances.entry(to).or_default() += amount;
            balance - amount
        }
    };
    bank.last_change = Some(at);
    Ok(new_balance)
}

/// The replay check's digest: replay must give the same total and accounts.
fn digest(bank: &Bank) -> u64 {
    let total: i64 = bank.balances.values().sum();
    total.cast_unsigned() ^ ((bank.balances.len() as u64) << 48)
}

fn main() -> ExitCode {
    match run(&env::args().skip(1).collect::<Vec<_>>()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("bank: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let dir = env::var_os("BANK_DIR").unwrap_or_else(|| "bank-data".into());
    let bank = Prevayler::builder().snapshot_every(10_000).replay_check(digest).open(
        &dir,
        Bank::default(),
        apply,
    )?;
    let recovered = bank.recovered();
    if recovered.torn_bytes() > 0 {
        println!(
            "(cut a torn last write of {} bytes: an unacknowledged command)",
            recovered.torn_bytes()
        );
    }
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["deposit", who, amount] => {
            let command = Command::Deposit { who: (*who).to_owned(), amount: amount.parse()? };
            report(bank.handle(command)?);
        }
        ["transfer", from, to, amount] => {
            let command = Command::Transfer {
                from: (*from).to_owned(),
                to: (*to).to_owned(),
                amount: amount.parse()?,
            };
            report(bank.handle(command)?);
        }
        ["show"] | [] => {
            bank.read(|bank| {
                for (who, balance) in &bank.balances {
                    println!("{who:>10} {balance:>12}");
                }
                let total: i64 = bank.balances.values().sum();
                println!("{:>10} {total:>12}", "total");
            });
            println!("{} commands journaled", bank.events());
        }
        ["stress"] => loop {
            // Each line is printed only after the deposit is durable: kill -9 at any
            // moment, and `show` has at least the last balance printed.
            let balance =
                bank.handle(Command::Deposit { who: "stress".to_owned(), amount: 1 })??;
            println!("stress balance {balance}, acknowledged");
        },
        _ => {
            return Err(
                "usage: bank (deposit WHO AMOUNT | transfer FROM TO AMOUNT | show | stress)".into(),
            );
        }
    }
    bank.close()?;
    Ok(())
}

fn report(result: Result<i64, BankError>) {
    match result {
        Ok(balance) => println!("ok, new balance {balance}"),
        Err(err) => println!("rejected: {err}"),
    }
}
