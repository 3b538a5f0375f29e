//! The PostgreSQL server the tests of the PostgreSQL engine use
//! (`tests/common/postgres.rs`: the one `INSTASTATE_TEST_POSTGRES` names, or a
//! throwaway cluster), and the locations they take in it.
//!
//! Every test takes namespaces (or databases) of its own, so tests run in parallel
//! and the same server serves many runs.

use super::{Location, failed};
use crate::Result;
pub(crate) use crate::postgres::server::{address, unique, url};

/// A location in a namespace of its own.
pub(crate) fn location(prefix: &str) -> Result<Location> {
    Location::parse(&address(prefix))
}

/// Ends every connection whose `application_name` is `name` every 20 ms, as a
/// restart of the database would, for 30 rounds from the first it ended one (a
/// minute at most) or until `done`; returns how many it ended. Between two
/// rounds there is time enough for a writer to connect again and go on.
pub(crate) fn end_connections(name: &str, done: &std::sync::atomic::AtomicBool) -> Result<u64> {
    let admin = location("admin")?;
    let mut client = admin.connect()?;
    let started = std::time::Instant::now();
    let (mut ended, mut rounds) = (0, 0);
    while rounds < 30 && started.elapsed() < std::time::Duration::from_mins(1) {
        if done.load(std::sync::atomic::Ordering::Acquire) {
            break;
        }
        ended += client
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
                &[&name],
            )
            .map_err(failed(&admin, "end a writer's connections"))?
            .len() as u64;
        // Counted from the first connection ended: a writer slow to connect is
        // not left alone.
        if 0 < ended {
            rounds += 1;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Ok(ended)
}

/// A location in a new database of its own, for tests that change what the
/// namespaces of one database share.
pub(crate) fn database(prefix: &str) -> Result<Location> {
    let location = location(prefix)?;
    let name = unique(prefix);
    let mut client = location.connect()?;
    client
        .batch_execute(&format!("CREATE DATABASE \"{name}\""))
        .map_err(failed(&location, "create a database for a test"))?;
    Ok(location.with_database(&name))
}

/// The PEM files of the certificate authority that signed the server's
/// certificate (for the name `localhost`), and of another that signed nothing.
///
/// # Panics
/// When the server's data directory has no such files beside it: a server that
/// `.ci/postgres` did not start.
pub(crate) fn tls_roots(location: &Location) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let mut client = location.connect()?;
    let row = client
        .query_one("SHOW data_directory", &[])
        .map_err(failed(location, "find the server's data directory"))?;
    let data: String = row.get(0);
    let dir =
        std::path::Path::new(&data).parent().map(std::path::Path::to_path_buf).unwrap_or_default();
    let (ca, other) = (dir.join("ca.crt"), dir.join("other-ca.crt"));
    assert!(
        ca.exists() && other.exists(),
        "the test server has no TLS certificates beside its data directory ({data}): start it with .ci/postgres"
    );
    Ok((ca, other))
}
