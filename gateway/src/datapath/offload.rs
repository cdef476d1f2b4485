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

use crate::wire::{checksum, ipv4, ipv6};

/// Bytes of `struct virtio_net_hdr` before every packet written to or read
/// from a device opened with `IFF_VNET_HDR`.
pub const VNET_HDR_LEN: usize = 10;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum at `csum_start +
/// csum_offset` holds the pseudo-header sum; the rest is to be added.
pub const F_NEEDS_CSUM: u8 = 1;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_UDP_L4: u8 = 5;
pub const GSO_ECN: u8 = 0x80;
/// Most bytes one coalesced packet carries after its link header (the
/// IPv4 total length field's limit).
pub const MAX_MERGED: usize = 65535;
/// Most segments in one coalesced packet.
pub const MAX_SEGMENTS: u16 = 64;

const TCP: u8 = 6;
const UDP: u8 = 17;
const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;
const URG: u8 = 0x20;
const CWR: u8 = 0x80;

/// `struct virtio_net_hdr` (legacy layout, native byte order, as tun uses
/// it unless told otherwise).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    pub fn emit(&self, out: &mut [u8]) {
        out[0] = self.flags;
        out[1] = self.gso_type;
        out[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        out[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        out[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        out[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
    }

    pub fn parse(b: &[u8]) -> Option<VnetHdr> {
        let b = b.get(..VNET_HDR_LEN)?;
        let u = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        })
    }
}

/// Protocol, addresses and ports of a TCP or UDP flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    pub v6: bool,
    pub udp: bool,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub ports: [u8; 4],
}

/// Most bytes in front of the IP header of a packet that may coalesce: an
/// Ethernet header with two VLAN tags.
pub const MAX_LINK_HEADER: usize = 14 + 2 * 4;

/// What must match between segments of one run besides the flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Signature {
    /// The link header (all of it: addresses, VLAN tags, EtherType),
    /// zero-padded, and its length.
    link: [u8; MAX_LINK_HEADER],
    link_len: u8,
    /// IPv4: TOS, TTL, fragment field; IPv6: version/class/label, hop limit.
    ip: [u8; 5],
    ack: [u8; 4],
    flags: u8,
    window: [u8; 2],
    options: [u8; 40],
}

/// A TCP segment or UDP datagram in an inner packet.
#[derive(Debug, Clone, Copy)]
pub struct Segment {
    pub flow: Flow,
    /// Offset of the TCP/UDP header in the packet (link header included).
    pub l4: usize,
    /// Offset of the payload.
    pub hdr_len: usize,
    pub seq: u32,
    pub payload: usize,
    /// May join or start a run.
    pub mergeable: bool,
    /// PSH set: the run ends with this segment.
    pub push: bool,
    sig: Signature,
}

/// Parses the TCP segment (or with `udp`, also the UDP datagram) in `pkt`,
/// whose IP header starts at `l3` (after a link header, if any). `None`:
/// neither, or not parseable as such.
///
/// UDP datagrams of one flow coalesce as the kernel's UDP GRO merges them
/// (into a `GSO_UDP_L4` packet, which needs USO in the kernel, 6.2 on):
/// all of the first one's size but the last, which may be shorter; IPv4
/// not fragmented (DF as the first); the UDP checksum right or absent.
pub fn parse(pkt: &[u8], l3: usize, udp: bool) -> Option<Segment> {
    let ip = pkt.get(l3..)?;
    if l3 > MAX_LINK_HEADER {
        return None;
    }
    let mut link = [0u8; MAX_LINK_HEADER];
    link[..l3].copy_from_slice(&pkt[..l3]);
    let mut flow = Flow {
        v6: false,
        udp: false,
        src: [0; 16],
        dst: [0; 16],
        ports: [0; 4],
    };
    let sig_ip;
    let (l4, ip_ok) = match ip.first()? >> 4 {
        4 => {
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            if ip.len() < 20 || !(ip[9] == TCP || udp && ip[9] == UDP) || ihl < 20 {
                return None;
            }
            flow.udp = ip[9] == UDP;
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            flow.src[..4].copy_from_slice(&ip[12..16]);
            flow.dst[..4].copy_from_slice(&ip[16..20]);
            sig_ip = [ip[1], ip[8], ip[6], ip[7], 0];
            // No options, not a fragment, the packet exactly; TCP with DF;
            // a right header checksum (as inet_gro_receive checks it: a
            // corrupt header is written on its own, for the kernel to drop).
            let df_ok = flow.udp || ip[6] & 0x40 != 0;
            let ok = ihl == 20
                && ip[6] & 0xbf == 0
                && ip[7] == 0
                && df_ok
                && total == ip.len()
                && checksum::verify(&ip[..20]);
            (l3 + ihl, ok)
        }
        6 => {
            if ip.len() < 40 || !(ip[6] == TCP || udp && ip[6] == UDP) {
                return None;
            }
            flow.v6 = true;
            flow.udp = ip[6] == UDP;
            flow.src.copy_from_slice(&ip[8..24]);
            flow.dst.copy_from_slice(&ip[24..40]);
            sig_ip = [ip[0], ip[1], ip[2], ip[3], ip[7]];
            let plen = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            (l3 + 40, plen + 40 == ip.len())
        }
        _ => return None,
    };
    if flow.udp {
        let u = pkt.get(l4..)?;
        if u.len() < 8 {
            return None;
        }
        flow.ports.copy_from_slice(&u[0..4]);
        let len_ok = usize::from(u16::from_be_bytes([u[4], u[5]])) == u.len();
        let csum = u16::from_be_bytes([u[6], u[7]]);
        let seg = Segment {
            flow,
            l4,
            hdr_len: l4 + 8,
            seq: 0,
            payload: u.len() - 8,
            mergeable: false,
            push: false,
            sig: Signature {
                link,
                link_len: l3 as u8,
                ip: sig_ip,
                ack: [0; 4],
                flags: 0,
                window: [0; 2],
                options: [0; 40],
            },
        };
        // IPv4 may go without a checksum; IPv6 may not.
        let csum_ok = (csum == 0 && !flow.v6)
            || checksum::fold(pseudo_proto(&flow, UDP, u.len()) + u64::from(checksum::sum(u)))
                == 0xffff;
        let mergeable = ip_ok && len_ok && seg.payload > 0 && csum_ok;
        return Some(Segment { mergeable, ..seg });
    }
    let tcp = pkt.get(l4..)?;
    if tcp.len() < 20 {
        return None;
    }
    flow.ports.copy_from_slice(&tcp[0..4]);
    let doff = usize::from(tcp[12] >> 4) * 4;
    if doff < 20 || doff > tcp.len() {
        return None;
    }
    let flags = tcp[13];
    let mut options = [0u8; 40];
    options[..doff - 20].copy_from_slice(&tcp[20..doff]);
    let payload = tcp.len() - doff;
    let plain = flags & (FIN | SYN | RST | URG | CWR) == 0 && flags & ACK != 0;
    let seg = Segment {
        flow,
        l4,
        hdr_len: l4 + doff,
        seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
        payload,
        mergeable: false,
        push: flags & PSH != 0,
        sig: Signature {
            link,
            link_len: l3 as u8,
            ip: sig_ip,
            ack: [tcp[8], tcp[9], tcp[10], tcp[11]],
            flags: flags & !PSH,
            // A window update must reach the receiver: tcp_gro_receive
            // compares the whole flags word, window included.
            window: [tcp[14], tcp[15]],
            options,
        },
    };
    let mergeable = ip_ok && plain && payload > 0 && checksum_ok(pkt, &seg);
    Some(Segment { mergeable, ..seg })
}

/// The pseudo-header sum for `len` bytes of protocol `proto` in `flow`.
fn pseudo_proto(flow: &Flow, proto: u8, len: usize) -> u64 {
    let n = if flow.v6 { 16 } else { 4 };
    checksum::pseudo_header(&flow.src[..n], &flow.dst[..n], proto, len)
}

fn checksum_ok(pkt: &[u8], seg: &Segment) -> bool {
    let tcp = &pkt[seg.l4..];
    checksum::fold(pseudo_proto(&seg.flow, TCP, tcp.len()) + u64::from(checksum::sum(tcp)))
        == 0xffff
}

/// Sets the length of the IP header at `l3` (the transport header at
/// `l4`) for `l4_len` bytes from `l4` on; for IPv4 also adds `id_step` to
/// the identification. The IPv4 header checksum: with `Checksum::Update`
/// adjusted for the changes alone (RFC 1624), so a header that came in
/// wrong stays wrong (inbound, from the wire); with `Checksum::Fill`
/// computed again, as `inet_gso_segment` does for each segment of the
/// local kernel's own GSO packet (outbound, whose checksum is not kept up
/// to date for the whole).
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

/// Completes a checksum the kernel left partial (`F_NEEDS_CSUM`) in a
/// packet read from a device: the field at `csum_start + csum_offset`
/// holds the pseudo-header sum, the one's complement of everything from
/// `csum_start` goes there. False when the header points outside the
/// packet.
pub fn complete_checksum(pkt: &mut [u8], h: &VnetHdr) -> bool {
    if h.flags & F_NEEDS_CSUM == 0 {
        return true;
    }
    let start = usize::from(h.csum_start);
    let field = start + usize::from(h.csum_offset);
    if field + 2 > pkt.len() {
        return false;
    }
    // As the kernel's skb_checksum_help: a zero result is sent as all ones
    // (the same value in one's complement, and what UDP requires).
    let c = match !checksum::sum(&pkt[start..]) {
        0 => 0xffff,
        c => c,
    };
    pkt[field..field + 2].copy_from_slice(&c.to_be_bytes());
    true
}

/// A run of segments being coalesced: the first one's facts and where the
/// run stands.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    pub first: Segment,
    /// Sequence number the next segment must carry.
    pub next_seq: u32,
    /// Payload bytes so far.
    pub payload: usize,
    pub segments: u16,
    /// The run takes no more segments (PSH, a short one, or full).
    pub closed: bool,
    pub push: bool,
}

impl Run {
    pub fn start(first: Segment) -> Run {
        Run {
            first,
            next_seq: first.seq.wrapping_add(first.payload as u32),
            payload: first.payload,
            segments: 1,
            closed: first.push,
            push: first.push,
        }
    }

    /// Whether `seg` belongs to this run's flow: the same addresses,
    /// ports and protocol behind the same link header (a frame of another
    /// VLAN, or to or from another MAC, is another flow).
    pub fn same_flow(&self, seg: &Segment) -> bool {
        self.first.flow == seg.flow
            && self.first.sig.link_len == seg.sig.link_len
            && self.first.sig.link == seg.sig.link
    }

    /// Whether `seg` (of the same flow) continues the run.
    pub fn accepts(&self, seg: &Segment) -> bool {
        !self.closed
            && seg.mergeable
            && (seg.flow.udp || seg.seq == self.next_seq)
            && seg.hdr_len == self.first.hdr_len
            && seg.payload <= self.first.payload
            && seg.sig == self.first.sig
            && self.segments < MAX_SEGMENTS
            && self.first.hdr_len + self.payload + seg.payload <= MAX_MERGED
    }

    /// Adds `seg`, which [`Run::accepts`].
    pub fn add(&mut self, seg: &Segment) {
        self.next_seq = self.next_seq.wrapping_add(seg.payload as u32);
        self.payload += seg.payload;
        self.segments += 1;
        if seg.push || seg.payload < self.first.payload {
            self.closed = true;
        }
        self.push |= seg.push;
    }

    /// Rewrites the first segment's headers in `pkt` (that segment, link
    /// header included, as it was parsed) for the whole run, and returns the
    /// virtio-net header that makes the kernel take it as one GSO packet.
    /// `l3` is where the IP header starts. Only for runs of two or more.
    pub fn finish(&self, pkt: &mut [u8], l3: usize) -> VnetHdr {
        let f = &self.first;
        let tcp_len = f.hdr_len - f.l4 + self.payload;
        let udp = f.flow.udp;
        let at = Lengths {
            l3,
            l4: f.l4,
            v6: f.flow.v6,
            l4_len: tcp_len,
            id_step: 0,
        };
        set_ip_len(pkt, at, Checksum::Update);
        if udp {
            // The length of the whole; the kernel's segmentation gives each
            // datagram its own.
            pkt[f.l4 + 4..f.l4 + 6].copy_from_slice(&(tcp_len as u16).to_be_bytes());
        } else if self.push {
            pkt[f.l4 + 13] |= PSH;
        }
        // The kernel completes the checksum from the pseudo-header sum.
        let (proto, csum_offset) = if udp { (UDP, 6) } else { (TCP, 16) };
        let seed = checksum::fold(pseudo_proto(&f.flow, proto, tcp_len));
        let field = f.l4 + usize::from(csum_offset);
        pkt[field..field + 2].copy_from_slice(&seed.to_be_bytes());
        VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: match (udp, f.flow.v6) {
                (true, _) => GSO_UDP_L4,
                (false, false) => GSO_TCPV4,
                (false, true) => GSO_TCPV6,
            },
            hdr_len: f.hdr_len as u16,
            gso_size: f.payload as u16,
            csum_start: f.l4 as u16,
            csum_offset,
        }
    }
}

/// Why a packet read from a device cannot be segmented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadGso;

/// A GSO packet read from a device, ready to be cut into segments.
#[derive(Debug, Clone, Copy)]
pub struct Segmenter<'a> {
    pkt: &'a [u8],
    l3: usize,
    l4: usize,
    hdr_len: usize,
    mss: usize,
    v6: bool,
    udp: bool,
    count: usize,
}

impl<'a> Segmenter<'a> {
    /// `pkt` (link header included: its IP header at `l3`) with the
    /// virtio-net header `h` that came with it, whose `gso_type` is not
    /// [`GSO_NONE`].
    pub fn new(pkt: &'a [u8], l3: usize, h: &VnetHdr) -> Result<Segmenter<'a>, BadGso> {
        let ip = pkt.get(l3..).ok_or(BadGso)?;
        let (v6, proto, l4) = match ip.first().ok_or(BadGso)? >> 4 {
            4 if ip.len() >= 20 => (false, ip[9], l3 + usize::from(ip[0] & 0x0f) * 4),
            6 if ip.len() >= 40 => (true, ip[6], l3 + 40),
            _ => return Err(BadGso),
        };
        let udp = match (h.gso_type & !GSO_ECN, v6, proto) {
            (GSO_TCPV4, false, TCP) | (GSO_TCPV6, true, TCP) => false,
            (GSO_UDP_L4, _, UDP) => true,
            _ => return Err(BadGso),
        };
        let l4_len = if udp {
            8
        } else {
            usize::from(pkt.get(l4 + 12).ok_or(BadGso)? >> 4) * 4
        };
        let hdr_len = l4 + l4_len;
        let mss = usize::from(h.gso_size);
        let min_l4 = if udp { 8 } else { 20 };
        if l4 < l3 + 20 || l4_len < min_l4 || hdr_len > pkt.len() || mss == 0 {
            return Err(BadGso);
        }
        let payload = pkt.len() - hdr_len;
        Ok(Segmenter {
            pkt,
            l3,
            l4,
            hdr_len,
            mss,
            v6,
            udp,
            count: payload.div_ceil(mss).max(1),
        })
    }

    /// How many segments.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Length of segment `i`.
    pub fn len(&self, i: usize) -> usize {
        let start = self.hdr_len + i * self.mss;
        self.hdr_len + (self.pkt.len() - start).min(self.mss)
    }

    /// Writes segment `i` (headers and payload) into `out`, which must
    /// hold [`Segmenter::len`] bytes; returns that length.
    pub fn write(&self, i: usize, out: &mut [u8]) -> usize {
        let (l3, l4, h) = (self.l3, self.l4, self.hdr_len);
        let start = h + i * self.mss;
        let plen = (self.pkt.len() - start).min(self.mss);
        let len = h + plen;
        let out = &mut out[..len];
        out[..h].copy_from_slice(&self.pkt[..h]);
        out[h..].copy_from_slice(&self.pkt[start..start + plen]);
        let last = i + 1 == self.count;
        let l4_len = len - l4;
        let at = Lengths {
            l3,
            l4,
            v6: self.v6,
            l4_len,
            id_step: i as u16,
        };
        set_ip_len(out, at, Checksum::Fill);
        let mut flow = Flow {
            v6: self.v6,
            udp: self.udp,
            src: [0; 16],
            dst: [0; 16],
            ports: [0; 4],
        };
        if self.v6 {
            flow.src.copy_from_slice(&out[l3 + 8..l3 + 24]);
            flow.dst.copy_from_slice(&out[l3 + 24..l3 + 40]);
        } else {
            flow.src[..4].copy_from_slice(&out[l3 + 12..l3 + 16]);
            flow.dst[..4].copy_from_slice(&out[l3 + 16..l3 + 20]);
        }
        let field = if self.udp {
            out[l4 + 4..l4 + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
            l4 + 6
        } else {
            let seq = u32::from_be_bytes([out[l4 + 4], out[l4 + 5], out[l4 + 6], out[l4 + 7]])
                .wrapping_add((i * self.mss) as u32);
            out[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
            // FIN and PSH on the last segment only, CWR on the first only.
            if !last {
                out[l4 + 13] &= !(FIN | PSH);
            }
            if i > 0 {
                out[l4 + 13] &= !CWR;
            }
            l4 + 16
        };
        out[field..field + 2].copy_from_slice(&[0, 0]);
        let proto = if self.udp { UDP } else { TCP };
        let sum = checksum::fold(
            pseudo_proto(&flow, proto, l4_len) + u64::from(checksum::sum(&out[l4..])),
        );
        let c = match !sum {
            0 => 0xffff,
            c => c,
        };
        out[field..field + 2].copy_from_slice(&c.to_be_bytes());
        len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4 packet from 10.1.1.2 to 10.1.1.1 behind a 14-byte Ethernet
    /// header, with the transport header and payload `l4` (TCP or UDP),
    /// every header and checksum written by etherparse.
    fn ip4(proto: u8, df: bool, l4: Vec<u8>) -> Vec<u8> {
        let mut ip = etherparse::Ipv4Header::new(
            l4.len() as u16,
            64,
            etherparse::IpNumber(proto),
            [10, 1, 1, 2],
            [10, 1, 1, 1],
        )
        .unwrap();
        ip.dont_fragment = df;
        ip.identification = 1;
        ip.header_checksum = ip.calc_header_checksum();
        let mut p = Vec::new();
        etherparse::Ethernet2Header {
            destination: [2, 0, 0, 0, 0, 1],
            source: [2, 0, 0, 0, 0, 2],
            ether_type: etherparse::EtherType::IPV4,
        }
        .write(&mut p)
        .unwrap();
        ip.write(&mut p).unwrap();
        if proto == TCP {
            let (mut t, payload) = etherparse::TcpHeader::from_slice(&l4).unwrap();
            t.checksum = t.calc_checksum_ipv4(&ip, payload).unwrap();
            t.write(&mut p).unwrap();
            p.extend_from_slice(payload);
        } else {
            let (mut u, payload) = etherparse::UdpHeader::from_slice(&l4).unwrap();
            u.checksum = u.calc_checksum_ipv4(&ip, payload).unwrap();
            u.write(&mut p).unwrap();
            p.extend_from_slice(payload);
        }
        p
    }

    /// An IPv4 TCP segment (ACK 7, window `window`) with a right checksum,
    /// behind a 14-byte Ethernet header.
    fn seg4w(seq: u32, payload: &[u8], flags: u8, ack: u32, window: u16) -> Vec<u8> {
        let mut tcp = vec![0u8; 20];
        tcp[0..4].copy_from_slice(&[0x13, 0x88, 0xa0, 0x00]);
        tcp[4..8].copy_from_slice(&seq.to_be_bytes());
        tcp[8..12].copy_from_slice(&ack.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = flags;
        tcp[14..16].copy_from_slice(&window.to_be_bytes());
        tcp.extend_from_slice(payload);
        ip4(TCP, true, tcp)
    }

    fn seg4(seq: u32, payload: &[u8], flags: u8) -> Vec<u8> {
        seg4w(seq, payload, flags, 7, 0xff00)
    }

    /// The TCP checksum of an IPv4 segment behind Ethernet, as etherparse
    /// computes it, is the one it carries.
    fn tcp_checksum_ok(f: &[u8]) -> bool {
        let (ip, rest) = etherparse::Ipv4Header::from_slice(&f[14..]).unwrap();
        let (t, payload) = etherparse::TcpHeader::from_slice(rest).unwrap();
        ip.header_checksum == ip.calc_header_checksum()
            && t.checksum == t.calc_checksum_ipv4(&ip, payload).unwrap()
    }

    #[test]
    fn consecutive_segments_merge_and_the_result_is_one_valid_gso_packet() {
        let a = seg4(1000, &[1; 100], ACK);
        let b = seg4(1100, &[2; 100], ACK);
        let c = seg4(1200, &[3; 60], ACK | PSH);
        let (sa, sb, sc) = (
            parse(&a, 14, true).unwrap(),
            parse(&b, 14, true).unwrap(),
            parse(&c, 14, true).unwrap(),
        );
        assert!(sa.mergeable && sb.mergeable && sc.mergeable);
        let mut run = Run::start(sa);
        assert!(run.accepts(&sb));
        run.add(&sb);
        assert!(run.accepts(&sc));
        run.add(&sc);
        assert!(run.closed, "PSH ends the run");
        let mut first = a.clone();
        let v = run.finish(&mut first, 14);
        assert_eq!(v.gso_type, GSO_TCPV4);
        assert_eq!(
            (v.hdr_len, v.gso_size, v.csum_start, v.csum_offset),
            (54, 100, 34, 16)
        );
        // The merged packet, checksum completed as the kernel would, is a
        // valid TCP segment carrying all three payloads.
        let mut whole = first.clone();
        whole.extend_from_slice(&b[54..]);
        whole.extend_from_slice(&c[54..]);
        assert_eq!(
            u16::from_be_bytes([whole[16], whole[17]]) as usize,
            whole.len() - 14
        );
        let partial = checksum::sum(&whole[34..]);
        whole[50..52].copy_from_slice(&(!partial).to_be_bytes());
        assert!(tcp_checksum_ok(&whole), "IPv4 and TCP checksums");
        let s = parse(&whole, 14, true).unwrap();
        assert!(s.mergeable, "checksum of the merged packet verifies");
        assert!(s.push);
        assert_eq!(s.payload, 260);
    }

    #[test]
    fn what_gro_would_not_merge_is_refused() {
        let a = parse(&seg4(1000, &[1; 100], ACK), 14, true).unwrap();
        let run = Run::start(a);
        // A gap in sequence numbers.
        assert!(!run.accepts(&parse(&seg4(1200, &[1; 100], ACK), 14, true).unwrap()));
        // Larger than the first.
        assert!(!run.accepts(&parse(&seg4(1100, &[1; 200], ACK), 14, true).unwrap()));
        // FIN, SYN: not mergeable at all.
        assert!(
            !parse(&seg4(1100, &[1; 100], ACK | FIN), 14, true)
                .unwrap()
                .mergeable
        );
        assert!(
            !parse(&seg4(1100, &[1; 100], SYN), 14, true)
                .unwrap()
                .mergeable
        );
        // A bad checksum.
        let mut bad = seg4(1100, &[1; 100], ACK);
        bad[60] ^= 1;
        assert!(!parse(&bad, 14, true).unwrap().mergeable);
        // No payload (a pure ACK).
        assert!(!parse(&seg4(1100, &[], ACK), 14, true).unwrap().mergeable);
        // A different acknowledgement number (a valid segment otherwise).
        let c = parse(&seg4w(1100, &[1; 100], ACK, 8, 0xff00), 14, true).unwrap();
        assert!(c.mergeable);
        assert!(!run.accepts(&c), "another ACK number");
        // A different window: a window update must reach the receiver
        // (tcp_gro_receive compares the flags word, window included).
        let c = parse(&seg4w(1100, &[1; 100], ACK, 7, 0x0100), 14, true).unwrap();
        assert!(c.mergeable);
        assert!(!run.accepts(&c), "another window");
        // The same segment with its window as the first's: taken.
        let c = parse(&seg4w(1100, &[1; 100], ACK, 7, 0xff00), 14, true).unwrap();
        assert!(run.accepts(&c));
        // An IPv4 header with a wrong checksum: never merged (and so never
        // given a right one).
        let mut bad_ip = seg4(1100, &[1; 100], ACK);
        bad_ip[14 + 8] ^= 1;
        assert!(!parse(&bad_ip, 14, true).unwrap().mergeable);
        // Not TCP.
        let mut udp = seg4(1100, &[1; 100], ACK);
        udp[14 + 9] = 17;
        assert!(parse(&udp, 14, false).is_none(), "UDP only when asked for");
        assert!(parse(&udp, 14, true).is_some_and(|s| s.flow.udp));
    }

    /// An IPv4 UDP datagram behind an Ethernet header, checksum right.
    fn udp4(src_port: u16, payload: &[u8]) -> Vec<u8> {
        let mut u = vec![0u8; 8];
        u[0..2].copy_from_slice(&src_port.to_be_bytes());
        u[2..4].copy_from_slice(&9u16.to_be_bytes());
        u[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        u.extend_from_slice(payload);
        ip4(UDP, false, u)
    }

    #[test]
    fn udp_datagrams_of_one_flow_coalesce_into_a_uso_packet_that_segments_back() {
        let (a, b, c) = (
            udp4(1000, &[1; 64]),
            udp4(1000, &[2; 64]),
            udp4(1000, &[3; 20]),
        );
        let (sa, sb, sc) = (
            parse(&a, 14, true).unwrap(),
            parse(&b, 14, true).unwrap(),
            parse(&c, 14, true).unwrap(),
        );
        assert!(sa.mergeable && sb.mergeable && sc.mergeable);
        // Another flow (source port) is another flow.
        let other = parse(&udp4(1001, &[1; 64]), 14, true).unwrap();
        assert_ne!(other.flow, sa.flow);
        let mut run = Run::start(sa);
        assert!(run.accepts(&sb));
        run.add(&sb);
        assert!(run.accepts(&sc));
        run.add(&sc);
        assert!(run.closed, "a shorter datagram ends the run");
        let mut whole = a.clone();
        let v = run.finish(&mut whole, 14);
        whole.extend_from_slice(&b[42..]);
        whole.extend_from_slice(&c[42..]);
        assert_eq!(
            (v.gso_type, v.gso_size, v.csum_offset, v.hdr_len),
            (GSO_UDP_L4, 64, 6, 42)
        );
        // Cut back as the kernel would: the same three datagrams.
        let s = Segmenter::new(&whole, 14, &v).unwrap();
        assert_eq!(s.count(), 3);
        for (i, orig) in [&a, &b, &c].iter().enumerate() {
            let mut out = vec![0u8; 200];
            let n = s.write(i, &mut out);
            assert_eq!(&out[42..n], &orig[42..], "payload {i}");
            assert!(
                parse(&out[..n], 14, true).unwrap().mergeable,
                "checksums of {i}"
            );
        }
        // A bad checksum is not merged.
        let mut bad = udp4(1000, &[1; 64]);
        bad[50] ^= 1;
        assert!(!parse(&bad, 14, true).unwrap().mergeable);
    }

    #[test]
    fn a_short_segment_closes_the_run() {
        let mut run = Run::start(parse(&seg4(0, &[1; 100], ACK), 14, true).unwrap());
        let s = parse(&seg4(100, &[1; 50], ACK), 14, true).unwrap();
        assert!(run.accepts(&s));
        run.add(&s);
        assert!(run.closed);
        assert!(!run.accepts(&parse(&seg4(150, &[1; 50], ACK), 14, true).unwrap()));
    }

    #[test]
    fn a_tso_packet_is_cut_into_valid_segments_that_coalesce_back() {
        let payload: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
        // A 3000-byte GSO packet as the kernel hands it over: partial
        // checksum, PSH on it, gso_size 1000.
        let big = seg4(5000, &payload, ACK | PSH);
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1000,
            csum_start: 34,
            csum_offset: 16,
        };
        let s = Segmenter::new(&big, 14, &h).unwrap();
        assert_eq!(s.count(), 3);
        let mut run: Option<Run> = None;
        let mut data = Vec::new();
        for i in 0..3 {
            let mut out = vec![0u8; 2000];
            let n = s.write(i, &mut out);
            assert_eq!(n, s.len(i));
            let seg = parse(&out[..n], 14, true).unwrap();
            assert!(tcp_checksum_ok(&out[..n]), "segment {i}: checksums");
            assert!(seg.mergeable, "segment {i} valid and plain");
            assert_eq!(seg.seq, 5000 + 1000 * i as u32);
            assert_eq!(seg.push, i == 2, "PSH only on the last");
            assert_eq!(
                u16::from_be_bytes([out[18], out[19]]),
                1 + i as u16,
                "IP ids count up"
            );
            data.extend_from_slice(&out[54..n]);
            match run.as_mut() {
                None => run = Some(Run::start(seg)),
                Some(r) => {
                    assert!(r.accepts(&seg));
                    r.add(&seg);
                }
            }
        }
        assert_eq!(data, payload);
        assert_eq!(run.unwrap().segments, 3);
    }

    #[test]
    fn a_uso_packet_is_cut_into_udp_datagrams() {
        let mut p = seg4(0, &[9; 2500], ACK);
        // Make it UDP: protocol, an 8-byte header where TCP's was.
        p[14 + 9] = UDP;
        p.drain(14 + 20 + 8..14 + 20 + 20);
        let total = (p.len() - 14) as u16;
        p[16..18].copy_from_slice(&total.to_be_bytes());
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_UDP_L4,
            hdr_len: 42,
            gso_size: 1200,
            csum_start: 34,
            csum_offset: 6,
        };
        let s = Segmenter::new(&p, 14, &h).unwrap();
        assert_eq!(s.count(), 3);
        for i in 0..3 {
            let mut out = vec![0u8; 2000];
            let n = s.write(i, &mut out);
            let udp_len = u16::from_be_bytes([out[38], out[39]]) as usize;
            assert_eq!(udp_len, n - 34);
            let flow = Flow {
                v6: false,
                udp: true,
                src: [10, 1, 1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                dst: [10, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                ports: [0; 4],
            };
            let sum = checksum::fold(
                pseudo_proto(&flow, UDP, udp_len) + u64::from(checksum::sum(&out[34..n])),
            );
            assert_eq!(sum, 0xffff, "UDP checksum of datagram {i}");
        }
    }

    #[test]
    fn a_gso_header_that_does_not_match_the_packet_is_refused() {
        let p = seg4(0, &[1; 100], ACK);
        let mut h = VnetHdr {
            gso_type: GSO_TCPV6,
            gso_size: 50,
            ..Default::default()
        };
        assert_eq!(Segmenter::new(&p, 14, &h).err(), Some(BadGso));
        h.gso_type = GSO_TCPV4;
        h.gso_size = 0;
        assert_eq!(Segmenter::new(&p, 14, &h).err(), Some(BadGso));
        assert_eq!(Segmenter::new(&p[..40], 14, &h).err(), Some(BadGso));
        // A TCP data offset under 5 words (found by the fuzzer).
        let mut short = p.clone();
        short[14 + 20 + 12] = 2 << 4;
        h.gso_size = 50;
        assert!(Segmenter::new(&p, 14, &h).is_ok());
        assert_eq!(Segmenter::new(&short, 14, &h).err(), Some(BadGso));
    }

    #[test]
    fn vnet_header_round_trips() {
        let h = VnetHdr {
            flags: 1,
            gso_type: 4,
            hdr_len: 74,
            gso_size: 1348,
            csum_start: 54,
            csum_offset: 16,
        };
        let mut b = [0u8; 10];
        h.emit(&mut b);
        assert_eq!(VnetHdr::parse(&b), Some(h));
    }

    /// A tap frame (etherparse) on VLAN `vid` from `src_mac`, carrying one
    /// datagram of the flow 10.9.9.2:5000 -> 10.9.9.1:6000.
    fn tagged(vid: u16, src_mac: [u8; 6], payload: &[u8]) -> Vec<u8> {
        let b = etherparse::PacketBuilder::ethernet2(src_mac, [2, 0, 0, 0, 0, 1])
            .single_vlan(etherparse::VlanId::try_new(vid).unwrap())
            .ipv4([10, 9, 9, 2], [10, 9, 9, 1], 64)
            .udp(5000, 6000);
        let mut f = Vec::new();
        b.write(&mut f, payload).unwrap();
        f
    }

    #[test]
    fn the_same_ip_flow_on_two_vlans_or_from_two_macs_is_two_flows() {
        let mac = [2, 0, 0, 0, 9, 2];
        let a = parse(&tagged(10, mac, &[1; 64]), 18, true).unwrap();
        let b = parse(&tagged(20, mac, &[2; 64]), 18, true).unwrap();
        let c = parse(&tagged(10, [2, 0, 0, 0, 9, 3], &[3; 64]), 18, true).unwrap();
        let d = parse(&tagged(10, mac, &[4; 64]), 18, true).unwrap();
        assert!(a.mergeable && b.mergeable && c.mergeable && d.mergeable);
        assert_eq!(a.flow, b.flow, "the same IP flow");
        let run = Run::start(a);
        assert!(!run.same_flow(&b), "VLAN 20 joined a VLAN 10 run");
        assert!(!run.accepts(&b));
        assert!(!run.same_flow(&c), "another source MAC joined the run");
        assert!(
            run.same_flow(&d) && run.accepts(&d),
            "the same VLAN and MACs"
        );
    }

    #[test]
    fn garbage_never_panics() {
        let mut x: u32 = 1;
        for len in 0..200 {
            let mut p = vec![0u8; len];
            for b in p.iter_mut() {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                *b = (x >> 16) as u8;
            }
            if len > 14 {
                p[14] = 0x45;
            }
            let _ = parse(&p, 14, true);
            let _ = parse(&p, 0, true);
            for gso_type in [GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4] {
                let h = VnetHdr {
                    gso_type,
                    gso_size: (x % 300) as u16,
                    ..Default::default()
                };
                if let Ok(s) = Segmenter::new(&p, 14, &h) {
                    let mut out = vec![0u8; 4096];
                    for i in 0..s.count().min(8) {
                        s.write(i, &mut out);
                    }
                }
            }
        }
    }
}
