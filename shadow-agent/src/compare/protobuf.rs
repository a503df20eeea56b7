//! Protobuf messages read from the wire format into the value tree JSON bodies are compared in,
//! so that noise is learned per field and the report shows field paths exactly as for JSON.
//!
//! Without a schema a message is an object keyed by field number (`$[0].2.1`); a field seen
//! more than once is a list; a length-delimited field is a nested message when it parses whole
//! as one, else a UTF-8 string, else bytes (as `protoc --decode_raw` reads them). With a
//! descriptor set ([`Schema`]) fields are named, typed (signed, zig-zag, floating, enum names,
//! packed lists) and repeated fields are always lists; unknown fields keep their numbers.
//!
//! Bytes come from the network: nothing here panics on them. Nesting is bounded by
//! [`MAX_NESTING`], and the bytes scanned by trying length-delimited fields as messages by a
//! budget of [`WORK_PER_BYTE`] times the input, so hostile input costs at most a constant
//! factor of its length. Groups (deprecated wire types 3 and 4) are not read: a message holding
//! one does not parse, and is compared by its bytes.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::{DefaultHasher, Hash, Hasher};

use prost::Message as _;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorSet};
use serde_json::{Map, Number, Value};

/// Messages nested in messages, at most; deeper length-delimited fields are strings or bytes.
pub const MAX_NESTING: usize = 24;
/// Bytes scanned per input byte, at most, trying length-delimited fields as messages.
pub const WORK_PER_BYTE: usize = 8;
/// Distinct fields of a message found by a scan; beyond, by a map.
const SCANNED_FIELDS: usize = 16;
/// Bytes shown as hex; longer byte strings are shown by length and hash.
const HEX_BYTES: usize = 24;
/// A descriptor set larger than this is refused at load (real ones are kilobytes).
pub const MAX_DESCRIPTOR_BYTES: usize = 64 * 1024 * 1024;

/// Why a descriptor set cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error(
        "not a serialized google.protobuf.FileDescriptorSet (write one with `protoc --include_imports --descriptor_set_out=api.pb`): {0}"
    )]
    Decode(#[from] prost::DecodeError),
    #[error("larger than {MAX_DESCRIPTOR_BYTES} bytes")]
    TooLarge,
    #[error("defines no service: the methods' response types come from the service definitions")]
    NoServices,
    #[error(
        "type `{type_name}` used by `{user}` is not in the set: write it with `protoc --include_imports`"
    )]
    Unresolved { type_name: String, user: String },
}

/// What a field holds, as its descriptor says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Double,
    Float,
    Int64,
    UInt64,
    Int32,
    UInt32,
    SInt32,
    SInt64,
    Fixed64,
    Fixed32,
    SFixed64,
    SFixed32,
    Bool,
    String,
    Bytes,
    /// An index into [`Schema::enums`].
    Enum(usize),
    /// An index into [`Schema::messages`].
    Message(usize),
}

impl Kind {
    /// Whether a repeated field of this kind may come packed (one length-delimited record).
    fn packable(self) -> bool {
        !matches!(self, Kind::String | Kind::Bytes | Kind::Message(_))
    }
}

#[derive(Clone, Debug)]
struct FieldType {
    name: String,
    kind: Kind,
    repeated: bool,
}

#[derive(Clone, Debug, Default)]
struct MessageType {
    fields: HashMap<u32, FieldType>,
}

/// The messages and methods of a `FileDescriptorSet`, resolved once at load.
#[derive(Clone, Debug, Default)]
pub struct Schema {
    messages: Vec<MessageType>,
    enums: Vec<HashMap<i32, String>>,
    /// `package.Service/Method` to its (request, response) message types.
    methods: HashMap<String, (usize, usize)>,
}

/// A message type of a [`Schema`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TypeRef(usize);

impl Schema {
    /// Reads a serialized `FileDescriptorSet`, every type the services use resolved.
    ///
    /// # Errors
    /// When the bytes are not a descriptor set, it has no service, or a type it names is not
    /// in it (written without `--include_imports`).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SchemaError> {
        if bytes.len() > MAX_DESCRIPTOR_BYTES {
            return Err(SchemaError::TooLarge);
        }
        let set = FileDescriptorSet::decode(bytes)?;
        Self::from_set(&set)
    }

    /// # Errors
    /// As [`Schema::from_bytes`].
    pub fn from_set(set: &FileDescriptorSet) -> Result<Self, SchemaError> {
        // Two passes: names first (a field may use a type declared after it), then fields.
        let mut message_names: HashMap<String, usize> = HashMap::new();
        let mut enum_names: HashMap<String, usize> = HashMap::new();
        let mut schema = Schema::default();
        let mut declared: Vec<(String, &DescriptorProto)> = Vec::new();
        for file in &set.file {
            let scope = match file.package() {
                "" => String::new(),
                p => format!(".{p}"),
            };
            for e in &file.enum_type {
                add_enum(&scope, e, &mut schema.enums, &mut enum_names);
            }
            let mut stack: Vec<(String, &DescriptorProto)> = file
                .message_type
                .iter()
                .map(|m| (scope.clone(), m))
                .collect();
            while let Some((scope, m)) = stack.pop() {
                let name = format!("{scope}.{}", m.name());
                message_names.insert(name.clone(), declared.len());
                for e in &m.enum_type {
                    add_enum(&name, e, &mut schema.enums, &mut enum_names);
                }
                stack.extend(m.nested_type.iter().map(|n| (name.clone(), n)));
                declared.push((name, m));
            }
        }
        let resolve = |type_name: &str, user: &str| {
            message_names
                .get(type_name)
                .copied()
                .ok_or_else(|| SchemaError::Unresolved {
                    type_name: type_name.to_owned(),
                    user: user.to_owned(),
                })
        };
        for (name, m) in &declared {
            let mut fields = HashMap::new();
            for f in &m.field {
                let user = format!("{}.{}", &name[1..], f.name());
                let kind = match f.r#type() {
                    Type::Double => Kind::Double,
                    Type::Float => Kind::Float,
                    Type::Int64 => Kind::Int64,
                    Type::Uint64 => Kind::UInt64,
                    Type::Int32 => Kind::Int32,
                    Type::Fixed64 => Kind::Fixed64,
                    Type::Fixed32 => Kind::Fixed32,
                    Type::Bool => Kind::Bool,
                    Type::String => Kind::String,
                    Type::Bytes => Kind::Bytes,
                    Type::Uint32 => Kind::UInt32,
                    Type::Sfixed32 => Kind::SFixed32,
                    Type::Sfixed64 => Kind::SFixed64,
                    Type::Sint32 => Kind::SInt32,
                    Type::Sint64 => Kind::SInt64,
                    // Groups are not read; the field stays unknown, compared by number.
                    Type::Group => continue,
                    Type::Message => Kind::Message(resolve(f.type_name(), &user)?),
                    Type::Enum => match enum_names.get(f.type_name()) {
                        Some(&i) => Kind::Enum(i),
                        None => {
                            return Err(SchemaError::Unresolved {
                                type_name: f.type_name().to_owned(),
                                user,
                            });
                        }
                    },
                };
                let Ok(number) = u32::try_from(f.number()) else {
                    continue;
                };
                fields.insert(
                    number,
                    FieldType {
                        name: f.name().to_owned(),
                        kind,
                        repeated: f.label() == Label::Repeated,
                    },
                );
            }
            schema.messages.push(MessageType { fields });
        }
        for file in &set.file {
            let package = file.package();
            for service in &file.service {
                for method in &service.method {
                    let name = if package.is_empty() {
                        format!("{}/{}", service.name(), method.name())
                    } else {
                        format!("{package}.{}/{}", service.name(), method.name())
                    };
                    let input = resolve(method.input_type(), &name)?;
                    let output = resolve(method.output_type(), &name)?;
                    schema.methods.insert(name, (input, output));
                }
            }
        }
        if schema.methods.is_empty() {
            return Err(SchemaError::NoServices);
        }
        Ok(schema)
    }

    /// The request and response message types of `package.Service/Method`.
    pub fn method(&self, name: &str) -> Option<(TypeRef, TypeRef)> {
        self.methods
            .get(name)
            .map(|&(i, o)| (TypeRef(i), TypeRef(o)))
    }

    /// Methods defined.
    pub fn methods(&self) -> usize {
        self.methods.len()
    }
}

fn add_enum(
    scope: &str,
    e: &EnumDescriptorProto,
    enums: &mut Vec<HashMap<i32, String>>,
    names: &mut HashMap<String, usize>,
) {
    names.insert(format!("{scope}.{}", e.name()), enums.len());
    enums.push(
        e.value
            .iter()
            .map(|v| (v.number(), v.name().to_owned()))
            .collect(),
    );
}

/// Reads messages, within a work budget shared by everything it reads.
pub struct Decoder<'s> {
    schema: Option<&'s Schema>,
    /// Bytes that may still be scanned trying fields as messages.
    work: usize,
}

impl<'s> Decoder<'s> {
    /// A decoder for input of `len` bytes in all.
    pub fn new(schema: Option<&'s Schema>, len: usize) -> Self {
        Self {
            schema,
            work: len.saturating_mul(WORK_PER_BYTE).saturating_add(4096),
        }
    }

    /// One message as a value tree, `None` when the bytes are not a message this reads
    /// (truncated, a group, a field number 0). Typed by `ty` when the schema knows it.
    pub fn message(&mut self, bytes: &[u8], ty: Option<TypeRef>) -> Option<Value> {
        // The top level is always scanned: the budget only bounds the guessing below it.
        self.work = self.work.saturating_add(bytes.len());
        self.read(bytes, ty.map(|t| t.0), 0).map(Value::Object)
    }

    fn read(
        &mut self,
        bytes: &[u8],
        ty: Option<usize>,
        depth: usize,
    ) -> Option<Map<String, Value>> {
        if depth > MAX_NESTING || bytes.len() > self.work {
            return None;
        }
        self.work -= bytes.len();
        let schema = self.schema;
        let message = ty.and_then(|t| schema?.messages.get(t));
        // Field values in the order first seen: (number, key, repeated, values). Found by a
        // scan while there are few (most messages), by a map beyond, so that a hostile message
        // of many distinct fields stays linear.
        let mut order: Vec<(u32, String, bool, Vec<Value>)> = Vec::new();
        let mut index: HashMap<u32, usize> = HashMap::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            let key = varint(&mut rest)?;
            let number = u32::try_from(key >> 3).ok().filter(|&n| n != 0)?;
            let wire = (key & 7) as u8;
            let raw = match wire {
                0 => Raw::Varint(varint(&mut rest)?),
                1 => Raw::Fixed64(u64::from_le_bytes(take(&mut rest, 8)?.try_into().ok()?)),
                2 => {
                    let len = usize::try_from(varint(&mut rest)?).ok()?;
                    Raw::Delimited(take(&mut rest, len)?)
                }
                5 => Raw::Fixed32(u32::from_le_bytes(take(&mut rest, 4)?.try_into().ok()?)),
                _ => return None,
            };
            let field = message.and_then(|m| m.fields.get(&number));
            let typed = field.and_then(|f| self.typed(f, raw, depth));
            let (repeated, values) = match (field, typed) {
                (Some(f), Some(values)) => (f.repeated, values),
                _ => (false, vec![self.untyped(raw, depth)]),
            };
            let found = if order.len() <= SCANNED_FIELDS {
                order.iter().position(|e| e.0 == number)
            } else {
                if index.is_empty() {
                    index.extend(order.iter().enumerate().map(|(i, e)| (e.0, i)));
                }
                index.get(&number).copied()
            };
            let slot = found.unwrap_or_else(|| {
                let name = match (field, typed_ok(field, raw)) {
                    (Some(f), true) => f.name.clone(),
                    _ => number.to_string(),
                };
                order.push((number, name, repeated, Vec::new()));
                if !index.is_empty() {
                    index.insert(number, order.len() - 1);
                }
                order.len() - 1
            });
            let entry = &mut order[slot];
            if field.is_some_and(|f| !f.repeated) && !entry.2 {
                // A singular field sent twice: the last one wins, as in protobuf.
                entry.3.clear();
            }
            entry.3.extend(values);
        }
        let mut out = Map::new();
        for (_, name, repeated, mut values) in order {
            let v = if !repeated && values.len() == 1 {
                values.pop().unwrap_or(Value::Null)
            } else {
                Value::Array(values)
            };
            out.insert(name, v);
        }
        Some(out)
    }

    /// A field read as its descriptor says; `None` when the wire type does not fit it.
    fn typed(&mut self, f: &FieldType, raw: Raw<'_>, depth: usize) -> Option<Vec<Value>> {
        if !typed_ok(Some(f), raw) {
            return None;
        }
        match (f.kind, raw) {
            (Kind::String, Raw::Delimited(b)) => Some(vec![match std::str::from_utf8(b) {
                Ok(s) => Value::String(s.to_owned()),
                Err(_) => bytes_value(b),
            }]),
            (Kind::Bytes, Raw::Delimited(b)) => Some(vec![bytes_value(b)]),
            (Kind::Message(t), Raw::Delimited(b)) => Some(vec![
                self.read(b, Some(t), depth + 1)
                    .map_or_else(|| bytes_value(b), Value::Object),
            ]),
            (kind, Raw::Delimited(mut b)) => {
                // Packed: a run of scalars of one wire type.
                let mut out = Vec::new();
                while !b.is_empty() {
                    let raw = match kind {
                        Kind::Double | Kind::Fixed64 | Kind::SFixed64 => {
                            Raw::Fixed64(u64::from_le_bytes(take(&mut b, 8)?.try_into().ok()?))
                        }
                        Kind::Float | Kind::Fixed32 | Kind::SFixed32 => {
                            Raw::Fixed32(u32::from_le_bytes(take(&mut b, 4)?.try_into().ok()?))
                        }
                        _ => Raw::Varint(varint(&mut b)?),
                    };
                    out.push(self.scalar(kind, raw)?);
                }
                Some(out)
            }
            (kind, raw) => Some(vec![self.scalar(kind, raw)?]),
        }
    }

    fn scalar(&self, kind: Kind, raw: Raw<'_>) -> Option<Value> {
        Some(match (kind, raw) {
            (Kind::Int64, Raw::Varint(v)) => Value::from(v as i64),
            (Kind::Int32, Raw::Varint(v)) => Value::from(i64::from(v as i32)),
            (Kind::UInt64, Raw::Varint(v)) => Value::from(v),
            (Kind::UInt32, Raw::Varint(v)) => Value::from(u64::from(v as u32)),
            (Kind::SInt64, Raw::Varint(v)) => Value::from(zigzag(v)),
            (Kind::SInt32, Raw::Varint(v)) => Value::from(zigzag(u64::from(v as u32))),
            (Kind::Bool, Raw::Varint(v)) => Value::Bool(v != 0),
            (Kind::Enum(e), Raw::Varint(v)) => {
                let n = v as i32;
                match self.schema.and_then(|s| s.enums.get(e)?.get(&n)) {
                    Some(name) => Value::String(name.clone()),
                    None => Value::from(i64::from(n)),
                }
            }
            (Kind::Double, Raw::Fixed64(v)) => float(f64::from_bits(v)),
            (Kind::Fixed64, Raw::Fixed64(v)) => Value::from(v),
            (Kind::SFixed64, Raw::Fixed64(v)) => Value::from(v as i64),
            (Kind::Float, Raw::Fixed32(v)) => float(f64::from(f32::from_bits(v))),
            (Kind::Fixed32, Raw::Fixed32(v)) => Value::from(v),
            (Kind::SFixed32, Raw::Fixed32(v)) => Value::from(i64::from(v as i32)),
            _ => return None,
        })
    }

    /// A field the schema does not know, read as `protoc --decode_raw` would.
    fn untyped(&mut self, raw: Raw<'_>, depth: usize) -> Value {
        match raw {
            Raw::Varint(v) | Raw::Fixed64(v) => Value::from(v),
            Raw::Fixed32(v) => Value::from(v),
            Raw::Delimited([]) => Value::String(String::new()),
            Raw::Delimited(b) => {
                if let Some(m) = self.read(b, None, depth + 1) {
                    return Value::Object(m);
                }
                match std::str::from_utf8(b) {
                    Ok(s) => Value::String(s.to_owned()),
                    Err(_) => bytes_value(b),
                }
            }
        }
    }
}

/// Whether a wire value fits the field's declared kind.
fn typed_ok(field: Option<&FieldType>, raw: Raw<'_>) -> bool {
    let Some(f) = field else {
        return false;
    };
    match raw {
        Raw::Delimited(_) => !f.kind.packable() || f.repeated,
        Raw::Varint(_) => matches!(
            f.kind,
            Kind::Int64
                | Kind::Int32
                | Kind::UInt64
                | Kind::UInt32
                | Kind::SInt64
                | Kind::SInt32
                | Kind::Bool
                | Kind::Enum(_)
        ),
        Raw::Fixed64(_) => matches!(f.kind, Kind::Double | Kind::Fixed64 | Kind::SFixed64),
        Raw::Fixed32(_) => matches!(f.kind, Kind::Float | Kind::Fixed32 | Kind::SFixed32),
    }
}

#[derive(Clone, Copy, Debug)]
enum Raw<'a> {
    Varint(u64),
    Fixed64(u64),
    Fixed32(u32),
    Delimited(&'a [u8]),
}

fn varint(b: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for i in 0..10 {
        let (&byte, rest) = b.split_first()?;
        *b = rest;
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte < 0x80 {
            return Some(v);
        }
    }
    None
}

fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if b.len() < n {
        return None;
    }
    let (head, rest) = b.split_at(n);
    *b = rest;
    Some(head)
}

fn zigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn float(f: f64) -> Value {
    Number::from_f64(f).map_or_else(|| Value::String(f.to_string()), Value::Number)
}

/// Bytes as a value: short ones in hex, longer ones by length and hash, so that equal bytes
/// are equal values and a large blob does not make a large example.
pub fn bytes_value(b: &[u8]) -> Value {
    if b.len() <= HEX_BYTES {
        let mut s = String::with_capacity(2 + 2 * b.len());
        s.push_str("0x");
        for byte in b {
            let _ = write!(s, "{byte:02x}");
        }
        return Value::String(s);
    }
    // Not seeded: live's and the shadow's bytes must hash alike.
    let mut h = DefaultHasher::new();
    b.hash(&mut h);
    Value::String(format!("<{} bytes, hash {:016x}>", b.len(), h.finish()))
}

#[cfg(test)]
pub(crate) mod tests;
