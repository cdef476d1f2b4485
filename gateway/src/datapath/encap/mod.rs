//! Encapsulation, sans-IO: what to do with one packet read from a tunnel's
//! device. The packet was read into a buffer at the offset that leaves room
//! for the tunnel's outer headers, which are then written in front of it in
//! place: not one copy of the packet bytes. Taps also bring ARP requests and
//! IPv6 neighbour solicitations, which are answered in place, and packets
//! too big for the tunnel, which get ICMP back into the device.
//!
//! What the send path knows of a tunnel is a [`TunnelTx`] (`tunnel_tx`),
//! with the path MTU learned from the underlay ([`PathMtu`], `path_mtu`);
//! the answers written back into the device (ARP, neighbour
//! advertisements, ICMP "too big") are built in `reply`.

use std::net::IpAddr;
use std::sync::atomic::Ordering;

use crate::datapath::drop_reason::DropReason;
use crate::datapath::flow::flow_hash;
use crate::datapath::ratelimit::RateLimit;
use crate::datapath::tunnel::{DeviceKind, Mode, Tos, Ttl};
use crate::wire::{ethernet, gre, ipv4, ipv6, IpProtocol};

mod path_mtu;
mod reply;
#[cfg(test)]
mod tests;
mod tunnel_tx;

pub use path_mtu::{PathMtu, PATH_MTU_EXPIRES};
use reply::{answerable_v4, answerable_v6, arp_reply, neighbour_advert, too_big};
pub use tunnel_tx::{KeepaliveProbe, TunnelTx};

/// The outer Ethernet addresses: the next hop's MAC and ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NextHop {
    pub dst: ethernet::Address,
    pub src: ethernet::Address,
}

/// What to do with a packet read from the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send `buf[0..len]` (outer headers included) on the underlay.
    Transmit {
        len: usize,
    },
    /// Write `buf[offset..offset + len]` back into the device (an ARP
    /// reply, a neighbour advertisement or an ICMP error).
    Reply {
        offset: usize,
        len: usize,
        reason: Option<DropReason>,
    },
    Drop(DropReason),
}

/// ICMP errors a worker sends back into the devices per second, at most:
/// the kernel's `net.ipv4.icmp_msgs_per_sec` default. (The kernel itself
/// exempts "fragmentation needed" from its limits; the gateway does not,
/// since each one costs the worker a frame and a write.)
pub const ICMP_PER_SECOND: u32 = 1000;

/// What encapsulation takes from its worker besides the packet.
#[derive(Debug, Clone)]
pub struct TxContext {
    /// The outer IPv4 identification for a packet with DF (any value
    /// will do there, RFC 6864); the worker steps it per packet.
    pub ident: u16,
    /// [`crate::io::clock`] seconds, for path MTU expiry and the ICMP budget.
    pub now: u32,
    /// ICMP errors this worker may still send.
    pub icmp: RateLimit,
    /// The secret mixed into IPv6 flow labels (the same in every worker
    /// of a process, so that a flow keeps its label whichever worker
    /// reads it), so that labels differ from process to process (not a
    /// cryptographic key: crafted flows can still collide).
    pub flow_seed: u32,
}

impl TxContext {
    pub fn new(ident: u16) -> TxContext {
        TxContext {
            ident,
            now: 0,
            icmp: RateLimit::new(ICMP_PER_SECOND),
            flow_seed: 0,
        }
    }
}

/// Processes `n` bytes read at `t.read_offset()` in `buf` (which extends to
/// the end of the frame).
pub fn encap(
    buf: &mut [u8],
    n: usize,
    t: &TunnelTx,
    next_hop: Option<NextHop>,
    cx: &mut TxContext,
) -> Verdict {
    let ident = cx.ident;
    let off = t.read_offset();
    if off + n > buf.len() {
        return Verdict::Drop(DropReason::TxMalformed);
    }
    if t.mode == Mode::Gretap {
        return encap_frame(buf, n, t, next_hop, ident, cx);
    }
    let inner_start = t.outer_len();
    let family = match t.device_kind {
        DeviceKind::Tun => match buf.get(off).map(|b| b >> 4) {
            Some(4) => ethernet::EtherType::Ipv4,
            Some(6) => ethernet::EtherType::Ipv6,
            _ => return Verdict::Drop(DropReason::TxMalformed),
        },
        DeviceKind::Tap => {
            let Ok(eth) = ethernet::Frame::new_checked(&buf[off..off + n]) else {
                return Verdict::Drop(DropReason::TxMalformed);
            };
            match eth.ethertype() {
                ethernet::EtherType::Arp => return arp_reply(buf, off, n, t),
                ethernet::EtherType::Ipv4 if is_multicast(&eth.dst_addr()) => {
                    return Verdict::Drop(DropReason::TxChatter)
                }
                ethernet::EtherType::Ipv4 => ethernet::EtherType::Ipv4,
                ethernet::EtherType::Ipv6 => {
                    if let Some(v) = neighbour_advert(buf, off, n, t) {
                        return v;
                    }
                    ethernet::EtherType::Ipv6
                }
                _ => return Verdict::Drop(DropReason::TxNotIp),
            }
        }
    };
    let inner_n = n - (inner_start - off);

    // The inner packet: check it, decide TTL, ECN and DF from it, and
    // whether an ICMP error may answer it.
    let (inner_len, inner_ttl, inner_tos, inner_df, answerable) = match family {
        ethernet::EtherType::Ipv4 => {
            let Ok(ip) = ipv4::Packet::new_checked(&buf[inner_start..inner_start + inner_n]) else {
                return Verdict::Drop(DropReason::TxMalformed);
            };
            let dst = ip.dst_addr();
            if dst.is_multicast() || dst.is_broadcast() {
                return Verdict::Drop(DropReason::TxChatter);
            }
            if t.mode == Mode::Sit {
                return Verdict::Drop(DropReason::TxFamilyNotCarried);
            }
            (
                usize::from(ip.total_len()),
                ip.ttl(),
                ip.dscp_ecn(),
                ip.dont_frag(),
                answerable_v4(&ip),
            )
        }
        _ => {
            let Ok(ip) = ipv6::Packet::new_checked(&buf[inner_start..inner_start + inner_n]) else {
                return Verdict::Drop(DropReason::TxMalformed);
            };
            let (src, dst) = (ip.src_addr(), ip.dst_addr());
            // Link-local and multicast never cross a router: router
            // solicitations, MLD reports and neighbour discovery stay home.
            if dst.is_multicast() || (src.segments()[0] & 0xffc0) == 0xfe80 || src.is_unspecified()
            {
                return Verdict::Drop(DropReason::TxChatter);
            }
            if t.mode == Mode::Ipip {
                return Verdict::Drop(DropReason::TxFamilyNotCarried);
            }
            (
                ip.total_len(),
                ip.hop_limit(),
                ip.traffic_class(),
                true,
                answerable_v6(&ip),
            )
        }
    };

    // The tunnel MTU, or less when the underlay reported a smaller path
    // MTU (what is left of it after the outer headers), as the kernel's
    // tunnels do (tnl_update_pmtu). Except that IPv6 is never told of an
    // MTU under its minimum of 1280 (RFC 8200): over an IPv4 underlay
    // (sit, gre) whose path leaves less, the MTU is 1280 and IPv6 goes out
    // with the outer DF clear, so that the router in the way fragments
    // it, as sit does (ipip6_tunnel_xmit); otherwise IPv6 over that path
    // would be a black hole until the path MTU expires.
    let learned = t.path_mtu.get_locked(cx.now);
    let path =
        learned.map(|(p, _)| p.saturating_sub((t.outer_len() - ethernet::HEADER_LEN) as u16));
    // A path whose MTU a router reported under min_pmtu is locked: its
    // packets go without DF, for the router to fragment (the kernel's
    // ip_mtu_locked in iptunnel_xmit).
    let mut may_fragment = learned.is_some_and(|(_, locked)| locked);
    let mtu = match path {
        Some(p) if family == ethernet::EtherType::Ipv6 && p < IPV6_MIN_MTU && t.local.is_ipv4() => {
            // sit's rule: the MTU is taken as 1280 and DF cleared.
            may_fragment = true;
            t.mtu.min(IPV6_MIN_MTU)
        }
        Some(p) => t.mtu.min(p),
        None => t.mtu,
    };
    if inner_len > usize::from(mtu) {
        if !inner_df {
            return Verdict::Drop(DropReason::TxTooBig);
        }
        // Never an ICMP error about an ICMP error or a later fragment
        // (RFC 1122 3.2.2, RFC 4443 2.4), nor more than the budget.
        if !answerable || !cx.icmp.allow(cx.now) {
            return Verdict::Drop(DropReason::TxTooBigNoIcmp);
        }
        return too_big(buf, off, inner_start, inner_len, family, t, mtu);
    }
    let Some(hop) = next_hop else {
        return Verdict::Drop(DropReason::TxNoNeighbour);
    };

    let flow_label = flow_label(t, cx.flow_seed, || {
        flow_hash(DeviceKind::Tun, &buf[inner_start..inner_start + inner_len])
    });
    write_outer(
        buf,
        t,
        hop,
        ident,
        Inner {
            start: inner_start,
            len: inner_len,
            protocol: family,
            ttl: inner_ttl,
            tos: inner_tos,
            df: family == ethernet::EtherType::Ipv4 && inner_df,
            may_fragment,
            flow_label,
            not_ip: false,
        },
    )
}

/// The outer IPv6 flow label: one per inner flow, from a hash (mixed with a secret per process) of its
/// addresses, protocol and ports, so that routers on the way can spread a
/// tunnel's flows over their paths (RFC 6438). Never 0, which means "no
/// label". An IPv4 underlay has none.
///
/// The kernel's IPv6 tunnels set a label too (`ip6_make_flowlabel`, with
/// `net.ipv6.auto_flowlabels` at its default), from the packet's skb hash:
/// per socket for the host's own TCP, but for forwarded packets often the
/// hash of the outer flow, one label per tunnel (seen in the VM lab: ping
/// over ip6gre carried one label both ways). Per inner flow is what RFC
/// 6438 asks of a tunnel end point, and spreads better.
fn flow_label(t: &TunnelTx, seed: u32, hash: impl FnOnce() -> u32) -> u32 {
    if t.local.is_ipv4() {
        return 0;
    }
    // A finaliser (murmur3's) so that every bit of the hash and the seed
    // counts in the 20 that are kept.
    let mut h = hash() ^ seed;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    match h & 0x000f_ffff {
        0 => 1,
        label => label,
    }
}

/// Writes a GRE keepalive for `t` into `buf` (a UMEM frame) as Cisco's
/// routers send them, and encapsulates it as a packet read from the
/// tunnel's device would be: an IPv4 packet from the tunnel's remote to
/// its local address carrying an empty GRE header (protocol 0, with the
/// key and checksum our receive side expects), inside the tunnel's own
/// outer headers. The peer decapsulates it and, routing the inner packet
/// back to us (the kernel does so when it forwards IP and accepts a local
/// source on the tunnel: `accept_local`), reflects it; its arrival is the
/// reply ([`crate::datapath::decap::Kind::KeepaliveReply`]).
pub fn keepalive_probe(
    buf: &mut [u8],
    t: &TunnelTx,
    next_hop: Option<NextHop>,
    cx: &mut TxContext,
) -> Verdict {
    let (Some(k), IpAddr::V4(local), IpAddr::V4(remote)) = (t.keepalive, t.local, t.remote) else {
        return Verdict::Drop(DropReason::TxMalformed);
    };
    let mut at = t.read_offset();
    let eth = match t.device_kind {
        DeviceKind::Tap => ethernet::HEADER_LEN,
        DeviceKind::Tun => 0,
    };
    let gre = gre::Repr {
        protocol: ethernet::EtherType::Unknown(0),
        checksum: k.reply_csum,
        key: k.reply_key,
        sequence: None,
    };
    let len = eth + ipv4::HEADER_LEN + gre.header_len();
    if at + len > buf.len() {
        return Verdict::Drop(DropReason::TxMalformed);
    }
    if eth > 0 {
        // As the tap would hand it over: to the far side's MAC.
        ethernet::Repr {
            dst: t.peer_mac,
            src: t.device_mac,
            ethertype: ethernet::EtherType::Ipv4,
        }
        .emit(&mut ethernet::Frame::new_unchecked(&mut buf[at..at + eth]));
        at += eth;
    }
    ipv4::Repr {
        src: remote,
        dst: local,
        protocol: IpProtocol::Gre,
        payload_len: gre.header_len(),
        ttl: 255,
        dscp_ecn: 0,
        dont_frag: false,
        ident: 0,
    }
    .emit(&mut ipv4::Packet::new_unchecked(
        &mut buf[at..at + ipv4::HEADER_LEN],
    ));
    at += ipv4::HEADER_LEN;
    gre.emit(&mut buf[at..]);
    if gre.checksum {
        gre::Packet::new_unchecked(&mut buf[at..at + gre.header_len()]).fill_checksum();
    }
    encap(buf, len, t, next_hop, cx)
}

/// IPv6's minimum link MTU (RFC 8200 5).
const IPV6_MIN_MTU: u16 = 1280;

/// What the outer headers take from the packet they carry.
struct Inner {
    /// Where it lies in the buffer (the outer headers go in front).
    start: usize,
    len: usize,
    /// The GRE protocol type for it.
    protocol: ethernet::EtherType,
    /// For `ttl = "inherit"`, `tos = "inherit"`, ECN and DF.
    ttl: u8,
    tos: u8,
    df: bool,
    /// The path is known to be too small for this packet, which goes out
    /// anyway: outer DF clear, whatever the tunnel's setting.
    may_fragment: bool,
    /// The outer IPv6 flow label (0 over IPv4).
    flow_label: u32,
    /// A gretap frame that carries no IP packet (ARP, a VLAN tag).
    not_ip: bool,
}

/// Writes the outer Ethernet, IPv4 and (for GRE) GRE headers in front of
/// the inner packet, which must start at `t.outer_len()`.
fn write_outer(buf: &mut [u8], t: &TunnelTx, hop: NextHop, ident: u16, inner: Inner) -> Verdict {
    let (inner_start, inner_len) = (inner.start, inner.len);
    let mut at = inner_start;
    if t.mode.is_gre() {
        let mut repr = t.gre_repr(inner.protocol);
        if let Some(last) = &t.oseq {
            // As the kernel numbers them: 1, 2, ...
            repr.sequence = Some(last.fetch_add(1, Ordering::Relaxed).wrapping_add(1));
        }
        at -= repr.header_len();
        repr.emit(&mut buf[at..]);
        if t.ocsum {
            gre::Packet::new_unchecked(&mut buf[at..inner_start + inner_len]).fill_checksum();
        }
    }
    let payload_len = inner_start + inner_len - at;
    // ip6gretap sends frames without IP in them with traffic class 0,
    // whatever the tunnel's (`ip6gre_xmit_other` passes a dsfield of 0).
    let tos = if inner.not_ip && t.local.is_ipv6() {
        0
    } else {
        outer_tos(t, inner.tos)
    };
    let protocol = match t.mode {
        Mode::Gre | Mode::Gretap => IpProtocol::Gre,
        Mode::Ipip => IpProtocol::Ipip,
        Mode::Sit => IpProtocol::Ipv6,
    };
    let ttl = match t.ttl {
        Ttl::Fixed(v) => v,
        Ttl::Inherit => inner.ttl,
    };
    let ethertype = match (t.local, t.remote) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            at -= ipv4::HEADER_LEN;
            // The kernel's DF: always with pmtudisc; otherwise the inner
            // IPv4 packet's, unless ignore_df.
            let dont_frag = (t.pmtudisc || (!t.ignore_df && inner.df)) && !inner.may_fragment;
            // Without DF a router may fragment it: then the ID must not
            // repeat among this tunnel's packets in flight, whichever
            // worker sent them. A tunnel whose packets may go without DF
            // numbers all of them, DF or not, from that one counter, as
            // the kernel does (`iptunnel_xmit` takes `__ip_select_ident`
            // for every packet); a tunnel that always sets DF takes the
            // worker's own counter (any ID will do then, RFC 6864),
            // sparing the workers a shared cache line per packet.
            let ident = if dont_frag && t.pmtudisc {
                ident
            } else {
                t.ident.fetch_add(1, Ordering::Relaxed)
            };
            ipv4::Repr {
                src,
                dst,
                protocol,
                payload_len,
                ttl,
                dscp_ecn: tos,
                dont_frag,
                ident,
            }
            .emit(&mut ipv4::Packet::new_unchecked(&mut buf[at..]));
            ethernet::EtherType::Ipv4
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            let mut next_header = protocol;
            let mut payload_len = payload_len;
            if let Some(limit) = t.encap_limit {
                // RFC 2473's destination option, laid out as the kernel
                // sends it: TEL (type 4, length 1) then a PadN of 1.
                at -= DSTOPT_LEN;
                buf[at..at + DSTOPT_LEN].copy_from_slice(&[
                    u8::from(protocol),
                    0,
                    4,
                    1,
                    limit,
                    1,
                    1,
                    0,
                ]);
                next_header = IpProtocol::Unknown(IPV6_DSTOPTS);
                payload_len += DSTOPT_LEN;
            }
            at -= ipv6::HEADER_LEN;
            let mut p = ipv6::Packet::new_unchecked(&mut buf[at..]);
            ipv6::Repr {
                src,
                dst,
                next_header,
                payload_len,
                hop_limit: ttl,
            }
            .emit(&mut p);
            p.set_traffic_class(tos);
            p.set_flow_label(inner.flow_label);
            ethernet::EtherType::Ipv6
        }
        // The configuration keeps both endpoints of one family.
        _ => return Verdict::Drop(DropReason::TxMalformed),
    };
    at -= ethernet::HEADER_LEN;
    debug_assert_eq!(at, 0);
    ethernet::Repr {
        dst: hop.dst,
        src: hop.src,
        ethertype,
    }
    .emit(&mut ethernet::Frame::new_unchecked(&mut buf[at..]));
    Verdict::Transmit {
        len: inner_start + inner_len,
    }
}

/// The outer TOS byte (traffic class over IPv6), as the kernel's tunnel
/// of this kind writes it.
///
/// IPv4 outer (ip_gre, ipip, sit) and ip6ip6/ipip6 (`ip6_tunnel`): the DSCP
/// fixed or inherited, and ECN per RFC 6040 normal mode: copied, but never
/// CE onto the outer header (CE is sent as ECT(0); `INET_ECN_encapsulate`).
///
/// ip6gre and ip6gretap (`ip6_gre`): the tunnel's traffic class as it is,
/// or with `tos = "inherit"` the inner byte as it is; ECN is not
/// encapsulated (`prepare_ip6gre_xmit_ipv4`/`_ipv6` call no
/// `INET_ECN_encapsulate`). Measured against Linux 6.1's ip6gre in the VM
/// lab: an inner 0x2a went out as traffic class 0x00.
fn outer_tos(t: &TunnelTx, inner: u8) -> u8 {
    if t.mode.is_gre() && t.local.is_ipv6() {
        return match t.tos {
            Tos::Fixed(v) => v,
            Tos::Inherit => inner,
        };
    }
    let inner_ecn = inner & 0x03;
    let ecn = if inner_ecn == 0x03 { 0x02 } else { inner_ecn };
    let dscp = match t.tos {
        Tos::Fixed(v) => v,
        Tos::Inherit => inner,
    } & !0x03;
    dscp | ecn
}

/// A destination-options header with the encapsulation limit: 8 bytes.
const DSTOPT_LEN: usize = 8;
const IPV6_DSTOPTS: u8 = 60;

/// gretap: the whole Ethernet frame read from the tap goes into the
/// tunnel, whatever it carries (ARP, broadcast, multicast: it is a bridge
/// port). TTL and TOS inherit from an IP packet inside, if there is one.
fn encap_frame(
    buf: &mut [u8],
    n: usize,
    t: &TunnelTx,
    next_hop: Option<NextHop>,
    ident: u16,
    cx: &TxContext,
) -> Verdict {
    let start = t.outer_len();
    let Ok(eth) = ethernet::Frame::new_checked(&buf[start..start + n]) else {
        return Verdict::Drop(DropReason::TxMalformed);
    };
    if n - ethernet::HEADER_LEN > usize::from(t.mtu) + 4 {
        return Verdict::Drop(DropReason::TxTooBig);
    }
    let body = &buf[start + ethernet::HEADER_LEN..start + n];
    let (ttl, tos, df, ip) = match eth.ethertype() {
        ethernet::EtherType::Ipv4 => match ipv4::Packet::new_checked(body) {
            Ok(ip) => (ip.ttl(), ip.dscp_ecn(), ip.dont_frag(), true),
            Err(_) => (64, 0, false, false),
        },
        ethernet::EtherType::Ipv6 => match ipv6::Packet::new_checked(body) {
            Ok(ip) => (ip.hop_limit(), ip.traffic_class(), false, true),
            Err(_) => (64, 0, false, false),
        },
        _ => (64, 0, false, false),
    };
    let Some(hop) = next_hop else {
        return Verdict::Drop(DropReason::TxNoNeighbour);
    };
    let flow_label = flow_label(t, cx.flow_seed, || {
        flow_hash(DeviceKind::Tap, &buf[start..start + n])
    });
    // A locked path: no DF, as for routed tunnels.
    let locked = t.path_mtu.get_locked(cx.now).is_some_and(|(_, l)| l);
    write_outer(
        buf,
        t,
        hop,
        ident,
        Inner {
            start,
            len: n,
            protocol: ethernet::EtherType::TransparentEthernet,
            ttl,
            tos,
            df,
            may_fragment: locked,
            flow_label,
            not_ip: !ip,
        },
    )
}

fn is_multicast(mac: &ethernet::Address) -> bool {
    mac[0] & 1 == 1
}
