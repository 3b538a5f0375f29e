//! One writer per store, fenced by the database.
//!
//! A store's writer holds its namespace's lease: a row of `instastate.leases` with
//! an epoch, the holder, and when it expires, all judged by the database's clock
//! (`clock_timestamp()`), never the writer's. Taking the lease over raises the
//! epoch, and is possible only once the lease has expired (or was released).
//!
//! Every write of the holder runs [`Lease::fence`] in its own transaction first:
//! it reads the lease row `FOR SHARE` and refuses the transaction unless the epoch
//! is still the holder's and the lease has not expired. The row lock lasts until
//! the transaction ends, so a takeover (which updates the row) waits for a write
//! in progress to commit or roll back. The guarantee: no write of epoch `e`
//! commits after the lease was taken over to epoch `e + 1`; a write that passed
//! its fence before the takeover commits (or rolls back) before the takeover does.
//! A writer that was paused, cut off, or outlived its lease cannot overwrite its
//! successor's work: the database refuses it, whatever the writer's own clock or
//! state says. (A session advisory lock would not do: it is released when a
//! connection drops, while the old writer may still hold another.)
//!
//! A writer frozen inside a write transaction would hold the row lock, and so
//! keep every standby out, for as long as its connection lives: a holder's
//! connections are [guarded](Lease::guard), so that the database ends one left
//! idle in a transaction for the lease's time to live, and a standby's takeover
//! waits at most a poll for the lock before it asks again.

use std::{sync::Arc, thread, time::Duration};

use parking_lot::{Condvar, Mutex};

use postgres::{Client, Transaction, error::SqlState};
use uuid::Uuid;

use super::{Location, column, count, failed};
use crate::{Error, Result};

/// How long a lease lasts without renewal, and how often a standby asks for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LeaseSettings {
    pub(crate) ttl: Duration,
    pub(crate) poll: Duration,
}

impl Default for LeaseSettings {
    fn default() -> Self {
        LeaseSettings { ttl: Duration::from_secs(5), poll: Duration::from_millis(250) }
    }
}

/// A namespace's lease, held: see the module's documentation.
#[derive(Debug)]
pub(crate) struct Lease {
    location: Location,
    epoch: u64,
    holder: String,
    settings: LeaseSettings,
}

impl Lease {
    /// Takes `location`'s lease if it is free (never held, released, or expired);
    /// `None` while another holds it. The namespace must be prepared
    /// (`schema::prepare`).
    pub(crate) fn try_acquire(
        client: &mut Client,
        location: &Location,
        settings: LeaseSettings,
    ) -> Result<Option<Lease>> {
        let holder = Uuid::new_v4().to_string();
        let namespace = location.namespace();
        // A plain read first: while the lease is live, a takeover is not even
        // tried (it would wait for the holder's write under way).
        let live = client
            .query_opt(
                "SELECT expires > clock_timestamp() AS live FROM instastate.leases
                  WHERE namespace = $1",
                &[&namespace],
            )
            .map_err(failed(location, "read the writer's lease"))?;
        let what = || format!("the lease of namespace `{namespace}`");
        if let Some(row) = live
            && column::<bool>(location, &row, "live", &what)?
        {
            return Ok(None);
        }
        // The takeover waits for the holder's write under way (which holds the
        // row `FOR SHARE`), but no longer than a poll: a holder frozen inside a
        // transaction must not keep the standby stuck in this statement.
        let mut tx = client.transaction().map_err(failed(location, "begin a takeover"))?;
        let timeout = settings.poll.as_millis().clamp(1, i32::MAX as u128);
        tx.batch_execute(&format!("SET LOCAL lock_timeout = {timeout}"))
            .map_err(failed(location, "bound the takeover's wait"))?;
        let row = tx.query_opt(
            "INSERT INTO instastate.leases AS l (namespace, epoch, holder, expires)
                 VALUES ($1, 1, $2, clock_timestamp() + make_interval(secs => $3))
                 ON CONFLICT (namespace) DO UPDATE
                    SET epoch = l.epoch + 1, holder = EXCLUDED.holder,
                        expires = clock_timestamp() + make_interval(secs => $3)
                    WHERE l.expires <= clock_timestamp()
                 RETURNING epoch",
            &[&namespace, &holder, &settings.ttl.as_secs_f64()],
        );
        let row = match row {
            Err(err) if err.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => return Ok(None),
            row => row.map_err(failed(location, "take the writer's lease"))?,
        };
        let Some(row) = row else { return Ok(None) };
        let epoch = count(location, &row, "epoch", &what)?;
        tx.commit().map_err(failed(location, "commit a takeover"))?;
        Ok(Some(Lease { location: location.clone(), epoch, holder, settings }))
    }

    /// Makes `client`, a connection this holder writes on, end by itself when it
    /// stays idle inside a transaction for the lease's time to live. A writer
    /// frozen (`SIGSTOP`) or cut off in the middle of a write holds the lease row
    /// `FOR SHARE` for as long as its connection lives, and a standby cannot take
    /// over meanwhile: the database ends that connection instead, and the frozen
    /// writer's transaction rolls back.
    pub(crate) fn guard(&self, client: &mut Client) -> Result<()> {
        let timeout = self.settings.ttl.as_millis().clamp(1, i32::MAX as u128);
        client
            .batch_execute(&format!("SET idle_in_transaction_session_timeout = {timeout}"))
            .map_err(failed(&self.location, "bound the writer's idle transactions"))
    }

    /// A new connection of this holder, guarded as its connections are
    /// ([`guard`](Self::guard)).
    pub(crate) fn connect(&self) -> Result<Client> {
        let mut client = self.location.connect()?;
        self.guard(&mut client)?;
        Ok(client)
    }

    /// Replaces `client`, a connection of this holder, by a new one if it broke
    /// (the database restarted, or ended it): nothing is under way on it. Whether
    /// it did.
    pub(crate) fn reconnect(&self, client: &mut Client) -> Result<bool> {
        if !client.is_closed() {
            return Ok(false);
        }
        *client = self.connect()?;
        Ok(true)
    }

    /// Takes `location`'s lease, waiting for it (asking every `settings.poll`) for
    /// at most `wait`; `None` when it stayed held that long.
    pub(crate) fn acquire(
        client: &mut Client,
        location: &Location,
        settings: LeaseSettings,
        wait: Duration,
    ) -> Result<Option<Lease>> {
        let started = std::time::Instant::now();
        loop {
            if let Some(lease) = Lease::try_acquire(client, location, settings)? {
                return Ok(Some(lease));
            }
            if wait <= started.elapsed() {
                return Ok(None);
            }
            thread::sleep(settings.poll.min(wait.saturating_sub(started.elapsed())));
        }
    }

    /// The lease's epoch: it rises at each takeover.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Extends the lease by its time to live, from now by the database's clock.
    ///
    /// # Errors
    /// [`Error::Fenced`] when the lease was taken over or has run out: this
    /// writer must stop.
    pub(crate) fn renew(&self, client: &mut Client) -> Result<()> {
        let renewed = client
            .execute(
                "UPDATE instastate.leases
                    SET expires = clock_timestamp() + make_interval(secs => $3)
                  WHERE namespace = $1 AND epoch = $2 AND expires > clock_timestamp()",
                &[&self.location.namespace(), &self.epoch_i64(), &self.settings.ttl.as_secs_f64()],
            )
            .map_err(failed(&self.location, "renew the writer's lease"))?;
        if renewed == 1 {
            return Ok(());
        }
        let current = client
            .query_opt(
                "SELECT epoch FROM instastate.leases WHERE namespace = $1",
                &[&self.location.namespace()],
            )
            .map_err(failed(&self.location, "read the writer's lease"))?;
        let current = current.map(|row| count(&self.location, &row, "epoch", &|| self.what()));
        Err(self.fenced(current.transpose()?))
    }

    /// Checks, inside the write transaction `tx`, that this writer still holds
    /// the lease, and keeps it from being taken over until `tx` ends.
    ///
    /// # Errors
    /// [`Error::Fenced`] when it does not: `tx` must be rolled back (dropping it
    /// does).
    pub(crate) fn fence(&self, tx: &mut Transaction<'_>) -> Result<()> {
        let row = tx
            .query_opt(
                "SELECT epoch, expires > clock_timestamp() AS live FROM instastate.leases
                  WHERE namespace = $1 FOR SHARE",
                &[&self.location.namespace()],
            )
            .map_err(failed(&self.location, "check the writer's lease"))?;
        let Some(row) = row else { return Err(self.fenced(None)) };
        let epoch = count(&self.location, &row, "epoch", &|| self.what())?;
        let live: bool = column(&self.location, &row, "live", &|| self.what())?;
        if epoch == self.epoch && live { Ok(()) } else { Err(self.fenced(Some(epoch))) }
    }

    /// Gives the lease up, so that a standby takes over at once. A lease already
    /// lost is left alone.
    pub(crate) fn release(&self, client: &mut Client) -> Result<()> {
        client
            .execute(
                "UPDATE instastate.leases SET expires = clock_timestamp()
                  WHERE namespace = $1 AND epoch = $2 AND holder = $3",
                &[&self.location.namespace(), &self.epoch_i64(), &self.holder],
            )
            .map_err(failed(&self.location, "release the writer's lease"))?;
        Ok(())
    }

    fn epoch_i64(&self) -> i64 {
        i64::try_from(self.epoch).unwrap_or(i64::MAX)
    }

    fn what(&self) -> String {
        format!("the lease of namespace `{}`", self.location.namespace())
    }

    /// The [`Error::Fenced`] of this lease, the database holding epoch `current`.
    pub(crate) fn fenced(&self, current: Option<u64>) -> Error {
        Error::Fenced {
            location: self.location.to_string(),
            namespace: self.location.namespace().to_owned(),
            epoch: self.epoch,
            current,
        }
    }
}

/// The thread that renews the lease (until it finds it lost), and how to stop it.
pub(crate) struct Renewer {
    /// `None` once stopped.
    running: Mutex<Option<Running>>,
}

/// The renewing thread, and how to stop it.
struct Running {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: thread::JoinHandle<()>,
}

impl Renewer {
    /// Renews `lease` every third of its time to live, on a connection of its own.
    pub(crate) fn start(lease: &Arc<Lease>) -> Result<Renewer> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let (location, lease) = (lease.location.clone(), Arc::clone(lease));
        let signal = Arc::clone(&stop);
        let period = lease.settings.ttl / 3;
        let thread = thread::Builder::new()
            .name("instastate-lease".to_owned())
            .spawn(move || {
                let mut client = None;
                loop {
                    {
                        let (stopped, wake) = &*signal;
                        let mut guard = stopped.lock();
                        if !*guard {
                            wake.wait_for(&mut guard, period);
                        }
                        if *guard {
                            return;
                        }
                    }
                    // A failed connection is tried again at the next turn: the
                    // lease may outlive a short outage, and the writes' fences
                    // judge it either way.
                    let connected = match client.take() {
                        Some(it) => Ok(it),
                        None => location.connect(),
                    };
                    let Ok(mut connected) = connected else { continue };
                    match lease.renew(&mut connected) {
                        Ok(()) => client = Some(connected),
                        // Lost: the writes' fences refuse every write now.
                        Err(Error::Fenced { .. }) => return,
                        Err(_) => {}
                    }
                }
            })
            .map_err(|source| Error::Io { path: "instastate-lease thread".into(), source })?;
        Ok(Renewer { running: Mutex::new(Some(Running { stop, thread })) })
    }

    /// Stops renewing (waiting for the thread, unless called on it); whether it
    /// was renewing until now.
    pub(crate) fn stop(&self) -> bool {
        let Some(Running { stop, thread }) = self.running.lock().take() else { return false };
        *stop.0.lock() = true;
        stop.1.notify_all();
        if thread.thread().id() != thread::current().id() {
            let _ = thread.join();
        }
        true
    }

    /// Whether it was stopped.
    pub(crate) fn is_stopped(&self) -> bool {
        self.running.lock().is_none()
    }
}

impl Drop for Renewer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Opens `location`'s namespace for its one writer: prepares the tables for a
/// store of `kind`, takes the lease (waiting up to `wait` for it) and starts
/// renewing it. Returns a connection of the holder, the lease and its renewer.
///
/// # Errors
/// [`Error::LeaseHeld`] when another writer held the lease all that time;
/// [`Error::InvalidLocation`] when the namespace holds another kind of store;
/// [`Error::Database`] and the errors of `schema::prepare`.
pub(crate) fn take(
    location: &Location,
    kind: &str,
    settings: LeaseSettings,
    wait: Duration,
) -> Result<(Client, Arc<Lease>, Renewer)> {
    let mut client = location.connect()?;
    super::schema::prepare(&mut client, location, kind)?;
    let Some(lease) = Lease::acquire(&mut client, location, settings, wait)? else {
        return Err(Error::LeaseHeld {
            location: location.to_string(),
            namespace: location.namespace().to_owned(),
            waited: wait,
        });
    };
    lease.guard(&mut client)?;
    let lease = Arc::new(lease);
    let renewer = Renewer::start(&lease)?;
    Ok((client, lease, renewer))
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::postgres::{schema::prepare, test_server};

    const KIND: &str = "a test of leases";

    fn prepared(prefix: &str) -> Result<(Location, Client)> {
        let location = test_server::location(prefix)?;
        let mut client = location.connect()?;
        prepare(&mut client, &location, KIND)?;
        Ok((location, client))
    }

    fn short(ttl_ms: u64) -> LeaseSettings {
        LeaseSettings { ttl: Duration::from_millis(ttl_ms), poll: Duration::from_millis(20) }
    }

    fn is_fenced(res: &Result<()>, epoch: u64, current: u64) -> bool {
        matches!(res, Err(Error::Fenced { epoch: e, current: Some(c), .. }) if *e == epoch && *c == current)
    }

    #[test]
    fn one_writer_at_a_time_and_a_release_hands_over_at_once() -> Result<()> {
        let (location, mut client) = prepared("lease-one")?;
        let first = Lease::try_acquire(&mut client, &location, short(10_000))?.expect("free");
        assert_eq!(first.epoch(), 1);
        let mut other = location.connect()?;
        assert!(Lease::try_acquire(&mut other, &location, short(10_000))?.is_none());
        first.renew(&mut client)?;
        let mut tx = client.transaction().map_err(failed(&location, "test"))?;
        first.fence(&mut tx)?;
        drop(tx);
        first.release(&mut client)?;
        let second = Lease::try_acquire(&mut other, &location, short(10_000))?.expect("released");
        assert_eq!(second.epoch(), 2);
        let mut tx = client.transaction().map_err(failed(&location, "test"))?;
        assert!(is_fenced(&first.fence(&mut tx), 1, 2));
        drop(tx);
        assert!(is_fenced(&first.renew(&mut client), 1, 2));
        Ok(())
    }

    #[test]
    fn a_lease_that_runs_out_is_fenced_by_the_database_clock_then_taken_over() -> Result<()> {
        let (location, mut client) = prepared("lease-out")?;
        // Long enough that a loaded machine renews in time.
        let first = Lease::try_acquire(&mut client, &location, short(3_000))?.expect("free");
        // Renewed, it stays past its first expiry.
        let mut other = location.connect()?;
        for _ in 0..14 {
            thread::sleep(Duration::from_millis(250));
            first.renew(&mut client)?;
            assert!(Lease::try_acquire(&mut other, &location, short(3_000))?.is_none());
        }
        thread::sleep(Duration::from_millis(3_200));
        // Not renewed, it runs out: its own writes are refused before anyone takes over.
        let mut tx = client.transaction().map_err(failed(&location, "test"))?;
        let res = first.fence(&mut tx);
        assert!(is_fenced(&res, 1, 1), "{res:?}");
        assert!(res.is_err_and(|err| err.to_string().contains("ran out")));
        drop(tx);
        let second = Lease::acquire(&mut other, &location, short(1_000), Duration::from_secs(5))?;
        assert_eq!(second.map(|it| it.epoch()), Some(2));
        let res = first.renew(&mut client);
        assert!(is_fenced(&res, 1, 2), "{res:?}");
        assert!(res.is_err_and(|err| err.to_string().contains("taken over (epoch 2)")));
        Ok(())
    }

    #[test]
    fn a_takeover_waits_for_the_write_in_progress_and_fences_every_later_one() -> Result<()> {
        let (location, mut client) = prepared("lease-race")?;
        let table = test_server::unique("writes");
        client
            .batch_execute(&format!("CREATE TABLE \"{table}\" (n int)"))
            .map_err(failed(&location, "test"))?;
        let first = Lease::try_acquire(&mut client, &location, short(1_000))?.expect("free");
        // Fenced at once (a thread could start after the lease ran out).
        let mut tx = client.transaction().map_err(failed(&location, "test"))?;
        first.fence(&mut tx)?;
        tx.execute(&format!("INSERT INTO \"{table}\" VALUES (1)"), &[])
            .map_err(failed(&location, "test"))?;
        let location = &location;
        let (committing, taken) = thread::scope(|scope| -> Result<(Instant, Instant)> {
            let writer = scope.spawn(move || -> Result<Instant> {
                // The lease runs out while the write is in progress.
                thread::sleep(Duration::from_secs(2));
                // The standby's takeover returns after the commit is asked for: it
                // waited on the row lock (without it, it would have returned some
                // 1 s earlier, when the lease ran out).
                let committing = Instant::now();
                tx.commit().map_err(failed(location, "test"))?;
                Ok(committing)
            });
            let standby = scope.spawn(|| -> Result<Instant> {
                thread::sleep(Duration::from_millis(50));
                let mut other = location.connect()?;
                let lease =
                    Lease::acquire(&mut other, location, short(1_000), Duration::from_secs(10))?;
                assert_eq!(lease.map(|it| it.epoch()), Some(2));
                Ok(Instant::now())
            });
            Ok((writer.join().expect("writer")?, standby.join().expect("standby")?))
        })?;
        assert!(committing <= taken, "the takeover did not wait for the write in progress");
        let mut tx = client.transaction().map_err(failed(location, "test"))?;
        let res = first.fence(&mut tx);
        assert!(is_fenced(&res, 1, 2), "{res:?}");
        drop(tx);
        let rows = client
            .query_one(&format!("SELECT count(*) FROM \"{table}\""), &[])
            .map_err(failed(location, "test"))?;
        assert_eq!(rows.get::<_, i64>(0), 1);
        Ok(())
    }

    #[test]
    fn a_writer_frozen_inside_a_write_is_cut_off_and_the_standby_takes_over() -> Result<()> {
        let (location, mut client) = prepared("lease-frozen")?;
        let first = Lease::try_acquire(&mut client, &location, short(1_000))?.expect("free");
        first.guard(&mut client)?;
        let mut tx = client.transaction().map_err(failed(&location, "test"))?;
        first.fence(&mut tx)?;
        // Frozen here (a SIGSTOP), the writer holds the lease row's lock: the
        // database ends its connection once it has been idle for the lease's time
        // to live, and the standby, which never waits long on the lock, gets in.
        let mut other = location.connect()?;
        let second = Lease::acquire(&mut other, &location, short(1_000), Duration::from_secs(10))?;
        assert_eq!(second.map(|it| it.epoch()), Some(2), "the frozen writer kept the standby out");
        // Thawed, the writer cannot commit what it began.
        let res = tx.commit();
        assert!(res.is_err(), "a write of a lease taken over committed");
        assert!(client.is_closed());
        let mut client = location.connect()?;
        let mut tx = client.transaction().map_err(failed(&location, "test"))?;
        assert!(is_fenced(&first.fence(&mut tx), 1, 2));
        Ok(())
    }
}
