//! What the kernel program selects, as its maps hold it, and how the agent changes it in place.
//!
//! The program reads `PORTS`, `SERVICE_CIDRS` and `CONFIG` on every packet, and the agent writes
//! them one entry at a time. [`plan`] orders the writes from one [`Selection`] to another so that
//! no connection that both select goes uncaptured in between, and so that `SERVICE_CIDRS` never
//! needs more room than it has. [`change`] carries the writes out through a [`MapWriter`]; when
//! the kernel refuses one, it undoes the writes before it, newest first, so that the earlier
//! selection stays in force as a whole. Both are pure over the writer: the tests drive them with a
//! writer that fails on command.
use std::{collections::BTreeSet, fmt};

use shadow_common::{CaptureConfig, config_flags};
use thiserror::Error;

use super::kernel::Cidr;

/// What the kernel program's selection maps hold. The default is what a freshly loaded program
/// holds: no port, no CIDR, and a zeroed `CONFIG` (nothing sampled).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    /// Ports whose `PORTS` entry is set: connections to or from them are captured.
    pub ports: BTreeSet<u16>,
    /// The entries of `SERVICE_CIDRS`.
    pub cidrs: BTreeSet<Cidr>,
    /// The single entry of `CONFIG`.
    pub config: CaptureConfig,
}

impl Selection {
    /// Whether the program takes only connections whose service address is in `cidrs`.
    pub fn filters_by_cidr(&self) -> bool {
        self.config.flags & config_flags::CIDR_FILTER != 0
    }

    /// The selection after `write`.
    fn apply(&mut self, write: &MapWrite) {
        match *write {
            MapWrite::Port {
                port,
                capture: true,
            } => {
                self.ports.insert(port);
            }
            MapWrite::Port {
                port,
                capture: false,
            } => {
                self.ports.remove(&port);
            }
            MapWrite::AddCidr(cidr) => {
                self.cidrs.insert(cidr);
            }
            MapWrite::RemoveCidr(cidr) => {
                self.cidrs.remove(&cidr);
            }
            MapWrite::Config(config) => self.config = config,
        }
    }

    /// The write that takes the maps back from the selection after `write` to this one.
    fn undo_of(&self, write: &MapWrite) -> MapWrite {
        match *write {
            MapWrite::Port { port, .. } => MapWrite::Port {
                port,
                capture: self.ports.contains(&port),
            },
            MapWrite::AddCidr(cidr) => MapWrite::RemoveCidr(cidr),
            MapWrite::RemoveCidr(cidr) => MapWrite::AddCidr(cidr),
            MapWrite::Config(_) => MapWrite::Config(self.config),
        }
    }
}

/// One write to one entry of one of the selection maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapWrite {
    /// Sets (`capture`) or clears the `PORTS` entry of `port`.
    Port {
        port: u16,
        capture: bool,
    },
    AddCidr(Cidr),
    RemoveCidr(Cidr),
    /// Replaces the `CONFIG` entry.
    Config(CaptureConfig),
}

impl fmt::Display for MapWrite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MapWrite::Port {
                port,
                capture: true,
            } => write!(f, "adding port {port} to PORTS"),
            MapWrite::Port {
                port,
                capture: false,
            } => write!(f, "removing port {port} from PORTS"),
            MapWrite::AddCidr(cidr) => write!(f, "adding {cidr} to SERVICE_CIDRS"),
            MapWrite::RemoveCidr(cidr) => write!(f, "removing {cidr} from SERVICE_CIDRS"),
            MapWrite::Config(c) => write!(
                f,
                "writing CONFIG (sample_ppm {}, flags {:#x}, sample_seed {})",
                c.sample_ppm, c.flags, c.sample_seed
            ),
        }
    }
}

/// The writes that change the maps from `from` to `to`, in order. `cidr_room` is how many entries
/// `SERVICE_CIDRS` holds.
///
/// Additions come first, then `CONFIG`, then removals: while `CONFIG` still describes `from`, the
/// maps select at least what `from` does, and from the `CONFIG` write on, at least what `to` does,
/// so a connection both select is never missed. A stale port is harmless until then, and a stale
/// CIDR too (an address may be in a stale prefix and in a new one at once). Only when `from` and
/// `to` together have more CIDRs than `SERVICE_CIDRS` holds are the stale ones removed first, to
/// make room; connections whose address moves from a removed prefix to an added one may then be
/// missed during the change.
pub fn plan(from: &Selection, to: &Selection, cidr_room: usize) -> Vec<MapWrite> {
    let added_cidrs = to
        .cidrs
        .difference(&from.cidrs)
        .copied()
        .map(MapWrite::AddCidr);
    let stale_cidrs: Vec<MapWrite> = from
        .cidrs
        .difference(&to.cidrs)
        .copied()
        .map(MapWrite::RemoveCidr)
        .collect();
    let added_ports = to
        .ports
        .difference(&from.ports)
        .map(|&port| MapWrite::Port {
            port,
            capture: true,
        });
    let stale_ports = from
        .ports
        .difference(&to.ports)
        .map(|&port| MapWrite::Port {
            port,
            capture: false,
        });
    let room_first = from.cidrs.union(&to.cidrs).count() > cidr_room;

    let mut writes = Vec::new();
    if room_first {
        writes.extend(&stale_cidrs);
    }
    writes.extend(added_cidrs);
    writes.extend(added_ports);
    if from.config != to.config {
        writes.push(MapWrite::Config(to.config));
    }
    writes.extend(stale_ports);
    if !room_first {
        writes.extend(stale_cidrs);
    }
    writes
}

/// Writes one entry of a selection map.
pub trait MapWriter {
    type Error;

    /// Writes `write`; on error the entry is as it was.
    fn write(&mut self, write: &MapWrite) -> Result<(), Self::Error>;
}

/// A change of selection that did not happen as a whole.
#[derive(Debug, Error)]
pub enum ChangeError<E> {
    /// The maps hold the earlier selection again.
    #[error(
        "{write} failed: {source}; the writes before it were undone, so the earlier settings \
         stay in force"
    )]
    Undone {
        write: MapWrite,
        #[source]
        source: E,
    },
    /// Undoing failed too: the maps hold part of each selection (the caller's [`Selection`]
    /// says exactly what).
    #[error(
        "{write} failed: {source}; undoing it failed too ({undo}: {undo_error}), so the kernel \
         holds part of the new settings"
    )]
    Mixed {
        write: MapWrite,
        #[source]
        source: E,
        undo: MapWrite,
        undo_error: E,
    },
}

impl<E> ChangeError<E> {
    /// Whether the maps hold the earlier selection, unchanged.
    pub fn is_undone(&self) -> bool {
        matches!(self, ChangeError::Undone { .. })
    }
}

/// Changes the maps, which hold `maps`, to `to`, in the order of [`plan`]. On success `maps` is
/// `to`. When a write fails, the writes before it are undone, newest first, and `maps` is what it
/// was. Should an undo fail as well, the undoing stops there and `maps` is what the maps hold then,
/// so that the next change starts from the truth.
pub fn change<W: MapWriter>(
    writer: &mut W,
    maps: &mut Selection,
    to: &Selection,
    cidr_room: usize,
) -> Result<(), ChangeError<W::Error>> {
    let mut undo = Vec::new();
    for write in plan(maps, to, cidr_room) {
        let before = maps.undo_of(&write);
        match writer.write(&write) {
            Ok(()) => {
                maps.apply(&write);
                undo.push(before);
            }
            Err(source) => {
                while let Some(back) = undo.pop() {
                    if let Err(undo_error) = writer.write(&back) {
                        return Err(ChangeError::Mixed {
                            write,
                            source,
                            undo: back,
                            undo_error,
                        });
                    }
                    maps.apply(&back);
                }
                return Err(ChangeError::Undone { write, source });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use proptest::prelude::*;

    use super::*;

    /// The maps as the kernel holds them, refusing the `fail_at`-th write (counting from 0) and
    /// any write in `also_fail`, and inserts beyond `cidr_room`.
    struct FakeMaps {
        held: Selection,
        cidr_room: usize,
        writes: usize,
        fail_at: Option<usize>,
        also_fail: BTreeSet<usize>,
        /// The selection after every write that succeeded.
        states: Vec<Selection>,
    }

    impl FakeMaps {
        fn new(held: &Selection, cidr_room: usize) -> Self {
            Self {
                held: held.clone(),
                cidr_room,
                writes: 0,
                fail_at: None,
                also_fail: BTreeSet::new(),
                states: vec![held.clone()],
            }
        }
    }

    #[derive(Debug, PartialEq, Error)]
    #[error("write {0} refused")]
    struct Refused(usize);

    impl MapWriter for FakeMaps {
        type Error = Refused;

        fn write(&mut self, write: &MapWrite) -> Result<(), Refused> {
            let n = self.writes;
            self.writes += 1;
            let full = matches!(write, MapWrite::AddCidr(c) if !self.held.cidrs.contains(c))
                && self.held.cidrs.len() >= self.cidr_room;
            if self.fail_at == Some(n) || self.also_fail.contains(&n) || full {
                return Err(Refused(n));
            }
            self.held.apply(write);
            self.states.push(self.held.clone());
            Ok(())
        }
    }

    fn cidr(s: &str) -> Cidr {
        s.parse().expect("valid CIDR")
    }

    fn contains(cidr: &Cidr, addr: IpAddr) -> bool {
        let bits = |a: IpAddr| -> (u128, u32) {
            match a {
                IpAddr::V4(v4) => (u128::from(v4.to_ipv6_mapped()), 96),
                IpAddr::V6(v6) => (u128::from(v6), 0),
            }
        };
        let (net, offset) = bits(cidr.addr);
        let (addr, _) = bits(addr);
        let prefix = u32::from(cidr.prefix) + offset;
        let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
        net & mask == addr & mask
    }

    /// Whether the program takes connections of `port` at service address `addr` (sampling
    /// aside).
    fn selects(s: &Selection, port: u16, addr: IpAddr) -> bool {
        s.ports.contains(&port)
            && (!s.filters_by_cidr() || s.cidrs.iter().any(|c| contains(c, addr)))
    }

    /// Nested and overlapping prefixes, IPv4 and IPv6.
    const CIDRS: [&str; 8] = [
        "198.18.0.0/16",
        "198.18.1.0/24",
        "198.18.1.0/25",
        "198.18.1.128/25",
        "198.18.2.0/24",
        "198.19.0.0/16",
        "fd00::/8",
        "fd00::1/128",
    ];
    const ADDRS: [&str; 8] = [
        "198.18.1.1",
        "198.18.1.200",
        "198.18.2.5",
        "198.18.3.3",
        "198.19.0.1",
        "fd00::1",
        "fd00::2",
        "10.0.0.1",
    ];
    const PORTS: std::ops::RangeInclusive<u16> = 1..=6;

    /// A selection as the agent makes them: the CIDR filter on exactly when there are CIDRs.
    fn selection() -> impl Strategy<Value = Selection> {
        (
            proptest::collection::btree_set(PORTS, 1..=4),
            proptest::collection::btree_set(0..CIDRS.len(), 0..=4),
            prop_oneof![Just(0u32), Just(500_000), Just(1_000_000)],
            0u32..3,
        )
            .prop_map(|(ports, cidrs, sample_ppm, sample_seed)| {
                let cidrs = cidrs.into_iter().map(|i| cidr(CIDRS[i])).collect();
                made(ports, cidrs, sample_ppm, sample_seed)
            })
    }

    /// A selection as the agent makes one: the CIDR filter on exactly when there are CIDRs.
    fn made(
        ports: BTreeSet<u16>,
        cidrs: BTreeSet<Cidr>,
        sample_ppm: u32,
        sample_seed: u32,
    ) -> Selection {
        Selection {
            config: CaptureConfig {
                sample_ppm,
                flags: if cidrs.is_empty() {
                    0
                } else {
                    config_flags::CIDR_FILTER
                },
                wakeup_bytes: 4096,
                sample_seed,
            },
            ports,
            cidrs,
        }
    }

    fn addrs() -> Vec<IpAddr> {
        ADDRS
            .iter()
            .map(|a| a.parse().expect("valid address"))
            .collect()
    }

    proptest! {
        /// The plan reaches `to`; in between, every connection both selections take is taken,
        /// and `SERVICE_CIDRS` never holds more than it has room for.
        #[test]
        fn plan_reaches_the_target_without_a_gap(
            from in selection(),
            to in selection(),
            room in 4usize..=8,
        ) {
            let mut maps = FakeMaps::new(&from, room);
            change(&mut maps, &mut from.clone(), &to, room).expect("no failure injected");
            prop_assert_eq!(&maps.held, &to);
            let fits = from.cidrs.union(&to.cidrs).count() <= room;
            for state in &maps.states {
                prop_assert!(state.cidrs.len() <= room);
                if !fits {
                    continue;
                }
                for port in PORTS {
                    for addr in addrs() {
                        if selects(&from, port, addr) && selects(&to, port, addr) {
                            prop_assert!(
                                selects(state, port, addr),
                                "port {} at {} missed in {:?}", port, addr, state
                            );
                        }
                    }
                }
            }
        }

        /// A write refused anywhere leaves the earlier selection whole, in the maps and in the
        /// caller's record of them.
        #[test]
        fn a_refused_write_leaves_the_earlier_selection(
            from in selection(),
            to in selection(),
            fail_at in 0usize..12,
        ) {
            let mut maps = FakeMaps::new(&from, 8);
            maps.fail_at = Some(fail_at);
            let mut held = from.clone();
            let writes = plan(&from, &to, 8).len();
            match change(&mut maps, &mut held, &to, 8) {
                Ok(()) => {
                    prop_assert!(fail_at >= writes);
                    prop_assert_eq!(&held, &to);
                }
                Err(e) => {
                    prop_assert!(fail_at < writes);
                    prop_assert!(e.is_undone());
                    prop_assert_eq!(&held, &from);
                }
            }
            prop_assert_eq!(&maps.held, &held);
        }

        /// When undoing fails too, the caller's record still says what the maps hold, and the
        /// next change (back to the earlier selection) starts from it and succeeds.
        #[test]
        fn a_failed_undo_leaves_an_exact_record_to_restore_from(
            from in selection(),
            to in selection(),
            fail_at in 0usize..12,
            undo_fails in 0usize..12,
        ) {
            let mut maps = FakeMaps::new(&from, 8);
            maps.fail_at = Some(fail_at);
            maps.also_fail.insert(fail_at + 1 + undo_fails);
            let mut held = from.clone();
            let result = change(&mut maps, &mut held, &to, 8);
            prop_assert_eq!(&maps.held, &held);
            if let Err(ChangeError::Mixed { .. }) = result {
                prop_assert_ne!(&held, &from);
            }
            maps.fail_at = None;
            maps.also_fail.clear();
            change(&mut maps, &mut held, &from, 8).expect("no failure injected");
            prop_assert_eq!(&maps.held, &from);
        }
    }

    fn settings(ports: &[u16], cidrs: &[&str], sample_ppm: u32) -> Selection {
        let cidrs = cidrs.iter().map(|c| cidr(c)).collect();
        made(ports.iter().copied().collect(), cidrs, sample_ppm, 0)
    }

    #[test]
    fn additions_then_config_then_removals() {
        let from = settings(&[80, 81], &["198.18.0.0/16"], 1_000_000);
        let to = settings(&[81, 82], &["198.18.1.0/24"], 500_000);
        assert_eq!(
            plan(&from, &to, 1024),
            [
                MapWrite::AddCidr(cidr("198.18.1.0/24")),
                MapWrite::Port {
                    port: 82,
                    capture: true
                },
                MapWrite::Config(to.config),
                MapWrite::Port {
                    port: 80,
                    capture: false
                },
                MapWrite::RemoveCidr(cidr("198.18.0.0/16")),
            ]
        );
        // Without room for both CIDRs, the stale one goes first.
        assert_eq!(
            plan(&from, &to, 1)[0],
            MapWrite::RemoveCidr(cidr("198.18.0.0/16"))
        );
        // Nothing changes, nothing is written.
        assert!(plan(&to, &to, 1024).is_empty());
    }

    #[test]
    fn a_refused_config_write_takes_the_new_port_back() {
        let from = settings(&[80], &[], 1_000_000);
        let to = settings(&[80, 81], &[], 500_000);
        let mut maps = FakeMaps::new(&from, 1024);
        // Write 0 adds port 81, write 1 is CONFIG.
        maps.fail_at = Some(1);
        let mut held = from.clone();
        let err = change(&mut maps, &mut held, &to, 1024).expect_err("CONFIG refused");
        assert!(
            matches!(
                err,
                ChangeError::Undone {
                    write: MapWrite::Config(_),
                    source: Refused(1)
                }
            ),
            "{err:?}"
        );
        assert_eq!(maps.held, from);
        assert_eq!(held, from);
        assert_eq!(
            maps.states[1..],
            [settings(&[80, 81], &[], 1_000_000), from.clone()]
        );
        assert!(err.to_string().contains("earlier settings stay in force"));
    }

    #[test]
    fn a_full_cidr_map_refuses_the_change_as_a_whole() {
        // Another writer filled the map: the first new CIDR does not fit.
        let from = settings(&[80], &["198.18.0.0/16"], 1_000_000);
        let to = settings(&[80, 81], &["198.18.0.0/16", "198.19.0.0/16"], 1_000_000);
        let mut maps = FakeMaps::new(&from, 1);
        let mut held = from.clone();
        let err = change(&mut maps, &mut held, &to, 1024).expect_err("map full");
        assert!(err.is_undone(), "{err}");
        assert_eq!(maps.held, from);
        assert_eq!(held, from);
    }
}
