//! What an event store writes to its journal: one journal event per command, an
//! append of one or more streams being one batch.
//!
//! ```text
//! command: format u8 = 1 | postcard of Command
//! Command::Append: first position u64 | parts: [stream str | first version u64 |
//!                  events: [id [u8; 16] | event type str | causation | correlation |
//!                           tags [str] | data bytes]]
//! ```
//!
//! The positions of a batch's events follow each other from its first position,
//! part after part; the versions of a part's events from its first version. The
//! timestamp is the journal's, shared by the batch. `data` is the event encoded with
//! postcard.

use serde::{Deserialize, Serialize};

/// The version of the command layout, its first byte.
const FORMAT: u8 = 1;

/// A command of the event store, borrowing its strings and bytes.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Command<'a> {
    #[serde(borrow)]
    Append(Batch<'a>),
}

/// An append: events for one or more streams, all or nothing.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Batch<'a> {
    pub(crate) first_position: u64,
    #[serde(borrow)]
    pub(crate) parts: Vec<Part<'a>>,
}

/// The events of one stream in a batch.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Part<'a> {
    pub(crate) stream: &'a str,
    pub(crate) first_version: u64,
    #[serde(borrow)]
    pub(crate) events: Vec<StoredEvent<'a>>,
}

/// One event as stored.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct StoredEvent<'a> {
    pub(crate) id: [u8; 16],
    pub(crate) event_type: &'a str,
    pub(crate) causation: Option<[u8; 16]>,
    pub(crate) correlation: Option<[u8; 16]>,
    #[serde(borrow)]
    pub(crate) tags: Vec<&'a str>,
    #[serde(with = "serde_bytes")]
    pub(crate) data: &'a [u8],
}

/// Encodes `command` as the journal stores it.
pub(crate) fn encode(command: &Command<'_>) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_extend(command, vec![FORMAT])
}

/// Why stored command bytes could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BatchFault {
    /// A format this build does not read.
    Format(u8),
    /// Not a command of the known format.
    Malformed(String),
}

impl std::fmt::Display for BatchFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BatchFault::Format(found) => {
                write!(
                    f,
                    "event store command format {found} is unknown (this build reads {FORMAT})"
                )
            }
            BatchFault::Malformed(reason) => write!(f, "the command is malformed: {reason}"),
        }
    }
}

/// Decodes command bytes written by [`encode`], borrowing from them.
pub(crate) fn decode(bytes: &[u8]) -> Result<Command<'_>, BatchFault> {
    let Some((&format, body)) = bytes.split_first() else {
        return Err(BatchFault::Malformed("it is empty".into()));
    };
    if format != FORMAT {
        return Err(BatchFault::Format(format));
    }
    let (command, rest): (Command<'_>, &[u8]) =
        postcard::take_from_bytes(body).map_err(|err| BatchFault::Malformed(err.to_string()))?;
    if !rest.is_empty() {
        return Err(BatchFault::Malformed(format!("{} bytes follow it", rest.len())));
    }
    Ok(command)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_round_trips_and_damage_is_a_fault() {
        let command = Command::Append(Batch {
            first_position: 7,
            parts: vec![Part {
                stream: "account-1",
                first_version: 2,
                events: vec![StoredEvent {
                    id: [9; 16],
                    event_type: "Deposited",
                    causation: None,
                    correlation: Some([1; 16]),
                    tags: vec!["account-1"],
                    data: &[1, 2, 3],
                }],
            }],
        });
        let bytes = encode(&command).expect("a batch encodes");
        let Ok(Command::Append(batch)) = decode(&bytes) else { panic!("no batch") };
        assert_eq!((batch.first_position, batch.parts.len()), (7, 1));
        let event = batch.parts.first().and_then(|part| part.events.first()).expect("an event");
        assert_eq!((event.event_type, event.data), ("Deposited", &[1u8, 2, 3][..]));

        let mut newer = bytes.clone();
        if let Some(format) = newer.first_mut() {
            *format = 2;
        }
        assert_eq!(decode(&newer).err(), Some(BatchFault::Format(2)));
        let short = bytes.split_last().map_or(&[][..], |(_, rest)| rest);
        assert!(matches!(decode(short), Err(BatchFault::Malformed(_))));
        let mut longer = bytes;
        longer.push(0);
        assert!(matches!(decode(&longer), Err(BatchFault::Malformed(_))));
    }
}
