//! Captured frames from pcap and pcapng files, with their link type and capture time.
//!
//! pcap: microsecond and nanosecond timestamps, either byte order. pcapng: any number of
//! sections and interfaces, each interface with its own link type and timestamp resolution
//! (`if_tsresol`).
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use pcap_file::PcapError;
use pcap_file::pcap::PcapReader;
use pcap_file::pcapng::{
    Block, PcapNgReader, blocks::interface_description::InterfaceDescriptionOption,
};

use crate::pipeline::LinkType;

/// Why a capture file cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum PcapFileError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the capture: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a pcap or pcapng file (magic {0:02x?})")]
    NotACapture([u8; 4]),
    #[error("the capture is damaged: {0}")]
    Format(#[from] PcapError),
    #[error(
        "unsupported link type {0} (shadow reads Ethernet, Linux SLL/SLL2, raw IP and BSD loopback)"
    )]
    UnsupportedLinkType(u32),
    #[error("packet on interface {0}, which the file never described")]
    UnknownInterface(u32),
}

/// One captured frame.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    pub link: LinkType,
    /// Capture time since the Unix epoch.
    pub ts: Duration,
    pub data: &'a [u8],
}

/// What reading a whole file found besides the frames.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadSummary {
    pub frames: u64,
    /// The file ends in the middle of a record (a capture that was killed): the frames
    /// before it were read.
    pub truncated: bool,
}

const PCAP_MAGICS: [[u8; 4]; 4] = [
    [0xd4, 0xc3, 0xb2, 0xa1],
    [0xa1, 0xb2, 0xc3, 0xd4],
    [0x4d, 0x3c, 0xb2, 0xa1],
    [0xa1, 0xb2, 0x3c, 0x4d],
];
const PCAPNG_MAGIC: [u8; 4] = [0x0a, 0x0d, 0x0d, 0x0a];

/// Reads the capture file at `path`, calling `frame` for each frame in file order.
///
/// # Errors
///
/// The file cannot be opened or read, is neither pcap nor pcapng, is damaged before its end,
/// or uses a link type shadow does not decode.
pub fn read_file(path: &Path, frame: impl FnMut(Frame<'_>)) -> Result<ReadSummary, PcapFileError> {
    let file = std::fs::File::open(path).map_err(|source| PcapFileError::Open {
        path: path.to_owned(),
        source,
    })?;
    read(file, frame)
}

/// Reads a pcap or pcapng capture from `reader`, calling `frame` for each frame.
///
/// # Errors
///
/// As [`read_file`].
pub fn read(reader: impl Read, frame: impl FnMut(Frame<'_>)) -> Result<ReadSummary, PcapFileError> {
    let mut reader = BufReader::with_capacity(1 << 16, reader);
    let head = reader.fill_buf()?;
    let mut magic = [0u8; 4];
    let n = head.len().min(4);
    magic[..n].copy_from_slice(&head[..n]);
    if PCAP_MAGICS.contains(&magic) {
        read_pcap(reader, frame)
    } else if magic == PCAPNG_MAGIC {
        read_pcapng(reader, frame)
    } else {
        Err(PcapFileError::NotACapture(magic))
    }
}

fn link_type(linktype: u32) -> Result<LinkType, PcapFileError> {
    LinkType::from_linktype(linktype).ok_or(PcapFileError::UnsupportedLinkType(linktype))
}

/// Stops at a record cut short at the end of the file; any other error is returned.
fn end_or_error(err: PcapError, summary: &mut ReadSummary) -> Result<(), PcapFileError> {
    match err {
        PcapError::IncompleteBuffer => {
            summary.truncated = true;
            Ok(())
        }
        PcapError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            summary.truncated = true;
            Ok(())
        }
        other => Err(other.into()),
    }
}

fn read_pcap(
    reader: impl Read,
    mut frame: impl FnMut(Frame<'_>),
) -> Result<ReadSummary, PcapFileError> {
    let mut pcap = PcapReader::new(reader)?;
    let link = link_type(pcap.header().datalink.into())?;
    let mut summary = ReadSummary::default();
    while let Some(packet) = pcap.next_packet() {
        match packet {
            Ok(packet) => {
                summary.frames += 1;
                frame(Frame {
                    link,
                    ts: packet.timestamp,
                    data: &packet.data,
                });
            }
            Err(err) => {
                end_or_error(err, &mut summary)?;
                break;
            }
        }
    }
    Ok(summary)
}

/// An interface of the current pcapng section.
#[derive(Debug, Clone, Copy)]
struct Interface {
    link: LinkType,
    /// `if_tsresol`: units per second as 10^-n, or 2^-n with the high bit set.
    tsresol: u8,
}

impl Interface {
    /// The reader hands timestamps over as if they were nanoseconds; they are in units of
    /// the interface's resolution.
    fn timestamp(&self, raw: Duration) -> Duration {
        let units = raw.as_nanos();
        let nanos = if self.tsresol & 0x80 == 0 {
            let exp = u32::from(self.tsresol);
            if exp <= 9 {
                units.saturating_mul(10u128.pow(9 - exp))
            } else {
                units / 10u128.checked_pow(exp - 9).unwrap_or(u128::MAX)
            }
        } else {
            let exp = u32::from(self.tsresol & 0x7f);
            units.saturating_mul(1_000_000_000) >> exp
        };
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

fn read_pcapng(
    reader: impl Read,
    mut frame: impl FnMut(Frame<'_>),
) -> Result<ReadSummary, PcapFileError> {
    let mut pcapng = PcapNgReader::new(reader)?;
    let mut interfaces: Vec<Interface> = Vec::new();
    let mut summary = ReadSummary::default();
    // Simple packet blocks carry no timestamp: they get the last one seen.
    let mut last_ts = Duration::ZERO;
    // The reader parses the first section header itself; later ones come as blocks.
    while let Some(block) = pcapng.next_block() {
        let block = match block {
            Ok(block) => block,
            Err(err) => {
                end_or_error(err, &mut summary)?;
                break;
            }
        };
        match block {
            Block::SectionHeader(_) => interfaces.clear(),
            Block::InterfaceDescription(idb) => {
                let tsresol = idb
                    .options
                    .iter()
                    .find_map(|opt| match opt {
                        InterfaceDescriptionOption::IfTsResol(r) => Some(*r),
                        _ => None,
                    })
                    .unwrap_or(6);
                interfaces.push(Interface {
                    link: link_type(idb.linktype.into())?,
                    tsresol,
                });
            }
            Block::EnhancedPacket(epb) => {
                let interface = interfaces
                    .get(epb.interface_id as usize)
                    .ok_or(PcapFileError::UnknownInterface(epb.interface_id))?;
                last_ts = interface.timestamp(epb.timestamp);
                summary.frames += 1;
                frame(Frame {
                    link: interface.link,
                    ts: last_ts,
                    data: &epb.data,
                });
            }
            Block::SimplePacket(spb) => {
                let interface = interfaces
                    .first()
                    .ok_or(PcapFileError::UnknownInterface(0))?;
                summary.frames += 1;
                frame(Frame {
                    link: interface.link,
                    ts: last_ts,
                    data: &spb.data,
                });
            }
            _ => {}
        }
    }
    Ok(summary)
}
