//! TCP connections rebuilt from captured segments: pure state machines, no I/O, no clock.
//!
//! - [`reassembly`]: one direction's byte stream from segments in any order
//!   ([`Reassembler`]);
//! - [`table`]: every tracked connection keyed by its direction-normalised 4-tuple
//!   ([`FlowTable`], [`FlowKey`]), with its limits, idle expiry and eviction.
//!
//! Segments and capture timestamps go in; stream chunks go out to a [`StreamHandler`], which
//! in shadow is the HTTP layer (see [`crate::pipeline`]).
//!
//! # Memory
//!
//! Everything a flow table holds is bounded by [`FlowLimits`]: at most `max_flows` flows,
//! each charged [`FlowTable::bytes_per_flow`] bytes of fixed state, plus at most
//! `max_buffered_bytes` of buffered data across all flows. `benches/reassembly.rs` measures
//! the real heap cost of an idle flow with a counting allocator.
pub mod reassembly;
pub mod table;

pub use reassembly::{Chunk, LARGEST_WINDOW, Reassembler, SegmentKind};
pub use table::{
    CloseReason, ConnectionId, Direction, FlowKey, FlowLimits, FlowTable, Segment, StreamHandler,
};

/// Declares a struct of `u64` counters and its `pairs()`, so that every consumer (the
/// `inspect` summary, the metrics exporter) lists them from this one declaration.
macro_rules! counter_set {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[doc = $doc:literal])* $field:ident, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Default, PartialEq, Eq)]
        pub struct $name {
            $( $(#[doc = $doc])* pub $field: u64, )*
        }

        impl $name {
            /// Every counter with its name, in declaration order.
            pub fn pairs(&self) -> Vec<(&'static str, u64)> {
                vec![$( (stringify!($field), self.$field), )*]
            }
        }
    };
}
pub(crate) use counter_set;

counter_set! {
    /// What the flow table saw and did. Every flow created ends in exactly one of the `flows_*`
    /// outcomes below (or is still tracked); every segment taken ends in exactly one of the
    /// `segments_*` outcomes, so `segments` is their sum.
    pub struct FlowCounters {
        /// Flows that started (on a SYN, or on payload when picked up mid-stream).
        flows_created,
        /// Flows whose two directions ended with FIN, or that were reset.
        flows_closed,
        /// Flows without a segment for the idle timeout.
        flows_expired,
        /// Flows evicted to stay within the flow limit (handshakes without data first).
        flows_evicted_flow_limit,
        /// Flows evicted to stay within the global byte limit.
        flows_evicted_memory,
        /// Flows still open at the end of input.
        flows_finished,
        /// Flows ended by a new connection on their 4-tuple (a SYN with a new initial sequence
        /// number after its sender had finished, never sent, or nothing was exchanged).
        flows_reused,
        /// TCP segments taken, each counted again in exactly one `segments_*` outcome below.
        segments,
        /// Segments delivered at once.
        segments_in_order,
        /// Segments held until a hole before them filled (or was declared lost).
        segments_out_of_order,
        /// Segments that carried only bytes already seen, repeated SYNs, and payload on a
        /// connection that already closed.
        segments_retransmitted,
        /// Segments that carried some bytes already seen and some new ones.
        segments_overlapping,
        /// Segments with a sequence number outside any possible window.
        segments_out_of_window,
        /// Segments without payload that did their part: a SYN, a FIN, an accepted reset, an
        /// acknowledgement.
        segments_control,
        /// SYNs on a connection whose sender's stream is open and carried data: the kernel
        /// answers with a challenge ACK and keeps the connection (RFC 5961), and so does shadow.
        segments_syn_challenged,
        /// Resets whose sequence number is outside the window: the kernel ignores them (RFC
        /// 5961), and so does shadow.
        segments_rst_out_of_window,
        /// Segments of connections shadow no longer reads: after an upgrade to another protocol,
        /// or once framing cannot be trusted (a rejected request head, ambiguous framing).
        segments_opaque,
        /// Resets and bare acknowledgements of connections not tracked.
        segments_ignored,
        /// Holes declared lost (out-of-order limit, acknowledged by the peer, reset, expiry,
        /// eviction or end of input).
        gaps,
        /// Stream bytes in those holes.
        bytes_lost,
    }
}

impl FlowCounters {
    /// The sum of the segment outcomes; equal to `segments` (a test checks it).
    pub fn segment_outcomes(&self) -> u64 {
        self.segments_in_order
            + self.segments_out_of_order
            + self.segments_retransmitted
            + self.segments_overlapping
            + self.segments_out_of_window
            + self.segments_control
            + self.segments_syn_challenged
            + self.segments_rst_out_of_window
            + self.segments_opaque
            + self.segments_ignored
    }

    /// Flows that ended, by any outcome; `flows_created` minus this is what is still tracked
    /// and open.
    pub fn flows_ended(&self) -> u64 {
        self.flows_closed
            + self.flows_expired
            + self.flows_evicted_flow_limit
            + self.flows_evicted_memory
            + self.flows_finished
            + self.flows_reused
    }
}
