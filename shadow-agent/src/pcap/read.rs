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
    read_all(FrameReader::open(path)?, frame)
}

/// Reads a pcap or pcapng capture from `reader`, calling `frame` for each frame.
///
/// # Errors
///
/// As [`read_file`].
pub fn read(reader: impl Read, frame: impl FnMut(Frame<'_>)) -> Result<ReadSummary, PcapFileError> {
    read_all(FrameReader::new(reader)?, frame)
}

fn read_all<R: Read>(
    mut reader: FrameReader<R>,
    mut frame: impl FnMut(Frame<'_>),
) -> Result<ReadSummary, PcapFileError> {
    while let Some(f) = reader.next_frame()? {
        frame(f);
    }
    Ok(reader.summary().clone())
}

/// Frames of a pcap or pcapng capture, one at a time, for readers that pace themselves
/// (`replay`) as well as those that take the whole file at once ([`read`]).
pub struct FrameReader<R: Read> {
    format: Format<R>,
    summary: ReadSummary,
    /// The current frame: the file's readers lend theirs only until the next call, which a
    /// loop over blocks cannot return, so each frame is copied here (at most a snap length).
    data: Vec<u8>,
}

enum Format<R: Read> {
    Pcap {
        reader: PcapReader<BufReader<R>>,
        link: LinkType,
    },
    PcapNg {
        reader: Box<PcapNgReader<BufReader<R>>>,
        interfaces: Vec<Interface>,
        /// Simple packet blocks carry no timestamp: they get the last one seen.
        last_ts: Duration,
    },
    /// The end of the file, or a record cut short.
    Done,
}

impl FrameReader<std::fs::File> {
    /// The capture file at `path`.
    ///
    /// # Errors
    ///
    /// As [`FrameReader::new`], and the file cannot be opened.
    pub fn open(path: &Path) -> Result<Self, PcapFileError> {
        let file = std::fs::File::open(path).map_err(|source| PcapFileError::Open {
            path: path.to_owned(),
            source,
        })?;
        Self::new(file)
    }
}

impl<R: Read> FrameReader<R> {
    /// Reads the file's header (pcap) or first section (pcapng).
    ///
    /// # Errors
    ///
    /// The input cannot be read, is neither pcap nor pcapng, or a pcap file's link type is one
    /// shadow does not decode.
    pub fn new(reader: R) -> Result<Self, PcapFileError> {
        let mut reader = BufReader::with_capacity(1 << 16, reader);
        let head = reader.fill_buf()?;
        let mut magic = [0u8; 4];
        let n = head.len().min(4);
        magic[..n].copy_from_slice(&head[..n]);
        let format = if PCAP_MAGICS.contains(&magic) {
            let reader = PcapReader::new(reader)?;
            let link = link_type(reader.header().datalink.into())?;
            Format::Pcap { reader, link }
        } else if magic == PCAPNG_MAGIC {
            // The reader parses the first section header itself; later ones come as blocks.
            Format::PcapNg {
                reader: Box::new(PcapNgReader::new(reader)?),
                interfaces: Vec::new(),
                last_ts: Duration::ZERO,
            }
        } else {
            return Err(PcapFileError::NotACapture(magic));
        };
        Ok(Self {
            format,
            summary: ReadSummary::default(),
            data: Vec::new(),
        })
    }

    /// What was read so far: frames, and whether the file ended inside a record.
    pub fn summary(&self) -> &ReadSummary {
        &self.summary
    }

    /// The next frame in file order; `None` at the end of the file or at a record cut short
    /// there ([`ReadSummary::truncated`]).
    ///
    /// # Errors
    ///
    /// The file is damaged before its end, or describes an interface with a link type shadow
    /// does not decode, or a packet on an interface it never described.
    pub fn next_frame(&mut self) -> Result<Option<Frame<'_>>, PcapFileError> {
        let next = match &mut self.format {
            Format::Pcap { reader, link } => next_pcap(reader, *link, &mut self.data),
            Format::PcapNg {
                reader,
                interfaces,
                last_ts,
            } => next_pcapng(reader, interfaces, last_ts, &mut self.data),
            Format::Done => return Ok(None),
        };
        let next = match next {
            Ok(next) => next,
            Err(err) => {
                self.format = Format::Done;
                end_or_error(err, &mut self.summary)?;
                None
            }
        };
        match next {
            Some((link, ts)) => {
                self.summary.frames += 1;
                Ok(Some(Frame {
                    link,
                    ts,
                    data: &self.data,
                }))
            }
            None => {
                self.format = Format::Done;
                Ok(None)
            }
        }
    }
}

fn link_type(linktype: u32) -> Result<LinkType, PcapFileError> {
    LinkType::from_linktype(linktype).ok_or(PcapFileError::UnsupportedLinkType(linktype))
}

/// Stops at a record cut short at the end of the file; any other error is returned.
fn end_or_error(err: PcapFileError, summary: &mut ReadSummary) -> Result<(), PcapFileError> {
    match err {
        PcapFileError::Format(PcapError::IncompleteBuffer) => {
            summary.truncated = true;
            Ok(())
        }
        PcapFileError::Format(PcapError::IoError(io))
            if io.kind() == std::io::ErrorKind::UnexpectedEof =>
        {
            summary.truncated = true;
            Ok(())
        }
        other => Err(other),
    }
}

/// The next pcap record into `data`: its link type and time.
fn next_pcap(
    reader: &mut PcapReader<impl Read>,
    link: LinkType,
    data: &mut Vec<u8>,
) -> Result<Option<(LinkType, Duration)>, PcapFileError> {
    let Some(packet) = reader.next_packet() else {
        return Ok(None);
    };
    let packet = packet?;
    data.clear();
    data.extend_from_slice(&packet.data);
    Ok(Some((link, packet.timestamp)))
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

/// The next packet block of a pcapng file into `data`, past the blocks that describe
/// sections and interfaces: its link type and time.
fn next_pcapng(
    reader: &mut PcapNgReader<impl Read>,
    interfaces: &mut Vec<Interface>,
    last_ts: &mut Duration,
    data: &mut Vec<u8>,
) -> Result<Option<(LinkType, Duration)>, PcapFileError> {
    while let Some(block) = reader.next_block() {
        match block? {
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
                *last_ts = interface.timestamp(epb.timestamp);
                data.clear();
                data.extend_from_slice(&epb.data);
                return Ok(Some((interface.link, *last_ts)));
            }
            Block::SimplePacket(spb) => {
                let interface = interfaces
                    .first()
                    .ok_or(PcapFileError::UnknownInterface(0))?;
                data.clear();
                data.extend_from_slice(&spb.data);
                return Ok(Some((interface.link, *last_ts)));
            }
            _ => {}
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A little-endian microsecond pcap header: snap length 65535, link type `link`.
    fn header(link: u32) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&[0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0]);
        h.extend_from_slice(&[0; 8]);
        h.extend_from_slice(&65535u32.to_le_bytes());
        h.extend_from_slice(&link.to_le_bytes());
        h
    }

    /// A record at `secs`.`micros` with `data`, whose header says it holds `incl` bytes.
    fn record(out: &mut Vec<u8>, secs: u32, micros: u32, incl: u32, data: &[u8]) {
        out.extend_from_slice(&secs.to_le_bytes());
        out.extend_from_slice(&micros.to_le_bytes());
        out.extend_from_slice(&incl.to_le_bytes());
        out.extend_from_slice(&incl.to_le_bytes());
        out.extend_from_slice(data);
    }

    /// Each frame's time and bytes.
    type Frames = Vec<(Duration, Vec<u8>)>;

    fn frames(file: &[u8]) -> Result<(Frames, ReadSummary), PcapFileError> {
        let mut reader = FrameReader::new(file)?;
        let mut out = Vec::new();
        while let Some(f) = reader.next_frame()? {
            out.push((f.ts, f.data.to_vec()));
        }
        // Past the end it stays at the end.
        assert!(reader.next_frame()?.is_none());
        Ok((out, reader.summary().clone()))
    }

    #[test]
    fn frames_come_one_at_a_time_with_their_times() {
        let mut file = header(1);
        record(&mut file, 10, 500_000, 3, b"abc");
        record(&mut file, 11, 0, 2, b"de");
        let (got, summary) = frames(&file).expect("readable");
        assert_eq!(
            got,
            vec![
                (Duration::from_millis(10_500), b"abc".to_vec()),
                (Duration::from_secs(11), b"de".to_vec()),
            ]
        );
        assert_eq!(
            summary,
            ReadSummary {
                frames: 2,
                truncated: false
            }
        );
        // The callback reader agrees.
        let mut n = 0;
        assert_eq!(read(&file[..], |_| n += 1).expect("readable").frames, 2);
        assert_eq!(n, 2);
    }

    #[test]
    fn a_record_cut_short_ends_the_file_and_is_noted() {
        let mut file = header(1);
        record(&mut file, 1, 0, 3, b"abc");
        // The second record's header says 100 bytes; the file has 4.
        record(&mut file, 2, 0, 100, b"wxyz");
        let (got, summary) = frames(&file).expect("readable up to the cut");
        assert_eq!(got.len(), 1);
        assert!(summary.truncated);
        // A header cut in the middle.
        let mut file = header(1);
        record(&mut file, 1, 0, 1, b"a");
        file.extend_from_slice(&[1, 0, 0]);
        let (got, summary) = frames(&file).expect("readable up to the cut");
        assert_eq!((got.len(), summary.truncated), (1, true));
    }

    #[test]
    fn what_is_not_a_capture_or_not_decodable_is_a_clear_error() {
        for junk in [&b""[..], b"GET / HTTP/1.1\r\n", b"\xd4\xc3"] {
            match FrameReader::new(junk) {
                Err(PcapFileError::NotACapture(_)) => {}
                Err(other) => panic!("{junk:?}: {other}"),
                Ok(_) => panic!("{junk:?} was taken for a capture"),
            }
        }
        // USB, which carries no IP.
        match FrameReader::new(&header(189)[..]) {
            Err(e @ PcapFileError::UnsupportedLinkType(189)) => {
                assert!(e.to_string().contains("unsupported link type 189"), "{e}");
            }
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("link type 189 was taken"),
        }
        // A pcap header cut short.
        assert!(FrameReader::new(&header(1)[..10]).is_err());
    }

    #[test]
    fn a_record_longer_than_the_file_or_the_snap_length_allocates_nothing() {
        // A header claiming 4 GiB in a file of 40 bytes: the file ends inside it.
        let mut file = header(1);
        record(&mut file, 1, 0, u32::MAX, b"");
        let (got, summary) = frames(&file).expect("readable up to the cut");
        assert_eq!((got.len(), summary.truncated), (0, true));
        // Longer than the file's own snap length, with the bytes present: damaged.
        let mut file = header(1);
        record(&mut file, 1, 0, 70_000, &vec![0; 70_000]);
        let err = frames(&file).expect_err("longer than the snap length");
        assert!(matches!(err, PcapFileError::Format(_)), "{err}");
    }

    #[test]
    fn a_pcapng_packet_on_an_undescribed_interface_is_an_error() {
        let le = |n: u32| n.to_le_bytes();
        let mut file = Vec::new();
        // Section header block, no options.
        file.extend_from_slice(&PCAPNG_MAGIC);
        file.extend_from_slice(&le(28));
        file.extend_from_slice(&le(0x1A2B_3C4D));
        file.extend_from_slice(&[1, 0, 0, 0]);
        file.extend_from_slice(&[0xff; 8]);
        file.extend_from_slice(&le(28));
        // An enhanced packet block on interface 3, which no block described.
        file.extend_from_slice(&le(6));
        file.extend_from_slice(&le(36));
        for field in [3, 0, 1, 4, 4] {
            file.extend_from_slice(&le(field));
        }
        file.extend_from_slice(b"abcd");
        file.extend_from_slice(&le(36));
        let err = frames(&file).expect_err("interface 3 was never described");
        assert!(matches!(err, PcapFileError::UnknownInterface(3)), "{err}");
    }

    proptest::proptest! {
        /// Any bytes after a valid header: frames, the end, or an error; never a panic.
        #[test]
        fn any_bytes_after_a_header_read_without_panicking(
            tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
        ) {
            let mut file = header(1);
            file.extend_from_slice(&tail);
            let _ = frames(&file);
            let mut ng = PCAPNG_MAGIC.to_vec();
            ng.extend_from_slice(&tail);
            let _ = frames(&ng);
        }
    }
}
