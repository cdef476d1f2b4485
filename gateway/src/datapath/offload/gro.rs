//! Coalescing (GRO done in the gateway): which segments of an RX batch
//! may join one run, and the headers that make a run one GSO packet for
//! the kernel. The rules are in the parent module's documentation.

use super::{
    pseudo_proto, set_ip_len, Checksum, Lengths, ACK, CWR, FIN, PSH, RST, SYN, TCP, UDP, URG,
};
use crate::wire::checksum;
use crate::wire::vnet::{VnetHdr, F_NEEDS_CSUM, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4};

/// Most bytes one coalesced packet carries after its link header (the
/// IPv4 total length field's limit).
pub const MAX_MERGED: usize = 65535;
/// Most segments in one coalesced packet.
pub const MAX_SEGMENTS: u16 = 64;

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

fn checksum_ok(pkt: &[u8], seg: &Segment) -> bool {
    let tcp = &pkt[seg.l4..];
    checksum::fold(pseudo_proto(&seg.flow, TCP, tcp.len()) + u64::from(checksum::sum(tcp)))
        == 0xffff
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
