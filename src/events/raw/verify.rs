//! Checking an event store through and through, without its event type and without
//! changing it: [`RawEventsBuilder::verify`](super::RawEventsBuilder::verify).

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
};

use crate::{
    Error, Result,
    crypt::Sealer,
    events::{
        batch,
        index::{Checkpoint, Frames, Index, UNKNOWN_OFFSET},
    },
    io::Io,
    journal::{self, Scanner, Start, Step, Tail, format::journal_name},
    lockfile::Look,
    shape::{Shape, value},
};

/// What checking an event store found; see
/// [`RawEventsBuilder::verify`](super::RawEventsBuilder::verify).
///
/// The check reads every journal file from the first: every frame's checksum, the
/// numbering of the journal events and the links between files, every batch (which
/// must decode whole), the positions (gap-free, in order), every stream's versions
/// (gap-free), the event ids (none twice), and every checkpoint (each must read back
/// and agree with the journal up to where it was taken), and that every event whose
/// data [compaction](crate::events::EventStore::compact) dropped is one the store
/// removed. A checkpoint's offsets of frames in a file that compaction rewrote
/// after it are not compared: the store finds those frames by scanning the file
/// again. When nobody has the store
/// open, it also makes the checks opening the store makes of the journal's ends.
/// When a program has the store open, it checks what is written whole, and passes
/// over an unfinished frame at the end.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Verified {
    /// Whether a program had the store open, so that it was read without a lock.
    pub open_elsewhere: bool,
    /// The events checked (the positions up to the first damage).
    pub events: u64,
    /// The journal events (appends) checked.
    pub appends: u64,
    /// The streams found.
    pub streams: u64,
    /// The checkpoints that were checked against the journal and agree with it.
    pub checkpoints: u64,
    /// What is wrong, in the order found: the first damage of the journal (after
    /// which it cannot be read), and damaged or disagreeing checkpoints. Empty when
    /// the store is sound.
    pub problems: Vec<Damage>,
    /// The bytes of a torn last write (of no acknowledged append), which opening the
    /// store cuts off: not damage.
    pub torn_bytes: u64,
    /// Checkpoints that a program removed while they were being checked.
    pub checkpoints_gone: u64,
    /// How many events' data did not read back from the structure the journal
    /// records for the event type (0 when it records none), and the first of them.
    /// Not counted as damage: the tool's reading of the data without the type can
    /// be wrong where the program's is right.
    pub undecoded_data: u64,
    /// Why the first event's data in `undecoded_data` did not read back.
    pub first_undecoded: Option<String>,
}

/// A problem found, where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Damage {
    /// The file.
    pub path: PathBuf,
    /// The byte offset in it.
    pub offset: u64,
    /// What is wrong.
    pub reason: String,
}

impl Verified {
    /// Whether nothing is wrong.
    #[must_use]
    pub fn is_sound(&self) -> bool {
        self.problems.is_empty()
    }
}

/// One pass over the journal, stopped when a void of events already checked
/// comes: the pass starts again without them.
enum Pass {
    Done(Verified),
    Again((u64, u64)),
}

/// The structure of each schema version of the event type, when recorded.
pub(super) type Shapes = std::collections::BTreeMap<u32, std::result::Result<Shape, String>>;

pub(super) fn verify(
    io: &Io,
    dir: &Path,
    sealer: &Sealer,
    tail: Tail,
    shapes: &Shapes,
) -> Result<Verified> {
    let mut voided = Vec::new();
    loop {
        match pass(io, dir, sealer, tail, shapes, &voided)? {
            Pass::Done(verified) => return Ok(verified),
            Pass::Again(void) => voided.push(void),
        }
    }
}

/// The state of one pass.
struct Check<'a> {
    io: &'a Io,
    dir: &'a Path,
    sealer: &'a Sealer,
    tail: Tail,
    shapes: &'a Shapes,
    index: Index,
    /// Where every event's frame is.
    frames: Frames,
    /// Every event id, and its position.
    ids: HashMap<[u8; 16], u64>,
    /// The checkpoints not checked yet, by the journal events they cover.
    checkpoints: BTreeMap<u64, PathBuf>,
    /// The events whose data compaction dropped: stream, version, position, and
    /// where their frame is.
    dropped: Vec<(String, u64, u64, PathBuf, u64)>,
    /// Whether each journal file (by first event) was rewritten by compaction.
    compacted: HashMap<u64, bool>,
    verified: Verified,
}

fn pass(
    io: &Io,
    dir: &Path,
    sealer: &Sealer,
    tail: Tail,
    shapes: &Shapes,
    voided: &[(u64, u64)],
) -> Result<Pass> {
    // Listed first: a checkpoint is written after the events it covers, so the scan
    // that follows finds them.
    let checkpoints = journal::snapshot_files(io, dir)?.into_iter().collect();
    let mut check = Check {
        io,
        dir,
        sealer,
        tail,
        shapes,
        index: Index::new(0),
        frames: Frames::default(),
        ids: HashMap::new(),
        checkpoints,
        dropped: Vec::new(),
        compacted: HashMap::new(),
        verified: Verified::default(),
    };
    let mut scanner =
        Scanner::new(io.clone(), dir.to_path_buf(), sealer.clone(), tail, Start::default());
    loop {
        let step = match scanner.step() {
            Ok(step) => step,
            Err(Error::JournalCorrupt { path, offset, reason }) => {
                check.verified.problems.push(Damage { path, offset, reason });
                break;
            }
            Err(err) => return Err(err),
        };
        match step {
            Step::Pending => break,
            Step::Void { first, last } => {
                let checked = first < scanner.next_seq();
                if checked && !voided.contains(&(first, last)) {
                    return Ok(Pass::Again((first, last)));
                }
            }
            Step::Event(event) => {
                check.checkpoints_before(event.seq)?;
                if voided.iter().any(|(first, last)| (*first..=*last).contains(&event.seq)) {
                    continue;
                }
                let path = dir.join(journal_name(event.file));
                if let Err(reason) = check.event(&event) {
                    let damage = Damage { path, offset: event.offset, reason };
                    check.verified.problems.push(damage);
                    break;
                }
            }
        }
    }
    let damaged = !check.verified.problems.is_empty();
    check.checkpoints_before(scanner.next_seq())?;
    if !damaged {
        check.dropped_removed();
    }
    if !damaged {
        let held = scanner.next_seq();
        let beyond: Vec<(u64, PathBuf)> =
            std::mem::take(&mut check.checkpoints).into_iter().collect();
        for (events, path) in beyond {
            let reason = format!(
                "the checkpoint covers {events} journal events, and the journal holds {held}"
            );
            check.verified.problems.push(Damage { path, offset: 0, reason });
        }
    }
    let mut verified = check.verified;
    verified.events = check.index.committed;
    verified.appends = check.index.journal_events();
    verified.streams = check.index.streams.len() as u64;
    verified.torn_bytes = scanner.torn().map_or(0, |torn| torn.bytes);
    Ok(Pass::Done(verified))
}

impl Check<'_> {
    /// Checks one journal event: its batch, positions, versions and ids, and its
    /// events' data.
    fn event(&mut self, event: &journal::Scanned) -> std::result::Result<(), String> {
        let (seq, event_file, offset) = (event.seq, event.file, event.offset);
        let command =
            batch::decode_command(&event.plain).map_err(|fault| format!("event {seq}: {fault}"))?;
        let (first, events) = match command {
            batch::Command::Append(_) => {
                batch::decode(&event.plain).map_err(|fault| format!("event {seq}: {fault}"))?
            }
            // A delete, a retention rule or an effect: no event of its own.
            _ => (0, Vec::new()),
        };
        // Positions follow the last event's, and each stream's versions its last.
        self.index.replay(seq, &event.plain).map_err(|reason| format!("event {seq}: {reason}"))?;
        self.index.last_at = event.at.as_micros();
        self.frames.record(event.file, seq, event.offset);
        for (event, position) in events.iter().zip(first..) {
            if let Some(earlier) = self.ids.insert(event.id, position) {
                let id = crate::events::EventId::from_bytes(event.id);
                return Err(format!(
                    "event id {id} comes twice: at positions {earlier} and {position}"
                ));
            }
            let Some(data) = event.data else {
                let path = self.dir.join(journal_name(event_file));
                self.dropped.push((event.stream.to_owned(), event.version, position, path, offset));
                continue;
            };
            // The store would refuse these: damage, not a note.
            if !self.shapes.contains_key(&event.schema) {
                return Err(format!(
                    "the event at position {position} is of version {} of the event type, which no journal file records",
                    event.schema
                ));
            }
            #[cfg(feature = "json")]
            if event.json && serde_json::from_slice::<serde::de::IgnoredAny>(data).is_err() {
                return Err(format!(
                    "the event at position {position} holds JSON that does not parse"
                ));
            }
            if !event.json
                && let Some(Ok(shape)) = self.shapes.get(&event.schema)
                && let Err(reason) = value::decode(shape, data)
            {
                self.verified.undecoded_data += 1;
                self.verified.first_undecoded.get_or_insert_with(|| {
                    format!("event {position} (`{}`): {reason}", event.event_type)
                });
            }
        }
        Ok(())
    }

    /// Checks the checkpoints covering `seq` journal events or fewer against the
    /// index, which holds the first `seq`.
    fn checkpoints_before(&mut self, seq: u64) -> Result<()> {
        while let Some(entry) = self.checkpoints.first_entry() {
            let events = *entry.key();
            if seq < events {
                break;
            }
            let path = entry.remove();
            if events < seq {
                // Passed without being checked: the journal's numbering skips it.
                let reason = format!(
                    "the checkpoint covers {events} journal events, which the journal does not end at"
                );
                self.verified.problems.push(Damage { path, offset: 0, reason });
                continue;
            }
            let loaded = match journal::load_snapshot(self.io, &path, events, None, self.sealer) {
                Ok(Ok(loaded)) => loaded,
                Ok(Err(reason)) => {
                    self.verified.problems.push(Damage { path, offset: 0, reason });
                    continue;
                }
                Err(Error::Io { source, .. })
                    if self.tail == Tail::Live && source.kind() == std::io::ErrorKind::NotFound =>
                {
                    self.verified.checkpoints_gone += 1;
                    continue;
                }
                Err(err) => return Err(err),
            };
            match self.agrees(&loaded) {
                Ok(()) => self.verified.checkpoints += 1,
                Err(reason) => self.verified.problems.push(Damage { path, offset: 0, reason }),
            }
        }
        Ok(())
    }

    /// Whether the checkpoint `loaded` holds what the index holds.
    fn agrees(&mut self, loaded: &journal::LoadedSnapshot) -> std::result::Result<(), String> {
        let checkpoint: Checkpoint =
            journal::decode(&loaded.body, &loaded.path, || "the checkpoint".into())
                .map_err(|err| format!("the checkpoint does not decode: {err}"))?;
        let (saved, frames) = Index::restore(checkpoint, 0)
            .map_err(|reason| format!("the checkpoint does not hold together: {reason}"))?;
        let ours = &self.index;
        let differs =
            |what: String| Err(format!("the checkpoint disagrees with the journal: {what}"));
        if saved.committed != ours.committed {
            return differs(format!(
                "it holds {} events, the journal {}",
                saved.committed, ours.committed
            ));
        }
        if saved.journal_events() != ours.journal_events() {
            return differs(format!(
                "it holds {} appends, the journal {}",
                saved.journal_events(),
                ours.journal_events()
            ));
        }
        // A checkpoint taken while an append to a new stream was planned and not
        // yet committed holds that stream already, without events: it comes after
        // every committed one.
        let planned = saved.streams.get(ours.streams.len()..).unwrap_or_default();
        if saved.streams.len() < ours.streams.len() || planned.iter().any(|it| !it.seqs.is_empty())
        {
            return differs(format!(
                "it holds {} streams, the journal {}",
                saved.streams.len(),
                ours.streams.len()
            ));
        }
        for (theirs, mine) in saved.streams.iter().zip(&ours.streams) {
            if theirs.name != mine.name || theirs.seqs != mine.seqs {
                return differs(format!("stream `{}` is not as the journal has it", theirs.name));
            }
        }
        for seq in 0..ours.journal_events() {
            if saved.start_of(seq) != ours.start_of(seq) {
                return differs(format!("append {seq} starts at another position"));
            }
        }
        if saved.last_at != ours.last_at || loaded.at != ours.last_at {
            return differs("its time is not the last append's".into());
        }
        for (file, offsets) in &frames.files {
            if self.compacted(*file) {
                continue;
            }
            for (seq, offset) in (*file..).zip(offsets) {
                let known =
                    self.frames.find(seq).and_then(|(found, at)| (found == *file).then_some(at?));
                if *offset != UNKNOWN_OFFSET && known != Some(*offset) {
                    return differs(format!(
                        "it puts append {seq} at byte {offset} of {}",
                        journal_name(*file)
                    ));
                }
            }
        }
        Ok(())
    }
}

impl Check<'_> {
    /// Whether journal file `file` was rewritten by compaction, as its header says
    /// (a file that cannot be read counts as not: its offsets are compared).
    fn compacted(&mut self, file: u64) -> bool {
        let (io, path) = (self.io, self.dir.join(journal_name(file)));
        *self.compacted.entry(file).or_insert_with(|| {
            io.open(&path, crate::io::Open::Read)
                .ok()
                .and_then(|handle| journal::read_header(&handle, &path).ok())
                .is_some_and(|(header, _)| header.at != 0)
        })
    }

    /// Checks that every event whose data compaction dropped is one the store
    /// removed: its stream is tombstoned, or the version is below its floor.
    fn dropped_removed(&mut self) {
        for (stream, version, position, path, offset) in std::mem::take(&mut self.dropped) {
            let index = &self.index;
            let life = index.stream(&stream).and_then(|idx| index.get(idx)).map(|it| it.life);
            if life.is_some_and(|life| life.tombstoned || version < life.floor) {
                continue;
            }
            let reason = format!(
                "compaction dropped the data of the event at position {position} (version {version} of `{stream}`), which the store still reads"
            );
            self.verified.problems.push(Damage { path, offset, reason });
        }
    }
}

/// Adds what opening the store would find of the journal's ends (its clean close,
/// its last file) to `verified`, under the shared lock `look`, held meanwhile.
pub(super) fn check_as_opening(
    io: &Io,
    dir: &Path,
    sealer: &Sealer,
    look: Look,
    mut verified: Verified,
) -> Result<Verified> {
    if !verified.is_sound() {
        return Ok(verified);
    }
    // The inspection takes a shared lock of its own, beside ours.
    match journal::inspect(io, dir, sealer) {
        Ok(_) => {}
        Err(Error::JournalCorrupt { path, offset, reason }) => {
            verified.problems.push(Damage { path, offset, reason });
        }
        Err(err) => return Err(err),
    }
    drop(look);
    Ok(verified)
}
