//! The PostgreSQL server the tests of the PostgreSQL engine use: the one whose URL
//! `INSTASTATE_TEST_POSTGRES` gives (`.ci/run` starts one), or else a throwaway
//! cluster this test binary starts with `.ci/postgres`, which stops it once the
//! binary has exited. Without either, a test fails saying what is missing; it never
//! passes without a server.
//!
//! Every test takes namespaces (or databases) of its own, so tests run in parallel
//! and the same server serves many runs.

use std::{
    process::Command,
    sync::atomic::{AtomicU64, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use once_cell::sync::Lazy;

use super::{Location, failed};
use crate::Result;

/// The variable naming a server the tests may use.
pub(crate) const URL_VAR: &str = "INSTASTATE_TEST_POSTGRES";

static URL: Lazy<std::result::Result<String, String>> = Lazy::new(start);

/// Names made by this process are unique among the runs that share a server.
static NEXT: AtomicU64 = AtomicU64::new(0);

fn start() -> std::result::Result<String, String> {
    if let Ok(url) = std::env::var(URL_VAR) {
        return Ok(url);
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/postgres");
    let out = Command::new("bash")
        .arg(script)
        .arg(std::process::id().to_string())
        .output()
        .map_err(|err| format!("cannot run {script}: {err}"))?;
    if !out.status.success() {
        return Err(format!(
            "no PostgreSQL server for the tests: {URL_VAR} is not set, and {script} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The server's URL, without a namespace.
///
/// # Panics
/// When there is no server: the test fails with the reason.
pub(crate) fn url() -> &'static str {
    match &*URL {
        Ok(url) => url,
        Err(reason) => panic!("{reason}"),
    }
}

/// A name no other test or run has: `prefix` and a unique suffix.
pub(crate) fn unique(prefix: &str) -> String {
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |it| it.as_micros());
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}_{}_{stamp}_{n}", std::process::id())
}

/// A location in a namespace of its own.
pub(crate) fn location(prefix: &str) -> Result<Location> {
    Location::parse(&address(prefix))
}

/// The URL of a location in a namespace of its own, as a user gives it.
pub(crate) fn address(prefix: &str) -> String {
    let separator = if url().contains('?') { '&' } else { '?' };
    format!("{}{separator}namespace={}", url(), unique(prefix))
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
