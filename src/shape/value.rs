//! [`RawValue`]: a value read back without its Rust type, from the [`Shape`] its
//! journal recorded, for tools that show stored data (`instastate read`).
//!
//! The bytes are postcard's: integers of 16 bits and more as LEB128 varints (signed
//! ones zigzagged), `u8`, `i8` and `bool` as one byte, floats little-endian, strings,
//! byte strings, sequences and maps behind their length, an option behind a 0 or 1
//! byte, an enum behind its variant index, and structs and tuples as their fields in
//! order, with nothing between.

use std::fmt;

use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};

use super::{Body, Container, Field, Format, Shape};

/// How deeply values may nest: a recursive type is followed this far.
const MAX_DEPTH: usize = 128;

/// A value read back without its Rust type, from the structure of the type that the
/// store recorded when it wrote it; see
/// [`RawEvents::decode`](crate::events::RawEvents::decode).
///
/// It serializes (for example to JSON with `serde_json`) as serde would have
/// serialized the original value with its derived `Serialize`: structs as maps of
/// their fields, enums externally tagged (`"Unit"`, `{"Variant": …}`), options as
/// the value or `null`. Maps whose keys are not strings, numbers, characters or
/// booleans serialize as a sequence of `[key, value]` pairs. Its `Display` is
/// Rust-like: `Deposited { amount: 100 }`.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum RawValue {
    /// `()`.
    Unit,
    /// A `bool`.
    Bool(bool),
    /// A signed integer, of any width.
    Int(i128),
    /// An unsigned integer, of any width.
    UInt(u128),
    /// A float, of either width.
    Float(f64),
    /// A `char`.
    Char(char),
    /// A string.
    Str(String),
    /// A byte string (serde's bytes, as `serde_bytes` writes them).
    Bytes(Vec<u8>),
    /// An option: `None` or `Some` of the value.
    Option(Option<Box<RawValue>>),
    /// A sequence.
    Seq(Vec<RawValue>),
    /// A map, its entries in their stored order.
    Map(Vec<(RawValue, RawValue)>),
    /// A tuple or an array of fixed size.
    Tuple(Vec<RawValue>),
    /// A struct (unit, newtype, tuple or with named fields), by its serde name.
    Struct {
        /// Its serde name.
        name: String,
        /// What it holds.
        fields: Fields,
    },
    /// A variant of an enum.
    Variant {
        /// The enum's serde name.
        enum_name: String,
        /// The variant's name.
        variant: String,
        /// What it holds.
        fields: Fields,
    },
}

/// What a struct or an enum variant holds.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Fields {
    /// Nothing: a unit struct or variant.
    Unit,
    /// One value, unnamed: a newtype.
    Newtype(Box<RawValue>),
    /// Values by position.
    Tuple(Vec<RawValue>),
    /// Values by name, in declaration order.
    Named(Vec<(String, RawValue)>),
}

/// The value JSON data holds: objects as maps with string keys, arrays as
/// sequences, numbers as the narrowest of `UInt`, `Int` and `Float`.
#[cfg(feature = "json")]
pub(crate) fn from_json(value: serde_json::Value) -> RawValue {
    use serde_json::Value as Json;
    match value {
        Json::Null => RawValue::Option(None),
        Json::Bool(it) => RawValue::Bool(it),
        Json::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
            (Some(it), _, _) => RawValue::UInt(u128::from(it)),
            (None, Some(it), _) => RawValue::Int(i128::from(it)),
            // Without serde_json's `arbitrary_precision`, every number is an f64 too.
            (None, None, it) => RawValue::Float(it.unwrap_or(f64::NAN)),
        },
        Json::String(it) => RawValue::Str(it),
        Json::Array(items) => RawValue::Seq(items.into_iter().map(from_json).collect()),
        Json::Object(fields) => RawValue::Map(
            fields.into_iter().map(|(key, value)| (RawValue::Str(key), from_json(value))).collect(),
        ),
    }
}

/// Decodes `bytes`, a value encoded with postcard, as the type whose structure is
/// `shape`; says why when they do not read as one whole value of it.
pub(crate) fn decode(shape: &Shape, bytes: &[u8]) -> Result<RawValue, String> {
    // Values that take no bytes (units) are bounded by this budget, so that a
    // damaged length cannot make a long loop of them.
    let budget = bytes.len().saturating_mul(8).saturating_add(1 << 16);
    let mut reader = Reader { shape, bytes, at: 0, budget };
    let value = reader.format(&shape.root, 0)?;
    if reader.at < bytes.len() {
        return Err(format!(
            "{} bytes are left after the value, at byte {}",
            bytes.len() - reader.at,
            reader.at
        ));
    }
    Ok(value)
}

struct Reader<'a> {
    shape: &'a Shape,
    bytes: &'a [u8],
    at: usize,
    budget: usize,
}

impl Reader<'_> {
    fn format(&mut self, format: &Format, depth: usize) -> Result<RawValue, String> {
        if MAX_DEPTH < depth {
            return Err(format!("values nest more than {MAX_DEPTH} deep"));
        }
        self.budget = self.budget.checked_sub(1).ok_or("it holds too many values for its size")?;
        Ok(match format {
            Format::Unit => RawValue::Unit,
            Format::Bool => RawValue::Bool(self.flag("a bool")?),
            Format::I8 => RawValue::Int(i128::from(i8::from_le_bytes([self.byte()?]))),
            Format::I16 => RawValue::Int(self.signed(16)?),
            Format::I32 => RawValue::Int(self.signed(32)?),
            Format::I64 => RawValue::Int(self.signed(64)?),
            Format::I128 => RawValue::Int(self.signed(128)?),
            Format::U8 => RawValue::UInt(u128::from(self.byte()?)),
            Format::U16 => RawValue::UInt(self.varint(16)?),
            Format::U32 => RawValue::UInt(self.varint(32)?),
            Format::U64 => RawValue::UInt(self.varint(64)?),
            Format::U128 => RawValue::UInt(self.varint(128)?),
            Format::F32 => RawValue::Float(f64::from(f32::from_le_bytes(self.take_array()?))),
            Format::F64 => RawValue::Float(f64::from_le_bytes(self.take_array()?)),
            Format::Char => {
                let text = self.str()?;
                let mut chars = text.chars();
                match (chars.next(), chars.next()) {
                    (Some(only), None) => RawValue::Char(only),
                    _ => return Err(format!("a char holds {} characters", text.chars().count())),
                }
            }
            Format::Str => RawValue::Str(self.str()?.to_owned()),
            Format::Bytes => {
                let len = self.len()?;
                RawValue::Bytes(self.take(len)?.to_vec())
            }
            Format::Option(inner) => {
                if self.flag("an option's tag")? {
                    RawValue::Option(Some(Box::new(self.format(inner, depth + 1)?)))
                } else {
                    RawValue::Option(None)
                }
            }
            Format::Seq(inner) => {
                let len = self.len()?;
                RawValue::Seq(self.values(std::iter::repeat_n(&**inner, len), depth)?)
            }
            Format::Map(key, value) => {
                let len = self.len()?;
                let mut entries = Vec::with_capacity(len.min(self.bytes.len()));
                for _ in 0..len {
                    let key = self.format(key, depth + 1)?;
                    entries.push((key, self.format(value, depth + 1)?));
                }
                RawValue::Map(entries)
            }
            Format::Tuple(formats) => RawValue::Tuple(self.values(formats.iter(), depth)?),
            Format::Array(inner, size) => {
                let size = usize::try_from(*size).map_err(|_| "an array is too large")?;
                RawValue::Tuple(self.values(std::iter::repeat_n(&**inner, size), depth)?)
            }
            Format::Named(name) => self.named(name, depth)?,
        })
    }

    fn named(&mut self, name: &str, depth: usize) -> Result<RawValue, String> {
        let container = self
            .shape
            .containers
            .get(name)
            .ok_or_else(|| format!("the structure names `{name}` without describing it"))?;
        Ok(match container {
            Container::Unit => RawValue::Struct { name: name.to_owned(), fields: Fields::Unit },
            Container::Newtype(format) => RawValue::Struct {
                name: name.to_owned(),
                fields: Fields::Newtype(Box::new(self.format(format, depth + 1)?)),
            },
            Container::Tuple(formats) => RawValue::Struct {
                name: name.to_owned(),
                fields: Fields::Tuple(self.values(formats.iter(), depth)?),
            },
            Container::Struct(fields) => {
                RawValue::Struct { name: name.to_owned(), fields: self.fields(fields, depth)? }
            }
            Container::Enum(variants) => {
                let at = self.at;
                let index = self.varint(32)?;
                let variant = usize::try_from(index)
                    .ok()
                    .and_then(|index| variants.get(index))
                    .ok_or_else(|| {
                        format!(
                            "variant {index} of enum `{name}` (at byte {at}) is unknown: it has {}",
                            variants.len()
                        )
                    })?;
                let fields = match &variant.body {
                    Body::Unit => Fields::Unit,
                    Body::Newtype(format) => {
                        Fields::Newtype(Box::new(self.format(format, depth + 1)?))
                    }
                    Body::Tuple(formats) => Fields::Tuple(self.values(formats.iter(), depth)?),
                    Body::Struct(fields) => self.fields(fields, depth)?,
                };
                RawValue::Variant {
                    enum_name: name.to_owned(),
                    variant: variant.name.clone(),
                    fields,
                }
            }
        })
    }

    fn values<'f>(
        &mut self,
        formats: impl ExactSizeIterator<Item = &'f Format>,
        depth: usize,
    ) -> Result<Vec<RawValue>, String> {
        let mut values = Vec::with_capacity(formats.len().min(self.bytes.len()));
        for format in formats {
            values.push(self.format(format, depth + 1)?);
        }
        Ok(values)
    }

    fn fields(&mut self, fields: &[Field], depth: usize) -> Result<Fields, String> {
        let mut named = Vec::with_capacity(fields.len());
        for field in fields {
            named.push((field.name.clone(), self.format(&field.format, depth + 1)?));
        }
        Ok(Fields::Named(named))
    }

    fn cut_short(&self) -> String {
        format!("the bytes end in the middle of a value (at byte {})", self.at)
    }

    fn byte(&mut self) -> Result<u8, String> {
        let byte = *self.bytes.get(self.at).ok_or_else(|| self.cut_short())?;
        self.at += 1;
        Ok(byte)
    }

    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self.at.checked_add(n).filter(|end| *end <= self.bytes.len());
        let Some(end) = end else { return Err(self.cut_short()) };
        let taken = self.bytes.get(self.at..end).ok_or_else(|| self.cut_short())?;
        self.at = end;
        Ok(taken)
    }

    fn take_array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let bytes = self.take(N)?;
        bytes.try_into().map_err(|_| "a number is cut short".to_owned())
    }

    fn flag(&mut self, what: &str) -> Result<bool, String> {
        let at = self.at;
        match self.byte()? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(format!("{what} is {other} (at byte {at}), neither 0 nor 1")),
        }
    }

    /// An unsigned LEB128 varint of at most `bits` bits.
    fn varint(&mut self, bits: u32) -> Result<u128, String> {
        let at = self.at;
        let mut n: u128 = 0;
        for shift in (0..bits).step_by(7) {
            let byte = self.byte()?;
            let low = u128::from(byte & 0x7f);
            // The bits of this byte that fall beyond the width must be 0.
            if bits - shift < 7 && low >> (bits - shift) != 0 {
                break;
            }
            n |= low << shift;
            if byte & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err(format!("a number (at byte {at}) does not fit in {bits} bits"))
    }

    /// A zigzag LEB128 varint of at most `bits` bits.
    fn signed(&mut self, bits: u32) -> Result<i128, String> {
        let n = self.varint(bits)?;
        // Zigzag: the low bit is the sign, the rest the magnitude; `n >> 1` fits.
        #[allow(clippy::cast_possible_wrap)]
        let half = (n >> 1) as i128;
        Ok(if n & 1 == 0 { half } else { -half - 1 })
    }

    fn len(&mut self) -> Result<usize, String> {
        let at = self.at;
        let len = self.varint(64)?;
        usize::try_from(len).map_err(|_| format!("a length (at byte {at}) is too large"))
    }

    fn str(&mut self) -> Result<&str, String> {
        let len = self.len()?;
        let at = self.at;
        std::str::from_utf8(self.take(len)?)
            .map_err(|_| format!("a string (at byte {at}) is not UTF-8"))
    }
}

impl Serialize for RawValue {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            RawValue::Unit | RawValue::Option(None) => serializer.serialize_unit(),
            RawValue::Bool(it) => serializer.serialize_bool(*it),
            RawValue::Int(it) => match i64::try_from(*it) {
                Ok(small) => serializer.serialize_i64(small),
                Err(_) => serializer.serialize_i128(*it),
            },
            RawValue::UInt(it) => match u64::try_from(*it) {
                Ok(small) => serializer.serialize_u64(small),
                Err(_) => serializer.serialize_u128(*it),
            },
            RawValue::Float(it) => serializer.serialize_f64(*it),
            RawValue::Char(it) => serializer.serialize_char(*it),
            RawValue::Str(it) => serializer.serialize_str(it),
            RawValue::Bytes(bytes) => serializer.collect_seq(bytes),
            RawValue::Option(Some(inner)) => inner.serialize(serializer),
            RawValue::Seq(values) | RawValue::Tuple(values) => serializer.collect_seq(values),
            RawValue::Map(entries) => {
                if entries.iter().all(|(key, _)| key.as_key().is_some()) {
                    let mut map = serializer.serialize_map(Some(entries.len()))?;
                    for (key, value) in entries {
                        map.serialize_entry(&key.as_key().unwrap_or_default(), value)?;
                    }
                    map.end()
                } else {
                    let mut seq = serializer.serialize_seq(Some(entries.len()))?;
                    for (key, value) in entries {
                        seq.serialize_element(&(key, value))?;
                    }
                    seq.end()
                }
            }
            RawValue::Struct { fields, .. } => fields.serialize(serializer),
            RawValue::Variant { variant, fields: Fields::Unit, .. } => {
                serializer.serialize_str(variant)
            }
            RawValue::Variant { variant, fields, .. } => {
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry(variant, fields)?;
                map.end()
            }
        }
    }
}

impl Serialize for Fields {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Fields::Unit => serializer.serialize_unit(),
            Fields::Newtype(inner) => inner.serialize(serializer),
            Fields::Tuple(values) => serializer.collect_seq(values),
            Fields::Named(fields) => {
                let mut map = serializer.serialize_map(Some(fields.len()))?;
                for (name, value) in fields {
                    map.serialize_entry(name, value)?;
                }
                map.end()
            }
        }
    }
}

impl RawValue {
    /// The value as a map key, when it is a scalar: its text.
    fn as_key(&self) -> Option<String> {
        match self {
            RawValue::Str(it) => Some(it.clone()),
            RawValue::Char(it) => Some(it.to_string()),
            RawValue::Bool(_) | RawValue::Int(_) | RawValue::UInt(_) | RawValue::Float(_) => {
                Some(self.to_string())
            }
            _ => None,
        }
    }
}

impl fmt::Display for RawValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RawValue::Unit => f.write_str("()"),
            RawValue::Bool(it) => write!(f, "{it}"),
            RawValue::Int(it) => write!(f, "{it}"),
            RawValue::UInt(it) => write!(f, "{it}"),
            RawValue::Float(it) => write!(f, "{it:?}"),
            RawValue::Char(it) => write!(f, "{it:?}"),
            RawValue::Str(it) => write!(f, "{it:?}"),
            RawValue::Bytes(bytes) => {
                f.write_str("0x")?;
                bytes.iter().try_for_each(|byte| write!(f, "{byte:02x}"))
            }
            RawValue::Option(None) => f.write_str("None"),
            RawValue::Option(Some(inner)) => write!(f, "Some({inner})"),
            RawValue::Seq(values) => list(f, "[", values.iter(), "]"),
            RawValue::Tuple(values) => list(f, "(", values.iter(), ")"),
            RawValue::Map(entries) => {
                f.write_str("{")?;
                for (idx, (key, value)) in entries.iter().enumerate() {
                    let sep = if idx == 0 { "" } else { ", " };
                    write!(f, "{sep}{key}: {value}")?;
                }
                f.write_str("}")
            }
            RawValue::Struct { name, fields } => write!(f, "{name}{fields}"),
            RawValue::Variant { variant, fields, .. } => write!(f, "{variant}{fields}"),
        }
    }
}

impl fmt::Display for Fields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fields::Unit => Ok(()),
            Fields::Newtype(inner) => write!(f, "({inner})"),
            Fields::Tuple(values) => list(f, "(", values.iter(), ")"),
            Fields::Named(fields) if fields.is_empty() => f.write_str(" {}"),
            Fields::Named(fields) => {
                f.write_str(" { ")?;
                for (idx, (name, value)) in fields.iter().enumerate() {
                    let sep = if idx == 0 { "" } else { ", " };
                    write!(f, "{sep}{name}: {value}")?;
                }
                f.write_str(" }")
            }
        }
    }
}

fn list<'v>(
    f: &mut fmt::Formatter<'_>,
    open: &str,
    values: impl Iterator<Item = &'v RawValue>,
    close: &str,
) -> fmt::Result {
    f.write_str(open)?;
    for (idx, value) in values.enumerate() {
        if idx != 0 {
            f.write_str(", ")?;
        }
        write!(f, "{value}")?;
    }
    f.write_str(close)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Serialize};

    use super::*;

    #[derive(Debug, Serialize, Deserialize)]
    enum Bank {
        Opened { owner: String, tags: Vec<String> },
        Deposited(i64),
        Closed,
        Moved(u128, Option<char>, [u8; 2]),
        Kept { by: BTreeMap<String, (i16, f32)>, note: Note },
    }

    #[derive(Debug, Serialize, Deserialize)]
    struct Note(Option<Box<Note>>);

    fn shown(value: &Bank) -> Result<String, String> {
        let shape = Shape::of::<Bank>().ok_or("no shape")?;
        let bytes = postcard::to_allocvec(value).map_err(|err| err.to_string())?;
        decode(&shape, &bytes).map(|value| value.to_string())
    }

    #[test]
    fn every_kind_of_value_reads_back() -> Result<(), String> {
        let opened = Bank::Opened { owner: "alice".into(), tags: vec!["a".into(), "b\"".into()] };
        assert_eq!(shown(&opened)?, r#"Opened { owner: "alice", tags: ["a", "b\""] }"#);
        assert_eq!(shown(&Bank::Deposited(-300))?, "Deposited(-300)");
        assert_eq!(shown(&Bank::Closed)?, "Closed");
        assert_eq!(
            shown(&Bank::Moved(u128::MAX, Some('é'), [1, 255]))?,
            format!("Moved({}, Some('é'), (1, 255))", u128::MAX)
        );
        let kept = Bank::Kept {
            by: BTreeMap::from([("x".to_owned(), (i16::MIN, 0.5))]),
            note: Note(Some(Box::new(Note(None)))),
        };
        assert_eq!(
            shown(&kept)?,
            r#"Kept { by: {"x": (-32768, 0.5)}, note: Note(Some(Note(None))) }"#
        );
        Ok(())
    }

    #[test]
    fn damaged_bytes_are_refused_never_a_panic() -> Result<(), String> {
        let shape = Shape::of::<Bank>().ok_or("no shape")?;
        let opened = Bank::Opened { owner: "alice".into(), tags: vec!["a".into()] };
        let bytes = postcard::to_allocvec(&opened).map_err(|err| err.to_string())?;
        for cut in 0..bytes.len() {
            assert!(decode(&shape, bytes.get(..cut).unwrap_or_default()).is_err(), "cut {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode(&shape, &longer).is_err());
        // Variant 9 does not exist; a huge length is refused before any allocation.
        assert!(decode(&shape, &[9]).err().unwrap_or_default().contains("variant 9"));
        assert!(decode(&shape, &[0, 0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
        let units = Shape::of::<Vec<()>>().ok_or("no shape")?;
        assert!(decode(&units, &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]).is_err());
        for idx in 0..bytes.len() {
            for bit in 0..8 {
                let mut flipped = bytes.clone();
                if let Some(byte) = flipped.get_mut(idx) {
                    *byte ^= 1 << bit;
                }
                // Either refused or read as some value: never a panic.
                let _ = decode(&shape, &flipped);
            }
        }
        Ok(())
    }
}
