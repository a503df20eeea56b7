//! Which admin connections stay open. Pure, with time passed in.
//!
//! The endpoint is what a kubelet probes, so no client may keep a probe out, however many
//! connections it opens and however slowly it sends. Every connection is accepted at once into a
//! table of at most [`ConnectionLimits::capacity`]; when the table is full, the connection that
//! has waited longest for a request is closed to make room. A probe sends its request the moment
//! it connects, so it is the newest connection and the last to be closed: connections opened
//! before it, idle or trickling a request byte by byte, go first, and to push it out a client
//! would have to open `capacity` new connections between the probe's connect and its request.
//! A limit that refuses new connections instead (a semaphore before `accept`) lets the oldest
//! idle ones keep every slot.
//!
//! Every connection also has a deadline: a whole request head within
//! [`ConnectionLimits::head_timeout`] of the connect, and the next one within
//! [`ConnectionLimits::idle_timeout`] of the previous request (which is answered at once), so
//! nothing is held open for long even when there is room. One clock and one table decide both,
//! rather than hyper's `header_read_timeout`, which only closes a connection whose head is late
//! and frees no slot for a waiting probe.
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// How many connections the endpoint holds, and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections open at once; at least 1.
    pub capacity: usize,
    /// From the connect to the end of the first request head.
    pub head_timeout: Duration,
    /// From a request to the end of the next request head (keep-alive).
    pub idle_timeout: Duration,
}

impl Default for ConnectionLimits {
    /// A kubelet, a Prometheus and a few people running `shadow-agent status` need a handful of
    /// connections; their requests come at once, and Prometheus scrapes at most every few
    /// seconds.
    fn default() -> Self {
        Self {
            capacity: 64,
            head_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(15),
        }
    }
}

/// Names one admitted connection; never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnectionId(u64);

/// Why the table closed a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closed {
    /// The table was full and a newer connection needed the room.
    Shed,
    /// No whole request head within `head_timeout` of the connect.
    HeadTimeout,
    /// No next request within `idle_timeout` of the previous one.
    IdleTimeout,
}

#[derive(Debug)]
struct Entry<T> {
    /// The connect, or the last request: what the connection waits since.
    since: Instant,
    /// Whether it has had a request, which makes its deadline the idle one.
    answered: bool,
    handle: T,
}

/// The open connections, each with what closes it (`T`, e.g. the sender whose drop ends its
/// task): at most `capacity`.
#[derive(Debug)]
pub struct ConnectionTable<T> {
    limits: ConnectionLimits,
    next: u64,
    open: BTreeMap<ConnectionId, Entry<T>>,
}

impl<T> ConnectionTable<T> {
    /// An empty table; a `capacity` of 0 counts as 1.
    pub fn new(limits: ConnectionLimits) -> Self {
        Self {
            limits: ConnectionLimits {
                capacity: limits.capacity.max(1),
                ..limits
            },
            next: 0,
            open: BTreeMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// Admits a connection made at `now`. When the table is full, the connection waiting
    /// longest for a request (the oldest connect or last request; the older id on a tie) leaves
    /// it, and its handle is returned to be closed.
    pub fn admit(&mut self, now: Instant, handle: T) -> (ConnectionId, Option<T>) {
        let shed = if self.open.len() >= self.limits.capacity {
            self.open
                .iter()
                .min_by_key(|(id, e)| (e.since, **id))
                .map(|(id, _)| *id)
                .and_then(|id| self.open.remove(&id))
                .map(|e| e.handle)
        } else {
            None
        };
        let id = ConnectionId(self.next);
        self.next += 1;
        self.open.insert(
            id,
            Entry {
                since: now,
                answered: false,
                handle,
            },
        );
        (id, shed)
    }

    /// A request head arrived on `id` at `now` (and is answered at once): the connection now
    /// waits for its next request. Unknown ids (closed meanwhile) are ignored; time going
    /// backwards moves nothing.
    pub fn request(&mut self, id: ConnectionId, now: Instant) {
        if let Some(e) = self.open.get_mut(&id) {
            e.since = e.since.max(now);
            e.answered = true;
        }
    }

    /// `id` ended by itself (the client closed it, or an error); returns its handle if it was
    /// still in the table.
    pub fn remove(&mut self, id: ConnectionId) -> Option<T> {
        self.open.remove(&id).map(|e| e.handle)
    }

    /// Removes every connection (the endpoint stops); returns their handles.
    pub fn close_all(&mut self) -> Vec<T> {
        std::mem::take(&mut self.open)
            .into_values()
            .map(|e| e.handle)
            .collect()
    }

    /// The earliest deadline of an open connection: when [`ConnectionTable::expire`] next has
    /// something to do. Requests only move deadlines later, and new connections come with
    /// their own, so waiting until this (or the next admission) misses none.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.open.values().map(|e| self.deadline(e)).min()
    }

    /// Removes every connection whose deadline is at or before `now`, with why.
    pub fn expire(&mut self, now: Instant) -> Vec<(T, Closed)> {
        let due: Vec<(ConnectionId, Closed)> = self
            .open
            .iter()
            .filter(|(_, e)| self.deadline(e) <= now)
            .map(|(id, e)| {
                let why = if e.answered {
                    Closed::IdleTimeout
                } else {
                    Closed::HeadTimeout
                };
                (*id, why)
            })
            .collect();
        due.into_iter()
            .filter_map(|(id, why)| self.open.remove(&id).map(|e| (e.handle, why)))
            .collect()
    }

    fn deadline(&self, e: &Entry<T>) -> Instant {
        let timeout = if e.answered {
            self.limits.idle_timeout
        } else {
            self.limits.head_timeout
        };
        e.since + timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMITS: ConnectionLimits = ConnectionLimits {
        capacity: 3,
        head_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(15),
    };

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn a_full_table_sheds_the_connection_waiting_longest() {
        let t0 = Instant::now();
        let mut table = ConnectionTable::new(LIMITS);
        let (a, _) = table.admit(at(t0, 0), "a");
        let (_, _) = table.admit(at(t0, 10), "b");
        let (_, _) = table.admit(at(t0, 20), "c");
        // `a` had a request after `b` connected: `b` has waited longest now.
        table.request(a, at(t0, 30));
        let (_, shed) = table.admit(at(t0, 40), "d");
        assert_eq!(shed, Some("b"));
        let (_, shed) = table.admit(at(t0, 50), "e");
        assert_eq!(shed, Some("c"));
        let (_, shed) = table.admit(at(t0, 60), "f");
        assert_eq!(shed, Some("a"));
        assert_eq!(table.len(), 3);
    }

    #[test]
    fn connections_close_at_their_head_or_idle_deadline() {
        let t0 = Instant::now();
        let mut table = ConnectionTable::new(LIMITS);
        let (silent, _) = table.admit(t0, "silent");
        let (kept, _) = table.admit(t0, "kept");
        table.request(kept, at(t0, 1_000));
        assert_eq!(table.next_deadline(), Some(at(t0, 5_000)));
        assert!(table.expire(at(t0, 4_999)).is_empty());
        assert_eq!(
            table.expire(at(t0, 5_000)),
            vec![("silent", Closed::HeadTimeout)]
        );
        assert_eq!(table.remove(silent), None);
        assert_eq!(table.next_deadline(), Some(at(t0, 16_000)));
        assert!(table.expire(at(t0, 15_999)).is_empty());
        assert_eq!(
            table.expire(at(t0, 16_000)),
            vec![("kept", Closed::IdleTimeout)]
        );
        assert!(table.is_empty());
        assert_eq!(table.next_deadline(), None);
    }

    #[test]
    fn a_removed_connection_frees_its_place_and_ignores_requests() {
        let t0 = Instant::now();
        let mut table = ConnectionTable::new(ConnectionLimits {
            capacity: 0,
            ..LIMITS
        });
        let (a, shed) = table.admit(t0, 1);
        assert_eq!(shed, None, "a capacity of 0 holds one");
        assert_eq!(table.remove(a), Some(1));
        table.request(a, at(t0, 1));
        assert!(table.is_empty());
        let (_, shed) = table.admit(at(t0, 2), 2);
        assert_eq!(shed, None);
    }

    #[derive(Clone, Debug)]
    enum Step {
        /// A new connection, `ms` after the previous step.
        Connect(u64),
        /// A request on the i-th connection ever admitted (if still open).
        Request(usize, u64),
        /// The i-th connection ends by itself.
        Leave(usize),
        /// Time passes; expired connections are closed.
        Sweep(u64),
    }

    fn steps() -> impl Strategy<Value = Vec<Step>> {
        prop::collection::vec(
            prop_oneof![
                4 => (0u64..2_000).prop_map(Step::Connect),
                3 => (0usize..64, 0u64..2_000).prop_map(|(i, ms)| Step::Request(i, ms)),
                1 => (0usize..64).prop_map(Step::Leave),
                1 => (0u64..20_000).prop_map(Step::Sweep),
            ],
            0..200,
        )
    }

    proptest! {
        /// Whatever clients do: the table never holds more than its capacity; admission never
        /// fails; a connection is shed only when the table is full, and then it is one that
        /// has waited at least as long as every other; the newest connection survives until
        /// `capacity` newer ones arrive or its deadline passes; and no connection outlives its
        /// deadline past a sweep.
        #[test]
        fn bounded_and_the_newest_survives(capacity in 1usize..6, steps in steps()) {
            let limits = ConnectionLimits { capacity, ..LIMITS };
            let mut table = ConnectionTable::new(limits);
            let t0 = Instant::now();
            let mut now = t0;
            // The model: per admitted connection, (since, answered), while open.
            let mut model: Vec<Option<(Instant, bool)>> = Vec::new();
            let mut ids = Vec::new();
            for step in steps {
                match step {
                    Step::Connect(ms) => {
                        now += Duration::from_millis(ms);
                        let full = table.len() == capacity;
                        let (id, shed) = table.admit(now, model.len());
                        prop_assert_eq!(shed.is_some(), full);
                        if let Some(victim) = shed {
                            let (since, _) = model[victim].expect("shed an open connection");
                            for other in model.iter().flatten() {
                                prop_assert!(since <= other.0);
                            }
                            model[victim] = None;
                        }
                        model.push(Some((now, false)));
                        ids.push(id);
                        prop_assert!(table.len() <= capacity);
                    }
                    Step::Request(i, ms) => {
                        now += Duration::from_millis(ms);
                        if let Some(id) = ids.get(i) {
                            table.request(*id, now);
                            if let Some(Some(entry)) = model.get_mut(i) {
                                *entry = (now, true);
                            }
                        }
                    }
                    Step::Leave(i) => {
                        if let Some(id) = ids.get(i) {
                            let was_open = model.get(i).copied().flatten().is_some();
                            prop_assert_eq!(table.remove(*id).is_some(), was_open);
                            if let Some(entry) = model.get_mut(i) {
                                *entry = None;
                            }
                        }
                    }
                    Step::Sweep(ms) => {
                        now += Duration::from_millis(ms);
                        let mut closed: Vec<usize> =
                            table.expire(now).into_iter().map(|(i, _)| i).collect();
                        closed.sort_unstable();
                        let mut due = Vec::new();
                        for (i, entry) in model.iter_mut().enumerate() {
                            if let Some((since, answered)) = *entry {
                                let timeout = if answered {
                                    limits.idle_timeout
                                } else {
                                    limits.head_timeout
                                };
                                if since + timeout <= now {
                                    due.push(i);
                                    *entry = None;
                                }
                            }
                        }
                        prop_assert_eq!(closed, due);
                    }
                }
                prop_assert_eq!(table.len(), model.iter().flatten().count());
            }
        }

        /// However many connections were opened before it, a new connection is not shed by
        /// the next `capacity - 1` admissions.
        #[test]
        fn a_new_connection_outlasts_capacity_minus_one_more(
            capacity in 1usize..8,
            before in 0usize..40,
        ) {
            let mut table = ConnectionTable::new(ConnectionLimits { capacity, ..LIMITS });
            let t0 = Instant::now();
            let mut ms = 0;
            for i in 0..before {
                table.admit(at(t0, ms), i);
                ms += 1;
            }
            let (_, _) = table.admit(at(t0, ms), usize::MAX);
            for i in 0..capacity - 1 {
                ms += 1;
                let (_, shed) = table.admit(at(t0, ms), before + i);
                prop_assert_ne!(shed, Some(usize::MAX));
            }
        }
    }
}
