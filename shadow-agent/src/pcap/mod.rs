//! pcap files: [`read`] takes captured frames from pcap and pcapng files (`inspect`, tests),
//! [`write`] writes what the kernel program captured (`capture --write`).
pub mod read;
pub mod write;

pub use read::{Frame, FrameReader, PcapFileError, ReadSummary, read, read_file};
pub use write::PcapWriter;
