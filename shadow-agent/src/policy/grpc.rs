//! gRPC calls: how a captured request is recognised as one, and the `Service/Method` globs that
//! routes match and allow them by.
//!
//! Every gRPC call is a `POST`, reads and writes alike, so the method allowlist cannot tell a
//! `GetOrder` from a `CancelOrder`: a gRPC call is mirrored only when its route's `allow_grpc`
//! names it ([`crate::policy::Policy::decide`]). Its name is read from the request-target as
//! sent, strictly (`/package.Service/Method`, nothing else): a spelling the live server might
//! read as another method is never taken for an allowed one.

use std::fmt;

use crate::policy::tagging::Header;

/// How `Service/Method` globs match: case-sensitively, as gRPC servers look methods up, with
/// `*` and `?` staying inside the service or the method.
const CALL_MATCH: glob::MatchOptions = glob::MatchOptions {
    case_sensitive: true,
    require_literal_separator: true,
    require_literal_leading_dot: false,
};

/// Whether a request with these headers is a gRPC call: its content-type is `application/grpc`
/// or `application/grpc+NAME` (`+proto`, `+json`...), in any case, parameters aside. gRPC-Web
/// (`application/grpc-web`) is a different protocol and is not one.
pub fn is_grpc_call(headers: &[Header]) -> bool {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("content-type"))
        .any(|(_, v)| is_grpc_content_type(v))
}

fn is_grpc_content_type(value: &[u8]) -> bool {
    let media = value.split(|&b| b == b';').next().unwrap_or_default();
    let media = media.trim_ascii();
    let Some(prefix) = media.get(..16) else {
        return false;
    };
    prefix.eq_ignore_ascii_case(b"application/grpc")
        && match &media[16..] {
            [] => true,
            [b'+', subtype @ ..] => !subtype.is_empty(),
            _ => false,
        }
}

/// The `Service/Method` a gRPC request-target names: `/package.Service/Method` exactly, with
/// neither query nor escapes, two non-empty segments that are not `.` or `..`. `None` for any
/// other target, which then names no call at all.
pub fn call_name(target: &str) -> Option<&str> {
    let name = target.strip_prefix('/')?;
    let (service, method) = name.split_once('/')?;
    let segment_ok = |s: &str| {
        !s.is_empty()
            && s != "."
            && s != ".."
            && s.bytes()
                .all(|b| b.is_ascii_graphic() && !b"/?#%\\;".contains(&b))
    };
    (segment_ok(service) && segment_ok(method)).then_some(name)
}

/// A `Service/Method` glob, such as `shop.Orders/Get*` or `grpc.health.v1.Health/*`, checked
/// when the configuration is loaded.
#[derive(Clone, Debug)]
pub struct CallGlob {
    source: String,
    pattern: glob::Pattern,
}

/// Why a `Service/Method` glob is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CallGlobError {
    #[error("expected `package.Service/Method`, a glob on each side of one `/`")]
    Shape,
    #[error("`**` spans nothing here: the service and the method are one name each")]
    DoubleStar,
    #[error("{0}")]
    Glob(String),
}

impl CallGlob {
    /// Compiles `Service/Method`; the service is the full name, package included.
    ///
    /// # Errors
    /// When the pattern is not two globs around one `/`, holds `**`, or does not compile.
    pub fn new(source: &str) -> Result<Self, CallGlobError> {
        let (service, method) = source.split_once('/').ok_or(CallGlobError::Shape)?;
        // `?` is the glob's one-character wildcard here; a call name never holds one.
        let side_ok = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_graphic() && !b"/#%\\;".contains(&b))
        };
        if !side_ok(service) || !side_ok(method) {
            return Err(CallGlobError::Shape);
        }
        if source.contains("**") {
            return Err(CallGlobError::DoubleStar);
        }
        let pattern =
            glob::Pattern::new(source).map_err(|e| CallGlobError::Glob(e.msg.to_owned()))?;
        Ok(Self {
            source: source.to_owned(),
            pattern,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether the glob names the call `name` (`Service/Method`, as [`call_name`] reads it).
    pub fn matches(&self, name: &str) -> bool {
        self.pattern.matches_with(name, CALL_MATCH)
    }
}

impl fmt::Display for CallGlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn content_type(v: &str) -> Vec<Header> {
        vec![("Content-Type".into(), v.as_bytes().to_vec())]
    }

    #[test]
    fn grpc_calls_are_known_by_their_content_type() {
        for (value, grpc) in [
            ("application/grpc", true),
            ("application/grpc+proto", true),
            ("application/grpc+json", true),
            ("Application/GRPC", true),
            ("application/grpc; charset=utf-8", true),
            (" application/grpc+proto ", true),
            ("application/grpc+", false),
            ("application/grpc-web", false),
            ("application/grpc-web+proto", false),
            ("application/grpcx", false),
            ("application/json", false),
            ("application/grp", false),
            ("", false),
        ] {
            assert_eq!(is_grpc_call(&content_type(value)), grpc, "{value:?}");
        }
        assert!(!is_grpc_call(&[]));
        let other = vec![("x-content-type".into(), b"application/grpc".to_vec())];
        assert!(!is_grpc_call(&other));
    }

    #[test]
    fn call_names_are_read_strictly() {
        for (target, name) in [
            ("/shop.Orders/GetOrder", Some("shop.Orders/GetOrder")),
            ("/Greeter/SayHello", Some("Greeter/SayHello")),
            (
                "/grpc.health.v1.Health/Check",
                Some("grpc.health.v1.Health/Check"),
            ),
            ("/shop.Orders/GetOrder?x=1", None),
            ("/shop.Orders/Get%4frder", None),
            ("/shop.Orders/GetOrder/", None),
            ("/shop.Orders//GetOrder", None),
            ("//shop.Orders/GetOrder", None),
            ("/shop.Orders", None),
            ("/./GetOrder", None),
            ("/shop.Orders/..", None),
            ("/shop.Orders/Get;x", None),
            ("/shop.Orders/Get\\x", None),
            ("/shop.Orders/Get Order", None),
            ("shop.Orders/GetOrder", None),
            ("http://h/shop.Orders/GetOrder", None),
            ("*", None),
            ("", None),
        ] {
            assert_eq!(call_name(target), name, "{target:?}");
        }
    }

    #[test]
    fn globs_match_service_and_method_apart() {
        let get = CallGlob::new("shop.Orders/Get*").expect("valid");
        assert!(get.matches("shop.Orders/GetOrder"));
        assert!(get.matches("shop.Orders/Get"));
        assert!(!get.matches("shop.Orders/getOrder"), "case-sensitive");
        assert!(!get.matches("shop.Orders/CancelOrder"));
        assert!(!get.matches("shop.OrdersX/GetOrder"));
        let any_method = CallGlob::new("shop.*/List?").expect("valid");
        assert!(any_method.matches("shop.Orders/Lists"));
        assert!(!any_method.matches("shop.Orders/List"));
        let all = CallGlob::new("*/*").expect("valid");
        assert!(all.matches("a.B/C"));
        let health = CallGlob::new("grpc.health.v1.Health/[CW]*").expect("valid");
        assert!(health.matches("grpc.health.v1.Health/Check"));
        assert!(health.matches("grpc.health.v1.Health/Watch"));
        assert!(!health.matches("grpc.health.v1.Health/List"));
    }

    #[test]
    fn bad_globs_are_refused() {
        for (source, error) in [
            ("shop.Orders", CallGlobError::Shape),
            ("/shop.Orders/Get", CallGlobError::Shape),
            ("shop.Orders/", CallGlobError::Shape),
            ("/Get", CallGlobError::Shape),
            ("a/b/c", CallGlobError::Shape),
            ("a/b?x=1#", CallGlobError::Shape),
            ("a b/c", CallGlobError::Shape),
            ("shop.**/Get", CallGlobError::DoubleStar),
            ("*", CallGlobError::Shape),
            ("", CallGlobError::Shape),
        ] {
            assert_eq!(CallGlob::new(source).err(), Some(error), "{source:?}");
        }
        assert!(matches!(
            CallGlob::new("shop.Orders/[Get"),
            Err(CallGlobError::Glob(_))
        ));
    }

    proptest! {
        /// A glob never matches across the `/`: `*` on one side reads one name, so a method
        /// glob cannot be stretched over a service, and vice versa.
        #[test]
        fn a_star_stays_on_its_side(service in "[a-zA-Z.]{1,12}", method in "[a-zA-Z]{1,12}") {
            let name = format!("{service}/{method}");
            let star_method = CallGlob::new(&format!("{service}/*")).expect("valid");
            prop_assert!(star_method.matches(&name));
            let star_service = CallGlob::new(&format!("*/{method}")).expect("valid");
            prop_assert!(star_service.matches(&name));
            let deeper = format!("{service}/x/{method}");
            prop_assert!(!star_method.matches(&deeper));
            prop_assert!(!star_service.matches(&deeper));
        }

        /// Any target reads as a call name or as none, without panicking; a name read has the
        /// shape a glob is matched against.
        #[test]
        fn call_names_have_one_slash(target in ".{0,40}") {
            if let Some(name) = call_name(&target) {
                prop_assert_eq!(name.matches('/').count(), 1);
                prop_assert_eq!(format!("/{name}"), target);
            }
        }
    }
}
