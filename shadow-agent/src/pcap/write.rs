//! Writes captured packets as a standard pcap file (Ethernet, nanosecond timestamps) that
//! tcpdump, tshark and Wireshark read.
use std::{io::Write, time::Duration};

use pcap_file::{
    DataLink, PcapError, TsResolution,
    pcap::{PcapHeader, PcapPacket, PcapWriter as FileWriter},
};

/// Writes Ethernet frames to a pcap stream.
pub struct PcapWriter<W: Write> {
    inner: FileWriter<W>,
    packets: u64,
}

impl<W: Write> PcapWriter<W> {
    /// Writes the file header. `snaplen` is the most bytes of a packet the file may hold.
    pub fn new(out: W, snaplen: u32) -> Result<Self, PcapError> {
        let header = PcapHeader {
            datalink: DataLink::ETHERNET,
            ts_resolution: TsResolution::NanoSecond,
            snaplen,
            ..Default::default()
        };
        Ok(Self {
            inner: FileWriter::with_header(out, header)?,
            packets: 0,
        })
    }

    /// Writes one frame; `original_len` is its length on the wire (more than `data` when the
    /// capture was truncated).
    pub fn write(
        &mut self,
        timestamp: Duration,
        data: &[u8],
        original_len: u32,
    ) -> Result<(), PcapError> {
        let packet = PcapPacket::new(timestamp, original_len.max(data.len() as u32), data);
        self.inner.write_packet(&packet)?;
        self.packets += 1;
        Ok(())
    }

    pub fn packets(&self) -> u64 {
        self.packets
    }

    /// Flushes and returns the writer.
    pub fn into_inner(self) -> W {
        self.inner.into_writer()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcap_file::pcap::PcapReader;

    #[test]
    fn round_trip() {
        let mut w = PcapWriter::new(Vec::new(), 65535).expect("header");
        w.write(Duration::new(1_700_000_000, 123_456_789), b"frame-one", 9)
            .expect("write");
        w.write(Duration::new(1_700_000_001, 1), b"trunc", 100)
            .expect("write");
        let bytes = w.into_inner();
        let mut r = PcapReader::new(&bytes[..]).expect("reader");
        assert_eq!(r.header().datalink, DataLink::ETHERNET);
        assert_eq!(r.header().ts_resolution, TsResolution::NanoSecond);
        let p = r.next_packet().expect("one").expect("ok");
        assert_eq!(&p.data[..], b"frame-one");
        assert_eq!(p.timestamp, Duration::new(1_700_000_000, 123_456_789));
        let p = r.next_packet().expect("two").expect("ok");
        assert_eq!(p.orig_len, 100);
        assert!(r.next_packet().is_none());
    }
}
