//! Storage engines: where records live and how a batch of them commits.
//!
//! A backend stores small records (at most a few KiB, see
//! [`INLINE_MAX`](crate::codec::INLINE_MAX)) under byte-string keys and commits a
//! batch of them atomically and durably. Everything above this line (cells, value
//! files, the record format) is the same for every engine.

mod memory;
mod sled;

pub(crate) use self::{memory::Memory, sled::Sled};
use crate::Result;

/// Every record in a backend, sorted by key.
pub(crate) type Records = std::collections::BTreeMap<Vec<u8>, Vec<u8>>;

/// Records to write (`Some`) or delete (`None`), by key.
pub(crate) type Batch = Vec<(Vec<u8>, Option<Vec<u8>>)>;

pub(crate) trait Backend: Send + Sync {
    /// Reads every record.
    fn read_all(&self) -> Result<Records>;

    /// Reads one record.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>>;

    /// Applies every write and delete of `batch` in one atomic step, and returns
    /// only once that step survives power loss.
    fn commit(&self, batch: Batch) -> Result<()>;

    /// Rewrites the engine's files to hold only the live records, atomically.
    fn compact(&self) -> Result<()>;

    /// Makes everything committed durable and lets the engine's files go; later
    /// calls of any method fail (this one does nothing).
    fn close(&self) -> Result<()>;
}
