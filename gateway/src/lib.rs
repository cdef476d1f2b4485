//! The gateway library. Each stage of a packet's way has its own folder:
//!
//! - [`wire`]: packet views over byte buffers (Ethernet, IPv4, IPv6, GRE,
//!   checksums), nothing else;
//! - [`datapath`]: the packet logic, sans-IO (time passed in): the tunnel
//!   table, decapsulation, encapsulation, replies, reassembly, coalescing
//!   and segmentation, drop reasons;
//! - [`io`]: every kernel interface, and with it all of the crate's
//!   `unsafe`: AF_XDP socket and UMEM, io_uring, tap/tun, XDP loading,
//!   netlink;
//! - [`engine`]: the worker loop that moves frames between the socket and
//!   the devices through the datapath, with its frame ledger, the hand-over
//!   of writes between workers and the reload switch-over;
//! - [`control`]: configuration, start-up, the reload transaction, watching
//!   the underlay and its neighbours;
//! - [`telemetry`]: counters, the Prometheus endpoint and control socket,
//!   stats for people.
//!
//! `docs/architecture.md` says who owns a frame at each stage and where a
//! change of each kind belongs.
#![deny(unsafe_code)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod control;
pub mod datapath;
pub mod engine;
pub mod io;
pub mod telemetry;
pub mod wire;
