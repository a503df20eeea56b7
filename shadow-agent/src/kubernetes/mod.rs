//! Kubernetes: which pods run on this node, so that routes can name workloads by namespace and
//! labels and the kernel captures only the selected pods' connections.
//!
//! [`pods`] is pure: the API's `Pod` objects in, a [`pods::PodIndex`] out (who serves at an
//! address, which addresses the selectors take). [`watch`] keeps one up to date from the API
//! server: a list, then a watch of the pods whose `spec.nodeName` is this node.
pub mod pods;
pub mod watch;

pub use pods::{LocalPod, PodIndex, Workload};
