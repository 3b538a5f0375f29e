//! [`Shape`]: a structural fingerprint of a cell's type, traced through serde's data model.
//!
//! A record names its value's type with `std::any::type_name`, which does not change
//! when a field's type does: a cell of `struct S { offset: i32 }` saved as -1 and read
//! back as `struct S { offset: u32 }` would load as 1. A shape describes what serde
//! sees of the type, without any new derive: the root format and every named
//! container reachable from it, traced by serde-reflection's [`Tracer`]. Two shapes
//! compare equal when the types read the same way, and [`Shape::differences`] says
//! what changed when they do not.
//!
//! The encoding is our own, so that a new serde-reflection cannot change it:
//!
//! ```text
//! version u8 (= 1) | root format | count u32 | count × (name | container)   (names ascending, by bytes)
//! name:      len u16 | UTF-8 bytes
//! format:    tag u8, then
//!            0 unit | 1 bool | 2 i8 | 3 i16 | 4 i32 | 5 i64 | 6 i128
//!            7 u8 | 8 u16 | 9 u32 | 10 u64 | 11 u128 | 12 f32 | 13 f64 | 14 char | 15 str | 16 bytes
//!            17 option: format | 18 seq: format | 19 map: key format | value format
//!            20 tuple: count u32 | count × format | 21 array: size u64 | format
//!            22 named: name (of a container in the list)
//! container: tag u8, then
//!            0 unit struct | 1 newtype struct: format | 2 tuple struct: count u32 | count × format
//!            3 struct: count u32 | count × (name | format)
//!            4 enum: count u32 | count × (name | variant), in variant index order
//! variant:   tag u8, then 0 unit | 1 newtype: format | 2 tuple: count u32 | count × format
//!            3 struct: count u32 | count × (name | format)
//! ```
//!
//! Integers are big-endian (see `codec.rs`). Formats nest at most 64 deep within one
//! container or the root, and every named container is in the list. The encoding
//! carries no checksum of its own: it is stored inside records, which have one.

use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet, VecDeque},
    fmt,
    hash::{DefaultHasher, Hash, Hasher},
    marker::PhantomData,
    panic,
};

use serde::de::{
    self, DeserializeOwned, DeserializeSeed, IntoDeserializer, Visitor, value::U32Deserializer,
};
use serde_reflection::{
    ContainerFormat, Format as Traced, FormatHolder, Named, Registry, Samples, Tracer,
    TracerConfig, VariantFormat,
};

use crate::codec::{checksum, read_u32, read_u64, u32_bytes, u64_bytes};

pub(crate) mod value;

/// The structure of a type as serde reads it: the root format and every named
/// container (struct or enum) reachable from it.
///
/// Containers are known by their serde name (the type's identifier, or its
/// `#[serde(rename)]`), without module path or generic arguments, as serde-reflection
/// names them. Recursive types refer to themselves by that name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Shape {
    root: Format,
    containers: BTreeMap<String, Container>,
}

/// Why stored shape bytes could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ShapeFault {
    Truncated,
    Version(u8),
    Tag(u8),
    Name,
    TooDeep,
    Order,
    Dangling,
    TrailingBytes,
}

/// The format of a value that has no name of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Format {
    Unit,
    Bool,
    I8,
    I16,
    I32,
    I64,
    I128,
    U8,
    U16,
    U32,
    U64,
    U128,
    F32,
    F64,
    Char,
    Str,
    Bytes,
    Option(Box<Format>),
    Seq(Box<Format>),
    Map(Box<Format>, Box<Format>),
    Tuple(Vec<Format>),
    /// A tuple of `size` values of the same format, such as `[u16; 3]` or `(u8, u8)`.
    Array(Box<Format>, u64),
    /// The container of that name.
    Named(String),
}

/// The format of a named struct or enum.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Container {
    Unit,
    Newtype(Format),
    Tuple(Vec<Format>),
    Struct(Vec<Field>),
    /// The variants in the order of their index, which is what postcard writes.
    Enum(Vec<Variant>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Field {
    name: String,
    format: Format,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Variant {
    name: String,
    body: Body,
}

/// What an enum variant holds.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Body {
    Unit,
    Newtype(Format),
    Tuple(Vec<Format>),
    Struct(Vec<Field>),
}

/// The encoding version [`Shape::encode`] writes and [`Shape::decode`] reads.
const SHAPE_VERSION: u8 = 1;

/// How deeply formats may nest inside one container, e.g. `Vec<Option<(u8, u8)>>` is 3
/// deep. Deeper shapes are not traced and not decoded, so recursion over shapes stays
/// shallow, and every shape [`Shape::of`] returns also decodes.
const MAX_DEPTH: usize = 64;

/// How deeply the values of one trace may nest before it gives up.
///
/// serde-reflection does not terminate on some recursive types (an enum whose first
/// variant holds the enum again), and would overflow the stack; this bound turns that
/// into an untraceable type instead. A debug build needs under 512 KiB of stack to
/// reach it.
const MAX_TRACE_DEPTH: usize = 96;

/// How many times one type is traced to discover every variant of its enums. Each pass
/// finds at least one variant, or the index of one.
const MAX_PASSES: usize = 4096;

/// How many differences [`Shape::differences`] reports at most.
const MAX_DIFFERENCES: usize = 5;

impl Shape {
    /// Traces the shape of `T` through its `Deserialize` implementation, or returns
    /// `None` when serde-reflection cannot trace it.
    ///
    /// Types that cannot be traced include those whose `Deserialize` needs
    /// `deserialize_any` or `deserialize_identifier` (`#[serde(flatten)]`, untagged,
    /// internally and adjacently tagged enums, `serde_json::Value`), structs with a
    /// `#[serde(alias)]` field, those whose `Deserialize` rejects the traced values
    /// (integers are traced as 1, floats as 0, strings as empty), recursive enums whose
    /// first variant holds the enum again, and types in which two different enums, or
    /// two structs of different fields, have one serde name.
    ///
    /// A variant with aliases is named by the first of its names in byte order, which
    /// is the order serde lists them in.
    ///
    /// Tracing takes one pass, plus about two per variant of the largest enum: a few
    /// microseconds for a plain struct, a few hundred for a dozen containers (ten times
    /// more in a debug build). Callers should cache the result.
    pub(crate) fn of<T: DeserializeOwned>() -> Option<Shape> {
        // Tracing runs code we do not control, serde-reflection's and the type's own
        // `Deserialize`, and either may panic on a type it does not expect (for
        // example, serde-reflection indexes maps it assumes are filled). A panic here
        // means "cannot be traced"; the panic hook still reports it.
        panic::catch_unwind(trace::<T>).ok().flatten()
    }

    /// The shape's canonical bytes, laid out as the module documentation shows.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = vec![SHAPE_VERSION];
        put_format(&mut out, &self.root);
        put_count(&mut out, self.containers.len());
        for (name, container) in &self.containers {
            put_name(&mut out, name);
            put_container(&mut out, container);
        }
        out
    }

    /// Decodes bytes written by [`Shape::encode`].
    ///
    /// Refuses unknown versions and tags, names that are not UTF-8, containers out of
    /// order, references to containers that are not there, nesting deeper than the
    /// limit and trailing bytes. Never allocates more than the input's size.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Shape, ShapeFault> {
        let mut reader = Reader(bytes);
        let [version] = reader.take::<1>()?;
        if version != SHAPE_VERSION {
            return Err(ShapeFault::Version(version));
        }
        let root = reader.format(0)?;
        let count = reader.count()?;
        let mut containers = BTreeMap::new();
        let mut last: Option<String> = None;
        for _ in 0..count {
            let name = reader.name()?;
            let in_order = last.as_ref().is_none_or(|last| *last < name);
            if !in_order {
                return Err(ShapeFault::Order);
            }
            let container = reader.container()?;
            last = Some(name.clone());
            containers.insert(name, container);
        }
        if !reader.0.is_empty() {
            return Err(ShapeFault::TrailingBytes);
        }
        let shape = Shape { root, containers };
        let mut names = Vec::new();
        shape.root.names(&mut names);
        for container in shape.containers.values() {
            container.names(&mut names);
        }
        if names.iter().any(|name| !shape.containers.contains_key(*name)) {
            return Err(ShapeFault::Dangling);
        }
        Ok(shape)
    }

    /// A CRC-32 of the encoding: a cheap fingerprint to compare before the shapes.
    pub(crate) fn checksum(&self) -> u32 {
        checksum(&self.encode())
    }

    /// What changed from the `stored` shape to the `current` one, at most the first
    /// few differences, as lowercase sentences. Empty exactly when the shapes are equal.
    pub(crate) fn differences(stored: &Shape, current: &Shape) -> Vec<String> {
        let mut comparison =
            Comparison { seen: BTreeSet::new(), queue: VecDeque::new(), out: Vec::new() };
        comparison.formats("the type", &stored.root, &current.root);
        while let Some(name) = comparison.queue.pop_front() {
            if MAX_DIFFERENCES <= comparison.out.len() {
                break;
            }
            let (Some(old), Some(new)) =
                (stored.containers.get(name), current.containers.get(name))
            else {
                continue;
            };
            comparison.containers(name, old, new);
        }
        let mut out = comparison.out;
        // The walk only visits what the roots reach, which is every container of a
        // traced shape; a decoded shape may hold more.
        if out.is_empty() && stored != current {
            out.push("the shapes differ in containers the type does not use".to_owned());
        }
        out.truncate(MAX_DIFFERENCES);
        out
    }
}

impl Shape {
    /// This shape with its containers renamed after those of `stored` they stand
    /// for: a walk of both shapes side by side pairs each container this one names
    /// with the one `stored` names in the same place. Container names are not
    /// encoded by postcard, so an old type kept under a new name (`CommandV1`) for a
    /// migration reads the bytes written as `Command`; compared renamed, only real
    /// changes are left. Unchanged when the pairing is not one to one.
    pub(crate) fn renamed_like(&self, stored: &Shape) -> Shape {
        let mut pairs: BTreeMap<&str, &str> = BTreeMap::new();
        let mut queue: VecDeque<(&str, &str)> = VecDeque::new();
        pair_formats(&self.root, &stored.root, &mut pairs, &mut queue);
        while let Some((ours, theirs)) = queue.pop_front() {
            let (Some(ours), Some(theirs)) =
                (self.containers.get(ours), stored.containers.get(theirs))
            else {
                continue;
            };
            pair_containers(ours, theirs, &mut pairs, &mut queue);
        }
        // One to one, and no unpaired name taken by a paired one.
        let targets: BTreeSet<&str> = pairs.values().copied().collect();
        let clash = self
            .containers
            .keys()
            .any(|name| !pairs.contains_key(name.as_str()) && targets.contains(name.as_str()));
        if targets.len() != pairs.len() || clash {
            return self.clone();
        }
        let rename =
            |name: &str| pairs.get(name).map_or_else(|| name.to_owned(), |it| (*it).to_owned());
        Shape {
            root: self.root.renamed(&rename),
            containers: self
                .containers
                .iter()
                .map(|(name, container)| (rename(name), container.renamed(&rename)))
                .collect(),
        }
    }
}

/// Pairs the containers that `ours` and `theirs` name in the same places, queueing
/// each new pair; stops where their outlines part.
fn pair_formats<'a>(
    ours: &'a Format,
    theirs: &'a Format,
    pairs: &mut BTreeMap<&'a str, &'a str>,
    queue: &mut VecDeque<(&'a str, &'a str)>,
) {
    match (ours, theirs) {
        (Format::Named(ours), Format::Named(theirs)) if !pairs.contains_key(ours.as_str()) => {
            pairs.insert(ours, theirs);
            queue.push_back((ours, theirs));
        }
        (Format::Option(a), Format::Option(b))
        | (Format::Seq(a), Format::Seq(b))
        | (Format::Array(a, _), Format::Array(b, _)) => pair_formats(a, b, pairs, queue),
        (Format::Map(a_key, a_value), Format::Map(b_key, b_value)) => {
            pair_formats(a_key, b_key, pairs, queue);
            pair_formats(a_value, b_value, pairs, queue);
        }
        (Format::Tuple(a), Format::Tuple(b)) => {
            for (a, b) in a.iter().zip(b) {
                pair_formats(a, b, pairs, queue);
            }
        }
        _ => (),
    }
}

fn pair_containers<'a>(
    ours: &'a Container,
    theirs: &'a Container,
    pairs: &mut BTreeMap<&'a str, &'a str>,
    queue: &mut VecDeque<(&'a str, &'a str)>,
) {
    match (ours, theirs) {
        (Container::Newtype(a), Container::Newtype(b)) => pair_formats(a, b, pairs, queue),
        (Container::Tuple(a), Container::Tuple(b)) => {
            for (a, b) in a.iter().zip(b) {
                pair_formats(a, b, pairs, queue);
            }
        }
        (Container::Struct(a), Container::Struct(b)) => {
            for (a, b) in a.iter().zip(b) {
                pair_formats(&a.format, &b.format, pairs, queue);
            }
        }
        (Container::Enum(a), Container::Enum(b)) => {
            for (a, b) in a.iter().zip(b) {
                match (&a.body, &b.body) {
                    (Body::Newtype(a), Body::Newtype(b)) => pair_formats(a, b, pairs, queue),
                    (Body::Tuple(a), Body::Tuple(b)) => {
                        for (a, b) in a.iter().zip(b) {
                            pair_formats(a, b, pairs, queue);
                        }
                    }
                    (Body::Struct(a), Body::Struct(b)) => {
                        for (a, b) in a.iter().zip(b) {
                            pair_formats(&a.format, &b.format, pairs, queue);
                        }
                    }
                    _ => (),
                }
            }
        }
        _ => (),
    }
}

impl Format {
    /// The format with the containers it names renamed by `rename`.
    fn renamed(&self, rename: &dyn Fn(&str) -> String) -> Format {
        let boxed = |inner: &Format| Box::new(inner.renamed(rename));
        match self {
            Format::Named(name) => Format::Named(rename(name)),
            Format::Option(inner) => Format::Option(boxed(inner)),
            Format::Seq(inner) => Format::Seq(boxed(inner)),
            Format::Array(inner, size) => Format::Array(boxed(inner), *size),
            Format::Map(key, value) => Format::Map(boxed(key), boxed(value)),
            Format::Tuple(formats) => Format::Tuple(renamed_all(formats, rename)),
            other => other.clone(),
        }
    }
}

impl Container {
    fn renamed(&self, rename: &dyn Fn(&str) -> String) -> Container {
        match self {
            Container::Unit => Container::Unit,
            Container::Newtype(format) => Container::Newtype(format.renamed(rename)),
            Container::Tuple(formats) => Container::Tuple(renamed_all(formats, rename)),
            Container::Struct(fields) => Container::Struct(renamed_fields(fields, rename)),
            Container::Enum(variants) => Container::Enum(
                variants
                    .iter()
                    .map(|variant| Variant {
                        name: variant.name.clone(),
                        body: match &variant.body {
                            Body::Unit => Body::Unit,
                            Body::Newtype(format) => Body::Newtype(format.renamed(rename)),
                            Body::Tuple(formats) => Body::Tuple(renamed_all(formats, rename)),
                            Body::Struct(fields) => Body::Struct(renamed_fields(fields, rename)),
                        },
                    })
                    .collect(),
            ),
        }
    }
}

fn renamed_all(formats: &[Format], rename: &dyn Fn(&str) -> String) -> Vec<Format> {
    formats.iter().map(|format| format.renamed(rename)).collect()
}

fn renamed_fields(fields: &[Field], rename: &dyn Fn(&str) -> String) -> Vec<Field> {
    fields
        .iter()
        .map(|field| Field { name: field.name.clone(), format: field.format.renamed(rename) })
        .collect()
}

impl fmt::Display for ShapeFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShapeFault::Truncated => f.write_str("type shape is truncated"),
            ShapeFault::Version(found) => write!(
                f,
                "type shape encoding v{found} is unknown (this build reads v{SHAPE_VERSION})"
            ),
            ShapeFault::Tag(tag) => write!(f, "type shape has an unknown tag {tag}"),
            ShapeFault::Name => f.write_str("type shape has a name that is not UTF-8"),
            ShapeFault::TooDeep => write!(f, "type shape nests deeper than {MAX_DEPTH} levels"),
            ShapeFault::Order => f.write_str("type shape lists its containers out of order"),
            ShapeFault::Dangling => {
                f.write_str("type shape refers to a container it does not describe")
            }
            ShapeFault::TrailingBytes => f.write_str("type shape has bytes after its end"),
        }
    }
}

impl std::error::Error for ShapeFault {}

/// Renders the root compactly, Rust-like: `S { offset: i32, inner: Inner }`, or
/// `enum E { A, B(u8) }`. The alternate form (`{:#}`) adds the other containers, one
/// per line.
impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let root_name = match &self.root {
            Format::Named(name) => Some(name.as_str()),
            _ => None,
        };
        match root_name.and_then(|name| Some((name, self.containers.get(name)?))) {
            Some((name, container)) => write!(f, "{}", Definition(name, container))?,
            None => write!(f, "{}", self.root)?,
        }
        if f.alternate() {
            for (name, container) in &self.containers {
                if Some(name.as_str()) != root_name {
                    write!(f, "\n{}", Definition(name, container))?;
                }
            }
        }
        Ok(())
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Format::Unit => f.write_str("()"),
            Format::Bool => f.write_str("bool"),
            Format::I8 => f.write_str("i8"),
            Format::I16 => f.write_str("i16"),
            Format::I32 => f.write_str("i32"),
            Format::I64 => f.write_str("i64"),
            Format::I128 => f.write_str("i128"),
            Format::U8 => f.write_str("u8"),
            Format::U16 => f.write_str("u16"),
            Format::U32 => f.write_str("u32"),
            Format::U64 => f.write_str("u64"),
            Format::U128 => f.write_str("u128"),
            Format::F32 => f.write_str("f32"),
            Format::F64 => f.write_str("f64"),
            Format::Char => f.write_str("char"),
            Format::Str => f.write_str("String"),
            Format::Bytes => f.write_str("bytes"),
            Format::Option(inner) => write!(f, "Option<{inner}>"),
            Format::Seq(inner) => write!(f, "Vec<{inner}>"),
            Format::Map(key, value) => write!(f, "Map<{key}, {value}>"),
            Format::Tuple(formats) if formats.len() == 1 => write!(f, "({},)", List(formats)),
            Format::Tuple(formats) => write!(f, "({})", List(formats)),
            Format::Array(inner, size) => write!(f, "[{inner}; {size}]"),
            Format::Named(name) => f.write_str(name),
        }
    }
}

/// A container's definition: `S { a: u8 }`, `S(u64)`, `enum E { A, B(u8) }`.
struct Definition<'a>(&'a str, &'a Container);

impl fmt::Display for Definition<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Definition(name, container) = *self;
        match container {
            Container::Unit => f.write_str(name),
            Container::Newtype(format) => write!(f, "{name}({format})"),
            Container::Tuple(formats) => write!(f, "{name}({})", List(formats)),
            Container::Struct(fields) => write!(f, "{name} {}", Fields(fields)),
            Container::Enum(variants) => write!(f, "enum {name} {}", Variants(variants)),
        }
    }
}

/// How a container is described in messages: `struct { a: u8 }`, `enum { A, B(u8) }`.
struct Kind<'a>(&'a Container);

impl fmt::Display for Kind<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Container::Unit => f.write_str("unit struct"),
            Container::Newtype(format) => write!(f, "newtype struct ({format})"),
            Container::Tuple(formats) => write!(f, "tuple struct ({})", List(formats)),
            Container::Struct(fields) => write!(f, "struct {}", Fields(fields)),
            Container::Enum(variants) => write!(f, "enum {}", Variants(variants)),
        }
    }
}

/// How a variant's body is described in messages: `unit`, `struct { x: u8 }`.
impl fmt::Display for Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Body::Unit => f.write_str("unit"),
            Body::Newtype(format) => write!(f, "newtype ({format})"),
            Body::Tuple(formats) => write!(f, "tuple ({})", List(formats)),
            Body::Struct(fields) => write!(f, "struct {}", Fields(fields)),
        }
    }
}

/// Variants in braces: `{ A, B(u8), C { x: u8 } }`.
struct Variants<'a>(&'a [Variant]);

impl fmt::Display for Variants<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("{}");
        }
        f.write_str("{ ")?;
        for (idx, variant) in self.0.iter().enumerate() {
            if 0 < idx {
                f.write_str(", ")?;
            }
            f.write_str(&variant.name)?;
            match &variant.body {
                Body::Unit => (),
                Body::Newtype(format) => write!(f, "({format})")?,
                Body::Tuple(formats) => write!(f, "({})", List(formats))?,
                Body::Struct(fields) => write!(f, " {}", Fields(fields))?,
            }
        }
        f.write_str(" }")
    }
}

/// Formats separated by commas.
struct List<'a>(&'a [Format]);

impl fmt::Display for List<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (idx, format) in self.0.iter().enumerate() {
            if 0 < idx {
                f.write_str(", ")?;
            }
            write!(f, "{format}")?;
        }
        Ok(())
    }
}

/// Fields in braces: `{ a: u8, b: String }`.
struct Fields<'a>(&'a [Field]);

impl fmt::Display for Fields<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("{}");
        }
        f.write_str("{ ")?;
        for (idx, field) in self.0.iter().enumerate() {
            if 0 < idx {
                f.write_str(", ")?;
            }
            write!(f, "{}: {}", field.name, field.format)?;
        }
        f.write_str(" }")
    }
}

// Tracing.

thread_local! {
    /// Whether this thread is tracing a shape.
    static TRACING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether a shape is being traced on this thread: a `Deserialize` that needs a
/// context the tracer lacks may then make any value.
pub(crate) fn tracing() -> bool {
    TRACING.with(std::cell::Cell::get)
}

/// Clears [`TRACING`] when dropped, whatever happens.
struct Tracing(bool);

impl Drop for Tracing {
    fn drop(&mut self) {
        TRACING.with(|it| it.set(self.0));
    }
}

/// Traces `T` pass after pass until every enum it reaches has shown all its variants,
/// then assembles what the passes found into a [`Shape`].
///
/// serde-reflection completes an enum only where it meets it outside a collection:
/// once it knows the format of a `Vec`, `Option` or map, it traces it empty, so an enum
/// met only inside one would keep its first variant (its own answer is to trace each
/// enum type as a root, which we cannot name). So every pass starts from a fresh
/// [`Tracer`], which explores each collection once, and the [`Guard`] decides which
/// variant each enum shows at the first place a pass meets it (see [`Plan`]).
/// serde-reflection still records every format and cuts the recursion of recursive
/// types.
fn trace<T: DeserializeOwned>() -> Option<Shape> {
    let _tracing = Tracing(TRACING.with(|it| it.replace(true)));
    let samples = Samples::new();
    let trail = RefCell::new(Trail::default());
    let mut found = Found::default();
    for _ in 0..MAX_PASSES {
        let routes = found.routes(&trail.borrow());
        trail.borrow_mut().start_pass(routes);
        let mut tracer = Tracer::new(config());
        let seed = Guard { inner: PhantomData::<T>, trail: &trail, depth: 0, variant: None };
        let (mut root, _value) = tracer.trace_type_once_with_seed(&samples, seed).ok()?;
        // `trace_type_once` reduces the root but, unlike the registry's containers, does
        // not normalize it into arrays; do it so that `(u8, u8)` reads the same everywhere.
        root.normalize().ok()?;
        // The checked `registry()` refuses incomplete enums, which every pass leaves
        // (see `Plan`); we take their variants from the passes that explored them.
        let registry = tracer.registry_unchecked();
        let learned = trail.borrow();
        let grew = found.merge(&root, &registry, &learned)?;
        if learned.is_complete() {
            return found.into_shape(&learned);
        }
        if !grew && !learned.learned {
            return None;
        }
    }
    None
}

/// The tracer's settings: serde's compact (non human-readable) form, as postcard's.
fn config() -> TracerConfig {
    // Integers are traced as 1 rather than 0 so that `NonZero*` types trace.
    TracerConfig::default()
        .default_u8_value(1)
        .default_u16_value(1)
        .default_u32_value(1)
        .default_u64_value(1)
        .default_u128_value(1)
        .default_i8_value(1)
        .default_i16_value(1)
        .default_i32_value(1)
        .default_i64_value(1)
        .default_i128_value(1)
}

/// What the [`Guard`]s learn about enums over all the passes of one trace.
#[derive(Default)]
struct Trail {
    enums: BTreeMap<&'static str, EnumTrail>,
    /// The enums met so far in this pass, with what their first meeting did.
    met: BTreeMap<&'static str, Plan>,
    /// The variant (by name) that each enum with nothing left to learn shows in this
    /// pass, chosen to lead to the enums that still have.
    routes: BTreeMap<&'static str, usize>,
    /// Whether this pass learned anything about an enum.
    learned: bool,
}

/// What is known of one enum: which variant each of its names selects, and which
/// variant each index selects, told apart by their discriminants.
///
/// Names and indices are learned separately because they need not line up:
/// `#[serde(alias)]` adds names, and the index is what postcard writes.
struct EnumTrail {
    /// The type with this serde name, to refuse a second type with the same one.
    rust_type: &'static str,
    /// The names `Deserialize` accepts, as it passes them to `deserialize_enum`.
    names: &'static [&'static str],
    /// For each name, a hash of the discriminant of the variant it selects.
    by_name: Vec<Option<u64>>,
    /// For each index from 0, a hash of the discriminant of the variant it selects.
    by_index: Vec<u64>,
}

/// What the first meeting of an enum in a pass does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// Show the variant of name `names[j]`: serde-reflection records its format (under
    /// that name), and the guard its discriminant.
    Name(usize),
    /// Show the variant of index `k`: the guard records its discriminant.
    /// serde-reflection records its format under the enum's first name, which is
    /// ignored.
    Index(u32),
}

impl EnumTrail {
    /// What is left to learn, if anything: each name's variant, then each index's.
    fn next_task(&self) -> Option<Plan> {
        if let Some(j) = self.by_name.iter().position(Option::is_none) {
            return Some(Plan::Name(j));
        }
        let n_variants = self.by_name.iter().collect::<BTreeSet<_>>().len();
        if self.by_index.len() < n_variants {
            return u32::try_from(self.by_index.len()).ok().map(Plan::Index);
        }
        None
    }
}

impl Trail {
    fn start_pass(&mut self, routes: BTreeMap<&'static str, usize>) {
        self.met.clear();
        self.routes = routes;
        self.learned = false;
    }

    /// What to do on meeting enum `name`: `None` to let serde-reflection do as it
    /// pleases (which, for an enum met before in the pass, is showing index 0).
    fn plan(
        &mut self,
        name: &'static str,
        names: &'static [&'static str],
        rust_type: &'static str,
    ) -> Result<Option<Plan>, &'static str> {
        let known = self.enums.entry(name).or_insert_with(|| EnumTrail {
            rust_type,
            names,
            by_name: vec![None; names.len()],
            by_index: Vec::new(),
        });
        // serde-reflection keys its registry by serde name alone, so two enums of one
        // name (two instances of a generic enum, or `a::Kind` and `b::Kind`) would be
        // merged into a wrong registry, or make it panic.
        if known.rust_type != rust_type || known.names != names {
            return Err("two enums have the same serde name");
        }
        if self.met.contains_key(name) {
            return Ok(None);
        }
        let route = || Plan::Name(self.routes.get(name).copied().unwrap_or(0));
        let plan = known.next_task().unwrap_or_else(route);
        self.met.insert(name, plan);
        Ok(Some(plan))
    }

    /// Records the discriminant of the variant that `plan` showed.
    fn record(&mut self, name: &str, plan: Plan, discriminant: u64) -> Result<(), &'static str> {
        let Some(known) = self.enums.get_mut(name) else {
            return Err("an enum was forgotten");
        };
        let slot = match plan {
            Plan::Name(j) => known.by_name.get_mut(j),
            Plan::Index(k) => {
                let k = usize::try_from(k).map_err(|_| "a variant index is out of range")?;
                if known.by_index.len() == k {
                    known.by_index.push(discriminant);
                    self.learned = true;
                    return Ok(());
                }
                return match known.by_index.get(k) {
                    Some(seen) if *seen == discriminant => Ok(()),
                    _ => Err("an enum's variants changed between passes"),
                };
            }
        };
        match slot {
            Some(Some(seen)) if *seen == discriminant => Ok(()),
            Some(slot @ None) => {
                *slot = Some(discriminant);
                self.learned = true;
                Ok(())
            }
            _ => Err("an enum's variants changed between passes"),
        }
    }

    fn is_complete(&self) -> bool {
        self.enums.values().all(|known| known.next_task().is_none())
    }
}

/// What the passes of one trace have found, in our own formats.
#[derive(Default)]
struct Found {
    root: Option<Format>,
    /// Every container but enums, by name.
    structs: BTreeMap<String, Container>,
    /// The body of each enum's variant, by enum name and index of the variant's name.
    bodies: BTreeMap<String, BTreeMap<usize, Body>>,
}

impl Found {
    /// The body of the variant that enum `name`'s name `j` selects, if a pass showed it.
    fn body(&self, name: &str, j: usize) -> Option<&Body> {
        self.bodies.get(name)?.get(&j)
    }

    /// Adds what one pass found, and returns whether it was anything new. Refuses a
    /// pass whose root disagrees with an earlier one's.
    fn merge(&mut self, root: &Traced, registry: &Registry, trail: &Trail) -> Option<bool> {
        let root = Format::from_traced(root, 0)?;
        if self.root.get_or_insert_with(|| root.clone()) != &root {
            return None;
        }
        let mut grew = false;
        for (name, traced) in registry {
            let ContainerFormat::Enum(variants) = traced else {
                // Any other container reads the same in every pass that meets it.
                if !self.structs.contains_key(name) {
                    self.structs.insert(name.clone(), Container::from_traced(traced)?);
                    grew = true;
                }
                continue;
            };
            // Only a pass that showed a variant by name knows its format.
            let Some(Plan::Name(j)) = trail.met.get(name.as_str()).copied() else {
                continue;
            };
            if self.body(name, j).is_some() {
                continue;
            }
            let wanted = trail.enums.get(name.as_str())?.names.get(j)?;
            let variant = variants.values().find(|variant| variant.name == *wanted)?;
            let body = Body::from_traced(&variant.value)?;
            self.bodies.entry(name.clone()).or_default().insert(j, body);
            grew = true;
        }
        Some(grew)
    }

    /// For each enum with nothing left to learn, the first variant (by name) that leads
    /// to an enum that has.
    fn routes(&self, trail: &Trail) -> BTreeMap<&'static str, usize> {
        let mut routes = BTreeMap::new();
        for (name, known) in &trail.enums {
            if known.next_task().is_some() {
                continue;
            }
            let leads = |j: &usize| {
                let mut seen = BTreeSet::from([*name]);
                self.body(name, *j).is_some_and(|body| {
                    let mut names = Vec::new();
                    body.names(&mut names);
                    names.into_iter().any(|next| self.leads(next, trail, &mut seen))
                })
            };
            if let Some(j) = (0..known.names.len()).find(leads) {
                routes.insert(*name, j);
            }
        }
        routes
    }

    /// Whether container `name` is, or leads to, an enum with something left to learn.
    fn leads<'a>(&'a self, name: &'a str, trail: &'a Trail, seen: &mut BTreeSet<&'a str>) -> bool {
        if !seen.insert(name) {
            return false;
        }
        let mut names = Vec::new();
        match trail.enums.get(name) {
            Some(known) if known.next_task().is_some() => return true,
            Some(known) => {
                for j in 0..known.names.len() {
                    if let Some(body) = self.body(name, j) {
                        body.names(&mut names);
                    }
                }
            }
            None => match self.structs.get(name) {
                Some(container) => container.names(&mut names),
                None => return false,
            },
        }
        names.into_iter().any(|next| self.leads(next, trail, seen))
    }

    /// The shape, once every enum is known by name and by index.
    fn into_shape(mut self, trail: &Trail) -> Option<Shape> {
        let mut containers = std::mem::take(&mut self.structs);
        for (name, known) in &trail.enums {
            let mut variants = Vec::new();
            for discriminant in &known.by_index {
                let j = known.by_name.iter().position(|found| *found == Some(*discriminant))?;
                let body = self.body(name, j)?.clone();
                variants.push(Variant { name: checked_name(known.names.get(j)?)?, body });
            }
            // Every name must select a variant some index selects.
            let by_index: BTreeSet<u64> = known.by_index.iter().copied().collect();
            if !known.by_name.iter().all(|found| found.is_some_and(|it| by_index.contains(&it))) {
                return None;
            }
            if containers.insert(checked_name(name)?, Container::Enum(variants)).is_some() {
                return None;
            }
        }
        let shape = Shape { root: self.root?, containers };
        // Encoding and decoding the shape must give it back; anything that would not
        // (an overlong list, a reference to nothing) makes the type untraceable.
        Shape::decode(&shape.encode()).ok().filter(|decoded| *decoded == shape)
    }
}

/// A hash of the discriminant of `value`, to tell variants apart; the same for the
/// same variant within one process.
fn discriminant_hash<T>(value: &T) -> u64 {
    let mut hasher = DefaultHasher::new();
    std::mem::discriminant(value).hash(&mut hasher);
    hasher.finish()
}

/// Wraps each deserializer, visitor, seed and access of a trace, to bound its depth
/// and to choose the variant each enum shows.
///
/// serde-reflection's `Deserializer` creates the nested deserializers itself, so the
/// only way to reach them is to wrap what it hands to the type's `Deserialize`, and
/// what that hands back.
struct Guard<'t, X> {
    inner: X,
    trail: &'t RefCell<Trail>,
    depth: usize,
    /// The variant index to show instead of the name serde-reflection offers: set
    /// from the visitor of an enum planned as [`Plan::Index`] to the seed of its
    /// variant's identifier.
    variant: Option<u32>,
}

impl<'t, X> Guard<'t, X> {
    fn wrap<Y>(&self, inner: Y, depth: usize) -> Guard<'t, Y> {
        Guard { inner, trail: self.trail, depth, variant: None }
    }
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Guard<'_, S> {
    type Value = S::Value;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<S::Value, D::Error> {
        if let Some(index) = self.variant {
            let index: U32Deserializer<D::Error> = index.into_deserializer();
            return self.inner.deserialize(index);
        }
        let deserializer = self.wrap(deserializer, self.depth);
        self.inner.deserialize(deserializer)
    }
}

macro_rules! guard_deserialize {
    ($($method:ident($($arg:ident: $ty:ty),*);)*) => {$(
        fn $method<V: Visitor<'de>>(self, $($arg: $ty,)* visitor: V) -> Result<V::Value, D::Error> {
            if MAX_TRACE_DEPTH < self.depth {
                return Err(de::Error::custom("the type nests too deeply to trace"));
            }
            let visitor = self.wrap(visitor, self.depth);
            self.inner.$method($($arg,)* visitor)
        }
    )*};
}

impl<'de, D: de::Deserializer<'de>> de::Deserializer<'de> for Guard<'_, D> {
    type Error = D::Error;

    guard_deserialize! {
        deserialize_any();
        deserialize_bool();
        deserialize_i8();
        deserialize_i16();
        deserialize_i32();
        deserialize_i64();
        deserialize_i128();
        deserialize_u8();
        deserialize_u16();
        deserialize_u32();
        deserialize_u64();
        deserialize_u128();
        deserialize_f32();
        deserialize_f64();
        deserialize_char();
        deserialize_str();
        deserialize_string();
        deserialize_bytes();
        deserialize_byte_buf();
        deserialize_option();
        deserialize_unit();
        deserialize_unit_struct(name: &'static str);
        deserialize_newtype_struct(name: &'static str);
        deserialize_seq();
        deserialize_tuple(len: usize);
        deserialize_tuple_struct(name: &'static str, len: usize);
        deserialize_map();
        deserialize_struct(name: &'static str, fields: &'static [&'static str]);
        deserialize_identifier();
        deserialize_ignored_any();
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        if MAX_TRACE_DEPTH < self.depth {
            return Err(de::Error::custom("the type nests too deeply to trace"));
        }
        let rust_type = std::any::type_name::<V::Value>();
        let plan =
            self.trail.borrow_mut().plan(name, variants, rust_type).map_err(de::Error::custom)?;
        let mut visitor = self.wrap(visitor, self.depth);
        // serde-reflection shows the first name it is given that it has not shown yet,
        // and a fresh tracer has shown none: give it the one name to show.
        let offered = match plan {
            None => variants,
            Some(Plan::Name(j)) => variants.get(j..=j).unwrap_or_default(),
            Some(Plan::Index(k)) => {
                visitor.variant = Some(k);
                variants.get(..1).unwrap_or_default()
            }
        };
        let value = self.inner.deserialize_enum(name, offered, visitor)?;
        if let Some(plan) = plan {
            let discriminant = discriminant_hash(&value);
            self.trail.borrow_mut().record(name, plan, discriminant).map_err(de::Error::custom)?;
        }
        Ok(value)
    }

    fn is_human_readable(&self) -> bool {
        self.inner.is_human_readable()
    }
}

macro_rules! guard_visit {
    ($($method:ident($ty:ty);)*) => {$(
        fn $method<E: de::Error>(self, value: $ty) -> Result<V::Value, E> {
            self.inner.$method(value)
        }
    )*};
}

impl<'de, V: Visitor<'de>> Visitor<'de> for Guard<'_, V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.expecting(f)
    }

    guard_visit! {
        visit_bool(bool);
        visit_i8(i8);
        visit_i16(i16);
        visit_i32(i32);
        visit_i64(i64);
        visit_i128(i128);
        visit_u8(u8);
        visit_u16(u16);
        visit_u32(u32);
        visit_u64(u64);
        visit_u128(u128);
        visit_f32(f32);
        visit_f64(f64);
        visit_char(char);
        visit_str(&str);
        visit_borrowed_str(&'de str);
        visit_string(String);
        visit_bytes(&[u8]);
        visit_borrowed_bytes(&'de [u8]);
        visit_byte_buf(Vec<u8>);
    }

    fn visit_none<E: de::Error>(self) -> Result<V::Value, E> {
        self.inner.visit_none()
    }

    fn visit_unit<E: de::Error>(self) -> Result<V::Value, E> {
        self.inner.visit_unit()
    }

    fn visit_some<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<V::Value, D::Error> {
        let deserializer = self.wrap(deserializer, self.depth + 1);
        self.inner.visit_some(deserializer)
    }

    fn visit_newtype_struct<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<V::Value, D::Error> {
        let deserializer = self.wrap(deserializer, self.depth + 1);
        self.inner.visit_newtype_struct(deserializer)
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<V::Value, A::Error> {
        let seq = self.wrap(seq, self.depth + 1);
        self.inner.visit_seq(seq)
    }

    fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        let map = self.wrap(map, self.depth + 1);
        self.inner.visit_map(map)
    }

    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<V::Value, A::Error> {
        let mut data = self.wrap(data, self.depth + 1);
        data.variant = self.variant;
        self.inner.visit_enum(data)
    }
}

impl<'de, A: de::SeqAccess<'de>> de::SeqAccess<'de> for Guard<'_, A> {
    type Error = A::Error;

    fn next_element_seed<S: DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<Option<S::Value>, A::Error> {
        let seed = self.wrap(seed, self.depth);
        self.inner.next_element_seed(seed)
    }

    fn size_hint(&self) -> Option<usize> {
        self.inner.size_hint()
    }
}

impl<'de, A: de::MapAccess<'de>> de::MapAccess<'de> for Guard<'_, A> {
    type Error = A::Error;

    fn next_key_seed<S: DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<Option<S::Value>, A::Error> {
        let seed = self.wrap(seed, self.depth);
        self.inner.next_key_seed(seed)
    }

    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, A::Error> {
        let seed = self.wrap(seed, self.depth);
        self.inner.next_value_seed(seed)
    }

    fn size_hint(&self) -> Option<usize> {
        self.inner.size_hint()
    }
}

impl<'t, 'de, A: de::EnumAccess<'de>> de::EnumAccess<'de> for Guard<'t, A> {
    type Error = A::Error;
    type Variant = Guard<'t, A::Variant>;

    fn variant_seed<S: DeserializeSeed<'de>>(
        self,
        seed: S,
    ) -> Result<(S::Value, Guard<'t, A::Variant>), A::Error> {
        let mut seed = self.wrap(seed, self.depth);
        seed.variant = self.variant;
        let Guard { inner, trail, depth, variant: _ } = self;
        let (value, variant) = inner.variant_seed(seed)?;
        Ok((value, Guard { inner: variant, trail, depth, variant: None }))
    }
}

impl<'de, A: de::VariantAccess<'de>> de::VariantAccess<'de> for Guard<'_, A> {
    type Error = A::Error;

    fn unit_variant(self) -> Result<(), A::Error> {
        self.inner.unit_variant()
    }

    fn newtype_variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<S::Value, A::Error> {
        let seed = self.wrap(seed, self.depth);
        self.inner.newtype_variant_seed(seed)
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, A::Error> {
        let visitor = self.wrap(visitor, self.depth);
        self.inner.tuple_variant(len, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, A::Error> {
        let visitor = self.wrap(visitor, self.depth);
        self.inner.struct_variant(fields, visitor)
    }
}

// Conversion from serde-reflection's formats, which may change between its versions.

impl Container {
    /// Converts any container but an enum, whose variants the passes assemble.
    fn from_traced(traced: &ContainerFormat) -> Option<Container> {
        Some(match traced {
            ContainerFormat::UnitStruct => Container::Unit,
            ContainerFormat::NewTypeStruct(format) => {
                Container::Newtype(Format::from_traced(format, 0)?)
            }
            ContainerFormat::TupleStruct(formats) => Container::Tuple(formats_from(formats)?),
            ContainerFormat::Struct(fields) => Container::Struct(fields_from(fields)?),
            ContainerFormat::Enum(_) => return None,
        })
    }
}

impl Body {
    fn from_traced(traced: &VariantFormat) -> Option<Body> {
        Some(match traced {
            VariantFormat::Unit => Body::Unit,
            VariantFormat::NewType(format) => Body::Newtype(Format::from_traced(format, 0)?),
            VariantFormat::Tuple(formats) => Body::Tuple(formats_from(formats)?),
            VariantFormat::Struct(fields) => Body::Struct(fields_from(fields)?),
            VariantFormat::Variable(_) => return None,
        })
    }
}

impl Format {
    fn from_traced(traced: &Traced, depth: usize) -> Option<Format> {
        if MAX_DEPTH <= depth {
            return None;
        }
        let inner = |traced: &Traced| Format::from_traced(traced, depth + 1).map(Box::new);
        Some(match traced {
            Traced::Variable(_) => return None,
            Traced::TypeName(name) => Format::Named(checked_name(name)?),
            Traced::Unit => Format::Unit,
            Traced::Bool => Format::Bool,
            Traced::I8 => Format::I8,
            Traced::I16 => Format::I16,
            Traced::I32 => Format::I32,
            Traced::I64 => Format::I64,
            Traced::I128 => Format::I128,
            Traced::U8 => Format::U8,
            Traced::U16 => Format::U16,
            Traced::U32 => Format::U32,
            Traced::U64 => Format::U64,
            Traced::U128 => Format::U128,
            Traced::F32 => Format::F32,
            Traced::F64 => Format::F64,
            Traced::Char => Format::Char,
            Traced::Str => Format::Str,
            Traced::Bytes => Format::Bytes,
            Traced::Option(format) => Format::Option(inner(format)?),
            Traced::Seq(format) => Format::Seq(inner(format)?),
            Traced::Map { key, value } => Format::Map(inner(key)?, inner(value)?),
            Traced::Tuple(formats) => Format::Tuple(
                formats
                    .iter()
                    .map(|format| Format::from_traced(format, depth + 1))
                    .collect::<Option<_>>()?,
            ),
            Traced::TupleArray { content, size } => {
                Format::Array(inner(content)?, u64::try_from(*size).ok()?)
            }
        })
    }

    /// Pushes the names of the containers this format refers to.
    fn names<'a>(&'a self, out: &mut Vec<&'a str>) {
        match self {
            Format::Named(name) => out.push(name),
            Format::Option(inner) | Format::Seq(inner) | Format::Array(inner, _) => {
                inner.names(out);
            }
            Format::Map(key, value) => {
                key.names(out);
                value.names(out);
            }
            Format::Tuple(formats) => names_in(formats, out),
            _ => (),
        }
    }

    /// Whether the two formats are the same up to the containers they name, which
    /// must have the same names.
    fn same_outline(&self, other: &Format) -> bool {
        match (self, other) {
            (Format::Option(a), Format::Option(b)) | (Format::Seq(a), Format::Seq(b)) => {
                a.same_outline(b)
            }
            (Format::Map(a_key, a_value), Format::Map(b_key, b_value)) => {
                a_key.same_outline(b_key) && a_value.same_outline(b_value)
            }
            (Format::Tuple(a), Format::Tuple(b)) => {
                a.len() == b.len() && a.iter().zip(b).all(|(a, b)| a.same_outline(b))
            }
            (Format::Array(a, a_size), Format::Array(b, b_size)) => {
                a_size == b_size && a.same_outline(b)
            }
            // Every other format holds no other format, so equality is the outline.
            (a, b) => a == b,
        }
    }
}

impl Container {
    fn names<'a>(&'a self, out: &mut Vec<&'a str>) {
        match self {
            Container::Unit => (),
            Container::Newtype(format) => format.names(out),
            Container::Tuple(formats) => names_in(formats, out),
            Container::Struct(fields) => names_in_fields(fields, out),
            Container::Enum(variants) => {
                for variant in variants {
                    variant.body.names(out);
                }
            }
        }
    }
}

impl Body {
    fn names<'a>(&'a self, out: &mut Vec<&'a str>) {
        match self {
            Body::Unit => (),
            Body::Newtype(format) => format.names(out),
            Body::Tuple(formats) => names_in(formats, out),
            Body::Struct(fields) => names_in_fields(fields, out),
        }
    }

    fn same_outline(&self, other: &Body) -> bool {
        match (self, other) {
            (Body::Unit, Body::Unit) => true,
            (Body::Newtype(a), Body::Newtype(b)) => a.same_outline(b),
            (Body::Tuple(a), Body::Tuple(b)) => {
                a.len() == b.len() && a.iter().zip(b).all(|(a, b)| a.same_outline(b))
            }
            (Body::Struct(a), Body::Struct(b)) => {
                a.len() == b.len()
                    && a.iter()
                        .zip(b)
                        .all(|(a, b)| a.name == b.name && a.format.same_outline(&b.format))
            }
            _ => false,
        }
    }
}

fn names_in<'a>(formats: &'a [Format], out: &mut Vec<&'a str>) {
    for format in formats {
        format.names(out);
    }
}

fn names_in_fields<'a>(fields: &'a [Field], out: &mut Vec<&'a str>) {
    for field in fields {
        field.format.names(out);
    }
}

fn formats_from(formats: &[Traced]) -> Option<Vec<Format>> {
    formats.iter().map(|format| Format::from_traced(format, 0)).collect()
}

fn fields_from(fields: &[Named<Traced>]) -> Option<Vec<Field>> {
    fields
        .iter()
        .map(|field| {
            Some(Field {
                name: checked_name(&field.name)?,
                format: Format::from_traced(&field.value, 0)?,
            })
        })
        .collect()
}

/// The name, if it fits the encoding's 16-bit length.
fn checked_name(name: &str) -> Option<String> {
    u16::try_from(name.len()).is_ok().then(|| name.to_owned())
}

// Comparison.

/// One run of [`Shape::differences`]: the containers met so far, those still to
/// compare (by name, the same on both sides), and the messages.
struct Comparison<'a> {
    seen: BTreeSet<&'a str>,
    queue: VecDeque<&'a str>,
    out: Vec<String>,
}

impl<'a> Comparison<'a> {
    /// Compares two formats found at `place` ("field `x` of struct `S`"): either
    /// reports them whole, or queues the containers they both name.
    fn formats(&mut self, place: &str, old: &'a Format, new: &'a Format) {
        if !old.same_outline(new) {
            self.out.push(format!("{place} was `{old}`, is now `{new}`"));
            return;
        }
        let mut names = Vec::new();
        old.names(&mut names);
        for name in names {
            if self.seen.insert(name) {
                self.queue.push_back(name);
            }
        }
    }

    fn containers(&mut self, name: &str, old: &'a Container, new: &'a Container) {
        match (old, new) {
            (Container::Unit, Container::Unit) => (),
            (Container::Newtype(old), Container::Newtype(new)) => {
                self.formats(&format!("the content of newtype struct `{name}`"), old, new);
            }
            (Container::Tuple(old), Container::Tuple(new)) => {
                self.elements(&format!("tuple struct `{name}`"), old, new);
            }
            (Container::Struct(old), Container::Struct(new)) => {
                self.fields(&format!("struct `{name}`"), old, new);
            }
            (Container::Enum(old), Container::Enum(new)) => self.variants(name, old, new),
            _ => {
                let change = format!("type `{name}` changed from {} to {}", Kind(old), Kind(new));
                self.out.push(change);
            }
        }
    }

    fn elements(&mut self, owner: &str, old: &'a [Format], new: &'a [Format]) {
        if old.len() != new.len() {
            self.out.push(format!("{owner} changed from ({}) to ({})", List(old), List(new)));
            return;
        }
        for (idx, (old, new)) in old.iter().zip(new).enumerate() {
            self.formats(&format!("element {idx} of {owner}"), old, new);
        }
    }

    fn fields(&mut self, owner: &str, old: &'a [Field], new: &'a [Field]) {
        if has_repeats(old.iter().map(|field| &field.name))
            || has_repeats(new.iter().map(|field| &field.name))
        {
            // Names cannot tell such fields apart (serde lets a rename repeat a name):
            // compare them by position, which is how postcard lays them out.
            if old.len() != new.len() {
                self.out.push(format!("{owner} changed from {} to {}", Fields(old), Fields(new)));
                return;
            }
            for (idx, (old, new)) in old.iter().zip(new).enumerate() {
                if old.name != new.name {
                    let renamed = format!(
                        "field {idx} of {owner} was renamed from `{}` to `{}`",
                        old.name, new.name
                    );
                    self.out.push(renamed);
                }
                self.formats(&format!("field {idx} of {owner}"), &old.format, &new.format);
            }
            return;
        }
        let old_names: BTreeSet<&str> = old.iter().map(|field| field.name.as_str()).collect();
        let new_names: BTreeSet<&str> = new.iter().map(|field| field.name.as_str()).collect();
        // A field that kept its place and format but not its name was renamed.
        let mut renamed = BTreeSet::new();
        for (old, new) in old.iter().zip(new) {
            let is_rename = !new_names.contains(old.name.as_str())
                && !old_names.contains(new.name.as_str())
                && old.format.same_outline(&new.format);
            if is_rename {
                self.out
                    .push(format!("field `{}` of {owner} was renamed to `{}`", old.name, new.name));
                renamed.insert(old.name.as_str());
                renamed.insert(new.name.as_str());
            }
        }
        for field in old {
            if !new_names.contains(field.name.as_str()) && !renamed.contains(field.name.as_str()) {
                self.out.push(format!("{owner} lost field `{}: {}`", field.name, field.format));
            }
        }
        for field in new {
            if !old_names.contains(field.name.as_str()) && !renamed.contains(field.name.as_str()) {
                self.out.push(format!("{owner} gained field `{}: {}`", field.name, field.format));
            }
        }
        let old_kept: Vec<&str> = old
            .iter()
            .map(|field| field.name.as_str())
            .filter(|name| new_names.contains(name))
            .collect();
        let new_kept: Vec<&str> = new
            .iter()
            .map(|field| field.name.as_str())
            .filter(|name| old_names.contains(name))
            .collect();
        if old_kept != new_kept {
            self.out.push(format!(
                "the fields of {owner} were reordered from `{}` to `{}`",
                old_kept.join(", "),
                new_kept.join(", ")
            ));
        }
        for old in old {
            if let Some(new) = new.iter().find(|new| new.name == old.name) {
                self.formats(&format!("field `{}` of {owner}", old.name), &old.format, &new.format);
            }
        }
    }

    fn variants(&mut self, name: &str, old: &'a [Variant], new: &'a [Variant]) {
        let owner = format!("enum `{name}`");
        if has_repeats(old.iter().map(|variant| &variant.name))
            || has_repeats(new.iter().map(|variant| &variant.name))
        {
            // As for fields: by index, which is what postcard writes.
            if old.len() != new.len() {
                let change = format!("{owner} changed from {} to {}", Variants(old), Variants(new));
                self.out.push(change);
                return;
            }
            for (idx, (old, new)) in old.iter().zip(new).enumerate() {
                if old.name != new.name {
                    let renamed = format!(
                        "variant {idx} of {owner} was renamed from `{}` to `{}`",
                        old.name, new.name
                    );
                    self.out.push(renamed);
                }
                self.bodies(&format!("variant {idx} of {owner}"), &old.body, &new.body);
            }
            return;
        }
        let index_in = |variants: &[Variant], name: &str| {
            variants.iter().position(|variant| variant.name == name)
        };
        // A variant that kept its index and body but not its name was renamed.
        let mut renamed = BTreeSet::new();
        for (old_variant, new_variant) in old.iter().zip(new) {
            let is_rename = index_in(new, &old_variant.name).is_none()
                && index_in(old, &new_variant.name).is_none()
                && old_variant.body.same_outline(&new_variant.body);
            if is_rename {
                self.out.push(format!(
                    "variant `{}` of {owner} was renamed to `{}`",
                    old_variant.name, new_variant.name
                ));
                renamed.insert(old_variant.name.as_str());
                renamed.insert(new_variant.name.as_str());
            }
        }
        for (idx, variant) in old.iter().enumerate() {
            match index_in(new, &variant.name) {
                None if renamed.contains(variant.name.as_str()) => (),
                None => self.out.push(format!("{owner} lost variant `{}`", variant.name)),
                Some(new_idx) if new_idx != idx => self.out.push(format!(
                    "variant `{}` of {owner} moved from index {idx} to {new_idx}",
                    variant.name
                )),
                Some(_) => (),
            }
        }
        for variant in new {
            if index_in(old, &variant.name).is_none() && !renamed.contains(variant.name.as_str()) {
                self.out.push(format!("{owner} gained variant `{}`", variant.name));
            }
        }
        for old_variant in old {
            let Some(new_variant) = new.iter().find(|new| new.name == old_variant.name) else {
                continue;
            };
            let place = format!("variant `{}` of {owner}", old_variant.name);
            self.bodies(&place, &old_variant.body, &new_variant.body);
        }
    }

    fn bodies(&mut self, place: &str, old: &'a Body, new: &'a Body) {
        match (old, new) {
            (Body::Unit, Body::Unit) => (),
            (Body::Newtype(old), Body::Newtype(new)) => {
                self.formats(&format!("the content of {place}"), old, new);
            }
            (Body::Tuple(old), Body::Tuple(new)) => self.elements(place, old, new),
            (Body::Struct(old), Body::Struct(new)) => self.fields(place, old, new),
            (old, new) => self.out.push(format!("{place} changed from {old} to {new}")),
        }
    }
}

/// Whether some name appears twice among `names`.
fn has_repeats<'a>(names: impl Iterator<Item = &'a String>) -> bool {
    let mut seen = BTreeSet::new();
    let mut names = names;
    names.any(|name| !seen.insert(name))
}

// Encoding.

fn put_count(out: &mut Vec<u8>, count: usize) {
    // Shapes come from traced types or from decoded bytes, whose counts are `u32`s.
    out.extend_from_slice(&u32_bytes(u32::try_from(count).unwrap_or(u32::MAX)));
}

fn put_name(out: &mut Vec<u8>, name: &str) {
    // `checked_name` and `Reader::name` keep every name within 64 KiB.
    out.extend_from_slice(&u16::try_from(name.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
}

fn put_formats(out: &mut Vec<u8>, formats: &[Format]) {
    put_count(out, formats.len());
    for format in formats {
        put_format(out, format);
    }
}

fn put_fields(out: &mut Vec<u8>, fields: &[Field]) {
    put_count(out, fields.len());
    for field in fields {
        put_name(out, &field.name);
        put_format(out, &field.format);
    }
}

fn put_format(out: &mut Vec<u8>, format: &Format) {
    match format {
        Format::Unit => out.push(0),
        Format::Bool => out.push(1),
        Format::I8 => out.push(2),
        Format::I16 => out.push(3),
        Format::I32 => out.push(4),
        Format::I64 => out.push(5),
        Format::I128 => out.push(6),
        Format::U8 => out.push(7),
        Format::U16 => out.push(8),
        Format::U32 => out.push(9),
        Format::U64 => out.push(10),
        Format::U128 => out.push(11),
        Format::F32 => out.push(12),
        Format::F64 => out.push(13),
        Format::Char => out.push(14),
        Format::Str => out.push(15),
        Format::Bytes => out.push(16),
        Format::Option(inner) => {
            out.push(17);
            put_format(out, inner);
        }
        Format::Seq(inner) => {
            out.push(18);
            put_format(out, inner);
        }
        Format::Map(key, value) => {
            out.push(19);
            put_format(out, key);
            put_format(out, value);
        }
        Format::Tuple(formats) => {
            out.push(20);
            put_formats(out, formats);
        }
        Format::Array(inner, size) => {
            out.push(21);
            out.extend_from_slice(&u64_bytes(*size));
            put_format(out, inner);
        }
        Format::Named(name) => {
            out.push(22);
            put_name(out, name);
        }
    }
}

fn put_container(out: &mut Vec<u8>, container: &Container) {
    match container {
        Container::Unit => out.push(0),
        Container::Newtype(format) => {
            out.push(1);
            put_format(out, format);
        }
        Container::Tuple(formats) => {
            out.push(2);
            put_formats(out, formats);
        }
        Container::Struct(fields) => {
            out.push(3);
            put_fields(out, fields);
        }
        Container::Enum(variants) => {
            out.push(4);
            put_count(out, variants.len());
            for variant in variants {
                put_name(out, &variant.name);
                match &variant.body {
                    Body::Unit => out.push(0),
                    Body::Newtype(format) => {
                        out.push(1);
                        put_format(out, format);
                    }
                    Body::Tuple(formats) => {
                        out.push(2);
                        put_formats(out, formats);
                    }
                    Body::Struct(fields) => {
                        out.push(3);
                        put_fields(out, fields);
                    }
                }
            }
        }
    }
}

/// Reads a shape's bytes front to back.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], ShapeFault> {
        let (head, rest) = self.0.split_first_chunk::<N>().ok_or(ShapeFault::Truncated)?;
        self.0 = rest;
        Ok(*head)
    }

    /// A count of items, each of which takes at least one more byte: a count larger
    /// than what is left cannot be right, and is refused before anything is read.
    fn count(&mut self) -> Result<usize, ShapeFault> {
        let count = read_u32(&self.take::<4>()?).ok_or(ShapeFault::Truncated)?;
        let count = usize::try_from(count).map_err(|_| ShapeFault::Truncated)?;
        if self.0.len() < count {
            return Err(ShapeFault::Truncated);
        }
        Ok(count)
    }

    fn name(&mut self) -> Result<String, ShapeFault> {
        let len = usize::from(u16::from_be_bytes(self.take()?));
        let (name, rest) = self.0.split_at_checked(len).ok_or(ShapeFault::Truncated)?;
        self.0 = rest;
        String::from_utf8(name.to_vec()).map_err(|_| ShapeFault::Name)
    }

    fn format(&mut self, depth: usize) -> Result<Format, ShapeFault> {
        if MAX_DEPTH <= depth {
            return Err(ShapeFault::TooDeep);
        }
        let [tag] = self.take::<1>()?;
        Ok(match tag {
            0 => Format::Unit,
            1 => Format::Bool,
            2 => Format::I8,
            3 => Format::I16,
            4 => Format::I32,
            5 => Format::I64,
            6 => Format::I128,
            7 => Format::U8,
            8 => Format::U16,
            9 => Format::U32,
            10 => Format::U64,
            11 => Format::U128,
            12 => Format::F32,
            13 => Format::F64,
            14 => Format::Char,
            15 => Format::Str,
            16 => Format::Bytes,
            17 => Format::Option(Box::new(self.format(depth + 1)?)),
            18 => Format::Seq(Box::new(self.format(depth + 1)?)),
            19 => {
                let key = self.format(depth + 1)?;
                Format::Map(Box::new(key), Box::new(self.format(depth + 1)?))
            }
            20 => Format::Tuple(self.formats(depth + 1)?),
            21 => {
                let size = read_u64(&self.take::<8>()?).ok_or(ShapeFault::Truncated)?;
                Format::Array(Box::new(self.format(depth + 1)?), size)
            }
            22 => Format::Named(self.name()?),
            tag => return Err(ShapeFault::Tag(tag)),
        })
    }

    fn formats(&mut self, depth: usize) -> Result<Vec<Format>, ShapeFault> {
        let count = self.count()?;
        (0..count).map(|_| self.format(depth)).collect()
    }

    fn fields(&mut self) -> Result<Vec<Field>, ShapeFault> {
        let count = self.count()?;
        (0..count).map(|_| Ok(Field { name: self.name()?, format: self.format(0)? })).collect()
    }

    fn container(&mut self) -> Result<Container, ShapeFault> {
        let [tag] = self.take::<1>()?;
        Ok(match tag {
            0 => Container::Unit,
            1 => Container::Newtype(self.format(0)?),
            2 => Container::Tuple(self.formats(0)?),
            3 => Container::Struct(self.fields()?),
            4 => {
                let count = self.count()?;
                let mut variants = Vec::new();
                for _ in 0..count {
                    let name = self.name()?;
                    let [tag] = self.take::<1>()?;
                    let body = match tag {
                        0 => Body::Unit,
                        1 => Body::Newtype(self.format(0)?),
                        2 => Body::Tuple(self.formats(0)?),
                        3 => Body::Struct(self.fields()?),
                        tag => return Err(ShapeFault::Tag(tag)),
                    };
                    variants.push(Variant { name, body });
                }
                Container::Enum(variants)
            }
            tag => return Err(ShapeFault::Tag(tag)),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::{BTreeMap, HashMap, HashSet},
        marker::PhantomData,
        num::NonZeroU32,
        time::{Duration, SystemTime},
    };

    use serde::Deserialize;

    use super::*;

    type Res = Result<(), String>;

    fn shape<T: DeserializeOwned>() -> Result<Shape, String> {
        Shape::of::<T>()
            .ok_or_else(|| format!("`{}` could not be traced", std::any::type_name::<T>()))
    }

    fn differences<Old: DeserializeOwned, New: DeserializeOwned>() -> Result<Vec<String>, String> {
        Ok(Shape::differences(&shape::<Old>()?, &shape::<New>()?))
    }

    /// Two versions of the same types, as two builds of a program would declare them.
    #[allow(dead_code, reason = "the types are only traced, never built")]
    mod v1 {
        use serde::Deserialize;

        #[derive(Deserialize)]
        pub(super) struct S {
            pub(super) offset: i32,
        }

        #[derive(Deserialize)]
        pub(super) struct Fields {
            a: u8,
            b: String,
            c: Vec<u16>,
        }

        #[derive(Deserialize)]
        pub(super) enum E {
            A,
            B(u8),
            C { x: u8 },
        }

        #[derive(Deserialize)]
        pub(super) struct Holder {
            e: Vec<E>,
            inner: Inner,
        }

        #[derive(Deserialize)]
        pub(super) struct Inner(pub(super) (u8, u16));
    }

    #[allow(dead_code, reason = "the types are only traced, never built")]
    mod v2 {
        use serde::Deserialize;

        #[derive(Deserialize)]
        pub(super) struct S {
            pub(super) offset: u32,
        }

        #[derive(Deserialize)]
        #[serde(rename = "Fields")]
        pub(super) struct Added {
            a: u8,
            b: String,
            c: Vec<u16>,
            extra: u64,
        }

        #[derive(Deserialize)]
        #[serde(rename = "Fields")]
        pub(super) struct Removed {
            a: u8,
            c: Vec<u16>,
        }

        #[derive(Deserialize)]
        #[serde(rename = "Fields")]
        pub(super) struct Renamed {
            a: u8,
            bee: String,
            c: Vec<u16>,
        }

        #[derive(Deserialize)]
        #[serde(rename = "Fields")]
        pub(super) struct Reordered {
            b: String,
            a: u8,
            c: Vec<u16>,
        }

        #[derive(Deserialize)]
        #[serde(rename = "E")]
        pub(super) enum Gained {
            A,
            B(u8),
            C { x: u8 },
            D,
        }

        #[derive(Deserialize)]
        #[serde(rename = "E")]
        pub(super) enum Changed {
            A { x: u8 },
            B(u16),
            C { x: u8, y: i8 },
        }

        #[derive(Deserialize)]
        #[serde(rename = "E")]
        pub(super) enum Lost {
            A,
            C { x: u8 },
        }

        #[derive(Deserialize)]
        pub(super) struct Holder {
            e: Vec<Changed>,
            inner: Inner,
        }

        #[derive(Deserialize)]
        pub(super) struct Inner(pub(super) (u8, u32));
    }

    #[test]
    fn a_changed_field_type_is_described() -> Res {
        let (old, new) = (shape::<v1::S>()?, shape::<v2::S>()?);
        assert_ne!(old, new);
        assert_ne!(old.checksum(), new.checksum());
        assert_eq!(old.to_string(), "S { offset: i32 }");
        assert_eq!(
            Shape::differences(&old, &new),
            ["field `offset` of struct `S` was `i32`, is now `u32`"]
        );
        assert_eq!(Shape::differences(&old, &old), Vec::<String>::new());
        Ok(())
    }

    #[test]
    fn added_removed_renamed_and_reordered_fields_are_described() -> Res {
        type Fields = v1::Fields;
        assert_eq!(
            differences::<Fields, v2::Removed>()?,
            ["struct `Fields` lost field `b: String`"]
        );
        assert_eq!(
            differences::<Fields, v2::Renamed>()?,
            ["field `b` of struct `Fields` was renamed to `bee`"]
        );
        assert_eq!(
            differences::<Fields, v2::Reordered>()?,
            ["the fields of struct `Fields` were reordered from `a, b, c` to `b, a, c`"]
        );
        assert_eq!(
            differences::<Fields, v2::Added>()?,
            ["struct `Fields` gained field `extra: u64`"]
        );
        // A container of another name is another type.
        assert_eq!(differences::<Fields, v2::S>()?, ["the type was `Fields`, is now `S`"]);
        Ok(())
    }

    #[test]
    fn enum_variants_gained_lost_and_changed_are_described() -> Res {
        assert_eq!(differences::<v1::E, v2::Gained>()?, ["enum `E` gained variant `D`"]);
        assert_eq!(
            differences::<v1::E, v2::Lost>()?,
            ["enum `E` lost variant `B`", "variant `C` of enum `E` moved from index 2 to 1"]
        );
        assert_eq!(
            differences::<v1::E, v2::Changed>()?,
            [
                "variant `A` of enum `E` changed from unit to struct { x: u8 }",
                "the content of variant `B` of enum `E` was `u8`, is now `u16`",
                "variant `C` of enum `E` gained field `y: i8`",
            ]
        );
        assert_eq!(shape::<v1::E>()?.to_string(), "enum E { A, B(u8), C { x: u8 } }");
        Ok(())
    }

    #[test]
    fn containers_nested_anywhere_are_compared() -> Res {
        assert_eq!(
            differences::<v1::Holder, v2::Holder>()?,
            [
                "variant `A` of enum `E` changed from unit to struct { x: u8 }",
                "the content of variant `B` of enum `E` was `u8`, is now `u16`",
                "variant `C` of enum `E` gained field `y: i8`",
                "the content of newtype struct `Inner` was `(u8, u16)`, is now `(u8, u32)`",
            ]
        );
        Ok(())
    }

    #[test]
    fn a_changed_root_is_described() -> Res {
        assert_eq!(differences::<i32, String>()?, ["the type was `i32`, is now `String`"]);
        assert_eq!(
            differences::<Vec<v1::S>, Vec<v2::S>>()?,
            ["field `offset` of struct `S` was `i32`, is now `u32`"]
        );
        Ok(())
    }

    #[test]
    fn wrapped_renamed_and_rekinded_types_are_described() -> Res {
        #[derive(Deserialize)]
        #[serde(rename = "Event")]
        #[allow(dead_code, reason = "only traced")]
        struct Bare {
            at: u64,
        }
        #[derive(Deserialize)]
        #[serde(rename = "Event")]
        #[allow(dead_code, reason = "only traced")]
        struct Wrapped {
            at: Timestamp,
        }
        #[derive(Deserialize)]
        #[serde(rename = "Event")]
        #[allow(dead_code, reason = "only traced")]
        enum Kinded {
            At(u64),
        }
        #[derive(Deserialize)]
        #[serde(rename = "E")]
        #[allow(dead_code, reason = "only traced")]
        enum Renamed {
            A,
            Bee(u8),
            C { x: u8 },
        }
        // postcard writes both the same way, but the shapes tell them apart.
        assert_eq!(
            differences::<Bare, Wrapped>()?,
            ["field `at` of struct `Event` was `u64`, is now `Timestamp`"]
        );
        assert_eq!(
            differences::<Bare, Kinded>()?,
            ["type `Event` changed from struct { at: u64 } to enum { At(u64) }"]
        );
        assert_eq!(
            differences::<v1::E, Renamed>()?,
            ["variant `B` of enum `E` was renamed to `Bee`"]
        );
        Ok(())
    }

    #[test]
    fn at_most_five_differences_are_reported() -> Res {
        #[derive(Deserialize)]
        #[serde(rename = "Many")]
        #[allow(dead_code, reason = "only traced")]
        struct Old(u8, u8, u8, u8, u8, u8, u8, String);
        #[derive(Deserialize)]
        #[serde(rename = "Many")]
        #[allow(dead_code, reason = "only traced")]
        struct New(i8, i8, i8, i8, i8, i8, i8, String);
        let found = differences::<Old, New>()?;
        assert_eq!(found.len(), MAX_DIFFERENCES);
        assert_eq!(
            found.first().map(String::as_str),
            Some("element 0 of tuple struct `Many` was `u8`, is now `i8`")
        );
        Ok(())
    }

    #[derive(Deserialize)]
    #[allow(dead_code, reason = "only traced")]
    struct Everything {
        unit: (),
        flag: bool,
        small: (i8, i16, i64, i128),
        large: (u8, u16, u32, u64, u128),
        real: (f32, f64),
        letter: char,
        text: String,
        boxed: Box<str>,
        maybe: Option<Box<u32>>,
        list: Vec<u8>,
        sorted: BTreeMap<String, Vec<u16>>,
        hashed: HashMap<u32, Option<String>>,
        set: HashSet<char>,
        pair: (u8, u8),
        array: [u16; 3],
        single: (u8,),
        time: Duration,
        when: SystemTime,
        id: NonZeroU32,
        marker: PhantomData<u8>,
        by_name: Timestamp,
    }

    #[derive(Deserialize)]
    #[allow(dead_code, reason = "only traced")]
    struct Timestamp(u64);

    #[test]
    fn std_types_trace() -> Res {
        let found = shape::<Everything>()?;
        assert_eq!(
            found.to_string(),
            "Everything { unit: (), flag: bool, small: (i8, i16, i64, i128), \
             large: (u8, u16, u32, u64, u128), real: (f32, f64), letter: char, text: String, \
             boxed: String, maybe: Option<u32>, list: Vec<u8>, sorted: Map<String, Vec<u16>>, \
             hashed: Map<u32, Option<String>>, set: Vec<char>, pair: [u8; 2], array: [u16; 3], \
             single: (u8,), time: Duration, when: SystemTime, id: u32, marker: PhantomData, \
             by_name: Timestamp }"
        );
        assert_eq!(
            format!("{found:#}").lines().skip(1).collect::<Vec<_>>(),
            [
                "Duration { secs: u64, nanos: u32 }",
                "PhantomData",
                "SystemTime { secs_since_epoch: u64, nanos_since_epoch: u32 }",
                "Timestamp(u64)",
            ]
        );
        Ok(())
    }

    #[test]
    fn serde_attributes_are_what_serde_reads() -> Res {
        #[derive(Deserialize)]
        #[serde(rename = "Other")]
        #[allow(dead_code, reason = "only traced")]
        struct Attributes {
            #[serde(rename = "renamed")]
            field: u8,
            #[serde(default)]
            defaulted: u16,
            #[serde(skip)]
            skipped: u32,
            #[serde(skip_deserializing)]
            not_read: u64,
            #[serde(with = "as_text")]
            custom: u8,
        }
        mod as_text {
            pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(
                deserializer: D,
            ) -> Result<u8, D::Error> {
                let text: String = serde::Deserialize::deserialize(deserializer)?;
                Ok(u8::try_from(text.len()).unwrap_or(0))
            }
        }
        assert_eq!(
            shape::<Attributes>()?.to_string(),
            "Other { renamed: u8, defaulted: u16, custom: String }"
        );
        Ok(())
    }

    #[derive(Deserialize)]
    #[allow(dead_code, reason = "only traced")]
    struct Tree {
        value: u32,
        children: Vec<Tree>,
        parent: Option<Box<Tree>>,
    }

    #[derive(Deserialize)]
    #[allow(dead_code, reason = "only traced")]
    enum Expr {
        Literal(i64),
        Add(Box<Expr>, Box<Expr>),
        Let { name: String, value: Box<Expr>, body: Box<Expr> },
    }

    #[derive(Deserialize)]
    #[allow(dead_code, reason = "only traced")]
    enum FirstVariantRecurses {
        Add(Box<FirstVariantRecurses>, Box<FirstVariantRecurses>),
        Literal(i64),
    }

    #[test]
    fn recursive_types_trace() -> Res {
        assert_eq!(
            shape::<Tree>()?.to_string(),
            "Tree { value: u32, children: Vec<Tree>, parent: Option<Tree> }"
        );
        assert_eq!(
            shape::<Expr>()?.to_string(),
            "enum Expr { Literal(i64), Add(Expr, Expr), Let { name: String, value: Expr, body: Expr } }"
        );
        // serde-reflection recurses forever on this one; the depth guard stops it.
        assert_eq!(Shape::of::<FirstVariantRecurses>(), None);
        Ok(())
    }

    #[derive(Deserialize)]
    #[allow(dead_code, reason = "only traced")]
    struct Outer {
        list: Vec<First>,
        by_key: BTreeMap<u8, Third>,
    }

    #[derive(Deserialize)]
    #[allow(dead_code, reason = "only traced")]
    enum First {
        Empty,
        Holds(Option<Box<Second>>),
    }

    #[derive(Deserialize)]
    #[allow(dead_code, reason = "only traced")]
    enum Second {
        Nothing,
        Many(Vec<Third>),
        Pair(First, Box<Second>),
    }

    #[derive(Deserialize)]
    #[allow(dead_code, reason = "only traced")]
    enum Third {
        M,
        N(u8),
        O { z: i8 },
    }

    #[test]
    fn enums_inside_collections_show_every_variant() -> Res {
        // serde-reflection alone leaves all three enums with one variant here.
        assert_eq!(
            format!("{:#}", shape::<Outer>()?),
            "Outer { list: Vec<First>, by_key: Map<u8, Third> }\n\
             enum First { Empty, Holds(Option<Second>) }\n\
             enum Second { Nothing, Many(Vec<Third>), Pair(First, Second) }\n\
             enum Third { M, N(u8), O { z: i8 } }"
        );
        assert_eq!(shape::<Option<Vec<Third>>>()?.to_string(), "Option<Vec<Third>>",);
        Ok(())
    }

    #[test]
    fn variants_are_in_the_order_postcard_numbers_them() -> Res {
        #[derive(Deserialize, serde::Serialize)]
        #[serde(rename = "Kind")]
        enum Kind {
            #[serde(alias = "Old", alias = "Older")]
            First,
            #[serde(rename = "second")]
            Second(u8),
            Third {
                x: u8,
            },
        }
        #[derive(Deserialize)]
        #[allow(dead_code, reason = "only traced")]
        enum Aliased {
            #[serde(alias = "Aardvark")]
            Zebra,
        }
        let found = shape::<Kind>()?;
        assert_eq!(found.to_string(), "enum Kind { First, second(u8), Third { x: u8 } }");
        // Nothing tells a variant's name from its aliases: the first in byte order names it.
        assert_eq!(shape::<Aliased>()?.to_string(), "enum Aliased { Aardvark }");
        let Some(Container::Enum(variants)) = found.containers.get("Kind") else {
            return Err(format!("`Kind` is not an enum in {found}"));
        };
        for (value, name) in
            [(Kind::First, "First"), (Kind::Second(1), "second"), (Kind::Third { x: 1 }, "Third")]
        {
            let bytes = postcard::to_stdvec(&value).map_err(|err| err.to_string())?;
            let index = variants.iter().position(|variant| variant.name == name);
            assert_eq!(bytes.first().map(|it| usize::from(*it)), index, "variant {name}");
        }
        Ok(())
    }

    #[derive(Deserialize)]
    #[allow(dead_code, reason = "only traced")]
    struct Generic<T> {
        value: T,
    }

    #[derive(Deserialize)]
    #[allow(dead_code, reason = "only traced")]
    enum GenericEnum<T> {
        Some(T),
        None,
    }

    #[test]
    fn instances_of_a_generic_type_differ() -> Res {
        assert_eq!(
            differences::<Generic<u8>, Generic<String>>()?,
            ["field `value` of struct `Generic` was `u8`, is now `String`"]
        );
        assert_eq!(
            differences::<GenericEnum<u8>, GenericEnum<Tree>>()?,
            ["the content of variant `Some` of enum `GenericEnum` was `u8`, is now `Tree`"]
        );
        Ok(())
    }

    #[test]
    fn types_serde_reflection_cannot_follow_are_not_traced() {
        #[derive(Deserialize)]
        #[allow(dead_code, reason = "only traced")]
        struct Flattened {
            a: u8,
            #[serde(flatten)]
            rest: Generic<u8>,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        #[allow(dead_code, reason = "only traced")]
        enum Untagged {
            Number(u8),
            Text(String),
        }
        #[derive(Deserialize)]
        #[serde(tag = "kind")]
        #[allow(dead_code, reason = "only traced")]
        enum Internal {
            A { x: u8 },
        }
        #[derive(Deserialize)]
        #[serde(tag = "kind", content = "value")]
        #[allow(dead_code, reason = "only traced")]
        enum Adjacent {
            A(u8),
        }
        #[derive(Deserialize)]
        #[allow(dead_code, reason = "only traced")]
        struct TwoInstances {
            a: Generic<u8>,
            b: Generic<String>,
        }
        #[derive(Deserialize)]
        #[allow(dead_code, reason = "only traced")]
        struct TwoEnumInstances {
            a: GenericEnum<u8>,
            b: GenericEnum<u8>,
            c: GenericEnum<PhantomData<u16>>,
        }
        mod a {
            #[derive(serde::Deserialize)]
            pub(super) enum Kind {
                X,
            }
        }
        mod b {
            #[derive(serde::Deserialize)]
            pub(super) enum Kind {
                X,
            }
        }
        #[derive(Deserialize)]
        #[allow(dead_code, reason = "only traced")]
        struct SameName {
            a: a::Kind,
            b: b::Kind,
        }
        #[derive(Deserialize)]
        #[allow(dead_code, reason = "only traced")]
        struct FieldAlias {
            #[serde(alias = "zz")]
            a: u8,
            b: String,
        }
        #[derive(Deserialize)]
        #[allow(dead_code, reason = "only traced")]
        enum Empty {}
        struct Rejects;
        impl<'de> Deserialize<'de> for Rejects {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let n = u8::deserialize(deserializer)?;
                Err(serde::de::Error::custom(format!("{n} is not allowed")))
            }
        }
        struct Panics;
        impl<'de> Deserialize<'de> for Panics {
            fn deserialize<D: serde::Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
                panic!("this Deserialize panics on purpose")
            }
        }

        assert_eq!(Shape::of::<Flattened>(), None);
        assert_eq!(Shape::of::<Untagged>(), None);
        assert_eq!(Shape::of::<Internal>(), None);
        assert_eq!(Shape::of::<Adjacent>(), None);
        assert_eq!(Shape::of::<TwoInstances>(), None);
        assert_eq!(Shape::of::<TwoEnumInstances>(), None);
        assert_eq!(Shape::of::<SameName>(), None);
        // serde lists a field's aliases among the struct's fields, and serde-reflection
        // takes them for more fields.
        assert_eq!(Shape::of::<FieldAlias>(), None);
        assert_eq!(Shape::of::<Empty>(), None);
        assert_eq!(Shape::of::<Rejects>(), None);
        assert_eq!(Shape::of::<Panics>(), None);
    }

    #[test]
    fn tracing_is_deterministic_and_round_trips() -> Res {
        for found in
            [shape::<Everything>()?, shape::<v2::Holder>()?, shape::<Expr>()?, shape::<u8>()?]
        {
            let bytes = found.encode();
            assert_eq!(bytes.first(), Some(&SHAPE_VERSION));
            assert_eq!(Shape::decode(&bytes), Ok(found.clone()));
            assert_eq!(bytes, found.encode());
        }
        assert_eq!(shape::<Everything>()?.encode(), shape::<Everything>()?.encode());
        assert_eq!(shape::<Tree>()?.checksum(), shape::<Tree>()?.checksum());
        Ok(())
    }

    #[test]
    fn every_truncation_is_refused() -> Res {
        let bytes = shape::<v2::Holder>()?.encode();
        for len in 0..bytes.len() {
            let res = Shape::decode(bytes.get(..len).unwrap_or_default());
            assert!(res.is_err(), "a shape cut to {len} bytes decoded");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(Shape::decode(&longer), Err(ShapeFault::TrailingBytes));
        Ok(())
    }

    #[test]
    fn bit_flips_are_refused_or_decode_canonically() -> Res {
        let original = shape::<Everything>()?;
        let bytes = original.encode();
        for bit in 0..bytes.len() * 8 {
            let mut flipped = bytes.clone();
            if let Some(byte) = flipped.get_mut(bit / 8) {
                *byte ^= 1 << (bit % 8);
            }
            // A flip may land on something that still decodes (a letter in a name);
            // then the shape must encode back to the same bytes.
            if let Ok(decoded) = Shape::decode(&flipped) {
                assert_eq!(decoded.encode(), flipped, "flipping bit {bit}");
                let found = Shape::differences(&original, &decoded);
                assert_eq!(found.is_empty(), original == decoded, "flipping bit {bit}: {found:?}");
            }
        }
        Ok(())
    }

    #[test]
    fn random_bytes_never_panic() {
        // xorshift64: a fixed sequence, so that a failure repeats.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..5000 {
            let len = usize::try_from(next() % 64).unwrap_or(0);
            // Bytes below 24 are valid tags, so that decoding gets somewhere.
            let mut bytes: Vec<u8> = (0..len).map(|_| (next() % 24).to_le_bytes()[0]).collect();
            if let Some(first) = bytes.first_mut() {
                *first = SHAPE_VERSION;
            }
            if let Ok(decoded) = Shape::decode(&bytes) {
                assert_eq!(decoded.encode(), bytes);
                let _ = (decoded.to_string(), Shape::differences(&decoded, &decoded));
            }
        }
    }

    #[test]
    fn malformed_shapes_are_refused() {
        let named = |name: &str| {
            let mut out = vec![22];
            put_name(&mut out, name);
            out
        };
        // Version, then the root format, then the containers.
        assert_eq!(Shape::decode(&[]), Err(ShapeFault::Truncated));
        assert_eq!(Shape::decode(&[2, 0, 0, 0, 0, 0]), Err(ShapeFault::Version(2)));
        assert_eq!(Shape::decode(&[1, 99, 0, 0, 0, 0]), Err(ShapeFault::Tag(99)));
        assert_eq!(
            Shape::decode(&[1, 0, 0, 0, 0, 0]),
            Ok(Shape { root: Format::Unit, containers: BTreeMap::new() })
        );
        let dangling = [&[1][..], &named("S"), &[0, 0, 0, 0]].concat();
        assert_eq!(Shape::decode(&dangling), Err(ShapeFault::Dangling));
        let not_utf8 = [&[1, 22, 0, 1, 0xff][..], &[0, 0, 0, 0]].concat();
        assert_eq!(Shape::decode(&not_utf8), Err(ShapeFault::Name));
        let unit = |name: &str| {
            let mut out = Vec::new();
            put_name(&mut out, name);
            out.push(0);
            out
        };
        let in_order = [&[1][..], &named("A"), &[0, 0, 0, 2], &unit("A"), &unit("B")].concat();
        assert!(Shape::decode(&in_order).is_ok());
        let out_of_order = [&[1][..], &named("A"), &[0, 0, 0, 2], &unit("B"), &unit("A")].concat();
        assert_eq!(Shape::decode(&out_of_order), Err(ShapeFault::Order));
        let twice = [&[1][..], &named("A"), &[0, 0, 0, 2], &unit("A"), &unit("A")].concat();
        assert_eq!(Shape::decode(&twice), Err(ShapeFault::Order));
        // A count of four billion is refused before any allocation.
        assert_eq!(Shape::decode(&[1, 20, 0xff, 0xff, 0xff, 0xff, 0]), Err(ShapeFault::Truncated));
        let deep = [vec![1], vec![17; MAX_DEPTH], vec![0, 0, 0, 0, 0]].concat();
        assert_eq!(Shape::decode(&deep), Err(ShapeFault::TooDeep));
        let shallow = [vec![1], vec![17; MAX_DEPTH - 1], vec![0, 0, 0, 0, 0]].concat();
        assert!(Shape::decode(&shallow).is_ok());
    }

    #[test]
    fn repeated_names_are_compared_by_position() {
        // Found by the fuzz target `store_meta`: names matched the wrong fields, so
        // a shape differed from itself.
        let shape = |second: Format| Shape {
            root: Format::Named("S".into()),
            containers: BTreeMap::from([(
                "S".into(),
                Container::Struct(vec![
                    Field { name: "a".into(), format: Format::U8 },
                    Field { name: "a".into(), format: second },
                ]),
            )]),
        };
        let (old, new) = (shape(Format::I32), shape(Format::U32));
        assert_eq!(Shape::differences(&old, &old.clone()), Vec::<String>::new());
        assert_eq!(
            Shape::differences(&old, &new),
            vec!["field 1 of struct `S` was `i32`, is now `u32`".to_owned()]
        );
    }

    #[test]
    fn an_old_type_under_a_new_name_compares_renamed() {
        mod before {
            #[derive(serde::Deserialize)]
            pub(super) enum Command {
                Deposit { amount: i64, to: Account },
                Close(Account),
            }
            #[derive(serde::Deserialize)]
            pub(super) struct Account {
                pub(super) id: u32,
            }
        }
        #[derive(serde::Deserialize)]
        enum CommandV1 {
            Deposit { amount: i64, to: AccountV1 },
            Close(AccountV1),
        }
        #[derive(serde::Deserialize)]
        struct AccountV1 {
            id: u32,
        }
        #[derive(serde::Deserialize)]
        enum Drifted {
            Deposit { amount: u64, to: AccountV1 },
            Close(AccountV1),
        }
        let (Some(stored), Some(kept), Some(drifted)) =
            (Shape::of::<before::Command>(), Shape::of::<CommandV1>(), Shape::of::<Drifted>())
        else {
            panic!("the types trace")
        };
        let _ = (before::Command::Close, before::Account { id: 0 }.id);
        assert!(!Shape::differences(&stored, &kept).is_empty(), "plainly, the names differ");
        assert_eq!(kept.renamed_like(&stored), stored);
        let changes = Shape::differences(&stored, &drifted.renamed_like(&stored));
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert!(
            changes.iter().all(|it| it.contains("amount") && !it.contains("Drifted")),
            "{changes:?}"
        );
    }
}
