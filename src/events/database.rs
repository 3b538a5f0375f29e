//! The event store on PostgreSQL (feature `postgres`): the front door of
//! [`EventStore`](super::EventStore) over the database's engine
//! ([`PgEvents`]), for any number of writers in any number of processes.
//!
//! Appends go to the engine, which checks expected versions, ids and conditions
//! in the statement or transaction that writes them; reads are queries, a page at
//! a time, that decode each event from its row; subscriptions wait
//! on the same [`Signal`] as in files, which a thread listening to the
//! namespace's notifications raises at every commit of any process.

use std::{
    collections::VecDeque,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use parking_lot::Mutex;
use serde::de::DeserializeOwned;

use super::{
    Appended, Codec, Condition, EventId, Hook, RecordedEvent, Recovered, append::Request,
    codec::EventSchema, subscribe::Signal,
};
use crate::{
    Error, Result,
    crypt::Sealer,
    journal::{self, Identity, Versions},
    postgres::{EventQuery, EventRow, Location, PgEvents, watch_commits},
};

/// Events read from the database at a time, at most (a few MiB of small events).
const PAGE: u64 = 10_000;
/// How often the thread that listens for commits wakes the subscriptions without
/// a notification: none is missed on a live connection (a new one wakes them),
/// so this is only a safety net.
const POLL: Duration = Duration::from_secs(5);

/// An event store in a database, shared by its handles.
pub(super) struct DbCore {
    pub(super) engine: Arc<PgEvents>,
    /// The subjects' keys, kept in the database.
    #[cfg(feature = "encryption")]
    pub(super) keys: Arc<super::seal::KeyRing>,
    location: Location,
    /// What errors name: the location, without its password.
    pub(super) label: PathBuf,
    pub(super) signal: Arc<Signal>,
    pub(super) hook: Hook,
    pub(super) codec: Codec,
    /// Seals each event's data with the store's key (or passes it through).
    pub(super) sealer: Sealer,
    /// Nothing to recover in a database: kept for [`EventStore::recovered`](super::EventStore::recovered).
    pub(super) recovered: Recovered,
    /// Stops the thread that listens for commits, once one is started.
    listener: Mutex<Option<Arc<AtomicBool>>>,
}

impl DbCore {
    /// Opens the event store at `location`: upgrades the tables, checks that the
    /// store was written with the event type of `identity` (and no newer version
    /// of it than `versions` knows), and records it as the type written from now
    /// on.
    pub(super) fn open(
        location: Location,
        identity: &Identity,
        versions: &Versions,
        hook: Hook,
        codec: Codec,
        sealer: Sealer,
    ) -> Result<DbCore> {
        let engine = Arc::new(PgEvents::open(&location)?);
        let label = location.to_string();
        // The header's key check refuses another key, or none for a sealed store.
        engine.settle_header(|recorded| {
            journal::check_database_header(recorded, &label, identity, versions, &sealer)?;
            Ok(journal::database_header(identity, versions, &sealer))
        })?;
        Ok(DbCore {
            #[cfg(feature = "encryption")]
            keys: Arc::new(super::seal::KeyRing::in_database(
                Arc::clone(&engine),
                PathBuf::from(&label),
            )),
            engine,
            location,
            label: PathBuf::from(label),
            signal: Arc::default(),
            hook,
            codec,
            sealer,
            recovered: Recovered::default(),
            listener: Mutex::new(None),
        })
    }

    /// What an event's data is sealed for: its store (namespace) and its id, so
    /// that sealed data moved to another event or store does not open.
    fn data_aad(&self, id: EventId) -> Vec<u8> {
        let namespace = self.location.namespace();
        let mut aad = Vec::with_capacity(40 + namespace.len());
        aad.extend_from_slice(b"instastate event data\0");
        aad.extend_from_slice(id.as_bytes());
        aad.extend_from_slice(namespace.as_bytes());
        aad
    }

    /// The data of event `id` as stored: sealed with the store's key, if it has one.
    pub(super) fn seal_data(&self, id: EventId, data: Vec<u8>) -> Vec<u8> {
        self.sealer.seal(&self.data_aad(id), data)
    }

    /// The data of event `id` as `seal_data` stored it (`what` names the event in
    /// the error). Without a key, data is taken as it is: a value's encoding may
    /// well start as sealed bytes do.
    fn open_data<'a>(
        &self,
        id: EventId,
        stored: &'a [u8],
        what: impl FnOnce() -> String,
    ) -> Result<std::borrow::Cow<'a, [u8]>> {
        if !self.sealer.is_on() {
            return Ok(std::borrow::Cow::Borrowed(stored));
        }
        self.sealer.open(&self.data_aad(id), stored).map_err(|fault| Error::DatabaseCorrupt {
            location: self.location.to_string(),
            reason: format!("the data of {} cannot be opened: {fault}", what()),
        })
    }

    /// The [`Error::Unsupported`] of `operation`, which this engine does not offer.
    pub(super) fn unsupported(&self, operation: &str) -> Error {
        Error::Unsupported {
            location: self.location.to_string(),
            operation: operation.to_owned(),
            reason: "the event store on PostgreSQL does not offer it yet".to_owned(),
        }
    }

    /// Appends what `encode` makes as the engine does, and wakes this process's
    /// subscriptions at once. Events sealed with a key that another process
    /// forgot before the append's transaction (which the engine refuses) are
    /// encoded again with the subject's new key, three times at most.
    pub(super) fn append(
        &self,
        encode: impl Fn() -> Result<Vec<Request>>,
        condition: Option<&Condition>,
    ) -> Result<Vec<Appended>> {
        let mut tries = 0;
        let done = loop {
            match self.engine.append_if(encode()?, condition.cloned()) {
                // Sealed with a key forgotten elsewhere: learn the forgets, and
                // seal again.
                Err(Error::InvalidAppend { reason })
                    if reason == crate::postgres::STALE_KEYS && tries < 2 =>
                {
                    tries += 1;
                    #[cfg(feature = "encryption")]
                    self.keys.refresh()?;
                }
                done => break done?,
            }
        };
        self.signal.committed();
        Ok(done)
    }

    /// Starts the thread that raises the signal at every commit to the namespace
    /// (of any process), unless it runs already. It holds a connection of its own;
    /// a store that nobody subscribes to needs none.
    pub(super) fn listen(&self) -> Result<()> {
        let mut listener = self.listener.lock();
        if listener.is_some() {
            return Ok(());
        }
        let stop = Arc::new(AtomicBool::new(false));
        let location = self.location.clone();
        let signal = Arc::clone(&self.signal);
        let stopped = Arc::clone(&stop);
        thread::Builder::new()
            .name("instastate-listener".to_owned())
            .spawn(move || watch_commits(&location, &stopped, POLL, &|| signal.committed()))
            .map_err(|source| Error::Io { path: self.label.clone(), source })?;
        *listener = Some(stop);
        Ok(())
    }
}

impl Drop for DbCore {
    fn drop(&mut self) {
        self.signal.close();
        if let Some(stop) = self.listener.get_mut().take() {
            stop.store(true, Ordering::Release);
        }
    }
}

/// A read of events from the database, a page at a time.
pub(super) struct Read {
    /// One stream (its versions), else every stream (positions).
    pub(super) stream: Option<String>,
    pub(super) prefix: Option<String>,
    pub(super) event_type: Option<String>,
    /// The next version or position a page reads from (windows go on from
    /// `windowed`); `None` once a backward read passed 0.
    pub(super) next: Option<u64>,
    /// No version (of a stream read) or position at or past it.
    pub(super) until: Option<u64>,
    /// Whether every event before `until` had committed when the read began (it
    /// is the head, or the stream's end, then): a window's events are then all
    /// there when it is read.
    pub(super) committed: bool,
    pub(super) backward: bool,
    page: VecDeque<EventRow>,
    /// The last page read was short: there is nothing more.
    drained: bool,
    /// The pages after `page`, read on threads of their own while the caller
    /// takes `page` apart, so that the database and the decoding work at once.
    /// They are asked for once the caller has taken half of the first page (a
    /// read left early, a `take(5)` of `$all`, reads no page it does not need),
    /// and as each page after it is turned to (`ask`).
    ahead: VecDeque<Ahead>,
    /// What to ask for then: the page of at most so many events from a place on
    /// (else windows, if the read goes on in windows).
    after: Option<(u64, u64)>,
    ask: Ask,
    /// Where the next window starts, once a read goes on in windows: see
    /// [`Read::windows`].
    windowed: Option<u64>,
}

/// A page being read on a thread of its own.
struct Ahead {
    /// The versions or positions it reads: from, and up to (excluded) when it is
    /// a window.
    from: u64,
    to: Option<u64>,
    limit: u64,
    thread: thread::JoinHandle<Result<Vec<EventRow>>>,
}

/// When a read asks for what comes after the page at hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ask {
    /// No page was read yet.
    First,
    /// Once the caller has taken so many more events of the first page.
    After(usize),
    /// Asked for already (on each later page, as it is turned to).
    Asked,
}

/// How many windows a read has in flight at most, beside the page its caller
/// takes apart: two keep a server's two processors busy.
const WINDOWS: usize = 2;

impl Read {
    pub(super) fn new(stream: Option<String>, next: Option<u64>, backward: bool) -> Read {
        Read {
            stream,
            prefix: None,
            event_type: None,
            next,
            until: None,
            committed: false,
            backward,
            page: VecDeque::new(),
            drained: false,
            ahead: VecDeque::new(),
            after: None,
            ask: Ask::First,
            windowed: None,
        }
    }

    /// The page of at most `limit` events from `from` on (and before `to`, if
    /// given), read now.
    fn page(
        &self,
        engine: &PgEvents,
        from: u64,
        to: Option<u64>,
        limit: u64,
    ) -> Result<Vec<EventRow>> {
        let until = match (to, self.until) {
            (Some(to), Some(until)) => Some(to.min(until)),
            (to, until) => to.or(until),
        };
        engine.read(&EventQuery {
            stream: self.stream.as_deref(),
            from,
            limit,
            backward: self.backward,
            until,
            event_type: self.event_type.as_deref(),
            prefix: self.prefix.as_deref(),
        })
    }

    /// Where a read that wants every event until its end may go on in windows
    /// (of `PAGE` versions or positions each, several read at once), from: a read
    /// forward, unfiltered (a filtered one could walk empty windows), whose end
    /// is the head or the stream's end as the read began. Each window holds what
    /// a page would: versions and positions have no gaps, everything before the
    /// end had committed, and a window of removed events is only short.
    fn windows(&self, remaining: Option<u64>) -> Option<u64> {
        let plain = !self.backward && self.event_type.is_none() && self.prefix.is_none();
        (plain && remaining.is_none() && self.committed && self.until.is_some()).then_some(())?;
        self.next
    }

    /// Starts reading the page of at most `limit` events from `from` on (and
    /// before `to`, a window's end), on a thread of its own; a thread that
    /// cannot start leaves the page to be read when it is wanted.
    fn read_ahead(&mut self, db: &DbCore, from: u64, to: Option<u64>, limit: u64) {
        let engine = Arc::clone(&db.engine);
        let mut same = Read::new(self.stream.clone(), None, self.backward);
        same.prefix.clone_from(&self.prefix);
        same.event_type.clone_from(&self.event_type);
        same.until = self.until;
        let started = thread::Builder::new()
            .name("instastate-read-ahead".to_owned())
            .spawn(move || same.page(&engine, from, to, limit));
        match started {
            Ok(thread) => self.ahead.push_back(Ahead { from, to, limit, thread }),
            // Read now, when it is wanted; a window is asked for again.
            Err(_) => {
                if to.is_some() {
                    self.windowed = Some(from);
                }
            }
        }
    }

    /// Asks for windows until `WINDOWS` are in flight or the read's end is asked
    /// for.
    fn ask_windows(&mut self, db: &DbCore) {
        while self.ahead.len() < WINDOWS
            && let Some((from, to)) = self.next_window()
        {
            self.read_ahead(db, from, Some(to), PAGE);
            if self.windowed == Some(from) {
                return;
            }
        }
    }

    /// The next window, from and to (excluded), if the read goes on in windows and
    /// has one left: `windowed` moves past it.
    fn next_window(&mut self) -> Option<(u64, u64)> {
        let until = self.until?;
        let from = self.windowed.filter(|from| *from < until)?;
        let to = from.saturating_add(PAGE).min(until);
        self.windowed = Some(to);
        Some((from, to))
    }

    /// The next event, reading a page (of at most `remaining` events) when the
    /// one at hand is spent.
    pub(super) fn next(&mut self, db: &DbCore, remaining: Option<u64>) -> Option<Result<EventRow>> {
        while self.page.is_empty() {
            if let Err(err) = self.turn_page(db, remaining)? {
                return Some(Err(err));
            }
        }
        let row = self.page.pop_front();
        if let Ask::After(left) = &mut self.ask {
            *left = left.saturating_sub(1);
            if *left == 0 {
                self.ask = Ask::Asked;
                self.ask(db);
            }
        }
        row.map(Ok)
    }

    /// Asks for what comes after the page at hand: the next page, or windows
    /// (once a page: a thread that could not start is not asked for again before
    /// the next).
    fn ask(&mut self, db: &DbCore) {
        if let Some((from, limit)) = self.after.take() {
            self.read_ahead(db, from, None, limit);
        }
        self.ask_windows(db);
    }

    /// Reads the next page into `page` (read ahead, or now); `None` when the read
    /// has nothing more.
    fn turn_page(&mut self, db: &DbCore, remaining: Option<u64>) -> Option<Result<()>> {
        let (read, to, limit) = match self.ahead.pop_front() {
            Some(Ahead { from, to, limit, thread }) => {
                let read = thread.join().unwrap_or_else(|_| self.page(&db.engine, from, to, limit));
                (read, to, limit)
            }
            None if self.drained => return None,
            // A window the thread could not start for, else the next page.
            None => match self.next_window() {
                Some((from, to)) => (self.page(&db.engine, from, Some(to), PAGE), Some(to), PAGE),
                None if self.windowed.is_some() => return None,
                None => {
                    let from = self.next?;
                    let limit = remaining.map_or(PAGE, |remaining| remaining.min(PAGE));
                    (self.page(&db.engine, from, None, limit), None, limit)
                }
            },
        };
        let page = match read {
            Ok(page) => page,
            Err(err) => return Some(Err(err)),
        };
        // A key forgotten by any process reads as shredded from here on.
        // Sealed data links its event to its subject: a page without linked
        // events decodes no sealed value, and asks nothing more.
        #[cfg(feature = "encryption")]
        if page.iter().any(EventRow::is_linked)
            && let Err(err) = db.keys.refresh()
        {
            return Some(Err(err));
        }
        // A page (not a window, which ends where it was asked to): where the read
        // goes on, and how.
        if to.is_none() {
            self.drained = (page.len() as u64) < limit;
            if let Some(last) = page.last() {
                let (position, version) = match last.place(&db.location) {
                    Ok(place) => place,
                    Err(err) => return Some(Err(err)),
                };
                let at = if self.stream.is_some() { version } else { position.get() };
                self.next = if self.backward { at.checked_sub(1) } else { at.checked_add(1) };
            }
            self.after = None;
            if !self.drained && self.windowed.is_none() {
                // What the caller wants after this page: in windows, or a page.
                self.windowed = self.windows(remaining);
                if self.windowed.is_none() {
                    let wanted = remaining.map_or(PAGE, |remaining| (remaining - limit).min(PAGE));
                    self.after = self.next.filter(|_| 0 < wanted).map(|from| (from, wanted));
                }
            }
        }
        // After the first page, what comes next is asked for at once (also after
        // a window of removed events only, which the caller takes nothing of).
        if self.ask == Ask::First {
            self.ask = Ask::After(page.len() / 2);
        } else {
            self.ask(db);
        }
        self.page = page.into();
        Some(Ok(()))
    }
}

/// The event of `row`, its data decoded as an `E` of `schema` (migrated from an
/// older version).
pub(super) fn recorded<E: DeserializeOwned>(
    row: &EventRow,
    schema: &EventSchema<E>,
    db: &DbCore,
) -> Result<RecordedEvent<E>> {
    row.decode(&db.location, |stored, json, version, id| {
        let what = || match row.place(&db.location) {
            Ok((position, _)) => format!("the event at position {position}"),
            Err(_) => "an event".to_owned(),
        };
        let data = db.open_data(id, stored, what)?;
        let data = &data[..];
        let decode = || {
            super::codec::decode_event(
                json,
                version,
                schema.version,
                &schema.migrations,
                data,
                &db.label,
                &what,
            )
        };
        #[cfg(feature = "encryption")]
        return super::seal::opening(&db.keys, decode);
        #[cfg(not(feature = "encryption"))]
        decode()
    })
}
