//! The devices' offloads, through the virtio-net header every packet to
//! and from a device carries (`IFF_VNET_HDR`). Sans-IO: this module only
//! reads and writes packet bytes; the worker holds the frames.
//!
//! **Inbound, coalescing** (GRO done in the gateway): consecutive TCP
//! segments of one flow in an RX batch become one large write, which the
//! kernel takes as a single GSO packet, the way `tcp_gro_receive` merges
//! them for a NIC.
//!
//! **Outbound, segmentation** (TSO/USO done in the gateway): the devices
//! offer TCP and UDP segmentation offload, so the kernel hands over packets
//! of up to 64 KiB; [`Segmenter`] cuts one into tunnel-MTU packets, each
//! with its own headers and checksums, as the kernel's GSO would.
//!
//! A segment joins the one before it only when the kernel's GRO would merge
//! them: the same link header (a tap's Ethernet addresses and VLAN tags, as
//! `dev_gro_receive` compares them before any IP header: frames of two
//! VLANs never merge), same addresses and ports, IPv4 without options or
//! fragmentation, with DF and a right header checksum (or IPv6 without
//! extension headers), same TOS/traffic class and TTL/hop limit, same
//! acknowledgement number, window and TCP options, flags ACK (and PSH, ECE)
//! only, payload not larger than the first segment's, its sequence number
//! following on, and a right TCP checksum (checked here, since the kernel
//! will not look at it again). Headers are rewritten with incremental
//! checksum updates (RFC 1624), never summed again from scratch. PSH or a shorter segment
//! ends the run. Anything else is written on its own, after any run of its
//! flow, so no flow is reordered. (ECE may be set, as long as every
//! segment of the run has it; CWR is never merged.)
//!
//! Coalescing is in `gro`, segmentation (and completing a checksum the
//! kernel left partial) in `gso`; both are re-exported here. What they
//! share is here: the TCP flags looked at, the pseudo-header sum, and the
//! rewriting of an IP header's lengths. The virtio-net header itself is a
//! wire format: [`crate::wire::vnet`], re-exported here too.

use crate::wire::{checksum, ipv4, ipv6};

mod gro;
mod gso;
#[cfg(test)]
mod tests;

pub use crate::wire::vnet::{
    VnetHdr, F_NEEDS_CSUM, GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, VNET_HDR_LEN,
};
pub use gro::{parse, Flow, Run, Segment, MAX_LINK_HEADER, MAX_MERGED, MAX_SEGMENTS};
pub use gso::{complete_checksum, BadGso, Segmenter};

const TCP: u8 = 6;
const UDP: u8 = 17;
const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;
const URG: u8 = 0x20;
const CWR: u8 = 0x80;

/// The pseudo-header sum for `len` bytes of protocol `proto` in `flow`.
#[inline]
fn pseudo_proto(flow: &Flow, proto: u8, len: usize) -> u64 {
    let n = if flow.v6 { 16 } else { 4 };
    checksum::pseudo_header(&flow.src[..n], &flow.dst[..n], proto, len)
}

/// Sets the length of the IP header at `l3` (the transport header at
/// `l4`) for `l4_len` bytes from `l4` on; for IPv4 also adds `id_step` to
/// the identification. The IPv4 header checksum: with `Checksum::Update`
/// adjusted for the changes alone (RFC 1624), so a header that came in
/// wrong stays wrong (inbound, from the wire); with `Checksum::Fill`
/// computed again, as `inet_gso_segment` does for each segment of the
/// local kernel's own GSO packet (outbound, whose checksum is not kept up
/// to date for the whole). (Inlined: coalescing and segmentation, in two
/// modules, both call it per packet.)
#[inline]
fn set_ip_len(pkt: &mut [u8], at: Lengths, csum: Checksum) {
    let Lengths {
        l3,
        l4,
        v6,
        l4_len,
        id_step,
    } = at;
    if v6 {
        ipv6::Packet::new_unchecked(&mut pkt[l3..]).set_payload_len(l4_len as u16);
        return;
    }
    let mut ip = ipv4::Packet::new_unchecked(&mut pkt[l3..l4]);
    let total = (l4 - l3 + l4_len) as u16;
    let ident = ip.ident().wrapping_add(id_step);
    match csum {
        Checksum::Update => {
            ip.update_total_len(total);
            ip.update_ident(ident);
        }
        Checksum::Fill => {
            ip.set_total_len(total);
            ip.set_ident(ident);
            ip.fill_checksum();
        }
    }
}

/// Where the headers of a packet [`set_ip_len`] rewrites are, and what to.
#[derive(Clone, Copy)]
struct Lengths {
    l3: usize,
    l4: usize,
    v6: bool,
    l4_len: usize,
    id_step: u16,
}

/// How [`set_ip_len`] keeps an IPv4 header checksum.
#[derive(Clone, Copy)]
enum Checksum {
    Update,
    Fill,
}
