//! A small REPL over three cells, where `save` makes a generation and `revert` is undo.
//!
//! ```text
//! cargo run --example repl             # keeps its state in ./repl-db
//! cargo run --example repl -- /tmp/db  # or in a directory of your choice
//! ```
//!
//! Commands are read from stdin, one per line (type `help`):
//!
//! ```text
//! > set name Ada
//! name = "Ada"
//! > save
//! saved generation 1
//! > set name Grace
//! name = "Grace"
//! > revert
//! reverted every cell to generation 1, the last save
//! > get name
//! name = "Ada"
//! ```
//!
//! The prompt is only shown on a terminal, so `cargo run --example repl < script`
//! prints nothing but the answers. Errors, from bad input or from the store, are
//! answered with `error: ...` and the session goes on.

use std::{
    error::Error,
    io::{self, BufRead, IsTerminal, Write},
    time::UNIX_EPOCH,
};

use instastate::{Store, defstate};

defstate! {
    // Pinned names: the REPL and `history` both call the cells by these.
    /// Any text.
    #[name = "name"]
    NAME: String = String::new();
    /// A whole number.
    #[name = "count"]
    COUNT: i64 = 0;
    /// A list of words, typed comma-separated.
    #[name = "tags"]
    TAGS: Vec<String> = Vec::new();
}

const CELLS: [&str; 3] = ["name", "count", "tags"];

const HELP: &str = "\
get [cell...]         show the cells (all of them without an argument)
set <cell> <value>    change a cell: `set name Ada`, `set count -3`, `set tags a,b,c`
save                  save every cell as a new generation
revert [generation]   undo: back to the last save, or to an older generation
history               list the generations the store keeps
help                  show this
quit                  leave without saving (end of input does the same)";

fn main() -> Result<(), Box<dyn Error>> {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "repl-db".to_owned());
    let store = instastate::open(&dir)?; // loads every saved cell
    let interactive = io::stdin().is_terminal();
    if interactive {
        println!("state in `{dir}`, last saved as generation {}; type `help`", store.generation());
    }

    let mut lines = io::stdin().lock().lines();
    loop {
        if interactive {
            print!("> ");
            io::stdout().flush()?;
        }
        let Some(line) = lines.next().transpose()? else { break }; // end of input
        let line = line.trim();
        let (command, args) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let args = args.trim();
        let res: Result<(), Box<dyn Error>> = match command {
            "" => Ok(()),
            "get" => get(args),
            "set" => set(args),
            "save" => save(&store),
            "revert" => revert(args, store.generation()),
            "history" => history(),
            "help" => {
                println!("{HELP}");
                Ok(())
            }
            "quit" => break,
            _ => Err(format!("unknown command `{command}`; type `help`").into()),
        };
        if let Err(err) = res {
            println!("error: {}", chain(&*err));
        }
    }

    if store.has_unsaved_changes() {
        println!("quitting without saving the changes since generation {}", store.generation());
    }
    Ok(())
}

/// Prints the cells named in `args`, or all of them.
fn get(args: &str) -> Result<(), Box<dyn Error>> {
    let names: Vec<&str> =
        if args.is_empty() { CELLS.to_vec() } else { args.split_whitespace().collect() };
    for name in names {
        match name {
            "name" => println!("name = {:?}", *NAME.read()),
            "count" => println!("count = {}", *COUNT.read()),
            "tags" => println!("tags = {:?}", *TAGS.read()),
            _ => return Err(unknown_cell(name)),
        }
    }
    Ok(())
}

/// Parses `<cell> <value>` and sets the cell, then shows its new value.
fn set(args: &str) -> Result<(), Box<dyn Error>> {
    let (name, value) = args.split_once(char::is_whitespace).unwrap_or((args, ""));
    let value = value.trim();
    match name {
        "" => return Err("usage: set <cell> <value>".into()),
        "name" => NAME.set(value.to_owned()),
        "count" => match value.parse() {
            Ok(count) => COUNT.set(count),
            Err(err) => {
                return Err(format!("count: `{value}` is not a whole number ({err})").into());
            }
        },
        "tags" => {
            let tags = value.split(',').map(str::trim).filter(|tag| !tag.is_empty());
            TAGS.set(tags.map(str::to_owned).collect());
        }
        _ => return Err(unknown_cell(name)),
    }
    get(name)
}

/// Saves every changed cell and shows the generation the save made.
fn save(store: &Store) -> Result<(), Box<dyn Error>> {
    let before = store.generation();
    instastate::save_all()?;
    let after = store.generation();
    if after == before {
        // A save with nothing changed writes nothing and makes no generation.
        println!("nothing changed since generation {after}");
    } else {
        println!("saved generation {after}");
    }
    Ok(())
}

/// Reverts every cell to the last save, or to the generation in `args`.
fn revert(args: &str, last: u64) -> Result<(), Box<dyn Error>> {
    if args.is_empty() {
        instastate::reload_all()?;
        println!("reverted every cell to generation {last}, the last save");
        return Ok(());
    }
    let generation: u64 =
        args.parse().map_err(|_| format!("`{args}` is not a generation; see `history`"))?;
    instastate::revert_to(generation)?;
    // Reverting changes the cells, not the store: the old values become the newest
    // only when they are saved again.
    println!("reverted every cell to generation {generation}; `save` keeps it, `revert` undoes it");
    Ok(())
}

/// Lists the saves the store keeps, oldest first.
fn history() -> Result<(), Box<dyn Error>> {
    let saves = instastate::history()?;
    if saves.is_empty() {
        println!("no saves yet");
    }
    for save in saves {
        let unix_time = save.saved_at.duration_since(UNIX_EPOCH)?.as_secs();
        println!(
            "generation {}  saved at {unix_time} (unix time)  changed: {}",
            save.number,
            save.changed.join(", ")
        );
    }
    Ok(())
}

fn unknown_cell(name: &str) -> Box<dyn Error> {
    format!("unknown cell `{name}`; the cells are {}", CELLS.join(", ")).into()
}

/// An error and its causes on one line, as in "i/o failure on `db`: permission denied".
fn chain(err: &dyn Error) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        line = format!("{line}: {cause}");
        source = cause.source();
    }
    line
}
