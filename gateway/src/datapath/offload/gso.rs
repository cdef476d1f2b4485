//! Segmentation (TSO/USO done in the gateway): a large packet read from a
//! device cut into tunnel-MTU packets, each with its own headers and
//! checksums, as the kernel's GSO would; and completing a checksum the
//! kernel left partial.

use super::{pseudo_proto, set_ip_len, Checksum, Flow, Lengths, CWR, FIN, PSH, TCP, UDP};
use crate::wire::checksum;
use crate::wire::vnet::{VnetHdr, F_NEEDS_CSUM, GSO_ECN, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4};

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
    /// [`GSO_NONE`](crate::wire::vnet::GSO_NONE).
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
