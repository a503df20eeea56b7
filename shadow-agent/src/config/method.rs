//! The request methods a configuration may name, checked where they are read.
//!
//! A captured request's method stays the bytes the client sent (`&str`); the policy reads it
//! once per request with [`Method::from_name`], and a method no configuration can name (WebDAV's
//! `PROPFIND`, a typo, junk) is in no [`Methods`] set, so no route allows it.
use std::fmt;
use std::str::FromStr;

/// A method a route may allow or match. CONNECT opens a tunnel and is never mirrored, so it
/// is not one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Method {
    Get,
    Head,
    Options,
    Post,
    Put,
    Patch,
    Delete,
    Trace,
}

impl Method {
    pub const ALL: [Method; 8] = [
        Method::Get,
        Method::Head,
        Method::Options,
        Method::Post,
        Method::Put,
        Method::Patch,
        Method::Delete,
        Method::Trace,
    ];

    /// The method `name` spells, exactly: methods are case-sensitive (RFC 9110 section 9.1),
    /// and a server reads `get` as another method than `GET`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.as_str() == name)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Options => "OPTIONS",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
            Method::Trace => "TRACE",
        }
    }

    /// Safe in RFC 9110's sense, and mirrored by default: a copy of it changes nothing, so it is
    /// sent without an idempotency key.
    pub fn is_safe(self) -> bool {
        Methods::SAFE.contains(self)
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a configured method name was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MethodError {
    #[error("CONNECT is never mirrored")]
    Connect,
    #[error(
        "unknown method `{0}`; expected one of GET, HEAD, OPTIONS, POST, PUT, PATCH, DELETE, TRACE"
    )]
    Unknown(String),
}

impl FromStr for Method {
    type Err = MethodError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match Self::from_name(s) {
            Some(m) => Ok(m),
            None if s == "CONNECT" => Err(MethodError::Connect),
            None => Err(MethodError::Unknown(s.to_owned())),
        }
    }
}

/// A set of [`Method`]s: a route's `allow_methods` and `match.methods`. Asked once per
/// captured request, so a bit each rather than a tree of strings.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct Methods(u8);

impl Methods {
    /// What a route mirrors when it does not say otherwise: GET, HEAD and OPTIONS.
    pub const SAFE: Self =
        Self(1 << Method::Get as u8 | 1 << Method::Head as u8 | 1 << Method::Options as u8);

    pub fn contains(self, method: Method) -> bool {
        self.0 & method.bit() != 0
    }

    /// Whether the captured method `name` is in the set; a name that is no [`Method`] never is.
    pub fn contains_name(self, name: &str) -> bool {
        Method::from_name(name).is_some_and(|m| self.contains(m))
    }

    pub fn insert(&mut self, method: Method) {
        self.0 |= method.bit();
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// In [`Method::ALL`]'s order.
    pub fn iter(self) -> impl Iterator<Item = Method> {
        Method::ALL.into_iter().filter(move |m| self.contains(*m))
    }
}

impl FromIterator<Method> for Methods {
    fn from_iter<I: IntoIterator<Item = Method>>(iter: I) -> Self {
        let mut set = Methods::default();
        for m in iter {
            set.insert(m);
        }
        set
    }
}

impl fmt::Debug for Methods {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl fmt::Display for Methods {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, m) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(m.as_str())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_round_trip() {
        for m in Method::ALL {
            assert_eq!(m.as_str().parse::<Method>(), Ok(m));
            assert_eq!(Method::from_name(&m.to_string()), Some(m));
        }
        assert_eq!("CONNECT".parse::<Method>(), Err(MethodError::Connect));
        assert_eq!(
            "get".parse::<Method>(),
            Err(MethodError::Unknown("get".into()))
        );
        assert_eq!(Method::from_name("PROPFIND"), None);
    }

    #[test]
    fn safe_ones() {
        let safe: Vec<_> = Method::ALL.into_iter().filter(|m| m.is_safe()).collect();
        assert_eq!(safe, [Method::Get, Method::Head, Method::Options]);
        assert_eq!(Methods::SAFE.to_string(), "GET, HEAD, OPTIONS");
    }

    proptest! {
        #[test]
        fn set_is_the_members_inserted(picks in proptest::collection::vec(0usize..8, 0..12), probe in "[A-Z]{0,8}") {
            let set: Methods = picks.iter().map(|&i| Method::ALL[i]).collect();
            for m in Method::ALL {
                prop_assert_eq!(set.contains(m), picks.iter().any(|&i| Method::ALL[i] == m));
            }
            prop_assert_eq!(set.is_empty(), picks.is_empty());
            prop_assert_eq!(
                set.contains_name(&probe),
                Method::from_name(&probe).is_some_and(|m| set.contains(m))
            );
            prop_assert_eq!(set.iter().count(), set.iter().collect::<std::collections::BTreeSet<_>>().len());
        }
    }
}
