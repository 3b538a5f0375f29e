//! What an event is, on its way in ([`NewEvent`]) and on its way out
//! ([`RecordedEvent`]), and the names it has: [`EventId`], [`Position`].

use std::fmt;

use crate::Timestamp;

/// An event's unique id: 128 bits, random unless the caller chose it.
///
/// Appending events whose ids are already in the stream at the same place returns
/// the earlier result and writes nothing, so a retry after a lost reply never
/// duplicates: give each event its id before the first try, and keep it.
///
/// # Example
/// ```
/// use instastate::events::EventId;
///
/// let id = EventId::new();
/// assert_ne!(id, EventId::new());
/// assert_eq!(EventId::from_bytes(*id.as_bytes()), id);
/// assert_eq!(id.to_string().len(), 36); // 8-4-4-4-12 hexadecimal digits
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId([u8; 16]);

impl EventId {
    /// A new random id (a UUID, version 4).
    #[must_use]
    pub fn new() -> EventId {
        EventId(*uuid::Uuid::new_v4().as_bytes())
    }

    /// The id made of these 16 bytes.
    #[must_use]
    pub const fn from_bytes(bytes: [u8; 16]) -> EventId {
        EventId(bytes)
    }

    /// The id's 16 bytes.
    #[must_use]
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl Default for EventId {
    fn default() -> EventId {
        EventId::new()
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&uuid::Uuid::from_bytes(self.0).hyphenated(), f)
    }
}

impl fmt::Debug for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EventId({self})")
    }
}

/// An event's place in the whole store: 0 for the first event appended, then one
/// more for each, with no gap. `$all` reads events in this order.
///
/// # Example
/// ```
/// use instastate::events::Position;
///
/// assert_eq!(Position::START.get(), 0);
/// assert!(Position::new(3) < Position::new(4));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position(u64);

impl Position {
    /// The position of the first event.
    pub const START: Position = Position(0);

    /// The position `n`.
    #[must_use]
    pub const fn new(n: u64) -> Position {
        Position(n)
    }

    /// The position as a number.
    #[must_use]
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// Where an event came from: the event that caused it, and the conversation
/// (correlation) it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Metadata {
    /// The event that caused this one.
    pub causation: Option<EventId>,
    /// The id shared by every event of one conversation or request.
    pub correlation: Option<EventId>,
}

/// An event to append: its data, its id, and what the store keeps with it.
///
/// Any `E` converts into one with a fresh random id, so `append` takes plain
/// events too.
///
/// # Example
/// ```
/// use instastate::events::{EventId, NewEvent};
///
/// let id = EventId::new();
/// let event = NewEvent::new("opened").with_id(id).tagged(["account-42"]);
/// assert_eq!((event.id(), event.tags()), (id, &["account-42".to_owned()][..]));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent<E> {
    pub(crate) data: E,
    pub(crate) id: EventId,
    pub(crate) metadata: Metadata,
    pub(crate) tags: Vec<String>,
    pub(crate) triggers: Vec<String>,
}

impl<E> NewEvent<E> {
    /// The event holding `data`, with a random id, no metadata and no tags.
    pub fn new(data: E) -> NewEvent<E> {
        NewEvent {
            data,
            id: EventId::new(),
            metadata: Metadata::default(),
            tags: Vec::new(),
            triggers: Vec::new(),
        }
    }

    /// The same event with id `id`: choose it before the first try of an append, so
    /// that a retry is recognised.
    #[must_use]
    pub fn with_id(mut self, id: EventId) -> NewEvent<E> {
        self.id = id;
        self
    }

    /// The same event, caused by event `cause`.
    #[must_use]
    pub fn caused_by(mut self, cause: EventId) -> NewEvent<E> {
        self.metadata.causation = Some(cause);
        self
    }

    /// The same event, in the conversation `correlation`.
    #[must_use]
    pub fn correlated_with(mut self, correlation: EventId) -> NewEvent<E> {
        self.metadata.correlation = Some(correlation);
        self
    }

    /// The same event, tagged with the aggregates it touches.
    #[must_use]
    pub fn tagged<T: Into<String>>(mut self, tags: impl IntoIterator<Item = T>) -> NewEvent<E> {
        self.tags.extend(tags.into_iter().map(Into::into));
        self
    }

    /// The same event, linked to triggers (coherence's word): an effect on one of
    /// them ([`EventStore::append_effect`](super::EventStore::append_effect)) makes
    /// subscriptions replay every event of the aggregates (tags) this event
    /// touches. An event holding `Sealed` data is linked to its
    /// subjects without asking.
    #[must_use]
    pub fn linked_to<T: Into<String>>(
        mut self,
        triggers: impl IntoIterator<Item = T>,
    ) -> NewEvent<E> {
        self.triggers.extend(triggers.into_iter().map(Into::into));
        self
    }

    /// The event's triggers.
    pub fn triggers(&self) -> &[String] {
        &self.triggers
    }

    /// The event's id.
    pub fn id(&self) -> EventId {
        self.id
    }

    /// The event's tags.
    pub fn tags(&self) -> &[String] {
        &self.tags
    }

    /// The event's data.
    pub fn data(&self) -> &E {
        &self.data
    }
}

impl<E> From<E> for NewEvent<E> {
    fn from(data: E) -> NewEvent<E> {
        NewEvent::new(data)
    }
}

/// An event as the store holds it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RecordedEvent<E> {
    /// The stream it was appended to.
    pub stream: String,
    /// Its version in that stream: 0 for the stream's first event, then one more for
    /// each, with no gap.
    pub version: u64,
    /// Its position in the whole store.
    pub position: Position,
    /// When the store appended it (the timestamp of its append, shared by the events
    /// of one batch).
    pub at: Timestamp,
    /// Its id.
    pub id: EventId,
    /// Its type: the variant name of an enum event, as serde names it, or the
    /// type's name for other events.
    pub event_type: String,
    /// Its causation and correlation.
    pub metadata: Metadata,
    /// The aggregates it touches.
    pub tags: Vec<String>,
    /// The triggers it is linked to (see [`NewEvent::linked_to`]).
    pub triggers: Vec<String>,
    /// The event.
    pub data: E,
}
