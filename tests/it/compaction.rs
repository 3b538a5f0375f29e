//! Compaction of the event store: the data of removed events leaves the disk, and
//! every read gives what it gave before, also while appends, reads and
//! subscriptions go on, and after a reopen.

#![allow(clippy::indexing_slicing)]

use std::{
    fs,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use instastate::{
    Error,
    events::{
        Append, Condition, Delivery, EventStore, Expected, NewEvent, Position, RawEvents,
        RecordedEvent, Retention,
    },
};

use crate::TestResult;

/// The data of an event that will be removed: long, and findable in the files.
fn secret(n: u32) -> String {
    format!("SECRET-{n:04}-{}", "x".repeat(2_000))
}

fn kept(n: u32) -> String {
    format!("kept-{n}")
}

/// Whether any journal file in `dir` holds `needle`.
fn files_hold(dir: &Path, needle: &[u8]) -> TestResult<bool> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let named = path
            .file_name()
            .and_then(|it| it.to_str())
            .is_some_and(|name| name.starts_with("journal-"));
        let is_journal = named && path.extension().is_some_and(|it| it == "log");
        if is_journal && fs::read(&path)?.windows(needle.len()).any(|it| it == needle) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// A stream read forward, and backward.
type Both = (Vec<RecordedEvent<String>>, Vec<RecordedEvent<String>>);

/// Every read of the store, as it gives it now.
#[derive(Debug, PartialEq)]
struct Reads {
    head: Position,
    streams: Vec<(String, u64)>,
    all: Vec<RecordedEvent<String>>,
    backward: Vec<RecordedEvent<String>>,
    at: Vec<Option<RecordedEvent<String>>>,
    by_stream: Vec<Result<Both, String>>,
    versions: Vec<Option<u64>>,
    subscription: Vec<Delivery<String>>,
    conflict: String,
}

const STREAMS: [&str; 7] = ["kept", "deleted", "truncated", "gone", "counted", "aged", "linked"];

fn reads(events: &EventStore<String>) -> TestResult<Reads> {
    let collect = |it: instastate::events::Events<'_, String>| it.collect::<Result<Vec<_>, _>>();
    let head = events.head()?;
    let mut by_stream = Vec::new();
    for stream in STREAMS {
        let forward = collect(events.read_stream(stream).into_iter());
        let backward = collect(events.read_stream(stream).backward().into_iter());
        by_stream.push(match (forward, backward) {
            (Ok(forward), Ok(backward)) => Ok((forward, backward)),
            (Err(err), _) | (_, Err(err)) => Err(err.to_string()),
        });
    }
    let mut subscription = Vec::new();
    let mut subscribed = events.subscribe_all().from(Position::new(0))?;
    loop {
        match subscribed.next_timeout(Duration::from_secs(10))? {
            Some(Delivery::CaughtUp) => break,
            Some(delivery) => subscription.push(delivery),
            None => return Err("the subscription did not catch up".into()),
        }
    }
    // A removed event's tag still conflicts, as before.
    let appends = [Append::new("kept", Expected::Any, [NewEvent::new(kept(0)).tagged(["t-gone"])])];
    let conflict =
        format!("{:?}", events.check_append_if(&Condition::since(Position::new(0)), appends));
    Ok(Reads {
        head,
        streams: events.streams()?,
        all: collect(events.read_all().into_iter())?,
        backward: collect(events.read_all().backward().into_iter())?,
        at: (0..head.get())
            .map(|at| events.event_at(Position::new(at)))
            .collect::<Result<_, _>>()?,
        by_stream,
        versions: STREAMS
            .iter()
            .map(|stream| events.stream_version(stream))
            .collect::<Result<_, _>>()?,
        subscription,
        conflict,
    })
}

/// Fills a store with every kind of removal, over several journal files; returns
/// how many events it removed.
fn fill(events: &EventStore<String>) -> TestResult<u64> {
    events.append("aged", Expected::NoStream, [secret(1), secret(2)])?;
    // Stamped before this: old enough for `max_age` by the end.
    let aged_at = Instant::now();
    events.append("kept", Expected::NoStream, [kept(1), kept(2)])?;
    events.append("deleted", Expected::NoStream, [secret(3), secret(4)])?;
    let gone = [NewEvent::new(secret(5)).tagged(["t-gone"]).linked_to(["subject"])];
    events.append("gone", Expected::NoStream, gone)?;
    events.append("truncated", Expected::NoStream, [secret(6), secret(7), kept(3)])?;
    events.checkpoint()?;
    events.append("counted", Expected::NoStream, [secret(8), secret(9), kept(4), kept(5)])?;
    let linked = [NewEvent::new(kept(6)).tagged(["t-gone"]).linked_to(["subject"])];
    events.append("linked", Expected::NoStream, linked)?;
    events.delete_stream("deleted", Expected::Any)?;
    events.append("deleted", Expected::Any, [kept(7)])?;
    events.tombstone_stream("gone", Expected::Any)?;
    events.truncate_stream("truncated", 2)?;
    events.set_retention("counted", Retention::default().max_count(2))?;
    events.append_effect("subject", "expired")?;
    events.checkpoint()?;
    events.append("kept", Expected::Any, [kept(8)])?;
    events.set_retention("aged", Retention::default().max_age(Duration::from_secs(1)))?;
    thread::sleep(Duration::from_millis(1_100).saturating_sub(aged_at.elapsed()));
    events.checkpoint()?;
    // The journal goes on in a new file: every file before it can be compacted.
    events.append("kept", Expected::Any, [kept(9)])?;
    Ok(9)
}

#[test]
fn compaction_drops_removed_data_and_every_read_stays_as_it_was() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("events");
    let events = EventStore::<String>::builder().checkpoint_every(u64::MAX).open(&dir)?;
    let removed = fill(&events)?;
    let before = reads(&events)?;
    assert!(files_hold(&dir, b"SECRET-")?);
    assert_eq!(before.all.len(), 9, "{:?}", before.all);

    let compacted = events.compact()?;
    assert_eq!(compacted.events_dropped, removed, "{compacted:?}");
    // The third file holds no removed event: it is left as it is.
    assert_eq!(compacted.files, 2, "{compacted:?}");
    // Both retention rules hid events: they are truncations now.
    assert_eq!(compacted.streams_truncated, 2, "{compacted:?}");
    assert!(compacted.bytes_reclaimed() > 9 * 2_000, "{compacted:?}");
    assert!(!files_hold(&dir, b"SECRET-")?, "removed data is still on disk");
    assert_eq!(reads(&events)?, before);
    // Compacted again, nothing changes.
    let again = events.compact()?;
    assert_eq!((again.files, again.events_dropped, again.streams_truncated), (0, 0, 0));
    assert_eq!(reads(&events)?, before);
    // The tool's view: sound, and the dropped events are removed, without data.
    let verified = RawEvents::builder().verify(&dir)?;
    assert!(verified.is_sound(), "{verified:?}");
    let raw = RawEvents::open(&dir)?;
    let dropped: Vec<_> =
        raw.read_all().into_iter().filter(|it| it.as_ref().is_ok_and(|it| it.dropped)).collect();
    assert_eq!(dropped.len() as u64, removed);
    assert!(dropped.iter().flatten().all(|it| it.removed && it.data.is_empty()));
    drop(raw);

    // Appends go on; a reopen from the checkpoint, and from the journal alone.
    drop(events);
    let events = EventStore::<String>::open(&dir)?;
    assert!(events.recovered().snapshot().is_some());
    assert_eq!(reads(&events)?, before);
    drop(events);
    for entry in fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|it| it == "snap") {
            fs::remove_file(path)?;
        }
    }
    let events = EventStore::<String>::open(&dir)?;
    assert_eq!(events.recovered().snapshot(), None);
    assert_eq!(reads(&events)?, before);

    // What a rule hid stays hidden once the rule is lifted: compaction made it a
    // truncation.
    events.set_retention("counted", Retention::default())?;
    let counted: Vec<String> = events
        .read_stream("counted")
        .into_iter()
        .map(|it| it.map(|it| it.data))
        .collect::<Result<_, _>>()?;
    assert_eq!(counted, [kept(4), kept(5)]);
    Ok(())
}

#[test]
fn a_store_without_removals_is_left_as_it_is() -> TestResult {
    let dir = tempfile::tempdir()?;
    let events = EventStore::<String>::open(dir.path())?;
    events.append("a", Expected::Any, [kept(1)])?;
    events.checkpoint()?;
    events.append("a", Expected::Any, [kept(2)])?;
    let tree = crate::tree::tree(dir.path())?;
    assert_eq!(events.compact()?, instastate::events::Compacted::default());
    assert_eq!(crate::tree::tree(dir.path())?, tree);
    Ok(())
}

/// Appends this many events per writer.
const APPENDS: u32 = 300;

/// Appends `APPENDS` events: each to stream `w-<writer>-<n / 10>`, which gets ten,
/// and of which two in three are truncated or tombstoned once full.
fn write_and_remove(events: &EventStore<String>, writer: u32) -> instastate::Result<()> {
    for n in 0..APPENDS {
        let stream = format!("w-{writer}-{}", n / 10);
        events.append(&stream, Expected::Any, [format!("{writer}:{n}:{}", "y".repeat(300))])?;
        if n % 10 == 9 {
            match n / 10 % 3 {
                0 => events.truncate_stream(&stream, 7)?,
                1 => events.tombstone_stream(&stream, Expected::Any)?,
                _ => {}
            }
        }
    }
    Ok(())
}

/// Reads `$all` and every stream again and again until `done`: each read in order,
/// each stream's versions without a gap. Returns how many rounds it read.
fn read_until(events: &EventStore<String>, done: &AtomicBool) -> instastate::Result<u64> {
    let mut reads = 0;
    while !done.load(Ordering::Acquire) {
        let all: Vec<RecordedEvent<String>> =
            events.read_all().into_iter().collect::<Result<_, _>>()?;
        assert!(all.windows(2).all(|it| it[0].position < it[1].position));
        for (stream, _) in events.streams()? {
            let read = events
                .read_stream(&stream)
                .backward()
                .into_iter()
                .map(|it| it.map(|it| it.version))
                .collect::<Result<Vec<u64>, _>>();
            let read = match read {
                // Tombstoned since it was listed.
                Err(Error::StreamTombstoned { .. }) => continue,
                read => read?,
            };
            assert!(read.windows(2).all(|it| it[0] == it[1] + 1), "{stream}: {read:?}");
        }
        reads += 1;
    }
    Ok(reads)
}

#[test]
fn compaction_under_appends_reads_and_a_subscription_loses_and_repeats_nothing() -> TestResult {
    const WRITERS: u32 = 2;
    let dir = tempfile::tempdir()?;
    let events = EventStore::<String>::builder().checkpoint_every(50).open(dir.path())?;
    let mut subscription = events.subscribe_all().from(Position::new(0))?;
    let done = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let events = events.clone();
        writers.push(thread::spawn(move || write_and_remove(&events, writer)));
    }
    let compactor = {
        let (events, done) = (events.clone(), Arc::clone(&done));
        thread::spawn(move || -> instastate::Result<(u64, u64)> {
            let (mut runs, mut dropped) = (0, 0);
            while !done.load(Ordering::Acquire) {
                dropped += events.compact()?.events_dropped;
                runs += 1;
            }
            Ok((runs, dropped))
        })
    };
    // A reader going through `$all` and the streams again and again meanwhile: each
    // read is in order, without a gap in versions.
    let reader = {
        let (events, done) = (events.clone(), Arc::clone(&done));
        thread::spawn(move || read_until(&events, &done))
    };
    for writer in writers {
        writer.join().map_err(|_| "a writer panicked")??;
    }
    // A last compaction after the writers, so that some run found their files.
    events.checkpoint()?;
    events.append("last", Expected::Any, [kept(0)])?;
    done.store(true, Ordering::Release);
    let (runs, dropped) = compactor.join().map_err(|_| "the compactor panicked")??;
    let reads = reader.join().map_err(|_| "the reader panicked")??;
    let last = events.compact()?;
    eprintln!(
        "{runs} compactions dropped {dropped} events' data meanwhile, {} after; {reads} reads",
        last.events_dropped
    );
    assert!(0 < dropped + last.events_dropped);

    // Every event appended that is not removed, once, in order; and the
    // subscription saw every event committed while it was live (it started before
    // the first append, and saw each before it could be removed or after: either
    // way once), in position order.
    let all: Vec<RecordedEvent<String>> =
        events.read_all().into_iter().collect::<Result<_, _>>()?;
    for writer in 0..WRITERS {
        let mine: Vec<u32> = all
            .iter()
            .filter_map(|it| it.data.split(':').collect::<Vec<_>>().get(..2).map(<[&str]>::to_vec))
            .filter(|it| it[0] == writer.to_string())
            .map(|it| it[1].parse::<u32>())
            .collect::<Result<_, _>>()?;
        let expected: Vec<u32> = (0..APPENDS)
            .filter(|n| match n / 10 % 3 {
                0 => n % 10 >= 7,
                1 => false,
                _ => true,
            })
            .collect();
        assert_eq!(mine, expected, "writer {writer}");
    }
    let mut seen = Vec::new();
    while let Some(delivery) = subscription.next_timeout(Duration::from_millis(200))? {
        if let Delivery::Event(event) = delivery {
            seen.push(event.position.get());
        }
        if seen.last() == Some(&(events.head()?.get() - 1)) {
            break;
        }
    }
    assert!(seen.windows(2).all(|it| it[0] < it[1]), "in order, each once");
    let positions: Vec<u64> = all.iter().map(|it| it.position.get()).collect();
    assert!(positions.iter().all(|it| seen.contains(it)), "the subscription missed an event");
    drop(events);
    let events = EventStore::<String>::open(dir.path())?;
    let reopened: Vec<RecordedEvent<String>> =
        events.read_all().into_iter().collect::<Result<_, _>>()?;
    assert_eq!(reopened, all);
    let verified = RawEvents::builder().verify(dir.path())?;
    assert!(verified.is_sound(), "{verified:?}");
    Ok(())
}

#[test]
fn a_reader_with_the_old_file_open_reads_on() -> TestResult {
    let dir = tempfile::tempdir()?;
    let events = EventStore::<String>::builder().read_cache(0).open(dir.path())?;
    for n in 0..40 {
        events.append(&format!("s{}", n % 4), Expected::Any, [secret(n)])?;
    }
    events.tombstone_stream("s1", Expected::Any)?;
    events.truncate_stream("s2", 5)?;
    events.checkpoint()?;
    events.append("s0", Expected::Any, [kept(0)])?;
    let expected: Vec<RecordedEvent<String>> =
        events.read_all().into_iter().collect::<Result<_, _>>()?;
    // Readers in the middle of the file, going forward and backward, and one that
    // has the old file open.
    let mut forward = events.read_all().into_iter();
    let mut backward = events.read_stream("s3").backward().into_iter();
    let first = forward.next().transpose()?;
    let last = backward.next().transpose()?;
    assert!(events.compact()?.events_dropped > 0);
    let mut read = first.into_iter().collect::<Vec<_>>();
    read.extend(forward.collect::<Result<Vec<_>, _>>()?);
    assert_eq!(read, expected);
    let mut stream = last.into_iter().collect::<Vec<_>>();
    stream.extend(backward.collect::<Result<Vec<_>, _>>()?);
    let expected_stream: Vec<_> =
        expected.iter().filter(|it| it.stream == "s3").rev().cloned().collect();
    assert_eq!(stream, expected_stream);
    // Stream reads at random go through the frame table, now of the new file.
    for n in [0, 3] {
        let read: Vec<_> =
            events.read_stream(&format!("s{n}")).into_iter().collect::<Result<Vec<_>, _>>()?;
        assert!(!read.is_empty());
    }
    Ok(())
}

#[test]
fn damage_in_a_file_to_compact_is_reported_and_nothing_is_changed() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("events");
    {
        let events = EventStore::<String>::open(&dir)?;
        events.append("a", Expected::Any, [secret(1), secret(2)])?;
        events.truncate_stream("a", 1)?;
        events.checkpoint()?;
        events.append("a", Expected::Any, [kept(1)])?;
    }
    let first = dir.join(format!("journal-{:020}.log", 0));
    let mut bytes = fs::read(&first)?;
    let flip = bytes.len() / 2;
    bytes[flip] ^= 0x40;
    fs::write(&first, &bytes)?;
    // The damage is before the checkpoint: the store opens, and compaction finds it.
    let events = EventStore::<String>::open(&dir)?;
    let res = events.compact();
    assert!(matches!(res, Err(Error::JournalCorrupt { .. })), "{res:?}");
    assert_eq!(fs::read(&first)?, bytes, "a refused compaction changed the file");
    Ok(())
}

#[cfg(feature = "encryption")]
#[test]
fn an_encrypted_store_is_compacted_and_sealed_again() -> TestResult {
    use instastate::EncryptionKey;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("events");
    let key = || EncryptionKey::from_bytes([0x3c; 32]);
    let open = || EventStore::<String>::builder().encryption_key(key()).open(&dir);
    let events = open()?;
    let removed = fill(&events)?;
    let before = reads(&events)?;
    let compacted = events.compact()?;
    assert_eq!(compacted.events_dropped, removed);
    assert!(compacted.bytes_reclaimed() > 9 * 2_000, "{compacted:?}");
    assert_eq!(reads(&events)?, before);
    drop(events);
    let events = open()?;
    assert_eq!(reads(&events)?, before);
    drop(events);
    let verified = RawEvents::builder().encryption_key(key()).verify(&dir)?;
    assert!(verified.is_sound(), "{verified:?}");
    // Without the key, nothing opens.
    let res = EventStore::<String>::open(&dir).map(drop);
    assert!(matches!(res, Err(Error::Encryption { .. })), "{res:?}");
    Ok(())
}

#[test]
fn a_checkpoint_from_before_a_compaction_still_opens_and_reads() -> TestResult {
    // A crash after a file was replaced and before the checkpoint that follows
    // leaves the checkpoint before, whose frame table has the old offsets.
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("events");
    let events =
        EventStore::<String>::builder().checkpoint_every(u64::MAX).read_cache(0).open(&dir)?;
    for n in 0..30 {
        events.append(&format!("s{}", n % 3), Expected::Any, [secret(n)])?;
    }
    events.tombstone_stream("s0", Expected::Any)?;
    events.truncate_stream("s1", 6)?;
    events.append("s2", Expected::Any, [kept(1)])?;
    // Read, so that the checkpoint's table knows where the frames are.
    assert_eq!(events.read_all().into_iter().count(), 15);
    events.checkpoint()?;
    events.append("s2", Expected::Any, [kept(2)])?;
    let expected: Vec<RecordedEvent<String>> =
        events.read_all().into_iter().collect::<Result<_, _>>()?;
    let snapshots = |dir: &Path| -> TestResult<Vec<std::path::PathBuf>> {
        let mut found = Vec::new();
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|it| it == "snap") {
                found.push(path);
            }
        }
        found.sort();
        Ok(found)
    };
    let before = snapshots(&dir)?;
    assert!(0 < events.compact()?.events_dropped);
    drop(events);
    for path in snapshots(&dir)? {
        if !before.contains(&path) {
            fs::remove_file(path)?;
        }
    }
    // The tool's view starts its scan where the old table says, and finds the frame
    // is not there.
    let raw = RawEvents::open(&dir)?;
    assert_eq!(raw.checkpoint(), Some(33));
    let read: Vec<_> = raw.read_all().into_iter().collect::<Result<Vec<_>, _>>()?;
    assert_eq!(read.iter().filter(|it| !it.removed).count(), expected.len());
    drop(raw);
    let events = EventStore::<String>::open(&dir)?;
    assert_eq!(events.recovered().snapshot(), Some(33));
    let all: Vec<RecordedEvent<String>> =
        events.read_all().into_iter().collect::<Result<_, _>>()?;
    assert_eq!(all, expected);
    for stream in ["s1", "s2"] {
        let read: Vec<RecordedEvent<String>> =
            events.read_stream(stream).backward().into_iter().collect::<Result<_, _>>()?;
        let want: Vec<_> =
            expected.iter().filter(|it| it.stream == stream).rev().cloned().collect();
        assert_eq!(read, want);
    }
    let verified = RawEvents::builder().verify(&dir)?;
    assert!(verified.is_sound(), "{verified:?}");
    Ok(())
}
