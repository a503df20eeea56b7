//! Netlink (clsact) filters of other runs of shadow: which are left by a run that is gone.
//!
//! A netlink filter outlives the process that added it, so a run that was killed leaves its
//! filters behind, still copying packets into a ring buffer nobody reads. The next run removes
//! them, and only them: a filter of another run that is still going (`capture` beside `run`)
//! must stay. A run marks each program it attaches with an abstract Unix socket named after the
//! program's id ([`OwnerMark`]); the kernel removes the socket when the process ends, however it
//! ends. So a shadow filter whose program nobody marks is left behind ([`left_behind`]).
//! Abstract sockets belong to the network namespace, as the interfaces and their filters do.
//!
//! The filters are listed over rtnetlink ([`list`]): aya removes filters by name only, which
//! would take those of running agents too.
use std::{
    io,
    os::{
        fd::{AsRawFd, OwnedFd},
        linux::net::SocketAddrExt,
        unix::net::{SocketAddr, UnixDatagram},
    },
    time::Duration,
};

use nix::sys::{
    socket::{
        AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto,
        setsockopt, socket, sockopt,
    },
    time::TimeVal,
};
use shadow_common::names;

use super::Hook;

/// One filter on an interface's clsact hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BpfFilter {
    pub priority: u16,
    pub handle: u32,
    /// `TCA_BPF_NAME`: the program's name, as aya attaches it.
    pub name: Option<String>,
    /// `TCA_BPF_ID`: the id of the attached program.
    pub program_id: Option<u32>,
}

/// The filters of shadow's programs in `filters` that no running process marks as its own, and
/// that are not in `own` (this process's programs).
pub fn left_behind<'f>(
    filters: &'f [BpfFilter],
    own: &[u32],
    marked: impl Fn(u32) -> bool,
) -> Vec<&'f BpfFilter> {
    filters
        .iter()
        .filter(|f| {
            let shadow = matches!(
                f.name.as_deref(),
                Some(names::PROGRAM_INGRESS | names::PROGRAM_EGRESS)
            );
            // Without an id there is no telling whose it is: it stays.
            shadow
                && f.program_id
                    .is_some_and(|id| !own.contains(&id) && !marked(id))
        })
        .collect()
}

/// Marks the program `id` as this process's for as long as this lives (and at most as long as
/// the process).
#[derive(Debug)]
pub struct OwnerMark {
    _socket: UnixDatagram,
}

impl OwnerMark {
    /// # Errors
    /// When the socket cannot be bound: another process marks the same id (which cannot happen,
    /// ids being unique among loaded programs), or the system is out of sockets.
    pub fn claim(program_id: u32) -> io::Result<Self> {
        Ok(Self {
            _socket: UnixDatagram::bind_addr(&mark_address(program_id)?)?,
        })
    }
}

/// Whether a running process marks the program `id` as its own. When that cannot be told, it is
/// taken as marked: a filter of a running agent must not be removed.
pub fn is_marked(program_id: u32) -> bool {
    let Ok(address) = mark_address(program_id) else {
        return true;
    };
    // The probe socket is closed at once, releasing the name.
    match UnixDatagram::bind_addr(&address) {
        Ok(_) => false,
        Err(e) => {
            if e.kind() != io::ErrorKind::AddrInUse {
                tracing::debug!(program_id, error = %e, "cannot tell whether a filter's owner runs");
            }
            true
        }
    }
}

fn mark_address(program_id: u32) -> io::Result<SocketAddr> {
    SocketAddr::from_abstract_name(format!("shadow-agent/tc-program/{program_id}"))
}

const NLMSG_HEADER: usize = 16;
const TCMSG: usize = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWTFILTER: u16 = 44;
const RTM_GETTFILTER: u16 = 46;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_ID: u16 = 11;
/// The attribute type without the nested and byte-order flags.
const NLA_TYPE_MASK: u16 = 0x3fff;
/// `TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)` and `..._EGRESS`.
const PARENT_INGRESS: u32 = 0xffff_fff2;
const PARENT_EGRESS: u32 = 0xffff_fff3;
/// How long the kernel may take to answer a dump.
const NETLINK_TIMEOUT: Duration = Duration::from_secs(5);

/// The BPF filters on `hook` of the interface `ifindex` (of this network namespace).
///
/// # Errors
/// When the netlink socket cannot be used, the kernel reports an error (`ENOENT` or `EINVAL`
/// when there is no clsact qdisc), or its answer does not parse.
pub fn list(ifindex: u32, hook: Hook) -> io::Result<Vec<BpfFilter>> {
    let socket: OwnedFd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )?;
    let timeout = TimeVal::new(NETLINK_TIMEOUT.as_secs() as _, 0);
    setsockopt(&socket, sockopt::ReceiveTimeout, &timeout)?;
    let parent = match hook {
        Hook::Ingress => PARENT_INGRESS,
        Hook::Egress => PARENT_EGRESS,
    };
    sendto(
        socket.as_raw_fd(),
        &dump_request(ifindex, parent),
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )?;
    let mut filters = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = recv(socket.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "netlink closed before the end of the dump",
            ));
        }
        if parse_dump(&buf[..n], &mut filters)? {
            return Ok(filters);
        }
    }
}

/// `RTM_GETTFILTER` with `NLM_F_DUMP` for one interface and parent.
fn dump_request(ifindex: u32, parent: u32) -> Vec<u8> {
    let len = (NLMSG_HEADER + TCMSG) as u32;
    let mut req = Vec::with_capacity(len as usize);
    req.extend_from_slice(&len.to_ne_bytes());
    req.extend_from_slice(&RTM_GETTFILTER.to_ne_bytes());
    req.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // sequence number
    req.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel assigns it
    // tcmsg: family, padding, ifindex, handle, parent, info.
    req.extend_from_slice(&[0, 0, 0, 0]);
    req.extend_from_slice(&ifindex.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&parent.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    req
}

fn malformed(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("malformed netlink answer: {what}"),
    )
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The attributes of a netlink payload: (type without flags, data).
fn attributes(mut b: &[u8]) -> impl Iterator<Item = io::Result<(u16, &[u8])>> {
    std::iter::from_fn(move || {
        if b.is_empty() {
            return None;
        }
        let (Some(len), Some(kind)) = (u16_at(b, 0), u16_at(b, 2)) else {
            b = &[];
            return Some(Err(malformed("attribute header")));
        };
        let len = usize::from(len);
        if len < 4 || len > b.len() {
            b = &[];
            return Some(Err(malformed("attribute length")));
        }
        let data = &b[4..len];
        b = &b[len.next_multiple_of(4).min(b.len())..];
        Some(Ok((kind & NLA_TYPE_MASK, data)))
    })
}

/// A NUL-terminated string attribute.
fn string(data: &[u8]) -> String {
    let end = data.iter().position(|&c| c == 0).unwrap_or(data.len());
    String::from_utf8_lossy(&data[..end]).into_owned()
}

/// Adds the BPF filters of one read of a dump to `out`; returns whether the dump is over.
fn parse_dump(mut b: &[u8], out: &mut Vec<BpfFilter>) -> io::Result<bool> {
    while !b.is_empty() {
        let len = u32_at(b, 0).ok_or_else(|| malformed("message header"))? as usize;
        let kind = u16_at(b, 4).ok_or_else(|| malformed("message header"))?;
        if len < NLMSG_HEADER || len > b.len() {
            return Err(malformed("message length"));
        }
        let payload = &b[NLMSG_HEADER..len];
        b = &b[len.next_multiple_of(4).min(b.len())..];
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = u32_at(payload, 0).ok_or_else(|| malformed("error message"))? as i32;
                if errno == 0 {
                    continue;
                }
                return Err(io::Error::from_raw_os_error(-errno));
            }
            RTM_NEWTFILTER => {
                if let Some(filter) = parse_filter(payload)? {
                    out.push(filter);
                }
            }
            _ => {}
        }
    }
    Ok(false)
}

/// A BPF filter from one `RTM_NEWTFILTER` payload; `None` for other kinds and for the entry of a
/// priority's chain itself (handle 0).
fn parse_filter(payload: &[u8]) -> io::Result<Option<BpfFilter>> {
    if payload.len() < TCMSG {
        return Err(malformed("tcmsg"));
    }
    let handle = u32_at(payload, 8).ok_or_else(|| malformed("tcmsg"))?;
    let info = u32_at(payload, 16).ok_or_else(|| malformed("tcmsg"))?;
    let mut bpf = false;
    let mut filter = BpfFilter {
        priority: (info >> 16) as u16,
        handle,
        name: None,
        program_id: None,
    };
    for attr in attributes(&payload[TCMSG..]) {
        let (kind, data) = attr?;
        match kind {
            TCA_KIND => bpf = string(data) == "bpf",
            TCA_OPTIONS => {
                for option in attributes(data) {
                    let (kind, data) = option?;
                    match kind {
                        TCA_BPF_NAME => filter.name = Some(string(data)),
                        TCA_BPF_ID => filter.program_id = u32_at(data, 0),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok((bpf && handle != 0).then_some(filter))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attribute(kind: u16, data: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(data);
        a.resize(a.len().next_multiple_of(4), 0);
        a
    }

    fn message(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HEADER + payload.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&2u16.to_ne_bytes()); // NLM_F_MULTI
        m.extend_from_slice(&[0; 8]);
        m.extend_from_slice(payload);
        m.resize(m.len().next_multiple_of(4), 0);
        m
    }

    /// A filter as the kernel dumps it; `name`/`id` `None` leave the attribute out.
    fn filter(
        kind: &str,
        priority: u16,
        handle: u32,
        name: Option<&str>,
        id: Option<u32>,
    ) -> Vec<u8> {
        let mut p = vec![0u8; 4];
        p.extend_from_slice(&7u32.to_ne_bytes()); // ifindex
        p.extend_from_slice(&handle.to_ne_bytes());
        p.extend_from_slice(&PARENT_INGRESS.to_ne_bytes());
        p.extend_from_slice(&((u32::from(priority) << 16) | 0x0300).to_ne_bytes());
        p.extend(attribute(TCA_KIND, format!("{kind}\0").as_bytes()));
        let mut options = attribute(4, &[0; 4]); // TCA_BPF_OPS_LEN: skipped
        if let Some(name) = name {
            options.extend(attribute(TCA_BPF_NAME, format!("{name}\0").as_bytes()));
        }
        if let Some(id) = id {
            options.extend(attribute(TCA_BPF_ID, &id.to_ne_bytes()));
        }
        // TCA_OPTIONS is nested: the kernel sets NLA_F_NESTED.
        p.extend(attribute(TCA_OPTIONS | 0x8000, &options));
        message(RTM_NEWTFILTER, &p)
    }

    #[test]
    fn a_dump_gives_the_bpf_filters_with_their_programs() {
        let mut dump = Vec::new();
        // The chain entry of priority 49152 (no handle), then its filter.
        dump.extend(filter("bpf", 49152, 0, None, None));
        dump.extend(filter("bpf", 49152, 1, Some("shadow_ingress"), Some(42)));
        dump.extend(filter("u32", 49151, 0x800, None, None));
        dump.extend(filter("bpf", 49150, 1, Some("cil_from_netdev"), Some(7)));
        let mut out = Vec::new();
        assert!(!parse_dump(&dump, &mut out).expect("parses"));
        assert!(parse_dump(&message(NLMSG_DONE, &[0; 4]), &mut out).expect("parses"));
        assert_eq!(
            out,
            [
                BpfFilter {
                    priority: 49152,
                    handle: 1,
                    name: Some("shadow_ingress".into()),
                    program_id: Some(42),
                },
                BpfFilter {
                    priority: 49150,
                    handle: 1,
                    name: Some("cil_from_netdev".into()),
                    program_id: Some(7),
                },
            ]
        );
    }

    #[test]
    fn errors_and_truncation_are_reported() {
        let mut out = Vec::new();
        let enoent = message(NLMSG_ERROR, &(-libc::ENOENT).to_ne_bytes());
        let err = parse_dump(&enoent, &mut out).expect_err("an error");
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
        let whole = filter("bpf", 1, 1, Some("shadow_ingress"), Some(42));
        for cut in [3, 17, 30, whole.len() - 9] {
            assert!(parse_dump(&whole[..cut], &mut out).is_err(), "cut at {cut}");
        }
        assert!(out.is_empty());
    }

    #[test]
    fn only_shadow_filters_nobody_marks_are_left_behind() {
        let f = |name: &str, id: Option<u32>| BpfFilter {
            priority: 1,
            handle: 1,
            name: Some(name.into()),
            program_id: id,
        };
        let filters = [
            f("shadow_ingress", Some(1)), // this process's own
            f("shadow_ingress", Some(2)), // a running agent's
            f("shadow_egress", Some(3)),  // left by a killed run
            f("shadow_ingress", None),    // whose, cannot be told
            f("cil_from_netdev", Some(4)),
        ];
        let left = left_behind(&filters, &[1], |id| id == 2);
        assert_eq!(left, [&filters[2]]);
    }

    #[test]
    fn a_mark_is_seen_while_it_is_held() {
        // An id no program has here: the test runs without BPF.
        let id = u32::MAX - std::process::id();
        assert!(!is_marked(id));
        let mark = OwnerMark::claim(id).expect("claim");
        assert!(is_marked(id));
        drop(mark);
        assert!(!is_marked(id));
    }
}
