//! Encapsulation, sans-IO: what to do with one packet read from a tunnel's
//! device. The packet was read into a buffer at the offset that leaves room
//! for the tunnel's outer headers, which are then written in front of it in
//! place: not one copy of the packet bytes. Taps also bring ARP requests and
//! IPv6 neighbour solicitations, which are answered in place, and packets
//! too big for the tunnel, which get ICMP back into the device.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use crate::datapath::drop_reason::DropReason;
use crate::datapath::ratelimit::RateLimit;
use crate::datapath::tunnel::{DeviceKind, Mode, Tos, Ttl};
use crate::wire::{checksum, ethernet, gre, ipv4, ipv6, IpProtocol};

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
}

impl TunnelTx {
    fn gre_repr(&self, protocol: ethernet::EtherType) -> gre::Repr {
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

/// A path MTU learned from an ICMP error, and until when it holds (the
/// kernel's `mtu_expires`: ten minutes), in one atomic: the expiry in
/// [`crate::io::clock`] seconds above, the MTU below.
#[derive(Debug, Default)]
pub struct PathMtu(AtomicU64);

/// How long a learned path MTU holds, as the kernel's
/// `net.ipv4.route.mtu_expires`.
pub const PATH_MTU_EXPIRES: u32 = 600;

impl PathMtu {
    /// The path MTU, if one was learned and has not expired by `now`.
    #[inline]
    pub fn get(&self, now: u32) -> Option<u16> {
        let v = self.0.load(Ordering::Relaxed);
        let (until, mtu) = ((v >> 32) as u32, v as u16);
        (mtu != 0 && until > now).then_some(mtu)
    }

    /// Takes `mtu` when it is lower than the one in force (or none is).
    /// Workers race here: each step is a compare-and-swap from the state it
    /// saw ([`PathMtu::lower_from`]), so a higher MTU never overwrites a
    /// lower one that another worker stored in between.
    pub fn lower(&self, mtu: u16, now: u32) -> bool {
        let mut seen = self.0.load(Ordering::Relaxed);
        loop {
            match self.lower_from(seen, mtu, now) {
                Ok(lowered) => return lowered,
                Err(current) => seen = current,
            }
        }
    }

    /// One step of [`PathMtu::lower`] from state `seen`: `Ok(true)` when
    /// `mtu` was taken, `Ok(false)` when the one in `seen` is no higher,
    /// `Err(current)` when the state is no longer `seen` (another worker
    /// changed it): look again.
    fn lower_from(&self, seen: u64, mtu: u16, now: u32) -> Result<bool, u64> {
        let (until, old) = ((seen >> 32) as u32, seen as u16);
        if old != 0 && until > now && old <= mtu {
            return Ok(false);
        }
        let new = u64::from(now.saturating_add(PATH_MTU_EXPIRES)) << 32 | u64::from(mtu);
        self.0
            .compare_exchange(seen, new, Ordering::Relaxed, Ordering::Relaxed)
            .map(|_| true)
    }
}

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

const ETH_P_ARP_LEN: usize = 28;

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
}

impl TxContext {
    pub fn new(ident: u16) -> TxContext {
        TxContext {
            ident,
            now: 0,
            icmp: RateLimit::new(ICMP_PER_SECOND),
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
        return encap_frame(buf, n, t, next_hop, ident);
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
    let path = t
        .path_mtu
        .get(cx.now)
        .map(|p| p.saturating_sub((t.outer_len() - ethernet::HEADER_LEN) as u16));
    let mut may_fragment = false;
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
        },
    )
}

/// Whether an ICMP error may be sent about this IPv4 packet, as the
/// kernel's `__icmp_send` decides: not about a fragment after the first,
/// nor about an ICMP error (destination unreachable, source quench,
/// redirect, time exceeded, parameter problem), a type it does not know
/// (over 18) or an ICMP header cut short.
fn answerable_v4<T: AsRef<[u8]>>(ip: &ipv4::Packet<T>) -> bool {
    if ip.frag_offset() != 0 {
        return false;
    }
    if ip.protocol() != IpProtocol::Icmp {
        return true;
    }
    match ip.payload().first() {
        Some(&kind) => kind <= 18 && !matches!(kind, 3 | 4 | 5 | 11 | 12),
        None => false,
    }
}

/// The IPv6 counterpart, as the kernel's `is_ineligible`: not about an
/// ICMPv6 error (types under 128, RFC 4443 2.4 (e.2)), found behind any
/// extension headers, nor about one whose type is cut off. A fragment
/// after the first carries no ICMPv6 header to look at, and is answered
/// (`ipv6_skip_exthdr` stops there).
fn answerable_v6<T: AsRef<[u8]>>(ip: &ipv6::Packet<T>) -> bool {
    const HOP_BY_HOP: u8 = 0;
    const ROUTING: u8 = 43;
    const FRAGMENT: u8 = 44;
    const AH: u8 = 51;
    const DSTOPTS: u8 = 60;
    let rest = ip.payload();
    let mut next = u8::from(ip.next_header());
    let mut at = 0usize;
    // Bounded: at most 8 extension headers are stepped over.
    for _ in 0..8 {
        let len = match next {
            HOP_BY_HOP | ROUTING | DSTOPTS => match rest.get(at + 1) {
                Some(&l) => (usize::from(l) + 1) * 8,
                None => return true,
            },
            AH => match rest.get(at + 1) {
                Some(&l) => (usize::from(l) + 2) * 4,
                None => return true,
            },
            FRAGMENT => {
                let Some(h) = rest.get(at..at + 8) else {
                    return true;
                };
                if u16::from_be_bytes([h[2], h[3]]) & 0xfff8 != 0 {
                    return true;
                }
                8
            }
            _ => break,
        };
        let Some(&n) = rest.get(at) else { return true };
        next = n;
        at += len;
    }
    if next != u8::from(IpProtocol::Icmpv6) {
        return true;
    }
    match rest.get(at) {
        Some(&kind) => kind >= 128,
        None => false,
    }
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
    // DSCP fixed or inherited; ECN per RFC 6040 normal mode: copied, but
    // never CE onto the outer header (CE is sent as ECT(0)).
    let inner_ecn = inner.tos & 0x03;
    let ecn = if inner_ecn == 0x03 { 0x02 } else { inner_ecn };
    let dscp = match t.tos {
        Tos::Fixed(v) => v,
        Tos::Inherit => inner.tos,
    } & !0x03;
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
            // worker sent them.
            let ident = if dont_frag {
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
                dscp_ecn: dscp | ecn,
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
            p.set_traffic_class(dscp | ecn);
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
) -> Verdict {
    let start = t.outer_len();
    let Ok(eth) = ethernet::Frame::new_checked(&buf[start..start + n]) else {
        return Verdict::Drop(DropReason::TxMalformed);
    };
    if n - ethernet::HEADER_LEN > usize::from(t.mtu) + 4 {
        return Verdict::Drop(DropReason::TxTooBig);
    }
    let body = &buf[start + ethernet::HEADER_LEN..start + n];
    let (ttl, tos, df) = match eth.ethertype() {
        ethernet::EtherType::Ipv4 => match ipv4::Packet::new_checked(body) {
            Ok(ip) => (ip.ttl(), ip.dscp_ecn(), ip.dont_frag()),
            Err(_) => (64, 0, false),
        },
        ethernet::EtherType::Ipv6 => match ipv6::Packet::new_checked(body) {
            Ok(ip) => (ip.hop_limit(), ip.traffic_class(), false),
            Err(_) => (64, 0, false),
        },
        _ => (64, 0, false),
    };
    let Some(hop) = next_hop else {
        return Verdict::Drop(DropReason::TxNoNeighbour);
    };
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
            may_fragment: false,
        },
    )
}

fn is_multicast(mac: &ethernet::Address) -> bool {
    mac[0] & 1 == 1
}

/// Answers an ARP request for any address but this end's own with the
/// peer MAC, so the kernel routes into the tap with no manual entries.
fn arp_reply(buf: &mut [u8], off: usize, n: usize, t: &TunnelTx) -> Verdict {
    let a = off + ethernet::HEADER_LEN;
    if n < ethernet::HEADER_LEN + ETH_P_ARP_LEN {
        return Verdict::Drop(DropReason::TxMalformed);
    }
    let arp = &buf[a..a + ETH_P_ARP_LEN];
    let is_request = arp[0..2] == [0, 1]
        && arp[2..4] == [8, 0]
        && arp[4] == 6
        && arp[5] == 4
        && arp[6..8] == [0, 1];
    if !is_request {
        return Verdict::Drop(DropReason::TxChatter);
    }
    let mut sha = [0u8; 6];
    sha.copy_from_slice(&arp[8..14]);
    let mut spa = [0u8; 4];
    spa.copy_from_slice(&arp[14..18]);
    let mut tpa = [0u8; 4];
    tpa.copy_from_slice(&arp[24..28]);
    if spa == tpa || t.address == Some(IpAddr::V4(Ipv4Addr::from(tpa))) {
        // Gratuitous ARP or a question about this end's own address.
        return Verdict::Drop(DropReason::TxChatter);
    }
    let arp = &mut buf[a..a + ETH_P_ARP_LEN];
    arp[6..8].copy_from_slice(&[0, 2]);
    arp[8..14].copy_from_slice(&t.peer_mac);
    arp[14..18].copy_from_slice(&tpa);
    arp[18..24].copy_from_slice(&sha);
    arp[24..28].copy_from_slice(&spa);
    ethernet::Repr {
        dst: sha,
        src: t.peer_mac,
        ethertype: ethernet::EtherType::Arp,
    }
    .emit(&mut ethernet::Frame::new_unchecked(&mut buf[off..]));
    Verdict::Reply {
        offset: off,
        len: ethernet::HEADER_LEN + ETH_P_ARP_LEN,
        reason: None,
    }
}

/// If the IPv6 packet in the tap frame is a neighbour solicitation for an
/// address on the far side, turns it into the advertisement in place.
fn neighbour_advert(buf: &mut [u8], off: usize, n: usize, t: &TunnelTx) -> Option<Verdict> {
    let ip_at = off + ethernet::HEADER_LEN;
    let ip = ipv6::Packet::new_checked(&buf[ip_at..off + n]).ok()?;
    let body = ip.payload();
    if ip.next_header() != IpProtocol::Icmpv6 || body.len() < 24 || body[0] != 135 {
        return None;
    }
    if ip.hop_limit() != 255 || ip.src_addr().is_unspecified() {
        // Not a valid solicitation, or duplicate address detection.
        return Some(Verdict::Drop(DropReason::TxChatter));
    }
    let mut target = [0u8; 16];
    target.copy_from_slice(&body[8..24]);
    let target = std::net::Ipv6Addr::from(target);
    if t.address == Some(IpAddr::V6(target)) {
        return Some(Verdict::Drop(DropReason::TxChatter));
    }
    let asker = ip.src_addr();
    let eth = ethernet::Frame::new_unchecked(&buf[off..]);
    let asker_mac = eth.src_addr();
    // The advertisement: 24 bytes of NA plus a target link-layer option.
    const NA_LEN: usize = 32;
    if buf.len() < ip_at + ipv6::HEADER_LEN + NA_LEN {
        return Some(Verdict::Drop(DropReason::TxMalformed));
    }
    ipv6::Repr {
        src: target,
        dst: asker,
        next_header: IpProtocol::Icmpv6,
        payload_len: NA_LEN,
        hop_limit: 255,
    }
    .emit(&mut ipv6::Packet::new_unchecked(&mut buf[ip_at..]));
    let icmp = ip_at + ipv6::HEADER_LEN;
    let na = &mut buf[icmp..icmp + NA_LEN];
    na[0] = 136;
    na[1] = 0;
    na[2..4].copy_from_slice(&[0, 0]);
    na[4..8].copy_from_slice(&[0x60, 0, 0, 0]); // solicited, override
    na[8..24].copy_from_slice(&target.octets());
    na[24] = 2; // target link-layer address
    na[25] = 1;
    na[26..32].copy_from_slice(&t.peer_mac);
    let c = checksum::icmpv6(&target.octets(), &asker.octets(), &buf[icmp..icmp + NA_LEN]);
    buf[icmp + 2..icmp + 4].copy_from_slice(&c.to_be_bytes());
    ethernet::Repr {
        dst: asker_mac,
        src: t.peer_mac,
        ethertype: ethernet::EtherType::Ipv6,
    }
    .emit(&mut ethernet::Frame::new_unchecked(&mut buf[off..]));
    Some(Verdict::Reply {
        offset: off,
        len: ethernet::HEADER_LEN + ipv6::HEADER_LEN + NA_LEN,
        reason: None,
    })
}

/// Builds ICMP "fragmentation needed" (IPv4) or "packet too big" (IPv6)
/// carrying the tunnel MTU, in place, for writing back into the device.
fn too_big(
    buf: &mut [u8],
    off: usize,
    inner_start: usize,
    inner_len: usize,
    family: ethernet::EtherType,
    t: &TunnelTx,

    mtu: u16,
) -> Verdict {
    let (ip_hdr, icmp_hdr, max_total) = match family {
        ethernet::EtherType::Ipv4 => (ipv4::HEADER_LEN, 8, 576),
        _ => (ipv6::HEADER_LEN, 8, 1280),
    };
    let l2 = match t.device_kind {
        DeviceKind::Tap => ethernet::HEADER_LEN,
        DeviceKind::Tun => 0,
    };
    let start = off;
    let ip_at = start + l2;
    let quoted_at = ip_at + ip_hdr + icmp_hdr;
    let quoted = inner_len.min(max_total - ip_hdr - icmp_hdr);
    // Read the original addresses before they are overwritten.
    let (orig_src, orig_dst) = match family {
        ethernet::EtherType::Ipv4 => {
            let p = ipv4::Packet::new_unchecked(&buf[inner_start..]);
            (IpAddr::V4(p.src_addr()), IpAddr::V4(p.dst_addr()))
        }
        _ => {
            let p = ipv6::Packet::new_unchecked(&buf[inner_start..]);
            (IpAddr::V6(p.src_addr()), IpAddr::V6(p.dst_addr()))
        }
    };
    if quoted_at + quoted > buf.len() {
        return Verdict::Drop(DropReason::TxTooBig);
    }
    buf.copy_within(inner_start..inner_start + quoted, quoted_at);
    let from = match (t.peer, orig_dst) {
        (Some(p), d) if p.is_ipv4() == d.is_ipv4() => p,
        (_, d) => d,
    };
    let icmp_len = icmp_hdr + quoted;
    match (family, from, orig_src) {
        (ethernet::EtherType::Ipv4, IpAddr::V4(from), IpAddr::V4(to)) => {
            let icmp = &mut buf[ip_at + ip_hdr..quoted_at];
            icmp[0] = 3; // destination unreachable
            icmp[1] = 4; // fragmentation needed and DF set
            icmp[2..4].copy_from_slice(&[0, 0]);
            icmp[4..6].copy_from_slice(&[0, 0]);
            icmp[6..8].copy_from_slice(&mtu.to_be_bytes());
            let c = checksum::checksum(&buf[ip_at + ip_hdr..quoted_at + quoted]);
            buf[ip_at + ip_hdr + 2..ip_at + ip_hdr + 4].copy_from_slice(&c.to_be_bytes());
            ipv4::Repr {
                src: from,
                dst: to,
                protocol: IpProtocol::Icmp,
                payload_len: icmp_len,
                ttl: 64,
                dscp_ecn: 0,
                dont_frag: false,
                ident: 0,
            }
            .emit(&mut ipv4::Packet::new_unchecked(&mut buf[ip_at..]));
        }
        (_, IpAddr::V6(from), IpAddr::V6(to)) => {
            let icmp = &mut buf[ip_at + ip_hdr..quoted_at];
            icmp[0] = 2; // packet too big
            icmp[1] = 0;
            icmp[2..4].copy_from_slice(&[0, 0]);
            icmp[4..8].copy_from_slice(&u32::from(mtu.max(1280)).to_be_bytes());
            let c = checksum::icmpv6(
                &from.octets(),
                &to.octets(),
                &buf[ip_at + ip_hdr..quoted_at + quoted],
            );
            buf[ip_at + ip_hdr + 2..ip_at + ip_hdr + 4].copy_from_slice(&c.to_be_bytes());
            ipv6::Repr {
                src: from,
                dst: to,
                next_header: IpProtocol::Icmpv6,
                payload_len: icmp_len,
                hop_limit: 64,
            }
            .emit(&mut ipv6::Packet::new_unchecked(&mut buf[ip_at..]));
        }
        _ => return Verdict::Drop(DropReason::TxTooBig),
    }
    if l2 > 0 {
        ethernet::Repr {
            dst: t.device_mac,
            src: t.peer_mac,
            ethertype: family,
        }
        .emit(&mut ethernet::Frame::new_unchecked(&mut buf[start..]));
    }
    Verdict::Reply {
        offset: start,
        len: l2 + ip_hdr + icmp_len,
        reason: Some(DropReason::TxTooBigIcmpSent),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{Icmpv4Type, NetSlice, SlicedPacket, TransportSlice};

    /// A worker's context at time 0 with outer IPv4 ID `ident`.
    fn cx(ident: u16) -> TxContext {
        TxContext::new(ident)
    }

    const TAP_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 1];
    const PEER_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 2];
    const HOP: NextHop = NextHop {
        dst: [0x02, 0, 0, 0, 0, 0x58],
        src: [0x02, 0, 0, 0, 0, 0x08],
    };

    fn tunnel(mode: Mode, kind: DeviceKind) -> TunnelTx {
        TunnelTx {
            mode,
            local: Ipv4Addr::new(192, 168, 0, 8).into(),
            remote: Ipv4Addr::new(192, 168, 0, 58).into(),
            encap_limit: None,
            path_mtu: Default::default(),
            ident: Default::default(),
            okey: None,
            ocsum: false,
            oseq: None,
            tos: crate::datapath::tunnel::Tos::Fixed(0),
            pmtudisc: true,
            ignore_df: false,
            ttl: Ttl::Fixed(64),
            mtu: 1400,
            device_kind: kind,
            device_mac: TAP_MAC,
            peer_mac: PEER_MAC,
            address: Some("10.1.1.1".parse().unwrap()),
            peer: Some("10.1.1.2".parse().unwrap()),
        }
    }

    /// An ICMP echo request 10.1.1.1 -> 10.1.1.2 built by etherparse.
    fn inner(payload_len: usize, ttl: u8) -> Vec<u8> {
        let b = etherparse::PacketBuilder::ipv4([10, 1, 1, 1], [10, 1, 1, 2], ttl)
            .icmpv4_echo_request(7, 1);
        let mut out = Vec::new();
        b.write(&mut out, &vec![0x5a; payload_len]).unwrap();
        out
    }

    /// The frame buffer as the worker has it after a device read.
    fn read_into(t: &TunnelTx, packet: &[u8]) -> (Vec<u8>, usize) {
        let mut buf = vec![0u8; 3840];
        let off = t.read_offset();
        let mut n = 0;
        if t.device_kind == DeviceKind::Tap {
            buf[off..off + 6].copy_from_slice(&PEER_MAC);
            buf[off + 6..off + 12].copy_from_slice(&TAP_MAC);
            let et = if packet[0] >> 4 == 6 {
                [0x86, 0xdd]
            } else {
                [0x08, 0x00]
            };
            buf[off + 12..off + 14].copy_from_slice(&et);
            n = 14;
        }
        buf[off + n..off + n + packet.len()].copy_from_slice(packet);
        (buf, n + packet.len())
    }

    fn ones_complement_ok(data: &[u8]) -> bool {
        let mut sum: u32 = 0;
        for c in data.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum == 0xffff
    }

    #[test]
    fn gre_from_a_tap() {
        let t = tunnel(Mode::Gre, DeviceKind::Tap);
        let pkt = inner(56, 64);
        let (mut buf, n) = read_into(&t, &pkt);
        let Verdict::Transmit { len } = encap(&mut buf, n, &t, Some(HOP), &mut cx(9)) else {
            panic!("not sent")
        };
        assert_eq!(len, 14 + 20 + 4 + pkt.len());
        let s = SlicedPacket::from_ethernet(&buf[..len]).unwrap();
        let eth = s.link.unwrap().to_header().unwrap().ethernet2().unwrap();
        assert_eq!(eth.destination, HOP.dst);
        assert_eq!(eth.source, HOP.src);
        let Some(NetSlice::Ipv4(ip)) = s.net else {
            panic!()
        };
        let h = ip.header();
        assert_eq!(h.source(), [192, 168, 0, 8]);
        assert_eq!(h.destination(), [192, 168, 0, 58]);
        assert_eq!(h.protocol(), etherparse::IpNumber(47));
        assert_eq!(h.ttl(), 64);
        assert!(h.dont_fragment());
        assert_eq!(h.to_header().calc_header_checksum(), h.header_checksum());
        assert_eq!(&buf[34..38], &[0, 0, 0x08, 0x00]);
        assert_eq!(&buf[38..len], &pkt[..]);
    }

    #[test]
    fn ipip_from_a_tun_inherits_ttl_and_maps_ecn() {
        let mut t = tunnel(Mode::Ipip, DeviceKind::Tun);
        t.ttl = Ttl::Inherit;
        let mut pkt = inner(20, 33);
        pkt[1] = 0x03; // CE
        let mut h = etherparse::Ipv4Header::from_slice(&pkt).unwrap().0;
        h.ecn = etherparse::IpEcn::CongestionExperienced;
        h.header_checksum = h.calc_header_checksum();
        pkt[10..12].copy_from_slice(&h.header_checksum.to_be_bytes());
        let (mut buf, n) = read_into(&t, &pkt);
        let Verdict::Transmit { len } = encap(&mut buf, n, &t, Some(HOP), &mut cx(9)) else {
            panic!()
        };
        let s = SlicedPacket::from_ethernet(&buf[..len]).unwrap();
        let Some(NetSlice::Ipv4(ip)) = s.net else {
            panic!()
        };
        assert_eq!(ip.header().protocol(), etherparse::IpNumber(4));
        assert_eq!(ip.header().ttl(), 33);
        assert_eq!(
            ip.header().ecn().value(),
            0x02,
            "CE is carried as ECT(0) outside"
        );
        assert_eq!(&buf[34..len], &pkt[..]);
    }

    #[test]
    fn gre_key_and_checksum() {
        let mut t = tunnel(Mode::Gre, DeviceKind::Tun);
        t.okey = Some(0x0102_0304);
        t.ocsum = true;
        let pkt = inner(31, 64);
        let (mut buf, n) = read_into(&t, &pkt);
        let Verdict::Transmit { len } = encap(&mut buf, n, &t, Some(HOP), &mut cx(9)) else {
            panic!()
        };
        let gre = &buf[34..len];
        assert_eq!(&gre[0..4], &[0xa0, 0x00, 0x08, 0x00]);
        assert_eq!(&gre[8..12], &[1, 2, 3, 4]);
        assert!(
            ones_complement_ok(gre),
            "GRE checksum over header and payload"
        );
        assert_eq!(&gre[12..], &pkt[..]);
    }

    #[test]
    fn oseq_numbers_from_one_and_goes_on() {
        let mut t = tunnel(Mode::Gre, DeviceKind::Tun);
        t.oseq = Some(std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0)));
        let pkt = inner(31, 64);
        for want in 1..=3u32 {
            let (mut buf, n) = read_into(&t, &pkt);
            let Verdict::Transmit { len } = encap(&mut buf, n, &t, Some(HOP), &mut cx(9)) else {
                panic!()
            };
            let gre = &buf[34..len];
            assert_eq!(&gre[0..4], &[0x10, 0x00, 0x08, 0x00]);
            assert_eq!(&gre[4..8], &want.to_be_bytes());
            assert_eq!(&gre[8..], &pkt[..]);
        }
    }

    #[test]
    fn tos_and_df_follow_the_kernels_rules() {
        // Inner: DSCP AF41 (0x88), ECN CE, DF set.
        let mut pkt = inner(31, 64);
        pkt[1] = 0x88 | 3;
        let c = checksum::checksum(&{
            let mut h = pkt[..20].to_vec();
            h[10] = 0;
            h[11] = 0;
            h
        });
        pkt[10..12].copy_from_slice(&c.to_be_bytes());
        let outer = |t: &TunnelTx, pkt: &[u8]| {
            let (mut buf, n) = read_into(t, pkt);
            let Verdict::Transmit { .. } = encap(&mut buf, n, t, Some(HOP), &mut cx(9)) else {
                panic!()
            };
            let ip = ipv4::Packet::new_checked(buf[14..].to_vec()).unwrap();
            (ip.dscp_ecn(), ip.dont_frag())
        };
        let mut t = tunnel(Mode::Ipip, DeviceKind::Tun);
        // Default: TOS 0, ECN from the inner packet (CE sent as ECT(0)), DF.
        assert_eq!(outer(&t, &pkt), (0x02, true));
        t.tos = crate::datapath::tunnel::Tos::Inherit;
        assert_eq!(outer(&t, &pkt), (0x88 | 0x02, true));
        t.tos = crate::datapath::tunnel::Tos::Fixed(0xb8 | 1);
        assert_eq!(
            outer(&t, &pkt),
            (0xb8 | 0x02, true),
            "ECN bits of tos are not used"
        );
        // nopmtudisc: DF follows the inner packet; ignore-df clears it.
        t.ttl = Ttl::Inherit;
        t.pmtudisc = false;
        assert!(outer(&t, &pkt).1);
        let mut no_df = pkt.clone();
        no_df[6] = 0;
        let c = checksum::checksum(&{
            let mut h = no_df[..20].to_vec();
            h[10] = 0;
            h[11] = 0;
            h
        });
        no_df[10..12].copy_from_slice(&c.to_be_bytes());
        assert!(!outer(&t, &no_df).1);
        t.ignore_df = true;
        assert!(!outer(&t, &pkt).1);
    }

    #[test]
    fn gretap_sends_whole_frames_whatever_they_carry() {
        let mut t = tunnel(Mode::Gretap, DeviceKind::Tap);
        t.ttl = Ttl::Inherit;
        t.okey = Some(9);
        // A broadcast ARP request from the bridge: carried, not answered.
        let mut frame = vec![0xff; 6];
        frame.extend_from_slice(&[2, 0, 0, 0, 0, 0x42, 0x08, 0x06]);
        frame.extend_from_slice(&[1u8; 28]);
        let off = t.read_offset();
        assert_eq!(off, t.outer_len(), "the frame's own header is kept");
        let mut buf = vec![0u8; 3840];
        buf[off..off + frame.len()].copy_from_slice(&frame);
        let Verdict::Transmit { len } = encap(&mut buf, frame.len(), &t, Some(HOP), &mut cx(9))
        else {
            panic!()
        };
        let ip = ipv4::Packet::new_checked(&buf[14..len]).unwrap();
        assert_eq!(ip.protocol(), IpProtocol::Gre);
        assert_eq!(ip.ttl(), 64, "no IP inside: the default TTL");
        let gre = &buf[34..len];
        assert_eq!(&gre[0..4], &[0x20, 0x00, 0x65, 0x58]);
        assert_eq!(&gre[4..8], &9u32.to_be_bytes());
        assert_eq!(&gre[8..], &frame[..]);
        // An IPv4 packet inside lends its TTL.
        let mut framed = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 0x42, 0x08, 0x00];
        framed.extend_from_slice(&inner(31, 33));
        let mut buf = vec![0u8; 3840];
        buf[off..off + framed.len()].copy_from_slice(&framed);
        let Verdict::Transmit { len } = encap(&mut buf, framed.len(), &t, Some(HOP), &mut cx(9))
        else {
            panic!()
        };
        assert_eq!(ipv4::Packet::new_checked(&buf[14..len]).unwrap().ttl(), 33);
    }

    #[test]
    fn a_learned_path_mtu_lowers_what_fits_and_expires() {
        let t = tunnel(Mode::Gre, DeviceKind::Tun);
        let pkt = inner(1300, 64); // 1328 bytes, DF set
        let (mut buf, n) = read_into(&t, &pkt);
        assert!(matches!(
            encap(&mut buf, n, &t, Some(HOP), &mut cx(1)),
            Verdict::Transmit { .. }
        ));
        assert!(t.path_mtu.lower(1300, 1000));
        assert!(!t.path_mtu.lower(1400, 1000), "only lowered");
        let (mut buf, n) = read_into(&t, &pkt);
        let Verdict::Reply { offset, .. } = encap(&mut buf, n, &t, Some(HOP), &mut cx(1)) else {
            panic!("not refused")
        };
        // ICMP fragmentation needed with what fits: 1300 less IPv4 and GRE.
        let icmp = &buf[offset + 20..];
        assert_eq!((icmp[0], icmp[1]), (3, 4));
        assert_eq!(u16::from_be_bytes([icmp[6], icmp[7]]), 1300 - 24);
        // Ten minutes on, the tunnel MTU holds again.
        assert_eq!(t.path_mtu.get(1000 + PATH_MTU_EXPIRES), None);
    }

    #[test]
    fn arp_for_the_peer_is_answered_in_place() {
        let t = tunnel(Mode::Gre, DeviceKind::Tap);
        let off = t.read_offset();
        let mut buf = vec![0u8; 3840];
        let req = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0xaa, 0, 0, 0, 1, 0x08, 0x06, // eth
            0, 1, 8, 0, 6, 4, 0, 1, // request
            0x02, 0xaa, 0, 0, 0, 1, 10, 1, 1, 1, // sender
            0, 0, 0, 0, 0, 0, 10, 1, 1, 2, // target
        ];
        buf[off..off + req.len()].copy_from_slice(&req);
        let v = encap(&mut buf, req.len(), &t, Some(HOP), &mut cx(0));
        assert_eq!(
            v,
            Verdict::Reply {
                offset: off,
                len: 42,
                reason: None
            }
        );
        let r = &buf[off..off + 42];
        assert_eq!(&r[0..6], &TAP_MAC);
        assert_eq!(&r[6..12], &PEER_MAC);
        assert_eq!(&r[20..22], &[0, 2], "a reply");
        assert_eq!(&r[22..28], &PEER_MAC);
        assert_eq!(&r[28..32], &[10, 1, 1, 2]);
        assert_eq!(&r[32..38], &TAP_MAC);
        assert_eq!(&r[38..42], &[10, 1, 1, 1]);
        // A question about this end's own address is not ours to answer.
        let mut own = req;
        own[38..42].copy_from_slice(&[10, 1, 1, 1]);
        own[28..32].copy_from_slice(&[10, 1, 1, 9]);
        buf[off..off + own.len()].copy_from_slice(&own);
        assert_eq!(
            encap(&mut buf, own.len(), &t, Some(HOP), &mut cx(0)),
            Verdict::Drop(DropReason::TxChatter)
        );
    }

    #[test]
    fn neighbour_solicitation_for_the_far_side_is_answered() {
        let mut t = tunnel(Mode::Gre, DeviceKind::Tap);
        t.address = Some("fd00::1".parse().unwrap());
        t.peer = Some("fd00::2".parse().unwrap());
        let target: [u8; 16] = "fd00::2".parse::<std::net::Ipv6Addr>().unwrap().octets();
        let asker: [u8; 16] = "fd00::1".parse::<std::net::Ipv6Addr>().unwrap().octets();
        let mut body = target.to_vec();
        body.extend_from_slice(&[1, 1, 0x02, 0xaa, 0, 0, 0, 1]); // source link-layer option
        let b = etherparse::PacketBuilder::ipv6(
            asker,
            [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0, 0, 2],
            255,
        )
        .icmpv6(etherparse::Icmpv6Type::Unknown {
            type_u8: 135,
            code_u8: 0,
            bytes5to8: [0; 4],
        });
        let mut ns = Vec::new();
        b.write(&mut ns, &body).unwrap();
        let (mut buf, n) = read_into(&t, &ns);
        let Verdict::Reply {
            offset,
            len,
            reason,
        } = encap(&mut buf, n, &t, Some(HOP), &mut cx(0))
        else {
            panic!("no advertisement")
        };
        assert_eq!(reason, None);
        let r = &buf[offset..offset + len];
        assert_eq!(&r[0..6], &TAP_MAC, "to the asker's MAC");
        assert_eq!(&r[6..12], &PEER_MAC);
        assert_eq!(&r[22..38], &target, "from the target");
        assert_eq!(&r[38..54], &asker, "to the asker");
        assert_eq!(r[21], 255, "hop limit 255");
        let icmp = &r[54..];
        assert_eq!(icmp[0], 136, "neighbour advertisement");
        assert_eq!(icmp[4] & 0x40, 0x40, "solicited");
        assert_eq!(&icmp[8..24], &target);
        assert_eq!(&icmp[24..26], &[2, 1], "target link-layer option");
        assert_eq!(&icmp[26..32], &PEER_MAC);
        // The ICMPv6 checksum over the pseudo-header, computed here.
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&target);
        pseudo.extend_from_slice(&asker);
        pseudo.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 58]);
        pseudo.extend_from_slice(icmp);
        assert!(ones_complement_ok(&pseudo), "ICMPv6 checksum");
        // Not for this end's own address.
        let mut own = ns.clone();
        let at = 40 + 8;
        own[at..at + 16].copy_from_slice(&asker);
        let (mut buf, n) = read_into(&t, &own);
        assert!(matches!(
            encap(&mut buf, n, &t, Some(HOP), &mut cx(0)),
            Verdict::Drop(_)
        ));
    }

    #[test]
    fn chatter_and_families() {
        let t = tunnel(Mode::Ipip, DeviceKind::Tap);
        // A router solicitation to ff02::2 from a link-local address.
        let b = etherparse::PacketBuilder::ipv6(
            [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            255,
        )
        .icmpv6(etherparse::Icmpv6Type::Unknown {
            type_u8: 133,
            code_u8: 0,
            bytes5to8: [0; 4],
        });
        let mut rs = Vec::new();
        b.write(&mut rs, &[]).unwrap();
        let (mut buf, n) = read_into(&t, &rs);
        assert_eq!(
            encap(&mut buf, n, &t, Some(HOP), &mut cx(0)),
            Verdict::Drop(DropReason::TxChatter)
        );
        // Global IPv6 is not carried by IPIP.
        let b = etherparse::PacketBuilder::ipv6([0xfd; 16], [0xfe; 16], 64).udp(1, 2);
        let mut v6 = Vec::new();
        b.write(&mut v6, &[1, 2, 3]).unwrap();
        let (mut buf, n) = read_into(&t, &v6);
        assert_eq!(
            encap(&mut buf, n, &t, Some(HOP), &mut cx(0)),
            Verdict::Drop(DropReason::TxFamilyNotCarried)
        );
        // Without a next hop nothing is sent.
        let (mut buf, n) = read_into(&t, &inner(8, 64));
        assert_eq!(
            encap(&mut buf, n, &t, None, &mut cx(0)),
            Verdict::Drop(DropReason::TxNoNeighbour)
        );
        // Garbage from a tun.
        let tun = tunnel(Mode::Gre, DeviceKind::Tun);
        let (mut buf, n) = read_into(&tun, &[0x12, 0x34]);
        assert_eq!(
            encap(&mut buf, n, &tun, Some(HOP), &mut cx(0)),
            Verdict::Drop(DropReason::TxMalformed)
        );
    }

    #[test]
    fn too_big_with_df_gets_fragmentation_needed() {
        let t = tunnel(Mode::Gre, DeviceKind::Tap);
        let pkt = inner(1472, 64); // 1500 bytes with DF (etherparse's default)
        assert_eq!(pkt.len(), 1500);
        let (mut buf, n) = read_into(&t, &pkt);
        let Verdict::Reply {
            offset,
            len,
            reason,
        } = encap(&mut buf, n, &t, Some(HOP), &mut cx(0))
        else {
            panic!("no ICMP")
        };
        assert_eq!(reason, Some(DropReason::TxTooBigIcmpSent));
        let s = SlicedPacket::from_ethernet(&buf[offset..offset + len]).unwrap();
        let eth = s.link.unwrap().to_header().unwrap().ethernet2().unwrap();
        assert_eq!(eth.destination, TAP_MAC);
        let Some(NetSlice::Ipv4(ip)) = s.net else {
            panic!()
        };
        assert_eq!(ip.header().source(), [10, 1, 1, 2]);
        assert_eq!(ip.header().destination(), [10, 1, 1, 1]);
        assert!(len <= 14 + 576);
        let Some(TransportSlice::Icmpv4(icmp)) = s.transport else {
            panic!()
        };
        assert_eq!(
            icmp.icmp_type(),
            Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                    next_hop_mtu: 1400
                }
            )
        );
        assert!(
            ones_complement_ok(&buf[offset + 34..offset + len]),
            "ICMP checksum"
        );
        // The quoted header is the original one.
        assert_eq!(&buf[offset + 42..offset + 62], &pkt[..20]);
        // Without DF it is dropped and counted, not fragmented.
        let mut no_df = pkt.clone();
        no_df[6] = 0;
        let mut h = etherparse::Ipv4Header::from_slice(&no_df).unwrap().0;
        h.header_checksum = h.calc_header_checksum();
        no_df[10..12].copy_from_slice(&h.header_checksum.to_be_bytes());
        let (mut buf, n) = read_into(&t, &no_df);
        assert_eq!(
            encap(&mut buf, n, &t, Some(HOP), &mut cx(0)),
            Verdict::Drop(DropReason::TxTooBig)
        );
    }

    /// A routable IPv6 UDP datagram of `len` bytes in all (etherparse).
    fn inner6(len: usize) -> Vec<u8> {
        let b = etherparse::PacketBuilder::ipv6(
            [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            64,
        )
        .udp(1, 2);
        let mut out = Vec::new();
        b.write(&mut out, &vec![0x33; len - 48]).unwrap();
        out
    }

    #[test]
    fn ipv6_over_an_ipv4_path_under_1280_goes_out_with_df_clear() {
        // gre over IPv4 (24 bytes of outer IPv4 + GRE): a router says the
        // path carries 600, which leaves 576 for IPv6, under its minimum.
        let t = tunnel(Mode::Gre, DeviceKind::Tun);
        assert!(t.path_mtu.lower(600, 0));
        // As sit: IPv6 is told 1280, never less; a packet of 1280 leaves,
        // outer DF clear, for the router to fragment; so does a small one.
        for size in [1280, 500] {
            let (mut buf, n) = read_into(&t, &inner6(size));
            let Verdict::Transmit { len } = encap(&mut buf, n, &t, Some(HOP), &mut cx(5)) else {
                panic!("{size}: not sent")
            };
            let (outer, _) = etherparse::Ipv4Header::from_slice(&buf[14..len]).unwrap();
            assert!(
                !outer.dont_fragment,
                "{size}: outer DF set on a path too small"
            );
        }
        // A 1300-byte one gets "packet too big" saying 1280.
        let (mut buf, n) = read_into(&t, &inner6(1300));
        let Verdict::Reply { offset, len, .. } = encap(&mut buf, n, &t, Some(HOP), &mut cx(5))
        else {
            panic!("no ICMPv6")
        };
        let s = SlicedPacket::from_ip(&buf[offset..offset + len]).unwrap();
        let Some(TransportSlice::Icmpv6(icmp)) = s.transport else {
            panic!()
        };
        assert_eq!(
            icmp.icmp_type(),
            etherparse::Icmpv6Type::PacketTooBig { mtu: 1280 }
        );
        // IPv4 on the same path still gets "fragmentation needed", with
        // the path's MTU less the overhead.
        let (mut buf, n) = read_into(&t, &inner(1000, 64));
        let Verdict::Reply { offset, len, .. } = encap(&mut buf, n, &t, Some(HOP), &mut cx(5))
        else {
            panic!("no ICMP")
        };
        let s = SlicedPacket::from_ip(&buf[offset..offset + len]).unwrap();
        let Some(TransportSlice::Icmpv4(icmp)) = s.transport else {
            panic!()
        };
        assert_eq!(
            icmp.icmp_type(),
            Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                    next_hop_mtu: 576
                }
            )
        );
        // On a path of 1400 (1376 left), IPv6 is told as before.
        let t = tunnel(Mode::Gre, DeviceKind::Tun);
        assert!(t.path_mtu.lower(1400, 0));
        let (mut buf, n) = read_into(&t, &inner6(1390));
        assert!(matches!(
            encap(&mut buf, n, &t, Some(HOP), &mut cx(5)),
            Verdict::Reply { .. }
        ));
    }

    #[test]
    fn no_icmp_error_about_an_icmp_error_nor_beyond_the_budget() {
        let t = tunnel(Mode::Gre, DeviceKind::Tun);
        // An ICMP "destination unreachable" of 1500 bytes with DF, too big
        // for the tunnel: dropped, never answered.
        let b = etherparse::PacketBuilder::ipv4([10, 1, 1, 1], [10, 1, 1, 2], 64).icmpv4(
            Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Port),
        );
        let mut err = Vec::new();
        b.write(&mut err, &[0x5a; 1472]).unwrap();
        let (mut buf, n) = read_into(&t, &err);
        assert_eq!(
            encap(&mut buf, n, &t, Some(HOP), &mut cx(1)),
            Verdict::Drop(DropReason::TxTooBigNoIcmp)
        );
        // An echo request of the same size is answered.
        let (mut buf, n) = read_into(&t, &inner(1472, 64));
        assert!(matches!(
            encap(&mut buf, n, &t, Some(HOP), &mut cx(1)),
            Verdict::Reply { .. }
        ));
        // ICMPv6 errors likewise (time exceeded, type 3).
        let b = etherparse::PacketBuilder::ipv6([0xfd; 16], [0xfe; 16], 64).icmpv6(
            etherparse::Icmpv6Type::TimeExceeded(
                etherparse::icmpv6::TimeExceededCode::HopLimitExceeded,
            ),
        );
        let mut err6 = Vec::new();
        b.write(&mut err6, &[0x5a; 1400]).unwrap();
        let (mut buf, n) = read_into(&t, &err6);
        assert_eq!(
            encap(&mut buf, n, &t, Some(HOP), &mut cx(1)),
            Verdict::Drop(DropReason::TxTooBigNoIcmp)
        );
        // Nor an ICMPv6 error behind a destination-options header.
        let b = etherparse::PacketBuilder::ipv6([0xfd; 16], [0xfe; 16], 64).icmpv6(
            etherparse::Icmpv6Type::TimeExceeded(
                etherparse::icmpv6::TimeExceededCode::HopLimitExceeded,
            ),
        );
        let mut plain = Vec::new();
        b.write(&mut plain, &[0x5a; 1400]).unwrap();
        let mut behind = plain[..40].to_vec();
        behind[6] = 60; // destination options, then ICMPv6
        behind[4..6].copy_from_slice(&((plain.len() - 40 + 8) as u16).to_be_bytes());
        behind.extend_from_slice(&[58, 0, 1, 4, 0, 0, 0, 0]);
        behind.extend_from_slice(&plain[40..]);
        let (mut buf, n) = read_into(&t, &behind);
        assert_eq!(
            encap(&mut buf, n, &t, Some(HOP), &mut cx(1)),
            Verdict::Drop(DropReason::TxTooBigNoIcmp)
        );
        // A later IPv6 fragment (of anything) is answered, whatever its
        // payload's first byte: it has no ICMPv6 header to look at.
        for first_byte in [0x01, 0x80] {
            let mut frag = plain[..40].to_vec();
            frag[6] = 44; // a fragment header, offset 1448, then "ICMPv6"
            frag.extend_from_slice(&[58, 0, 0x05, 0xa8, 0, 0, 0, 7]);
            frag.push(first_byte);
            frag.extend_from_slice(&[0x5a; 1399]);
            let plen = (frag.len() - 40) as u16;
            frag[4..6].copy_from_slice(&plen.to_be_bytes());
            let (mut buf, n) = read_into(&t, &frag);
            assert!(
                matches!(
                    encap(&mut buf, n, &t, Some(HOP), &mut cx(1)),
                    Verdict::Reply { .. }
                ),
                "later fragment starting {first_byte:#x} not answered"
            );
        }
        // Nor an ICMP type the kernel does not know (over 18).
        let mut unknown = inner(1472, 64);
        unknown[20] = 42;
        let (mut buf, n) = read_into(&t, &unknown);
        assert_eq!(
            encap(&mut buf, n, &t, Some(HOP), &mut cx(1)),
            Verdict::Drop(DropReason::TxTooBigNoIcmp)
        );
        // A fragment after the first (offset 185 * 8) is never answered.
        let mut later = inner(1472, 64);
        let (mut h, _) = etherparse::Ipv4Header::from_slice(&later).unwrap();
        h.fragment_offset = etherparse::IpFragOffset::try_new(185).unwrap();
        h.header_checksum = h.calc_header_checksum();
        later[..20].copy_from_slice(&h.to_bytes());
        let (mut buf, n) = read_into(&t, &later);
        assert_eq!(
            encap(&mut buf, n, &t, Some(HOP), &mut cx(1)),
            Verdict::Drop(DropReason::TxTooBigNoIcmp)
        );
        // The budget: ICMP_PER_SECOND answers in one second, then none
        // until the next.
        let mut c = cx(1);
        c.now = 9;
        let answered = (0..ICMP_PER_SECOND + 10)
            .filter(|_| {
                let (mut buf, n) = read_into(&t, &inner(1472, 64));
                matches!(
                    encap(&mut buf, n, &t, Some(HOP), &mut c),
                    Verdict::Reply { .. }
                )
            })
            .count();
        assert_eq!(answered, ICMP_PER_SECOND as usize);
        c.now = 10;
        let (mut buf, n) = read_into(&t, &inner(1472, 64));
        assert!(matches!(
            encap(&mut buf, n, &t, Some(HOP), &mut c),
            Verdict::Reply { .. }
        ));
    }

    #[test]
    fn packets_without_df_take_ids_from_the_tunnel_not_the_worker() {
        // nopmtudisc: DF follows the inner packet, which has none here. Two
        // workers (two contexts with the same ID) never send the same ID.
        let mut t = tunnel(Mode::Gre, DeviceKind::Tun);
        t.pmtudisc = false;
        let mut no_df = inner(100, 64);
        let (mut h, _) = etherparse::Ipv4Header::from_slice(&no_df).unwrap();
        h.dont_fragment = false;
        h.header_checksum = h.calc_header_checksum();
        no_df[..20].copy_from_slice(&h.to_bytes());
        let mut ids = Vec::new();
        for _ in 0..4 {
            for worker in [&mut cx(77), &mut cx(77)] {
                let (mut buf, n) = read_into(&t, &no_df);
                let Verdict::Transmit { len } = encap(&mut buf, n, &t, Some(HOP), worker) else {
                    panic!("not sent")
                };
                let (outer, _) = etherparse::Ipv4Header::from_slice(&buf[14..len]).unwrap();
                assert!(!outer.dont_fragment);
                ids.push(outer.identification);
            }
        }
        let mut unique = ids.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ids.len(), "an ID repeated: {ids:?}");
    }

    #[test]
    fn a_worker_that_saw_an_older_path_mtu_never_raises_it() {
        // Worker A sees 1400 in force and means to lower it to 1350;
        // meanwhile worker B lowers it to 1300. A's step from what it saw
        // must fail (the state changed), and A, looking again, leaves 1300.
        // (A load, a compare and a store would have put 1350 over 1300.)
        let p = PathMtu::default();
        assert!(p.lower(1400, 0));
        let seen_by_a = p.0.load(Ordering::Relaxed);
        assert!(p.lower(1300, 0), "B");
        assert!(
            p.lower_from(seen_by_a, 1350, 0).is_err(),
            "A's stale step taken"
        );
        assert!(!p.lower(1350, 0), "A, looking again");
        assert_eq!(p.get(0), Some(1300));
    }

    #[test]
    fn a_path_mtu_is_only_ever_lowered_whatever_the_order() {
        let p = PathMtu::default();
        assert!(p.lower(1400, 0));
        assert!(!p.lower(1450, 0), "raised");
        assert!(p.lower(1300, 0));
        assert_eq!(p.get(0), Some(1300));
        // Expired: any value is taken again.
        assert!(p.lower(1450, PATH_MTU_EXPIRES));
        assert_eq!(p.get(PATH_MTU_EXPIRES), Some(1450));
    }
}
