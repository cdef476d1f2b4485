//! Decapsulation, sans-IO: a function over the bytes of one received frame
//! that returns where the inner packet (with its new Ethernet header, for a
//! tap) lies in that same buffer, or the reason to drop it. No syscalls, no
//! clock, no allocation: unit-tested and fuzzed without root.
//!
//! ICMP errors about the gateway's own packets (path MTU) are read in
//! `icmp`; ECN on the way in (RFC 6040) is applied in `ecn`.

use crate::datapath::drop_reason::DropReason;
use crate::datapath::tunnel::{endpoint_key, DeviceKind, LookupError, Mode, TunnelId, TunnelTable};
use crate::wire::{ethernet, gre, ipv4, ipv6, Error, IpProtocol};
use gateway_common::{IPPROTO_GRE, IPPROTO_IPIP, IPPROTO_IPV6};

mod ecn;
mod icmp;
#[cfg(test)]
mod tests;

use ecn::ecn_decapsulate;
pub use icmp::MIN_PMTU;
use icmp::{path_mtu_from_icmp, path_mtu_from_icmpv6};

/// A packet to deliver: `frame[offset..offset + len]` goes to the device of
/// `tunnel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub tunnel: TunnelId,
    pub offset: usize,
    pub len: usize,
    pub kind: Kind,
}

/// What a delivery is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A packet for the tunnel's device.
    Device,
    /// A GRE keepalive: `frame[offset..offset + len]` is an IPv4 packet
    /// from the tunnel's local address to its remote, to be sent back on
    /// the underlay (as the kernel would route it), not into the device.
    Keepalive,
    /// A GRE packet of protocol type 0 (nothing inside) on a `gre`
    /// tunnel: the peer reflected one of our keepalives (nothing to
    /// deliver; `offset` and `len` are 0).
    KeepaliveReply,
    /// An ICMP "fragmentation needed" about a packet the gateway sent on
    /// this tunnel's path: the path's MTU is now at most `mtu` (nothing to
    /// deliver; `offset` and `len` are 0).
    PathMtu { mtu: u16, locked: bool },
}

/// What decapsulation remembers between packets, per worker: the next
/// sequence number expected on each tunnel with `iseq` (0: any). A NIC
/// hashes a tunnel's packets (same outer addresses) onto one queue, so one
/// worker sees them all.
#[derive(Debug, Clone, Default)]
pub struct RxState {
    pub next_seq: Vec<u32>,
}

impl RxState {
    pub fn new(tunnels: usize) -> RxState {
        RxState {
            next_seq: vec![0; tunnels],
        }
    }
}

/// Inner network protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inner {
    V4,
    V6,
}

/// A decision decapsulation took on the way, told to a [`Notes`] for
/// `gateway trace`. Nothing here allocates: a note is a few words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Note {
    /// The outer IP header: its addresses (`src` is the remote), the
    /// protocol it carries and its ECN codepoint. For IPv4, the header
    /// checksum was verified.
    Outer {
        src: std::net::IpAddr,
        dst: std::net::IpAddr,
        proto: u8,
        ecn: u8,
    },
    /// A GRE header that passed its checks (version, reserved flags, and
    /// the checksum when it has one): the key, whether a checksum was
    /// there, the sequence number and the protocol type it carries.
    Gre {
        key: Option<u32>,
        checksum: bool,
        seq: Option<u32>,
        protocol: u16,
    },
    /// The endpoint lookup (local, remote, protocol and key) chose this
    /// tunnel.
    Tunnel { id: TunnelId },
    /// A tunnel with `iseq`: the packet's number and the next one expected
    /// (0: any); the packet was taken.
    Sequence { seq: u32, expected: u32 },
    /// The inner packet's source, which the tunnel accepts.
    InnerSource { src: std::net::IpAddr },
    /// ECN on the way in (RFC 6040): the outer and inner codepoints; the
    /// inner header now carries what their combination gives.
    Ecn { outer: u8, inner: u8 },
}

/// Where decapsulation tells its decisions ([`Note`]). `()` takes none
/// and costs nothing: that is what [`decap`] passes.
pub trait Notes {
    fn note(&mut self, note: Note);
}

impl Notes for () {
    #[inline(always)]
    fn note(&mut self, _: Note) {}
}

/// Decapsulates the Ethernet frame in `frame` in place. For a tap device an
/// Ethernet header (destination: the tap's MAC) is written just in front of
/// the inner packet, over the outer headers, so the result is one contiguous
/// slice of `frame`.
#[inline]
pub fn decap(
    frame: &mut [u8],
    table: &TunnelTable,
    state: &mut RxState,
) -> Result<Delivery, DropReason> {
    decap_noted(frame, table, state, &mut ())
}

/// [`decap`], telling `notes` each decision on the way.
#[inline]
pub fn decap_noted<N: Notes>(
    frame: &mut [u8],
    table: &TunnelTable,
    state: &mut RxState,
    notes: &mut N,
) -> Result<Delivery, DropReason> {
    let eth = ethernet::Frame::new_checked(&*frame).map_err(|_| DropReason::Truncated)?;
    let (ethertype, l3) = match eth.network() {
        Ok(v) => v,
        Err(Error::Truncated) => return Err(DropReason::Truncated),
        Err(Error::Malformed) => return Err(DropReason::NotIp),
    };

    // The outer header: its addresses make the lookup key; `payload` is the
    // byte range of what follows it, cut at the length it declares.
    let (key, payload, outer_ecn) = match ethertype {
        ethernet::EtherType::Ipv4 => {
            let ip = ipv4::Packet::new_checked(&frame[l3..]).map_err(outer_error)?;
            if !ip.verify_checksum() {
                return Err(DropReason::OuterChecksum);
            }
            let proto = u8::from(ip.protocol());
            if ip.is_fragment() {
                // Only tunnel packets are reassembled: a fragment of
                // anything else (an ICMP error cut in pieces, which anyone
                // can send from any source) must not take room there.
                if proto != IPPROTO_GRE && proto != IPPROTO_IPIP && proto != IPPROTO_IPV6 {
                    return Err(DropReason::NotTunnelProtocol);
                }
                return Err(DropReason::OuterFragment);
            }
            if proto == IPPROTO_ICMP {
                let start = l3 + ip.header_len();
                let end = l3 + usize::from(ip.total_len());
                return path_mtu_from_icmp(&frame[start..end], ip.dst_addr(), table);
            }
            if proto != IPPROTO_GRE && proto != IPPROTO_IPIP && proto != IPPROTO_IPV6 {
                return Err(DropReason::NotTunnelProtocol);
            }
            let key = endpoint_key(ip.dst_addr().into(), ip.src_addr().into(), proto);
            notes.note(Note::Outer {
                src: ip.src_addr().into(),
                dst: ip.dst_addr().into(),
                proto,
                ecn: ip.dscp_ecn() & ECN_MASK,
            });
            (
                key,
                l3 + ip.header_len()..l3 + usize::from(ip.total_len()),
                ip.dscp_ecn() & ECN_MASK,
            )
        }
        ethernet::EtherType::Ipv6 => {
            let ip = ipv6::Packet::new_checked(&frame[l3..]).map_err(outer_error)?;
            let end = l3 + ip.total_len();
            let mut start = l3 + ipv6::HEADER_LEN;
            let mut proto = u8::from(ip.next_header());
            if proto == IPPROTO_ICMPV6 {
                let (src, dst) = (ip.src_addr().octets(), ip.dst_addr().octets());
                return path_mtu_from_icmpv6(&frame[start..end], &src, &dst, table);
            }
            // One destination-options header, as ip6tnl and ip6gre send
            // by default (RFC 2473's encapsulation limit), is stepped over.
            if proto == IPV6_DSTOPTS {
                let opts = frame.get(start..start + 2).ok_or(DropReason::Truncated)?;
                let len = (usize::from(opts[1]) + 1) * 8;
                proto = opts[0];
                start += len;
                if start > end {
                    return Err(DropReason::OuterMalformed);
                }
            }
            if proto == IPV6_FRAGMENT {
                return Err(DropReason::OuterFragment);
            }
            if proto != IPPROTO_GRE && proto != IPPROTO_IPIP && proto != IPPROTO_IPV6 {
                return Err(match proto {
                    0 | 43 | 60 | 51 | 135 => DropReason::OuterIpv6ExtHeader,
                    _ => DropReason::NotTunnelProtocol,
                });
            }
            let key = endpoint_key(ip.dst_addr().into(), ip.src_addr().into(), proto);
            notes.note(Note::Outer {
                src: ip.src_addr().into(),
                dst: ip.dst_addr().into(),
                proto,
                ecn: ip.traffic_class() & ECN_MASK,
            });
            (key, start..end, ip.traffic_class() & ECN_MASK)
        }
        _ => return Err(DropReason::NotIp),
    };

    let (tunnel, inner, inner_start) = if key.proto == IPPROTO_GRE {
        let g = gre::Packet::new_unchecked(&frame[payload.clone()]);
        let reserved = if ethertype == ethernet::EtherType::Ipv6 {
            gre::FLAGS_RESERVED_V6
        } else {
            gre::FLAGS_RESERVED
        };
        g.check_with(reserved).map_err(|e| match e {
            gre::HeaderError::Truncated => DropReason::GreTruncated,
            gre::HeaderError::Version => DropReason::GreVersion,
            gre::HeaderError::ReservedFlags => DropReason::GreReservedFlags,
        })?;
        if !g.verify_checksum() {
            return Err(DropReason::GreChecksumBad);
        }
        notes.note(Note::Gre {
            key: g.key(),
            checksum: g.has_checksum(),
            seq: g.sequence(),
            protocol: u16::from(g.protocol()),
        });
        let id = table.lookup(&key, g.key()).map_err(lookup_error)?;
        notes.note(Note::Tunnel { id });
        let t = table.get(id);
        match (g.has_checksum(), t.icsum) {
            (false, true) => return Err(DropReason::GreChecksumMissing),
            (true, false) => return Err(DropReason::GreChecksumUnexpected),
            _ => {}
        }
        // The kernel's rule (ip_tunnel_rcv): with iseq, a packet must carry
        // a number, and one older than the next expected is refused; the
        // first packet, and any after the counter wraps to 0, set it.
        // Without iseq a number is ignored.
        if t.iseq {
            let seq = g.sequence().ok_or(DropReason::GreSequenceMissing)?;
            if let Some(next) = state.next_seq.get_mut(usize::from(id)) {
                if *next != 0 && (seq.wrapping_sub(*next) as i32) < 0 {
                    return Err(DropReason::GreSequenceOld);
                }
                notes.note(Note::Sequence {
                    seq,
                    expected: *next,
                });
                *next = seq.wrapping_add(1);
            }
        }
        // A gre tunnel carries IP, a gretap tunnel Ethernet frames; as
        // in the kernel, each takes only its own.
        // (`None`: an Ethernet frame.)
        let inner = match (g.protocol(), t.mode) {
            (ethernet::EtherType::Ipv4, Mode::Gre) => Some(Inner::V4),
            (ethernet::EtherType::Ipv6, Mode::Gre) => Some(Inner::V6),
            (ethernet::EtherType::TransparentEthernet, Mode::Gretap) => None,
            // A keepalive of ours, reflected by the peer.
            (ethernet::EtherType::Unknown(0), Mode::Gre) => {
                return Ok(Delivery {
                    tunnel: id,
                    offset: 0,
                    len: 0,
                    kind: Kind::KeepaliveReply,
                })
            }
            _ => return Err(DropReason::GreProtocolUnsupported),
        };
        (id, inner, payload.start + g.header_len())
    } else {
        let id = table.lookup(&key, None).map_err(lookup_error)?;
        notes.note(Note::Tunnel { id });
        // IPIP carries IPv4, sit IPv6.
        let inner = if key.proto == IPPROTO_IPV6 {
            Inner::V6
        } else {
            Inner::V4
        };
        (id, Some(inner), payload.start)
    };

    let t = table.get(tunnel);
    let Some(inner) = inner else {
        // The frame goes into the tap as it came: no source check (it is
        // bridged, not routed), one VLAN tag allowed beyond the MTU.
        let len = payload.end - inner_start;
        if len < ethernet::HEADER_LEN {
            return Err(DropReason::InnerMalformed);
        }
        if len - ethernet::HEADER_LEN > usize::from(t.mtu) + 4 {
            return Err(DropReason::InnerTooBig);
        }
        // ECN, as for IP in IP: the kernel applies RFC 6040 to the IP
        // header right behind the inner Ethernet header (ip_tunnel_rcv,
        // before eth_type_trans); other frames (ARP, VLAN-tagged) pass as
        // they are.
        let eth_end = inner_start + ethernet::HEADER_LEN;
        let ip_len = payload.end - eth_end;
        let inner = match [frame[eth_end - 2], frame[eth_end - 1]] {
            [0x08, 0x00] => Some((Inner::V4, ipv4::HEADER_LEN)),
            [0x86, 0xdd] => Some((Inner::V6, ipv6::HEADER_LEN)),
            _ => None,
        };
        if let Some((inner, min)) = inner {
            // pskb_inet_may_pull: an IP header cut short is dropped.
            if ip_len < min {
                return Err(DropReason::InnerMalformed);
            }
            let ip = &mut frame[eth_end..payload.end];
            let inner_ecn = match inner {
                Inner::V4 => ip[1] & ECN_MASK,
                Inner::V6 => (u16::from_be_bytes([ip[0], ip[1]]) >> 4) as u8 & ECN_MASK,
            };
            ecn_decapsulate(outer_ecn, inner_ecn, inner, ip)?;
            notes.note(Note::Ecn {
                outer: outer_ecn,
                inner: inner_ecn,
            });
        }
        return Ok(Delivery {
            tunnel,
            offset: inner_start,
            len,
            kind: Kind::Device,
        });
    };
    let rest = &frame[inner_start..payload.end];
    let (inner_len, inner_src, inner_ecn) = match inner {
        Inner::V4 => {
            let p = ipv4::Packet::new_checked(rest).map_err(|_| DropReason::InnerMalformed)?;
            // A GRE keepalive as routers send them (Cisco's): a GRE packet
            // from our end to theirs, wrapped in one from theirs to ours.
            // The kernel answers it by routing the inner packet back out;
            // so does the gateway, without the device.
            if key.proto == IPPROTO_GRE
                && p.protocol() == IpProtocol::Gre
                && std::net::IpAddr::V4(p.src_addr()) == t.local
                && std::net::IpAddr::V4(p.dst_addr()) == t.remote
            {
                let len = usize::from(p.total_len());
                let ttl = p.ttl();
                // The kernel's ip_rcv drops a header with a wrong checksum
                // before it would forward the packet.
                if !p.verify_checksum() {
                    return Err(DropReason::InnerMalformed);
                }
                if ttl <= 1 {
                    return Err(DropReason::KeepaliveTtlExpired);
                }
                // Forwarded, as the kernel would: one hop less (the
                // checksum updated for that change alone, RFC 1624).
                let mut q = ipv4::Packet::new_unchecked(&mut frame[inner_start..inner_start + len]);
                q.update_ttl(ttl - 1);
                return Ok(Delivery {
                    tunnel,
                    offset: inner_start,
                    len,
                    kind: Kind::Keepalive,
                });
            }
            (
                usize::from(p.total_len()),
                std::net::IpAddr::V4(p.src_addr()),
                p.dscp_ecn() & ECN_MASK,
            )
        }
        Inner::V6 => {
            let p = ipv6::Packet::new_checked(rest).map_err(|_| DropReason::InnerMalformed)?;
            (
                p.total_len(),
                std::net::IpAddr::V6(p.src_addr()),
                p.traffic_class() & ECN_MASK,
            )
        }
    };
    if !t.accepts_source(inner_src) {
        return Err(DropReason::InnerSourceNotPeer);
    }
    notes.note(Note::InnerSource { src: inner_src });
    if inner_len > usize::from(t.mtu) {
        return Err(DropReason::InnerTooBig);
    }
    ecn_decapsulate(
        outer_ecn,
        inner_ecn,
        inner,
        &mut frame[inner_start..inner_start + inner_len],
    )?;
    notes.note(Note::Ecn {
        outer: outer_ecn,
        inner: inner_ecn,
    });

    match t.device_kind {
        DeviceKind::Tun => Ok(Delivery {
            tunnel,
            offset: inner_start,
            len: inner_len,
            kind: Kind::Device,
        }),
        DeviceKind::Tap => {
            // The outer Ethernet and IP headers (at least 34 bytes) lie in
            // front of the inner packet, so there is room for 14 here.
            let offset = inner_start - ethernet::HEADER_LEN;
            let repr = ethernet::Repr {
                dst: t.device_mac,
                src: t.peer_mac,
                ethertype: match inner {
                    Inner::V4 => ethernet::EtherType::Ipv4,
                    Inner::V6 => ethernet::EtherType::Ipv6,
                },
            };
            repr.emit(&mut ethernet::Frame::new_unchecked(
                &mut frame[offset..inner_start],
            ));
            Ok(Delivery {
                tunnel,
                offset,
                len: inner_len + ethernet::HEADER_LEN,
                kind: Kind::Device,
            })
        }
    }
}

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
const IPV6_FRAGMENT: u8 = 44;

const ECN_MASK: u8 = 0x03;
const IPV6_DSTOPTS: u8 = 60;

fn outer_error(e: Error) -> DropReason {
    match e {
        Error::Truncated => DropReason::Truncated,
        Error::Malformed => DropReason::OuterMalformed,
    }
}

fn lookup_error(e: LookupError) -> DropReason {
    match e {
        LookupError::UnknownEndpoint => DropReason::UnknownEndpoint,
        LookupError::KeyMismatch => DropReason::KeyMismatch,
    }
}
