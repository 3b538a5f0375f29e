//! Crypto-shredding: event data sealed with a key per subject (a person, say),
//! which forgetting the subject destroys, so that the data can never be read
//! again, from the journal or from any backup of it.
//!
//! A [`Sealed`] value in an event is encoded by the store with its subject's key
//! (XChaCha20-Poly1305, the subject and key generation as associated data) and
//! decoded with it; once the key is gone it decodes as shredded. The keys live in
//! one file (`subject-keys` in the store's directory unless the builder says
//! elsewhere), rewritten whole, durably, at each change, and sealed with the
//! store's key when it has one. A backup of the store
//! ([`EventStore::backup_to`](super::EventStore::backup_to)) leaves it out.
//!
//! ```text
//! file: magic "ISKEYS" | version u8 = 1 | body (sealed with the store's key, if any) | xxh3-64 LE
//! body: postcard of [(subject, [(generation, key: Option<[u8; 32]>)])]
//! ```

use std::{cell::RefCell, collections::BTreeMap, fmt, path::PathBuf, sync::Arc};

use parking_lot::Mutex;
use serde::{Deserialize, Deserializer, Serialize, Serializer, de::DeserializeOwned};

use crate::{EncryptionKey, Error, Result, crypt::Sealer, io::Io};

const MAGIC: &[u8; 6] = b"ISKEYS";
const VERSION: u8 = 1;
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
            let key = context.ring.current(&self.subject);
            match key {
                Some(_) => context.subjects.push(self.subject.clone()),
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
            Lookup::Key(key) => key,
            Lookup::Forgotten => return Ok(Sealed { subject, value: None }),
            Lookup::Missing => {
                let err = Error::SubjectKeyMissing {
                    path: ring.path.clone(),
                    subject: subject.clone(),
                    generation,
                };
                OPENING_FAILURE.with(|failure| *failure.borrow_mut() = Some(err));
                return Err(D::Error::custom("a subject key is missing"));
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
    /// The subjects whose keys sealed values of the event.
    subjects: Vec<String>,
    /// The subjects the event needs a key of, which they lack.
    missing: Vec<String>,
}

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
    encode: impl Fn() -> Result<Vec<u8>>,
) -> Result<(Vec<u8>, Vec<String>)> {
    // A subject's key is made at most once per event; a value of a subject whose
    // key is made between two tries finds it at the next.
    for _ in 0..3 {
        let context = Sealing { ring: Arc::clone(ring), subjects: Vec::new(), missing: Vec::new() };
        let previous = SEALING.with(|it| it.borrow_mut().replace(context));
        let res = encode();
        let context = SEALING.with(|it| std::mem::replace(&mut *it.borrow_mut(), previous));
        let Some(Sealing { mut subjects, missing, .. }) = context else {
            return res.map(|bytes| (bytes, Vec::new()));
        };
        if missing.is_empty() {
            subjects.sort_unstable();
            subjects.dedup();
            return res.map(|bytes| (bytes, subjects));
        }
        for subject in missing {
            ring.create(&subject)?;
        }
    }
    Err(Error::InvalidAppend { reason: "the subject keys of an event kept changing".to_owned() })
}

/// Decodes with `decode` while [`Sealed`] values find their keys in `ring`; a
/// missing key is reported as [`Error::SubjectKeyMissing`].
pub(crate) fn opening<T>(ring: &Arc<KeyRing>, decode: impl FnOnce() -> Result<T>) -> Result<T> {
    let previous = OPENING.with(|it| it.borrow_mut().replace(Arc::clone(ring)));
    let res = decode();
    OPENING.with(|it| *it.borrow_mut() = previous);
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

/// The subject keys of a store: in memory, and in their file.
pub(crate) struct KeyRing {
    path: PathBuf,
    io: Io,
    sealer: Sealer,
    subjects: Mutex<Subjects>,
}

/// Per subject, its keys by generation; a forgotten one is `None`.
type Subjects = BTreeMap<String, BTreeMap<u64, Option<[u8; 32]>>>;

type Keys = Vec<(String, Vec<(u64, Option<[u8; 32]>)>)>;

impl KeyRing {
    /// The keys in the file at `path`, or none if there is no file.
    pub(crate) fn open(io: Io, path: PathBuf, sealer: Sealer) -> Result<KeyRing> {
        let bad = |reason: &str| Error::SubjectKeysCorrupt {
            path: path.clone(),
            reason: reason.to_owned(),
        };
        let subjects = match io.read(&path) {
            Ok(bytes) => {
                let (body, sum) =
                    bytes.split_last_chunk::<8>().ok_or_else(|| bad("it is cut short"))?;
                if xxhash_rust::xxh3::xxh3_64(body).to_le_bytes() != *sum {
                    return Err(bad("its checksum does not match"));
                }
                let body =
                    body.strip_prefix(MAGIC).ok_or_else(|| bad("it is no subject key file"))?;
                let body = match body.split_first() {
                    Some((&VERSION, body)) => body,
                    Some((version, _)) => {
                        return Err(bad(&format!(
                            "its version {version} is unknown (this build reads {VERSION})"
                        )));
                    }
                    None => return Err(bad("it is cut short")),
                };
                let plain = sealer.open(AAD, body).map_err(|fault| bad(&fault.to_string()))?;
                let keys: Keys =
                    crate::codec::decode_exact(&plain).map_err(|err| bad(&err.to_string()))?;
                keys.into_iter()
                    .map(|(subject, keys)| (subject, keys.into_iter().collect()))
                    .collect()
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => return Err(Error::Io { path, source }),
        };
        Ok(KeyRing { path, io, sealer, subjects: Mutex::new(subjects) })
    }

    /// The newest key of `subject` and its generation, unless it has none or it
    /// was forgotten.
    fn current(&self, subject: &str) -> Option<(u64, [u8; 32])> {
        let subjects = self.subjects.lock();
        let (generation, key) = subjects.get(subject)?.last_key_value()?;
        Some((*generation, (*key)?))
    }

    fn lookup(&self, subject: &str, generation: u64) -> Lookup {
        let subjects = self.subjects.lock();
        match subjects.get(subject).and_then(|keys| keys.get(&generation)) {
            Some(Some(key)) => Lookup::Key(*key),
            Some(None) => Lookup::Forgotten,
            None => Lookup::Missing,
        }
    }

    /// Makes a new key for `subject`, unless it has one, and writes the file.
    fn create(&self, subject: &str) -> Result<()> {
        let mut subjects = self.subjects.lock();
        let keys = subjects.entry(subject.to_owned()).or_default();
        if keys.last_key_value().is_some_and(|(_, key)| key.is_some()) {
            return Ok(());
        }
        let generation = keys.last_key_value().map_or(0, |(generation, _)| generation + 1);
        keys.insert(generation, Some(crate::crypt::random_key()));
        self.write(&subjects)
    }

    /// Forgets every key of `subject` in memory: from now on its values read as
    /// shredded. Returns the generation below which its keys are forgotten, for
    /// the effect that records it; [`persist`](Self::persist) destroys them on disk.
    pub(crate) fn forget(&self, subject: &str) -> u64 {
        let mut subjects = self.subjects.lock();
        let keys = subjects.entry(subject.to_owned()).or_default();
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
        let keys = subjects.entry(subject.to_owned()).or_default();
        let mut changed = false;
        for generation in 0..below {
            let key = keys.entry(generation).or_insert(None);
            changed |= key.take().is_some();
        }
        changed
    }

    /// Writes the keys in memory to the file, durably.
    pub(crate) fn persist(&self) -> Result<()> {
        let subjects = self.subjects.lock();
        self.write(&subjects)
    }

    fn write(&self, subjects: &Subjects) -> Result<()> {
        let keys: Keys = subjects
            .iter()
            .map(|(subject, keys)| (subject.clone(), keys.iter().map(|(g, k)| (*g, *k)).collect()))
            .collect();
        let plain = postcard::to_allocvec(&keys).map_err(|source| Error::EventEncode {
            path: self.path.clone(),
            type_name: "subject keys".to_owned(),
            source: crate::error::CodecError::from(source),
        })?;
        let mut bytes = MAGIC.to_vec();
        bytes.push(VERSION);
        bytes.extend(self.sealer.seal(AAD, plain));
        let sum = xxhash_rust::xxh3::xxh3_64(&bytes);
        bytes.extend_from_slice(&sum.to_le_bytes());
        self.io
            .write_durably(&self.path, &bytes)
            .map_err(|source| Error::Io { path: self.path.clone(), source })
    }
}
