//! Coherence's walkthrough on the event store: actors read the store, think for a
//! while, then append; an append over a change they did not see is refused until
//! they say they resolved it.
//!
//! ```text
//! cargo run --example bookstore
//! ```
//!
//! The store lives in a temporary directory: each run tells the same story.

use instastate::{
    Error,
    events::{Append, Condition, EventStore, Expected, NewEvent},
};
use serde::{Deserialize, Serialize};

/// A change to a book: who made it, and what it says.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum Book {
    Created { actor: String, author: String, genre: String },
    Updated { actor: String, genre: String },
}

/// A change to book `title`, appended to its stream and tagged with it: the tag
/// is what conflicts are checked on.
fn change(title: &str, book: Book) -> Append<Book> {
    let stream = format!("book-{}", title.to_lowercase().replace(' ', "-"));
    Append::new(stream, Expected::Any, [NewEvent::new(book).tagged([format!("book:{title}")])])
}

fn create(actor: &str, title: &str, genre: &str) -> Append<Book> {
    let author = "William Gibson".to_owned();
    change(title, Book::Created { actor: actor.to_owned(), author, genre: genre.to_owned() })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let events = EventStore::<Book>::open(dir.path())?;

    // Alice and Bob both read the store while it is empty.
    let base = events.head()?;
    println!("Alice and Bob read the store at position {base}");

    let alice =
        [create("alice", "Neuromancer", "SciFi"), create("alice", "Count Zero", "Cyberpunk")];
    for appended in events.append_if(&Condition::since(base), alice)? {
        println!("alice: {} at position {:?}", appended.stream, appended.positions);
    }

    let bob = [
        create("bob", "Mona Lisa Overdrive", "Cyberpunk"),
        create("bob", "Neuromancer", "Cyberpunk"),
    ];
    let theirs = match events.append_if(&Condition::since(base), bob) {
        Err(Error::Conflict { tag, ours, theirs, .. }) => {
            let ours = ours.map_or_else(|| "-".to_owned(), |it| it.to_string());
            println!("bob: refused, a conflict on `{tag}`: ours {ours}, theirs {theirs}");
            theirs
        }
        other => return Err(format!("Bob's append should conflict, got {other:?}").into()),
    };
    println!("bob: nothing of his was written; the store is at position {}", events.head()?);

    // Bob reads Alice's book, and updates it instead of creating it again.
    let resolved = Condition::since(base).resolved([theirs.position]);
    let bob = [
        create("bob", "Mona Lisa Overdrive", "Cyberpunk"),
        change("Neuromancer", Book::Updated { actor: "bob".into(), genre: "Cyberpunk".into() }),
    ];
    let predicted = events.check_append_if(&resolved, bob.clone())?;
    let positions: Vec<_> = predicted.iter().map(|it| it.positions.clone()).collect();
    println!("bob: a dry run says his events would go to positions {positions:?}");
    for appended in events.append_if(&resolved, bob)? {
        println!("bob: {} at position {:?}", appended.stream, appended.positions);
    }

    println!("\nthe store, in order:");
    for event in events.read_all() {
        let event = event?;
        println!("  {} {} v{}: {:?}", event.position, event.stream, event.version, event.data);
    }
    Ok(())
}
