//! Any bytes as a run of received outer fragments: reassembly must hold,
//! complete or drop each, never panic, never hold more than its bounds or
//! lose count of what it holds, and never write out a fragment.
//!
//! The input is a list of operations, each led by one byte `op`
//! (`op >> 6` seconds pass after it):
//! - `op % 4 == 0`, `n`, `n * 8` bytes: a raw frame, any bytes;
//! - `op % 4 == 1`: one fragment built from the next bytes, IPv4 or IPv6,
//!   any offset, length and flags, sometimes a fragment header in an IPv6
//!   fragment (next header 44);
//! - otherwise: a train, one datagram cut in pieces sent in the order the
//!   input says, pieces repeated (duplicates), widened into their
//!   neighbours (overlaps), some with next header 44.
//!
//! Built fragments (and trains) sometimes carry a VLAN tag: each of those
//! must be refused as `not_ip`, the underlay's frames coming untagged.
#![no_main]

use std::cell::RefCell;

use gateway::datapath::drop_reason::DropReason;
use gateway::datapath::reasm::{Outcome, Reassembler, MAX_DATAGRAMS};
use libfuzzer_sys::fuzz_target;

thread_local! {
    // Allocated once, as in a worker; cleared for each input.
    static R: RefCell<Reassembler> = RefCell::new(Reassembler::new());
}

fuzz_target!(|data: &[u8]| {
    R.with(|r| run(&mut r.borrow_mut(), data));
});

/// The input, read a byte at a time (zeros once it runs out).
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        b
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.byte(), self.byte()])
    }

    fn bytes(&mut self, n: usize) -> &[u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }
}

/// One fragment to build.
struct Frag {
    v6: bool,
    vlan: bool,
    /// Second source address (the per-source bound).
    other_source: bool,
    id: u32,
    /// IPv4 protocol, or the IPv6 fragment header's next header.
    next: u8,
    /// Byte offset in the datagram's payload.
    offset: usize,
    len: usize,
    more: bool,
}

const FRAGMENT_HEADER: u8 = 44;

/// The protocol a fragment says it carries, from an input byte: mostly one
/// reassembly takes (GRE, IPIP, IPv6 in IP, and for IPv6 the destination
/// options in front of them), sometimes anything (refused).
fn protocol(b: u8) -> u8 {
    match b % 8 {
        0 | 1 => 47,
        2 => 4,
        3 => 41,
        4 => 60,
        _ => b,
    }
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// `f` as a whole Ethernet frame in `out`, its payload bytes a function
/// of their place in the datagram (a repeated piece says the same).
fn build(f: &Frag, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&[2, 0, 0, 0, 0, 8, 2, 0, 0, 0, 0, 0x58]);
    if f.vlan {
        out.extend_from_slice(&[0x81, 0, 0, 7]);
    }
    let s = u8::from(f.other_source);
    let units = ((f.offset / 8) & 0x1fff) as u16;
    if f.v6 {
        out.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
        out.extend_from_slice(&((8 + f.len) as u16).to_be_bytes());
        out.extend_from_slice(&[FRAGMENT_HEADER, 64]);
        out.extend_from_slice(&[0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, s, 0x58]);
        out.extend_from_slice(&[0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 8]);
        out.extend_from_slice(&[f.next, 0]);
        out.extend_from_slice(&(units << 3 | u16::from(f.more)).to_be_bytes());
        out.extend_from_slice(&f.id.to_be_bytes());
    } else {
        out.extend_from_slice(&[8, 0]);
        let l3 = out.len();
        out.extend_from_slice(&[0x45, 0]);
        out.extend_from_slice(&((20 + f.len) as u16).to_be_bytes());
        out.extend_from_slice(&(f.id as u16).to_be_bytes());
        out.extend_from_slice(&(u16::from(f.more) << 13 | units).to_be_bytes());
        out.extend_from_slice(&[64, f.next, 0, 0, 192, 168, s, 58, 192, 168, 0, 8]);
        let c = checksum(&out[l3..]);
        out[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
    }
    out.extend((0..f.len).map(|i| (f.offset + i) as u8 ^ 0x5a));
}

/// Where the IP header of `frame` (untagged) starts, and whether it is
/// IPv6.
fn network(frame: &[u8]) -> Option<(bool, usize)> {
    match frame.get(12..14)? {
        [8, 0] => Some((false, 14)),
        [0x86, 0xdd] => Some((true, 14)),
        _ => None,
    }
}

/// What `take` wrote out: one whole datagram, not a fragment.
fn check_taken(frame: &[u8]) {
    let (v6, l3) = network(frame).expect("an IP datagram");
    let ip = &frame[l3..];
    if v6 {
        assert!(ip.len() >= 40);
        assert_ne!(ip[6], FRAGMENT_HEADER, "a fragment again");
        assert_eq!(
            usize::from(u16::from_be_bytes([ip[4], ip[5]])),
            ip.len() - 40
        );
    } else {
        assert!(ip.len() >= 20);
        let hl = usize::from(ip[0] & 0xf) * 4;
        assert!(hl >= 20 && ip.len() >= hl);
        assert_eq!(
            u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff,
            0,
            "a fragment again"
        );
        assert_eq!(usize::from(u16::from_be_bytes([ip[2], ip[3]])), ip.len());
        assert_eq!(checksum(&ip[..hl]), 0);
    }
}

struct State {
    /// Fragments held, as counted from the outcomes.
    held: u64,
    now: u32,
    frame: Vec<u8>,
    out: Vec<u8>,
}

impl State {
    /// Adds `frame`; `nested` when it was built as an IPv6 fragment whose
    /// next header is a fragment header, `tagged` when with a VLAN tag
    /// (a VLAN's frame, refused first: the underlay's come untagged).
    fn add(&mut self, r: &mut Reassembler, nested: bool, tagged: bool) {
        let outcome = r.add(&self.frame, self.now);
        if tagged {
            assert!(
                matches!(
                    outcome,
                    Outcome::Dropped {
                        reason: DropReason::NotIp,
                        also: 0
                    }
                ),
                "tagged fragment {outcome:?}"
            );
        } else if nested {
            assert!(
                matches!(
                    outcome,
                    Outcome::Dropped {
                        reason: DropReason::FragmentMalformed,
                        ..
                    }
                ),
                "nested fragment {outcome:?}"
            );
        }
        match outcome {
            Outcome::Held => self.held += 1,
            Outcome::Dropped { reason, also } => {
                if reason == DropReason::FragmentDuplicate {
                    assert_eq!(also, 0, "a duplicate drops itself alone");
                }
                self.held = self.held.checked_sub(u64::from(also)).expect("also");
            }
            Outcome::Complete { merged } => {
                self.held = self.held.checked_sub(u64::from(merged)).expect("merged");
                if let Some(len) = r.take(&mut self.out) {
                    assert!(len <= self.out.len());
                    check_taken(&self.out[..len]);
                }
            }
        }
        assert_eq!(r.pending(), self.held);
        assert!(r.pending() <= (MAX_DATAGRAMS * 64) as u64);
    }
}

fn run(r: &mut Reassembler, data: &[u8]) {
    r.clear();
    let mut st = State {
        held: 0,
        now: 0,
        frame: Vec::with_capacity(4096),
        out: vec![0u8; 4096],
    };
    let mut input = Input(data);
    while !input.0.is_empty() {
        let op = input.byte();
        match op % 4 {
            0 => {
                let n = usize::from(input.byte()) * 8;
                st.frame.clear();
                st.frame.extend_from_slice(input.bytes(n));
                st.add(r, false, false);
            }
            1 => {
                let flags = input.byte();
                let nested = flags & 8 != 0;
                let f = Frag {
                    v6: flags & 1 != 0,
                    vlan: flags & 2 != 0,
                    more: flags & 4 != 0,
                    other_source: flags & 16 != 0,
                    id: u32::from(input.byte() % 8),
                    next: if nested && flags & 1 != 0 {
                        FRAGMENT_HEADER
                    } else {
                        protocol(input.byte())
                    },
                    offset: usize::from(input.u16() & 0x1fff) * 8,
                    len: usize::from(input.byte()) * 8 + usize::from(flags >> 5),
                };
                build(&f, &mut st.frame);
                st.add(r, f.v6 && f.next == FRAGMENT_HEADER, f.vlan);
            }
            _ => train(r, &mut st, &mut input, op),
        }
        st.now += u32::from(op >> 6);
        st.held = st
            .held
            .checked_sub(u64::from(r.expire(st.now)))
            .expect("expired");
        assert_eq!(r.pending(), st.held);
    }
}

/// One datagram cut in pieces, sent as the input says.
fn train(r: &mut Reassembler, st: &mut State, input: &mut Input, op: u8) {
    let v6 = op & 4 != 0;
    // Pieces may carry a fragment header in the fragment header.
    let may_nest = v6 && op & 8 != 0;
    // Pieces may reach 8 bytes into their neighbours.
    let widen = op & 16 != 0;
    let vlan = op & 32 != 0;
    let id = u32::from(input.byte() % 8);
    let next = match protocol(input.byte()) {
        FRAGMENT_HEADER => 47,
        n => n,
    };
    let total = usize::from(input.u16() % 4200) + 1;
    let chunk = (usize::from(input.byte() % 64) + 1) * 8;
    let pieces = total.div_ceil(chunk);
    let sends = usize::from(input.byte()) + 1;
    for _ in 0..sends {
        if input.0.is_empty() {
            break;
        }
        let b = input.byte();
        let i = usize::from(b & 0x7f) % pieces;
        let nested = may_nest && b & 0x80 != 0;
        let (mut start, mut end) = (i * chunk, ((i + 1) * chunk).min(total));
        if widen {
            let w = input.byte();
            start = start.saturating_sub(usize::from(w & 1) * 8);
            end = (end + usize::from(w >> 1 & 1) * 8).min(total);
        }
        let f = Frag {
            v6,
            vlan,
            other_source: false,
            id,
            next: if nested { FRAGMENT_HEADER } else { next },
            offset: start,
            len: end - start,
            more: end < total,
        };
        build(&f, &mut st.frame);
        st.add(r, nested, vlan);
    }
}
