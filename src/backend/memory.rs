//! The transient backend: records live in memory and die with the store.

use parking_lot::Mutex;

use super::{Backend, Batch, Records};
use crate::Result;

#[derive(Debug, Default)]
pub(crate) struct Memory {
    records: Mutex<Records>,
}

impl Memory {
    /// A backend that starts out holding `records`.
    pub(crate) fn holding(records: Records) -> Memory {
        Memory { records: Mutex::new(records) }
    }
}

impl Backend for Memory {
    fn read_all(&self) -> Result<Records> {
        Ok(self.records.lock().clone())
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.records.lock().get(key).cloned())
    }

    fn commit(&self, batch: Batch) -> Result<()> {
        let mut records = self.records.lock();
        for (key, value) in batch {
            match value {
                Some(value) => records.insert(key, value),
                None => records.remove(&key),
            };
        }
        Ok(())
    }

    fn compact(&self) -> Result<()> {
        Ok(())
    }

    fn close(&self) -> Result<()> {
        Ok(())
    }
}
