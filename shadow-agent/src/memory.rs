//! How `limits.memory` is shared out, so that the agent as a whole stays below it under any
//! traffic: every buffer that grows with traffic gets a fixed share, and what would exceed it is
//! dropped and counted rather than held.
//!
//! Shares of what is left after a fixed reserve (program, runtime, allocator slack) and the
//! ring buffer (mapped into the agent, so it counts):
//! - 1/8 for batches of captured packets waiting for the pipeline;
//! - 1/8 for the fixed state of tracked flows;
//! - 3/8 for bytes the flows buffer (out-of-order segments, heads and bodies being rebuilt);
//! - 3/8 for copies waiting for their target's answer (heads and bodies).
use crate::{capture::PacketBatch, flows::FlowLimits};

/// Program, runtime, allocator slack and the odd allocation not counted elsewhere. The
/// Kubernetes client (kube, rustls, the API types) doubled the program's size; the pages of its
/// code that run count in the agent's resident memory too.
pub const RESERVE_BYTES: u64 = 36 << 20;

/// The sizes that follow from a memory ceiling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryPlan {
    /// Batches of captured packets held for the pipeline at most.
    pub channel_batches: usize,
    pub flows: FlowLimits,
    /// Bytes of copies pending, all targets together.
    pub copy_bytes: usize,
}

impl MemoryPlan {
    /// Shares `memory_bytes` out, with a ring buffer of `ring_bytes` and flows of
    /// `bytes_per_flow` fixed state each. Never below small working minimums.
    pub fn new(memory_bytes: u64, ring_bytes: u64, bytes_per_flow: usize) -> Self {
        let left = memory_bytes.saturating_sub(RESERVE_BYTES + ring_bytes);
        let eighth = usize::try_from(left / 8).unwrap_or(usize::MAX);
        let defaults = FlowLimits::default();
        Self {
            channel_batches: (eighth / PacketBatch::MAX_BYTES).clamp(4, 1024),
            flows: FlowLimits {
                max_flows: (eighth / bytes_per_flow.max(1)).clamp(1024, defaults.max_flows),
                max_buffered_bytes: (eighth * 3).max(1 << 20),
                max_flow_out_of_order_bytes: defaults.max_flow_out_of_order_bytes,
                idle_timeout: defaults.idle_timeout,
            },
            copy_bytes: (eighth * 3).max(1 << 20),
        }
    }

    /// The most these buffers can hold together, for the record.
    pub fn bound(&self, bytes_per_flow: usize) -> u64 {
        (self.channel_batches * PacketBatch::MAX_BYTES
            + self.flows.max_flows * bytes_per_flow
            + self.flows.max_buffered_bytes
            + self.copy_bytes) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_default_ceiling() {
        let plan = MemoryPlan::new(512 << 20, 16 << 20, 700);
        assert!((100..=200).contains(&plan.channel_batches), "{plan:?}");
        assert_eq!(plan.flows.max_flows, 65_536);
        assert!(plan.flows.max_buffered_bytes > 150 << 20);
        assert!(plan.bound(700) + RESERVE_BYTES + (16 << 20) <= 512 << 20);
    }

    proptest! {
        /// Above the configurable minimum, the buffers and the reserve fit in the ceiling.
        #[test]
        fn shares_fit_the_ceiling(memory in (64u64 << 20)..(64 << 30), per_flow in 200usize..2000) {
            let ring = 16 << 20;
            let plan = MemoryPlan::new(memory, ring, per_flow);
            prop_assert!(plan.bound(per_flow) + RESERVE_BYTES + ring <= memory,
                "{plan:?} over {memory}");
        }
    }
}
