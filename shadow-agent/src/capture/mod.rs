//! Capture: the kernel program and its maps, the interfaces it is attached to, the ring buffer it
//! fills, and pcap files of what it captured.
//!
//! Packets leave this module as [`CapturedPacket`]s: whole Ethernet frames with their capture
//! time, ready for the flow stage.
use bytes::Bytes;

pub mod clock;
pub mod interfaces;
pub mod kernel;
pub mod live;
pub mod pcap;
pub mod privileges;
pub mod records;
pub mod ring;

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

/// One packet as the kernel program copied it: the frame from its Ethernet header on.
#[derive(Clone, Debug)]
pub struct CapturedPacket {
    /// CLOCK_MONOTONIC time of capture, in nanoseconds; see [`clock::WallClock`].
    pub monotonic_ns: u64,
    pub ifindex: u32,
    pub hook: Hook,
    /// The packet came from a selected port: the response direction.
    pub from_service: bool,
    /// Length of the packet on the wire; longer than `data` when `truncated`.
    pub original_len: u32,
    pub truncated: bool,
    /// The frame. Small frames share one allocation with others captured about the same time,
    /// which lives as long as any of them: copy what is kept for long.
    pub data: Bytes,
}
