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
/// event store", or "a backup") cannot use yet: it is never taken for a relative
/// path and created.
pub(crate) fn refuse_database(path: &Path, front_door: &str) -> Result<()> {
    let Some(text) = path.to_str() else { return Ok(()) };
    if !SCHEMES.iter().any(|scheme| text.starts_with(scheme)) {
        return Ok(());
    }
    let reason = if cfg!(feature = "postgres") {
        format!("{front_door} does not run on PostgreSQL yet: give it a path on disk")
    } else {
        format!(
            "{front_door} on PostgreSQL needs instastate's `postgres` feature, which this build lacks"
        )
    };
    Err(Error::InvalidLocation { location: redacted(text), reason })
}

/// The PostgreSQL location `path` gives, if it is one (`postgres://` or
/// `postgresql://`).
///
/// # Errors
/// [`Error::InvalidLocation`] when it is one and does not parse.
#[cfg(feature = "postgres")]
pub(crate) fn database(path: &Path) -> Result<Option<crate::postgres::Location>> {
    let Some(text) = path.to_str() else { return Ok(None) };
    if !SCHEMES.iter().any(|scheme| text.starts_with(scheme)) {
        return Ok(None);
    }
    crate::postgres::Location::parse(text).map(Some)
}

/// The URL `text` without the passwords it may hold (in its user part, or as a
/// `password` parameter), for errors about it.
pub(crate) fn redacted(text: &str) -> String {
    let Some((scheme, rest)) = text.split_once("://") else { return text.to_owned() };
    let (base, query) =
        rest.split_once('?').map_or((rest, None), |(base, query)| (base, Some(query)));
    // The user part ends at the last `@` before the query: a password may hold `/`.
    let base = match base.rsplit_once('@') {
        Some((user, host)) => {
            let user = user.split_once(':').map_or(user, |(user, _)| user);
            format!("{user}@{host}")
        }
        None => base.to_owned(),
    };
    let query = query.map(|query| {
        let kept: Vec<&str> = query
            .split('&')
            .map(|pair| if pair.starts_with("password=") { "password=..." } else { pair })
            .collect();
        format!("?{}", kept.join("&"))
    });
    format!("{scheme}://{base}{}", query.unwrap_or_default())
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
        for text in ["postgres://app@db/prod?password=s3cret", "postgres://app:pa/s3cret@db/prod"] {
            let res = refuse_database(Path::new(text), "a store");
            let Err(Error::InvalidLocation { location, .. }) = &res else { panic!("{res:?}") };
            assert!(!location.contains("s3cret"), "{location}");
        }
        assert!(refuse_database(Path::new("data/postgres://x"), "a store").is_ok());
    }
}
