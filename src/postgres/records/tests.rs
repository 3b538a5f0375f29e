//! Stores of cells kept in a real PostgreSQL server (`test_server`), through the
//! public API, where what only a database can do is the point: a writer fenced
//! after a takeover, connections ended under saves, damaged rows. The behaviours
//! every engine shares are in `tests/it/contract/cells.rs`.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::Duration,
};

use crate::{
    Error, Result, StateCell, Store, StoreBuilder,
    postgres::{Location, PgEvents, failed, test_server},
};

/// A lease long enough that a busy machine renews it in time.
fn builder() -> StoreBuilder {
    Store::builder()
        .lease_time(Duration::from_secs(5))
        .wait_for_lease(Duration::from_secs(10), Duration::from_millis(20))
}

/// Runs `sql` on the test server, with the namespace of `url` as `$1`.
fn admin(url: &str, sql: &str) -> Result<u64> {
    let location = Location::parse(url)?;
    let mut client = test_server::location("admin")?.connect()?;
    client.execute(sql, &[&location.namespace()]).map_err(failed(&location, "run a test's SQL"))
}

#[test]
fn a_writer_whose_lease_was_taken_over_is_fenced_and_the_new_writer_keeps_its_work() -> Result<()> {
    // Two cells of one name: each store holds one, as two processes would.
    static OLD: StateCell<u64> = StateCell::new("pg::fence::VALUE", || 0);
    static NEW: StateCell<u64> = StateCell::new("pg::fence::VALUE", || 0);
    let url = test_server::address("records-fence");
    let old = builder().cell(&OLD).open(&url)?;
    OLD.set(1);
    old.save_all()?;
    // As if the old writer had been paused past its lease.
    assert_eq!(
        admin(
            &url,
            "UPDATE instastate.leases SET expires = clock_timestamp() WHERE namespace = $1"
        )?,
        1
    );
    let new = builder().cell(&NEW).open(&url)?;
    assert_eq!(NEW.get(), 1);
    NEW.set(2);
    new.save_all()?;
    OLD.set(3);
    let fenced = old.save_all();
    assert!(matches!(fenced, Err(Error::Fenced { epoch: 1, current: Some(2), .. })), "{fenced:?}");
    assert!(matches!(old.save_all(), Err(Error::Poisoned { .. })));
    drop(old);
    NEW.set(4);
    new.save_all()?;
    new.close()?;
    NEW.set(0);
    let _again = builder().cell(&NEW).open(&url)?;
    assert_eq!(NEW.get(), 4, "the fenced writer overwrote nothing");
    Ok(())
}

#[test]
fn saves_whose_connections_are_ended_lose_nothing_acknowledged() -> Result<()> {
    static COUNTER: StateCell<u64> = StateCell::new("pg::dropped::COUNTER", || 0);
    const SAVES: u64 = 60;
    // Its connections carry a name of their own, so that only they are ended.
    let name = test_server::unique("records_dropped");
    let url = format!("{}&application_name={name}", test_server::address("records-dropped"));
    let open = || -> Result<Store> {
        let mut tries = 0;
        loop {
            // A short lease: a writer whose connections were ended cannot hand
            // its lease over, and the next one waits for it to run out.
            match builder().lease_time(Duration::from_secs(1)).cell(&COUNTER).open(&url) {
                Err(Error::Database { .. }) if tries < 1_000 => tries += 1,
                opened => return opened,
            }
        }
    };
    let done = AtomicBool::new(false);
    let (ended, failed_saves, acknowledged) = thread::scope(|scope| -> Result<_> {
        let killer = scope.spawn(|| test_server::end_connections(&name, &done));
        let mut store = open()?;
        let (mut acknowledged, mut failed_saves) = (0, 0);
        for k in 1..=SAVES {
            COUNTER.set(k);
            match store.save_all() {
                Ok(()) => acknowledged = k,
                Err(Error::Database { .. }) => {
                    failed_saves += 1;
                    // A failed save poisons the store: it is opened again, and
                    // holds the last acknowledged save, or the failed one.
                    drop(store);
                    store = open()?;
                    let found = COUNTER.get();
                    assert!(
                        found == acknowledged || found == k,
                        "save {k} failed after {acknowledged} was acknowledged, and {found} came back"
                    );
                    if found == k {
                        acknowledged = k;
                    }
                }
                Err(other) => return Err(other),
            }
        }
        done.store(true, Ordering::Release);
        drop(store);
        let ended = killer.join().expect("the killer panicked")?;
        Ok((ended, failed_saves, acknowledged))
    })?;
    assert!(0 < ended, "no connection of the writer was ended");
    assert!(failed_saves < SAVES, "no save got through");
    COUNTER.set(0);
    let _store = open()?;
    assert_eq!(
        COUNTER.get(),
        acknowledged,
        "{ended} connections ended, {failed_saves} saves failed"
    );
    Ok(())
}

#[test]
fn a_record_missing_a_part_is_damage_named_at_open_and_changes_no_cell() -> Result<()> {
    static LARGE: StateCell<Vec<u8>> = StateCell::new("pg::damage::LARGE", Vec::new);
    let url = test_server::address("records-damage");
    {
        let store = builder().cell(&LARGE).open(&url)?;
        LARGE.set(vec![7; 3 << 20]);
        store.save_all()?;
    }
    let deleted = admin(
        &url,
        "DELETE FROM instastate.records WHERE namespace = $1 AND key = 'cell/pg::damage::LARGE'::bytea AND part = 1",
    )?;
    assert_eq!(deleted, 1);
    LARGE.set(vec![1]);
    let opened = builder().cell(&LARGE).open(&url);
    let Err(Error::DatabaseCorrupt { reason, .. }) = opened else {
        panic!("a missing part was not seen: {opened:?}");
    };
    assert!(reason.contains("cell/pg::damage::LARGE") && reason.contains("part"), "{reason}");
    assert_eq!(LARGE.get(), vec![1]);
    Ok(())
}

#[test]
fn a_namespace_holding_no_store_of_cells_is_refused_and_left_alone() -> Result<()> {
    static CELL: StateCell<u8> = StateCell::new("pg::kind::CELL", || 0);
    let url = test_server::address("records-kind");
    let read = builder().cell(&CELL).open_read_only(&url);
    assert!(
        matches!(&read, Err(Error::InvalidLocation { reason, .. }) if reason.contains("no store")),
        "{read:?}"
    );
    drop(PgEvents::open(&Location::parse(&url)?)?);
    let opened = builder().cell(&CELL).open(&url);
    assert!(
        matches!(&opened, Err(Error::InvalidLocation { reason, .. }) if reason.contains("an event store")),
        "{opened:?}"
    );
    let read = builder().cell(&CELL).open_read_only(&url);
    assert!(matches!(read, Err(Error::InvalidLocation { .. })), "{read:?}");
    Ok(())
}

#[test]
fn a_journaled_cell_keeps_its_journal_in_a_namespace_beside_the_store_read_only_too() -> Result<()>
{
    #[derive(Default, Clone, serde::Serialize, serde::Deserialize)]
    struct Sum(u64);
    impl crate::Prevalent for Sum {
        type Event = u64;
        type Output = u64;
        fn apply(&mut self, by: u64, _: crate::Timestamp) -> u64 {
            self.0 += by;
            self.0
        }
    }
    static SUM: StateCell<Sum> = StateCell::with_options(
        "pg::journaled::SUM",
        Sum::default,
        crate::CellOptions::new().journaled(),
    );
    let url = test_server::address("records-journaled");
    {
        let _store = builder().cell(&SUM).open(&url)?;
        assert_eq!(SUM.handle(2)?, 2);
    }
    let namespace = format!("{}/pg::journaled::SUM", Location::parse(&url)?.namespace());
    let mut client = test_server::location("admin")?.connect()?;
    let frames: i64 = client
        .query_one(
            "SELECT count(*) FROM instastate.journal_frames WHERE namespace = $1 AND kind = 0",
            &[&namespace],
        )
        .map_err(failed(&Location::parse(&url)?, "count the journal's events"))?
        .get(0);
    assert_eq!(frames, 1);
    // A read-only store reads the journal without its lease, and writes nothing.
    let mut rows = || -> Result<i64> {
        let row = client
            .query_one(
                "SELECT (SELECT count(*) FROM instastate.journal_frames WHERE namespace = $1)
                      + (SELECT count(*) FROM instastate.journal_snapshots WHERE namespace = $1)",
                &[&namespace],
            )
            .map_err(failed(&Location::parse(&url)?, "count the journal's rows"))?;
        Ok(row.get(0))
    };
    let before = rows()?;
    SUM.set(Sum::default());
    let read = builder().cell(&SUM).open_read_only(&url)?;
    assert_eq!(SUM.get().0, 2);
    assert!(matches!(SUM.handle(1), Err(Error::ReadOnly { .. })));
    drop(read);
    assert_eq!(rows()?, before);
    Ok(())
}

#[test]
fn a_follower_loads_each_save_as_it_commits_and_is_promoted_once_the_writer_is_gone() -> Result<()>
{
    // Two cells of one name: the writer's and the follower's, as on two machines.
    static WRITTEN: StateCell<Vec<u32>> = StateCell::new("pg::follow::VALUE", Vec::new);
    static FOLLOWED: StateCell<Vec<u32>> = StateCell::new("pg::follow::VALUE", Vec::new);
    let url = test_server::address("records-follow");
    let writer = builder().cell(&WRITTEN).open(&url)?;
    WRITTEN.set(vec![1]);
    writer.save_all()?;
    // A poll far longer than the test: only the saves' notifications wake it.
    let follower = builder().cell(&FOLLOWED).follow(&url, Duration::from_mins(10))?;
    assert_eq!((FOLLOWED.get(), follower.generation()), (vec![1], 1));
    for n in 2..=5 {
        WRITTEN.update(|it| it.push(n));
        writer.save_all()?;
    }
    assert!(follower.wait_for(5, Duration::from_secs(30))?, "the follower loaded save 5");
    assert_eq!((FOLLOWED.get(), follower.lag()?), (vec![1, 2, 3, 4, 5], 0));
    assert!(matches!(follower.store().save_all(), Err(Error::ReadOnly { .. })));
    assert_eq!(follower.store().history().len(), 5);
    writer.close()?;
    let promoted = follower.promote()?;
    FOLLOWED.update(|it| it.push(6));
    promoted.save_all()?;
    assert_eq!(promoted.generation(), 6);
    drop(promoted);
    let reopened = builder().cell(&WRITTEN).open(&url)?;
    assert_eq!((WRITTEN.get(), reopened.generation()), (vec![1, 2, 3, 4, 5, 6], 6));
    Ok(())
}

#[cfg(feature = "encryption")]
#[test]
fn an_encrypted_store_in_a_database_holds_no_value_in_the_clear_and_needs_its_key() -> Result<()> {
    use crate::EncryptionKey;
    static SECRET: StateCell<String> = StateCell::new("pg::crypt::SECRET", String::new);
    let url = test_server::address("records-crypt");
    let key = EncryptionKey::from_bytes([7; 32]);
    {
        let store = builder().encryption_key(key.clone()).cell(&SECRET).open(&url)?;
        SECRET.set("the recipe is in the drawer".into());
        store.save_all()?;
    }
    let location = Location::parse(&url)?;
    let mut client = test_server::location("admin")?.connect()?;
    let clear: i64 = client
        .query_one(
            "SELECT count(*) FROM instastate.records
              WHERE namespace = $1 AND position('recipe'::bytea IN bytes) > 0",
            &[&location.namespace()],
        )
        .map_err(failed(&location, "look for the value in the clear"))?
        .get(0);
    assert_eq!(clear, 0, "a value is stored in the clear");
    SECRET.set(String::new());
    let without = builder().cell(&SECRET).open(&url);
    assert!(matches!(without, Err(Error::Encryption { encrypted: true, .. })), "{without:?}");
    let wrong =
        builder().encryption_key(EncryptionKey::from_bytes([8; 32])).cell(&SECRET).open(&url);
    assert!(matches!(wrong, Err(Error::WrongKey { .. })), "{wrong:?}");
    assert_eq!(SECRET.get(), "", "a refused open changes no cell");
    let _store = builder().encryption_key(key).cell(&SECRET).open(&url)?;
    assert_eq!(SECRET.get(), "the recipe is in the drawer");
    Ok(())
}
