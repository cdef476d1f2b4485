//! `cargo xtask vm guest`: the gateway inside the guest, on Debian 12's
//! Linux 6.1 (older io_uring: no multishot reads, no USO) with a real
//! driver: virtio-net with 2 queue pairs (`-smp 2`, a `multi_queue` tap,
//! `mq=on`, `ethtool -L eth0 combined 2`) in native XDP mode, one worker
//! per queue.
//!
//! The peer is a second gateway on the host side of the wire (the host's
//! kernel has no GRE modules), in the gateway namespace on `ens0`, with
//! [`TUNNELS`]: different outer addresses (extra ones on `ens0` and
//! `eth0`), keys and modes, so that the NIC's hash has several flows to
//! spread. Through each tunnel: ping both ways and 1 MiB of TCP with its
//! SHA-256 compared on both ends. Then the guest gateway's per-worker
//! counters must show that both workers received tunnel packets (when the
//! tunnels' own flows all landed on one queue, short TCP connection
//! attempts, each a new flow, are added until both have, or a bound).
//! Then SIGTERM: the gateway exits 0 and eth0 has no XDP program left; a
//! second start, SIGKILL: again none left; a third start still pings.
//!
//! Every wait is a condition with a generous deadline, never a fixed sleep:
//! TCG is slow, and its speed decides nothing here. The result is JSON
//! (`--json FILE`, default `target/vm/guest.json`) and a short table;
//! `tests/tests/vm_guest.rs` runs this and checks the JSON.

mod report;
mod scenario;

pub use scenario::run;
