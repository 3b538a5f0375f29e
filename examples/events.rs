//! A small bank on the event store: accounts are streams of events, and the
//! balances are a projection of every event into a cell, which keeps the position
//! it has applied up to in the same save, so it survives `kill -9`.
//!
//! ```text
//! cargo run --example events                  # a day at the bank, then the balances
//! cargo run --example events                  # again: it goes on from the saved state
//! cargo run --example events -- DIR stress    # deposits until killed; try `kill -9`
//! cargo run --example events -- DIR           # nothing lost, nothing counted twice
//! ```
//!
//! The data lives in DIR (by default `instastate-events-example` in the system's
//! temporary directory): the events in `DIR/events`, the cells in `DIR/cells`.

use std::{collections::BTreeMap, env, process::ExitCode, time::Duration};

use instastate::{
    defstate,
    events::{Append, EventStore, Expected, Projected, RecordedEvent},
};
use serde::{Deserialize, Serialize};

/// What happens to an account.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum Bank {
    Opened { owner: String },
    Deposited { amount: i64 },
    Withdrew { amount: i64 },
    SentTo { account: String, amount: i64 },
    ReceivedFrom { account: String, amount: i64 },
}

defstate! {
    /// Every account's balance, and the position of the next event to apply.
    #[name = "examples::events::BALANCES"]
    BALANCES: Projected<BTreeMap<String, i64>> = Projected::new(BTreeMap::new());
}

type Failure = Box<dyn std::error::Error + Send + Sync>;

/// The projection's handler: checks the event, then changes the balances.
fn apply(balances: &mut BTreeMap<String, i64>, event: &RecordedEvent<Bank>) -> Result<(), Failure> {
    let account = event.stream.strip_prefix("account-").unwrap_or(&event.stream).to_owned();
    if let Bank::Opened { .. } = event.data {
        balances.insert(account, 0);
        return Ok(());
    }
    let Some(balance) = balances.get_mut(&account) else {
        return Err(
            format!("event {} is for account {account}, never opened", event.position).into()
        );
    };
    match &event.data {
        Bank::Deposited { amount } | Bank::ReceivedFrom { amount, .. } => *balance += amount,
        Bank::Withdrew { amount } | Bank::SentTo { amount, .. } => *balance -= amount,
        Bank::Opened { .. } => {}
    }
    Ok(())
}

fn stream(owner: &str) -> String {
    format!("account-{owner}")
}

fn main() -> ExitCode {
    match run(&env::args().skip(1).collect::<Vec<_>>()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("events: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<(), Failure> {
    let (dir, stress) = match args {
        [] => (env::temp_dir().join("instastate-events-example"), false),
        [dir] => (dir.into(), false),
        [dir, mode] if mode == "stress" => (dir.into(), true),
        _ => return Err("usage: events [DIR [stress]]".into()),
    };
    println!("data in {}", dir.display());
    let events = EventStore::<Bank>::open(dir.join("events"))?;
    // Loads BALANCES (and every other `defstate!` cell) as last saved.
    let store = instastate::open(dir.join("cells"))?;

    let saved_at = BALANCES.read().position();
    println!(
        "{} events in the store; the balances were saved at position {saved_at}",
        events.head()?
    );
    check(&events)?;

    let projection = events
        .projection(&BALANCES)
        .save_with(&store)
        .save_every(500)
        .save_interval(Duration::from_millis(200))
        .start(apply)?;
    projection.catch_up()?;
    println!(
        "caught up: the projection applied the events from {saved_at} to {}",
        projection.position()
    );

    if stress {
        return deposit_until_killed(&events);
    }
    a_day_at_the_bank(&events, &projection)?;
    projection.catch_up()?;
    show();
    // Stopping makes the last save.
    projection.stop()?;
    println!("saved at position {}; run again to go on from there", BALANCES.read().position());
    Ok(())
}

/// Opens the accounts the first time, then deposits, withdraws and transfers.
fn a_day_at_the_bank(
    events: &EventStore<Bank>,
    projection: &instastate::events::Projection,
) -> Result<(), Failure> {
    for owner in ["alice", "bob"] {
        if events.stream_version(&stream(owner))?.is_none() {
            events.append(
                &stream(owner),
                Expected::NoStream,
                [Bank::Opened { owner: owner.to_owned() }],
            )?;
            println!("opened {owner}'s account");
        }
    }
    events.append(&stream("alice"), Expected::StreamExists, [Bank::Deposited { amount: 100 }])?;
    println!("alice deposits 100");
    events.append(&stream("bob"), Expected::StreamExists, [Bank::Deposited { amount: 20 }])?;
    println!("bob deposits 20");

    // A decision on the projected balance: the projection must have seen the
    // account's last event, and the append expects that version, so that a
    // withdrawal appended meanwhile makes this one fail instead of overdrawing.
    let wanted = 50;
    projection.catch_up()?;
    let version = events.stream_version(&stream("bob"))?.ok_or("bob has no account")?;
    let balance = BALANCES.read().get("bob").copied().unwrap_or(0);
    if balance < wanted {
        println!("bob cannot withdraw {wanted}: his balance is {balance}");
    } else {
        events.append(
            &stream("bob"),
            Expected::Exact(version),
            [Bank::Withdrew { amount: wanted }],
        )?;
        println!("bob withdraws {wanted}");
    }

    // A transfer is two streams' events in one atomic append.
    let amount = 30;
    events.append_all([
        Append::new(
            stream("alice"),
            Expected::StreamExists,
            [Bank::SentTo { account: "bob".to_owned(), amount }],
        ),
        Append::new(
            stream("bob"),
            Expected::StreamExists,
            [Bank::ReceivedFrom { account: "alice".to_owned(), amount }],
        ),
    ])?;
    println!("alice sends bob {amount}");
    Ok(())
}

/// Appends deposits until the process is killed; each line is printed once the
/// deposit is durable.
fn deposit_until_killed(events: &EventStore<Bank>) -> Result<(), Failure> {
    if events.stream_version(&stream("stress"))?.is_none() {
        events.append(
            &stream("stress"),
            Expected::NoStream,
            [Bank::Opened { owner: "stress".to_owned() }],
        )?;
    }
    println!("depositing 1 at a time into account stress; kill -9 this process, then run it again");
    loop {
        let appended = events.append(
            &stream("stress"),
            Expected::StreamExists,
            [Bank::Deposited { amount: 1 }],
        )?;
        println!(
            "deposit at position {} acknowledged; balances projected up to {}",
            appended.positions.start,
            BALANCES.read().position()
        );
    }
}

/// Checks that the balances are a fold of exactly the events before their position.
fn check(events: &EventStore<Bank>) -> Result<(), Failure> {
    let projected = BALANCES.get();
    let mut fold = BTreeMap::new();
    for event in events.read_all().limit(projected.position().get()) {
        apply(&mut fold, &event?)?;
    }
    if fold != *projected.state() {
        return Err(format!(
            "the balances {:?} differ from a fold of their events, {fold:?}",
            projected.state()
        )
        .into());
    }
    println!("the saved balances are a fold of exactly the first {} events", projected.position());
    show();
    Ok(())
}

fn show() {
    let balances = BALANCES.read();
    for (who, balance) in balances.iter() {
        println!("{who:>10} {balance:>8}");
    }
    println!("{:>10} {:>8}", "total", balances.values().sum::<i64>());
}
