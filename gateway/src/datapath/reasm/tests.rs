//! Unit tests of reassembly: orders, overlaps, duplicates, bounds, IPv6.
//!
//! The packets here are built, and what comes out is read, by
//! etherparse, not by the gateway's own wire code.

use super::*;
use etherparse::{
    EtherType, Ethernet2Header, IpFragOffset, IpNumber, Ipv4Header, Ipv6FragmentHeader, Ipv6Header,
};

const SRC4: [u8; 4] = [192, 168, 0, 58];
const DST4: [u8; 4] = [192, 168, 0, 8];

fn ethernet(ether_type: EtherType) -> Vec<u8> {
    let mut f = Vec::new();
    Ethernet2Header {
        destination: [2, 0, 0, 0, 0, 8],
        source: [2, 0, 0, 0, 0, 0x58],
        ether_type,
    }
    .write(&mut f)
    .unwrap();
    f
}

/// One IPv4 (GRE) fragment: `data` at byte `offset`, MF as `more`.
fn fragment(data: &[u8], offset: usize, more: bool, id: u16) -> Vec<u8> {
    assert_eq!(offset % 8, 0, "offsets count 8-byte units");
    let mut h = Ipv4Header::new(data.len() as u16, 64, IpNumber::GRE, SRC4, DST4).unwrap();
    h.identification = id;
    h.dont_fragment = false;
    h.more_fragments = more;
    h.fragment_offset = IpFragOffset::try_new((offset / 8) as u16).unwrap();
    h.header_checksum = h.calc_header_checksum();
    let mut f = ethernet(EtherType::IPV4);
    h.write(&mut f).unwrap();
    f.extend_from_slice(data);
    f
}

/// `payload` as IPv4 fragments of `size` bytes (the last shorter),
/// each a whole Ethernet frame.
fn fragments(payload: &[u8], size: usize, id: u16) -> Vec<Vec<u8>> {
    (0..payload.len())
        .step_by(size)
        .map(|off| {
            let end = (off + size).min(payload.len());
            fragment(&payload[off..end], off, end < payload.len(), id)
        })
        .collect()
}

/// One IPv6 fragment: `data` (what follows the fragment header) at
/// byte `offset`, M as `more`, the fragment header's next header
/// `next`.
fn fragment6(data: &[u8], offset: usize, more: bool, id: u32, next: u8) -> Vec<u8> {
    assert_eq!(offset % 8, 0, "offsets count 8-byte units");
    let ip = Ipv6Header {
        payload_length: (Ipv6FragmentHeader::LEN + data.len()) as u16,
        next_header: IpNumber::IPV6_FRAGMENTATION_HEADER,
        hop_limit: 64,
        source: "2001:db8::58"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
        destination: "2001:db8::8"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
        ..Default::default()
    };
    let frag = Ipv6FragmentHeader::new(
        IpNumber(next),
        IpFragOffset::try_new((offset / 8) as u16).unwrap(),
        more,
        id,
    );
    let mut f = ethernet(EtherType::IPV6);
    ip.write(&mut f).unwrap();
    frag.write(&mut f).unwrap();
    f.extend_from_slice(data);
    f
}

/// `payload` (what follows the fragment header) as IPv6 fragments.
fn fragments6(payload: &[u8], size: usize, id: u32, next: u8) -> Vec<Vec<u8>> {
    (0..payload.len())
        .step_by(size)
        .map(|off| {
            let end = (off + size).min(payload.len());
            fragment6(&payload[off..end], off, end < payload.len(), id, next)
        })
        .collect()
}

fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + 3) as u8).collect()
}

/// The IPv4 datagram just completed, checked whole and unfragmented
/// by etherparse; returns its payload.
fn take4(r: &mut Reassembler) -> Vec<u8> {
    let mut out = vec![0u8; 4096];
    let n = r.take(&mut out).unwrap();
    let (h, rest) = Ipv4Header::from_slice(&out[Ethernet2Header::LEN..n]).unwrap();
    assert!(!h.more_fragments && h.fragment_offset.value() == 0);
    assert_eq!(h.calc_header_checksum(), h.header_checksum);
    assert_eq!(h.protocol, IpNumber::GRE);
    assert_eq!(usize::from(h.total_len), n - Ethernet2Header::LEN);
    rest.to_vec()
}

/// The IPv6 datagram just completed, read by etherparse: its next
/// header and payload.
fn take6(r: &mut Reassembler) -> (IpNumber, Vec<u8>) {
    let mut out = vec![0u8; 4096];
    let n = r.take(&mut out).unwrap();
    let (h, rest) = Ipv6Header::from_slice(&out[Ethernet2Header::LEN..n]).unwrap();
    assert_eq!(usize::from(h.payload_length), rest.len());
    (h.next_header, rest.to_vec())
}

#[test]
fn in_order_and_out_of_order_come_out_whole() {
    let p = payload(2000);
    for order in [vec![0, 1, 2], vec![2, 0, 1], vec![1, 2, 0]] {
        let frags = fragments(&p, 800, 42);
        let mut r = Reassembler::new();
        let mut outcomes = Vec::new();
        for &i in &order {
            outcomes.push(r.add(&frags[i], 0));
        }
        assert_eq!(&outcomes[..2], &[Outcome::Held, Outcome::Held]);
        assert_eq!(outcomes[2], Outcome::Complete { merged: 2 });
        assert_eq!(r.pending(), 0);
        assert_eq!(take4(&mut r), p);
    }
}

#[test]
fn overlapping_oversized_and_stale_trains_are_dropped_whole() {
    let p = payload(2000);
    let frags = fragments(&p, 800, 7);
    let mut r = Reassembler::new();
    assert_eq!(r.add(&frags[0], 0), Outcome::Held);
    // Part of the same bytes and part new: an overlap, the whole
    // train goes.
    assert_eq!(
        r.add(&fragment(&p[400..1200], 400, true, 7), 0),
        Outcome::Dropped {
            reason: DropReason::FragmentOverlap,
            also: 1
        }
    );
    assert_eq!(r.pending(), 0);
    // Larger than a frame can hold.
    let big = fragments(&payload(MAX_PAYLOAD + 800), 800, 8);
    let mut outcome = Outcome::Held;
    for f in &big {
        outcome = r.add(f, 0);
        if outcome != Outcome::Held {
            break;
        }
    }
    assert!(matches!(
        outcome,
        Outcome::Dropped {
            reason: DropReason::FragmentTooBig,
            ..
        }
    ));
    assert_eq!(r.pending(), 0);
    // Never completed: gone after the timeout, counted.
    assert_eq!(r.add(&frags[1], 0), Outcome::Held);
    assert_eq!(r.expire(TIMEOUT - 1), 0);
    assert_eq!(r.expire(TIMEOUT), 1);
    assert_eq!(r.pending(), 0);
}

#[test]
fn memory_stays_bounded() {
    let p = payload(1600);
    let mut r = Reassembler::new();
    let mut full = 0;
    for id in 0..200u16 {
        if let Outcome::Dropped { reason, .. } = r.add(&fragments(&p, 800, id)[0], 0) {
            assert_eq!(reason, DropReason::FragmentTableFull);
            full += 1;
        }
    }
    // One source gets MAX_PER_SOURCE datagrams in progress, no more.
    assert_eq!(r.pending(), MAX_PER_SOURCE as u64);
    assert_eq!(full, 200 - MAX_PER_SOURCE);
}

const DUPLICATE: Outcome = Outcome::Dropped {
    reason: DropReason::FragmentDuplicate,
    also: 0,
};

#[test]
fn an_exact_duplicate_is_dropped_alone_and_the_datagram_completes() {
    let p = payload(2000);
    let frags = fragments(&p, 800, 9);
    let mut r = Reassembler::new();
    assert_eq!(r.add(&frags[0], 0), Outcome::Held);
    assert_eq!(r.add(&frags[0], 0), DUPLICATE);
    assert_eq!(r.pending(), 1);
    assert_eq!(r.add(&frags[1], 0), Outcome::Held);
    assert_eq!(r.add(&frags[1], 0), DUPLICATE);
    assert_eq!(r.add(&frags[0], 0), DUPLICATE);
    assert_eq!(r.pending(), 2);
    assert_eq!(r.add(&frags[2], 0), Outcome::Complete { merged: 2 });
    assert_eq!(r.pending(), 0);
    assert_eq!(take4(&mut r), p);
}

#[test]
fn a_fragment_inside_a_run_of_held_ones_is_a_duplicate() {
    let p = payload(48);
    let mut r = Reassembler::new();
    // [0,16) then [16,32), in order: Linux appends the second to the
    // first's run, [0,32).
    assert_eq!(r.add(&fragment(&p[0..16], 0, true, 3), 0), Outcome::Held);
    assert_eq!(r.add(&fragment(&p[16..32], 16, true, 3), 0), Outcome::Held);
    // [8,24) straddles the two, inside the run.
    assert_eq!(r.add(&fragment(&p[8..24], 8, true, 3), 0), DUPLICATE);
    // So is the whole run at once.
    assert_eq!(r.add(&fragment(&p[0..32], 0, true, 3), 0), DUPLICATE);
    assert_eq!(r.pending(), 2);
    assert_eq!(
        r.add(&fragment(&p[32..48], 32, false, 3), 0),
        Outcome::Complete { merged: 2 }
    );
    assert_eq!(take4(&mut r), p);
}

#[test]
fn out_of_order_fragments_are_runs_of_their_own_as_in_linux() {
    let p = payload(48);
    let mut r = Reassembler::new();
    // [16,32) first, then [0,16): each a run of its own (Linux only
    // grows the run at the tail), so [8,24), inside neither, is an
    // overlap and the datagram goes; [0,16) again is a duplicate.
    assert_eq!(r.add(&fragment(&p[16..32], 16, true, 5), 0), Outcome::Held);
    assert_eq!(r.add(&fragment(&p[0..16], 0, true, 5), 0), Outcome::Held);
    assert_eq!(r.add(&fragment(&p[0..16], 0, true, 5), 0), DUPLICATE);
    assert_eq!(
        r.add(&fragment(&p[8..24], 8, true, 5), 0),
        Outcome::Dropped {
            reason: DropReason::FragmentOverlap,
            also: 2
        }
    );
    assert_eq!(r.pending(), 0);
    // Reaching back into the tail's bytes from past it: an overlap.
    assert_eq!(r.add(&fragment(&p[0..16], 0, true, 6), 0), Outcome::Held);
    assert_eq!(
        r.add(&fragment(&p[8..24], 8, true, 6), 0),
        Outcome::Dropped {
            reason: DropReason::FragmentOverlap,
            also: 1
        }
    );
}

#[test]
fn a_partial_overlap_drops_the_whole_datagram() {
    let p = payload(40);
    let mut r = Reassembler::new();
    assert_eq!(r.add(&fragment(&p[0..8], 0, true, 4), 0), Outcome::Held);
    assert_eq!(r.add(&fragment(&p[8..16], 8, true, 4), 0), Outcome::Held);
    assert_eq!(r.add(&fragment(&p[24..32], 24, true, 4), 0), Outcome::Held);
    // [8,24) starts in the run [0,16) but runs past it into the hole:
    // not inside one run, an overlap.
    assert_eq!(
        r.add(&fragment(&p[8..24], 8, true, 4), 0),
        Outcome::Dropped {
            reason: DropReason::FragmentOverlap,
            also: 3
        }
    );
    assert_eq!(r.pending(), 0);
    // Across a hole, touching two runs: an overlap too.
    assert_eq!(r.add(&fragment(&p[0..8], 0, true, 5), 0), Outcome::Held);
    assert_eq!(r.add(&fragment(&p[16..24], 16, true, 5), 0), Outcome::Held);
    assert_eq!(
        r.add(&fragment(&p[0..24], 0, true, 5), 0),
        Outcome::Dropped {
            reason: DropReason::FragmentOverlap,
            also: 2
        }
    );
    assert_eq!(r.pending(), 0);
}

#[test]
fn a_duplicate_last_fragment_is_a_duplicate_another_last_is_malformed() {
    let p = payload(2000);
    let frags = fragments(&p, 800, 11);
    let mut r = Reassembler::new();
    assert_eq!(r.add(&frags[2], 0), Outcome::Held);
    assert_eq!(r.add(&frags[2], 0), DUPLICATE);
    assert_eq!(r.add(&frags[0], 0), Outcome::Held);
    assert_eq!(r.add(&frags[2], 0), DUPLICATE);
    assert_eq!(r.pending(), 2);
    assert_eq!(r.add(&frags[1], 0), Outcome::Complete { merged: 2 });
    assert_eq!(take4(&mut r), p);

    // A last fragment ending elsewhere than the first said, even
    // inside what is held, is malformed: the datagram goes.
    assert_eq!(r.add(&frags[0], 0), Outcome::Held);
    assert_eq!(r.add(&frags[2], 0), Outcome::Held);
    assert_eq!(
        r.add(&fragment(&p[1600..1608], 1600, false, 11), 0),
        Outcome::Dropped {
            reason: DropReason::FragmentMalformed,
            also: 2
        }
    );
    assert_eq!(r.pending(), 0);
}

#[test]
fn ipv6_fragments_come_out_whole_without_their_fragment_header() {
    let p = payload(1500);
    let frags = fragments6(&p, 600, 99, 60);
    let mut r = Reassembler::new();
    assert_eq!(r.add(&frags[2], 0), Outcome::Held);
    assert_eq!(r.add(&frags[0], 0), Outcome::Held);
    assert_eq!(r.add(&frags[0], 0), DUPLICATE);
    assert_eq!(r.add(&frags[1], 0), Outcome::Complete { merged: 2 });
    let (next, rest) = take6(&mut r);
    assert_eq!(next, IpNumber(60));
    assert_eq!(rest, p);
}

#[test]
fn a_completed_ipv6_datagram_says_the_inner_protocol() {
    for inner in [IpNumber::GRE, IpNumber::IPV4, IpNumber::IPV6] {
        let p = payload(1200);
        let frags = fragments6(&p, 600, 5, inner.0);
        let mut r = Reassembler::new();
        assert_eq!(r.add(&frags[1], 0), Outcome::Held);
        assert_eq!(r.add(&frags[0], 0), Outcome::Complete { merged: 1 });
        let (next, rest) = take6(&mut r);
        assert_eq!(next, inner);
        assert_ne!(next, IpNumber::IPV6_FRAGMENTATION_HEADER);
        assert_eq!(rest, p);
    }
}

#[test]
fn a_fragment_header_after_a_fragment_header_is_refused() {
    let p = payload(1200);
    let mut r = Reassembler::new();
    // Every piece of a datagram nested this way is refused: nothing is
    // held, nothing completes.
    for f in fragments6(&p, 600, 6, 44) {
        assert_eq!(
            r.add(&f, 0),
            Outcome::Dropped {
                reason: DropReason::FragmentMalformed,
                also: 0
            }
        );
    }
    assert_eq!(r.pending(), 0);
    // One arriving for a datagram in progress takes it along.
    let frags = fragments6(&p, 600, 7, 47);
    assert_eq!(r.add(&frags[0], 0), Outcome::Held);
    assert_eq!(
        r.add(&fragment6(&p[600..], 600, false, 7, 44), 0),
        Outcome::Dropped {
            reason: DropReason::FragmentMalformed,
            also: 1
        }
    );
    assert_eq!(r.pending(), 0);
    assert_eq!(r.take(&mut [0u8; 4096]), None);
}
