//! Conditional appends (coherence's rebase): an actor reads the store up to a
//! head, thinks for a while, then appends, and its append is refused if another
//! actor changed one of the same aggregates (an event carrying one of the same
//! tags) since that head, unless the caller says it resolved that change.

use std::collections::BTreeSet;

use super::{
    Position,
    append::Request,
    index::{Index, Tagged},
};
use crate::Error;

/// The condition of an append made with
/// [`EventStore::append_if`](super::EventStore::append_if): no event carrying one
/// of its tags was appended at or after its base, other than those it lists as
/// resolved.
///
/// The base is the head the caller read the store at
/// ([`EventStore::head`](super::EventStore::head), the position the next event
/// gets): an event at the
/// base or after it is one the caller did not see. The tags are those of the
/// appended events unless [`tags`](Self::tags) names others.
///
/// # Example
/// ```
/// use instastate::events::{Condition, Position};
///
/// let condition = Condition::since(Position::new(7))
///     .tags(["book:Neuromancer"])
///     .resolved([Position::new(8)]);
/// assert_eq!(condition.base(), Position::new(7));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    base: Position,
    tags: Option<Vec<String>>,
    resolved: BTreeSet<Position>,
}

impl Condition {
    /// The condition that nothing the append touches changed at or after `base`.
    #[must_use]
    pub fn since(base: Position) -> Condition {
        Condition { base, tags: None, resolved: BTreeSet::new() }
    }

    /// The same condition on these tags, instead of those of the appended events.
    #[must_use]
    pub fn tags<T: Into<String>>(mut self, tags: impl IntoIterator<Item = T>) -> Condition {
        self.tags.get_or_insert_with(Vec::new).extend(tags.into_iter().map(Into::into));
        self
    }

    /// The same condition, except that the events at `positions` do not conflict:
    /// the caller saw them and resolved what they changed.
    #[must_use]
    pub fn resolved(mut self, positions: impl IntoIterator<Item = Position>) -> Condition {
        self.resolved.extend(positions);
        self
    }

    /// Its base: the first position a conflicting event may have.
    #[must_use]
    pub fn base(&self) -> Position {
        self.base
    }
}

/// Where an event is, or would be: its stream, version and position.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct EventRef {
    /// The stream.
    pub stream: String,
    /// The version in the stream.
    pub version: u64,
    /// The position in the store.
    pub position: Position,
}

impl std::fmt::Display for EventRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}` v{} at {}", self.stream, self.version, self.position)
    }
}

/// Where the events of an append go: each request's first version and first
/// position.
pub(crate) type Layout = [(u64, u64)];

/// Checks `condition` for the append of `requests`, which would put them where
/// `layout` says, against what `index` holds (reserved events included): returns
/// the conflict, naming the first of our events that conflicts (if one does) and
/// the first of theirs it conflicts with.
pub(crate) fn check(
    index: &Index,
    condition: &Condition,
    requests: &[Request],
    layout: &Layout,
) -> Result<(), Error> {
    check_with(condition, requests, layout, &mut |tag| {
        Ok(first_conflict(index, condition, tag).map(|theirs| EventRef {
            // The index never forgets a stream it handed a number.
            stream: index.get(theirs.stream).map_or_else(String::new, |it| it.name.clone()),
            version: theirs.version,
            position: Position::new(theirs.position),
        }))
    })
}

/// Checks `condition` as [`check`] does, with `conflict` giving the first event
/// tagged with a tag at or after the condition's base, not resolved (an engine's
/// lookup, which may fail).
pub(crate) fn check_with(
    condition: &Condition,
    requests: &[Request],
    layout: &Layout,
    conflict: &mut dyn FnMut(&str) -> Result<Option<EventRef>, Error>,
) -> Result<(), Error> {
    let explicit = condition.tags.as_deref();
    let checked = |tag: &String| explicit.is_none_or(|tags| tags.contains(tag));
    for (request, &(first_version, first_position)) in requests.iter().zip(layout) {
        for (k, event) in request.events.iter().enumerate() {
            let mut first: Option<(&String, EventRef)> = None;
            for tag in event.tags.iter().filter(|tag| checked(tag)) {
                if let Some(theirs) = conflict(tag)?
                    && first.as_ref().is_none_or(|(_, it)| theirs.position < it.position)
                {
                    first = Some((tag, theirs));
                }
            }
            if let Some((tag, theirs)) = first {
                let k = k as u64;
                let ours = EventRef {
                    stream: request.stream.clone(),
                    version: first_version + k,
                    position: Position::new(first_position + k),
                };
                return Err(refused(condition, tag, Some(ours), theirs));
            }
        }
    }
    // Tags named by the condition that none of our events carries.
    let mut first: Option<(&String, EventRef)> = None;
    for tag in explicit.unwrap_or_default() {
        if let Some(theirs) = conflict(tag)?
            && first.as_ref().is_none_or(|(_, it)| theirs.position < it.position)
        {
            first = Some((tag, theirs));
        }
    }
    match first {
        Some((tag, theirs)) => Err(refused(condition, tag, None, theirs)),
        None => Ok(()),
    }
}

/// The first event tagged `tag` at or after the condition's base, not resolved.
fn first_conflict(index: &Index, condition: &Condition, tag: &str) -> Option<Tagged> {
    let tagged = index.tagged(tag);
    let from = tagged.partition_point(|it| it.position < condition.base.get());
    tagged
        .get(from..)?
        .iter()
        .find(|it| !condition.resolved.contains(&Position::new(it.position)))
        .copied()
}

/// Its resolved positions.
#[cfg(feature = "postgres")]
pub(crate) fn resolved(condition: &Condition) -> impl Iterator<Item = Position> + '_ {
    condition.resolved.iter().copied()
}

fn refused(condition: &Condition, tag: &str, ours: Option<EventRef>, theirs: EventRef) -> Error {
    Error::Conflict { tag: tag.to_owned(), base: condition.base, ours, theirs }
}
