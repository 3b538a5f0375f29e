//! `instastate`: inspect and look after the store directory of a program that uses
//! the instastate library, while that program is stopped.
//!
//! Every command opens the store without cells, so every saved value is visible,
//! and refuses to create a store where there is none. `list`, `history` and
//! `verify` also take a `Prevayler`'s journal directory, which they inspect without
//! changing it. `list`, `verify`, `read` and `follow` take an event store's
//! directory, which they read without changing it, also while its program runs.
//! Exit codes: 0 success, 1 the store is not sound (`verify` only), 2 any other
//! failure.

#![forbid(unsafe_code)]

mod commands;
mod events;
mod format;
mod key;

use std::{fmt, io, path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand};
use instastate::Error;

/// Inspect and look after an instastate store directory
///
/// The program that uses the store must be stopped first: a store is open in one
/// process at a time. This tool never creates a store by accident: given a directory
/// that does not exist or holds no store, it refuses. Only `import --create` makes a
/// new store, and only in a directory that does not exist yet.
///
/// Event stores (`instastate::events::EventStore`) are the exception: `list`,
/// `read`, `follow` and `verify` read one without its program's event type, change
/// nothing in its directory, and work while the program runs and appends (they then
/// read without a lock, and only what is written whole).
#[derive(Debug, Parser)]
#[command(name = "instastate", version, propagate_version = true)]
#[command(
    after_help = "Exit status: 0 success, 1 the store is not sound (verify), 2 any other failure."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List every stored value, or an event store's streams
    ///
    /// For a store of cells: name, type, schema, size, save number and time of every
    /// value. Values no cell of the program claims (cells renamed, moved or deleted)
    /// are marked `orphan`; values whose record cannot be read are marked `damaged`.
    /// Times are in UTC.
    ///
    /// For an event store: its head position, event and append counts, event type
    /// and encryption, then every stream with its event count and last version.
    List(StoreArgs),
    /// Show the saves the store's history keeps, with the cells each one changed
    History(StoreArgs),
    /// Check every record and value file; exit status 1 when something is wrong
    ///
    /// Prints each problem found, or that the store is sound. A store too damaged
    /// to open is reported as not sound too. The journals of the store's journaled
    /// cells are checked as opening them would; so is a Prevayler directory given in
    /// place of a store, without changing it.
    ///
    /// An event store is checked through: every frame's checksum, every batch,
    /// positions and stream versions without gaps and in order, no event id twice,
    /// and every checkpoint against the journal. Each problem names its file and
    /// byte offset. A store that a running program has open is checked too, without
    /// a lock, as far as it is written whole; the report says so.
    Verify(StoreArgs),
    /// Print the events of an event store's stream, or of all of them (`$all`)
    ///
    /// One line per event: position, stream and version, time (UTC), type, id, the
    /// data read back from the structure of the event type that the store records
    /// (or its bytes in hex, with why, when it cannot be), then causation,
    /// correlation and tags when the event has them. With --json, one JSON object per
    /// line instead, its `data` as `serde_json` would write the program's own type.
    /// Works while the program runs. Quote `$all` in a shell: '$all'.
    Read(ReadArgs),
    /// Print an event store's new events as its running program appends them
    ///
    /// Like `tail -f`: from the head (or --from), every event of the store, of one
    /// stream or of the streams with a prefix, once each and in order, until
    /// stopped (Ctrl-C). Takes no lock, so the program can start, append and stop
    /// meanwhile; reads only frames written whole, and waits for an unfinished one.
    /// Output as `read`'s.
    Follow(FollowArgs),
    /// Write the store's last save to one portable file
    ///
    /// The file holds every stored value, orphans included, with its name, type and
    /// schema version. An encrypted store's export stays encrypted.
    Export {
        #[command(flatten)]
        store: StoreArgs,
        /// The export file to write (replaced if it exists)
        file: PathBuf,
    },
    /// Store the values of an export file as one new save of the store
    ///
    /// All or nothing: a damaged file or a failed write changes nothing.
    /// Like any command, import refuses a directory that holds no store; to restore
    /// an export into a new store, give a directory that does not exist yet and
    /// --create, or run the program once so that it creates its store.
    Import {
        #[command(flatten)]
        store: StoreArgs,
        /// The export file, written by `instastate export` or `Store::export_to`
        file: PathBuf,
        /// Create the store first; only for a directory that does not exist yet
        #[arg(long)]
        create: bool,
    },
    /// Delete the stored values that no program's cell claims
    ///
    /// The claimants are the cells of every program that saved the store, until a
    /// program deletes a value itself (`Store::prune_orphans`); so this finds values
    /// such as those imported under names no program has. The deletion is one new
    /// save, which the program can undo with `Store::revert_to` while its history
    /// holds it.
    PruneOrphans(StoreArgs),
    /// Rewrite the store's files to hold only live data; prints the size before and after
    Compact(StoreArgs),
}

#[derive(Debug, Args)]
struct ReadArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// The stream to read, or `$all` for every event in position order
    #[arg(value_name = "STREAM", default_value = "$all")]
    stream: String,
    /// Read from the last event back
    #[arg(long)]
    backward: bool,
    /// Start at this version of the stream, or position of `$all` (included)
    #[arg(long, value_name = "N")]
    from: Option<u64>,
    /// Print at most N events
    #[arg(long, value_name = "N")]
    limit: Option<u64>,
    /// Only the events of this type (the variant name)
    #[arg(long = "type", value_name = "TYPE")]
    event_type: Option<String>,
    /// Only the events of streams whose id starts with PREFIX (`$all` only)
    #[arg(long, value_name = "PREFIX")]
    prefix: Option<String>,
    /// One JSON object per line
    #[arg(long)]
    json: bool,
    /// Also the events the store no longer reads (deleted, truncated, past a
    /// retention rule), marked `removed`
    #[arg(long)]
    removed: bool,
}

#[derive(Debug, Args)]
struct FollowArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Only the events of this stream
    #[arg(long, value_name = "STREAM", conflicts_with = "prefix")]
    stream: Option<String>,
    /// Only the events of streams whose id starts with PREFIX
    #[arg(long, value_name = "PREFIX")]
    prefix: Option<String>,
    /// Start at this position (with --stream: version), included; by default only
    /// the events appended from now on are printed
    #[arg(long, value_name = "N")]
    from: Option<u64>,
    /// Only the events of this type (the variant name)
    #[arg(long = "type", value_name = "TYPE")]
    event_type: Option<String>,
    /// One JSON object per line
    #[arg(long)]
    json: bool,
    /// How often to look for new events, in milliseconds
    #[arg(long, value_name = "MS", default_value_t = 200)]
    poll_ms: u64,
}

#[derive(Debug, Args)]
struct StoreArgs {
    /// The store directory: the path the program opens (or, for a store in
    /// PostgreSQL, its `postgres://...?namespace=...` location)
    #[arg(value_name = "STORE")]
    dir: PathBuf,
    /// The key of an encrypted store: a file holding 32 raw bytes or 64 hex digits
    #[arg(long, value_name = "PATH")]
    key_file: Option<PathBuf>,
}

impl StoreArgs {
    /// Whether the store is in a database (a `postgres://` location).
    fn is_database(&self) -> bool {
        is_database(&self.dir)
    }

    /// The store as reports name it: its directory, or its location without the
    /// password.
    fn shown(&self) -> String {
        shown(&self.dir)
    }
}

/// Whether `dir` is a database's location rather than a directory.
fn is_database(dir: &std::path::Path) -> bool {
    dir.to_str().is_some_and(|it| it.starts_with("postgres://") || it.starts_with("postgresql://"))
}

/// `dir` as reports name it: a database's location never shows its password.
fn shown(dir: &std::path::Path) -> String {
    #[cfg(feature = "postgres")]
    if let Some(text) = dir.to_str().filter(|_| is_database(dir)) {
        return instastate::postgres::Location::parse(text)
            .map_or_else(|_| "the database location given".to_owned(), |it| it.to_string());
    }
    dir.display().to_string()
}

/// Why a command failed; every failure exits with status 2.
#[derive(Debug)]
enum Failure {
    /// A message of our own.
    Message(String),
    /// An error from the store, shown with its causes.
    Store(Error),
    /// Writing to standard output failed.
    Output(io::Error),
}

/// An error and its chain of causes, one per line.
struct Chain<'a>(&'a dyn std::error::Error);

/// Standard output for `verify`, whose exit status says whether the store is
/// sound: a reader that went away (`verify | head -1`) takes the rest of the
/// report with it, not the status.
struct Unheard<W> {
    out: W,
    /// Whether the reader went away.
    gone: bool,
}

impl<W: io::Write> io::Write for Unheard<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.gone {
            return Ok(buf.len());
        }
        match self.out.write(buf) {
            Err(err) if err.kind() == io::ErrorKind::BrokenPipe => {
                self.gone = true;
                Ok(buf.len())
            }
            other => other,
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.gone {
            return Ok(());
        }
        match self.out.flush() {
            Err(err) if err.kind() == io::ErrorKind::BrokenPipe => {
                self.gone = true;
                Ok(())
            }
            other => other,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(code) => code,
        // A reader that went away, as `instastate list | head` does, is not a failure.
        Err(Failure::Output(err)) if err.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("{failure}");
            ExitCode::from(2)
        }
    }
}

fn run(command: Command) -> Result<ExitCode, Failure> {
    let out = &mut io::stdout().lock();
    match command {
        Command::List(args) => commands::list(&args, out),
        Command::History(args) => commands::history(&args, out),
        Command::Verify(args) => commands::verify(&args, &mut Unheard { out, gone: false }),
        Command::Read(args) => events::read(&args, out),
        Command::Follow(args) => events::follow(&args, out),
        Command::Export { store, file } => commands::export(&store, &file, out),
        Command::Import { store, file, create } => commands::import(&store, &file, create, out),
        Command::PruneOrphans(args) => commands::prune_orphans(&args, out),
        Command::Compact(args) => commands::compact(&args, out),
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("error: ")?;
        match self {
            Failure::Message(message) => f.write_str(message),
            Failure::Store(Error::Locked { path, kind, .. }) => {
                write!(
                    f,
                    "{kind} {} is in use by a running program; stop it first",
                    path.display()
                )?;
                if kind.starts_with("store") {
                    f.write_str(
                        ", or use its backup_to (`Store::backup_to`) to copy the store \
                         and inspect the copy",
                    )?;
                }
                Ok(())
            }
            Failure::Store(err) => write!(f, "{}", Chain(err)),
            Failure::Output(err) => write!(f, "cannot write to standard output: {err}"),
        }
    }
}

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut said = self.0.to_string();
        f.write_str(&said)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            // instastate's messages carry their causes already: say each one once.
            let text = cause.to_string();
            if !said.contains(&text) {
                write!(f, "\n  caused by: {text}")?;
                said.push_str(&text);
            }
            source = cause.source();
        }
        Ok(())
    }
}

impl From<Error> for Failure {
    fn from(err: Error) -> Failure {
        Failure::Store(err)
    }
}

impl From<io::Error> for Failure {
    fn from(err: io::Error) -> Failure {
        Failure::Output(err)
    }
}
