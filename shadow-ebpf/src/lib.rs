//! The library target exists only so that the agent's build script can depend on this crate and
//! be rebuilt when it changes; the program itself is the `shadow-ebpf` binary.
#![no_std]
