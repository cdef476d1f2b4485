//! The gateway library: packet logic (sans-IO), configuration, and the
//! runtime that wires the XDP program, AF_XDP sockets, io_uring and tap/tun
//! devices together. All `unsafe` lives in [`sys`].
#![deny(unsafe_code)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod clock;
pub mod config;
pub mod decap;
pub mod drop_reason;
pub mod encap;
pub mod human;
pub mod metrics;
pub mod neighbour;
pub mod netlink;
pub mod offload;
pub mod ratelimit;
pub mod reasm;
pub mod run;
pub mod spread;
pub mod stats;
pub mod sys;
pub mod tunnel;
pub mod wire;
pub mod worker;
pub mod xdp;
