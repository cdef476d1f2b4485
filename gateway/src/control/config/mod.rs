//! The configuration file: TOML in iproute2's words, so that
//! `ip tunnel add tun100 mode gre remote 192.168.0.58 local 192.168.0.8 ttl 64`
//! becomes a `[[tunnel]]` table with the same keys. Parsing is two steps:
//! serde reads the raw shape (unknown keys refused), then [`Config::validate`]
//! checks meaning and reports the first problem in one line that names the
//! field and the fix.
//!
//! Here are the validated types and the arithmetic of a tunnel's MTU; the
//! raw shape, [`Config::load`] and [`Config::parse`] and the checks of the
//! `[gateway]` table and across tunnels are in `parse`, the checks of one
//! `[[tunnel]]` table in `tunnel`.

use std::net::IpAddr;

use crate::datapath::tunnel::{DeviceKind, Mode};
pub use crate::datapath::tunnel::{Tos, Ttl};
pub use crate::engine::worker::PollMode;
pub use crate::io::xdp::XdpAttach;
pub use crate::io::xsk::XskBind;
use crate::wire::{ethernet, ipv4, ipv6};
pub use anycast::{Anycast, DEFAULT_DEVICE as DEFAULT_ANYCAST_DEVICE};

mod anycast;
mod parse;
#[cfg(test)]
mod tests;
mod tunnel;

/// Where the gateway looks when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/gateway/gateway.toml";

/// Bytes in front of the packet data in every UMEM frame: the kernel's
/// `XDP_PACKET_HEADROOM`. The gateway's UMEM adds no frame headroom of its
/// own (xsk-rs's default, see [`crate::io::xsk::Xsk::new`]) and its XDP
/// program never moves a packet's start, so every frame's data starts this
/// far in.
pub const UMEM_HEADROOM: usize = 256;

/// Packet bytes one UMEM frame holds: from the data start to the end of the
/// frame, what [`crate::io::xsk::Xsk::buffer_mut`] hands out (3840).
pub const FRAME_DATA_LEN: usize = crate::io::xsk::FRAME_SIZE as usize - UMEM_HEADROOM;

/// A configuration problem, in one line: the field, what is wrong, the fix.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

fn err(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        message: message.into(),
    }
}

// ---------------------------------------------------------------- validated

/// Which NIC RX queues get an AF_XDP socket and a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Queues {
    All,
    List(Vec<u32>),
}

/// Which cores workers are pinned to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cores {
    /// Worker `i` on the last cores, leaving core 0 to the rest of the host.
    Auto,
    List(Vec<usize>),
}

// Displayed in the configuration's own words.
impl std::fmt::Display for Queues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Queues::All => f.write_str("\"all\""),
            Queues::List(l) => write!(f, "{l:?}"),
        }
    }
}

impl std::fmt::Display for Cores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cores::Auto => f.write_str("\"auto\""),
            Cores::List(l) => write!(f, "{l:?}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TunnelConfig {
    pub name: String,
    pub mode: Mode,
    pub local: IpAddr,
    pub remote: IpAddr,
    pub ikey: Option<u32>,
    pub okey: Option<u32>,
    pub icsum: bool,
    pub ocsum: bool,
    /// Received packets must carry a sequence number, newer than the last.
    pub iseq: bool,
    /// Sent packets carry a sequence number (1, 2, ...).
    pub oseq: bool,
    pub ttl: Ttl,
    pub tos: Tos,
    /// Path MTU discovery: the outer DF bit always set (the kernel's
    /// default). Without it DF follows the inner packet.
    pub pmtudisc: bool,
    /// With `pmtudisc = false`: never set DF on the outer header.
    pub ignore_df: bool,
    /// IPv6 underlay: the Tunnel Encapsulation Limit option sent in a
    /// destination-options header (RFC 2473), 4 by default as the kernel's
    /// ip6tnl and ip6gre; `None`: no option ("none").
    pub encap_limit: Option<u8>,
    /// `None`: the underlay's MTU less the tunnel overhead, found at start,
    /// and no more than [`TunnelConfig::max_mtu`] (see
    /// [`TunnelConfig::auto_mtu`]). When set, validation keeps it within
    /// `max_mtu`.
    pub mtu: Option<u16>,
    pub device: String,
    pub device_kind: DeviceKind,
    pub address: Option<IpAddr>,
    pub peer: Option<IpAddr>,
    /// Inner source prefixes accepted besides `peer`.
    pub accept_from: Vec<crate::datapath::tunnel::Prefix>,
    /// Keep the device when the gateway stops.
    pub persistent: bool,
    /// GRE keepalives sent, and the tunnel's state (up/down) from their
    /// replies.
    pub keepalive: Option<crate::datapath::tunnel::Keepalive>,
    /// The device's carrier follows the tunnel's state (needs keepalive).
    pub carrier_follows: bool,
}

impl TunnelConfig {
    /// Bytes the outer headers add (outer IP + GRE with its options).
    pub fn overhead(&self) -> u16 {
        self.headers(
            self.encap_limit.is_some(),
            [self.okey.is_some(), self.ocsum, self.oseq],
        )
    }

    /// The most bytes of headers a packet of this tunnel carries either
    /// way: the packets the peer sends have the receive options (`ikey`,
    /// `icsum`, `iseq`) and, on an IPv6 underlay, the peer's
    /// encapsulation-limit option whatever this end sends (Linux sends it
    /// by default), which may be more than [`Self::overhead`] counts for
    /// the way out.
    fn largest_overhead(&self) -> u16 {
        let rx = self.headers(true, [self.ikey.is_some(), self.icsum, self.iseq]);
        self.overhead().max(rx)
    }

    /// Outer IP (with the encapsulation-limit option on an IPv6 underlay
    /// when `encap_limit`), GRE with the options `gre` (key, checksum,
    /// sequence number), and for gretap the inner Ethernet header (the
    /// kernel's gretap MTU is the underlay's less 38).
    fn headers(&self, encap_limit: bool, gre: [bool; 3]) -> u16 {
        let ip = match self.local {
            IpAddr::V4(_) => 20,
            IpAddr::V6(_) => 40 + if encap_limit { 8 } else { 0 },
        };
        let gre = match self.mode {
            Mode::Ipip | Mode::Sit => 0,
            Mode::Gre | Mode::Gretap => 4 + 4 * gre.iter().map(|&o| u16::from(o)).sum::<u16>(),
        };
        let eth = if self.mode == Mode::Gretap { 14 } else { 0 };
        ip + gre + eth
    }

    /// Bytes a packet of `mtu` bytes takes of a UMEM frame at most, outer
    /// Ethernet header included: the longest frame the tunnel sends.
    ///
    /// A packet read from the device is copied into a frame at
    /// [`crate::datapath::encap::TunnelTx::read_offset`] and must end inside the
    /// frame's [`FRAME_DATA_LEN`] bytes (`Worker::take_read` drops it as
    /// `tx_malformed` otherwise, with no ICMP back):
    /// - tun: the read offset is the outer headers (Ethernet, outer IP with
    ///   the encapsulation-limit option, GRE with its options), and the
    ///   packet the inner IP packet, up to `mtu`;
    /// - tap carrying IP (gre, ipip, sit): the tap's Ethernet header is read
    ///   in front of the inner IP packet and overwritten by the outer
    ///   headers, so the offset is one Ethernet header less and the packet
    ///   one longer: the same sum;
    /// - gretap: the whole tap frame is carried, its Ethernet header
    ///   (counted in [`Self::overhead`]) and one VLAN tag included.
    ///
    /// The virtio-net header ([`crate::datapath::offload::VNET_HDR_LEN`]) stays in the
    /// io_uring read buffer, and on the way into the device it is written
    /// where the outer headers were, so it takes no room of its own.
    pub fn outer_frame_len(&self, mtu: u16) -> usize {
        ethernet::HEADER_LEN
            + usize::from(self.largest_overhead())
            + self.vlan_len()
            + usize::from(mtu)
    }

    /// The outer IP payload (all after the fixed IPv4 or IPv6 header: the
    /// encapsulation-limit option, GRE, and what the tunnel carries) of a
    /// packet of `mtu` bytes at most: what reassembly of an outer packet
    /// fragmented on the way has to hold ([`crate::datapath::reasm::MAX_PAYLOAD`]).
    pub fn outer_ip_payload_len(&self, mtu: u16) -> usize {
        let fixed = match self.local {
            IpAddr::V4(_) => ipv4::HEADER_LEN,
            IpAddr::V6(_) => ipv6::HEADER_LEN,
        };
        usize::from(self.largest_overhead()) - fixed + self.vlan_len() + usize::from(mtu)
    }

    /// The largest MTU the gateway can carry on this tunnel: the largest
    /// `mtu` whose packets fit a UMEM frame with the outer headers
    /// ([`Self::outer_frame_len`] within [`FRAME_DATA_LEN`]), and whose
    /// outer IP payload, should a router fragment it, fits reassembly
    /// ([`Self::outer_ip_payload_len`] within [`crate::datapath::reasm::MAX_PAYLOAD`]).
    /// For instance 3796 for gre over IPv4 (the reassembly bound: the frame
    /// alone would allow 3802), 3774 for ip6gre with its encapsulation
    /// limit (the frame bound), 3778 for gretap over IPv4.
    pub fn max_mtu(&self) -> u16 {
        let frame = FRAME_DATA_LEN.saturating_sub(self.outer_frame_len(0));
        let reassembly =
            crate::datapath::reasm::MAX_PAYLOAD.saturating_sub(self.outer_ip_payload_len(0));
        frame.min(reassembly).min(usize::from(u16::MAX)) as u16
    }

    /// The MTU when `mtu` is not set: the underlay's less
    /// [`Self::overhead`]. A jumbo underlay would give more than a UMEM
    /// frame can carry (9000 less 24 for gre, where every packet the device
    /// sent would be dropped as `tx_malformed`): such a default is clamped
    /// to [`Self::max_mtu`] with a warning, not refused, since the
    /// underlay's MTU is known only at start (a configured `mtu` past the
    /// limit is refused by validation instead).
    pub fn auto_mtu(&self, underlay_mtu: u32) -> Result<u16, ConfigError> {
        let m = underlay_mtu.saturating_sub(u32::from(self.overhead()));
        if m < 68 {
            return Err(err(
                format!("tunnel {:?}.mtu", self.name),
                format!("the underlay MTU {underlay_mtu} leaves no room; set mtu explicitly"),
            ));
        }
        let max = self.max_mtu();
        if m > u32::from(max) {
            tracing::warn!(
                "tunnel {:?}: the underlay MTU {underlay_mtu} less the tunnel's headers ({m}) is more than a {}-byte UMEM frame can carry; using mtu {max} (set mtu = {max} to say so)",
                self.name,
                crate::io::xsk::FRAME_SIZE
            );
            return Ok(max);
        }
        Ok(m as u16)
    }

    /// gretap frames may carry one 802.1Q tag past the MTU (encap and
    /// decap accept `mtu + 4` bytes behind the tap frame's Ethernet header).
    fn vlan_len(&self) -> usize {
        if self.mode == Mode::Gretap {
            ethernet::VLAN_TAG_LEN
        } else {
            0
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub iface: Option<String>,
    pub queues: Queues,
    pub cores: Cores,
    pub batch_size: usize,
    pub poll: PollMode,
    pub xdp_attach: XdpAttach,
    pub xsk_bind: XskBind,
    pub frames_per_queue: u32,
    pub ring_size: u32,
    /// Kernel busy polling of the NIC queue from the worker
    /// (`SO_PREFER_BUSY_POLL`, `SO_BUSY_POLL_BUDGET`): packets per poll,
    /// 0 when off.
    pub busy_poll_budget: u16,
    /// Device writes spread over all workers by inner flow (see
    /// [`crate::engine::handover`]).
    pub spread_writes: bool,
    pub tunnels: Vec<TunnelConfig>,
    /// Shared tunnel endpoint addresses, announced while the gateway can
    /// carry traffic (`[anycast]`).
    pub anycast: Option<Anycast>,
}
