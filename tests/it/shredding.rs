//! Crypto-shredding end to end: data sealed per subject, a subject forgotten, and
//! what readers, subscriptions, a restart and a backup taken before then see.

#![allow(clippy::indexing_slicing)]

use std::{collections::BTreeMap, fs, path::Path, time::Duration};

use instastate::{
    Error,
    events::{Delivery, EventStore, Expected, FORGOTTEN, Position, Sealed},
};
use serde::{Deserialize, Serialize};

use crate::TestResult;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Account {
    Opened { owner: Sealed<String>, email: Sealed<String> },
    Deposited { amount: i64 },
}

fn open_account(events: &EventStore<Account>, n: u32, owner: &str) -> TestResult {
    let subject = owner.to_lowercase();
    let opened = Account::Opened {
        owner: Sealed::new(&subject, owner.to_owned()),
        email: Sealed::new(&subject, format!("{subject}@example.com")),
    };
    let stream = format!("account-{n}");
    let event = instastate::events::NewEvent::new(opened).tagged([stream.clone()]);
    events.append(&stream, Expected::NoStream, [event])?;
    let deposit = instastate::events::NewEvent::new(Account::Deposited { amount: 100 })
        .tagged([stream.clone()]);
    events.append(&stream, Expected::Exact(0), [deposit])?;
    Ok(())
}

/// The owner of each account as a projection builds it: `None` once shredded.
type Owners = BTreeMap<String, Option<String>>;

fn apply(owners: &mut Owners, stream: &str, account: &Account) {
    if let Account::Opened { owner, .. } = account {
        owners.insert(stream.to_owned(), owner.value().cloned());
    }
}

fn owners(events: &EventStore<Account>) -> TestResult<Owners> {
    let mut owners = Owners::new();
    for event in events.read_all() {
        let event = event?;
        apply(&mut owners, &event.stream, &event.data);
    }
    Ok(owners)
}

fn owned(pairs: &[(&str, Option<&str>)]) -> Owners {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), v.map(str::to_owned))).collect()
}

/// Whether `needle` appears in any file under `dir`.
fn appears_in(dir: &Path, needle: &[u8]) -> TestResult<bool> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_file() && fs::read(&path)?.windows(needle.len()).any(|it| it == needle) {
            return Ok(true);
        }
    }
    Ok(false)
}

#[test]
fn a_forgotten_subject_reads_as_shredded_everywhere_and_projections_rebuild_without_it()
-> TestResult {
    let root = tempfile::tempdir()?;
    let (live, backup) = (root.path().join("live"), root.path().join("backup"));
    let events = EventStore::<Account>::open(&live)?;
    open_account(&events, 1, "Alice")?;
    open_account(&events, 2, "Bob")?;
    assert!(!appears_in(&live, b"Alice")?, "sealed data is not in the clear on disk");
    assert_eq!(
        owners(&events)?,
        owned(&[("account-1", Some("Alice")), ("account-2", Some("Bob"))])
    );
    // Sealed data links its event to its subject.
    let first = events.event("account-1", 0)?.ok_or("no event")?;
    assert_eq!(first.triggers, ["alice"]);

    // A projection that follows every event, and rebuilds what an effect affects.
    let mut projection = Owners::new();
    let mut subscription = events.subscribe_all().from(Position::START)?;
    // Until nothing more comes: everything it is given is committed already.
    let mut follow = |projection: &mut Owners, wait: Duration| -> TestResult<Vec<String>> {
        let mut effects = Vec::new();
        loop {
            match subscription.next_timeout(wait)? {
                Some(Delivery::Event(event) | Delivery::Replayed(event)) => {
                    apply(projection, &event.stream, &event.data);
                }
                Some(Delivery::Effect(effect)) => {
                    assert_eq!(
                        (effect.trigger.as_str(), effect.reason.as_str()),
                        ("alice", FORGOTTEN)
                    );
                    for aggregate in &effect.aggregates {
                        projection.remove(aggregate);
                    }
                    effects.push(effect.trigger);
                }
                Some(Delivery::CaughtUp) | None => return Ok(effects),
                other => return Err(format!("unexpected {other:?}").into()),
            }
        }
    };
    assert_eq!(follow(&mut projection, Duration::from_secs(10))?, Vec::<String>::new());
    assert_eq!(projection, owners(&events)?);

    events.backup_to(&backup)?;
    assert!(!backup.join("subject-keys").exists(), "a backup holds no key");
    events.forget_subject("alice")?;

    // Readers get the shredded marker; Bob is untouched.
    let expected = owned(&[("account-1", None), ("account-2", Some("Bob"))]);
    assert_eq!(owners(&events)?, expected);
    let Account::Opened { email, .. } = events.event("account-1", 0)?.ok_or("gone")?.data else {
        return Err("not an opening".into());
    };
    assert!(email.is_shredded());
    assert_eq!(email.subject(), "alice");
    // The live projection got the effect and rebuilt account 1 without her.
    assert_eq!(follow(&mut projection, Duration::from_millis(300))?, ["alice"]);
    assert_eq!(projection, expected);
    drop((subscription, events));

    // After a restart, still shredded; a projection rebuilt from 0 gets there too.
    let events = EventStore::<Account>::open(&live)?;
    assert_eq!(owners(&events)?, expected);
    // Sealing for the subject again takes a new key, which reads.
    open_account(&events, 3, "Alice")?;
    assert_eq!(owners(&events)?.get("account-3"), Some(&Some("Alice".to_owned())));
    drop(events);

    // The backup taken before the forget, opened with the live key file: shredded.
    let keys = live.join("subject-keys");
    let copy = EventStore::<Account>::builder().subject_keys(&keys).open(&backup)?;
    assert_eq!(owners(&copy)?, expected);
    drop(copy);
    // Without any key file, sealed data is an error naming the subject, never a
    // silent default.
    let elsewhere = root.path().join("no-keys");
    let copy = EventStore::<Account>::builder().subject_keys(&elsewhere).open(&backup)?;
    match owners(&copy) {
        Err(err) => match err.downcast_ref::<Error>() {
            Some(Error::SubjectKeyMissing { subject, .. }) => assert_eq!(subject, "alice"),
            other => return Err(format!("expected SubjectKeyMissing, got {other:?}").into()),
        },
        Ok(owners) => return Err(format!("read without keys: {owners:?}").into()),
    }
    Ok(())
}

#[test]
fn a_damaged_subject_key_file_is_refused_at_open_naming_it() -> TestResult {
    let dir = tempfile::tempdir()?;
    {
        let events = EventStore::<Account>::open(dir.path())?;
        open_account(&events, 1, "Carol")?;
    }
    let keys = dir.path().join("subject-keys");
    let mut bytes = fs::read(&keys)?;
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    fs::write(&keys, &bytes)?;
    match EventStore::<Account>::open(dir.path()) {
        Err(Error::SubjectKeysCorrupt { path, .. }) => assert_eq!(path, keys),
        other => return Err(format!("expected SubjectKeysCorrupt, got {other:?}").into()),
    }
    Ok(())
}

/// After a clean close every key was written whole, so a key file whose end is
/// cut short (a length field changed, the file truncated or emptied) is damage,
/// refused at open with nothing changed, not a torn write whose keys (which
/// events use) opening would drop and the next new key would then overwrite.
#[test]
fn a_key_file_cut_short_after_a_clean_close_is_damage_not_a_torn_write() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = dir.path().join("events");
    {
        let events = EventStore::<Account>::open(&store)?;
        open_account(&events, 1, "Alice")?;
        open_account(&events, 2, "Bob")?;
    }
    let keys = store.join("subject-keys");
    let sound = fs::read(&keys)?;
    // The file's header (magic and version), then records: a length (4 bytes
    // little-endian), a body, a checksum (8 bytes); the last record's offset.
    let mut last = 7;
    let mut at = 7;
    while at < sound.len() {
        last = at;
        let len: [u8; 4] = sound.get(at..at + 4).ok_or("a cut record")?.try_into()?;
        at += 4 + u32::from_le_bytes(len) as usize + 8;
    }
    assert_eq!(at, sound.len(), "the records do not fill the file");
    let mut longer = sound.clone();
    longer[last] ^= 0x10;
    let damages: [(&str, Vec<u8>); 3] = [
        ("the last record's length grown by a flipped bit", longer),
        ("the last record cut in the middle", sound[..last + 6].to_vec()),
        ("the file emptied", Vec::new()),
    ];
    for (what, bytes) in damages {
        fs::write(&keys, &bytes)?;
        match EventStore::<Account>::open(&store) {
            Err(Error::SubjectKeysCorrupt { path, reason, .. }) => {
                assert_eq!(path, keys, "{what}");
                assert!(reason.contains("closed cleanly"), "{what}: {reason}");
            }
            other => return Err(format!("{what}: not refused: {other:?}").into()),
        }
        assert_eq!(fs::read(&keys)?, bytes, "{what}: the refused open changed the file");
    }
    fs::write(&keys, &sound)?;
    let events = EventStore::<Account>::open(&store)?;
    let owners: Vec<Account> =
        events.read_all().into_iter().map(|it| it.map(|it| it.data)).collect::<Result<_, _>>()?;
    assert_eq!(owners.len(), 4, "{owners:?}");

    // A crash while a key was written: the image of the store as it was open,
    // with a record begun at the end of the key file. It opens, and the torn end
    // is written away then, so that it opens again after its next clean close.
    let crashed = dir.path().join("crashed");
    crate::compat::copy_dir(&store, &crashed)?;
    drop(events);
    let torn_keys = crashed.join("subject-keys");
    let mut torn = sound.clone();
    torn.extend_from_slice(&[40, 0, 0, 0, 1, 2]);
    fs::write(&torn_keys, &torn)?;
    for session in 0..2 {
        let events = EventStore::<Account>::open(&crashed)?;
        assert_eq!(events.read_all().into_iter().count(), 4, "session {session}");
        assert_eq!(fs::read(&torn_keys)?, sound, "session {session}: the torn end stayed");
    }
    Ok(())
}

#[test]
fn a_sealed_value_outside_an_event_store_is_refused() {
    let sealed = Sealed::new("dave", 7u32);
    assert!(postcard::to_allocvec(&sealed).is_err(), "no key outside a store");
}

static OWNERS_DEFAULT: instastate::StateCell<instastate::events::Projected<Owners>> =
    instastate::StateCell::new("shredding::OWNERS_DEFAULT", || {
        instastate::events::Projected::new(Owners::new())
    });
static OWNERS_HOOKED: instastate::StateCell<instastate::events::Projected<Owners>> =
    instastate::StateCell::new("shredding::OWNERS_HOOKED", || {
        instastate::events::Projected::new(Owners::new())
    });

/// Projections into cells take the forget's effect: one rebuilds from 0 (no
/// effect handler), one drops the affected aggregate and replays it; both end
/// without the data, at the same position, and saved with it.
#[test]
fn projections_into_cells_rebuild_without_a_forgotten_subject() -> TestResult {
    let root = tempfile::tempdir()?;
    let events = EventStore::<Account>::open(root.path().join("events"))?;
    let cells = instastate::Store::builder()
        .cell(&OWNERS_DEFAULT)
        .cell(&OWNERS_HOOKED)
        .open(root.path().join("cells"))?;
    open_account(&events, 1, "Frank")?;
    open_account(&events, 2, "Grace")?;
    let handler = |owners: &mut Owners,
                   event: &instastate::events::RecordedEvent<Account>|
     -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        apply(owners, &event.stream, &event.data);
        Ok(())
    };
    let default = events.projection(&OWNERS_DEFAULT).save_with(&cells).start(handler)?;
    let hooked = events
        .projection(&OWNERS_HOOKED)
        .save_with(&cells)
        .on_effect(|owners, effect| {
            for aggregate in &effect.aggregates {
                owners.remove(aggregate);
            }
            Ok(())
        })
        .start(handler)?;
    let head = events.head()?;
    default.wait_for(head)?;
    hooked.wait_for(head)?;
    let before = owned(&[("account-1", Some("Frank")), ("account-2", Some("Grace"))]);
    assert_eq!(OWNERS_DEFAULT.read().state(), &before);

    events.forget_subject("frank")?;
    open_account(&events, 3, "Heidi")?;
    let head = events.head()?;
    default.wait_for(head)?;
    hooked.wait_for(head)?;
    let after =
        owned(&[("account-1", None), ("account-2", Some("Grace")), ("account-3", Some("Heidi"))]);
    assert_eq!(OWNERS_DEFAULT.read().state(), &after);
    assert_eq!(OWNERS_HOOKED.read().state(), &after);
    assert_eq!(OWNERS_DEFAULT.read().position(), head);
    default.stop()?;
    hooked.stop()?;
    // What they saved last holds no trace of Frank (the store's history of earlier
    // saves still does, until it is pruned: derived state is the program's own).
    OWNERS_DEFAULT.set(instastate::events::Projected::new(Owners::new()));
    cells.reload_all()?;
    assert_eq!(OWNERS_DEFAULT.read().state(), &after);
    assert_eq!(OWNERS_HOOKED.read().state(), &after);
    Ok(())
}

/// Appends racing forgets: every event journaled after its subject's forget reads
/// (it was sealed with the subject's new key), and a dry run makes no key.
#[test]
fn appends_racing_forgets_are_sealed_with_a_live_key() -> TestResult {
    use instastate::events::{Append, Condition};
    let dir = tempfile::tempdir()?;
    let events = EventStore::<Sealed<u64>>::open(dir.path())?;
    let (read, forgets) = race_appends_and_forgets(&|| Ok(events.clone()), &events, 400, 200)?;
    assert_eq!((read, forgets), (800, 200));
    // A dry run seals with a key it keeps nowhere.
    let fresh = tempfile::tempdir()?;
    let dry = EventStore::<Sealed<u64>>::open(fresh.path())?;
    let append = Append::new("x", Expected::Any, [Sealed::new("nobody", 1)]);
    dry.check_append_if(&Condition::since(Position::START), [append])?;
    assert!(!fresh.path().join("subject-keys").exists(), "a dry run wrote a key");
    Ok(())
}

/// A `Serialize` that panics in an append leaves no sealing context behind.
#[test]
fn a_panic_while_sealing_leaves_no_context_behind() -> TestResult {
    #[derive(Deserialize)]
    struct Boom;
    impl Serialize for Boom {
        fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
            panic!("boom")
        }
    }
    let dir = tempfile::tempdir()?;
    let events = EventStore::<(Sealed<u32>, Boom)>::open(dir.path())?;
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        events.append("x", Expected::Any, [(Sealed::new("zed", 1), Boom)])
    }));
    assert!(res.is_err(), "the panic reaches the caller");
    drop(events);
    assert!(postcard::to_allocvec(&Sealed::new("zed", 2u32)).is_err(), "no store, no key");
    Ok(())
}

/// Two writers, each on a store `open` gives (one store, or one per process),
/// append `appends` sealed events each for three subjects, while `forgetter`
/// forgets them `forgets` times in turn; then checks that an event is shredded
/// only if a forget of its subject came after it (every event appended after a
/// forget was sealed with a live key). Returns the events read and the forgets
/// a subscription delivered.
pub(crate) fn race_appends_and_forgets(
    open: &(dyn Fn() -> instastate::Result<EventStore<Sealed<u64>>> + Sync),
    forgetter: &EventStore<Sealed<u64>>,
    appends: u64,
    forgets: u64,
) -> TestResult<(usize, usize)> {
    std::thread::scope(|scope| -> TestResult {
        let writers: Vec<_> = (0..2u64)
            .map(|writer| {
                scope.spawn(move || -> instastate::Result<()> {
                    let events = open()?;
                    for n in 0..appends {
                        let subject = format!("s{}", n % 3);
                        events.append(
                            "log",
                            Expected::Any,
                            [Sealed::new(subject, writer * 1000 + n)],
                        )?;
                    }
                    Ok(())
                })
            })
            .collect();
        for n in 0..forgets {
            forgetter.forget_subject(&format!("s{}", n % 3))?;
        }
        for writer in writers {
            writer.join().map_err(|_| "a writer panicked")??;
        }
        Ok(())
    })?;
    // Where each forget came, from a subscription: (position, subject).
    let mut delivered = Vec::new();
    for delivery in forgetter.subscribe_all().from(Position::START)? {
        match delivery? {
            Delivery::Effect(effect) => delivered.push((effect.position, effect.trigger)),
            Delivery::CaughtUp => break,
            _ => {}
        }
    }
    let mut read = 0;
    for event in forgetter.read_all() {
        let event = event?;
        read += 1;
        let forgotten_later = delivered
            .iter()
            .any(|(at, subject)| subject == event.data.subject() && event.position < *at);
        // Shredded exactly when a forget of its subject came after it.
        assert_eq!(
            event.data.is_shredded(),
            forgotten_later,
            "event {} (subject {}): shredded {}, a forget after it {forgotten_later}",
            event.position,
            event.data.subject(),
            event.data.is_shredded()
        );
    }
    Ok((read, delivered.len()))
}
