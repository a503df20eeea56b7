//! Capture: the kernel program and its maps, the interfaces it is attached to, and the ring buffer
//! it fills.
//!
//! Packets leave this module in [`PacketBatch`]es of [`CapturedPacket`]s: whole Ethernet frames
//! with their capture time, ready for the flow stage.
pub mod clock;
pub mod clsact;
pub mod interfaces;
pub mod kernel;
pub mod kernel_log;
pub mod live;
pub mod privileges;
pub mod records;
pub mod ring;
pub mod selection;

pub use kernel::{CaptureSettings, KernelCapture};

/// The TC hook a program is attached to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Hook {
    Ingress,
    Egress,
}

impl Hook {
    pub fn name(self) -> &'static str {
        match self {
            Hook::Ingress => "ingress",
            Hook::Egress => "egress",
        }
    }
}

impl std::str::FromStr for Hook {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ingress" => Ok(Hook::Ingress),
            "egress" => Ok(Hook::Egress),
            other => Err(format!(
                "unknown hook `{other}`: expected `ingress` or `egress`"
            )),
        }
    }
}

/// One packet as the kernel program copied it: the frame from its Ethernet header on, borrowed
/// from the [`PacketBatch`] it came in.
#[derive(Clone, Copy, Debug)]
pub struct CapturedPacket<'a> {
    /// CLOCK_MONOTONIC time of capture, in nanoseconds; see [`clock::WallClock`].
    pub monotonic_ns: u64,
    pub ifindex: u32,
    pub hook: Hook,
    /// The packet came from a selected port: the response direction.
    pub from_service: bool,
    /// Length of the packet on the wire; longer than `data` when `truncated`.
    pub original_len: u32,
    pub truncated: bool,
    pub data: &'a [u8],
}

/// What a batch keeps of one packet besides its bytes.
#[derive(Clone, Copy, Debug)]
struct PacketInfo {
    monotonic_ns: u64,
    ifindex: u32,
    /// `record_flags` of the packet's records.
    flags: u32,
    original_len: u32,
    /// Where its bytes end in the batch's buffer; they start where the previous packet's end.
    end: u32,
}

/// Packets the ring buffer reader took out together, their frames one after another in one
/// buffer. The next stage gets them with one channel send and the agent allocates nothing per
/// packet: a channel operation and a buffer per packet cost more than the rest of the reader's
/// work on a small packet.
#[derive(Debug, Default)]
pub struct PacketBatch {
    frames: Vec<u8>,
    packets: Vec<PacketInfo>,
}

impl PacketBatch {
    /// A batch counts as full from this many packets on.
    pub const MAX_PACKETS: usize = 256;
    /// A batch counts as full from this many frame bytes on. With a packet of up to
    /// [`shadow_common::CAPTURE_LIMIT`] bytes on top, [`PacketBatch::MAX_BYTES`] bounds it.
    pub const FULL_BYTES: usize = 256 * 1024;
    /// The most memory one batch holds: frames and what is kept per packet.
    pub const MAX_BYTES: usize = Self::FULL_BYTES
        + shadow_common::CAPTURE_LIMIT as usize
        + Self::MAX_PACKETS * std::mem::size_of::<PacketInfo>();

    pub fn len(&self) -> usize {
        self.packets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.packets.is_empty()
    }

    /// Whether the reader should hand this batch on before adding to it.
    pub fn is_full(&self) -> bool {
        self.packets.len() >= Self::MAX_PACKETS || self.frames.len() >= Self::FULL_BYTES
    }

    /// The packets in the order they were read.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = CapturedPacket<'_>> {
        let mut start = 0;
        self.packets.iter().map(move |info| {
            let end = info.end as usize;
            let data = &self.frames[start..end];
            start = end;
            CapturedPacket {
                monotonic_ns: info.monotonic_ns,
                ifindex: info.ifindex,
                hook: if info.flags & shadow_common::record_flags::EGRESS != 0 {
                    Hook::Egress
                } else {
                    Hook::Ingress
                },
                from_service: info.flags & shadow_common::record_flags::FROM_SERVICE != 0,
                original_len: info.original_len,
                truncated: info.flags & shadow_common::record_flags::TRUNCATED != 0,
                data,
            }
        })
    }

    /// Adds a packet: its first record's header, and its bytes (at most
    /// [`shadow_common::CAPTURE_LIMIT`]).
    fn push(&mut self, header: &shadow_common::RecordHeader, data: &[u8]) {
        if self.packets.is_empty() {
            // Room for a full batch and the largest packet that can end it, at once: never
            // reallocated while it fills, so it never holds more than MAX_BYTES.
            self.frames
                .reserve(Self::FULL_BYTES + shadow_common::CAPTURE_LIMIT as usize);
            self.packets.reserve(Self::MAX_PACKETS);
        }
        self.frames.extend_from_slice(data);
        self.packets.push(PacketInfo {
            monotonic_ns: header.timestamp_ns,
            ifindex: header.ifindex,
            flags: header.flags,
            original_len: header.packet_len,
            // Below FULL_BYTES + CAPTURE_LIMIT: fits.
            end: self.frames.len() as u32,
        });
    }
}
