//! Entry points of the fuzz targets in `fuzz/`, behind the `fuzz` feature: not
//! public API, and exempt from semantic versioning.
//!
//! Each function feeds arbitrary bytes to a decoder of bytes read from disk, and
//! panics only when a property that must hold for every input fails: decoding
//! never panics, hangs or allocates without bound, what decodes encodes back to
//! the same value, and a journal is judged alike by every reader of it.
//!
//! Checksums guard every format, and a fuzzer rarely forges a CRC-32. So each
//! input is tried twice: as it is, and with its checksums made to match
//! ("fixed"), which lets the fuzzer reach the parsing behind them. The committed
//! corpus (`fuzz/corpus/<target>/`) is replayed by `tests/fuzz_corpus.rs` on
//! every test run.

#![allow(clippy::missing_panics_doc, reason = "a panic here is a found bug, which is the point")]

use std::{fs, path::Path};

use crate::{
    Error, Prevayler, StateCell, Store,
    codec::{self, Manifest, Record, Witness},
    journal::{
        Recovery,
        format::{self, Extra, Header},
    },
    lockfile,
    prevalence::identity,
    shape::Shape,
};

/// A record, as the engine stores it under `cell/<name>`.
pub fn record(data: &[u8]) {
    for bytes in [data.to_vec(), with_crc(data)] {
        if let Ok(record) = Record::decode(&bytes) {
            let again = record.encode();
            assert_eq!(Record::decode(&again), Ok(record), "a record does not round-trip");
        }
    }
}

/// A history manifest, as the engine stores it under `history/<generation>`.
pub fn manifest(data: &[u8]) {
    for bytes in [data.to_vec(), with_crc(data)] {
        if let Ok(manifest) = Manifest::decode(&bytes) {
            let again = manifest.encode().expect("a decoded manifest's names fit their field");
            assert_eq!(Manifest::decode(&again), Ok(manifest), "a manifest does not round-trip");
        }
    }
}

/// The small things a store keeps besides records and manifests, the first byte
/// choosing which: the old list of claimed names, a witness slot, a type's
/// structure, a lock file.
pub fn store_meta(data: &[u8]) {
    let Some((&which, data)) = data.split_first() else { return };
    match which % 4 {
        0 => {
            for bytes in [data.to_vec(), with_crc(data)] {
                let _ = codec::decode_claimed(&bytes);
            }
        }
        1 => {
            for bytes in [data.to_vec(), with_crc(data)] {
                if let Ok(witness) = Witness::decode(&bytes) {
                    let again = witness.encode();
                    assert_eq!(
                        Witness::decode(&again),
                        Ok(witness),
                        "a witness does not round-trip"
                    );
                }
            }
        }
        2 => {
            if let Ok(shape) = Shape::decode(data) {
                let again = Shape::decode(&shape.encode()).expect("an encoded shape decodes");
                assert!(again == shape, "a shape does not round-trip");
                assert_eq!(again.checksum(), shape.checksum());
                assert!(Shape::differences(&shape, &again).is_empty());
            }
        }
        _ => lockfile::fuzz_decode(data),
    }
}

/// A journal file of a `Prevayler<u64, u64>`. The first byte's low bit says
/// whether the rest is a whole file (header included), or the frames after a
/// sound header; the next bit, whether each frame's checksum is fixed.
///
/// The properties: opening never panics; [`PrevaylerBuilder::inspect`] and
/// opening agree on whether the journal is sound (opening may still fail to
/// decode an event), and on how many events it holds; opening again after a
/// successful open (which cut any torn tail) finds the same state; salvaging
/// finds the same state as a strict open that succeeds.
///
/// [`PrevaylerBuilder::inspect`]: crate::prevalence::PrevaylerBuilder::inspect
pub fn journal(data: &[u8]) {
    let Some((&flags, data)) = data.split_first() else { return };
    let mut file = if flags & 1 == 0 { journal_header() } else { Vec::new() };
    let frames_at = file.len();
    file.extend_from_slice(data);
    if flags & 2 != 0 {
        fix_frames(&mut file, frames_at);
    }
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path().join("journal");
    fs::create_dir(&dir).expect("a journal directory");
    fs::write(dir.join(format::journal_name(0)), &file).expect("the journal file");
    check_journal(tmp.path(), &dir);
}

/// A snapshot file of a `Prevayler<u64, u64>` covering 3 events. The first byte's
/// low bit says whether the rest is a whole file, or the encoded state behind a
/// sound header (whose body checksum then holds); the next bit, whether the
/// journal file that follows the snapshot (empty, its first event 3) is there, as
/// it is in a journal that took a snapshot, or the snapshot is alone.
///
/// The properties are those of [`journal`].
pub fn snapshot(data: &[u8]) {
    const EVENTS: u64 = 3;
    let Some((&flags, data)) = data.split_first() else { return };
    let file = if flags & 1 == 0 {
        let extra = Extra::Body { len: data.len() as u64, crc: crc32fast::hash(data) };
        let mut file = Header::new(&identity::<u64, u64>(), 1, false, EVENTS, 7, extra).encode();
        file.extend_from_slice(data);
        file
    } else {
        data.to_vec()
    };
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path().join("journal");
    fs::create_dir(&dir).expect("a journal directory");
    fs::write(dir.join(format::snapshot_name(EVENTS)), &file).expect("the snapshot file");
    if flags & 2 != 0 {
        let header =
            Header::new(&identity::<u64, u64>(), 1, false, EVENTS, 0, Extra::KeyCheck(Vec::new()));
        fs::write(dir.join(format::journal_name(EVENTS)), header.encode()).expect("a journal file");
    }
    check_journal(tmp.path(), &dir);
}

/// The command an event store journals for an append: its heads and its events.
/// What decodes re-encodes to the same bytes, and the heads agree with the events.
pub fn event_batch(data: &[u8]) {
    use crate::events::batch::{self, Command, EventIn, PartIn};
    // Deletes and retention rules re-encode to what they mean.
    match batch::decode_command(data) {
        Ok(Command::Delete { stream, removal, before }) => {
            let again = batch::encode_delete(stream, removal, before);
            let read = batch::decode_command(&again).expect("an encoded delete decodes");
            assert!(
                matches!(read, Command::Delete { stream: s, removal: r, before: b } if (s, r, b) == (stream, removal, before)),
                "a delete does not round-trip"
            );
        }
        Ok(Command::Retention { stream, rules }) => {
            let again = batch::encode_retention(stream, rules);
            let read = batch::decode_command(&again).expect("an encoded retention decodes");
            assert!(
                matches!(read, Command::Retention { stream: s, rules: r } if (s, r) == (stream, rules)),
                "a retention does not round-trip"
            );
        }
        Ok(Command::Effect { trigger, reason, forgotten }) => {
            let again = batch::encode_effect(trigger, reason, forgotten);
            let read = batch::decode_command(&again).expect("an encoded effect decodes");
            assert!(
                matches!(read, Command::Effect { trigger: t, reason: r, forgotten: f } if (t, r, f) == (trigger, reason, forgotten)),
                "an effect does not round-trip"
            );
        }
        Ok(Command::Append(_)) | Err(_) => {}
    }
    let head = batch::decode_head(data);
    let Ok((first_position, events)) = batch::decode(data) else { return };
    let head = head.expect("a batch that decodes has heads that decode");
    assert_eq!(head.first_position, first_position);
    let count: usize = head.parts.iter().map(batch::PartHead::len).sum();
    assert_eq!(count, events.len(), "the heads count the events");
    let links = head.links().expect("the links of a batch that decodes read alone");
    let named = events.iter().enumerate();
    let flat_tags: Vec<(usize, &str)> =
        named.clone().flat_map(|(k, event)| event.tags.iter().map(move |it| (k, *it))).collect();
    let flat_triggers: Vec<(usize, &str)> =
        named.flat_map(|(k, event)| event.triggers.iter().map(move |it| (k, *it))).collect();
    assert_eq!(links.tags, flat_tags, "the tags read alone");
    assert_eq!(links.triggers, flat_triggers, "the triggers read alone");
    let strings =
        |names: &[&str]| -> Vec<String> { names.iter().map(|it| (*it).to_owned()).collect() };
    let tags: Vec<(Vec<String>, Vec<String>)> =
        events.iter().map(|event| (strings(&event.tags), strings(&event.triggers))).collect();
    let ins: Vec<EventIn<'_>> = events
        .iter()
        .zip(&tags)
        .map(|(event, (tags, triggers))| EventIn {
            id: event.id,
            event_type: event.event_type,
            causation: event.causation,
            correlation: event.correlation,
            tags,
            triggers,
            json: event.json,
            schema: event.schema,
            data: event.data.unwrap_or_default(),
        })
        .collect();
    let mut parts = Vec::new();
    let mut at = 0;
    for part in &head.parts {
        let events = ins.get(at..at + part.len()).expect("the heads count the events");
        parts.push(PartIn { stream: part.stream, first_version: part.first_version, events });
        at += part.len();
    }
    // A varint may have been written longer than it needs: compare what it means.
    // Events whose data compaction dropped are dropped again.
    let again = batch::encode(first_position, &parts);
    let dropped = |k: usize, _: &str, _: u64| events.get(k).is_some_and(|it| it.data.is_none());
    let again = match batch::drop_data(&again, dropped) {
        Ok(Some((compacted, _))) => compacted,
        Ok(None) => again,
        Err(fault) => panic!("an encoded batch does not compact: {fault}"),
    };
    let (first_again, events_again) = batch::decode(&again).expect("an encoded batch decodes");
    assert_eq!(
        (first_again, &events_again),
        (first_position, &events),
        "a batch does not round-trip"
    );
}

/// An export file, imported into a store whose one cell, a `u64`, may be among
/// those it holds. With the first byte's low bit set, the file's checksum is
/// fixed. An import is all or nothing: a refused one leaves the cell alone.
pub fn export(data: &[u8]) {
    static CELL: StateCell<u64> = StateCell::new("fuzz::CELL", || 0);
    let Some((&flags, data)) = data.split_first() else { return };
    let bytes = if flags & 1 == 0 { data.to_vec() } else { with_crc(data) };
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let path = tmp.path().join("export");
    fs::write(&path, bytes).expect("the export file");
    let store = Store::builder().cell(&CELL).in_memory().expect("an in-memory store");
    CELL.set(5);
    let before = store.generation();
    if store.import_from(&path).is_ok() {
        assert_eq!(store.generation(), before + 1, "an import is one save");
    } else {
        assert_eq!(store.generation(), before, "a refused import saved something");
        assert_eq!(CELL.get(), 5, "a refused import changed a cell");
    }
}

/// `data` followed by its CRC-32, as the store's formats end.
fn with_crc(data: &[u8]) -> Vec<u8> {
    let mut bytes = data.to_vec();
    bytes.extend_from_slice(&codec::u32_bytes(codec::checksum(data)));
    bytes
}

/// A sound journal header of a `Prevayler<u64, u64>` whose first event is 0.
fn journal_header() -> Vec<u8> {
    Header::new(&identity::<u64, u64>(), 1, false, 0, 0, Extra::KeyCheck(Vec::new())).encode()
}

/// Makes the checksum of every whole frame from `at` on match its payload.
fn fix_frames(file: &mut [u8], mut at: usize) {
    loop {
        let Some(&len) = file.get(at..).and_then(|rest| rest.first_chunk::<4>()) else { return };
        let len = u32::from_le_bytes(len) as usize;
        let start = at + format::FRAME_HEAD;
        let Some(payload) = file.get(start..start.saturating_add(len)) else { return };
        let crc = crc32fast::hash(payload).to_le_bytes();
        let Some(field) = file.get_mut(at + 4..start) else { return };
        field.copy_from_slice(&crc);
        at = start + len;
    }
}

fn add(total: &mut u64, by: u64, _: crate::Timestamp) -> u64 {
    *total = total.wrapping_add(by);
    *total
}

/// Opens the journal in `dir` every way there is, checking that they agree; `tmp`
/// holds copies.
fn check_journal(tmp: &Path, dir: &Path) {
    let inspected = Prevayler::builder::<u64>().inspect(dir);
    let salvage_dir = tmp.join("salvage");
    copy_dir(dir, &salvage_dir);
    let strict = Prevayler::builder::<u64>().recovery(Recovery::Strict).open(dir, 0, add);
    let opened = match (&inspected, strict) {
        (Ok(report), Ok(opened)) => {
            assert_eq!(report.events, opened.events(), "inspect and open count apart");
            Some((opened.read(|total| *total), opened.events()))
        }
        // Inspecting reads no event, and knows no types: only opening finds an
        // event that does not decode, or a sound header written for other types or
        // schema versions.
        (
            Ok(_),
            Err(
                Error::JournalDecode { .. }
                | Error::JournalType { .. }
                | Error::JournalSchema { .. },
            ),
        )
        | (Err(_), Err(_)) => None,
        (Ok(report), Err(err)) => panic!("inspect found {report:?}, open failed: {err}"),
        (Err(err), Ok(_)) => panic!("inspect failed ({err}), open succeeded"),
    };
    if let Some(found) = opened {
        let again = Prevayler::builder::<u64>().recovery(Recovery::Strict).open(dir, 0, add);
        let again = again.unwrap_or_else(|err| panic!("a second open failed: {err}"));
        assert_eq!((again.read(|total| *total), again.events()), found, "reopening differs");
    }
    let salvaged =
        Prevayler::builder::<u64>().recovery(Recovery::Salvage).open(&salvage_dir, 0, add);
    match (opened, salvaged) {
        (Some(found), Ok(salvaged)) => {
            assert_eq!(
                (salvaged.read(|total| *total), salvaged.events()),
                found,
                "salvage differs"
            );
        }
        (Some(_), Err(err)) => panic!("a strict open succeeded, salvaging failed: {err}"),
        (None, _) => {}
    }
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir(to).expect("a copy's directory");
    for entry in fs::read_dir(from).expect("a listing") {
        let entry = entry.expect("an entry");
        fs::copy(entry.path(), to.join(entry.file_name())).expect("a copy");
    }
}

/// Inputs to start each target's corpus from, by target: the encoders' own output
/// for every format version, and files that real stores and journals wrote.
/// `tests/fuzz_corpus.rs` writes them to `fuzz/corpus/` when asked to.
#[must_use]
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut seeds = Vec::new();
    let mut seed = |target: &'static str, flags: Option<u8>, bytes: &[u8]| {
        seeds.push((target, flags.into_iter().chain(bytes.iter().copied()).collect()));
    };
    let saved = Some(codec::Saved { generation: 9, at_ms: 1_700_000_000_000 });
    let bodies = [
        codec::Body::Inline(b"\x05hello"),
        codec::Body::Inline(b""),
        codec::Body::File { id: 3, len: 70_000, crc: 0xdead_beef },
    ];
    for (format, saved, shape) in [
        (codec::FORMAT_V1, None, None),
        (codec::FORMAT_V2, saved, None),
        (codec::FORMAT_VERSION, saved, Some(0x1234_5678)),
    ] {
        for body in bodies.clone() {
            let type_name = "alloc::string::String";
            let record = Record { format, schema: 2, saved, type_name, shape, body };
            let bytes = record.encode();
            seed("record", None, &bytes);
            seed("record", None, bytes.split_last_chunk::<4>().map_or(&[][..], |it| it.0));
        }
    }
    let manifests = [
        Manifest { generation: 1, at_ms: 5, entries: Vec::new() },
        Manifest {
            generation: 7,
            at_ms: 1_700_000_000_000,
            entries: vec![("app::COUNT".into(), None), ("app::NAME".into(), Some(vec![1, 2, 3]))],
        },
    ];
    for manifest in manifests {
        let bytes = manifest.encode().expect("short names fit");
        seed("manifest", None, &bytes);
        seed("manifest", None, bytes.split_last_chunk::<4>().map_or(&[][..], |it| it.0));
    }
    let claimed = codec::encode_claimed(["app::A", "app::B"].into_iter()).expect("short names");
    seed("store_meta", Some(0), &claimed);
    let witness = Witness { generation: 4, digest: codec::Digest { records: 3, xor: 0xfeed } };
    seed("store_meta", Some(1), &witness.encode());
    for shape in
        [Shape::of::<u64>(), Shape::of::<Vec<(String, Option<i32>)>>(), Shape::of::<Sample>()]
    {
        seed("store_meta", Some(2), &shape.expect("a traceable type").encode());
    }
    for bytes in lockfile::fuzz_seeds() {
        seed("store_meta", Some(3), &bytes);
    }

    let (journals, snapshots) = journal_files();
    for file in journals {
        seed("journal", Some(1), &file);
        seed("journal", Some(3), &file);
        let header = journal_header().len();
        let frames = file.get(header..).unwrap_or_default();
        seed("journal", Some(0), frames);
        seed("journal", Some(2), frames);
    }
    for file in snapshots {
        seed("snapshot", Some(1), &file);
        seed("snapshot", Some(3), &file);
    }
    for state in [0u64, 3, u64::MAX] {
        let state = postcard::to_stdvec(&state).expect("a u64 encodes");
        seed("snapshot", Some(0), &state);
        seed("snapshot", Some(2), &state);
    }
    seed("snapshot", Some(0), b"");
    seed("event_batch", None, &event_batch_seed());
    for file in export_files() {
        seed("export", Some(0), &file);
        seed("export", Some(1), file.split_last_chunk::<4>().map_or(&[][..], |it| it.0));
    }
    seeds
}

/// An append of two streams, one event with every optional part.
fn event_batch_seed() -> Vec<u8> {
    use crate::events::batch::{self, EventIn, PartIn};
    let tags = vec!["account-1".to_owned(), "bank".to_owned()];
    let events = [
        EventIn {
            id: [1; 16],
            event_type: "Opened",
            causation: Some([2; 16]),
            correlation: Some([3; 16]),
            tags: &tags,
            triggers: &tags,
            json: false,
            schema: 1,
            data: b"\x05alice",
        },
        EventIn {
            id: [4; 16],
            event_type: "Deposited",
            causation: None,
            correlation: None,
            tags: &[],
            triggers: &[],
            json: true,
            schema: 3,
            data: &[100],
        },
    ];
    batch::encode(
        300,
        &[
            PartIn {
                stream: "account-1",
                first_version: 0,
                events: events.get(..1).unwrap_or_default(),
            },
            PartIn {
                stream: "account-2",
                first_version: 7,
                events: events.get(1..).unwrap_or_default(),
            },
        ],
    )
}

/// A type with every kind of container serde has, for shapes.
#[derive(serde::Serialize, serde::Deserialize)]
enum Sample {
    Unit,
    Tuple(u8, i64),
    Struct { name: String, tags: std::collections::BTreeMap<String, Vec<bool>> },
}

/// The journal and snapshot files a `Prevayler<u64, u64>` writes: several files
/// linked to each other, check frames, and a snapshot.
fn journal_files() -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let counter = Prevayler::builder::<u64>()
        .replay_check(|total| *total)
        .open(tmp.path(), 0, add)
        .expect("a new journal opens");
    for by in 1..=3 {
        counter.handle(by).expect("an event is journaled");
    }
    counter.snapshot().expect("a snapshot is taken");
    for by in [40, u64::MAX] {
        counter.handle(by).expect("an event is journaled");
    }
    counter.close().expect("the journal closes");
    let (mut journals, mut snapshots) = (Vec::new(), Vec::new());
    for entry in fs::read_dir(tmp.path()).expect("a listing") {
        let path = entry.expect("an entry").path();
        let name = path.file_name().and_then(|it| it.to_str()).unwrap_or_default();
        match format::parse_name(name) {
            Some((format::FileKind::Journal, _)) => journals.push(fs::read(&path).expect("a file")),
            Some((format::FileKind::Snapshot, _)) => {
                snapshots.push(fs::read(&path).expect("a file"));
            }
            None => {}
        }
    }
    (journals, snapshots)
}

/// Export files of stores holding the export target's cell, another cell, a value
/// in a value file, and nothing.
fn export_files() -> Vec<Vec<u8>> {
    static OTHER: StateCell<String> = StateCell::new("fuzz::OTHER", String::new);
    static LARGE: StateCell<Vec<u8>> = StateCell::new("fuzz::LARGE", Vec::new);
    static CELL: StateCell<u64> = StateCell::new("fuzz::CELL", || 0);
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let mut files = Vec::new();
    for (n, full) in [false, true].into_iter().enumerate() {
        let dir = tmp.path().join(format!("store-{n}"));
        let store = Store::builder().cell(&OTHER).cell(&LARGE).open(&dir).expect("a store opens");
        if full {
            OTHER.set("some text".into());
            LARGE.set(vec![7; 10_000]);
        }
        store.save_all().expect("a save");
        let path = tmp.path().join(format!("export-{n}"));
        store.export_to(&path).expect("an export");
        files.push(fs::read(&path).expect("an export file"));
    }
    let store = Store::builder().cell(&CELL).in_memory().expect("an in-memory store");
    CELL.set(77);
    store.save_all().expect("a save");
    let path = tmp.path().join("export-cell");
    store.export_to(&path).expect("an export");
    files.push(fs::read(&path).expect("an export file"));
    files
}
