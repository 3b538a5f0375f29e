//! What an event store keeps in memory about its events: the streams and their
//! versions, the positions of each journal event's batch, the recent event ids, and
//! where each journal event's frame is in the journal files. The events themselves
//! stay on disk.
//!
//! Per event it holds 8 bytes in its stream's list of journal events, and per journal
//! event (a batch) 8 bytes for the batch's first position and 8 for its frame's
//! offset; the recent ids are a bounded window.
//!
//! **Invariant:** `committed` values only count batches whose journal event is as
//! durable as the store's mode promises and whose job ran, in journal order; the
//! `reserved` values also count batches prepared and not yet committed. Reads use
//! only the committed ones.

use std::collections::{BTreeMap, HashMap, VecDeque};

use foldhash::fast::RandomState;

use serde::{Deserialize, Serialize};

use super::batch::{self, BatchHead, Command, Links, Removal, Rules};

/// A stream's number in the index.
pub(crate) type StreamIdx = u32;

/// An event carrying a tag: where it is. The index keeps them per tag, in position
/// order, for conditional appends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Tagged {
    pub(crate) position: u64,
    pub(crate) stream: StreamIdx,
    pub(crate) version: u64,
}

/// A stream as a batch to commit names it: by number when planned here, by name
/// when read back.
enum Named<'a> {
    Idx(StreamIdx),
    Name(&'a str),
}

/// Where a recent event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Seen {
    pub(crate) stream: StreamIdx,
    pub(crate) version: u64,
    pub(crate) position: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Stream {
    pub(crate) name: String,
    /// The journal event holding each of its committed events, by version: a
    /// stream read goes straight to the batch, without a search by position.
    pub(crate) seqs: Vec<u64>,
    /// Its versions handed out, committed or not: the next event's version.
    pub(crate) reserved: u64,
    /// What is removed of it, and its rules, as the committed commands say.
    pub(crate) life: Life,
    /// The same, with the commands planned and not yet committed: what appends are
    /// checked against.
    pub(crate) planned: Life,
}

/// What has been removed of a stream, and its retention rules.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Life {
    /// Its events below this version are gone: deleted or truncated.
    pub(crate) floor: u64,
    /// Deleted (softly), and not appended to since: it has no event.
    pub(crate) deleted: bool,
    /// Gone for good: appends are refused.
    pub(crate) tombstoned: bool,
    pub(crate) rules: Rules,
}

impl Life {
    /// Applies a delete command.
    pub(crate) fn remove(&mut self, removal: Removal, before: u64) {
        self.floor = self.floor.max(before);
        match removal {
            Removal::Soft => self.deleted = true,
            Removal::Tombstone => self.tombstoned = true,
            Removal::Truncate => {}
        }
    }

    /// The first version a reader may see of a stream of `len` events (the age
    /// rule aside).
    pub(crate) fn visible_from(&self, len: u64) -> u64 {
        let kept = self.rules.max_count.map_or(0, |count| len.saturating_sub(count));
        self.floor.max(kept)
    }
}

/// The in-memory index of an event store.
#[derive(Debug, Default)]
pub(crate) struct Index {
    by_name: HashMap<String, StreamIdx, RandomState>,
    pub(crate) streams: Vec<Stream>,
    /// Per journal event, by its number: the position of its batch's first event.
    /// The positions of journal event `seq` run up to the next one's start (or to
    /// `committed`). A journal event without events (voided, or not an append) has
    /// an empty range.
    starts: Vec<u64>,
    /// The committed events: the next position a reader may not read.
    pub(crate) committed: u64,
    /// The positions handed out, committed or not.
    pub(crate) reserved: u64,
    /// The timestamp of the last committed journal event, in microseconds.
    pub(crate) last_at: u64,
    recent: Recent,
    /// The events carrying each tag, reserved ones included, in position order.
    tags: HashMap<String, Vec<Tagged>, RandomState>,
    /// Whether a stream has anything removed or a retention rule: reads check
    /// each event only then.
    pub(crate) ruled: bool,
    /// The positions of the events linked to each trigger, reserved ones included.
    triggers: HashMap<String, Vec<u64>, RandomState>,
    /// The effects committed, in journal order.
    pub(crate) effects: Vec<EffectRecord>,
}

/// An effect on a trigger, as the index keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct EffectRecord {
    /// The head when it was committed: it comes after the events before it.
    pub(crate) head: u64,
    pub(crate) trigger: String,
    pub(crate) reason: String,
    /// The subject key generations below it are destroyed (0: none).
    pub(crate) forgotten: u64,
}

/// The ids of the most recent events, for idempotent appends.
#[derive(Debug, Default)]
struct Recent {
    capacity: usize,
    by_id: HashMap<[u8; 16], Seen, RandomState>,
    order: VecDeque<[u8; 16]>,
}

/// Where the frames of the journal events are: per journal file (by the number of
/// its first event), the offset of each event's frame, by number. Filled by
/// recovery, and by reads that scan a file for frames it does not know yet.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(crate) struct Frames {
    pub(crate) files: BTreeMap<u64, Vec<u64>>,
}

/// What a journal offset table entry holds for a journal event recovery did not
/// see (a voided one, which no read needs).
pub(crate) const UNKNOWN_OFFSET: u64 = u64::MAX;

impl Frames {
    /// Records that journal event `seq`'s frame is at `offset` in file `file`.
    pub(crate) fn record(&mut self, file: u64, seq: u64, offset: u64) {
        let offsets = self.files.entry(file).or_default();
        let Some(idx) = seq.checked_sub(file).and_then(|idx| usize::try_from(idx).ok()) else {
            return;
        };
        if offsets.len() <= idx {
            offsets.resize(idx, UNKNOWN_OFFSET);
            offsets.push(offset);
        } else if let Some(slot) = offsets.get_mut(idx) {
            *slot = offset;
        }
    }

    /// The table of the journal events below `events` only: a checkpoint covering
    /// `events` journal events records nothing of the later ones, whose frames a
    /// recovery after it may put elsewhere.
    pub(crate) fn below(&self, events: u64) -> Frames {
        let mut files = BTreeMap::new();
        for (&file, offsets) in self.files.range(..events) {
            let keep = usize::try_from(events - file).unwrap_or(usize::MAX).min(offsets.len());
            files.insert(file, offsets.get(..keep).unwrap_or_default().to_vec());
        }
        Frames { files }
    }

    /// The file holding journal event `seq` as far as this table knows (the one
    /// with the greatest first event not after it), and the offset of its frame if
    /// known.
    pub(crate) fn find(&self, seq: u64) -> Option<(u64, Option<u64>)> {
        let (&file, offsets) = self.files.range(..=seq).next_back()?;
        let idx = usize::try_from(seq - file).ok()?;
        let offset = offsets.get(idx).copied().filter(|offset| *offset != UNKNOWN_OFFSET);
        Some((file, offset))
    }
}

/// The index and the frame table as a checkpoint (a journal snapshot) stores them.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Checkpoint {
    streams: Vec<(String, Vec<u64>)>,
    starts: Vec<u64>,
    committed: u64,
    last_at: u64,
    recent: Vec<([u8; 16], Seen)>,
    frames: Frames,
    tags: Vec<(String, Vec<Tagged>)>,
    lives: Vec<(StreamIdx, Life)>,
    triggers: Vec<(String, Vec<u64>)>,
    effects: Vec<EffectRecord>,
}

impl Index {
    /// An empty index keeping the ids of the last `recent` events.
    pub(crate) fn new(recent: usize) -> Index {
        Index { recent: Recent { capacity: recent, ..Recent::default() }, ..Index::default() }
    }

    /// The stream named `name`, if it has ever had a version handed out.
    pub(crate) fn stream(&self, name: &str) -> Option<StreamIdx> {
        self.by_name.get(name).copied()
    }

    /// The stream named `name`, made if it is new.
    pub(crate) fn stream_or_new(&mut self, name: &str) -> StreamIdx {
        if let Some(idx) = self.by_name.get(name) {
            return *idx;
        }
        // A store would run out of memory long before it held 4 billion streams.
        #[allow(clippy::expect_used)]
        let idx = StreamIdx::try_from(self.streams.len()).expect("fewer than 2^32 streams");
        self.streams.push(Stream { name: name.to_owned(), ..Stream::default() });
        self.by_name.insert(name.to_owned(), idx);
        idx
    }

    pub(crate) fn get(&self, idx: StreamIdx) -> Option<&Stream> {
        self.streams.get(idx as usize)
    }

    pub(crate) fn get_mut(&mut self, idx: StreamIdx) -> Option<&mut Stream> {
        self.streams.get_mut(idx as usize)
    }

    /// Where the recent event `id` is, if it is among the recent ones.
    pub(crate) fn seen(&self, id: &[u8; 16]) -> Option<Seen> {
        self.recent.by_id.get(id).copied()
    }

    /// Notes the ids of a prepared batch, so that a retry of it is recognised even
    /// before it is committed.
    pub(crate) fn note_ids(&mut self, ids: impl IntoIterator<Item = ([u8; 16], Seen)>) {
        for (id, seen) in ids {
            self.recent.insert(id, seen);
        }
    }

    /// The events carrying `tag`, in position order.
    pub(crate) fn tagged(&self, tag: &str) -> &[Tagged] {
        self.tags.get(tag).map_or(&[], Vec::as_slice)
    }

    /// Notes that the event at `tagged` carries `tag`; events come in position
    /// order.
    pub(crate) fn note_tag(&mut self, tag: &str, tagged: Tagged) {
        match self.tags.get_mut(tag) {
            Some(list) => list.push(tagged),
            None => {
                self.tags.insert(tag.to_owned(), vec![tagged]);
            }
        }
    }

    /// Commits journal event `seq`, the command `bytes` read back from the journal,
    /// as opening the store does. Returns a description of what is wrong with a
    /// command that does not decode or does not follow what the index holds.
    pub(crate) fn replay(&mut self, seq: u64, bytes: &[u8]) -> Result<(), String> {
        let stream_ok =
            |stream: &str| super::stream_id::check(stream).map_err(|err| err.to_string());
        match batch::decode_command(bytes).map_err(|fault| fault.to_string())? {
            Command::Append(head) => {
                let links = head.links().map_err(|fault| fault.to_string())?;
                self.commit(seq, &head)?;
                self.note_batch_links(&head, &links);
            }
            Command::Delete { stream, removal, before } => {
                stream_ok(stream)?;
                self.commit_command(seq, stream, |life| life.remove(removal, before))?;
            }
            Command::Retention { stream, rules } => {
                stream_ok(stream)?;
                self.commit_command(seq, stream, |life| life.rules = rules)?;
            }
            Command::Effect { trigger, reason, forgotten } => {
                self.commit_effect(seq, trigger, reason, forgotten)?;
            }
        }
        Ok(())
    }

    /// Commits journal event `seq`, a command removing events of stream `stream`
    /// (made if it is new), or setting its `rules`.
    pub(crate) fn commit_command(
        &mut self,
        seq: u64,
        stream: &str,
        change: impl FnOnce(&mut Life),
    ) -> Result<(), String> {
        self.commit_seq(seq)?;
        let idx = self.stream_or_new(stream);
        if let Some(stream) = self.get_mut(idx) {
            change(&mut stream.life);
        }
        self.ruled = true;
        Ok(())
    }

    /// Whether a reader no longer sees version `version` of stream `stream`,
    /// appended at `at`, when the clock says `now` (microseconds).
    pub(crate) fn hides(&self, stream: &str, version: u64, at: u64, now: u64) -> bool {
        let Some(stream) = self.stream(stream).and_then(|idx| self.get(idx)) else {
            return false;
        };
        let life = &stream.life;
        life.tombstoned
            || version < life.visible_from(stream.seqs.len() as u64)
            || life.rules.max_age.is_some_and(|age| age < now.saturating_sub(at))
    }

    /// After a replay: what the planned lives start from.
    pub(crate) fn settle(&mut self) {
        for stream in &mut self.streams {
            stream.planned = stream.life;
        }
    }

    /// Notes that the event at `position` is linked to `trigger`; events come in
    /// position order.
    pub(crate) fn note_trigger(&mut self, trigger: &str, position: u64) {
        match self.triggers.get_mut(trigger) {
            Some(list) => list.push(position),
            None => {
                self.triggers.insert(trigger.to_owned(), vec![position]);
            }
        }
    }

    /// The positions of the events linked to `trigger`, in order.
    pub(crate) fn triggered(&self, trigger: &str) -> &[u64] {
        self.triggers.get(trigger).map_or(&[], Vec::as_slice)
    }

    /// Commits journal event `seq`, an effect.
    pub(crate) fn commit_effect(
        &mut self,
        seq: u64,
        trigger: &str,
        reason: &str,
        forgotten: u64,
    ) -> Result<(), String> {
        self.commit_seq(seq)?;
        let (trigger, reason) = (trigger.to_owned(), reason.to_owned());
        self.effects.push(EffectRecord { head: self.committed, trigger, reason, forgotten });
        Ok(())
    }

    /// Notes the tags and triggers of a batch read back and committed, as
    /// [`BatchHead::links`] reads them.
    pub(crate) fn note_batch_links(&mut self, batch: &BatchHead<'_>, links: &Links<'_>) {
        for &(k, trigger) in &links.triggers {
            self.note_trigger(trigger, batch.first_position + k as u64);
        }
        let tags = &links.tags;
        if tags.is_empty() {
            return;
        }
        let mut places = Vec::new();
        for part in &batch.parts {
            let Some(idx) = self.stream(part.stream) else { continue };
            places.extend((0..part.len() as u64).map(|k| (idx, part.first_version + k)));
        }
        for &(k, tag) in tags {
            if let Some(&(stream, version)) = places.get(k) {
                let position = batch.first_position + k as u64;
                self.note_tag(tag, Tagged { position, stream, version });
            }
        }
    }

    /// Commits journal event `seq`, the append batch read back from the journal
    /// whose heads are `batch`: its events get their positions and versions.
    /// Returns a description of the mismatch when the batch does not follow what
    /// the index holds (damage, or a bug).
    pub(crate) fn commit(&mut self, seq: u64, batch: &BatchHead<'_>) -> Result<(), String> {
        let parts = batch
            .parts
            .iter()
            .map(|part| (Named::Name(part.stream), part.first_version, part.ids()));
        self.commit_parts(seq, batch.first_position, parts)
    }

    /// Commits journal event `seq`, whose batch puts events with `ids` in stream
    /// `idx` from `first_version` on, part after part, from `first_position` on.
    pub(crate) fn commit_planned(
        &mut self,
        seq: u64,
        first_position: u64,
        parts: &[(StreamIdx, u64, Vec<[u8; 16]>)],
    ) -> Result<(), String> {
        let parts = parts.iter().map(|(idx, first_version, ids)| {
            (Named::Idx(*idx), *first_version, ids.iter().copied())
        });
        self.commit_parts(seq, first_position, parts)
    }

    fn commit_parts<'a, I: Iterator<Item = [u8; 16]>>(
        &mut self,
        seq: u64,
        first_position: u64,
        parts: impl Iterator<Item = (Named<'a>, u64, I)>,
    ) -> Result<(), String> {
        if first_position != self.committed {
            return Err(format!(
                "journal event {seq} holds positions from {first_position}, where {} comes next",
                self.committed
            ));
        }
        // Every part is checked before anything changes: a batch that does not
        // follow the index leaves it as it was, never half committed.
        let parts: Vec<(StreamIdx, u64, I)> = parts
            .map(|(named, first_version, ids)| {
                let idx = match named {
                    Named::Idx(idx) => idx,
                    Named::Name(name) => self.stream_or_new(name),
                };
                (idx, first_version, ids)
            })
            .collect();
        let mut nexts: Vec<(StreamIdx, u64)> = Vec::with_capacity(parts.len());
        for (idx, first_version, ids) in &parts {
            let Some(stream) = self.streams.get(*idx as usize) else {
                return Err(format!("journal event {seq} names a stream the index lacks"));
            };
            // A stream that comes twice goes on where its first part ended.
            let next = nexts
                .iter()
                .rev()
                .find(|(seen, _)| seen == idx)
                .map_or(stream.seqs.len() as u64, |(_, next)| *next);
            if *first_version != next {
                return Err(format!(
                    "journal event {seq} holds stream `{}` from version {first_version}, where {next} comes next",
                    stream.name,
                ));
            }
            let (_, len) = ids.size_hint();
            nexts.push((*idx, next + len.unwrap_or(0) as u64));
        }
        self.commit_seq(seq)?;
        let mut position = first_position;
        for (idx, _, ids) in parts {
            let Some(stream) = self.streams.get_mut(idx as usize) else { continue };
            let before = stream.seqs.len();
            for id in ids {
                let version = stream.seqs.len() as u64;
                stream.seqs.push(seq);
                self.recent.insert(id, Seen { stream: idx, version, position });
                position += 1;
            }
            stream.reserved = stream.reserved.max(stream.seqs.len() as u64);
            if before < stream.seqs.len() {
                // An append brings a deleted stream back.
                stream.life.deleted = false;
            }
        }
        self.committed = position;
        self.reserved = self.reserved.max(position);
        Ok(())
    }

    /// How many journal events the index holds: the next one's number.
    pub(crate) fn journal_events(&self) -> u64 {
        self.starts.len() as u64
    }

    /// Commits journal event `seq`, which holds no event (a voided one, passed over
    /// by recovery, comes in as the gap before the next).
    fn commit_seq(&mut self, seq: u64) -> Result<(), String> {
        let Ok(seq_idx) = usize::try_from(seq) else {
            return Err(format!("journal event {seq} is out of range"));
        };
        if seq_idx < self.starts.len() {
            return Err(format!("journal event {seq} comes twice"));
        }
        // Journal events without events of their own (voided ones) start where the
        // next one does.
        self.starts.resize(seq_idx + 1, self.committed);
        Ok(())
    }

    /// The journal event whose batch holds position `position`.
    pub(crate) fn seq_of(&self, position: u64) -> Option<u64> {
        if self.committed <= position {
            return None;
        }
        let after = self.starts.partition_point(|start| *start <= position);
        after.checked_sub(1).map(|seq| seq as u64)
    }

    /// Whether journal event `seq`'s batch, which starts at `position`, holds it:
    /// the next journal event starts after it.
    pub(crate) fn seq_of_next_holds(&self, seq: u64, position: u64) -> bool {
        let end = usize::try_from(seq + 1).ok().and_then(|next| self.starts.get(next)).copied();
        position < end.unwrap_or(self.committed)
    }

    /// The position of the first event of journal event `seq`'s batch.
    pub(crate) fn start_of(&self, seq: u64) -> Option<u64> {
        self.starts.get(usize::try_from(seq).ok()?).copied()
    }

    /// The index and `frames` as a checkpoint stores them.
    pub(crate) fn checkpoint(&self, frames: &Frames) -> Checkpoint {
        Checkpoint {
            streams: self
                .streams
                .iter()
                .map(|stream| (stream.name.clone(), stream.seqs.clone()))
                .collect(),
            starts: self.starts.clone(),
            committed: self.committed,
            last_at: self.last_at,
            // Only the committed events' ids: a batch planned and not committed may
            // never be, and its positions go to others.
            recent: self
                .recent
                .order
                .iter()
                .filter_map(|id| Some((*id, self.seen(id)?)))
                .filter(|(_, seen)| seen.position < self.committed)
                .collect(),
            frames: frames.clone(),
            // Only the committed events: the checkpoint covers nothing after them.
            tags: self
                .tags
                .iter()
                .map(|(tag, list)| {
                    let committed = list.partition_point(|it| it.position < self.committed);
                    (tag.clone(), list.get(..committed).unwrap_or_default().to_vec())
                })
                .filter(|(_, list)| !list.is_empty())
                .collect(),
            lives: (0..)
                .zip(&self.streams)
                .filter(|(_, stream)| stream.life != Life::default())
                .map(|(idx, stream)| (idx, stream.life))
                .collect(),
            triggers: self
                .triggers
                .iter()
                .map(|(trigger, list)| {
                    let committed = list.partition_point(|it| *it < self.committed);
                    (trigger.clone(), list.get(..committed).unwrap_or_default().to_vec())
                })
                .filter(|(_, list)| !list.is_empty())
                .collect(),
            effects: self.effects.clone(),
        }
    }

    /// The index and frame table a checkpoint holds, keeping the ids of the last
    /// `recent` events.
    /// Says what is wrong with a checkpoint that does not hold together.
    pub(crate) fn restore(
        checkpoint: Checkpoint,
        recent: usize,
    ) -> Result<(Index, Frames), String> {
        let Checkpoint {
            streams,
            starts,
            committed,
            last_at,
            recent: ids,
            frames,
            tags,
            lives,
            triggers,
            effects,
        } = checkpoint;
        let mut index = Index::new(recent);
        for (name, seqs) in streams {
            let idx = index.stream_or_new(&name);
            if let Some(stream) = index.get_mut(idx) {
                stream.reserved = seqs.len() as u64;
                stream.seqs = seqs;
            }
        }
        index.starts = starts;
        index.committed = committed;
        index.reserved = committed;
        index.last_at = last_at;
        index.note_ids(ids);
        index.tags = tags.into_iter().collect();
        index.triggers = triggers.into_iter().collect();
        index.effects = effects;
        for (idx, life) in lives {
            let Some(stream) = index.get_mut(idx) else {
                return Err(format!("it removes events of stream number {idx}, which it lacks"));
            };
            stream.life = life;
            stream.planned = life;
            index.ruled = true;
        }
        Ok((index, frames))
    }
}

impl Recent {
    fn insert(&mut self, id: [u8; 16], seen: Seen) {
        if self.capacity == 0 {
            return;
        }
        if self.by_id.insert(id, seen).is_none() {
            self.order.push_back(id);
        }
        self.trim();
    }

    fn trim(&mut self) {
        while self.capacity < self.order.len() {
            if let Some(old) = self.order.pop_front() {
                self.by_id.remove(&old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::batch::{self, EventIn, PartIn};

    fn event(id: u8) -> EventIn<'static> {
        EventIn {
            id: [id; 16],
            event_type: "E",
            causation: None,
            correlation: None,
            tags: &[],
            triggers: &[],
            json: false,
            schema: 1,
            data: &[],
        }
    }

    #[test]
    fn batches_get_positions_and_versions_and_voided_events_none() {
        let mut index = Index::new(2);
        let batch = |first_position, stream, first_version, ids: &[u8]| {
            let events: Vec<EventIn<'_>> = ids.iter().map(|id| event(*id)).collect();
            batch::encode(first_position, &[PartIn { stream, first_version, events: &events }])
        };
        let commit = |index: &mut Index, seq, bytes: Vec<u8>| {
            index.commit(seq, &batch::decode_head(&bytes).expect("a batch"))
        };
        commit(&mut index, 0, batch(0, "a", 0, &[1, 2])).expect("first batch");
        // Journal event 1 was voided: recovery passes over it.
        commit(&mut index, 2, batch(2, "b", 0, &[3])).expect("after a gap");
        commit(&mut index, 3, batch(3, "a", 2, &[4])).expect("a again");
        assert_eq!(index.committed, 4);
        let a = index.stream("a").and_then(|idx| index.get(idx)).expect("stream a");
        assert_eq!(a.seqs, [0, 0, 3]);
        assert_eq!(
            (index.seq_of(1), index.seq_of(2), index.seq_of(3), index.seq_of(4)),
            (Some(0), Some(2), Some(3), None)
        );
        // Only the last two ids are kept.
        assert_eq!(
            (index.seen(&[4; 16]).map(|it| it.version), index.seen(&[1; 16])),
            (Some(2), None)
        );
        assert!(commit(&mut index, 4, batch(5, "a", 3, &[5])).is_err(), "a gap in positions");
        assert!(commit(&mut index, 4, batch(4, "a", 9, &[5])).is_err(), "a gap in versions");
        assert!(commit(&mut index, 3, batch(4, "a", 3, &[5])).is_err(), "a number twice");

        let mut frames = Frames::default();
        frames.record(0, 0, 40);
        frames.record(0, 2, 90);
        assert_eq!(
            (frames.find(0), frames.find(1), frames.find(2)),
            (Some((0, Some(40))), Some((0, None)), Some((0, Some(90))))
        );
        let (restored, frames) = Index::restore(index.checkpoint(&frames), 2).expect("restores");
        assert_eq!(
            restored.stream("a").and_then(|idx| restored.get(idx)).map(|it| it.seqs.clone()),
            Some(vec![0, 0, 3])
        );
        assert_eq!(
            (restored.committed, restored.seq_of(3), restored.seen(&[3; 16]).map(|it| it.position)),
            (4, Some(3), Some(2))
        );
        assert_eq!(frames.find(2), Some((0, Some(90))));
    }
}
