//! Brings together, for one mirrored request, the live service's response (rebuilt from captured
//! packets), the shadow's answer and, when the route has one, the baseline's, so that they can be
//! compared. Pure: time is passed in; every entry is bounded in number and bytes and expires.
//!
//! What an entry keeps is its own allocation (`Box<[u8]>`, `String`), never a slice of a
//! captured body: a `Bytes` slice of 256 KiB can keep a body of 16 MiB alive, and the limits
//! would count the slice while the process holds the body. The bytes counted are the bytes held.
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use prometheus_client::encoding::DescriptorEncoder;

use crate::admin::export::{self, Export};
use crate::pipeline::FlowAddrs;
use crate::policy::path::RequestPath;

/// Which side of a comparison an answer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// The shadow: the version under test.
    Candidate,
    /// A target running the live version, to learn what differs by itself.
    Baseline,
}

/// A request mirrored for comparison: its connection and its number there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PairKey {
    pub flow: FlowAddrs,
    pub seq: u64,
}

/// One response, live or from a target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    /// Trailer fields (gRPC puts its status there); empty when there were none.
    pub trailers: Vec<(String, Vec<u8>)>,
    /// At most the comparison's body limit, copied out of what was received;
    /// `body_truncated` says when more was sent.
    pub body: Box<[u8]>,
    pub body_truncated: bool,
    pub latency: Duration,
}

impl Answer {
    /// The bytes it holds: allocations at their capacity.
    fn bytes(&self) -> usize {
        size_of::<Self>()
            + self.body.len()
            + fields_bytes(&self.headers)
            + fields_bytes(&self.trailers)
    }
}

fn fields_bytes(fields: &[(String, Vec<u8>)]) -> usize {
    size_of_val(fields)
        + fields
            .iter()
            .map(|(n, v)| n.capacity() + v.capacity())
            .sum::<usize>()
}

/// Everything needed to compare one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Complete {
    /// The name of the route that mirrored it.
    pub route: Box<str>,
    pub method: String,
    pub target: String,
    /// The live server's workload, `namespace/Kind/name`, on Kubernetes.
    pub server: Option<Box<str>>,
    /// The path the policy read to mirror the request.
    pub path: RequestPath,
    pub request_body: Box<[u8]>,
    /// The request's headers, as many as a sample keeps.
    pub request_headers: Box<[(String, Vec<u8>)]>,
    pub live: Answer,
    pub candidate: Answer,
    pub baseline: Option<Answer>,
}

/// A request that was just mirrored, as a comparison waits for its answers.
#[derive(Clone, Debug)]
pub struct Expected<'a> {
    /// The name of the route that mirrored it.
    pub route: &'a str,
    pub method: &'a str,
    /// Origin-form, with the query.
    pub target: &'a str,
    /// The path the policy read to mirror the request.
    pub path: RequestPath,
    pub body: &'a [u8],
    /// The request's headers: those that fit in [`super::sample::SAMPLE_HEAD_BYTES`] are
    /// copied.
    pub headers: &'a [(String, Vec<u8>)],
    /// The capture time of its last byte: the live latency runs from there.
    pub done: Duration,
    /// Whether a baseline's answer comes too.
    pub baseline: bool,
    /// The live server's workload, `namespace/Kind/name`, when a known pod served it.
    pub server: Option<&'a str>,
}

/// What became of pending comparisons, for counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PairingCounters {
    /// Comparisons completed.
    pub completed: u64,
    /// Given up: a part never came within the time allowed (a failed copy, a response the
    /// capture missed).
    pub expired: u64,
    /// Given up to stay within the limits.
    pub evicted: u64,
    /// Answers for requests not (or no longer) pending.
    pub orphans: u64,
}

struct Pending {
    route: Box<str>,
    method: String,
    target: String,
    server: Option<Box<str>>,
    path: RequestPath,
    /// A copy: the captured body may be larger than its length (a buffer grown by doubling),
    /// and the copies to targets that share it are gone long before the comparison.
    request_body: Box<[u8]>,
    request_headers: Box<[(String, Vec<u8>)]>,
    /// When the request's last byte was captured: the live latency runs from there.
    request_done: Duration,
    expect_baseline: bool,
    live: Option<Answer>,
    candidate: Option<Answer>,
    baseline: Option<Answer>,
    created: Instant,
}

/// The leading headers that fit in what a sample keeps: the rest would be dropped there anyway.
fn head_for_sample(headers: &[(String, Vec<u8>)]) -> Box<[(String, Vec<u8>)]> {
    let mut room = super::sample::SAMPLE_HEAD_BYTES;
    headers
        .iter()
        .take_while(|(n, v)| {
            let cost = n.len() + v.len() + 4;
            room = room.saturating_sub(cost);
            room > 0
        })
        .cloned()
        .collect()
}

impl Pending {
    /// The bytes it holds.
    fn bytes(&self) -> usize {
        size_of::<Self>()
            + self.route.len()
            + self.method.capacity()
            + self.target.capacity()
            + self.server.as_ref().map_or(0, |s| s.len())
            + self.path.as_str().len()
            + self.request_body.len()
            + self
                .request_headers
                .iter()
                .map(|(n, v)| size_of::<(String, Vec<u8>)>() + n.capacity() + v.capacity())
                .sum::<usize>()
            + [&self.live, &self.candidate, &self.baseline]
                .iter()
                .filter_map(|a| a.as_ref().map(Answer::bytes))
                .sum::<usize>()
    }

    fn is_complete(&self) -> bool {
        self.live.is_some()
            && self.candidate.is_some()
            && (!self.expect_baseline || self.baseline.is_some())
    }
}

/// Pending comparisons, oldest first.
pub struct Pairing {
    pending: HashMap<PairKey, Pending>,
    /// Keys in order of creation; entries already gone are skipped when met.
    order: VecDeque<(Instant, PairKey)>,
    bytes: usize,
    max_entries: usize,
    max_bytes: usize,
    timeout: Duration,
    counters: PairingCounters,
}

impl Pairing {
    /// At most `max_entries` comparisons and `max_bytes` pending at once; a part that has not
    /// come within `timeout` of the request ends its comparison.
    pub fn new(max_entries: usize, max_bytes: usize, timeout: Duration) -> Self {
        Self {
            pending: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            max_entries: max_entries.max(1),
            max_bytes,
            timeout,
            counters: PairingCounters::default(),
        }
    }

    pub fn counters(&self) -> PairingCounters {
        self.counters
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Bytes held by pending comparisons.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Starts a comparison for a request that was just mirrored; `request_done` is the capture
    /// time of its last byte. The request's body is copied.
    pub fn expect(&mut self, now: Instant, key: PairKey, request: Expected<'_>) {
        let entry = Pending {
            route: request.route.into(),
            method: request.method.to_owned(),
            target: request.target.to_owned(),
            server: request.server.map(Into::into),
            path: request.path,
            request_body: request.body.into(),
            request_headers: head_for_sample(request.headers),
            request_done: request.done,
            expect_baseline: request.baseline,
            live: None,
            candidate: None,
            baseline: None,
            created: now,
        };
        self.bytes += entry.bytes();
        if let Some(old) = self.pending.insert(key, entry) {
            self.bytes = self.bytes.saturating_sub(old.bytes());
            self.counters.evicted += 1;
        }
        self.order.push_back((now, key));
        self.enforce_limits();
    }

    /// The live response to the request `key`, captured when its last byte was (`done`).
    pub fn live(&mut self, key: PairKey, mut answer: Answer, done: Duration) -> Option<Complete> {
        let Some(entry) = self.pending.get(&key) else {
            // Responses to requests that were not mirrored are the common case: not orphans.
            return None;
        };
        answer.latency = done.saturating_sub(entry.request_done);
        self.fill(key, |p| &mut p.live, answer)
    }

    /// A target's answer to the copy of `key`.
    pub fn answer(&mut self, key: PairKey, role: Role, answer: Answer) -> Option<Complete> {
        if !self.pending.contains_key(&key) {
            self.counters.orphans += 1;
            return None;
        }
        match role {
            Role::Candidate => self.fill(key, |p| &mut p.candidate, answer),
            Role::Baseline => self.fill(key, |p| &mut p.baseline, answer),
        }
    }

    /// Gives up comparisons older than the timeout at `now`.
    pub fn expire(&mut self, now: Instant) {
        while let Some(&(created, key)) = self.order.front() {
            if now.saturating_duration_since(created) < self.timeout {
                break;
            }
            self.order.pop_front();
            if self.pending.get(&key).is_some_and(|p| p.created == created) {
                self.remove(key);
                self.counters.expired += 1;
            }
        }
    }

    fn fill(
        &mut self,
        key: PairKey,
        slot: impl FnOnce(&mut Pending) -> &mut Option<Answer>,
        answer: Answer,
    ) -> Option<Complete> {
        let entry = self.pending.get_mut(&key)?;
        let added = answer.bytes();
        let slot = slot(entry);
        if let Some(old) = slot.replace(answer) {
            self.bytes = self.bytes.saturating_sub(old.bytes());
        }
        self.bytes += added;
        if !entry.is_complete() {
            self.enforce_limits();
            return None;
        }
        let done = self.remove(key)?;
        self.counters.completed += 1;
        Some(Complete {
            route: done.route,
            method: done.method,
            target: done.target,
            server: done.server,
            path: done.path,
            request_body: done.request_body,
            request_headers: done.request_headers,
            live: done.live?,
            candidate: done.candidate?,
            baseline: done.baseline,
        })
    }

    fn remove(&mut self, key: PairKey) -> Option<Pending> {
        let entry = self.pending.remove(&key)?;
        self.bytes = self.bytes.saturating_sub(entry.bytes());
        Some(entry)
    }

    /// Drops the oldest comparisons until both limits hold.
    fn enforce_limits(&mut self) {
        while self.pending.len() > self.max_entries || self.bytes > self.max_bytes {
            let Some((created, key)) = self.order.pop_front() else {
                break;
            };
            if self.pending.get(&key).is_some_and(|p| p.created == created) {
                self.remove(key);
                self.counters.evicted += 1;
            }
        }
        // The order list only holds live keys and stale markers of replaced ones; keep it from
        // growing past a multiple of the live entries.
        if self.order.len() > 2 * self.max_entries + 16 {
            let pending = &self.pending;
            self.order
                .retain(|(created, key)| pending.get(key).is_some_and(|p| p.created == *created));
        }
    }
}

impl Export for PairingCounters {
    fn export(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        export::counters(
            e,
            "compare_incomplete",
            "Comparisons given up: a part did not come in time (expired), limits (evicted), or an \
             answer for no pending request (orphan).",
            None,
            [
                ("expired", self.expired),
                ("evicted", self.evicted),
                ("orphan", self.orphans),
            ]
            .into_iter()
            .map(|(r, n)| (vec![("reason", r.to_owned())], n)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seq: u64) -> PairKey {
        PairKey {
            flow: FlowAddrs::new(
                "198.18.0.1:40000".parse().expect("addr"),
                "198.18.0.2:80".parse().expect("addr"),
            ),
            seq,
        }
    }

    fn answer(status: u16, body: &'static [u8]) -> Answer {
        Answer {
            status,
            headers: vec![("content-type".into(), b"application/json".to_vec())],
            trailers: Vec::new(),
            body: body.into(),
            body_truncated: false,
            latency: Duration::from_millis(5),
        }
    }

    fn expect(p: &mut Pairing, now: Instant, seq: u64, baseline: bool) {
        p.expect(
            now,
            key(seq),
            Expected {
                route: "r",
                method: "GET",
                target: "/x",
                path: RequestPath::of_target("/x").expect("readable"),
                body: b"",
                headers: &[],
                done: Duration::from_millis(100),
                baseline,
                server: None,
            },
        );
    }

    #[test]
    fn parts_in_any_order_complete_once() {
        let now = Instant::now();
        let mut p = Pairing::new(100, 1 << 20, Duration::from_secs(5));
        expect(&mut p, now, 1, true);
        assert_eq!(p.answer(key(1), Role::Candidate, answer(200, b"{}")), None);
        assert_eq!(p.answer(key(1), Role::Baseline, answer(200, b"{}")), None);
        let done = p
            .live(key(1), answer(200, b"{}"), Duration::from_millis(103))
            .expect("complete");
        assert_eq!(done.live.latency, Duration::from_millis(3));
        assert!(done.baseline.is_some());
        assert!(p.is_empty());
        assert_eq!(p.bytes(), 0);
        // A late duplicate is an orphan.
        assert_eq!(p.answer(key(1), Role::Candidate, answer(200, b"{}")), None);
        assert_eq!(p.counters().orphans, 1);
        assert_eq!(p.counters().completed, 1);
    }

    #[test]
    fn live_responses_of_unmirrored_requests_are_ignored() {
        let mut p = Pairing::new(100, 1 << 20, Duration::from_secs(5));
        assert_eq!(p.live(key(9), answer(200, b""), Duration::ZERO), None);
        assert_eq!(p.counters(), PairingCounters::default());
    }

    #[test]
    fn missing_parts_expire() {
        let now = Instant::now();
        let mut p = Pairing::new(100, 1 << 20, Duration::from_secs(5));
        expect(&mut p, now, 1, false);
        p.live(key(1), answer(200, b"{}"), Duration::from_millis(101));
        p.expire(now + Duration::from_secs(4));
        assert_eq!(p.len(), 1);
        p.expire(now + Duration::from_secs(5));
        assert!(p.is_empty());
        assert_eq!(p.bytes(), 0);
        assert_eq!(p.counters().expired, 1);
    }

    #[test]
    fn limits_evict_the_oldest() {
        let now = Instant::now();
        let mut p = Pairing::new(3, 1 << 20, Duration::from_secs(5));
        for seq in 0..10 {
            expect(&mut p, now, seq, false);
        }
        assert_eq!(p.len(), 3);
        assert_eq!(p.counters().evicted, 7);
        // The newest remain.
        assert!(p.pending.contains_key(&key(9)));
        // Bytes: big answers push old entries out.
        let mut p = Pairing::new(100, 4096, Duration::from_secs(5));
        for seq in 0..4 {
            expect(&mut p, now, seq, false);
            let body: &'static [u8] = &[b'x'; 1500];
            p.answer(key(seq), Role::Candidate, answer(200, body));
        }
        assert!(p.bytes() <= 4096, "{}", p.bytes());
        assert!(p.counters().evicted >= 1);
    }

    #[test]
    fn request_bodies_count_against_the_limit() {
        let now = Instant::now();
        let mut p = Pairing::new(100, 64 << 10, Duration::from_secs(5));
        let body = vec![b'x'; 30_000];
        for seq in 0..4 {
            let path = RequestPath::of_target("/x").expect("readable");
            p.expect(
                now,
                key(seq),
                Expected {
                    route: "r",
                    method: "POST",
                    target: "/x",
                    path,
                    body: &body,
                    headers: &[],
                    done: Duration::ZERO,
                    baseline: false,
                    server: None,
                },
            );
        }
        assert!(p.bytes() <= 64 << 10, "{}", p.bytes());
        assert_eq!((p.len(), p.counters().evicted), (2, 2));
    }

    #[test]
    fn the_order_list_stays_bounded_under_replacement() {
        let now = Instant::now();
        let mut p = Pairing::new(4, 1 << 20, Duration::from_secs(5));
        for i in 0..10_000u64 {
            expect(&mut p, now + Duration::from_nanos(i), i % 2, false);
        }
        assert!(p.order.len() <= 2 * 4 + 16);
        assert_eq!(p.len(), 2);
    }
}
