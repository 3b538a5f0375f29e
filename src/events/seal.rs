//! Crypto-shredding: event data sealed with a key per subject (a person, say),
//! which forgetting the subject destroys, so that the data can never be read
//! again, from the journal or from any backup of it.
//!
//! A [`Sealed`] value in an event is encoded by the store with its subject's key
//! (XChaCha20-Poly1305, the subject and key generation as associated data) and
//! decoded with it; once the key is gone it decodes as shredded. The keys live in
//! one file (`subject-keys` in the store's directory unless the builder says
//! elsewhere): a new key is a record appended to it and synced; forgetting rewrites
//! it whole, without the keys forgotten, durably. Records are sealed with the
//! store's key when it has one. A backup of the store
//! ([`EventStore::backup_to`](super::EventStore::backup_to)) leaves the file out.
//!
//! ```text
//! file:   magic "ISKEYS" | version u8 = 2 | records
//! record: length u32 LE | body (sealed with the store's key, if any) | xxh3-64 LE of length and body
//! body:   postcard of (subject, generation, key: Option<[u8; 32]>)
//! ```
//!
//! A record cut short at the end of the file (a crash while appending it) held a
//! key that nothing used yet (a key is durable before the event sealed with it is
//! journaled), and is passed over; damage anywhere else is refused.

use std::{cell::RefCell, collections::BTreeMap, fmt, path::PathBuf, sync::Arc};

use parking_lot::Mutex;
use serde::{Deserialize, Deserializer, Serialize, Serializer, de::DeserializeOwned};

use crate::{EncryptionKey, Error, Result, crypt::Sealer, io::Io};

const MAGIC: &[u8; 6] = b"ISKEYS";
const VERSION: u8 = 2;
/// The longest subject, in bytes.
const MAX_SUBJECT: usize = 1024;
/// The largest record a sound file holds: a subject, a generation, a key, and the
/// store key's seal.
const MAX_RECORD: usize = MAX_SUBJECT + 256;
/// What the store's key seals the file's body for.
const AAD: &[u8] = b"instastate subject keys";

/// Data of an event sealed with the key of its subject: forgetting the subject
/// ([`EventStore::forget_subject`](super::EventStore::forget_subject)) destroys the
/// key, and the data then reads as shredded, wherever its bytes are.
///
/// Only an event store encodes and decodes it: put it in the fields of an event
/// that hold personal data.
///
/// # Example
/// ```
/// use instastate::events::{EventStore, Expected, Sealed};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// enum Account {
///     Opened { owner: Sealed<String> },
///     Deposited { amount: i64 },
/// }
///
/// # fn main() -> instastate::Result<()> {
/// # let dir = tempfile::tempdir().unwrap();
/// let events = EventStore::<Account>::open(dir.path())?;
/// let owner = Sealed::new("alice", "Alice Liddell".to_owned());
/// events.append("account-1", Expected::NoStream, [Account::Opened { owner }])?;
///
/// events.forget_subject("alice")?;
/// let first = events.event("account-1", 0)?.expect("still there");
/// let Account::Opened { owner } = first.data else { unreachable!() };
/// assert!(owner.is_shredded());
/// assert_eq!(owner.subject(), "alice");
/// # Ok(())
/// # }
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed<T> {
    subject: String,
    value: Option<T>,
}

impl<T> Sealed<T> {
    /// `value`, to be sealed with the key of `subject`.
    pub fn new(subject: impl Into<String>, value: T) -> Sealed<T> {
        Sealed { subject: subject.into(), value: Some(value) }
    }

    /// The subject whose key seals it.
    #[must_use]
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// The value, or `None` when the subject was forgotten.
    #[must_use]
    pub fn value(&self) -> Option<&T> {
        self.value.as_ref()
    }

    /// The value, or `None` when the subject was forgotten.
    #[must_use]
    pub fn into_value(self) -> Option<T> {
        self.value
    }

    /// Whether the subject was forgotten, and the value with it.
    #[must_use]
    pub fn is_shredded(&self) -> bool {
        self.value.is_none()
    }
}

impl<T: fmt::Debug> fmt::Debug for Sealed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            Some(value) => write!(f, "Sealed({:?}: {value:?})", self.subject),
            None => write!(f, "Sealed({:?}: shredded)", self.subject),
        }
    }
}

/// How a sealed value is encoded.
#[derive(Serialize, Deserialize)]
#[serde(rename = "Sealed")]
struct Stored {
    subject: String,
    generation: u64,
    sealed: Vec<u8>,
}

impl<T: Serialize> Serialize for Sealed<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::Error as _;
        let Some(value) = &self.value else {
            return Err(S::Error::custom("a shredded value cannot be sealed again"));
        };
        let key = SEALING.with(|context| {
            let mut context = context.borrow_mut();
            let context = context.as_mut()?;
            let key = context.ring.current(&self.subject).or_else(|| {
                // A dry run seals with a key of its own, which it keeps nowhere.
                context.ephemeral.get(&self.subject).map(|key| (0, *key))
            });
            match key {
                Some((generation, _)) => context.subjects.push((self.subject.clone(), generation)),
                None => context.missing.push(self.subject.clone()),
            }
            Some(key)
        });
        let (generation, key) = match key {
            Some(Some(key)) => key,
            Some(None) => return Err(S::Error::custom("the subject has no key yet")),
            None => {
                return Err(S::Error::custom("a `Sealed` value is encoded only by an event store"));
            }
        };
        let plain = postcard::to_allocvec(value).map_err(S::Error::custom)?;
        let cipher = Sealer::new(Some(&EncryptionKey::from_bytes(key)));
        let sealed = cipher.seal(&aad(&self.subject, generation), plain);
        Stored { subject: self.subject.clone(), generation, sealed }.serialize(serializer)
    }
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Sealed<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error as _;
        let Stored { subject, generation, sealed } = Stored::deserialize(deserializer)?;
        let ring = OPENING.with(|context| context.borrow().as_ref().map(Arc::clone));
        let Some(ring) = ring else {
            if crate::shape::tracing() {
                // The shape of the type is being traced: the value does not matter.
                return Ok(Sealed { subject, value: None });
            }
            return Err(D::Error::custom("a `Sealed` value is decoded only by an event store"));
        };
        let key = match ring.lookup(&subject, generation) {
            Ok(Lookup::Key(key)) => key,
            Ok(Lookup::Forgotten) => return Ok(Sealed { subject, value: None }),
            Ok(Lookup::Missing) => {
                let err = Error::SubjectKeyMissing {
                    path: ring.path.clone(),
                    subject: subject.clone(),
                    generation,
                };
                OPENING_FAILURE.with(|failure| *failure.borrow_mut() = Some(err));
                return Err(D::Error::custom("a subject key is missing"));
            }
            Err(err) => {
                OPENING_FAILURE.with(|failure| *failure.borrow_mut() = Some(err));
                return Err(D::Error::custom("a subject key could not be read"));
            }
        };
        let sealer = Sealer::new(Some(&EncryptionKey::from_bytes(key)));
        let plain = sealer
            .open(&aad(&subject, generation), &sealed)
            .map_err(|fault| D::Error::custom(format!("sealed data of `{subject}`: {fault}")))?;
        let value = crate::codec::decode_exact::<T>(&plain).map_err(D::Error::custom)?;
        Ok(Sealed { subject, value: Some(value) })
    }
}

fn aad(subject: &str, generation: u64) -> Vec<u8> {
    let mut aad = generation.to_le_bytes().to_vec();
    aad.extend_from_slice(subject.as_bytes());
    aad
}

/// What the store encodes an event with.
struct Sealing {
    ring: Arc<KeyRing>,
    /// The subjects whose keys sealed values of the event, with the keys'
    /// generations.
    subjects: Vec<(String, u64)>,
    /// The subjects the event needs a key of, which they lack.
    missing: Vec<String>,
    /// A dry run's keys for the subjects without one, kept nowhere.
    ephemeral: BTreeMap<String, [u8; 32]>,
}

/// Puts back the context a thread had before, whatever happens (a panicking
/// `Serialize` or `Deserialize` included), so that no context outlives its call.
struct Restore<T: 'static> {
    key: &'static std::thread::LocalKey<RefCell<Option<T>>>,
    previous: Option<T>,
    /// Whether the previous context is back already.
    done: bool,
}

impl<T> Restore<T> {
    /// Sets `key` to `value` until the guard goes.
    fn set(key: &'static std::thread::LocalKey<RefCell<Option<T>>>, value: T) -> Restore<T> {
        let previous = key.with(|it| it.borrow_mut().replace(value));
        Restore { key, previous, done: false }
    }

    /// Puts the previous context back, and returns the one set.
    fn take(mut self) -> Option<T> {
        self.done = true;
        let previous = self.previous.take();
        self.key.with(|it| std::mem::replace(&mut *it.borrow_mut(), previous))
    }
}

impl<T> Drop for Restore<T> {
    fn drop(&mut self) {
        if !self.done {
            let previous = self.previous.take();
            self.key.with(|it| *it.borrow_mut() = previous);
        }
    }
}

/// The subjects whose keys sealed an event's values, with the keys' generations.
pub(crate) type SealedWith = Vec<(String, u64)>;

thread_local! {
    static SEALING: RefCell<Option<Sealing>> = const { RefCell::new(None) };
    static OPENING: RefCell<Option<Arc<KeyRing>>> = const { RefCell::new(None) };
    static OPENING_FAILURE: RefCell<Option<Error>> = const { RefCell::new(None) };
}

/// Encodes with `encode` while [`Sealed`] values find their keys in `ring`,
/// making the keys that are missing (durably, before the event is journaled);
/// returns the bytes and the subjects whose keys sealed them.
pub(crate) fn sealing(
    ring: &Arc<KeyRing>,
    dry: bool,
    encode: impl Fn() -> Result<Vec<u8>>,
) -> Result<(Vec<u8>, SealedWith)> {
    let mut ephemeral = BTreeMap::new();
    // A subject's key is made at most once per event; a value of a subject whose
    // key is made between two tries finds it at the next.
    for _ in 0..3 {
        let context = Sealing {
            ring: Arc::clone(ring),
            subjects: Vec::new(),
            missing: Vec::new(),
            ephemeral: ephemeral.clone(),
        };
        let guard = Restore::set(&SEALING, context);
        let res = encode();
        let Some(Sealing { mut subjects, missing, .. }) = guard.take() else {
            return res.map(|bytes| (bytes, Vec::new()));
        };
        if missing.is_empty() {
            subjects.sort_unstable();
            subjects.dedup();
            return res.map(|bytes| (bytes, subjects));
        }
        for subject in missing {
            if dry {
                ephemeral.insert(subject, crate::crypt::random_key());
            } else {
                ring.create(&subject)?;
            }
        }
    }
    Err(Error::InvalidAppend { reason: "the subject keys of an event kept changing".to_owned() })
}

/// Decodes with `decode` while [`Sealed`] values find their keys in `ring`; a
/// missing key is reported as [`Error::SubjectKeyMissing`].
pub(crate) fn opening<T>(ring: &Arc<KeyRing>, decode: impl FnOnce() -> Result<T>) -> Result<T> {
    OPENING_FAILURE.with(|it| it.borrow_mut().take());
    let guard = Restore::set(&OPENING, Arc::clone(ring));
    let res = decode();
    drop(guard.take());
    let failure = OPENING_FAILURE.with(|it| it.borrow_mut().take());
    match (res, failure) {
        (Err(_), Some(failure)) => Err(failure),
        (res, _) => res,
    }
}

/// A key, found or not.
enum Lookup {
    Key([u8; 32]),
    Forgotten,
    Missing,
}

/// The subject keys of a store: in memory, and in their file (or, for a store
/// in a database, in its table, of which the memory holds what it read).
pub(crate) struct KeyRing {
    /// The file, or what errors name.
    path: PathBuf,
    io: Io,
    sealer: Sealer,
    /// The keys, and whether the file ends with a record cut short (which the
    /// next write drops by rewriting the file).
    subjects: Mutex<(Subjects, bool)>,
    /// The database the keys are kept in, instead of the file, and the number of
    /// its effects looked at (forgettings included).
    #[cfg(feature = "postgres")]
    database: Option<(Arc<crate::postgres::PgEvents>, Mutex<u64>)>,
}

/// Per subject, its keys by generation; a forgotten one is `None`.
type Subjects = BTreeMap<String, BTreeMap<u64, Option<[u8; 32]>>>;

/// One record of the file.
type Entry = (String, u64, Option<[u8; 32]>);

impl KeyRing {
    /// The keys in the file at `path`, or none if there is no file. A file cut
    /// short at its end (a key written in part when the program died) is torn,
    /// unless the store was `closed_cleanly`: every key was then written whole,
    /// and a short end is damage (a length field changed, say), which dropping
    /// would lose keys that events use.
    pub(crate) fn open(
        io: Io,
        path: PathBuf,
        sealer: Sealer,
        closed_cleanly: bool,
    ) -> Result<KeyRing> {
        let bad = |offset: usize, reason: &str| Error::SubjectKeysCorrupt {
            path: path.clone(),
            reason: format!("at byte {offset}: {reason}"),
        };
        let (bytes, found) = match io.read(&path) {
            Ok(bytes) => (bytes, true),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => (Vec::new(), false),
            Err(source) => return Err(Error::Io { path, source }),
        };
        let mut subjects = Subjects::new();
        let cut_short = |offset: usize| {
            if closed_cleanly {
                let reason = "the file is cut short, though the store was closed cleanly";
                return Err(bad(offset, reason));
            }
            Ok(true)
        };
        // An empty file: its first key was being written when the program died.
        let mut torn = found && bytes.is_empty();
        if torn {
            cut_short(0)?;
        }
        if !bytes.is_empty() {
            let rest =
                bytes.strip_prefix(MAGIC).ok_or_else(|| bad(0, "it is no subject key file"))?;
            let mut rest = match rest.split_first() {
                Some((&VERSION, rest)) => rest,
                Some((version, _)) => {
                    let reason =
                        format!("its version {version} is unknown (this build reads {VERSION})");
                    return Err(bad(MAGIC.len(), &reason));
                }
                None => return Err(bad(MAGIC.len(), "it is cut short")),
            };
            while !rest.is_empty() {
                let offset = bytes.len() - rest.len();
                let record = rest.split_first_chunk::<4>().and_then(|(len, after)| {
                    let len = usize::try_from(u32::from_le_bytes(*len)).ok()?;
                    let body = after.get(..len)?;
                    let sum = after.get(len..len + 8)?;
                    Some((len, body, sum))
                });
                let Some((len, body, sum)) = record else {
                    // Cut short at the end: a key appended when the program died,
                    // which no event uses. A length no sound record has is damage.
                    let len =
                        rest.split_first_chunk::<4>().map(|(len, _)| u32::from_le_bytes(*len));
                    if len.is_some_and(|len| MAX_RECORD < len as usize) {
                        return Err(bad(offset, "a record's length is larger than any record"));
                    }
                    torn = cut_short(offset)?;
                    break;
                };
                if MAX_RECORD < len {
                    return Err(bad(offset, "a record's length is larger than any record"));
                }
                let whole = rest.get(..4 + len).unwrap_or_default();
                if xxhash_rust::xxh3::xxh3_64(whole).to_le_bytes() != sum {
                    // The last record, its checksum never written (a file extended
                    // with zeros by a crash): torn. A wrong checksum is damage.
                    if rest.len() == 4 + len + 8 && sum == [0; 8] {
                        torn = cut_short(offset)?;
                        break;
                    }
                    return Err(bad(offset, "a record's checksum does not match"));
                }
                let plain =
                    sealer.open(AAD, body).map_err(|fault| bad(offset, &fault.to_string()))?;
                let (subject, generation, key): Entry = crate::codec::decode_exact(&plain)
                    .map_err(|err| bad(offset, &err.to_string()))?;
                subjects.entry(subject).or_default().insert(generation, key);
                rest = rest.get(4 + len + 8..).unwrap_or_default();
            }
        }
        Ok(KeyRing {
            path,
            io,
            sealer,
            subjects: Mutex::new((subjects, torn)),
            #[cfg(feature = "postgres")]
            database: None,
        })
    }

    /// The keys of the event store `engine`, kept in its database (`label` names
    /// it in errors); none is read until needed.
    #[cfg(feature = "postgres")]
    pub(crate) fn in_database(engine: Arc<crate::postgres::PgEvents>, label: PathBuf) -> KeyRing {
        KeyRing {
            path: label,
            io: Io::default(),
            sealer: Sealer::default(),
            subjects: Mutex::new((Subjects::new(), false)),
            database: Some((engine, Mutex::new(0))),
        }
    }

    /// In a database: forgets in memory the keys that other processes (or this
    /// one) forgot since the last look, from the effects appended since. A read
    /// looks before it decodes a page holding linked events, and an append
    /// refused for a forgotten key before it seals again, so that a key
    /// forgotten anywhere reads as shredded here from then on.
    #[cfg(feature = "postgres")]
    pub(crate) fn refresh(&self) -> Result<()> {
        if let Some((engine, seen)) = &self.database {
            let mut seen = seen.lock();
            let effects = engine.effects_from(*seen)?;
            for effect in &effects {
                if 0 < effect.forgotten {
                    self.forgotten(&effect.trigger, effect.forgotten);
                }
            }
            *seen += effects.len() as u64;
        }
        Ok(())
    }

    /// The generation of the newest key of `subject`, unless it has none or it
    /// was forgotten.
    pub(crate) fn live_generation(&self, subject: &str) -> Option<u64> {
        self.current(subject).map(|(generation, _)| generation)
    }

    /// The newest key of `subject` and its generation, unless it has none or it
    /// was forgotten.
    fn current(&self, subject: &str) -> Option<(u64, [u8; 32])> {
        let subjects = self.subjects.lock();
        let (generation, key) = subjects.0.get(subject)?.last_key_value()?;
        Some((*generation, (*key)?))
    }

    #[cfg_attr(not(feature = "postgres"), allow(clippy::unnecessary_wraps))]
    fn lookup(&self, subject: &str, generation: u64) -> Result<Lookup> {
        let known = {
            let subjects = self.subjects.lock();
            match subjects.0.get(subject).and_then(|keys| keys.get(&generation)) {
                Some(Some(key)) => Lookup::Key(*key),
                Some(None) => Lookup::Forgotten,
                None => Lookup::Missing,
            }
        };
        // In a database, another process may have made the key.
        #[cfg(feature = "postgres")]
        if let (Lookup::Missing, Some((engine, _))) = (&known, &self.database) {
            let Some(stored) = engine.key(subject, generation)? else {
                return Ok(Lookup::Missing);
            };
            self.subjects
                .lock()
                .0
                .entry(subject.to_owned())
                .or_default()
                .insert(generation, stored);
            return Ok(stored.map_or(Lookup::Forgotten, Lookup::Key));
        }
        Ok(known)
    }

    /// Makes a new key for `subject`, unless it has one, and appends it to the
    /// file, durably.
    fn create(&self, subject: &str) -> Result<()> {
        if MAX_SUBJECT < subject.len() {
            return Err(Error::InvalidAppend {
                reason: format!(
                    "a subject is {} bytes long, over the limit of {MAX_SUBJECT}",
                    subject.len()
                ),
            });
        }
        #[cfg(feature = "postgres")]
        if let Some((engine, _)) = &self.database {
            // Another process may have made one: the newest live key is taken.
            let (generation, key) = engine.create_key(subject, crate::crypt::random_key())?;
            let mut subjects = self.subjects.lock();
            let keys = subjects.0.entry(subject.to_owned()).or_default();
            for older in keys.range_mut(..generation).map(|(_, key)| key) {
                // Below a live generation, every key was forgotten.
                *older = None;
            }
            keys.insert(generation, Some(key));
            return Ok(());
        }
        let mut guard = self.subjects.lock();
        let (subjects, torn) = &mut *guard;
        let keys = subjects.entry(subject.to_owned()).or_default();
        if keys.last_key_value().is_some_and(|(_, key)| key.is_some()) {
            return Ok(());
        }
        let generation = keys.last_key_value().map_or(0, |(generation, _)| generation + 1);
        let key = crate::crypt::random_key();
        let entry: Entry = (subject.to_owned(), generation, Some(key));
        // Written whole when new: an empty file was torn, and read as such.
        let fresh = !self.path.exists();
        let res = if fresh || *torn {
            let mut with = subjects.clone();
            with.entry(subject.to_owned()).or_default().insert(generation, Some(key));
            self.write(&with)
        } else {
            self.append(&entry)
        };
        if res.is_err() {
            // A record written in part: the next write writes the file anew.
            *torn = true;
        }
        res?;
        *torn = false;
        subjects.entry(subject.to_owned()).or_default().insert(generation, Some(key));
        Ok(())
    }

    /// Appends the record of `entry` to the file, and syncs it.
    fn append(&self, entry: &Entry) -> Result<()> {
        let io_err = |source| Error::Io { path: self.path.clone(), source };
        let mut file = self.io.open(&self.path, crate::io::Open::Append).map_err(io_err)?;
        let record = self.record(entry)?;
        std::io::Write::write_all(&mut file, &record).map_err(io_err)?;
        file.sync_data().map_err(io_err)
    }

    /// The bytes of one record.
    fn record(&self, entry: &Entry) -> Result<Vec<u8>> {
        let plain = postcard::to_allocvec(entry).map_err(|source| Error::EventEncode {
            path: self.path.clone(),
            type_name: "subject keys".to_owned(),
            source: crate::error::CodecError::from(source),
        })?;
        let body = self.sealer.seal(AAD, plain);
        let len = u32::try_from(body.len()).map_err(|_| Error::InvalidAppend {
            reason: "a subject's name is too long for the key file".to_owned(),
        })?;
        let mut record = len.to_le_bytes().to_vec();
        record.extend_from_slice(&body);
        let sum = xxhash_rust::xxh3::xxh3_64(&record);
        record.extend_from_slice(&sum.to_le_bytes());
        Ok(record)
    }

    /// Forgets every key of `subject` in memory: from now on its values read as
    /// shredded. Returns the generation below which its keys are forgotten, for
    /// the effect that records it; [`persist`](Self::persist) destroys them on disk.
    pub(crate) fn forget(&self, subject: &str) -> u64 {
        let mut subjects = self.subjects.lock();
        let keys = subjects.0.entry(subject.to_owned()).or_default();
        for key in keys.values_mut() {
            *key = None;
        }
        let below = keys.last_key_value().map_or(0, |(generation, _)| generation + 1);
        if below == 0 {
            // A subject without keys: its first generation is forgotten, so that
            // the record of the forgetting stays.
            keys.insert(0, None);
            return 1;
        }
        below
    }

    /// Forgets the keys of `subject` below generation `below`, as an effect that
    /// opening replays says; returns whether one was still there.
    pub(crate) fn forgotten(&self, subject: &str, below: u64) -> bool {
        let mut subjects = self.subjects.lock();
        let keys = subjects.0.entry(subject.to_owned()).or_default();
        let mut changed = false;
        for generation in 0..below {
            let key = keys.entry(generation).or_insert(None);
            changed |= key.take().is_some();
        }
        changed
    }

    /// Whether the file's end was torn (a key written in part) and not yet
    /// written anew.
    pub(crate) fn torn(&self) -> bool {
        self.subjects.lock().1
    }

    /// Writes the keys in memory to the file, durably.
    pub(crate) fn persist(&self) -> Result<()> {
        let mut guard = self.subjects.lock();
        self.write(&guard.0)?;
        guard.1 = false;
        Ok(())
    }

    /// Writes the file anew with the keys of `subjects`, durably.
    fn write(&self, subjects: &Subjects) -> Result<()> {
        let mut bytes = MAGIC.to_vec();
        bytes.push(VERSION);
        for (subject, keys) in subjects {
            for (generation, key) in keys {
                bytes.extend(self.record(&(subject.clone(), *generation, *key))?);
            }
        }
        self.io
            .write_durably(&self.path, &bytes)
            .map_err(|source| Error::Io { path: self.path.clone(), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(path: &std::path::Path) -> Result<KeyRing> {
        KeyRing::open(Io::default(), path.to_path_buf(), Sealer::default(), false)
    }

    /// An empty key file (its first key written when the program died) holds no
    /// key, and the next key writes it anew, header first, so that it opens.
    #[test]
    fn an_empty_key_file_is_written_anew_by_the_next_key() -> Result<()> {
        let dir = tempfile::tempdir().map_err(Error::io("tempdir"))?;
        let path = dir.path().join("subject-keys");
        std::fs::write(&path, []).map_err(Error::io(&path))?;
        let keys = ring(&path)?;
        assert!(keys.current("ann").is_none());
        keys.create("ann")?;
        let ann = keys.current("ann").map(|(_, key)| key);
        assert!(ann.is_some());
        assert_eq!(ring(&path)?.current("ann").map(|(_, key)| key), ann);
        // After a clean close, the same empty file is damage.
        std::fs::write(&path, []).map_err(Error::io(&path))?;
        let clean = KeyRing::open(Io::default(), path.clone(), Sealer::default(), true);
        assert!(matches!(clean, Err(Error::SubjectKeysCorrupt { .. })));
        Ok(())
    }

    /// Keys are appended one record each; a record cut short at the end is passed
    /// over, damage before the end is refused, and forgetting rewrites the file
    /// without the key's bytes.
    #[test]
    fn key_records_append_survive_a_torn_end_and_forgetting_rewrites() -> Result<()> {
        let dir = tempfile::tempdir().map_err(Error::io("tempdir"))?;
        let path = dir.path().join("subject-keys");
        let keys = ring(&path)?;
        for subject in ["ann", "bob", "cy"] {
            keys.create(subject)?;
        }
        let bob = keys.current("bob").map(|(_, key)| key);
        let bytes = std::fs::read(&path).map_err(Error::io(&path))?;
        assert_eq!(ring(&path)?.current("bob").map(|(_, key)| key), bob);

        // Cut in the last record: the first two keys are there, the third is not.
        std::fs::write(&path, bytes.get(..bytes.len() - 5).unwrap_or_default())
            .map_err(Error::io(&path))?;
        let reopened = ring(&path)?;
        assert!(reopened.current("bob").is_some() && reopened.current("cy").is_none());
        // The next key rewrites the file without the torn record.
        reopened.create("dee")?;
        assert!(ring(&path)?.current("dee").is_some());

        // A flipped byte in the first record is damage, not a torn end.
        let mut damaged = std::fs::read(&path).map_err(Error::io(&path))?;
        if let Some(byte) = damaged.get_mut(MAGIC.len() + 1 + 6) {
            *byte ^= 1;
        }
        std::fs::write(&path, &damaged).map_err(Error::io(&path))?;
        assert!(matches!(ring(&path), Err(Error::SubjectKeysCorrupt { .. })));

        // A flipped high byte of the first record's length is damage too, not a
        // torn end that would drop every key after it.
        std::fs::remove_file(&path).map_err(Error::io(&path))?;
        let keys = ring(&path)?;
        keys.create("fay")?;
        keys.create("gus")?;
        let mut damaged = std::fs::read(&path).map_err(Error::io(&path))?;
        if let Some(byte) = damaged.get_mut(MAGIC.len() + 1 + 3) {
            *byte ^= 0x40;
        }
        std::fs::write(&path, &damaged).map_err(Error::io(&path))?;
        assert!(matches!(ring(&path), Err(Error::SubjectKeysCorrupt { .. })));

        // Forgetting rewrites the file without the key's bytes.
        std::fs::remove_file(&path).map_err(Error::io(&path))?;
        let keys = ring(&path)?;
        keys.create("eve")?;
        let eve = keys.current("eve").map(|(_, key)| key).unwrap_or_default();
        keys.forget("eve");
        keys.persist()?;
        let bytes = std::fs::read(&path).map_err(Error::io(&path))?;
        assert!(!bytes.windows(32).any(|it| it == eve), "the key's bytes are gone");
        assert!(matches!(ring(&path)?.lookup("eve", 0)?, Lookup::Forgotten));
        Ok(())
    }
}
