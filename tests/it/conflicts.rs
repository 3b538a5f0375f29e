//! Conditional appends (coherence's rebase): conflicts by tag since a base, the
//! resolved positions, the dry run, and coherence's README walkthrough.

#![allow(clippy::indexing_slicing, clippy::cast_possible_truncation)]

use std::{
    collections::BTreeMap,
    sync::{Arc, Barrier},
    thread,
};

use instastate::{
    Error,
    events::{Append, Condition, EventRef, EventStore, Expected, NewEvent, Position},
};
use serde::{Deserialize, Serialize};

use crate::{TestResult, tree};

/// A change to a book, as coherence's walkthrough makes them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Book {
    Created { actor: String, author: String, genre: String },
    Updated { actor: String, genre: String },
}

fn create(actor: &str, title: &str, genre: &str) -> Append<Book> {
    let book = Book::Created {
        actor: actor.to_owned(),
        author: "William Gibson".to_owned(),
        genre: genre.to_owned(),
    };
    Append::new(stream(title), Expected::Any, [NewEvent::new(book).tagged([tag(title)])])
}

fn update(actor: &str, title: &str, genre: &str) -> Append<Book> {
    let book = Book::Updated { actor: actor.to_owned(), genre: genre.to_owned() };
    Append::new(stream(title), Expected::Any, [NewEvent::new(book).tagged([tag(title)])])
}

fn stream(title: &str) -> String {
    format!("book-{}", title.to_lowercase().replace(' ', "-"))
}

fn tag(title: &str) -> String {
    format!("book:{title}")
}

fn conflict<T: std::fmt::Debug>(
    res: instastate::Result<T>,
) -> TestResult<(String, Option<EventRef>, EventRef)> {
    match res {
        Err(Error::Conflict { tag, ours, theirs, .. }) => Ok((tag, ours, theirs)),
        other => Err(format!("expected a conflict, got {other:?}").into()),
    }
}

/// `(stream, version, position)` of an event named by a conflict.
fn place(event: &EventRef) -> (String, u64, u64) {
    (event.stream.clone(), event.version, event.position.get())
}

/// Coherence's README walkthrough: Alice creates two books; Bob, who read the
/// store when it was empty, creates two books, one of them Alice's, and is told
/// of the conflict; he resolves it and his changes go in.
#[test]
fn coherence_walkthrough_alice_and_bob_edit_the_same_book() -> TestResult {
    let dir = tempfile::tempdir()?;
    let events = EventStore::<Book>::open(dir.path())?;
    let base = events.head()?;
    assert_eq!(base, Position::START);

    // Alice creates two new books.
    let alice = events.append_if(
        &Condition::since(base),
        [create("alice", "Neuromancer", "SciFi"), create("alice", "Count Zero", "Cyberpunk")],
    )?;
    assert_eq!(alice.iter().map(|it| it.positions.clone()).collect::<Vec<_>>(), [0..1, 1..2]);

    // Bob, who read the store at the same base, creates two books, one of them
    // Alice's Neuromancer: refused, naming his event and hers.
    let bob = || {
        [
            create("bob", "Mona Lisa Overdrive", "Cyberpunk"),
            create("bob", "Neuromancer", "Cyberpunk"),
        ]
    };
    let before = tree::tree(dir.path())?;
    let dry = conflict(events.check_append_if(&Condition::since(base), bob()))?;
    let (tag, ours, theirs) = conflict(events.append_if(&Condition::since(base), bob()))?;
    assert_eq!(dry, (tag.clone(), ours.clone(), theirs.clone()), "the dry run answers the same");
    assert_eq!(tag, "book:Neuromancer");
    assert_eq!(ours.as_ref().map(place), Some(("book-neuromancer".to_owned(), 1, 3)));
    assert_eq!(place(&theirs), ("book-neuromancer".to_owned(), 0, 0));
    // The whole batch is refused: Mona Lisa Overdrive is not there either.
    assert_eq!(events.head()?, Position::new(2));
    assert_eq!(events.stream_version("book-mona-lisa-overdrive")?, None);
    assert_eq!(tree::tree(dir.path())?, before, "a refused append writes nothing");

    // Bob resolves the conflict: he read Alice's book, and updates it instead.
    let resolved = Condition::since(base).resolved([theirs.position]);
    let bob = [
        create("bob", "Mona Lisa Overdrive", "Cyberpunk"),
        update("bob", "Neuromancer", "Cyberpunk"),
    ];
    let dry = events.check_append_if(&resolved, bob.clone())?;
    assert_eq!(events.head()?, Position::new(2), "a dry run writes nothing");
    let done = events.append_if(&resolved, bob)?;
    assert_eq!(dry, done, "the dry run predicted the append");
    assert_eq!(done.iter().map(|it| it.positions.clone()).collect::<Vec<_>>(), [2..3, 3..4]);

    let neuromancer = events
        .read_stream("book-neuromancer")
        .into_iter()
        .map(|it| it.map(|it| it.data))
        .collect::<Result<Vec<_>, _>>()?;
    assert_eq!(
        neuromancer,
        [
            Book::Created {
                actor: "alice".to_owned(),
                author: "William Gibson".to_owned(),
                genre: "SciFi".to_owned()
            },
            Book::Updated { actor: "bob".to_owned(), genre: "Cyberpunk".to_owned() },
        ]
    );
    Ok(())
}

#[test]
fn conflicts_are_checked_after_a_reopen_and_a_checkpoint() -> TestResult {
    let dir = tempfile::tempdir()?;
    {
        let events = EventStore::<Book>::open(dir.path())?;
        events.append_all([create("alice", "Neuromancer", "SciFi")])?;
        events.checkpoint()?;
        events.append_all([create("alice", "Count Zero", "Cyberpunk")])?;
    }
    let events = EventStore::<Book>::open(dir.path())?;
    let (_, _, theirs) = conflict(
        events.append_if(&Condition::since(Position::START), [update("bob", "Neuromancer", "x")]),
    )?;
    assert_eq!(theirs.position, Position::START, "from the checkpoint");
    let (_, _, theirs) = conflict(
        events.append_if(&Condition::since(Position::START), [update("bob", "Count Zero", "x")]),
    )?;
    assert_eq!(theirs.position, Position::new(1), "from the journal after it");
    // Since the head, nothing conflicts.
    events.append_if(&Condition::since(events.head()?), [update("bob", "Count Zero", "x")])?;
    Ok(())
}

#[test]
fn named_tags_resolved_positions_and_untagged_events() -> TestResult {
    let dir = tempfile::tempdir()?;
    let events = EventStore::<Book>::open(dir.path())?;
    events.append_all([create("alice", "Neuromancer", "SciFi")])?; // 0
    events.append_all([update("alice", "Neuromancer", "Noir")])?; // 1
    events.append_all([create("alice", "Count Zero", "Cyberpunk")])?; // 2

    // A tag the condition names and none of our events carries: `ours` is none.
    let note = || {
        Append::new(
            "notes",
            Expected::Any,
            [Book::Updated { actor: "carol".to_owned(), genre: "x".to_owned() }],
        )
    };
    let (tag, ours, theirs) = conflict(events.append_if(
        &Condition::since(Position::new(1)).tags(["book:Count Zero", "book:Neuromancer"]),
        [note()],
    ))?;
    assert_eq!((tag.as_str(), ours, theirs.position.get()), ("book:Neuromancer", None, 1));
    // Resolving one of two conflicting events is not enough; both is.
    let neuro = Condition::since(Position::START).tags(["book:Neuromancer"]);
    let (_, _, theirs) =
        conflict(events.append_if(&neuro.clone().resolved([Position::START]), [note()]))?;
    assert_eq!(theirs.position, Position::new(1));
    events.append_if(&neuro.resolved([Position::START, Position::new(1)]), [note()])?;
    // Without tags of their own or named, nothing can conflict.
    events.append_if(&Condition::since(Position::START), [note()])?;
    // Named tags replace the events' own: only Idoru is checked here.
    events.append_if(
        &Condition::since(Position::new(1)).tags(["book:Idoru"]),
        [update("bob", "Neuromancer", "x")],
    )?;
    Ok(())
}

/// Writers that each read the head, then append to one aggregate on that base:
/// however they interleave, no append succeeds over a change it did not see.
#[test]
fn racing_conditional_appends_never_succeed_over_an_unseen_change() -> TestResult {
    const THREADS: usize = 8;
    const TRIES: usize = 40;
    let dir = tempfile::tempdir()?;
    let events = EventStore::<Book>::open(dir.path())?;
    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|writer| {
            let events = events.clone();
            let barrier = Arc::clone(&barrier);
            thread::spawn(move || -> instastate::Result<Vec<(u64, u64)>> {
                barrier.wait();
                let mut won = Vec::new();
                for _ in 0..TRIES {
                    let base = events.head()?;
                    let edit = update(&format!("writer-{writer}"), "Neuromancer", "x");
                    match events.append_if(&Condition::since(base), [edit]) {
                        Ok(appended) => won.push((base.get(), appended[0].positions.start)),
                        Err(Error::Conflict { theirs, .. }) => {
                            assert!(base <= theirs.position, "a conflict since the base");
                        }
                        Err(err) => return Err(err),
                    }
                }
                Ok(won)
            })
        })
        .collect();
    let mut won = Vec::new();
    for handle in handles {
        won.extend(handle.join().map_err(|_| "a writer panicked")??);
    }
    won.sort_by_key(|(_, position)| *position);
    assert!(!won.is_empty());
    assert_eq!(events.head()?.get(), won.len() as u64, "only the winners wrote");
    for pair in won.windows(2) {
        let (previous, (base, position)) = (pair[0].1, pair[1]);
        assert!(previous < base, "the append at {position} on base {base} missed {previous}");
    }
    Ok(())
}

/// A receipt, as coherence's walkthrough stores them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Receipt {
    number: String,
    total: u64,
}

/// Coherence's walkthrough, second part: receipts linked to the encryption key
/// they were sealed with; the first key expires (an effect on it), and a reader
/// from the offset before the effect gets the effect, then receipt 1 again.
#[test]
fn coherence_walkthrough_an_effect_replays_the_aggregates_linked_to_its_trigger() -> TestResult {
    use instastate::events::{Delivery, Effect};
    let dir = tempfile::tempdir()?;
    let events = EventStore::<Receipt>::open(dir.path())?;
    let receipt = |n: u64, number: &str| {
        let receipt = Receipt { number: number.to_owned(), total: n * 100 };
        NewEvent::new(receipt).tagged([format!("receipt:{n}")]).linked_to([format!("key:{n}")])
    };
    events.append("receipts", Expected::Any, [receipt(1, "avd2dlg3g93fm1osu")])?; // 0
    events.append("receipts", Expected::Any, [receipt(2, "kepf62djsdk8fw21")])?; // 1
    let offset = events.head()?;
    events.append_effect("key:1", "key-expired")?;

    let mut reader = events.subscribe_all().from(Position::new(1))?;
    let mut seen = Vec::new();
    loop {
        match reader.next_timeout(std::time::Duration::from_secs(10))? {
            Some(Delivery::Event(event)) => seen.push(format!("event {}", event.position)),
            Some(Delivery::Replayed(event)) => seen.push(format!("replayed {}", event.position)),
            Some(Delivery::Effect(Effect { trigger, reason, aggregates, position, .. })) => {
                assert_eq!(position, offset, "the effect comes where it was appended");
                seen.push(format!("effect {trigger} {reason} {aggregates:?}"));
            }
            Some(Delivery::CaughtUp) => break,
            other => return Err(format!("unexpected {other:?}").into()),
        }
    }
    assert_eq!(
        seen,
        ["event 1", "effect key:1 key-expired [\"receipt:1\"]", "replayed 0"],
        "receipt 2, then the effect on key 1, then receipt 1 again"
    );
    // A reader from after the effect does not get it; a new effect reaches a live one.
    let mut live = events.subscribe_all().from_end()?;
    assert!(matches!(
        live.next_timeout(std::time::Duration::from_secs(10))?,
        Some(Delivery::CaughtUp)
    ));
    events.append_effect("key:2", "key-expired")?;
    let effect = live.next_timeout(std::time::Duration::from_secs(10))?;
    assert!(
        matches!(&effect, Some(Delivery::Effect(effect)) if effect.aggregates == ["receipt:2"]),
        "{effect:?}"
    );
    let replayed = live.next_timeout(std::time::Duration::from_secs(10))?;
    assert!(
        matches!(&replayed, Some(Delivery::Replayed(event)) if event.position == Position::new(1))
    );
    // Effects survive a reopen, and are delivered again from the start.
    drop((reader, live, events));
    let events = EventStore::<Receipt>::open(dir.path())?;
    let effects = events
        .subscribe_all()
        .from(Position::START)?
        .map_while(|it| match it {
            Ok(Delivery::CaughtUp) => None,
            other => Some(other),
        })
        .filter(|it| matches!(it, Ok(Delivery::Effect(_))))
        .count();
    assert_eq!(effects, 2);
    Ok(())
}

/// An effect's aggregates are closed over the events replayed: an event with
/// several tags (a transfer between two accounts) replayed for one of them is
/// applied again to each, so each is dropped and replayed whole, and a reader
/// that drops the aggregates and applies the replayed events counts every event
/// once in every aggregate.
#[test]
fn an_effect_replays_every_aggregate_of_the_events_it_replays() -> TestResult {
    use instastate::events::Delivery;
    let dir = tempfile::tempdir()?;
    let events = EventStore::<i64>::open(dir.path())?;
    let append = |amount: i64, tags: &[&str], linked: &[&str]| -> TestResult {
        let event = NewEvent::new(amount).tagged(tags.to_vec()).linked_to(linked.to_vec());
        events.append("ledger", Expected::Any, [event])?;
        Ok(())
    };
    append(10, &["acct-1"], &["key"])?;
    append(5, &["acct-1", "total"], &[])?;
    append(7, &["total", "acct-2"], &[])?;
    append(3, &["acct-3"], &[])?;
    events.append_effect("key", "expired")?;

    // The per-tag sums, as a projection builds them.
    let mut sums: BTreeMap<String, i64> = BTreeMap::new();
    let mut reader = events.subscribe_all().from(Position::START)?;
    let mut aggregates = Vec::new();
    loop {
        match reader.next_timeout(std::time::Duration::from_secs(10))? {
            Some(Delivery::Event(event) | Delivery::Replayed(event)) => {
                for tag in &event.tags {
                    *sums.entry(tag.clone()).or_default() += event.data;
                }
            }
            Some(Delivery::Effect(effect)) => {
                for aggregate in &effect.aggregates {
                    sums.remove(aggregate);
                }
                aggregates = effect.aggregates;
            }
            Some(Delivery::CaughtUp) => break,
            other => return Err(format!("unexpected {other:?}").into()),
        }
    }
    assert_eq!(aggregates, ["acct-1", "total", "acct-2"], "acct-3 is not touched");
    let want: BTreeMap<String, i64> = [("acct-1", 15), ("total", 12), ("acct-2", 7), ("acct-3", 3)]
        .into_iter()
        .map(|(tag, sum)| (tag.to_owned(), sum))
        .collect();
    assert_eq!(sums, want, "an event counted twice, or not at all");
    Ok(())
}

#[test]
fn a_tag_or_trigger_that_is_empty_too_long_or_holds_a_control_character_is_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let events = EventStore::<u64>::open(dir.path().join("events"))?;
    let long = "t".repeat(513);
    let bad: [(&str, bool); 5] =
        [("", true), ("nul\0", true), ("line\nbreak", false), (long.as_str(), true), ("", false)];
    for (name, as_tag) in bad {
        let event = if as_tag {
            NewEvent::new(1).tagged([name])
        } else {
            NewEvent::new(1).linked_to([name])
        };
        let res = events.append("s", Expected::Any, [event]);
        let Err(Error::InvalidAppend { reason, .. }) = &res else {
            return Err(format!("{name:?} was taken: {res:?}").into());
        };
        assert!(reason.contains(if as_tag { "a tag" } else { "a trigger" }), "{reason}");
    }
    assert_eq!(events.head()?, Position::START, "a refused append wrote");
    events.append("s", Expected::Any, [NewEvent::new(1).tagged(["book:ünïcödé 1"])])?;
    Ok(())
}
