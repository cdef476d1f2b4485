//! What the send path needs to know of one tunnel, and the length of the
//! outer headers it writes.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU16, AtomicU32};
use std::sync::Arc;

use super::{PathMtu, DSTOPT_LEN};
use crate::datapath::tunnel::{DeviceKind, Mode, Tos, Ttl};
use crate::wire::{ethernet, gre, ipv4, ipv6};

/// What the send path needs to know of one tunnel.
#[derive(Debug, Clone)]
pub struct TunnelTx {
    pub mode: Mode,
    /// The outer addresses, both IPv4 or both IPv6.
    pub local: IpAddr,
    pub remote: IpAddr,
    /// IPv6 outer: the Tunnel Encapsulation Limit option to send (RFC 2473).
    pub encap_limit: Option<u8>,
    pub okey: Option<u32>,
    pub ocsum: bool,
    /// `oseq`: the last sequence number sent, shared by every worker that
    /// sends on this tunnel (and kept across reloads).
    pub oseq: Option<Arc<AtomicU32>>,
    /// The path MTU the underlay reported (ICMP fragmentation needed),
    /// shared by the workers and kept across reloads.
    pub path_mtu: Arc<PathMtu>,
    /// The outer IPv4 identification of packets sent without DF (which a
    /// router may fragment): one counter for the tunnel, shared by every
    /// worker, so no two workers send the same ID at once (RFC 6864; the
    /// kernel's `__ip_select_ident` keeps one per destination). Packets
    /// with DF take the worker's own.
    pub ident: Arc<AtomicU16>,
    pub ttl: Ttl,
    pub tos: Tos,
    /// Outer DF always set; without it DF follows an IPv4 inner packet
    /// (never set with `ignore_df`).
    pub pmtudisc: bool,
    pub ignore_df: bool,
    pub mtu: u16,
    pub device_kind: DeviceKind,
    /// The tap's own MAC (ARP replies and ICMP are addressed to it).
    pub device_mac: ethernet::Address,
    /// The MAC the gateway answers ARP/ND with: stands for the far side.
    pub peer_mac: ethernet::Address,
    /// This end's inner address: never answered for in ARP/ND.
    pub address: Option<IpAddr>,
    /// The far end's inner address: source of ICMP errors we generate.
    pub peer: Option<IpAddr>,
    /// GRE keepalives this tunnel sends, and what their replies must
    /// carry to be taken by this tunnel on the way back.
    pub keepalive: Option<KeepaliveProbe>,
}

/// What a keepalive probe needs besides the tunnel's own outer headers:
/// the inner GRE header the peer reflects back to us must pass our receive
/// rules, so it carries our `ikey` and, with `icsum`, a checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepaliveProbe {
    pub interval: u16,
    pub reply_key: Option<u32>,
    pub reply_csum: bool,
}

impl TunnelTx {
    pub(super) fn gre_repr(&self, protocol: ethernet::EtherType) -> gre::Repr {
        gre::Repr {
            protocol,
            checksum: self.ocsum,
            key: self.okey,
            sequence: self.oseq.as_ref().map(|_| 0),
        }
    }

    /// Bytes of outer headers: Ethernet, IPv4 and GRE with its options.
    pub fn outer_len(&self) -> usize {
        ethernet::HEADER_LEN
            + self.outer_ip_len()
            + match self.mode {
                Mode::Ipip | Mode::Sit => 0,
                Mode::Gre | Mode::Gretap => self.gre_repr(ethernet::EtherType::Ipv4).header_len(),
            }
    }

    /// The outer IP header: IPv4, or IPv6 with the encapsulation-limit
    /// destination option when there is one.
    fn outer_ip_len(&self) -> usize {
        match self.local {
            IpAddr::V4(_) => ipv4::HEADER_LEN,
            IpAddr::V6(_) => {
                ipv6::HEADER_LEN
                    + if self.encap_limit.is_some() {
                        DSTOPT_LEN
                    } else {
                        0
                    }
            }
        }
    }

    /// Where a read from the device must land in the frame so that the
    /// inner IP packet starts right after the outer headers (a tap's
    /// Ethernet header sits in front of it and is overwritten).
    pub fn read_offset(&self) -> usize {
        match (self.mode, self.device_kind) {
            // gretap keeps the whole frame, its Ethernet header included.
            (Mode::Gretap, _) | (_, DeviceKind::Tun) => self.outer_len(),
            (_, DeviceKind::Tap) => self.outer_len() - ethernet::HEADER_LEN,
        }
    }
}
