//! Which network interfaces to attach to: exact names and globs such as `veth*`, resolved against
//! the interfaces that exist now and again whenever new ones appear.
use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
};

use thiserror::Error;

/// Link types whose frames start with an Ethernet header, which the kernel program expects.
const ARPHRD_ETHER: u32 = 1;
const ARPHRD_LOOPBACK: u32 = 772;

#[derive(Debug, Error)]
pub enum InterfaceError {
    #[error("unknown interface `{0}` (see `ip link`)")]
    Unknown(String),
    #[error(
        "interface `{name}` has link type {link_type}, not Ethernet: shadow captures Ethernet, \
         veth and loopback interfaces only"
    )]
    NotEthernet { name: String, link_type: u32 },
    #[error("invalid interface pattern `{pattern}`: {reason}")]
    BadPattern { pattern: String, reason: String },
    #[error("cannot list network interfaces in {path}: {source}")]
    List { path: PathBuf, source: io::Error },
}

/// A network interface of this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub ifindex: u32,
    pub link_type: u32,
}

impl Interface {
    /// Every packet on a loopback interface passes its egress and then its ingress hook.
    pub fn is_loopback(&self) -> bool {
        self.link_type == ARPHRD_LOOPBACK
    }

    pub fn is_ethernet(&self) -> bool {
        matches!(self.link_type, ARPHRD_ETHER | ARPHRD_LOOPBACK)
    }
}

/// One `interfaces` entry: an exact name or a glob.
#[derive(Clone, Debug)]
enum Pattern {
    Exact(String),
    Glob(glob::Pattern),
}

/// The configured interface names and globs.
#[derive(Clone, Debug)]
pub struct InterfaceSelector {
    patterns: Vec<Pattern>,
}

impl InterfaceSelector {
    /// Parses the patterns. Exact names must be valid interface names; they need not exist yet.
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Self, InterfaceError> {
        let patterns = patterns
            .iter()
            .map(|p| {
                let p = p.as_ref();
                let bad = |reason: &str| InterfaceError::BadPattern {
                    pattern: p.to_owned(),
                    reason: reason.to_owned(),
                };
                if p.is_empty() || p.len() > 15 && !p.contains(['*', '?', '[']) {
                    return Err(bad("interface names have 1 to 15 characters"));
                }
                if p.contains(['/', ' ', '\0']) {
                    return Err(bad("interface names contain no `/`, space or NUL"));
                }
                if p.contains(['*', '?', '[']) {
                    glob::Pattern::new(p)
                        .map(Pattern::Glob)
                        .map_err(|e| bad(&e.to_string()))
                } else {
                    Ok(Pattern::Exact(p.to_owned()))
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { patterns })
    }

    pub fn matches(&self, name: &str) -> bool {
        self.patterns.iter().any(|p| match p {
            Pattern::Exact(n) => n == name,
            Pattern::Glob(g) => g.matches(name),
        })
    }

    /// Checks that every exact name exists and is Ethernet-framed: a typo is an error at start,
    /// not a capture that silently never begins.
    pub fn check_exact(&self, present: &[Interface]) -> Result<(), InterfaceError> {
        for p in &self.patterns {
            if let Pattern::Exact(name) = p {
                let iface = present
                    .iter()
                    .find(|i| &i.name == name)
                    .ok_or_else(|| InterfaceError::Unknown(name.clone()))?;
                if !iface.is_ethernet() {
                    return Err(InterfaceError::NotEthernet {
                        name: name.clone(),
                        link_type: iface.link_type,
                    });
                }
            }
        }
        Ok(())
    }

    /// The present interfaces this selector picks, Ethernet-framed only, by ifindex.
    pub fn select(&self, present: &[Interface]) -> BTreeMap<u32, Interface> {
        present
            .iter()
            .filter(|i| i.is_ethernet() && self.matches(&i.name))
            .map(|i| (i.ifindex, i.clone()))
            .collect()
    }
}

/// Lists this network namespace's interfaces from sysfs.
pub fn list() -> Result<Vec<Interface>, InterfaceError> {
    list_in(Path::new("/sys/class/net"))
}

fn list_in(root: &Path) -> Result<Vec<Interface>, InterfaceError> {
    let err = |source| InterfaceError::List {
        path: root.to_owned(),
        source,
    };
    let mut out = Vec::new();
    for entry in fs::read_dir(root).map_err(err)? {
        let entry = entry.map_err(err)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let read = |file: &str| -> Option<u32> {
            fs::read_to_string(entry.path().join(file))
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        // An interface that vanishes between the listing and the reads is simply not there.
        if let (Some(ifindex), Some(link_type)) = (read("ifindex"), read("type")) {
            out.push(Interface {
                name,
                ifindex,
                link_type,
            });
        }
    }
    out.sort_by_key(|i| i.ifindex);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(name: &str, ifindex: u32, link_type: u32) -> Interface {
        Interface {
            name: name.into(),
            ifindex,
            link_type,
        }
    }

    #[test]
    fn exact_and_glob() {
        let present = [
            iface("lo", 1, ARPHRD_LOOPBACK),
            iface("eth0", 2, ARPHRD_ETHER),
            iface("veth1a", 3, ARPHRD_ETHER),
            iface("veth2b", 4, ARPHRD_ETHER),
            iface("tun0", 5, 65534),
            iface("vethtun", 6, 65534),
        ];
        let s = InterfaceSelector::new(&["lo", "veth*"]).expect("valid");
        let picked: Vec<_> = s.select(&present).into_values().map(|i| i.name).collect();
        assert_eq!(picked, ["lo", "veth1a", "veth2b"]);
        s.check_exact(&present).expect("lo exists");
    }

    #[test]
    fn unknown_and_non_ethernet_exact_names_are_errors() {
        let present = [iface("tun0", 5, 65534)];
        let s = InterfaceSelector::new(&["nosuch0"]).expect("valid");
        assert!(matches!(
            s.check_exact(&present),
            Err(InterfaceError::Unknown(_))
        ));
        let s = InterfaceSelector::new(&["tun0"]).expect("valid");
        assert!(matches!(
            s.check_exact(&present),
            Err(InterfaceError::NotEthernet { .. })
        ));
    }

    #[test]
    fn bad_patterns() {
        for p in ["", "a/b", "this-name-is-far-too-long", "veth[", "a b"] {
            assert!(InterfaceSelector::new(&[p]).is_err(), "{p}");
        }
    }

    #[test]
    fn lists_this_host() {
        let all = list().expect("sysfs");
        assert!(all.iter().any(|i| i.name == "lo" && i.is_ethernet()));
    }
}
