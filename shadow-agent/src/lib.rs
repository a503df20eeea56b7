//! shadow's node agent: the user-space half of the data path.
//!
//! The modules follow a packet's way through the agent:
//! - [`capture`]: the kernel program, its maps and attachments, the ring buffer, pcap files;
//! - [`flows`]: TCP reassembly per connection (pure, no I/O);
//! - [`http`]: HTTP/1.x exchanges rebuilt from the byte streams (pure, no I/O);
//! - [`pipeline`]: captured frames in, HTTP events out; the one path that live capture, pcap
//!   files and tests all drive;
//! - [`stats`]: every counter of a running agent as one value, for `/stats` and `status`.
#![forbid(unsafe_op_in_unsafe_fn)]

pub mod admin;
pub mod budget;
pub mod capture;
pub mod compare;
pub mod config;
pub mod flows;
pub mod forward;
pub mod http;
pub mod memory;
pub mod mirror;
pub mod pcap_file;
pub mod pipeline;
pub mod policy;
pub mod stats;
