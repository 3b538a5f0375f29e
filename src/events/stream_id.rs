//! Which stream ids a store accepts.

use crate::{Error, Result};

/// The longest stream id, in bytes.
pub(crate) const MAX_LEN: usize = 512;

/// Refuses a stream id that is empty, longer than [`MAX_LEN`] bytes, holds a
/// control character or whitespace other than a space at its ends, or starts with
/// `$` (kept for the store's own streams, `$all` among them).
pub(crate) fn check(stream: &str) -> Result<()> {
    let reason = if stream.is_empty() {
        Some("it is empty".to_owned())
    } else if MAX_LEN < stream.len() {
        Some(format!("it is {} bytes long, over the limit of {MAX_LEN}", stream.len()))
    } else if stream.starts_with('$') {
        Some("ids starting with `$` are the store's own (`$all`)".to_owned())
    } else if let Some(bad) = stream.chars().find(|it| it.is_control()) {
        Some(format!("it holds the control character {bad:?}"))
    } else if stream.trim() != stream {
        Some("it starts or ends with whitespace".to_owned())
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::InvalidStreamId { stream: shown(stream), reason }),
        None => Ok(()),
    }
}

/// `stream`, cut to a length an error message can carry.
fn shown(stream: &str) -> String {
    const SHOWN: usize = 80;
    if stream.len() <= SHOWN {
        return stream.to_owned();
    }
    let mut end = SHOWN;
    while !stream.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", stream.get(..end).unwrap_or_default(), stream.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_ids_pass_and_odd_ones_are_refused_with_a_reason() {
        for good in ["account-42", "order/2026/7", "ünïcödé", "a b"] {
            assert!(check(good).is_ok(), "{good}");
        }
        let long = "x".repeat(MAX_LEN + 1);
        for bad in ["", "$all", "tab\there", " padded", "nul\0", long.as_str()] {
            let Err(Error::InvalidStreamId { reason, .. }) = check(bad) else {
                panic!("{bad:?} was accepted");
            };
            assert!(!reason.is_empty());
        }
    }
}
