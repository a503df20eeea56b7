//! shadow's node agent: the user-space half of the data path.
//!
//! The modules follow a request's way through the agent:
//! - [`capture`]: the kernel program, its maps and attachments, and the ring buffer it fills;
//! - [`pipeline`]: captured frames in, HTTP events out; the one path that live capture, pcap
//!   files and tests all drive, through
//!   - [`flows`]: TCP reassembly per connection (pure, no I/O), and
//!   - [`http`]: HTTP/1.x exchanges rebuilt from the byte streams (pure, no I/O);
//! - [`policy`]: which route a request takes, whether it may be mirrored, and the headers of its
//!   copies (pure);
//! - [`mirror`]: a request in, its copies out, tagged and charged to the [`budget`] (pure), with
//!   the counters of what became of each;
//! - [`node`]: what `run` decides between the pipeline and the senders (copies, the dry run,
//!   pairing, the ramp, reloads), pure, fed by `cmd/run/` and, from a pcap file, `cmd/replay.rs`
//!   paced by [`replay`];
//! - [`forward`]: the senders, lanes of connections to each target;
//! - [`compare`]: live and shadow answers paired and compared per endpoint (pure);
//! - [`admin`]: the admin endpoint (probes, metrics, `/stats`, the report).
//!
//! On Kubernetes, [`kubernetes`] watches this node's pods: routes name workloads by namespace
//! and labels, and the kernel captures only the selected pods' connections.
//!
//! Beside the path: [`config`] (the file, read and checked once into types), [`memory`] (the
//! memory ceiling shared out), [`latency`] (the histogram the mirror, the comparison and the
//! metrics share), [`pcap`] (reading and writing capture files) and [`stats`] (every counter of
//! a running agent as one value, for `/stats` and `status`).
#![forbid(unsafe_op_in_unsafe_fn)]

pub mod admin;
pub mod budget;
pub mod capture;
pub mod compare;
pub mod config;
pub mod flows;
pub mod forward;
pub mod http;
pub mod http2;
pub mod kubernetes;
pub mod latency;
pub mod memory;
pub mod mirror;
pub mod node;
pub mod pcap;
pub mod pipeline;
pub mod policy;
pub mod replay;
pub mod stats;
