//! The contract of every front door, run against every engine from one place:
//! each behaviour is a function of a location, and `contract!` makes a test of it
//! for a directory and (feature `postgres`) for a PostgreSQL namespace. A new
//! engine proves itself by passing all of them.

mod cells;
mod events;
mod prevalence;
mod removal;

use crate::TestResult;

/// Where a behaviour runs: a location any engine takes, and what keeps it alive.
pub(crate) struct Place {
    pub(crate) location: String,
    _dir: Option<tempfile::TempDir>,
}

/// A new directory.
pub(crate) fn directory() -> TestResult<Place> {
    let dir = tempfile::tempdir()?;
    let location = dir.path().join("store").to_str().ok_or("a path that is not UTF-8")?.to_owned();
    Ok(Place { location, _dir: Some(dir) })
}

/// A new namespace of the tests' PostgreSQL server.
#[cfg(feature = "postgres")]
pub(crate) fn postgres() -> Place {
    Place { location: crate::server::address("contract"), _dir: None }
}

/// Makes, for each behaviour, a test per engine: `dir::<name>` and
/// `postgres::<name>`.
macro_rules! contract {
    ($($behaviour:ident),* $(,)?) => {
        mod dir {
            $(
                #[test]
                fn $behaviour() -> crate::TestResult {
                    super::$behaviour(&crate::contract::directory()?)
                }
            )*
        }
        #[cfg(feature = "postgres")]
        mod postgres {
            $(
                #[test]
                fn $behaviour() -> crate::TestResult {
                    super::$behaviour(&crate::contract::postgres())
                }
            )*
        }
    };
}
pub(crate) use contract;
