//! The transient backend: records live in memory and die with the store.

use parking_lot::Mutex;

use super::{Backend, Records};
use crate::Result;

#[derive(Debug, Default)]
pub(crate) struct Memory {
    records: Mutex<Records>,
}

impl Backend for Memory {
    fn read_all(&self) -> Result<Records> {
        Ok(self.records.lock().clone())
    }

    fn commit(&self, batch: Vec<(Vec<u8>, Vec<u8>)>) -> Result<()> {
        self.records.lock().extend(batch);
        Ok(())
    }
}
