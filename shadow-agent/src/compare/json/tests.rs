use std::collections::BTreeSet;

use proptest::prelude::*;
use serde_json::json;

use super::*;

fn patterns(p: &[&str]) -> Vec<FieldPattern> {
    p.iter()
        .map(|s| FieldPattern::new(s).unwrap_or_else(|e| panic!("{e}")))
        .collect()
}

/// `(path, kind)` of every difference.
fn paths(live: &Value, shadow: &Value, o: &DiffOptions<'_>) -> Vec<(String, DiffKind)> {
    diff(live, shadow, o)
        .differences
        .into_iter()
        .map(|d| (d.path, d.kind))
        .collect()
}

#[test]
fn structural_differences() {
    use DiffKind::*;
    let ordered = DiffOptions::default();
    let unordered = DiffOptions {
        order: ArrayOrder::Unordered,
        ..DiffOptions::default()
    };
    let tolerant = DiffOptions {
        tolerance: 0.01,
        ..DiffOptions::default()
    };
    // (name, live, shadow, options, expected differences)
    type Case<'a> = (
        &'a str,
        Value,
        Value,
        &'a DiffOptions<'a>,
        Vec<(&'a str, DiffKind)>,
    );
    let cases: Vec<Case> = vec![
        ("equal", json!({"a": 1}), json!({"a": 1}), &ordered, vec![]),
        (
            "nested change",
            json!({"a": {"b": [1, {"c": "x"}]}}),
            json!({"a": {"b": [1, {"c": "y"}]}}),
            &ordered,
            vec![("$.a.b[1].c", Changed)],
        ),
        (
            "missing and added",
            json!({"a": 1, "b": 2}),
            json!({"b": 2, "c": 3}),
            &ordered,
            vec![("$.a", Missing), ("$.c", Added)],
        ),
        (
            "type change",
            json!({"id": 1, "tags": []}),
            json!({"id": "1", "tags": {}}),
            &ordered,
            vec![("$.id", TypeChanged), ("$.tags", TypeChanged)],
        ),
        (
            "null against value",
            json!({"a": null}),
            json!({"a": 0}),
            &ordered,
            vec![("$.a", TypeChanged)],
        ),
        (
            "root scalar",
            json!(1),
            json!(2),
            &ordered,
            vec![("$", Changed)],
        ),
        (
            "ordered array, reordered",
            json!([1, 2, 3]),
            json!([3, 2, 1]),
            &ordered,
            vec![("$[0]", Changed), ("$[2]", Changed)],
        ),
        (
            "unordered array, reordered",
            json!([1, 2, 3]),
            json!([3, 2, 1]),
            &unordered,
            vec![],
        ),
        (
            "unordered array of objects, one changed",
            json!([{"id": 1, "v": "a"}, {"id": 2, "v": "b"}]),
            json!([{"id": 2, "v": "b"}, {"id": 1, "v": "z"}]),
            &unordered,
            vec![("$[0].v", Changed)],
        ),
        (
            "unordered multiset counts",
            json!([1, 1, 2]),
            json!([1, 2, 2]),
            &unordered,
            vec![("$[1]", Changed)],
        ),
        (
            "array length",
            json!([1, 2]),
            json!([1, 2, 3]),
            &ordered,
            vec![("$[2]", Added)],
        ),
        (
            "array shorter",
            json!([1, 2, 3]),
            json!([1]),
            &unordered,
            vec![("$[1]", Missing), ("$[2]", Missing)],
        ),
        (
            "within tolerance",
            json!({"total": 100.0, "n": 1000}),
            json!({"total": 100.5, "n": 1009}),
            &tolerant,
            vec![],
        ),
        (
            "beyond tolerance",
            json!({"total": 100.0}),
            json!({"total": 110.0}),
            &tolerant,
            vec![("$.total", Changed)],
        ),
        (
            "exact without tolerance",
            json!({"total": 100.0}),
            json!({"total": 100.5}),
            &ordered,
            vec![("$.total", Changed)],
        ),
        (
            "integer and float alike",
            json!({"n": 1}),
            json!({"n": 1.0}),
            &ordered,
            vec![],
        ),
        (
            "large integers exactly",
            json!({"n": 9_007_199_254_740_993u64}),
            json!({"n": 9_007_199_254_740_992u64}),
            &ordered,
            vec![("$.n", Changed)],
        ),
        (
            "odd keys quoted",
            json!({"a b": {"x.y": 1}}),
            json!({"a b": {"x.y": 2}}),
            &ordered,
            vec![("$[\"a b\"][\"x.y\"]", Changed)],
        ),
    ];
    for (name, live, shadow, options, want) in cases {
        let got = paths(&live, &shadow, options);
        let want: Vec<(String, DiffKind)> =
            want.into_iter().map(|(p, k)| (p.to_owned(), k)).collect();
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn ignore_patterns() {
    let live = json!({
        "request_id": "a1",
        "total": 10,
        "meta": {"host": "a", "took": 3},
        "items": [{"id": 1, "price": 5, "timestamp": 1}, {"id": 2, "price": 6, "timestamp": 2}],
        "deep": {"x": {"timestamp": 7, "keep": 1}},
        "odd key": 1,
    });
    let shadow = json!({
        "request_id": "b2",
        "total": 10,
        "meta": {"host": "b", "took": 4, "new": true},
        "items": [{"id": 9, "price": 5, "timestamp": 8}, {"id": 8, "price": 7, "timestamp": 9}],
        "deep": {"x": {"timestamp": 1, "keep": 2}},
        "odd key": 2,
    });
    // (patterns, expected paths)
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec![],
            vec![
                "$.deep.x.keep",
                "$.deep.x.timestamp",
                "$.items[0].id",
                "$.items[0].timestamp",
                "$.items[1].id",
                "$.items[1].price",
                "$.items[1].timestamp",
                "$.meta.host",
                "$.meta.took",
                "$.meta.new",
                "$[\"odd key\"]",
                "$.request_id",
            ],
        ),
        (
            vec![
                "$.request_id",
                "**.timestamp",
                "$.items[*].id",
                "$.meta.*",
                "$[\"odd key\"]",
            ],
            vec!["$.deep.x.keep", "$.items[1].price"],
        ),
        // `$.meta` ignores everything below it; `$.items[1]` one element.
        (
            vec![
                "$.meta",
                "$.items[1]",
                "$.deep.**",
                "**.request_id",
                "**.id",
                "**.timestamp",
            ],
            vec!["$[\"odd key\"]"],
        ),
        // A root pattern ignores everything.
        (vec!["$"], vec![]),
    ];
    for (ignore, want) in cases {
        let ignore = patterns(&ignore);
        let o = DiffOptions {
            ignore: &ignore,
            ..DiffOptions::default()
        };
        let got: Vec<String> = paths(&live, &shadow, &o).into_iter().map(|p| p.0).collect();
        assert_eq!(got, want, "{ignore:?}");
    }
}

#[test]
fn ignored_fields_do_not_break_unordered_matching() {
    let ignore = patterns(&["$[*].id"]);
    let o = DiffOptions {
        ignore: &ignore,
        order: ArrayOrder::Unordered,
        ..DiffOptions::default()
    };
    let live = json!([{"id": "x", "n": 1}, {"id": "y", "n": 2}]);
    let shadow = json!([{"id": "q", "n": 2}, {"id": "r", "n": 1}]);
    assert!(equal(&live, &shadow, &o));
    // The hashed path for long arrays agrees.
    let live = Value::Array((0..100).map(|n| json!({"id": n, "n": n})).collect());
    let shadow = Value::Array((0..100).rev().map(|n| json!({"id": -n, "n": n})).collect());
    assert!(equal(&live, &shadow, &o));
}

#[test]
fn pattern_syntax() {
    for ok in [
        "$",
        "$.a",
        "**.a",
        "$.a[*].b",
        "$.a[3]",
        "$[\"x y\"].z",
        "$.**.a",
        "$.*",
    ] {
        assert!(FieldPattern::new(ok).is_ok(), "{ok}");
    }
    for bad in ["a", ".a", "$.", "$.a[", "$[x]", "$a", "$.a[\"x\"", ""] {
        assert!(FieldPattern::new(bad).is_err(), "{bad}");
    }
}

#[test]
fn fields_normalise_indexes_and_ids() {
    let live = json!({"users": {"12345": {"name": "a"}}, "items": [1, 2, 3]});
    let shadow = json!({"users": {"12345": {"name": "b"}}, "items": [1, 2, 4]});
    let d = diff(&live, &shadow, &DiffOptions::default());
    let fields: Vec<_> = d.differences.iter().map(|d| d.field.as_str()).collect();
    assert_eq!(fields, ["$.items[*]", "$.users.{id}.name"]);
    assert_eq!(d.differences[1].last_key, Some("name"));
}

#[test]
fn deep_nesting_is_bounded() {
    // Deeper than MAX_DEPTH but within serde_json's limit.
    let nest = |leaf: i32| {
        let mut v = json!(leaf);
        for _ in 0..100 {
            v = json!({ "a": v });
        }
        v
    };
    let (a, b) = (nest(1), nest(2));
    let d = diff(&a, &b, &DiffOptions::default());
    assert_eq!(d.differences.len(), 1);
    assert_eq!(d.differences[0].kind, DiffKind::TooDeep);
    assert!(
        diff(&nest(1), &nest(1), &DiffOptions::default())
            .differences
            .is_empty()
    );
    // Beyond serde_json's limit the body is not JSON at all, and nothing overflows.
    let deep = "[".repeat(100_000);
    assert!(serde_json::from_str::<Value>(&deep).is_err());
}

#[test]
fn differences_are_capped() {
    let live = Value::Array((0..1000).map(|n| json!(n)).collect());
    let shadow = Value::Array((0..1000).map(|n| json!(n + 1)).collect());
    let o = DiffOptions {
        max_differences: 10,
        ..DiffOptions::default()
    };
    let d = diff(&live, &shadow, &o);
    assert_eq!(d.differences.len(), 10);
    assert!(d.truncated);
}

#[test]
fn examples_redact_sensitive_keys_and_are_cut() {
    let sensitive: BTreeSet<&str> = ["password", "authorization"].into();
    let is = |k: &str| sensitive.contains(k.to_ascii_lowercase().as_str());
    let v = json!({"user": "ann", "Password": "hunter2", "nested": {"authorization": "Bearer x"}});
    let s = render_value(&v, &is, 100);
    assert!(!s.contains("hunter2") && !s.contains("Bearer"), "{s}");
    assert!(s.contains(REDACTED), "{s}");
    let long = json!("é".repeat(500));
    let s = render_value(&long, &is, 100);
    assert!(s.len() <= 100 && s.ends_with('…'), "{} {s}", s.len());
}

#[test]
fn flatten_leaves() {
    let v = json!({"a": [1, {"b": "x"}], "e": {}, "f": 1.5});
    let mut out = Vec::new();
    assert!(!flatten(&v, &DiffOptions::default(), 100, &mut out));
    let fields: Vec<_> = out.iter().map(|l| l.field.as_str()).collect();
    // An object's own values first (`e` is an empty object: a leaf), then nested ones.
    assert_eq!(fields, ["$.e", "$.f", "$.a[*]", "$.a[*].b"]);
    assert_eq!(out[1].value, Leaf::Float(1.5));
    let mut out = Vec::new();
    assert!(flatten(&v, &DiffOptions::default(), 2, &mut out));
    assert_eq!(out.len(), 2);
}

/// Any JSON value, a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        (-1e6f64..1e6).prop_map(|f| json!(f)),
        "[a-z]{0,4}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 40, 5, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            proptest::collection::btree_map("[a-c]{1,2}", inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn path_set(
    live: &Value,
    shadow: &Value,
    o: &DiffOptions<'_>,
    normalised: bool,
) -> BTreeSet<String> {
    diff(live, shadow, o)
        .differences
        .into_iter()
        .map(|d| if normalised { d.field } else { d.path })
        .collect()
}

proptest! {
    #[test]
    fn a_value_equals_itself(v in any_json(), unordered in any::<bool>()) {
        let o = DiffOptions {
            order: if unordered { ArrayOrder::Unordered } else { ArrayOrder::Ordered },
            ..DiffOptions::default()
        };
        prop_assert!(diff(&v, &v, &o).differences.is_empty());
        prop_assert!(equal(&v, &v, &o));
    }

    #[test]
    fn diff_is_symmetric_in_its_paths(a in any_json(), b in any_json()) {
        let o = DiffOptions { max_differences: usize::MAX, ..DiffOptions::default() };
        prop_assert_eq!(path_set(&a, &b, &o, false), path_set(&b, &a, &o, false));
        let o = DiffOptions { order: ArrayOrder::Unordered, ..o };
        prop_assert_eq!(path_set(&a, &b, &o, true), path_set(&b, &a, &o, true));
    }

    #[test]
    fn equal_agrees_with_diff(a in any_json(), b in any_json()) {
        let o = DiffOptions::default();
        prop_assert_eq!(equal(&a, &b, &o), diff(&a, &b, &o).differences.is_empty());
    }
}

#[test]
fn a_cut_flattening_keeps_the_shallow_fields() {
    // `items` sorts before `request_id` and `timestamp`, and holds more leaves than the cut.
    let items: Vec<Value> = (0..100).map(|i| json!({"id": i, "price": i * 3})).collect();
    let body = json!({"items": items, "request_id": "r-1", "timestamp": 17.5});
    let mut leaves = Vec::new();
    let cut = flatten(&body, &DiffOptions::default(), 64, &mut leaves);
    assert!(cut);
    assert_eq!(leaves.len(), 64);
    let fields: Vec<&str> = leaves.iter().map(|l| l.field.as_str()).collect();
    assert!(
        fields.contains(&"$.request_id") && fields.contains(&"$.timestamp"),
        "{fields:?}"
    );
}

#[test]
fn unordered_arrays_of_many_equal_elements() {
    let o = DiffOptions {
        order: ArrayOrder::Unordered,
        ..DiffOptions::default()
    };
    let line = |qty: u32| json!({"sku": "GRD-000042", "qty": qty});
    let live = Value::Array((0..100_000).map(|_| line(1)).collect());
    assert!(equal(&live, &live, &o));
    let mut shadow = live.clone();
    if let Value::Array(a) = &mut shadow {
        a[99_999] = line(2);
        a[7] = line(3);
    }
    // The unequal ones are paired with each other, in order: live's first unpaired element
    // (the last, as the equal ones were paired in index order) against the shadow's first.
    let got = paths(&live, &shadow, &o);
    assert_eq!(
        got,
        [
            ("$[99998].qty".to_owned(), DiffKind::Changed),
            ("$[99999].qty".to_owned(), DiffKind::Changed)
        ]
    );
}

#[test]
fn unordered_integers_above_2_pow_53_stay_apart() {
    // Neighbours share an f64 (ids from a snowflake generator, say), but not a value.
    let o = DiffOptions {
        order: ArrayOrder::Unordered,
        ..DiffOptions::default()
    };
    let base = 1u64 << 60;
    let live = Value::Array((0..5_000).map(|i| json!(base + i)).collect());
    let shadow = Value::Array((0..5_000).rev().map(|i| json!(base + i)).collect());
    assert!(equal(&live, &shadow, &o));
    let mut other = shadow.clone();
    other[0] = json!(base + 5_000);
    assert_eq!(
        paths(&live, &other, &o),
        [("$[4999]".to_owned(), DiffKind::Changed)]
    );
    // An integral float is its integer.
    assert!(equal(&json!([1, 2.0]), &json!([2, 1.0]), &o));
}

#[test]
fn unordered_elements_equal_within_the_tolerance_are_paired() {
    let o = DiffOptions {
        order: ArrayOrder::Unordered,
        tolerance: 0.01,
        ..DiffOptions::default()
    };
    // Exact copies pair by hash; the two within 1 % by comparison; one is left.
    let live = Value::Array((0..1_000).map(|i| json!(f64::from(i) + 0.5)).collect());
    let mut shadow = live.clone();
    shadow[10] = json!(10.52);
    shadow[20] = json!(20.6);
    shadow[900] = json!(5_000.5);
    assert_eq!(
        paths(&live, &shadow, &o),
        [("$[900]".to_owned(), DiffKind::Changed)]
    );
}

/// JSON over a few values, so that arrays hold duplicates and elements that almost match.
fn small_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(json!(0)),
        Just(json!(1)),
        Just(json!(1.5)),
        Just(json!("a")),
        Just(json!("b")),
        Just(Value::Null),
        Just(json!(true)),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..7).prop_map(Value::Array),
            proptest::collection::btree_map("[ab]", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// `v` with every array, at every depth, in another order: each rotated and, by `seed`,
/// reversed.
fn permuted(v: &Value, seed: u64) -> Value {
    match v {
        Value::Array(a) => {
            let mut a: Vec<Value> = a
                .iter()
                .enumerate()
                .map(|(i, e)| permuted(e, seed.rotate_left(i as u32 + 1)))
                .collect();
            if !a.is_empty() {
                let by = seed as usize % a.len();
                a.rotate_left(by);
            }
            if seed & 1 == 1 {
                a.reverse();
            }
            Value::Array(a)
        }
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, e)| (k.clone(), permuted(e, seed.rotate_left(7))))
                .collect(),
        ),
        scalar => scalar.clone(),
    }
}

/// The unordered diff as it was first written, in quadratic time: each live element takes the
/// first unused shadow element equal to it; the rest are paired in order. Without tolerance
/// or ignored fields.
fn naive_unordered(a: &Value, b: &Value) -> Vec<(String, DiffKind)> {
    fn walk<'v>(
        a: &'v Value,
        b: &'v Value,
        path: &mut Vec<Segment<'v>>,
        out: &mut Vec<(String, DiffKind)>,
    ) {
        let mut push = |path: &[Segment<'_>], kind| out.push((render_path(path, false), kind));
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                for (k, va) in x {
                    path.push(Segment::Key(k));
                    match y.get(k) {
                        Some(vb) => walk(va, vb, path, out),
                        None => out.push((render_path(path, false), DiffKind::Missing)),
                    }
                    path.pop();
                }
                for k in y.keys().filter(|k| !x.contains_key(*k)) {
                    path.push(Segment::Key(k));
                    out.push((render_path(path, false), DiffKind::Added));
                    path.pop();
                }
            }
            (Value::Array(x), Value::Array(y)) => {
                let mut used = vec![false; y.len()];
                let mut left = Vec::new();
                for (i, e) in x.iter().enumerate() {
                    match (0..y.len()).find(|&j| !used[j] && naive_unordered(e, &y[j]).is_empty()) {
                        Some(j) => used[j] = true,
                        None => left.push(i),
                    }
                }
                let right: Vec<usize> = (0..y.len()).filter(|&j| !used[j]).collect();
                for k in 0..left.len().max(right.len()) {
                    match (left.get(k), right.get(k)) {
                        (Some(&i), Some(&j)) => {
                            path.push(Segment::Index(i));
                            walk(&x[i], &y[j], path, out);
                            path.pop();
                        }
                        (Some(&i), None) => {
                            path.push(Segment::Index(i));
                            out.push((render_path(path, false), DiffKind::Missing));
                            path.pop();
                        }
                        (None, Some(&j)) => {
                            path.push(Segment::Index(j));
                            out.push((render_path(path, false), DiffKind::Added));
                            path.pop();
                        }
                        (None, None) => {}
                    }
                }
            }
            (Value::Number(x), Value::Number(y)) => {
                if !numbers_equal(x, y, 0.0) {
                    push(path, DiffKind::Changed);
                }
            }
            (Value::String(x), Value::String(y)) if x == y => {}
            (Value::Bool(x), Value::Bool(y)) if x == y => {}
            (Value::Null, Value::Null) => {}
            (Value::String(_), Value::String(_)) | (Value::Bool(_), Value::Bool(_)) => {
                push(path, DiffKind::Changed);
            }
            _ => push(path, DiffKind::TypeChanged),
        }
    }
    let mut out = Vec::new();
    walk(a, b, &mut Vec::new(), &mut out);
    out
}

proptest! {
    /// Arrays in any order, at any depth, are equal unordered; and whether two values are
    /// equal does not depend on the order of their arrays.
    #[test]
    fn unordered_comparison_is_invariant_under_permutation(
        a in small_json(),
        b in small_json(),
        seed in any::<u64>(),
    ) {
        let o = DiffOptions {
            order: ArrayOrder::Unordered,
            max_differences: usize::MAX,
            ..DiffOptions::default()
        };
        prop_assert!(diff(&a, &permuted(&a, seed), &o).differences.is_empty());
        prop_assert_eq!(
            equal(&a, &b, &o),
            equal(&permuted(&a, seed), &permuted(&b, seed.rotate_left(13)), &o)
        );
    }

    /// Equal multisets, with many duplicates, have no difference.
    #[test]
    fn equal_multisets_have_no_difference(
        elements in proptest::collection::vec(small_json(), 0..40),
        copies in proptest::collection::vec(1usize..4, 40),
        seed in any::<u64>(),
    ) {
        let o = DiffOptions { order: ArrayOrder::Unordered, ..DiffOptions::default() };
        let live: Vec<Value> = elements
            .iter()
            .zip(&copies)
            .flat_map(|(e, &n)| std::iter::repeat_n(e.clone(), n))
            .collect();
        let live = Value::Array(live);
        let shadow = permuted(&live, seed);
        prop_assert!(diff(&live, &shadow, &o).differences.is_empty());
    }

    /// The same differences, in the same order, as the quadratic pairing.
    #[test]
    fn unordered_diff_agrees_with_the_naive_pairing(
        a in small_json(),
        b in small_json(),
        x in proptest::collection::vec(small_json(), 0..10),
        y in proptest::collection::vec(small_json(), 0..10),
    ) {
        let o = DiffOptions {
            order: ArrayOrder::Unordered,
            max_differences: usize::MAX,
            ..DiffOptions::default()
        };
        prop_assert_eq!(paths(&a, &b, &o), naive_unordered(&a, &b));
        // Arrays over the same few values: most elements have an equal one on the other side.
        let (x, y) = (Value::Array(x), Value::Array(y));
        prop_assert_eq!(paths(&x, &y, &o), naive_unordered(&x, &y));
    }
}
