//! A route's Kubernetes workload selector, checked where it is read: a namespace, labels, or
//! both, spelled as the Kubernetes API accepts them.
use std::collections::BTreeMap;
use std::fmt;

/// The pods a route takes requests of: those in `namespace` (any, when `None`) whose labels
/// include every pair of `labels`, as a Deployment's `matchLabels` selects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkloadSelector {
    pub namespace: Option<String>,
    pub labels: BTreeMap<String, String>,
}

impl WorkloadSelector {
    /// Whether a pod in `namespace` with `labels` is selected.
    pub fn selects(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        self.namespace.as_deref().is_none_or(|n| n == namespace)
            && self
                .labels
                .iter()
                .all(|(k, v)| labels.get(k).is_some_and(|have| have == v))
    }
}

impl fmt::Display for WorkloadSelector {
    /// `shop/app=orders,tier=api`, as operators read selectors; `*` for any namespace.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.namespace.as_deref().unwrap_or("*"))?;
        for (i, (k, v)) in self.labels.iter().enumerate() {
            f.write_str(if i == 0 { "/" } else { "," })?;
            write!(f, "{k}={v}")?;
        }
        Ok(())
    }
}

/// Checks a namespace name: an RFC 1123 label, as the API requires.
pub fn check_namespace(name: &str) -> Result<(), String> {
    if is_dns_label(name) {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a namespace name (lower-case letters, digits and `-`, at most 63, \
             starting and ending with a letter or digit)"
        ))
    }
}

/// Checks a label key: an optional DNS subdomain prefix and `/`, then a name of at most 63
/// letters, digits, `-`, `_` and `.`, starting and ending with a letter or digit.
pub fn check_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix
        && !is_dns_subdomain(prefix)
    {
        return Err(format!(
            "`{key}`: the prefix `{prefix}` is not a DNS subdomain"
        ));
    }
    if name.is_empty() || !is_label_value(name) {
        return Err(format!(
            "`{key}` is not a label key (at most 63 letters, digits, `-`, `_` and `.`, starting \
             and ending with a letter or digit, after an optional `prefix/`)"
        ));
    }
    Ok(())
}

/// Checks a label value: empty, or at most 63 letters, digits, `-`, `_` and `.`, starting and
/// ending with a letter or digit.
pub fn check_label_value(value: &str) -> Result<(), String> {
    if is_label_value(value) {
        Ok(())
    } else {
        Err(format!(
            "`{value}` is not a label value (at most 63 letters, digits, `-`, `_` and `.`, \
             starting and ending with a letter or digit)"
        ))
    }
}

fn is_label_value(s: &str) -> bool {
    s.is_empty()
        || (s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric())
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn selection() {
        let orders = WorkloadSelector {
            namespace: Some("shop".into()),
            labels: labels(&[("app", "orders")]),
        };
        assert!(orders.selects(
            "shop",
            &labels(&[("app", "orders"), ("pod-template-hash", "7d")])
        ));
        assert!(!orders.selects("shop", &labels(&[("app", "payments")])));
        assert!(!orders.selects("other", &labels(&[("app", "orders")])));
        assert!(!orders.selects("shop", &labels(&[])));
        let namespace_only = WorkloadSelector {
            namespace: Some("shop".into()),
            ..WorkloadSelector::default()
        };
        assert!(namespace_only.selects("shop", &labels(&[])));
        assert_eq!(orders.to_string(), "shop/app=orders");
        let any = WorkloadSelector {
            namespace: None,
            labels: labels(&[("app", "a"), ("tier", "b")]),
        };
        assert_eq!(any.to_string(), "*/app=a,tier=b");
    }

    #[test]
    fn names() {
        for ok in ["shop", "a", "kube-system", "a1"] {
            assert_eq!(check_namespace(ok), Ok(()), "{ok}");
        }
        for bad in ["", "Shop", "-a", "a-", "a_b", &"a".repeat(64)] {
            assert!(check_namespace(bad).is_err(), "{bad}");
        }
        for ok in ["app", "app.kubernetes.io/name", "example.com/a_b-c.d", "A1"] {
            assert_eq!(check_label_key(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "/app",
            "-app",
            "Example.com/app",
            "a b",
            "x/",
            &"a".repeat(64),
        ] {
            assert!(check_label_key(bad).is_err(), "{bad}");
        }
        for ok in ["", "orders", "v1.2_3-x"] {
            assert_eq!(check_label_value(ok), Ok(()), "{ok}");
        }
        for bad in ["-x", "x.", "a/b", "a b", &"a".repeat(64)] {
            assert!(check_label_value(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        /// A selector selects exactly the pods in its namespace that carry all its labels.
        #[test]
        fn selects_supersets_of_its_labels(
            want in proptest::collection::btree_map("[a-c]", "[x-z]", 0..3),
            have in proptest::collection::btree_map("[a-d]", "[x-z]", 0..4),
            same_namespace: bool,
        ) {
            let selector = WorkloadSelector { namespace: Some("shop".into()), labels: want.clone() };
            let namespace = if same_namespace { "shop" } else { "other" };
            let superset = want.iter().all(|(k, v)| have.get(k) == Some(v));
            prop_assert_eq!(selector.selects(namespace, &have), same_namespace && superset);
        }
    }
}
