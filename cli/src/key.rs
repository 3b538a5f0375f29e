//! Reading the key of an encrypted store from a key file.

/// The 32 key bytes in `contents`: exactly 32 raw bytes, or 64 hex digits with
/// optional surrounding whitespace (such as the newline an editor adds).
pub(crate) fn parse(contents: &[u8]) -> Result<[u8; 32], String> {
    if let Ok(raw) = <[u8; 32]>::try_from(contents) {
        return Ok(raw);
    }
    let text = contents.trim_ascii();
    let not_a_key = || {
        format!(
            "a key file holds 32 raw bytes or 64 hex digits, and this one holds {} bytes \
             that are neither",
            contents.len()
        )
    };
    if text.len() != 64 {
        return Err(not_a_key());
    }
    let mut key = [0; 32];
    for (byte, pair) in key.iter_mut().zip(text.chunks_exact(2)) {
        // `from_str_radix` alone would also take a sign, as in "+a".
        if !pair.iter().all(u8::is_ascii_hexdigit) {
            return Err(not_a_key());
        }
        let digits = std::str::from_utf8(pair).map_err(|_| not_a_key())?;
        *byte = u8::from_str_radix(digits, 16).map_err(|_| not_a_key())?;
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_and_hex_keys_parse() {
        assert_eq!(parse(&[7; 32]), Ok([7; 32]));
        // Raw bytes that happen to be whitespace are still the key.
        assert_eq!(parse(&[b' '; 32]), Ok([b' '; 32]));
        assert_eq!(parse(format!("{}\n", "0a".repeat(32)).as_bytes()), Ok([10; 32]));
        assert_eq!(parse("aB".repeat(32).as_bytes()), Ok([0xab; 32]));
    }

    #[test]
    fn other_contents_are_refused() {
        assert!(parse(b"").is_err());
        assert!(parse(&[7; 31]).is_err());
        assert!(parse("zz".repeat(32).as_bytes()).is_err());
        assert!(parse("+a".repeat(32).as_bytes()).is_err());
    }
}
