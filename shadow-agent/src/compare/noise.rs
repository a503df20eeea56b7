//! Which differences are noise: learned per endpoint and field, so nobody has to keep an ignore
//! list.
//!
//! The scheme is Diffy's (primary, secondary, candidate). For every field two counts are kept:
//! `raw`, the exchanges where live and candidate differ in it, and `noise`, the observations
//! where two responses *of the same version* differ in it. Those come from a baseline target
//! running live's version (live against baseline, on every exchange that has one), or, without
//! a baseline, from identical requests seen again (live against live's previous response to the
//! same method, target and body; [`Fingerprints`] remembers those).
//!
//! A field is *noise* once its endpoint has at least `min_samples` noise observations and the
//! field differed in at least `noise_share` of them. A noisy field still counts as a regression
//! when the candidate differs in it clearly more often than the same version does: when the raw
//! rate exceeds the noise rate by more than `regression_margin` (Diffy reports a field when
//! `raw > noise` by an absolute and a relative threshold; one margin on the rates is the same
//! idea with one knob). A request id (noise rate near 1, raw rate near 1) never counts; a price
//! that used to change on a tenth of the repeated requests and now differs on all of them does.
//!
//! Headers and status codes are never noise: they are few, chosen, and stable by nature.

use std::collections::{BTreeMap, HashMap};

use super::json::{FlatLeaf, Leaf};

/// The thresholds of the decision, from [`super::CompareConfig`].
#[derive(Clone, Copy, Debug)]
pub struct NoiseRule {
    pub min_samples: u64,
    pub noise_share: f64,
    pub regression_margin: f64,
}

/// The counts behind one field's verdict.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FieldCounts {
    /// Exchanges where live and candidate differed in this field.
    pub raw: u64,
    /// Same-version observations where the field differed.
    pub noise: u64,
}

/// The counts of the field's endpoint that the rates are taken against.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointCounts {
    /// Exchanges whose bodies were compared (live and candidate with the same status).
    pub compared_bodies: u64,
    /// Same-version observations (baseline exchanges, identical requests seen again).
    pub noise_samples: u64,
}

impl NoiseRule {
    /// The share of same-version observations in which the field differed, once there are
    /// enough of them to judge.
    pub fn noise_rate(&self, field: FieldCounts, ep: EndpointCounts) -> Option<f64> {
        (ep.noise_samples >= self.min_samples.max(1))
            .then(|| field.noise as f64 / ep.noise_samples as f64)
    }

    /// Whether the field is noise: its candidate differences do not make an exchange a mismatch.
    pub fn is_noise(&self, field: FieldCounts, ep: EndpointCounts) -> bool {
        let Some(noise_rate) = self.noise_rate(field, ep) else {
            return false;
        };
        if noise_rate < self.noise_share {
            return false;
        }
        let raw_rate = field.raw as f64 / ep.compared_bodies.max(1) as f64;
        raw_rate - noise_rate <= self.regression_margin
    }
}

/// A remembered live response: its status and leaves, sorted by concrete path.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub endpoint: u32,
    /// The HTTP status, and for gRPC answers the `grpc-status` above it.
    pub status: u32,
    /// `(concrete path hash, field hash, value)`.
    pub leaves: Vec<(u64, u64, Leaf)>,
    /// Leaves were left out, so a leaf missing on one side proves nothing.
    pub partial: bool,
}

impl Snapshot {
    pub fn new(endpoint: u32, status: u32, leaves: &[FlatLeaf], partial: bool) -> Self {
        let mut l: Vec<_> = leaves
            .iter()
            .map(|f| (f.at, field_hash(&f.field), f.value))
            .collect();
        l.sort_by_key(|x| x.0);
        Self {
            endpoint,
            status,
            leaves: l,
            partial,
        }
    }

    /// The field hashes where two responses of the same version differ, each once.
    pub fn differing_fields(&self, newer: &Snapshot, tolerance: f64) -> Vec<u64> {
        let (a, b) = (&self.leaves, &newer.leaves);
        let partial = self.partial || newer.partial;
        let (mut i, mut j) = (0, 0);
        let mut out = Vec::new();
        while i < a.len() || j < b.len() {
            match (a.get(i), b.get(j)) {
                (Some(x), Some(y)) if x.0 == y.0 => {
                    if !x.2.equal(&y.2, tolerance) {
                        out.push(x.1);
                    }
                    i += 1;
                    j += 1;
                }
                (Some(x), y) if y.is_none_or(|y| x.0 < y.0) => {
                    if !partial {
                        out.push(x.1);
                    }
                    i += 1;
                }
                (_, Some(y)) => {
                    if !partial {
                        out.push(y.1);
                    }
                    j += 1;
                }
                _ => break,
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    pub fn memory_bytes(&self) -> usize {
        size_of::<Self>() + self.leaves.capacity() * size_of::<(u64, u64, Leaf)>()
    }
}

/// The key of a field in an endpoint's table: a hash of its path, so that remembered responses
/// need not keep path strings. Two paths sharing a hash would share counts; with 64 bits and at
/// most a few hundred fields per endpoint that does not happen by accident.
pub fn field_hash(field: &str) -> u64 {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut h = DefaultHasher::new();
    field.hash(&mut h);
    h.finish()
}

/// The last live response per request fingerprint, least recently used evicted first.
#[derive(Debug, Default)]
pub struct Fingerprints {
    capacity: usize,
    tick: u64,
    entries: HashMap<u64, (u64, Snapshot)>,
    by_age: BTreeMap<u64, u64>,
    bytes: usize,
}

impl Fingerprints {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            ..Self::default()
        }
    }

    /// Remembers `snapshot` for `fingerprint` and returns the one it replaces.
    pub fn replace(&mut self, fingerprint: u64, snapshot: Snapshot) -> Option<Snapshot> {
        if self.capacity == 0 {
            return None;
        }
        self.tick += 1;
        self.bytes += snapshot.memory_bytes();
        let old = self.entries.insert(fingerprint, (self.tick, snapshot));
        self.by_age.insert(self.tick, fingerprint);
        if let Some((age, old)) = &old {
            self.by_age.remove(age);
            self.bytes -= old.memory_bytes();
        }
        while self.entries.len() > self.capacity {
            let Some((_, oldest)) = self.by_age.pop_first() else {
                break;
            };
            if let Some((_, gone)) = self.entries.remove(&oldest) {
                self.bytes -= gone.memory_bytes();
            }
        }
        old.map(|(_, s)| s)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Approximate heap use: snapshots plus map entries.
    pub fn memory_bytes(&self) -> usize {
        self.bytes
            + self.entries.capacity() * (size_of::<(u64, (u64, Snapshot))>() + 8)
            + self.by_age.len() * (size_of::<(u64, u64)>() + 16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: NoiseRule = NoiseRule {
        min_samples: 10,
        noise_share: 0.5,
        regression_margin: 0.2,
    };

    #[test]
    fn verdicts() {
        let ep = |bodies, samples| EndpointCounts {
            compared_bodies: bodies,
            noise_samples: samples,
        };
        let f = |raw, noise| FieldCounts { raw, noise };
        // (field, endpoint, noise?)
        let cases = [
            // Too few same-version observations: everything counts.
            (f(9, 9), ep(9, 9), false),
            // A request id: differs everywhere.
            (f(100, 20), ep(100, 20), true),
            // Rarely noisy: below the share, the candidate's differences count.
            (f(50, 4), ep(100, 20), false),
            // Noisy on 60 %, candidate 70 %: within the margin.
            (f(70, 12), ep(100, 20), true),
            // Noisy on 50 %, candidate 100 %: clearly above.
            (f(100, 10), ep(100, 20), false),
        ];
        for (field, ep, want) in cases {
            assert_eq!(RULE.is_noise(field, ep), want, "{field:?} {ep:?}");
        }
    }

    fn snap(leaves: &[(u64, u64, i64)], partial: bool) -> Snapshot {
        Snapshot {
            endpoint: 0,
            status: 200,
            leaves: leaves
                .iter()
                .map(|&(a, f, v)| (a, f, Leaf::Int(v)))
                .collect(),
            partial,
        }
    }

    #[test]
    fn snapshots_differ_where_leaves_do() {
        let a = snap(&[(1, 10, 1), (2, 20, 2), (4, 40, 4)], false);
        let b = snap(&[(1, 10, 1), (2, 20, 3), (3, 30, 3)], false);
        assert_eq!(a.differing_fields(&b, 0.0), vec![20, 30, 40]);
        // Partial snapshots: missing leaves prove nothing.
        let b = snap(&[(1, 10, 1), (2, 20, 3), (3, 30, 3)], true);
        assert_eq!(a.differing_fields(&b, 0.0), vec![20]);
    }

    #[test]
    fn fingerprints_evict_the_least_recently_used() {
        let mut f = Fingerprints::new(2);
        assert!(f.replace(1, snap(&[], false)).is_none());
        assert!(f.replace(2, snap(&[], false)).is_none());
        assert!(f.replace(1, snap(&[], false)).is_some());
        // 2 is now the oldest.
        assert!(f.replace(3, snap(&[], false)).is_none());
        assert_eq!(f.len(), 2);
        assert!(f.replace(2, snap(&[], false)).is_none());
        assert!(
            f.replace(1, snap(&[], false)).is_none(),
            "1 was evicted by 2"
        );
    }
}
