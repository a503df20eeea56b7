//! `fieldSelector` and `labelSelector` for pods, parsed and matched as kube-apiserver does.
use serde_json::Value;

use super::objects::bad_request;

/// The fields a pod's `fieldSelector` may name (kube-apiserver's pod field label conversion).
const POD_FIELDS: &[&str] = &[
    "metadata.name",
    "metadata.namespace",
    "spec.nodeName",
    "spec.restartPolicy",
    "spec.schedulerName",
    "spec.serviceAccountName",
    "spec.hostNetwork",
    "status.phase",
    "status.podIP",
    "status.nominatedNodeName",
];

/// A `fieldSelector` and a `labelSelector`, both of which an object must match.
#[derive(Debug, Default)]
pub(super) struct Selectors {
    fields: Vec<FieldRequirement>,
    labels: Vec<LabelRequirement>,
}

/// `field=value` (`equal`) or `field!=value`.
#[derive(Debug)]
struct FieldRequirement {
    field: String,
    equal: bool,
    value: String,
}

#[derive(Debug)]
enum LabelRequirement {
    Exists(String),
    Absent(String),
    /// `key in (values)`, `key=value`, `key==value`.
    In(String, Vec<String>),
    /// `key notin (values)`, `key!=value`: also true when the label is absent.
    NotIn(String, Vec<String>),
}

impl Selectors {
    /// Both selectors of a request; a `400 BadRequest` `Status` when either is malformed or
    /// names a field pods cannot be selected by.
    pub(super) fn parse(fields: Option<&str>, labels: Option<&str>) -> Result<Self, Value> {
        let fields = match fields {
            Some(text) => parse_fields(text).map_err(|e| bad_request(&e))?,
            None => Vec::new(),
        };
        let labels = match labels {
            Some(text) => parse_labels(text).map_err(|e| {
                bad_request(&format!("unable to parse requested label selector: {e}"))
            })?,
            None => Vec::new(),
        };
        Ok(Selectors { fields, labels })
    }

    pub(super) fn is_empty(&self) -> bool {
        self.fields.is_empty() && self.labels.is_empty()
    }

    pub(super) fn matches(&self, pod: &Value) -> bool {
        let fields_match = self
            .fields
            .iter()
            .all(|f| (pod_field(pod, &f.field) == f.value) == f.equal);
        let labels = &pod["metadata"]["labels"];
        let label = |key: &str| labels.get(key).and_then(Value::as_str);
        let labels_match = self.labels.iter().all(|requirement| match requirement {
            LabelRequirement::Exists(key) => label(key).is_some(),
            LabelRequirement::Absent(key) => label(key).is_none(),
            LabelRequirement::In(key, values) => {
                label(key).is_some_and(|v| values.iter().any(|x| x == v))
            }
            LabelRequirement::NotIn(key, values) => {
                label(key).is_none_or(|v| !values.iter().any(|x| x == v))
            }
        });
        fields_match && labels_match
    }
}

/// The value a field selector compares: the field's text, `""` when unset.
fn pod_field(pod: &Value, field: &str) -> String {
    let value = field.split('.').fold(pod, |v, part| &v[part]);
    match value {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        // An unset `spec.hostNetwork` is false.
        Value::Null if field == "spec.hostNetwork" => "false".to_owned(),
        _ => String::new(),
    }
}

/// `field=value`, `field==value`, `field!=value`, comma-separated; `\` escapes `,`, `=`, `!`
/// and itself in values.
fn parse_fields(text: &str) -> Result<Vec<FieldRequirement>, String> {
    let mut terms = Vec::new();
    for part in split_unescaped(text, ',') {
        if part.is_empty() {
            continue;
        }
        let (field, equal, value) = ["!=", "==", "="]
            .iter()
            .filter_map(|op| part.find(op).map(|at| (at, *op)))
            .min_by_key(|(at, op)| (*at, usize::MAX - op.len()))
            .map(|(at, op)| (&part[..at], op != "!=", &part[at + op.len()..]))
            .ok_or_else(|| format!("invalid selector: '{text}'; can't understand '{part}'"))?;
        let field = field.trim();
        if !POD_FIELDS.contains(&field) {
            return Err(format!("field label not supported: {field}"));
        }
        terms.push(FieldRequirement {
            field: field.to_owned(),
            equal,
            value: unescape(value),
        });
    }
    Ok(terms)
}

fn split_unescaped(text: &str, separator: char) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                let last = parts.last_mut().expect("one part");
                last.push('\\');
                last.extend(chars.next());
            }
            c if c == separator => parts.push(String::new()),
            c => parts.last_mut().expect("one part").push(c),
        }
    }
    parts
}

fn unescape(value: &str) -> String {
    let mut out = String::new();
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            out.extend(chars.next());
        } else {
            out.push(c);
        }
    }
    out
}

/// `key`, `!key`, `key=value`, `key==value`, `key!=value`, `key in (a,b)`, `key notin (a,b)`,
/// comma-separated.
fn parse_labels(text: &str) -> Result<Vec<LabelRequirement>, String> {
    let mut terms = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (at, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.checked_sub(1).ok_or("unbalanced parentheses")?,
            ',' if depth == 0 => {
                terms.push(&text[start..at]);
                start = at + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("unbalanced parentheses".to_owned());
    }
    terms.push(&text[start..]);
    let value = |s: &str| -> Result<String, String> {
        let s = s.trim();
        let valid = s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
        if valid {
            Ok(s.to_owned())
        } else {
            Err(format!("invalid label key or value: {s:?}"))
        }
    };
    let key = |s: &str| match value(s)? {
        k if k.is_empty() => Err(format!("empty label key in {text:?}")),
        k => Ok(k),
    };
    let mut requirements = Vec::new();
    for term in terms.iter().map(|t| t.trim()).filter(|t| !t.is_empty()) {
        let requirement = if let Some(k) = term.strip_prefix('!') {
            LabelRequirement::Absent(key(k)?)
        } else if let Some((head, rest)) = term.split_once('(') {
            let values = rest
                .strip_suffix(')')
                .ok_or_else(|| format!("{term:?}: expected ')'"))?
                .split(',')
                .map(value)
                .collect::<Result<Vec<_>, _>>()?;
            match head.split_whitespace().collect::<Vec<_>>()[..] {
                [k, "in"] => LabelRequirement::In(key(k)?, values),
                [k, "notin"] => LabelRequirement::NotIn(key(k)?, values),
                _ => return Err(format!("{term:?}: expected 'in' or 'notin'")),
            }
        } else if let Some((k, v)) = term.split_once("!=") {
            LabelRequirement::NotIn(key(k)?, vec![value(v)?])
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            LabelRequirement::In(key(k)?, vec![value(v)?])
        } else {
            LabelRequirement::Exists(key(term)?)
        };
        requirements.push(requirement);
    }
    Ok(requirements)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn selectors() {
        let pod = json!({
            "metadata": {
                "name": "p",
                "namespace": "shop",
                "labels": {"app": "orders", "tier": "web"},
            },
            "spec": {"nodeName": "node-a"},
            "status": {"phase": "Running"},
        });
        let select = |fields: &str, labels: &str| {
            Selectors::parse(Some(fields), Some(labels)).map(|s| s.matches(&pod))
        };
        assert_eq!(select("spec.nodeName=node-a", ""), Ok(true));
        assert_eq!(select("spec.nodeName==node-b", ""), Ok(false));
        assert_eq!(
            select("spec.nodeName!=node-b,status.phase=Running", ""),
            Ok(true)
        );
        assert_eq!(select("spec.hostNetwork=false", ""), Ok(true));
        assert_eq!(select("", "app=orders,tier"), Ok(true));
        assert_eq!(select("", "app in (orders, payments),!canary"), Ok(true));
        assert_eq!(select("", "app notin (orders)"), Ok(false));
        assert_eq!(
            select("", "zone!=eu"),
            Ok(true),
            "!= holds where the label is absent"
        );
        assert_eq!(select("", "app==payments"), Ok(false));
        let error = select("spec.foo=x", "").expect_err("unsupported field");
        assert_eq!(error["reason"], "BadRequest");
        assert_eq!(error["message"], "field label not supported: spec.foo");
        assert!(select("nodeName", "").is_err());
        assert!(select("", "app in (orders").is_err());
    }
}
