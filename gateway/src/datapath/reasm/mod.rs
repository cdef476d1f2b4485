//! Reassembly of outer IPv4 and IPv6 fragments, sans-IO. A tunnel packet that a
//! router on the way fragmented arrives in pieces; the kernel's GRE and
//! IPIP see it whole (the IP layer reassembles first), and so does the
//! gateway: each worker keeps a small table of incomplete datagrams.
//!
//! Bounded as the kernel bounds its own (and stricter): a fixed number of
//! datagrams in progress per worker and per source, each no larger than a
//! UMEM frame can hold, dropped whole after [`TIMEOUT`] seconds, and
//! dropped whole when fragments overlap (RFC 5722's rule, which Linux also
//! applies to IPv4 since FragmentSmack). A duplicate, a fragment whose
//! bytes all lie inside one run of contiguous fragments already held, is
//! dropped alone and the datagram kept (RFC 5722 errata 3089, Linux's
//! `IPFRAG_DUP`). An IPv6 fragment whose fragment header is followed by
//! another fragment header is refused (RFC 8200 allows one), so nothing
//! [`Reassembler::take`] writes out is a fragment again. Memory is
//! allocated once, at start.

use crate::datapath::drop_reason::DropReason;
use crate::wire::{ethernet, ipv4, ipv6, IpProtocol};

const IPV6_FRAGMENT: u8 = 44;

/// Datagrams in progress per worker.
pub const MAX_DATAGRAMS: usize = 64;
/// Of those, from one source address.
pub const MAX_PER_SOURCE: usize = 16;
/// Longest reassembled IP payload (what still fits a UMEM frame with its
/// headers).
pub const MAX_PAYLOAD: usize = 3800;
/// Seconds a datagram may take to arrive whole (the kernel's
/// `ipfrag_time` is 30).
pub const TIMEOUT: u32 = 30;
/// Most fragments one datagram may come in.
const MAX_FRAGMENTS: usize = 64;
/// Link and IP headers kept from the first fragment.
const MAX_HEADERS: usize = ethernet::HEADER_LEN + 4 + 60;

/// A datagram: addresses (IPv4 in the first 4 bytes), identification,
/// and the protocol after the IP header (IPv6: the fragment header's next
/// header).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Key {
    v6: bool,
    src: [u8; 16],
    dst: [u8; 16],
    id: u32,
    proto: u8,
}

struct Datagram {
    /// In use (slots and their buffers are allocated once and reused).
    active: bool,
    key: Key,
    deadline: u32,
    /// Fragments held (their bytes copied here).
    held: u32,
    /// Byte ranges of the payload received, `start..end`.
    ranges: Vec<(u16, u16)>,
    /// Runs of fragments as Linux keeps them (`frag_run_len`): a fragment
    /// that arrives right at the end of the last one extends its run; any
    /// other starts a run of its own.
    runs: Vec<(u16, u16)>,
    /// End of the furthest fragment so far (Linux's `fragments_tail`).
    tail_end: u16,
    /// Payload length, once the last fragment came.
    total: Option<u16>,
    /// The first fragment's link and IP headers (`header_len` of them).
    headers: [u8; MAX_HEADERS],
    header_len: usize,
    /// Where the IP header starts in `headers`.
    l3: usize,
    payload: Vec<u8>,
}

/// What became of a fragment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Kept; the datagram is not whole yet.
    Held,
    /// The datagram is whole: [`Reassembler::take`] writes it out. It
    /// absorbed `merged` fragments besides this one.
    Complete { merged: u32 },
    /// Dropped: this fragment and `also` held ones of its datagram (a
    /// [`DropReason::FragmentDuplicate`] drops this fragment alone and
    /// keeps the datagram: `also` is 0).
    Dropped { reason: DropReason, also: u32 },
}

/// Where a fragment goes among a datagram's runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// Right after the furthest fragment: its run grows.
    AppendToTail,
    /// A run of its own.
    NewRun,
    Duplicate,
    Overlap,
}

/// Linux's `inet_frag_queue_insert`, over the runs (`start..end`) held and
/// the end of the furthest fragment (0: none yet).
fn place_in_runs(runs: &[(u16, u16)], tail_end: u16, start: u16, end: u16) -> Place {
    if runs.is_empty() {
        return Place::NewRun;
    }
    if end > tail_end {
        // The common case: past everything held.
        return match start.cmp(&tail_end) {
            std::cmp::Ordering::Less => Place::Overlap,
            std::cmp::Ordering::Equal => Place::AppendToTail,
            std::cmp::Ordering::Greater => Place::NewRun,
        };
    }
    for &(a, b) in runs {
        if end <= a || start >= b {
            continue;
        }
        return if start >= a && end <= b {
            Place::Duplicate
        } else {
            Place::Overlap
        };
    }
    Place::NewRun
}

pub struct Reassembler {
    slots: Vec<Datagram>,
    /// Index of the datagram completed last, for `take`.
    done: Option<usize>,
}

impl Default for Reassembler {
    fn default() -> Self {
        Self::new()
    }
}

impl Reassembler {
    pub fn new() -> Reassembler {
        Reassembler {
            slots: (0..MAX_DATAGRAMS)
                .map(|_| Datagram {
                    active: false,
                    key: Key {
                        v6: false,
                        src: [0; 16],
                        dst: [0; 16],
                        id: 0,
                        proto: 0,
                    },
                    deadline: 0,
                    held: 0,
                    ranges: Vec::with_capacity(MAX_FRAGMENTS),
                    runs: Vec::with_capacity(MAX_FRAGMENTS),
                    tail_end: 0,
                    total: None,
                    headers: [0; MAX_HEADERS],
                    header_len: 0,
                    l3: 0,
                    payload: vec![0; MAX_PAYLOAD],
                })
                .collect(),
            done: None,
        }
    }

    /// Forgets every datagram in progress (the buffers stay allocated).
    pub fn clear(&mut self) {
        for d in &mut self.slots {
            d.active = false;
        }
        self.done = None;
    }

    /// Fragments held now, over all datagrams.
    pub fn pending(&self) -> u64 {
        self.slots
            .iter()
            .filter(|d| d.active)
            .map(|d| u64::from(d.held))
            .sum()
    }

    /// Drops datagrams past their deadline; returns how many fragments
    /// they held.
    pub fn expire(&mut self, now: u32) -> u32 {
        let mut n = 0;
        for d in &mut self.slots {
            if d.active && d.deadline <= now {
                d.active = false;
                n += d.held;
            }
        }
        n
    }

    /// Takes one outer IPv4 fragment (a whole Ethernet frame).
    pub fn add(&mut self, frame: &[u8], now: u32) -> Outcome {
        let drop = |reason| Outcome::Dropped { reason, also: 0 };
        let Ok(eth) = ethernet::Frame::new_checked(frame) else {
            return drop(DropReason::Truncated);
        };
        let (key, l3, hl, data, start, last) = match eth.network() {
            Ok((ethernet::EtherType::Ipv4, l3)) => {
                let Ok(ip) = ipv4::Packet::new_checked(&frame[l3..]) else {
                    return drop(DropReason::OuterMalformed);
                };
                if !ip.verify_checksum() {
                    return drop(DropReason::OuterChecksum);
                }
                let hl = ip.header_len();
                let b = &frame[l3..];
                let mut key = Key {
                    v6: false,
                    src: [0; 16],
                    dst: [0; 16],
                    id: u32::from(ip.ident()),
                    proto: b[9],
                };
                key.src[..4].copy_from_slice(&b[12..16]);
                key.dst[..4].copy_from_slice(&b[16..20]);
                // Tunnel packets only (decap sends nothing else here).
                if !matches!(key.proto, 47 | 4 | 41) {
                    return drop(DropReason::NotTunnelProtocol);
                }
                let data = &frame[l3 + hl..l3 + usize::from(ip.total_len())];
                let start = usize::from(ip.frag_offset());
                (key, l3, hl, data, start, !ip.more_frags())
            }
            Ok((ethernet::EtherType::Ipv6, l3)) => {
                // The fragment header right after the fixed header (what a
                // tunnel endpoint that fragments its own packets sends).
                let Ok(ip) = ipv6::Packet::new_checked(&frame[l3..]) else {
                    return drop(DropReason::OuterMalformed);
                };
                let end = l3 + ip.total_len();
                let f = l3 + ipv6::HEADER_LEN;
                if u8::from(ip.next_header()) != IPV6_FRAGMENT || end < f + 8 {
                    return drop(DropReason::OuterIpv6ExtHeader);
                }
                let h = &frame[f..f + 8];
                let offset_flags = u16::from_be_bytes([h[2], h[3]]);
                let key = Key {
                    v6: true,
                    src: ip.src_addr().octets(),
                    dst: ip.dst_addr().octets(),
                    id: u32::from_be_bytes([h[4], h[5], h[6], h[7]]),
                    proto: h[0],
                };
                if key.proto == IPV6_FRAGMENT {
                    // A fragment header in a fragment: RFC 8200 allows one
                    // (Linux answers a parameter problem). Its datagram,
                    // whatever header it says follows, goes too.
                    return self.drop_nested(key);
                }
                // Tunnel packets only: GRE, IPv4 or IPv6 in IPv6, or the
                // destination options (encapsulation limit) in front of them.
                if !matches!(key.proto, 47 | 4 | 41 | 60) {
                    return drop(DropReason::NotTunnelProtocol);
                }
                let start = usize::from(offset_flags & 0xfff8);
                let data = &frame[f + 8..end];
                (
                    key,
                    l3,
                    ipv6::HEADER_LEN,
                    data,
                    start,
                    offset_flags & 1 == 0,
                )
            }
            _ => return drop(DropReason::NotIp),
        };
        let end = start + data.len();
        // Every fragment but the last carries a multiple of 8 bytes.
        if (!last && !data.len().is_multiple_of(8)) || data.is_empty() {
            return self.drop_datagram(key, DropReason::FragmentMalformed);
        }
        if end > MAX_PAYLOAD {
            return self.drop_datagram(key, DropReason::FragmentTooBig);
        }
        let i = match self.find(&key) {
            Some(i) => i,
            None => match self.open(key, now) {
                Ok(i) => i,
                Err(reason) => return drop(reason),
            },
        };
        let d = &mut self.slots[i];
        let (s16, e16) = (start as u16, end as u16);
        // As Linux's ip_frag_queue: the end first (a last fragment must
        // agree with the total and with what is held), then the bytes.
        let past_end = d.total.is_some_and(|t| e16 > t);
        let ends_early = last && d.ranges.iter().any(|&(_, b)| b > e16);
        let other_last = last && d.total.is_some_and(|t| t != e16);
        if past_end || ends_early || other_last {
            return self.drop_datagram(key, DropReason::FragmentMalformed);
        }
        // Then the bytes, as Linux's inet_frag_queue_insert: a fragment
        // that inside one run is a duplicate (IPFRAG_DUP), dropped alone,
        // the datagram untouched; one that reaches into held bytes
        // otherwise is an overlap (IPFRAG_OVERLAP), and the whole datagram
        // goes.
        let place = match place_in_runs(&d.runs, d.tail_end, s16, e16) {
            Place::Duplicate => return drop(DropReason::FragmentDuplicate),
            Place::Overlap => return self.drop_datagram(key, DropReason::FragmentOverlap),
            p => p,
        };
        if d.ranges.len() >= MAX_FRAGMENTS {
            return self.drop_datagram(key, DropReason::FragmentMalformed);
        }
        match place {
            Place::AppendToTail => {
                if let Some(r) = d.runs.iter_mut().find(|r| r.1 == d.tail_end) {
                    r.1 = e16;
                }
            }
            _ => d.runs.push((s16, e16)),
        }
        d.tail_end = d.tail_end.max(e16);
        d.payload[start..end].copy_from_slice(data);
        d.ranges.push((s16, e16));
        if last {
            d.total = Some(e16);
        }
        if start == 0 {
            let n = l3 + hl;
            d.headers[..n].copy_from_slice(&frame[..n]);
            d.header_len = n;
            d.l3 = l3;
        }
        let have: usize = d.ranges.iter().map(|&(a, b)| usize::from(b - a)).sum();
        if d.total.is_some_and(|t| usize::from(t) == have) && d.header_len > 0 {
            let merged = d.held;
            // No longer held: merged into the datagram `take` writes out.
            d.held = 0;
            self.done = Some(i);
            return Outcome::Complete { merged };
        }
        d.held += 1;
        Outcome::Held
    }

    /// Writes the datagram just completed into `out` as one unfragmented
    /// Ethernet frame, and forgets it. Returns its length, or `None` when
    /// it does not fit.
    ///
    /// What it writes is never a fragment: IPv4 comes out with MF and
    /// offset cleared, IPv6 with the fragment header gone and the next
    /// header it named in its place, which cannot be a fragment header
    /// again ([`Reassembler::add`] refuses those). The worker hands the
    /// datagram back to decapsulation, so this is what keeps it from
    /// coming back here. Checked again below, without panicking: a frame
    /// that would break it is not written (`None`).
    pub fn take(&mut self, out: &mut [u8]) -> Option<usize> {
        let d = &mut self.slots[self.done.take()?];
        d.active = false;
        let total = usize::from(d.total?);
        let len = d.header_len + total;
        if len > out.len() {
            return None;
        }
        out[..d.header_len].copy_from_slice(&d.headers[..d.header_len]);
        out[d.header_len..len].copy_from_slice(&d.payload[..total]);
        if d.key.v6 {
            if d.key.proto == IPV6_FRAGMENT {
                return None;
            }
            // The fragment header goes; what it said follows the header.
            let mut ip = ipv6::Packet::new_unchecked(&mut out[d.l3..len]);
            ip.set_next_header(IpProtocol::from(d.key.proto));
            ip.set_payload_len(total as u16);
        } else {
            let mut ip = ipv4::Packet::new_unchecked(&mut out[d.l3..len]);
            let dont_frag = ip.dont_frag();
            ip.set_total_len((len - d.l3) as u16);
            ip.set_unfragmented(dont_frag);
            ip.fill_checksum();
            if ip.is_fragment() {
                return None;
            }
        }
        Some(len)
    }

    fn find(&self, key: &Key) -> Option<usize> {
        self.slots.iter().position(|d| d.active && d.key == *key)
    }

    fn open(&mut self, key: Key, now: u32) -> Result<usize, DropReason> {
        let from_source = self
            .slots
            .iter()
            .filter(|d| d.active && d.key.src == key.src)
            .count();
        if from_source >= MAX_PER_SOURCE {
            return Err(DropReason::FragmentTableFull);
        }
        let i = self
            .slots
            .iter()
            .position(|d| !d.active)
            .ok_or(DropReason::FragmentTableFull)?;
        let d = &mut self.slots[i];
        d.active = true;
        d.key = key;
        d.deadline = now.saturating_add(TIMEOUT);
        d.held = 0;
        d.ranges.clear();
        d.runs.clear();
        d.tail_end = 0;
        d.total = None;
        d.header_len = 0;
        d.l3 = 0;
        Ok(i)
    }

    /// Drops a nested IPv6 fragment (its next header a fragment header)
    /// and the datagram of its addresses and identification, if any.
    fn drop_nested(&mut self, key: Key) -> Outcome {
        let mut also = 0;
        for d in &mut self.slots {
            let k = &d.key;
            if d.active && k.v6 && k.src == key.src && k.dst == key.dst && k.id == key.id {
                d.active = false;
                also += d.held;
            }
        }
        Outcome::Dropped {
            reason: DropReason::FragmentMalformed,
            also,
        }
    }

    /// Drops the datagram `key` (if any) with this fragment.
    fn drop_datagram(&mut self, key: Key, reason: DropReason) -> Outcome {
        let also = match self.find(&key) {
            Some(i) => {
                self.slots[i].active = false;
                self.slots[i].held
            }
            None => 0,
        };
        Outcome::Dropped { reason, also }
    }
}

#[cfg(test)]
mod tests;
