//! Where a store is: a directory (the embedded engines), or a `postgres://` URL.
//!
//! Every front door's `open` takes a path. A `postgres://` (or `postgresql://`)
//! location given there is refused with [`Error::InvalidLocation`] until that front
//! door runs on the PostgreSQL engine, rather than taken for a relative directory
//! named `postgres:` and created.

use std::path::Path;

use crate::{Error, Result};

/// The schemes of a PostgreSQL location.
const SCHEMES: [&str; 2] = ["postgres://", "postgresql://"];

/// Refuses `path` when it is a PostgreSQL location, which `front_door` (say, "an
/// event store") cannot open yet.
pub(crate) fn refuse_database(path: &Path, front_door: &str) -> Result<()> {
    let Some(text) = path.to_str() else { return Ok(()) };
    if !SCHEMES.iter().any(|scheme| text.starts_with(scheme)) {
        return Ok(());
    }
    let reason = if cfg!(feature = "postgres") {
        format!("{front_door} does not run on PostgreSQL yet: give it a directory")
    } else {
        format!(
            "{front_door} on PostgreSQL needs instastate's `postgres` feature, which this build lacks"
        )
    };
    Err(Error::InvalidLocation { location: redacted(text), reason })
}

/// The URL `text` without the password its user part may hold, for errors about
/// it.
pub(crate) fn redacted(text: &str) -> String {
    let Some((scheme, rest)) = text.split_once("://") else { return text.to_owned() };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    match authority.rsplit_once('@') {
        Some((user, host)) => {
            let user = user.split_once(':').map_or(user, |(user, _)| user);
            format!("{scheme}://{user}@{host}{path}")
        }
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_location_is_refused_without_its_password_and_a_path_is_not() {
        for text in ["postgres://app:s3cret@db/prod?namespace=x", "postgresql://app:s3cret@db"] {
            let res = refuse_database(Path::new(text), "an event store");
            let Err(Error::InvalidLocation { location, reason }) = &res else { panic!("{res:?}") };
            assert!(!location.contains("s3cret"), "{location}");
            assert!(location.contains("app@db"), "{location}");
            assert!(reason.contains("an event store"), "{reason}");
        }
        assert!(refuse_database(Path::new("postgres"), "a store").is_ok());
        assert!(refuse_database(Path::new("data/postgres://x"), "a store").is_ok());
    }
}
