//! Effects (coherence's word): something happened to a trigger that events are
//! linked to (a key expired, a subject was forgotten), and whoever built state
//! from the aggregates those events touch must build it again. A subscription
//! delivers an effect where it was appended, then every event of the affected
//! aggregates again.

use std::sync::Arc;

use parking_lot::RwLock;
use serde::{Serialize, de::DeserializeOwned};

use super::{EventStore, Position, batch, index::Index, subscribe::Signal};
use crate::{
    Error, Result, Timestamp,
    journal::{Job, Prepared},
};

/// The reason of the effect that forgetting a subject appends.
pub const FORGOTTEN: &str = "forgotten";

/// An effect on a trigger, as a subscription delivers it
/// ([`Delivery::Effect`](super::Delivery::Effect)), followed by every event of
/// the aggregates it affects ([`Delivery::Replayed`](super::Delivery::Replayed)).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Effect {
    /// The trigger.
    pub trigger: String,
    /// Why: [`FORGOTTEN`] for a subject forgotten, or what the caller said.
    pub reason: String,
    /// The aggregates (tags) of the events linked to the trigger, then those of
    /// every event of those aggregates, and so on until no new one comes, in
    /// order: a reader drops what it built from them, and builds it again from the
    /// replayed events that follow, each of whose aggregates is in this list (so
    /// that an event with several tags is never applied twice to one). Events
    /// linked to the trigger without a tag are replayed too.
    pub aggregates: Vec<String>,
    /// Where it came: after the events before this position.
    pub position: Position,
    /// Its number among the store's effects, from 0.
    pub number: u64,
}

impl<E: Serialize + DeserializeOwned> EventStore<E> {
    /// Appends an effect on `trigger`, for `reason`: every subscription to `$all`
    /// then delivers it, and replays the events of the aggregates touched by the
    /// events linked to `trigger` ([`NewEvent::linked_to`](super::NewEvent::linked_to)),
    /// so that what was built from them is built again.
    ///
    /// # Errors
    /// [`Error::InvalidAppend`] for an empty trigger; [`Error::JournalWrite`] as
    /// for an append.
    pub fn append_effect(&self, trigger: &str, reason: &str) -> Result<()> {
        #[cfg(feature = "postgres")]
        if let super::Engine::Database(db) = &self.shared.engine {
            check_trigger(trigger)?;
            db.engine.append_effect(trigger, reason, false)?;
            db.signal.committed();
            return Ok(());
        }
        self.effect(trigger, reason, || 0)
    }

    /// Journals an effect; `forgotten` runs under the journal's lock, in journal
    /// order with the appends' plans, and says below which generation the
    /// trigger's subject keys are forgotten.
    pub(crate) fn effect(
        &self,
        trigger: &str,
        reason: &str,
        forgotten: impl FnOnce() -> u64,
    ) -> Result<()> {
        check_trigger(trigger)?;
        let core = self.shared.files("append an effect")?;
        core.journal.commit_with(|_, _| {
            let forgotten = forgotten();
            let bytes = batch::encode_effect(trigger, reason, forgotten);
            let job = EffectJob {
                index: Arc::clone(&core.index),
                signal: Arc::clone(&core.signal),
                trigger: trigger.to_owned(),
                reason: reason.to_owned(),
                forgotten,
            };
            Ok(Prepared::Event(bytes, job))
        })?;
        self.maybe_checkpoint();
        Ok(())
    }

    /// Forgets subject `subject`: destroys every key its [`Sealed`](super::Sealed)
    /// values were sealed with, so that they read as shredded from now on,
    /// wherever their bytes are (backups included, which hold no key), and appends
    /// an effect on the subject ([`FORGOTTEN`]) so that subscriptions and
    /// projections build the affected aggregates again without them. A value
    /// sealed for the subject later gets a new key.
    ///
    /// The keys are forgotten in memory under the journal's lock, so that every
    /// append journaled after the effect is sealed with a new key; the effect is
    /// made durable (whatever the store's [`Durability`](super::Durability)) before
    /// the keys are destroyed on disk; if the program stops in between, opening the
    /// store destroys them.
    ///
    /// # Errors
    /// [`Error::JournalWrite`] when the effect cannot be journaled; [`Error::Io`]
    /// when the key file cannot be written (the keys are destroyed when the store
    /// is next opened).
    ///
    /// In a database, the keys are destroyed and the effect appended in one
    /// transaction, which every process sees whole or not at all; the table's old
    /// row versions are vacuumed right after. An event that another process
    /// sealed with the forgotten key and had not committed yet is sealed again
    /// with a new key.
    #[cfg(feature = "encryption")]
    pub fn forget_subject(&self, subject: &str) -> Result<()> {
        #[cfg(feature = "postgres")]
        if let super::Engine::Database(db) = &self.shared.engine {
            check_trigger(subject)?;
            let below = db.engine.append_effect(subject, FORGOTTEN, true)?;
            db.keys.forgotten(subject, below);
            db.signal.committed();
            return Ok(());
        }
        let keys = &self.shared.files("forget a subject")?.keys;
        self.effect(subject, FORGOTTEN, || keys.forget(subject))?;
        self.sync()?;
        keys.persist()
    }
}

/// Refuses an empty trigger.
fn check_trigger(trigger: &str) -> Result<()> {
    if trigger.is_empty() {
        return Err(Error::InvalidAppend { reason: "an effect's trigger is empty".to_owned() });
    }
    Ok(())
}

/// Commits a durable effect to the index, and wakes the subscriptions.
struct EffectJob {
    index: Arc<RwLock<Index>>,
    signal: Arc<Signal>,
    trigger: String,
    reason: String,
    forgotten: u64,
}

impl Job for EffectJob {
    type Output = ();

    fn run(self, seq: u64, at: Timestamp) -> ((), Option<u64>) {
        {
            let mut index = self.index.write();
            let res = index.commit_effect(seq, &self.trigger, &self.reason, self.forgotten);
            // In journal order, as every job: a failure is a bug, and the panic
            // stops the store.
            #[allow(clippy::expect_used)]
            res.expect("an effect commits");
            index.last_at = at.as_micros();
        }
        self.signal.committed();
        ((), None)
    }
}

#[cfg(all(test, feature = "encryption"))]
mod tests {
    use super::*;
    use crate::events::{Expected, Sealed};

    /// The program stops after the effect is journaled and before the key file is
    /// rewritten: opening finishes the forgetting.
    #[test]
    fn opening_destroys_the_keys_of_a_forget_cut_short() -> Result<()> {
        let dir = tempfile::tempdir().map_err(Error::io("tempdir"))?;
        let keys = dir.path().join("subject-keys");
        let before = {
            let events = EventStore::<Sealed<String>>::open(dir.path())?;
            events.append("s", Expected::Any, [Sealed::new("erin", "secret".to_owned())])?;
            let before = std::fs::read(&keys).map_err(Error::io(&keys))?;
            let ring = &events.shared.files("forget")?.keys;
            events.effect("erin", FORGOTTEN, || ring.forget("erin"))?;
            before
        };
        assert_eq!(
            std::fs::read(&keys).map_err(Error::io(&keys))?,
            before,
            "the key is still there"
        );
        let events = EventStore::<Sealed<String>>::open(dir.path())?;
        assert_ne!(std::fs::read(&keys).map_err(Error::io(&keys))?, before, "opening rewrote it");
        let read = events.event("s", 0)?.map(|event| event.data.is_shredded());
        assert_eq!(read, Some(true));
        Ok(())
    }
}
