//! The commands for event stores: `list` and `verify` of one, `read`, `follow`.
//!
//! All of them go through `instastate::events::RawEvents`, which reads the journal
//! without the program's event type and changes nothing in the directory. When the
//! program has the store open, they read it without a lock (`follow` always does),
//! and only what is written whole.

use std::{
    fmt::Write as _,
    io::Write,
    path::Path,
    process::ExitCode,
    thread,
    time::{Duration, UNIX_EPOCH},
};

use instastate::{
    Error,
    events::{Locking, RawEvent, RawEvents, RawEventsBuilder, Verified},
};

use crate::{Chain, Failure, FollowArgs, ReadArgs, StoreArgs, commands, format};

/// The name that reads every stream, in position order.
const ALL: &str = "$all";

/// The view of the event store in `args.dir`, or `None` when the directory holds
/// no event store (another command handles it).
pub(crate) fn try_open(args: &StoreArgs) -> Result<Option<RawEvents>, Failure> {
    // The tool reads event stores in files only; a database holds a store of cells.
    if args.is_database() {
        return Ok(None);
    }
    match builder(args)?.open(&args.dir) {
        Ok(raw) => Ok(Some(raw)),
        Err(Error::NotAnEventStore { .. }) => Ok(None),
        Err(err) => Err(err.into()),
    }
}

/// `list` of an event store: a summary, then its streams.
pub(crate) fn list(args: &StoreArgs, raw: &RawEvents, out: &mut impl Write) -> Result<(), Failure> {
    let streams = raw.streams();
    let mut notes = Vec::new();
    if raw.encrypted() {
        notes.push("encrypted".to_owned());
    }
    if let Some(covered) = raw.checkpoint() {
        notes.push(format!("last checkpoint after {}", commands::plural_u64(covered, "append")));
    }
    if 0 < raw.torn_bytes() {
        notes.push(format!("torn last write of {}", format::size(raw.torn_bytes())));
    }
    if raw.open_elsewhere() {
        notes.push("open in a running program: read without a lock".to_owned());
    }
    let notes = if notes.is_empty() { String::new() } else { format!(" ({})", notes.join("; ")) };
    writeln!(
        out,
        "event store {}: {} in {}, head position {}, {} of `{}`{notes}",
        args.shown(),
        commands::plural_u64(raw.head().get(), "event"),
        commands::plural(streams.len(), "stream"),
        raw.head(),
        commands::plural_u64(raw.appends(), "append"),
        raw.data_type(),
    )?;
    if streams.is_empty() {
        return Ok(());
    }
    let rows: Vec<[String; 3]> = streams
        .iter()
        .map(|stream| {
            [stream.name.clone(), stream.events.to_string(), stream.last_version.to_string()]
        })
        .collect();
    writeln!(out)?;
    format::table(out, ["STREAM", "EVENTS", "LAST VERSION"], &rows)?;
    Ok(())
}

/// `read`: the events of a stream or of `$all`.
pub(crate) fn read(args: &ReadArgs, out: &mut impl Write) -> Result<ExitCode, Failure> {
    let raw = open(&args.store, Locking::SharedIfFree)?;
    let mut read = if args.stream == ALL {
        raw.read_all()
    } else {
        if args.prefix.is_some() {
            return Err(Failure::Message(format!(
                "--prefix filters the streams of `{ALL}`; give `{ALL}` as the stream, or leave --prefix out"
            )));
        }
        raw.read_stream(&args.stream)
    };
    if args.backward {
        read = read.backward();
    }
    if let Some(from) = args.from {
        read = read.from(from);
    }
    if let Some(event_type) = &args.event_type {
        read = read.of_type(event_type);
    }
    if let Some(prefix) = &args.prefix {
        read = read.stream_prefix(prefix);
    }
    // The limit counts the events shown: removed ones are passed over unless asked
    // for, so the read's own limit would count them too.
    let mut left = args.limit;
    for event in read {
        if left == Some(0) {
            break;
        }
        let event = event?;
        if args.removed || !event.removed {
            show(&raw, &event, args.json, out)?;
            left = left.map(|left| left - 1);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `follow`: the events from a position on, then each new one as the program
/// appends it, until stopped.
pub(crate) fn follow(args: &FollowArgs, out: &mut impl Write) -> Result<ExitCode, Failure> {
    let mut raw = open(&args.store, Locking::Never)?;
    let stream_len = |raw: &RawEvents, stream: &str| {
        raw.streams().into_iter().find(|it| it.name == stream).map_or(0, |it| it.events)
    };
    // The next position (or version of the stream) to show.
    let mut next = match (&args.from, &args.stream) {
        (Some(from), _) => *from,
        (None, Some(stream)) => stream_len(&raw, stream),
        (None, None) => raw.head().get(),
    };
    let poll = Duration::from_millis(args.poll_ms.max(1));
    loop {
        let (mut read, end) = match &args.stream {
            Some(stream) => (raw.read_stream(stream), stream_len(&raw, stream)),
            None => (raw.read_all(), raw.head().get()),
        };
        read = read.from(next);
        if let Some(event_type) = &args.event_type {
            read = read.of_type(event_type);
        }
        if let Some(prefix) = &args.prefix {
            read = read.stream_prefix(prefix);
        }
        for event in read {
            let event = event?;
            if !event.removed {
                show(&raw, &event, args.json, out)?;
            }
        }
        next = next.max(end);
        out.flush()?;
        thread::sleep(poll);
        raw.refresh()?;
    }
}

/// `verify` of an event store, or `None` when the directory holds none.
pub(crate) fn verify(args: &StoreArgs, out: &mut impl Write) -> Result<Option<ExitCode>, Failure> {
    if args.is_database() {
        return Ok(None);
    }
    let dir = args.shown();
    let verified = match builder(args)?.verify(&args.dir) {
        Ok(verified) => verified,
        Err(Error::NotAnEventStore { .. }) => return Ok(None),
        Err(err @ Error::JournalCorrupt { .. }) => {
            writeln!(out, "cannot read the journal: {}", Chain(&err))?;
            writeln!(out, "event store {dir} is NOT sound")?;
            return Ok(Some(ExitCode::FAILURE));
        }
        Err(err) => return Err(err.into()),
    };
    report(args, &verified, out)?;
    Ok(Some(if verified.is_sound() { ExitCode::SUCCESS } else { ExitCode::FAILURE }))
}

fn report(args: &StoreArgs, verified: &Verified, out: &mut impl Write) -> Result<(), Failure> {
    let dir = args.shown();
    if verified.open_elsewhere {
        writeln!(
            out,
            "note: event store {dir} is open in a running program; checked without a lock what \
             is written whole"
        )?;
    }
    if 0 < verified.torn_bytes {
        writeln!(
            out,
            "note: the last write was torn by a crash ({}, of no acknowledged append); opening \
             the store cuts it off",
            format::size(verified.torn_bytes)
        )?;
    }
    if 0 < verified.checkpoints_gone {
        let gone = commands::plural_u64(verified.checkpoints_gone, "checkpoint");
        writeln!(out, "note: the program removed {gone} while it was checked")?;
    }
    if let Some(first) = &verified.first_undecoded {
        writeln!(
            out,
            "note: the data of {} does not read back from the recorded structure of the event \
             type, first {first}; the program's own type may still read it",
            commands::plural_u64(verified.undecoded_data, "event")
        )?;
    }
    for damage in &verified.problems {
        writeln!(out, "{} at byte {}: {}", damage.path.display(), damage.offset, damage.reason)?;
    }
    if !verified.is_sound() {
        let found = commands::plural(verified.problems.len(), "problem");
        writeln!(out, "event store {dir} is NOT sound: {found}")?;
        return Ok(());
    }
    writeln!(
        out,
        "event store {dir} is sound: {} in {}, {}, {} checked",
        commands::plural_u64(verified.events, "event"),
        commands::plural_u64(verified.streams, "stream"),
        commands::plural_u64(verified.appends, "append"),
        commands::plural_u64(verified.checkpoints, "checkpoint"),
    )?;
    Ok(())
}

fn builder(args: &StoreArgs) -> Result<RawEventsBuilder, Failure> {
    let builder = RawEvents::builder();
    Ok(match commands::read_key(args)? {
        Some(key) => builder.encryption_key(key),
        None => builder,
    })
}

/// Whether the directory `dir`, which holds journal files, is an event store's (not
/// a Prevayler directory's): looked at without a lock, and without a key.
pub(crate) fn is_event_store(dir: &Path) -> bool {
    let opened = RawEvents::builder().locking(Locking::Never).open(dir);
    !matches!(opened, Err(Error::NotAnEventStore { .. }))
}

/// `history` of an event store, which keeps no history of saves: what it holds;
/// `None` when the directory holds no event store.
pub(crate) fn history(args: &StoreArgs, out: &mut impl Write) -> Result<Option<ExitCode>, Failure> {
    let raw = match builder(args)?.locking(Locking::Never).open(&args.dir) {
        Ok(raw) => raw,
        Err(Error::NotAnEventStore { .. }) => return Ok(None),
        Err(err) => return Err(err.into()),
    };
    let (events, streams) = (raw.head().get(), raw.streams().len());
    writeln!(
        out,
        "event store {}: {events} event{} appended, {streams} stream{}; an event store keeps no history of saves: `read` shows its events",
        args.shown(),
        if events == 1 { "" } else { "s" },
        if streams == 1 { "" } else { "s" },
    )?;
    Ok(Some(ExitCode::SUCCESS))
}

/// Opens the event store `args` names, saying so when the directory holds none.
fn open(args: &StoreArgs, locking: Locking) -> Result<RawEvents, Failure> {
    match builder(args)?.locking(locking).open(&args.dir) {
        Ok(raw) => Ok(raw),
        Err(Error::NotAnEventStore { reason, .. }) => Err(Failure::Message(format!(
            "no event store at {}: {reason}",
            if args.dir.as_os_str().is_empty() { Path::new("\"\"") } else { &args.dir }.display()
        ))),
        Err(err) => Err(err.into()),
    }
}

/// Writes `event`: one line of text, or one JSON object.
/// What `read` shows for the data of an event that compaction dropped.
const DROPPED: &str = "its data was dropped by compaction";

fn show(
    raw: &RawEvents,
    event: &RawEvent,
    json: bool,
    out: &mut impl Write,
) -> Result<(), Failure> {
    // A removed event whose data compaction dropped has nothing to decode: said
    // so, not shown as data that fails to decode.
    let data = if event.dropped {
        Err(DROPPED.to_owned())
    } else {
        raw.decode(event).map_err(|err| err.to_string())
    };
    if json {
        let (value, note) = match &data {
            Ok(value) => match serde_json::to_value(value) {
                Ok(value) => (Some(value), None),
                // A number JSON cannot hold (past 64 bits), say: in hex, with why.
                Err(err) => (None, Some(format!("the data cannot be written as JSON: {err}"))),
            },
            Err(err) => (None, Some(err.clone())),
        };
        let mut line = serde_json::json!({
            "position": event.position.get(),
            "stream": event.stream,
            "version": event.version,
            "time": iso_time(event),
            "time_micros": event.at.as_micros(),
            "id": event.id.to_string(),
            "type": event.event_type,
            "causation": event.metadata.causation.map(|id| id.to_string()),
            "correlation": event.metadata.correlation.map(|id| id.to_string()),
            "tags": event.tags,
            "triggers": event.triggers,
            "removed": event.removed,
            "data": value,
        });
        if let (Some(note), Some(fields)) = (note, line.as_object_mut()) {
            if !event.dropped {
                fields.insert("data_hex".into(), hex(&event.data).into());
            }
            fields.insert("data_note".into(), note.into());
        }
        writeln!(out, "{line}")?;
        return Ok(());
    }
    let shown = match &data {
        Ok(value) => value.to_string(),
        Err(_) if event.dropped => format!("({DROPPED})"),
        Err(err) => format!("0x{} (not decoded: {err})", hex(&event.data)),
    };
    let mut line = format!(
        "{}  {} v{}  {}  {}  {}  {shown}",
        event.position,
        event.stream,
        event.version,
        text_time(event),
        event.event_type,
        event.id
    );
    if let Some(id) = event.metadata.causation {
        let _ = write!(line, "  causation={id}");
    }
    if let Some(id) = event.metadata.correlation {
        let _ = write!(line, "  correlation={id}");
    }
    if !event.tags.is_empty() {
        let _ = write!(line, "  tags={}", event.tags.join(","));
    }
    if !event.triggers.is_empty() {
        let _ = write!(line, "  triggers={}", event.triggers.join(","));
    }
    if event.removed {
        line.push_str("  removed");
    }
    writeln!(out, "{line}")?;
    Ok(())
}

/// The event's time in UTC, `YYYY-MM-DD HH:MM:SS.ffffff`.
fn text_time(event: &RawEvent) -> String {
    let micros = event.at.as_micros();
    let secs = UNIX_EPOCH + Duration::from_secs(micros / 1_000_000);
    format!("{}.{:06}", format::time(secs), micros % 1_000_000)
}

/// The event's time in UTC as RFC 3339: `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
fn iso_time(event: &RawEvent) -> String {
    format!("{}Z", text_time(event).replacen(' ', "T", 1))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut text, byte| {
        // Writing to a `String` cannot fail.
        let _ = write!(text, "{byte:02x}");
        text
    })
}
