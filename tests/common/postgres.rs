//! The PostgreSQL server the tests that need one use: the one whose URL
//! `INSTASTATE_TEST_POSTGRES` gives (`.ci/run` starts one), or else a throwaway
//! cluster this test binary starts with `.ci/postgres`, which stops it once the
//! binary has exited. Without either, a test fails saying what is missing; it never
//! passes without a server.
//!
//! Shared by the library's tests (`src/postgres/test_server.rs`) and the
//! integration tests (`tests/failover.rs`), as a module of each.

use std::{
    process::Command,
    sync::{
        LazyLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

/// The variable naming a server the tests may use.
pub(crate) const URL_VAR: &str = "INSTASTATE_TEST_POSTGRES";

static URL: LazyLock<Result<String, String>> = LazyLock::new(start);

/// Names made by this process are unique among the runs that share a server.
static NEXT: AtomicU64 = AtomicU64::new(0);

fn start() -> Result<String, String> {
    if let Ok(url) = std::env::var(URL_VAR) {
        return Ok(url);
    }
    // The workspace's script, from the library's tests or the tool's.
    let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = [here.join(".ci/postgres"), here.join("../.ci/postgres")]
        .into_iter()
        .find(|it| it.exists())
        .unwrap_or_else(|| here.join(".ci/postgres"));
    let script = script.display();
    let out = Command::new("bash")
        .arg(script.to_string())
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

/// The URL of a location in a namespace of its own, as a user gives it.
pub(crate) fn address(prefix: &str) -> String {
    let separator = if url().contains('?') { '&' } else { '?' };
    format!("{}{separator}namespace={}", url(), unique(prefix))
}
