//! A pcap file decoded, and the TCP byte streams in it rebuilt per connection and direction.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, SocketAddr},
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use pcap_file::{DataLink, TsResolution, pcap::PcapReader};

use crate::Program;

/// One direction of a TCP connection: from `src` to `dst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlowKey {
    pub src: SocketAddr,
    pub dst: SocketAddr,
}

impl FlowKey {
    pub fn new(src: SocketAddr, dst: SocketAddr) -> Self {
        FlowKey { src, dst }
    }

    pub fn reversed(self) -> Self {
        FlowKey {
            src: self.dst,
            dst: self.src,
        }
    }
}

impl fmt::Display for FlowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.src, self.dst)
    }
}

/// A packet as the pcap file holds it.
#[derive(Clone, Debug)]
pub struct Packet {
    pub timestamp: Duration,
    /// `orig_len`: the packet's length on the wire (for GSO packets, the super-packet's).
    pub orig_len: u32,
    pub data: Vec<u8>,
}

/// A TCP segment decoded from a [`Packet`].
#[derive(Clone, Debug)]
pub struct Segment {
    /// Index of its packet in [`Capture::packets`].
    pub packet: usize,
    pub flow: FlowKey,
    pub seq: u32,
    pub syn: bool,
    pub fin: bool,
    pub rst: bool,
    pub payload: Vec<u8>,
}

/// A decoded pcap file.
pub struct Capture {
    pub datalink: DataLink,
    pub ts_resolution: TsResolution,
    pub snaplen: u32,
    pub packets: Vec<Packet>,
    /// Every packet that decodes as Ethernet + IPv4/IPv6 + TCP.
    pub segments: Vec<Segment>,
    /// Packets that did not decode as TCP, with the reason.
    pub undecoded: Vec<(usize, String)>,
}

impl Capture {
    /// Reads and decodes `path`; panics on anything malformed. Checks each record's header
    /// itself: pcap-file's packet parser rejects `orig_len > snaplen`, which pcap allows.
    #[track_caller]
    pub fn read(path: &Path) -> Self {
        let file = std::fs::File::open(path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
        let mut reader = PcapReader::new(std::io::BufReader::new(file))
            .unwrap_or_else(|e| panic!("{} has a bad pcap header: {e}", path.display()));
        let header = reader.header();
        let mut packets = Vec::new();
        while let Some(raw) = reader.next_raw_packet() {
            let raw = raw.unwrap_or_else(|e| {
                panic!(
                    "{}: bad record after {} packets: {e}",
                    path.display(),
                    packets.len()
                )
            });
            let at = packets.len();
            assert!(
                raw.incl_len as usize == raw.data.len() && raw.incl_len <= raw.orig_len,
                "{}: packet {at} has incl_len {} orig_len {}",
                path.display(),
                raw.incl_len,
                raw.orig_len
            );
            assert!(
                raw.incl_len <= header.snaplen,
                "{}: packet {at} holds {} bytes, more than snaplen {}",
                path.display(),
                raw.incl_len,
                header.snaplen
            );
            let nanos = match header.ts_resolution {
                TsResolution::NanoSecond => raw.ts_frac,
                TsResolution::MicroSecond => raw.ts_frac.saturating_mul(1000),
            };
            assert!(
                nanos < 1_000_000_000,
                "{}: packet {at} has a bad timestamp",
                path.display()
            );
            packets.push(Packet {
                timestamp: Duration::new(raw.ts_sec.into(), nanos),
                orig_len: raw.orig_len,
                data: raw.data.into_owned(),
            });
        }
        let mut segments = Vec::new();
        let mut undecoded = Vec::new();
        for (i, packet) in packets.iter().enumerate() {
            match decode(i, &packet.data) {
                Ok(segment) => segments.push(segment),
                Err(reason) => undecoded.push((i, reason)),
            }
        }
        Capture {
            datalink: header.datalink,
            ts_resolution: header.ts_resolution,
            snaplen: header.snaplen,
            packets,
            segments,
            undecoded,
        }
    }

    /// Panics unless the file is what `shadow-agent capture` promises: Ethernet link type,
    /// nanosecond timestamps, every packet whole (not cut at the snaplen) and decodable as TCP.
    #[track_caller]
    pub fn assert_well_formed(&self) {
        assert_eq!(self.datalink, DataLink::ETHERNET, "link type");
        assert_eq!(
            self.ts_resolution,
            TsResolution::NanoSecond,
            "timestamp resolution"
        );
        for (i, p) in self.packets.iter().enumerate() {
            assert_eq!(
                p.data.len() as u32,
                p.orig_len,
                "packet {i} was truncated: {} of {} bytes",
                p.data.len(),
                p.orig_len
            );
        }
        assert!(
            self.undecoded.is_empty(),
            "packets that are not Ethernet/IP/TCP: {:?}",
            &self.undecoded[..self.undecoded.len().min(10)]
        );
    }

    /// Panics unless every packet's timestamp lies between `start` and `end` (wall-clock time,
    /// with a second of slack for clock conversion).
    #[track_caller]
    pub fn assert_timestamps_between(&self, start: SystemTime, end: SystemTime) {
        let slack = Duration::from_secs(1);
        let since_epoch = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap_or_default();
        let (lo, hi) = (since_epoch(start) - slack, since_epoch(end) + slack);
        for (i, p) in self.packets.iter().enumerate() {
            assert!(
                lo <= p.timestamp && p.timestamp <= hi,
                "packet {i} is stamped {:?} after the epoch, outside the run [{lo:?}, {hi:?}]",
                p.timestamp
            );
        }
    }

    /// Every direction of every connection in the file.
    pub fn flows(&self) -> BTreeSet<FlowKey> {
        self.segments.iter().map(|s| s.flow).collect()
    }

    /// The connections to `server`, as their client→server keys.
    pub fn connections_to(&self, server: SocketAddr) -> BTreeSet<FlowKey> {
        self.flows()
            .into_iter()
            .filter(|f| f.dst == server)
            .collect()
    }

    /// Every segment of `flow`, in file order.
    pub fn segments_of(&self, flow: FlowKey) -> impl Iterator<Item = &Segment> {
        self.segments.iter().filter(move |s| s.flow == flow)
    }

    /// The byte stream of one direction, rebuilt in sequence order.
    pub fn stream(&self, flow: FlowKey) -> Stream {
        Stream::rebuild(self.segments_of(flow))
    }

    /// Panics unless the stream of `flow` is complete (SYN seen, no holes) and equals
    /// `expected`.
    #[track_caller]
    pub fn assert_stream(&self, flow: FlowKey, expected: &[u8]) {
        let stream = self.stream(flow);
        assert!(
            stream.segments > 0,
            "no packets of {flow} in the capture; flows: {:?}",
            self.flows()
        );
        assert!(stream.syn, "no SYN of {flow} in the capture");
        assert!(
            stream.holes.is_empty(),
            "{flow}: {} holes in the captured stream, first at {:?}",
            stream.holes.len(),
            stream.holes.first()
        );
        crate::assert_bytes_eq(&stream.bytes, expected, &format!("captured stream {flow}"));
    }

    /// Runs `tcpdump -r` and `tshark -r` on the file; panics if either reports an error.
    #[track_caller]
    pub fn assert_tools_read(path: &Path) {
        let path = path.to_str().expect("utf-8 path");
        for (program, args) in [
            (Program::Tcpdump, &["-nn", "-r", path][..]),
            (Program::Tshark, &["-n", "-r", path][..]),
        ] {
            let out = program
                .command()
                .args(args)
                .output()
                .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
            let stderr = String::from_utf8_lossy(&out.stderr);
            let bad = stderr.lines().any(|l| {
                let l = l.to_ascii_lowercase();
                (l.contains("error")
                    || l.contains("truncated")
                    || l.contains("appears to be damaged"))
                    && !l.contains("running as user \"root\"")
            });
            if !out.status.success() || bad {
                panic!("{program} {args:?} failed ({}):\n{stderr}", out.status);
            }
        }
    }
}

/// One direction of a connection, rebuilt from its segments.
#[derive(Clone, Debug, Default)]
pub struct Stream {
    /// The payload from the first byte after the SYN (or the lowest sequence number seen, when
    /// there is no SYN), up to the end of the contiguous data after the holes below.
    pub bytes: Vec<u8>,
    pub syn: bool,
    pub fin: bool,
    pub rst: bool,
    /// Segments of this direction (with or without payload).
    pub segments: usize,
    /// Segments whose payload had been seen already (retransmissions, or the same packet on
    /// two hooks).
    pub duplicates: usize,
    /// Ranges of stream offsets never seen, between data that was; `bytes` holds zeros there.
    pub holes: Vec<(u64, u64)>,
}

impl Stream {
    fn rebuild<'a>(segments: impl Iterator<Item = &'a Segment>) -> Self {
        let segments: Vec<&Segment> = segments.collect();
        let mut stream = Stream {
            segments: segments.len(),
            ..Stream::default()
        };
        let isn = segments
            .iter()
            .find(|s| s.syn)
            .map(|s| s.seq.wrapping_add(1));
        stream.syn = isn.is_some();
        stream.fin = segments.iter().any(|s| s.fin);
        stream.rst = segments.iter().any(|s| s.rst);
        let Some(base) = isn.or_else(|| {
            // Without a SYN: the data segment furthest back, comparing relative to the first.
            let first = segments.iter().find(|s| !s.payload.is_empty())?.seq;
            segments
                .iter()
                .filter(|s| !s.payload.is_empty())
                .map(|s| s.seq)
                .min_by_key(|seq| seq.wrapping_sub(first) as i32)
        }) else {
            return stream;
        };
        // Offset in the stream -> payload; a later copy of the same bytes counts as a duplicate.
        let mut pieces: BTreeMap<u64, &[u8]> = BTreeMap::new();
        let mut covered: Vec<(u64, u64)> = Vec::new();
        for s in &segments {
            if s.payload.is_empty() {
                continue;
            }
            // Data sits after the SYN's sequence number when a SYN carries data (TFO).
            let seq = if s.syn { s.seq.wrapping_add(1) } else { s.seq };
            let offset = u64::from(seq.wrapping_sub(base));
            let end = offset + s.payload.len() as u64;
            if covered.iter().any(|&(a, b)| a <= offset && end <= b) {
                stream.duplicates += 1;
                continue;
            }
            covered.push((offset, end));
            pieces.insert(offset, &s.payload);
        }
        let total = pieces
            .iter()
            .map(|(o, p)| o + p.len() as u64)
            .max()
            .unwrap_or(0);
        let mut bytes = vec![0u8; total as usize];
        let mut filled = vec![false; total as usize];
        for (offset, payload) in pieces {
            let o = offset as usize;
            bytes[o..o + payload.len()].copy_from_slice(payload);
            filled[o..o + payload.len()]
                .iter_mut()
                .for_each(|f| *f = true);
        }
        let mut i = 0;
        while i < filled.len() {
            if filled[i] {
                i += 1;
                continue;
            }
            let start = i;
            while i < filled.len() && !filled[i] {
                i += 1;
            }
            stream.holes.push((start as u64, i as u64));
        }
        stream.bytes = bytes;
        stream
    }
}

fn decode(index: usize, data: &[u8]) -> Result<Segment, String> {
    let sliced = SlicedPacket::from_ethernet(data).map_err(|e| e.to_string())?;
    let (src, dst): (IpAddr, IpAddr) = match &sliced.net {
        Some(NetSlice::Ipv4(ip)) => (
            ip.header().source_addr().into(),
            ip.header().destination_addr().into(),
        ),
        Some(NetSlice::Ipv6(ip)) => (
            ip.header().source_addr().into(),
            ip.header().destination_addr().into(),
        ),
        None => return Err("no IP header".into()),
    };
    let Some(TransportSlice::Tcp(tcp)) = &sliced.transport else {
        return Err("not TCP".into());
    };
    Ok(Segment {
        packet: index,
        flow: FlowKey::new(
            SocketAddr::new(src, tcp.source_port()),
            SocketAddr::new(dst, tcp.destination_port()),
        ),
        seq: tcp.sequence_number(),
        syn: tcp.syn(),
        fin: tcp.fin(),
        rst: tcp.rst(),
        payload: tcp.payload().to_vec(),
    })
}
