use proptest::prelude::*;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{
    DescriptorProto, EnumDescriptorProto, EnumValueDescriptorProto, FieldDescriptorProto,
    FileDescriptorProto, MethodDescriptorProto, ServiceDescriptorProto,
};
use serde_json::json;

use super::*;

/// Protobuf wire format written by hand, for tests and benches.
#[derive(Clone, Debug, Default)]
pub(crate) struct Wire(pub Vec<u8>);

impl Wire {
    fn key(&mut self, field: u32, wire: u8) {
        self.raw_varint((u64::from(field) << 3) | u64::from(wire));
    }

    fn raw_varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    pub(crate) fn varint(mut self, field: u32, v: u64) -> Self {
        self.key(field, 0);
        self.raw_varint(v);
        self
    }

    pub(crate) fn fixed64(mut self, field: u32, v: u64) -> Self {
        self.key(field, 1);
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub(crate) fn fixed32(mut self, field: u32, v: u32) -> Self {
        self.key(field, 5);
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub(crate) fn bytes(mut self, field: u32, b: &[u8]) -> Self {
        self.key(field, 2);
        self.raw_varint(b.len() as u64);
        self.0.extend_from_slice(b);
        self
    }

    pub(crate) fn message(self, field: u32, m: Wire) -> Self {
        self.bytes(field, &m.0)
    }
}

/// A gRPC body: each message with its 5-byte prefix, uncompressed.
pub(crate) fn frame(messages: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in messages {
        out.push(0);
        out.extend_from_slice(&(m.len() as u32).to_be_bytes());
        out.extend_from_slice(m);
    }
    out
}

fn field(
    name: &str,
    number: i32,
    ty: Type,
    type_name: Option<&str>,
    repeated: bool,
) -> FieldDescriptorProto {
    FieldDescriptorProto {
        name: Some(name.to_owned()),
        number: Some(number),
        r#type: Some(ty as i32),
        type_name: type_name.map(str::to_owned),
        label: Some(if repeated {
            Label::Repeated
        } else {
            Label::Optional
        } as i32),
        ..Default::default()
    }
}

fn message(name: &str, fields: Vec<FieldDescriptorProto>) -> DescriptorProto {
    DescriptorProto {
        name: Some(name.to_owned()),
        field: fields,
        ..Default::default()
    }
}

/// `shop.v1.Orders/Get(GetOrderRequest) returns (GetOrderReply)`, built as protoc would
/// describe it.
pub(crate) fn shop_descriptors() -> FileDescriptorSet {
    let order = DescriptorProto {
        enum_type: vec![EnumDescriptorProto {
            name: Some("State".to_owned()),
            value: ["PENDING", "SHIPPED"]
                .iter()
                .zip(0..)
                .map(|(n, i)| EnumValueDescriptorProto {
                    name: Some((*n).to_owned()),
                    number: Some(i),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }],
        ..message(
            "Order",
            vec![
                field("id", 1, Type::Int64, None, false),
                field("status", 2, Type::String, None, false),
                field("items", 3, Type::Message, Some(".shop.v1.Item"), true),
                field("state", 4, Type::Enum, Some(".shop.v1.Order.State"), false),
                field("delta", 5, Type::Sint32, None, false),
                field("price", 6, Type::Double, None, false),
                field("codes", 7, Type::Int32, None, true),
                field("password", 8, Type::String, None, false),
            ],
        )
    };
    let file = FileDescriptorProto {
        name: Some("shop.proto".to_owned()),
        package: Some("shop.v1".to_owned()),
        message_type: vec![
            order,
            message(
                "Item",
                vec![
                    field("sku", 1, Type::String, None, false),
                    field("qty", 2, Type::Uint32, None, false),
                ],
            ),
            message(
                "GetOrderRequest",
                vec![field("id", 1, Type::Int64, None, false)],
            ),
            message(
                "GetOrderReply",
                vec![field(
                    "order",
                    1,
                    Type::Message,
                    Some(".shop.v1.Order"),
                    false,
                )],
            ),
        ],
        service: vec![ServiceDescriptorProto {
            name: Some("Orders".to_owned()),
            method: vec![MethodDescriptorProto {
                name: Some("Get".to_owned()),
                input_type: Some(".shop.v1.GetOrderRequest".to_owned()),
                output_type: Some(".shop.v1.GetOrderReply".to_owned()),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    FileDescriptorSet { file: vec![file] }
}

/// A `GetOrderReply` as a server would write it.
pub(crate) fn order_reply(id: u64, status: &str, qty: u64) -> Vec<u8> {
    let item = Wire::default().bytes(1, b"book").varint(2, qty);
    let order = Wire::default()
        .varint(1, id)
        .bytes(2, status.as_bytes())
        .message(3, item.clone())
        .message(3, item)
        .varint(4, 1)
        .varint(5, 3) // sint32 -2
        .fixed64(6, 9.5f64.to_bits())
        .bytes(7, &[1, 2, 0x7f]) // packed
        .bytes(8, b"hunter2")
        .varint(99, 5);
    Wire::default().message(1, order).0
}

#[test]
fn without_a_schema_fields_are_numbers_and_repeats_are_lists() {
    let inner = Wire::default().varint(1, 7);
    let m = Wire::default()
        .varint(1, 150)
        .bytes(2, b"testing")
        .message(3, inner)
        .varint(4, 1)
        .varint(4, 2)
        .fixed32(5, 9)
        .fixed64(6, 10)
        .bytes(7, &[0xff, 0xfe])
        .bytes(8, b"");
    let v = Decoder::new(None, m.0.len()).message(&m.0, None);
    assert_eq!(
        v,
        Some(json!({
            "1": 150, "2": "testing", "3": {"1": 7}, "4": [1, 2], "5": 9, "6": 10,
            "7": "0xfffe", "8": "",
        }))
    );
}

#[test]
fn a_schema_names_and_types_the_fields_and_unknown_ones_keep_their_numbers() {
    let schema = Schema::from_set(&shop_descriptors()).expect("valid");
    assert_eq!(schema.methods(), 1);
    let (_, reply) = schema.method("shop.v1.Orders/Get").expect("method");
    let body = order_reply(42, "paid", 2);
    let v = Decoder::new(Some(&schema), body.len()).message(&body, Some(reply));
    assert_eq!(
        v,
        Some(json!({"order": {
            "id": 42, "status": "paid",
            "items": [{"sku": "book", "qty": 2}, {"sku": "book", "qty": 2}],
            "state": "SHIPPED", "delta": -2, "price": 9.5, "codes": [1, 2, 127],
            "password": "hunter2", "99": 5,
        }}))
    );
    // A repeated field seen once is still a list.
    let one = Wire::default().message(1, Wire::default().message(3, Wire::default().varint(2, 1)));
    let v = Decoder::new(Some(&schema), one.0.len()).message(&one.0, Some(reply));
    assert_eq!(v, Some(json!({"order": {"items": [{"qty": 1}]}})));
    // A wire type the field cannot have: read as unknown, by number.
    let odd = Wire::default().message(1, Wire::default().fixed32(1, 3));
    let v = Decoder::new(Some(&schema), odd.0.len()).message(&odd.0, Some(reply));
    assert_eq!(v, Some(json!({"order": {"1": 3}})));
}

#[test]
fn descriptor_sets_that_cannot_be_used_say_why() {
    let err = Schema::from_bytes(b"\xff\xff\xff").expect_err("garbage");
    assert!(err.to_string().contains("FileDescriptorSet"), "{err}");
    let mut set = shop_descriptors();
    set.file[0].service.clear();
    assert!(matches!(
        Schema::from_set(&set),
        Err(SchemaError::NoServices)
    ));
    let mut set = shop_descriptors();
    // Written without --include_imports: a type from another file is missing.
    set.file[0].message_type.retain(|m| m.name() != "Item");
    let err = Schema::from_set(&set).expect_err("unresolved");
    assert!(
        err.to_string().contains(".shop.v1.Item") && err.to_string().contains("--include_imports"),
        "{err}"
    );
    // Serialized and read back, as a file is.
    let bytes = prost::Message::encode_to_vec(&shop_descriptors());
    assert!(Schema::from_bytes(&bytes).is_ok());
}

#[test]
fn what_is_not_a_message_is_refused_not_guessed() {
    let mut d = Decoder::new(None, 64);
    // A varint running off the end; a group; field number 0; a length past the end.
    for bad in [
        &[0x08, 0x80][..],
        &[0x0b, 0x0c],
        &[0x00, 0x01],
        &[0x0a, 0x05, 0x01],
    ] {
        assert_eq!(d.message(bad, None), None, "{bad:?}");
    }
    // Not a message, but UTF-8: a string; neither: bytes by length and hash.
    let m = Wire::default()
        .bytes(1, b"hello world")
        .bytes(2, &[0xff; 40]);
    let v = Decoder::new(None, m.0.len())
        .message(&m.0, None)
        .expect("message");
    assert_eq!(v["1"], json!("hello world"));
    assert!(
        v["2"]
            .as_str()
            .is_some_and(|s| s.starts_with("<40 bytes, hash "))
    );
}

#[test]
fn nesting_deeper_than_the_bound_is_bytes_not_recursion() {
    let mut m = Wire::default().varint(1, 1);
    for _ in 0..10_000 {
        m = Wire::default().message(1, m);
    }
    let v = Decoder::new(None, m.0.len())
        .message(&m.0, None)
        .expect("message");
    let mut depth = 0;
    let mut at = &v;
    while let Some(inner) = at.get("1") {
        at = inner;
        depth += 1;
    }
    assert!(depth <= MAX_NESTING + 2, "{depth}");
    assert!(at.is_string());
}

/// Bytes scanned by a decode: a decoder given exactly what the bound allows runs dry exactly
/// when more would have been scanned.
fn scanned(bytes: &[u8]) -> usize {
    let mut d = Decoder::new(None, bytes.len());
    let start = d.work + bytes.len();
    let _ = d.message(bytes, None);
    start - d.work
}

proptest! {
    #[test]
    fn random_bytes_never_panic_and_cost_a_bounded_multiple_of_their_length(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        prop_assert!(scanned(&bytes) <= bytes.len() * (WORK_PER_BYTE + 1) + 4096);
    }

    #[test]
    fn messages_built_from_fields_read_back_to_their_values(
        fields in proptest::collection::vec((1u32..50, any::<u64>()), 0..20),
    ) {
        let mut w = Wire::default();
        for &(f, v) in &fields {
            w = w.varint(f, v);
        }
        let v = Decoder::new(None, w.0.len()).message(&w.0, None).expect("message");
        for &(f, value) in &fields {
            let got = &v[f.to_string()];
            let values: Vec<u64> = match got {
                Value::Array(a) => a.iter().filter_map(Value::as_u64).collect(),
                other => other.as_u64().into_iter().collect(),
            };
            prop_assert!(values.contains(&value));
        }
    }
}

#[test]
fn many_distinct_fields_read_like_few() {
    let mut w = Wire::default();
    for f in 1..=200 {
        w = w.varint(f, u64::from(f));
    }
    w = w.varint(150, 7);
    let v = Decoder::new(None, w.0.len())
        .message(&w.0, None)
        .expect("message");
    let m = v.as_object().expect("object");
    assert_eq!(m.len(), 200);
    assert_eq!(v["150"], json!([150, 7]));
    assert_eq!(v["3"], json!(3));
}
