//! One function per command; each writes its report to `out`.

use std::{
    fs,
    io::{self, Write},
    path::Path,
    process::ExitCode,
};

use instastate::{EncryptionKey, Error, Prevayler, Store, StoreBuilder, prevalence::JournalReport};

use crate::{Chain, Failure, StoreArgs, events, format, key};

/// `list`: a table of every stored value, then counts; for a journal, its summary.
pub(crate) fn list(args: &StoreArgs, out: &mut impl Write) -> Result<ExitCode, Failure> {
    if let Some(raw) = events::try_open(args)? {
        events::list(args, &raw, out)?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(inspected) = inspect_journal(args)? {
        let report = inspected?;
        let snapshot = report.snapshot.map_or_else(|| "-".to_owned(), |it| it.to_string());
        let mut notes = Vec::new();
        if report.encrypted {
            notes.push("encrypted".to_owned());
        }
        if report.torn_bytes > 0 {
            notes.push(format!("torn last write of {}", format::size(report.torn_bytes)));
        }
        if !report.unsound_snapshots.is_empty() {
            notes.push(format!("{} damaged", plural(report.unsound_snapshots.len(), "snapshot")));
        }
        let row = [
            report.state_type,
            report.event_type,
            report.schema.to_string(),
            report.events.to_string(),
            snapshot,
            notes.join(", "),
        ];
        let header = ["STATE", "EVENT", "SCHEMA", "EVENTS", "SNAPSHOT AT", "NOTE"];
        writeln!(out, "journal {} (a Prevayler directory)", args.shown())?;
        format::table(out, header, &[row])?;
        return Ok(ExitCode::SUCCESS);
    }
    let store = look(args)?;
    let stored = store.stored_cells();
    if stored.is_empty() {
        writeln!(out, "store {} holds no values", args.shown())?;
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<[String; 7]> = stored
        .iter()
        .map(|cell| {
            let mut marks = Vec::new();
            if !cell.claimed {
                marks.push("orphan".to_owned());
            }
            if let Some(damage) = &cell.damage {
                marks.push(format!("damaged: {damage}"));
            }
            // A damaged record tells nothing; a record whose value file is
            // damaged still tells its type.
            let unread = cell.damage.is_some() && cell.type_name.is_empty();
            let type_name = if unread { "?".to_owned() } else { cell.type_name.clone() };
            let schema = if unread { "?".to_owned() } else { cell.schema.to_string() };
            [
                cell.name.clone(),
                type_name,
                schema,
                format::size(cell.size),
                cell.generation.map_or_else(|| "-".to_owned(), |it| it.to_string()),
                cell.saved_at.map_or_else(|| "-".to_owned(), format::time),
                marks.join(", "),
            ]
        })
        .collect();
    let header = ["NAME", "TYPE", "SCHEMA", "SIZE", "SAVE", "SAVED AT (UTC)", "NOTE"];
    format::table(out, header, &rows)?;
    let n_orphans = stored.iter().filter(|cell| !cell.claimed).count();
    let n_damaged = stored.iter().filter(|cell| cell.damage.is_some()).count();
    writeln!(
        out,
        "\n{} at save {}; {}, {n_damaged} damaged",
        plural(stored.len(), "value"),
        store.generation(),
        plural(n_orphans, "orphan"),
    )?;
    Ok(ExitCode::SUCCESS)
}

/// `history`: a table of the saves the history keeps; for a journal, how far its
/// events and snapshot reach.
pub(crate) fn history(args: &StoreArgs, out: &mut impl Write) -> Result<ExitCode, Failure> {
    if !args.is_database()
        && holds_journal(&args.dir)
        && let Some(code) = crate::events::history(args, out)?
    {
        return Ok(code);
    }
    if let Some(inspected) = inspect_journal(args)? {
        let report = inspected?;
        let snapshot = report.snapshot.map_or_else(
            || "no snapshot; every event is replayed".to_owned(),
            |it| format!("its newest sound snapshot holds the first {}", plural_u64(it, "event")),
        );
        writeln!(
            out,
            "journal {} holds {}; {snapshot}",
            args.shown(),
            plural_u64(report.events, "event")
        )?;
        return Ok(ExitCode::SUCCESS);
    }
    let store = look(args)?;
    let history = store.history();
    if history.is_empty() {
        writeln!(out, "store {} keeps no saves in its history", args.shown())?;
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<[String; 3]> = history
        .iter()
        .map(|save| {
            let changed =
                if save.changed.is_empty() { "-".to_owned() } else { save.changed.join(", ") };
            [save.number.to_string(), format::time(save.saved_at), changed]
        })
        .collect();
    format::table(out, ["SAVE", "SAVED AT (UTC)", "CELLS CHANGED"], &rows)?;
    Ok(ExitCode::SUCCESS)
}

/// `verify`: every problem, or that the store is sound; exit status 1 for problems.
pub(crate) fn verify(args: &StoreArgs, out: &mut impl Write) -> Result<ExitCode, Failure> {
    if let Some(code) = events::verify(args, out)? {
        return Ok(code);
    }
    if let Some(inspected) = inspect_journal(args)? {
        return verify_journal(args, inspected, out);
    }
    let store = match look(args) {
        Ok(store) => store,
        Err(Failure::Store(err)) if is_damage(&err) => {
            writeln!(out, "cannot open the store: {}", Chain(&err))?;
            writeln!(out, "store {} is NOT sound", args.shown())?;
            return Ok(ExitCode::FAILURE);
        }
        Err(failure) => return Err(failure),
    };
    let problems = store.verify()?;
    if problems.is_empty() {
        let n_values = store.stored_cells().len();
        writeln!(
            out,
            "store {} is sound: {} at save {}",
            args.shown(),
            plural(n_values, "value"),
            store.generation()
        )?;
        return Ok(ExitCode::SUCCESS);
    }
    for problem in &problems {
        writeln!(out, "{problem}")?;
    }
    let found = plural(problems.len(), "problem");
    writeln!(out, "store {} is NOT sound: {found}", args.shown())?;
    Ok(ExitCode::FAILURE)
}

/// `verify` of a journal: what inspecting it found.
fn verify_journal(
    args: &StoreArgs,
    inspected: Result<JournalReport, Error>,
    out: &mut impl Write,
) -> Result<ExitCode, Failure> {
    let dir = args.shown();
    let report = match inspected {
        Ok(report) => report,
        Err(err) if is_damage(&err) => {
            writeln!(out, "cannot open the journal: {}", Chain(&err))?;
            writeln!(out, "journal {dir} is NOT sound")?;
            return Ok(ExitCode::FAILURE);
        }
        Err(err) => return Err(err.into()),
    };
    if report.torn_bytes > 0 {
        writeln!(
            out,
            "note: the last write was torn by a crash ({}, of no acknowledged event); \
             opening the journal cuts it off",
            format::size(report.torn_bytes)
        )?;
    }
    if !report.unsound_snapshots.is_empty() {
        for path in &report.unsound_snapshots {
            writeln!(out, "{}: the snapshot is damaged; opening passes over it", path.display())?;
        }
        let found = plural(report.unsound_snapshots.len(), "problem");
        writeln!(out, "journal {dir} is NOT sound: {found}")?;
        return Ok(ExitCode::FAILURE);
    }
    writeln!(
        out,
        "journal {dir} is sound: {} of `{}` on a state `{}` (schema v{})",
        plural_u64(report.events, "event"),
        report.event_type,
        report.state_type,
        report.schema
    )?;
    Ok(ExitCode::SUCCESS)
}

/// What inspecting the journal in `args.dir` found, if the directory holds a journal
/// (a `Prevayler`'s) rather than a store; `None` otherwise.
fn inspect_journal(args: &StoreArgs) -> Result<Option<Result<JournalReport, Error>>, Failure> {
    if !args.dir.is_dir() || Store::exists(&args.dir) {
        return Ok(None);
    }
    let mut builder = Prevayler::builder::<()>();
    if let Some(key) = read_key(args)? {
        builder = builder.encryption_key(key);
    }
    match builder.inspect(&args.dir) {
        // Neither a store nor a journal: `open` says so.
        Err(Error::WrongDirectory { .. }) => Ok(None),
        inspected => Ok(Some(inspected)),
    }
}

/// `export`: writes the export file.
pub(crate) fn export(
    args: &StoreArgs,
    file: &Path,
    out: &mut impl Write,
) -> Result<ExitCode, Failure> {
    let store = look(args)?;
    store.export_to(file)?;
    let n_values = store.stored_cells().len();
    writeln!(
        out,
        "exported {} from save {} of {} to {}",
        plural(n_values, "value"),
        store.generation(),
        args.shown(),
        file.display()
    )?;
    let journaled = store.journaled_cells();
    if !journaled.is_empty() {
        let names: Vec<String> = journaled.iter().map(|name| format!("`{name}`")).collect();
        writeln!(
            out,
            "note: not in the export: the journaled {} {}, whose state {} in {} journal{} (copy the store's directory to keep {})",
            if names.len() == 1 { "cell" } else { "cells" },
            names.join(", "),
            if names.len() == 1 { "is" } else { "are" },
            if names.len() == 1 { "its" } else { "their" },
            if names.len() == 1 { "" } else { "s" },
            if names.len() == 1 { "it" } else { "them" },
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `import`: stores an export file as one new save, in a new store with `create`.
pub(crate) fn import(
    args: &StoreArgs,
    file: &Path,
    create: bool,
    out: &mut impl Write,
) -> Result<ExitCode, Failure> {
    // A database's namespace is new when it holds no store (looked at only for
    // `--create`: without it, the store is checked below).
    let is_new = create
        && if args.is_database() {
            matches!(check_is_store(args), Err(Absent::NoStore(_)))
        } else {
            !args.dir.exists()
        };
    if create && !is_new {
        return Err(Failure::Message(format!(
            "--create makes a new store, and `{}` already exists; \
             leave --create out to import into the store there",
            args.shown()
        )));
    }
    if !is_new && let Err(absent) = check_is_store(args) {
        return Err(Failure::Message(format!(
            "{}\n  to restore into a new store, give `import --create` a directory \
             that does not exist yet; or run the program once so that it creates its store",
            absent.message()
        )));
    }
    // The outermost directory that opening the new store makes (its parents may
    // not exist either): all of it is ours to remove if the import fails.
    let made = (is_new && !args.is_database())
        .then(|| {
            args.dir.ancestors().take_while(|it| !it.as_os_str().is_empty() && !it.exists()).last()
        })
        .flatten()
        .map(Path::to_path_buf);
    let store = open_unchecked(args)?;
    if let Err(err) = store.import_from(file) {
        if let Some(made) = made {
            drop(store);
            let _ = fs::remove_dir_all(made);
        }
        return Err(err.into());
    }
    let written = store.history().last().map_or(0, |save| save.changed.len());
    writeln!(
        out,
        "imported {} into {} {} as save {}",
        file.display(),
        if is_new { "the new store" } else { "store" },
        args.shown(),
        store.generation()
    )?;
    writeln!(out, "{} written", plural(written, "value"))?;
    Ok(ExitCode::SUCCESS)
}

/// `prune-orphans`: deletes the orphans and names them.
pub(crate) fn prune_orphans(args: &StoreArgs, out: &mut impl Write) -> Result<ExitCode, Failure> {
    let store = open(args)?;
    let removed = store.prune_orphans()?;
    if removed.is_empty() {
        writeln!(out, "store {} has no orphans", args.shown())?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(
        out,
        "removed {} from {} as save {}:",
        plural(removed.len(), "orphan"),
        args.shown(),
        store.generation()
    )?;
    for name in &removed {
        writeln!(out, "  {name}")?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `compact`: compacts the store and measures it before and after.
pub(crate) fn compact(args: &StoreArgs, out: &mut impl Write) -> Result<ExitCode, Failure> {
    check_is_store(args)?;
    if args.is_database() {
        open(args)?.compact()?;
        writeln!(out, "{}: the database reclaims the space of old rows by itself", args.shown())?;
        return Ok(ExitCode::SUCCESS);
    }
    let before = dir_size(&args.dir)?;
    let store = open(args)?;
    store.compact()?;
    // Dropping the store lets the engine finish writing before the files are measured.
    drop(store);
    let after = dir_size(&args.dir)?;
    writeln!(
        out,
        "compacted {}: {} before, {} after",
        args.shown(),
        format::size(before),
        format::size(after)
    )?;
    Ok(ExitCode::SUCCESS)
}

/// Opens the existing store `args` names read-only: nothing in it is written,
/// created or deleted.
fn look(args: &StoreArgs) -> Result<Store, Failure> {
    // A database's store is opened once: the read-only open says whether there
    // is one (`check_is_store` opens it too).
    if !args.is_database() {
        check_is_store(args)?;
    }
    builder(args)?.open_read_only(&args.dir).map_err(|err| match err {
        Error::InvalidLocation { location, reason, .. } if args.is_database() => {
            Failure::Message(no_store(&location, &reason))
        }
        err => err.into(),
    })
}

/// What a command says of a location whose namespace holds no store.
fn no_store(location: &str, reason: &str) -> String {
    format!("no store at {location}: {reason}; this tool never creates a store")
}

/// Opens the existing store `args` names, refusing to create one.
fn open(args: &StoreArgs) -> Result<Store, Failure> {
    check_is_store(args)?;
    open_unchecked(args)
}

/// Opens the store `args` names, creating it if there is none.
fn open_unchecked(args: &StoreArgs) -> Result<Store, Failure> {
    Ok(builder(args)?.open(&args.dir)?)
}

/// The builder of the store `args` names: no cells, and its key if it has one.
fn builder(args: &StoreArgs) -> Result<StoreBuilder, Failure> {
    // A tool's save (import, prune) must not prune the history the program keeps,
    // whose length the tool cannot know; the program's next save prunes it.
    let builder = Store::builder().keep_history(usize::MAX);
    Ok(match read_key(args)? {
        Some(key) => builder.encryption_key(key),
        None => builder,
    })
}

/// The key in the key file `args` names, if it names one.
pub(crate) fn read_key(args: &StoreArgs) -> Result<Option<EncryptionKey>, Failure> {
    /// Far more than a key takes, in any of its forms.
    const MOST: u64 = 4096;
    let Some(path) = &args.key_file else { return Ok(None) };
    let cannot =
        |err: &dyn std::fmt::Display| format!("cannot read key file {}: {err}", path.display());
    // Not a device or a pipe, which could hang the tool or never end.
    let meta = fs::metadata(path).map_err(|err| Failure::Message(cannot(&err)))?;
    if !meta.is_file() {
        return Err(Failure::Message(cannot(&"it is not a regular file")));
    }
    let mut contents = Vec::new();
    fs::File::open(path)
        .and_then(|file| {
            use std::io::Read;
            file.take(MOST + 1).read_to_end(&mut contents)
        })
        .map_err(|err| Failure::Message(cannot(&err)))?;
    if MOST < contents.len() as u64 {
        let reason = format!("it holds more than {MOST} bytes, far more than a key");
        return Err(Failure::Message(cannot(&reason)));
    }
    let bytes = key::parse(&contents)
        .map_err(|reason| Failure::Message(format!("key file {}: {reason}", path.display())))?;
    Ok(Some(EncryptionKey::from_bytes(bytes)))
}

/// Fails, saying why, unless `dir` holds a store, so that opening it does not create one.
fn check_is_store(args: &StoreArgs) -> Result<(), Absent> {
    let dir = &args.dir;
    if args.is_database() {
        // Opening it to read, which writes nothing, says whether it holds one;
        // another failure (a wrong key, damage) is for the command to report.
        let opened = builder(args).map_err(Absent::Failed)?.open_read_only(dir);
        return match opened {
            Err(Error::InvalidLocation { location, reason, .. }) => {
                Err(Absent::NoStore(no_store(&location, &reason)))
            }
            _ => Ok(()),
        };
    }
    let problem = if !dir.exists() {
        "the directory does not exist"
    } else if !dir.is_dir() {
        "it is not a directory"
    } else if holds_journal(dir) && crate::events::is_event_store(dir) {
        "the directory holds an event store, not a store of cells; \
         `list`, `read`, `follow` and `verify` look into it"
    } else if holds_journal(dir) {
        "the directory holds a journal of events (a Prevayler directory), not a store; \
         `list`, `history` and `verify` look into it"
    } else if !Store::exists(dir) {
        "the directory holds no instastate store"
    } else {
        return Ok(());
    };
    Err(Absent::NoStore(format!(
        "no store at {}: {problem}; this tool never creates a store",
        dir.display()
    )))
}

/// Why a command found no store to work on.
enum Absent {
    /// There is none: the message says why.
    NoStore(String),
    /// Looking failed (the key file could not be read).
    Failed(Failure),
}

impl Absent {
    fn message(self) -> String {
        match self {
            Absent::NoStore(message) => message,
            Absent::Failed(failure) => failure.to_string(),
        }
    }
}

impl From<Absent> for Failure {
    fn from(absent: Absent) -> Failure {
        match absent {
            Absent::NoStore(message) => Failure::Message(message),
            Absent::Failed(failure) => failure,
        }
    }
}

/// Whether `dir` holds a journal's files rather than a store.
fn holds_journal(dir: &Path) -> bool {
    let Ok(entries) = fs::read_dir(dir) else { return false };
    !Store::exists(dir)
        && entries.filter_map(Result::ok).any(|entry| {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            (name.starts_with("journal-") && name.ends_with(".log"))
                || (name.starts_with("snapshot-") && name.ends_with(".snap"))
        })
}

/// Whether `err`, from opening a store, means the store is damaged.
fn is_damage(err: &Error) -> bool {
    // `Storage` is the engine failing to read its own files, which verify cannot
    // tell apart from damage; the other variants name damaged records.
    matches!(
        err,
        Error::Corrupt { .. }
            | Error::Several(_)
            | Error::Decode { .. }
            | Error::Storage { .. }
            | Error::JournalCorrupt { .. }
            | Error::DatabaseCorrupt { .. }
    )
}

/// The total size of the files under `dir`, not following symbolic links.
fn dir_size(dir: &Path) -> Result<u64, Failure> {
    let cannot_measure = |path: &Path, err: io::Error| {
        Failure::Message(format!("cannot measure {}: {err}", path.display()))
    };
    let mut total = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        let meta = fs::symlink_metadata(&path).map_err(|err| cannot_measure(&path, err))?;
        if meta.is_dir() {
            for entry in fs::read_dir(&path).map_err(|err| cannot_measure(&path, err))? {
                pending.push(entry.map_err(|err| cannot_measure(&path, err))?.path());
            }
        } else {
            total += meta.len();
        }
    }
    Ok(total)
}

/// `n` and `noun`, plural unless `n` is 1: `1 value`, `3 values`.
pub(crate) fn plural(n: usize, noun: &str) -> String {
    plural_u64(n as u64, noun)
}

pub(crate) fn plural_u64(n: u64, noun: &str) -> String {
    if n == 1 { format!("1 {noun}") } else { format!("{n} {noun}s") }
}
