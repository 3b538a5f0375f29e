//! Encryption at rest (feature `encryption`): every record and value file sealed
//! with XChaCha20-Poly1305 under a key the user supplies.
//!
//! A sealed record is
//!
//! ```text
//! magic "IE" | version u8 | nonce [24] | ciphertext and tag of the plain record
//! ```
//!
//! with a fresh random nonce per record (192-bit nonces make random ones safe) and
//! the record's key as associated data, so a record moved to another key fails to
//! open. A sealed value file is
//!
//! ```text
//! magic "IF" | version u8 | nonce prefix [19] | chunks: len u32 | ciphertext and tag
//! ```
//!
//! using the STREAM construction (`aead::stream`, big-endian 32-bit counter), whose
//! nonces also mark the last chunk, so reordered, dropped or truncated chunks fail
//! to open. Each record seals on its own and every save writes new files, so there
//! is no cipher state that a crash could leave half-written.
//!
//! What this does not protect: each record is authenticated on its own, so someone
//! who can write the store can replace a record with an older sealed record of the
//! same key (the history holds some) or delete records; metadata (`meta/*`, the
//! history's framing, cell names) is checksummed, not authenticated.
//!
//! Without the feature, [`Sealer`] does nothing but recognise sealed data, so that an
//! encrypted store is refused with a clear error rather than misread.

use std::borrow::Cow;

pub(crate) const SEALED_MAGIC: [u8; 2] = *b"IE";
#[cfg(feature = "encryption")]
const FILE_MAGIC: [u8; 2] = *b"IF";
#[cfg(feature = "encryption")]
const VERSION: u8 = 1;
/// The plain bytes sealed in each chunk of a stream (`Sealer::seal_stream`).
const STREAM_CHUNK: usize = 256 * 1024;
/// What the key check record seals.
pub(crate) const KEYCHECK_PLAIN: &[u8] = b"instastate key check v1";

/// Why sealed bytes could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(feature = "encryption"), allow(dead_code))]
pub(crate) enum SealFault {
    /// The bytes are sealed, and there is no key.
    NoKey,
    /// There is a key, and the bytes are not sealed.
    NotSealed,
    /// The bytes do not authenticate: the wrong key, or tampered with.
    Auth,
    /// The bytes are too short, or of an unknown version.
    Malformed,
}

impl std::fmt::Display for SealFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SealFault::NoKey => "it is encrypted and no key was given",
            SealFault::NotSealed => "it is not encrypted, in an encrypted store",
            SealFault::Auth => {
                "it does not authenticate: tampered with, or sealed under another key"
            }
            SealFault::Malformed => "its encryption envelope is malformed",
        })
    }
}

/// A 256-bit key for an encrypted store.
///
/// Derive it from a passphrase with a password hash (such as Argon2), or keep it in
/// a secret store; instastate never writes it anywhere.
///
/// # Example
/// ```
/// # fn main() -> instastate::Result<()> {
/// use instastate::{EncryptionKey, StateCell, Store};
///
/// static NOTES: StateCell<Vec<String>> = StateCell::new("docs::crypt::NOTES", Vec::new);
///
/// let key = EncryptionKey::from_bytes([7; 32]);
/// # let dir = tempfile::tempdir().unwrap();
/// let store = Store::builder().cell(&NOTES).encryption_key(key.clone()).open(dir.path())?;
/// NOTES.update(|notes| notes.push("secret".into()));
/// store.save_all()?;
/// drop(store);
///
/// let wrong = EncryptionKey::from_bytes([8; 32]);
/// let res = Store::builder().cell(&NOTES).encryption_key(wrong).open(dir.path());
/// assert!(matches!(res, Err(instastate::Error::WrongKey { .. })));
/// # Ok(())
/// # }
/// ```
#[cfg(feature = "encryption")]
#[derive(Clone)]
pub struct EncryptionKey([u8; 32]);

#[cfg(feature = "encryption")]
impl EncryptionKey {
    /// The key made of these 32 bytes.
    #[must_use]
    pub fn from_bytes(bytes: [u8; 32]) -> EncryptionKey {
        EncryptionKey(bytes)
    }
}

#[cfg(feature = "encryption")]
impl std::fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EncryptionKey(..)")
    }
}

/// A new random key.
#[cfg(feature = "encryption")]
pub(crate) fn random_key() -> [u8; 32] {
    use chacha20poly1305::aead::{OsRng, rand_core::RngCore};
    let mut key = [0; 32];
    OsRng.fill_bytes(&mut key);
    key
}

/// Seals and opens records and value files, or passes them through.
#[derive(Default, Clone)]
pub(crate) struct Sealer {
    #[cfg(feature = "encryption")]
    cipher: Option<imp::Cipher>,
}

// Without the feature, the methods do not need `self`; with it, they do.
#[cfg_attr(not(feature = "encryption"), allow(clippy::unused_self, clippy::unnecessary_wraps))]
impl Sealer {
    #[cfg(feature = "encryption")]
    pub(crate) fn new(key: Option<&EncryptionKey>) -> Sealer {
        Sealer { cipher: key.map(|key| imp::Cipher::new(&key.0)) }
    }

    pub(crate) fn is_on(&self) -> bool {
        #[cfg(feature = "encryption")]
        return self.cipher.is_some();
        #[cfg(not(feature = "encryption"))]
        false
    }

    /// Seals a record stored under `aad`, or returns it as it is.
    pub(crate) fn seal(&self, aad: &[u8], plain: Vec<u8>) -> Vec<u8> {
        #[cfg(feature = "encryption")]
        if let Some(cipher) = &self.cipher {
            return cipher.seal(aad, &plain);
        }
        let _ = aad;
        plain
    }

    /// Opens a record stored under `aad`.
    pub(crate) fn open<'a>(
        &self,
        aad: &[u8],
        stored: &'a [u8],
    ) -> Result<Cow<'a, [u8]>, SealFault> {
        let sealed = stored.starts_with(&SEALED_MAGIC);
        #[cfg(feature = "encryption")]
        if let Some(cipher) = &self.cipher {
            if !sealed {
                return Err(SealFault::NotSealed);
            }
            return cipher.open(aad, stored).map(Cow::Owned);
        }
        let _ = aad;
        if sealed { Err(SealFault::NoKey) } else { Ok(Cow::Borrowed(stored)) }
    }

    /// Seals `plain`, of any length, in chunks (the STREAM construction of value
    /// files), for `aad`; returns it as it is without a key. Opened by
    /// [`open_file`](Self::open_file).
    pub(crate) fn seal_stream(&self, aad: &[u8], plain: Vec<u8>) -> std::io::Result<Vec<u8>> {
        let Some(mut chunks) = self.file_sealer(aad) else { return Ok(plain) };
        let mut out = chunks.header();
        let mut parts = plain.chunks(STREAM_CHUNK).peekable();
        if parts.peek().is_none() {
            out.extend(chunks.chunk(&[], true)?);
        }
        while let Some(part) = parts.next() {
            out.extend(chunks.chunk(part, parts.peek().is_none())?);
        }
        Ok(out)
    }

    /// Starts sealing a value file stored for `aad`; `None` without a key.
    pub(crate) fn file_sealer(&self, aad: &[u8]) -> Option<FileSealer> {
        #[cfg(feature = "encryption")]
        if let Some(cipher) = &self.cipher {
            return Some(FileSealer { inner: cipher.file_sealer(aad) });
        }
        let _ = aad;
        None
    }

    /// Opens the bytes of a value file written for `aad`.
    pub(crate) fn open_file(&self, aad: &[u8], stored: Vec<u8>) -> Result<Vec<u8>, SealFault> {
        #[cfg(feature = "encryption")]
        if let Some(cipher) = &self.cipher {
            return cipher.open_file(aad, &stored);
        }
        let _ = aad;
        Ok(stored)
    }
}

/// Seals one value file, chunk by chunk.
pub(crate) struct FileSealer {
    #[cfg(feature = "encryption")]
    inner: imp::FileSealer,
    #[cfg(not(feature = "encryption"))]
    never: std::convert::Infallible,
}

impl FileSealer {
    /// The bytes every sealed file starts with.
    pub(crate) fn header(&self) -> Vec<u8> {
        #[cfg(feature = "encryption")]
        return self.inner.header();
        #[cfg(not(feature = "encryption"))]
        match self.never {}
    }

    /// Seals the next chunk, the last one if `last`, and returns its framed bytes.
    pub(crate) fn chunk(&mut self, plain: &[u8], last: bool) -> std::io::Result<Vec<u8>> {
        #[cfg(feature = "encryption")]
        return self.inner.chunk(plain, last);
        #[cfg(not(feature = "encryption"))]
        {
            let _ = (plain, last);
            match self.never {}
        }
    }
}

#[cfg(feature = "encryption")]
mod imp {
    use chacha20poly1305::{
        AeadCore, KeyInit, XChaCha20Poly1305, XNonce,
        aead::{
            Aead, OsRng, Payload,
            rand_core::RngCore,
            stream::{DecryptorBE32, EncryptorBE32},
        },
    };

    use super::{FILE_MAGIC, SEALED_MAGIC, SealFault, VERSION};

    const NONCE_LEN: usize = 24;
    // The STREAM construction uses 5 of the 24 nonce bytes for its counter and flag.
    const PREFIX_LEN: usize = 19;

    #[derive(Clone)]
    pub(super) struct Cipher {
        aead: XChaCha20Poly1305,
    }

    impl Cipher {
        pub(super) fn new(key: &[u8; 32]) -> Cipher {
            Cipher { aead: XChaCha20Poly1305::new(key.into()) }
        }

        pub(super) fn seal(&self, aad: &[u8], plain: &[u8]) -> Vec<u8> {
            let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
            let mut out = Vec::with_capacity(3 + NONCE_LEN + plain.len() + 16);
            out.extend_from_slice(&SEALED_MAGIC);
            out.push(VERSION);
            out.extend_from_slice(&nonce);
            // Encryption into a `Vec` fails only past the cipher's limit of 256 GiB.
            // What is sealed here is bounded far below it: records (a few KiB), key
            // checks, and events (at most 1 GiB, refused before they are numbered).
            // Snapshots, which have no bound, are sealed in chunks (`seal_stream`).
            #[allow(clippy::expect_used)]
            let sealed = self
                .aead
                .encrypt(&nonce, Payload { msg: plain, aad })
                .expect("a record, key check or event is far below 256 GiB");
            out.extend_from_slice(&sealed);
            out
        }

        pub(super) fn open(&self, aad: &[u8], stored: &[u8]) -> Result<Vec<u8>, SealFault> {
            let rest = stored.strip_prefix(&SEALED_MAGIC).ok_or(SealFault::NotSealed)?;
            let rest = rest.strip_prefix(&[VERSION]).ok_or(SealFault::Malformed)?;
            let (nonce, sealed) =
                rest.split_first_chunk::<NONCE_LEN>().ok_or(SealFault::Malformed)?;
            self.aead
                .decrypt(XNonce::from_slice(nonce), Payload { msg: sealed, aad })
                .map_err(|_| SealFault::Auth)
        }

        pub(super) fn file_sealer(&self, aad: &[u8]) -> FileSealer {
            let mut prefix = [0; PREFIX_LEN];
            OsRng.fill_bytes(&mut prefix);
            let stream = EncryptorBE32::from_aead(self.aead.clone(), (&prefix).into());
            FileSealer { prefix, aad: aad.to_vec(), stream: Some(stream) }
        }

        pub(super) fn open_file(&self, aad: &[u8], stored: &[u8]) -> Result<Vec<u8>, SealFault> {
            let rest = stored.strip_prefix(&FILE_MAGIC).ok_or(SealFault::Malformed)?;
            let rest = rest.strip_prefix(&[VERSION]).ok_or(SealFault::Malformed)?;
            let (prefix, mut rest) =
                rest.split_first_chunk::<PREFIX_LEN>().ok_or(SealFault::Malformed)?;
            let mut stream = DecryptorBE32::from_aead(self.aead.clone(), prefix.into());
            let mut out = Vec::with_capacity(rest.len());
            loop {
                let (len, after) = rest.split_first_chunk::<4>().ok_or(SealFault::Malformed)?;
                let len =
                    usize::try_from(u32::from_be_bytes(*len)).map_err(|_| SealFault::Malformed)?;
                let (chunk, after) = after.split_at_checked(len).ok_or(SealFault::Malformed)?;
                let payload = Payload { msg: chunk, aad };
                if after.is_empty() {
                    let plain = stream.decrypt_last(payload).map_err(|_| SealFault::Auth)?;
                    out.extend_from_slice(&plain);
                    return Ok(out);
                }
                let plain = stream.decrypt_next(payload).map_err(|_| SealFault::Auth)?;
                out.extend_from_slice(&plain);
                rest = after;
            }
        }
    }

    pub(super) struct FileSealer {
        prefix: [u8; PREFIX_LEN],
        aad: Vec<u8>,
        // Taken by the last chunk.
        stream: Option<EncryptorBE32<XChaCha20Poly1305>>,
    }

    impl FileSealer {
        pub(super) fn header(&self) -> Vec<u8> {
            [&FILE_MAGIC[..], &[VERSION], &self.prefix].concat()
        }

        pub(super) fn chunk(&mut self, plain: &[u8], last: bool) -> std::io::Result<Vec<u8>> {
            let payload = Payload { msg: plain, aad: &self.aad };
            let sealed = match (last, self.stream.take()) {
                (_, None) => return Err(std::io::Error::other("value file sealed past its end")),
                (true, Some(stream)) => stream.encrypt_last(payload),
                (false, Some(mut stream)) => {
                    let sealed = stream.encrypt_next(payload);
                    self.stream = Some(stream);
                    sealed
                }
            }
            .map_err(|_| std::io::Error::other("value file chunk could not be sealed"))?;
            let len = u32::try_from(sealed.len())
                .map_err(|_| std::io::Error::other("value file chunk too large to seal"))?;
            Ok([&len.to_be_bytes()[..], &sealed].concat())
        }
    }
}

#[cfg(all(test, feature = "encryption"))]
mod tests {
    use super::*;

    fn sealer(byte: u8) -> Sealer {
        Sealer::new(Some(&EncryptionKey::from_bytes([byte; 32])))
    }

    #[test]
    fn records_round_trip_with_a_fresh_nonce_each_time() {
        let sealer = sealer(1);
        let first = sealer.seal(b"cell/a", b"plain record".to_vec());
        let second = sealer.seal(b"cell/a", b"plain record".to_vec());
        assert_ne!(first, second, "two seals of one record must differ");
        assert_eq!(sealer.open(b"cell/a", &first).as_deref(), Ok(&b"plain record"[..]));
    }

    #[test]
    fn every_bit_flip_truncation_and_wrong_context_fails_to_open() {
        let keyed = sealer(1);
        let sealed = keyed.seal(b"cell/a", b"plain record".to_vec());
        for bit in 0..sealed.len() * 8 {
            let mut flipped = sealed.clone();
            if let Some(byte) = flipped.get_mut(bit / 8) {
                *byte ^= 1 << (bit % 8);
            }
            assert!(keyed.open(b"cell/a", &flipped).is_err(), "bit {bit} flipped unnoticed");
        }
        for len in 0..sealed.len() {
            let cut = sealed.get(..len).unwrap_or_default();
            assert!(keyed.open(b"cell/a", cut).is_err(), "cut to {len} bytes unnoticed");
        }
        assert_eq!(keyed.open(b"cell/b", &sealed), Err(SealFault::Auth), "moved record");
        assert_eq!(sealer(2).open(b"cell/a", &sealed), Err(SealFault::Auth), "wrong key");
        assert_eq!(Sealer::default().open(b"cell/a", &sealed), Err(SealFault::NoKey));
        assert_eq!(keyed.open(b"cell/a", b"IS plain"), Err(SealFault::NotSealed));
    }

    fn sealed_file(sealer: &Sealer, chunks: &[&[u8]]) -> Vec<u8> {
        let mut file = sealer.file_sealer(b"cell/big").expect("a key is set");
        let mut out = file.header();
        for (idx, chunk) in chunks.iter().enumerate() {
            let last = idx + 1 == chunks.len();
            out.extend(file.chunk(chunk, last).expect("sealing to memory"));
        }
        out
    }

    #[test]
    fn streams_of_any_length_round_trip() {
        let sealer = sealer(4);
        for len in [0, 1, STREAM_CHUNK, STREAM_CHUNK + 1, 2 * STREAM_CHUNK + 3] {
            let plain: Vec<u8> = (0..len).map(|it| u8::try_from(it % 253).unwrap_or(0)).collect();
            let stream = sealer.seal_stream(b"snap", plain.clone()).expect("sealing in memory");
            assert_eq!(sealer.open_file(b"snap", stream.clone()), Ok(plain), "{len}");
            assert!(sealer.open_file(b"other", stream).is_err());
        }
    }

    #[test]
    fn value_files_round_trip_and_detect_truncation_reordering_and_flips() {
        let sealer = sealer(3);
        let chunks: [&[u8]; 3] = [b"first chunk", b"second chunk", b"last"];
        let file = sealed_file(&sealer, &chunks);
        assert_eq!(sealer.open_file(b"cell/big", file.clone()), Ok(chunks.concat()));
        assert_eq!(sealer.open_file(b"cell/other", file.clone()), Err(SealFault::Auth));

        // Dropping the last chunk leaves a file whose final chunk is not marked last.
        let without_last = sealed_file(&sealer, &chunks[..2]);
        let cut = file.get(..file.len() - (4 + 4 + 16)).unwrap_or_default().to_vec();
        assert!(sealer.open_file(b"cell/big", cut).is_err(), "a dropped last chunk went unnoticed");
        assert!(sealer.open_file(b"cell/big", without_last).is_ok());

        for bit in (0..file.len() * 8).step_by(7) {
            let mut flipped = file.clone();
            if let Some(byte) = flipped.get_mut(bit / 8) {
                *byte ^= 1 << (bit % 8);
            }
            assert!(sealer.open_file(b"cell/big", flipped).is_err(), "bit {bit} flipped unnoticed");
        }

        // Swapping two equal-length chunks fails: their nonces count positions.
        let same: [&[u8]; 3] = [b"aaaa", b"bbbb", b"cccc"];
        let file = sealed_file(&sealer, &same);
        let header = 3 + 19;
        let chunk = 4 + 4 + 16;
        let mut swapped = file.get(..header).unwrap_or_default().to_vec();
        swapped.extend_from_slice(file.get(header + chunk..header + 2 * chunk).unwrap_or_default());
        swapped.extend_from_slice(file.get(header..header + chunk).unwrap_or_default());
        swapped.extend_from_slice(file.get(header + 2 * chunk..).unwrap_or_default());
        assert_eq!(swapped.len(), file.len());
        assert_eq!(sealer.open_file(b"cell/big", swapped), Err(SealFault::Auth));
    }
}
