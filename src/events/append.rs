//! Appending: what a caller expects of a stream ([`Expected`]), what it asks for
//! ([`Append`]) and gets ([`Appended`]), and the planning of a batch under the
//! journal's lock: expectations checked, retries recognised, versions and positions
//! handed out.

use std::{fmt, ops::Range};

use super::{
    EventId, NewEvent,
    batch::{self, EventIn, PartIn},
    condition::{self, Condition},
    index::{Index, Seen, StreamIdx, Tagged},
    stream_id,
};
use crate::{Error, Result};

/// What an append expects of its stream: optimistic concurrency.
///
/// A writer that read a stream at version `v` appends with `Expected::Exact(v)`:
/// if another writer appended meanwhile, the append is refused with
/// [`Error::WrongExpectedVersion`], carrying the version the stream is at, and
/// nothing is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Expected {
    /// Whatever the stream holds, or if it does not exist.
    Any,
    /// The stream has no event yet.
    NoStream,
    /// The stream has at least one event.
    StreamExists,
    /// The stream's last event has this version.
    Exact(u64),
}

impl Expected {
    /// Whether a stream whose last event has version `last` (`None`: no event,
    /// or deleted) is as this expects.
    pub(crate) fn holds(self, last: Option<u64>) -> bool {
        match self {
            Expected::Any => true,
            Expected::NoStream => last.is_none(),
            Expected::StreamExists => last.is_some(),
            Expected::Exact(version) => last == Some(version),
        }
    }
}

impl fmt::Display for Expected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expected::Any => f.write_str("any version"),
            Expected::NoStream => f.write_str("no stream"),
            Expected::StreamExists => f.write_str("an existing stream"),
            Expected::Exact(version) => write!(f, "version {version}"),
        }
    }
}

/// The events of one stream in an append of several
/// ([`EventStore::append_all`](super::EventStore::append_all)).
#[derive(Debug, Clone)]
pub struct Append<E> {
    pub(crate) stream: String,
    pub(crate) expected: Expected,
    pub(crate) events: Vec<NewEvent<E>>,
}

impl<E> Append<E> {
    /// Appends `events` to `stream`, which must be as `expected` says.
    pub fn new(
        stream: impl Into<String>,
        expected: Expected,
        events: impl IntoIterator<Item = impl Into<NewEvent<E>>>,
    ) -> Append<E> {
        Append {
            stream: stream.into(),
            expected,
            events: events.into_iter().map(Into::into).collect(),
        }
    }
}

/// What an append of one stream did: the versions and positions its events got.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Appended {
    /// The stream.
    pub stream: String,
    /// The versions the events got, in order; empty for an append of no event.
    pub versions: Range<u64>,
    /// The positions the events got, in order; empty for an append of no event.
    pub positions: Range<u64>,
}

impl Appended {
    /// The stream's version after the append: its last event's, or `None` when it
    /// has no event.
    #[must_use]
    pub fn last_version(&self) -> Option<u64> {
        self.versions.end.checked_sub(1)
    }
}

/// An event encoded for its batch.
pub(crate) struct Encoded {
    pub(crate) id: EventId,
    pub(crate) event_type: String,
    pub(crate) causation: Option<EventId>,
    pub(crate) correlation: Option<EventId>,
    pub(crate) tags: Vec<String>,
    pub(crate) triggers: Vec<String>,
    /// Whether `data` is JSON (else postcard).
    pub(crate) json: bool,
    /// The schema version of the event type it is written with.
    pub(crate) schema: u32,
    /// The subjects whose keys sealed its data, with the keys' generations.
    #[cfg_attr(not(feature = "encryption"), allow(dead_code))]
    pub(crate) sealed_with: Vec<(String, u64)>,
    pub(crate) data: Vec<u8>,
}

/// The events of one stream, checked and encoded, before the journal's lock.
pub(crate) struct Request {
    pub(crate) stream: String,
    pub(crate) expected: Expected,
    pub(crate) events: Vec<Encoded>,
}

/// What planning decided.
pub(crate) enum Plan {
    /// Journal the batch, then commit these parts.
    Write { bytes: Vec<u8>, commit: Commit },
    /// Write nothing: every part is an earlier append retried (or has no event).
    Done(Vec<Appended>),
}

/// The parts of a journaled batch, to commit once it is durable.
pub(crate) struct Commit {
    pub(crate) first_position: u64,
    pub(crate) parts: Vec<(StreamIdx, u64, Vec<[u8; 16]>)>,
    pub(crate) appended: Vec<Appended>,
}

/// Checks the requests' stream ids, that no stream and no event id comes twice, and
/// that the batch can fit a journal event.
pub(crate) fn check_requests(requests: &[Request]) -> Result<()> {
    let mut ids = std::collections::HashSet::new();
    for (idx, request) in requests.iter().enumerate() {
        stream_id::check(&request.stream)?;
        if requests.iter().take(idx).any(|earlier| earlier.stream == request.stream) {
            return Err(Error::InvalidAppend {
                reason: format!("stream `{}` comes twice in one append", request.stream),
            });
        }
        for event in &request.events {
            let links = event.tags.iter().map(|it| ("tag", it));
            for (what, name) in links.chain(event.triggers.iter().map(|it| ("trigger", it))) {
                check_link(what, name, event.id)?;
            }
        }
        if let Some(twice) = request.events.iter().find(|event| !ids.insert(event.id)) {
            return Err(Error::InvalidAppend {
                reason: format!("event id {} comes twice in one append", twice.id),
            });
        }
    }
    let bound: usize = 32 + requests.iter().map(Request::encoded_bound).sum::<usize>();
    if crate::journal::format::MAX_EVENT < bound {
        return Err(Error::InvalidAppend {
            reason: format!(
                "the append takes up to {bound} bytes encoded, over the {} bytes one journal event holds",
                crate::journal::format::MAX_EVENT
            ),
        });
    }
    Ok(())
}

/// Refuses a tag or trigger (`what`) of event `id` that is empty, longer than a
/// stream id may be, or holds a control character: every engine stores and
/// indexes it as text.
fn check_link(what: &str, name: &str, id: EventId) -> Result<()> {
    let reason = if name.is_empty() {
        "is empty".to_owned()
    } else if stream_id::MAX_LEN < name.len() {
        format!("is {} bytes long, over the limit of {}", name.len(), stream_id::MAX_LEN)
    } else if let Some(bad) = name.chars().find(|it| it.is_control()) {
        format!("holds the control character {bad:?}")
    } else {
        return Ok(());
    };
    let shown: String = name.chars().take(80).collect();
    Err(Error::InvalidAppend { reason: format!("a {what} of event {id} ({shown:?}) {reason}") })
}

impl Request {
    /// At least the bytes this request takes in a batch (a varint takes at most
    /// 10 bytes).
    fn encoded_bound(&self) -> usize {
        let events: usize = self
            .events
            .iter()
            .map(|event| {
                let names =
                    |names: &[String]| -> usize { names.iter().map(|it| 10 + it.len()).sum() };
                let links = 20 + names(&event.tags) + names(&event.triggers);
                16 + 10 + event.event_type.len() + 1 + 32 + links + 10 + event.data.len()
            })
            .sum();
        10 + self.stream.len() + 20 + events
    }
}

/// Plans the batch of `requests` against `index` (reserved versions and positions
/// included), under the journal's lock: refuses a wrong expectation or a
/// `condition` that does not hold, recognises a retry of a committed append, and
/// hands out versions and positions.
pub(crate) fn plan(
    index: &mut Index,
    requests: &[Request],
    condition: Option<&Condition>,
) -> Result<Plan> {
    let layout = match decide(index, requests, condition)? {
        Decision::Done(appended) => return Ok(Plan::Done(appended)),
        Decision::Write(layout) => layout,
    };
    let first_position = index.reserved;
    let mut parts = Vec::with_capacity(requests.len());
    let mut noted = Vec::new();
    for (request, &(first_version, position)) in requests.iter().zip(&layout) {
        let idx = index.stream_or_new(&request.stream);
        let n = request.events.len() as u64;
        if let Some(stream) = index.get_mut(idx) {
            stream.reserved += n;
            if n > 0 {
                // The append brings a deleted stream back.
                stream.planned.deleted = false;
            }
        }
        let ids: Vec<[u8; 16]> = request.events.iter().map(|event| *event.id.as_bytes()).collect();
        for (k, event) in request.events.iter().enumerate() {
            let k = k as u64;
            let (version, position) = (first_version + k, position + k);
            noted.push((*event.id.as_bytes(), Seen { stream: idx, version, position }));
            for tag in &event.tags {
                index.note_tag(tag, Tagged { position, stream: idx, version });
            }
            for trigger in &event.triggers {
                index.note_trigger(trigger, position);
            }
        }
        parts.push((idx, first_version, ids));
    }
    index.reserved = first_position + requests.iter().map(|it| it.events.len() as u64).sum::<u64>();
    index.note_ids(noted);
    let events: Vec<Vec<EventIn<'_>>> =
        requests.iter().map(|request| request.events.iter().map(stored).collect()).collect();
    let batch_parts: Vec<PartIn<'_>> = requests
        .iter()
        .zip(&layout)
        .zip(&events)
        .map(|((request, &(first_version, _)), events)| PartIn {
            stream: &request.stream,
            first_version,
            events,
        })
        .collect();
    let bytes = batch::encode(first_position, &batch_parts);
    let appended = appended(requests, &layout);
    Ok(Plan::Write { bytes, commit: Commit { first_position, parts, appended } })
}

/// What [`plan`] would do, without doing it: the versions and positions the
/// events would get, or the error the append would be refused with.
pub(crate) fn dry_run(
    index: &Index,
    requests: &[Request],
    condition: Option<&Condition>,
) -> Result<Vec<Appended>> {
    match decide(index, requests, condition)? {
        Decision::Done(appended) => Ok(appended),
        Decision::Write(layout) => Ok(appended(requests, &layout)),
    }
}

/// What an append comes to.
enum Decision {
    /// Nothing to write: the earlier results of the retried parts, and where the
    /// others' streams are.
    Done(Vec<Appended>),
    /// A batch to write, each request's events from these versions and positions.
    Write(Vec<(u64, u64)>),
}

/// Checks the requests' expectations and `condition` against `index`, and
/// recognises a retry.
fn decide(index: &Index, requests: &[Request], condition: Option<&Condition>) -> Result<Decision> {
    let checked: Vec<Result<Checked>> =
        requests.iter().map(|request| check(index, request)).collect();
    // An append stored whole (each part with events a retry) is a retry even when
    // the streams of its parts without events, which only stated an expectation,
    // moved on since it committed.
    let with_events = || requests.iter().zip(&checked).filter(|(it, _)| !it.events.is_empty());
    let whole_retry = with_events().next().is_some()
        && with_events().all(|(_, checked)| matches!(checked, Ok(Checked::Retry(_))));
    let checked = requests
        .iter()
        .zip(checked)
        .map(|(request, checked)| match checked {
            Err(_) if whole_retry && request.events.is_empty() => Ok(Checked::Fresh),
            checked => checked,
        })
        .collect::<Result<Vec<_>>>()?;
    let retried =
        requests.iter().zip(&checked).find(|(_, checked)| matches!(checked, Checked::Retry(_)));
    let writes = requests
        .iter()
        .zip(&checked)
        .any(|(request, checked)| matches!(checked, Checked::Fresh) && !request.events.is_empty());
    if let (Some((request, _)), true) = (retried, writes) {
        // Part of the batch was appended before: this is no retry of one append.
        return Err(Error::DuplicateEventId {
            stream: request.stream.clone(),
            id: request.events.first().map_or_else(EventId::new, |event| event.id),
        });
    }
    if !writes {
        // Retries, and appends of no event: in order, the earlier results and where
        // the streams are. (A retry is not checked against the condition: its own
        // events would conflict with it.)
        let appended = requests
            .iter()
            .zip(checked)
            .map(|(request, checked)| match checked {
                Checked::Retry(appended) => appended,
                Checked::Fresh => {
                    let next = next_version(index, &request.stream);
                    Appended {
                        stream: request.stream.clone(),
                        versions: next..next,
                        positions: index.reserved..index.reserved,
                    }
                }
            })
            .collect();
        return Ok(Decision::Done(appended));
    }
    let mut position = index.reserved;
    let mut layout = Vec::with_capacity(requests.len());
    for request in requests {
        layout.push((next_version(index, &request.stream), position));
        position += request.events.len() as u64;
    }
    if let Some(condition) = condition {
        condition::check(index, condition, requests, &layout)?;
    }
    Ok(Decision::Write(layout))
}

/// The version the next event of `stream` gets.
fn next_version(index: &Index, stream: &str) -> u64 {
    index.stream(stream).and_then(|idx| index.get(idx)).map_or(0, |it| it.reserved)
}

/// What each request gets where `layout` puts it.
fn appended(requests: &[Request], layout: &[(u64, u64)]) -> Vec<Appended> {
    requests
        .iter()
        .zip(layout)
        .map(|(request, &(first_version, position))| {
            let n = request.events.len() as u64;
            Appended {
                stream: request.stream.clone(),
                versions: first_version..first_version + n,
                positions: position..position + n,
            }
        })
        .collect()
}

fn stored(event: &Encoded) -> EventIn<'_> {
    EventIn {
        id: *event.id.as_bytes(),
        event_type: &event.event_type,
        causation: event.causation.map(|id| *id.as_bytes()),
        correlation: event.correlation.map(|id| *id.as_bytes()),
        tags: &event.tags,
        triggers: &event.triggers,
        json: event.json,
        schema: event.schema,
        data: &event.data,
    }
}

enum Checked {
    Fresh,
    Retry(Appended),
}

/// Checks one request's expectation, and whether it is a retry of an append that
/// is committed.
fn check(index: &Index, request: &Request) -> Result<Checked> {
    let idx = index.stream(&request.stream);
    let stream = idx.and_then(|idx| index.get(idx));
    let next = stream.map_or(0, |stream| stream.reserved);
    let life = stream.map(|stream| stream.planned).unwrap_or_default();
    if life.tombstoned {
        return Err(Error::StreamTombstoned { stream: request.stream.clone() });
    }
    // A deleted stream has no event, and its versions go on where they were.
    let last = if life.deleted { None } else { next.checked_sub(1) };
    let expected_ok = request.expected.holds(last);
    // Where a retry's events would be: right after what it expected, or, for an
    // expectation that names no version, where its first event is.
    let place = match request.expected {
        // Where a first append put them: at the stream's floor, or, after a
        // truncation moved it, where the recent ids say.
        Expected::NoStream => {
            let first = request.events.first().and_then(|event| index.seen(event.id.as_bytes()));
            Some(
                first
                    .filter(|seen| Some(seen.stream) == idx)
                    .map_or(life.floor, |seen| seen.version),
            )
        }
        Expected::Exact(version) => version.checked_add(1),
        Expected::Any | Expected::StreamExists => {
            let first = request.events.first().and_then(|event| index.seen(event.id.as_bytes()));
            first.filter(|seen| Some(seen.stream) == idx).map(|seen| seen.version)
        }
    };
    if let (Some(idx), Some(place), false) = (idx, place, request.events.is_empty()) {
        match retry_of(index, idx, place, request) {
            Match::All(appended) => return Ok(Checked::Retry(appended)),
            Match::Some if matches!(request.expected, Expected::Any | Expected::StreamExists) => {
                let id = request.events.first().map_or_else(EventId::new, |event| event.id);
                return Err(Error::DuplicateEventId { stream: request.stream.clone(), id });
            }
            Match::Some | Match::None => {}
        }
    }
    if !expected_ok {
        return Err(Error::WrongExpectedVersion {
            stream: request.stream.clone(),
            expected: request.expected,
            actual: last,
        });
    }
    // An id already appended elsewhere, as far as the recent ids tell.
    for event in &request.events {
        if index.seen(event.id.as_bytes()).is_some() {
            return Err(Error::DuplicateEventId { stream: request.stream.clone(), id: event.id });
        }
    }
    Ok(Checked::Fresh)
}

enum Match {
    /// Every event is committed at its place: the append happened.
    All(Appended),
    /// The first event is at its place, not all of them (or not committed).
    Some,
    None,
}

/// Whether the events of `request` are in stream `idx` from version `place` on,
/// committed, as the recent ids tell.
fn retry_of(index: &Index, idx: StreamIdx, place: u64, request: &Request) -> Match {
    let mut positions = Vec::with_capacity(request.events.len());
    for (k, event) in request.events.iter().enumerate() {
        let at = index.seen(event.id.as_bytes());
        let in_place = at.filter(|seen| {
            seen.stream == idx
                && seen.version == place + k as u64
                && seen.position < index.committed
        });
        match in_place {
            Some(seen) => positions.push(seen.position),
            None if k == 0 => return Match::None,
            None => return Match::Some,
        }
    }
    let first = positions.first().copied().unwrap_or(0);
    let last = positions.last().copied().unwrap_or(0);
    Match::All(Appended {
        stream: request.stream.clone(),
        versions: place..place + request.events.len() as u64,
        positions: first..last + 1,
    })
}
