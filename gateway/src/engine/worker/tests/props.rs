//! The frame ledger and the packet accounting over random sequences of
//! events: packets received (tunnel traffic, coalescible segments, outer
//! fragments, garbage), loop iterations, writes finishing (whole, failed,
//! short, the device gone), the TX ring sent, device reads (plain, TSO,
//! garbage) and reloads. After every event each frame is in exactly one
//! place and the counters add up; after the stop every frame is home.

use proptest::prelude::*;

use super::*;

/// A packet the NIC receives.
#[derive(Debug, Clone)]
enum Rx {
    /// A datagram through tunnel `t` (2: from an unknown remote).
    Udp { t: u8, sport: u16, len: usize },
    /// A TCP segment of one of a few flows, in or out of order.
    Tcp {
        t: u8,
        flow: u16,
        seq: u32,
        psh: bool,
    },
    /// A third of an outer-fragmented IPIP datagram.
    Fragment { t: u8, id: u16, part: u8 },
    /// Anything at all.
    Garbage(Vec<u8>),
}

/// A packet a device hands its read.
#[derive(Debug, Clone)]
enum Read {
    Udp {
        len: usize,
    },
    /// A TCP packet the kernel left to segment (TSO), of `segs` segments.
    Tso {
        segs: u32,
    },
    Garbage(Vec<u8>),
}

#[derive(Debug, Clone)]
enum Ev {
    Receive(Rx),
    Step,
    /// The kernel finishes up to n writes: whole, or with an errno, or
    /// short by a byte.
    Finish(u8, Option<i32>),
    Short(u8),
    /// The NIC sends up to n frames of the TX ring.
    Send(u8),
    DeviceRead(u8, Read),
    Reload,
}

fn rx() -> impl Strategy<Value = Rx> {
    prop_oneof![
        (0u8..3, 0u16..6, 0usize..300).prop_map(|(t, sport, len)| Rx::Udp { t, sport, len }),
        (0u8..2, 0u16..3, 0u32..6, any::<bool>()).prop_map(|(t, flow, seq, psh)| Rx::Tcp {
            t,
            flow,
            seq,
            psh
        }),
        (0u8..2, 0u16..3, 0u8..3).prop_map(|(t, id, part)| Rx::Fragment { t, id, part }),
        proptest::collection::vec(any::<u8>(), 0..80).prop_map(Rx::Garbage),
    ]
}

fn read() -> impl Strategy<Value = Read> {
    prop_oneof![
        (0usize..1500).prop_map(|len| Read::Udp { len }),
        (1u32..5).prop_map(|segs| Read::Tso { segs }),
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(Read::Garbage),
    ]
}

fn ev() -> impl Strategy<Value = Ev> {
    prop_oneof![
        6 => rx().prop_map(Ev::Receive),
        6 => Just(Ev::Step),
        2 => (1u8..8, prop_oneof![
            4 => Just(None),
            1 => Just(Some(-libc::EIO)),
            1 => Just(Some(-libc::EBADFD)),
            1 => Just(Some(-libc::ENOSPC)),
        ]).prop_map(|(n, r)| Ev::Finish(n, r)),
        1 => (1u8..4).prop_map(Ev::Short),
        2 => (1u8..16).prop_map(Ev::Send),
        2 => (0u8..2, read()).prop_map(|(t, r)| Ev::DeviceRead(t, r)),
        1 => Just(Ev::Reload),
    ]
}

fn remote(t: u8) -> [u8; 4] {
    match t {
        0 => REMOTE,
        1 => [192, 168, 0, 59],
        _ => [192, 168, 0, 99],
    }
}

fn packet(r: &Rx) -> Vec<u8> {
    match r {
        Rx::Udp { t, sport, len } => outer(remote(*t), 4, &udp(*sport, &vec![0x33; *len])),
        Rx::Tcp { t, flow, seq, psh } => outer(
            remote(*t),
            4,
            &tcp(1000 + flow, 1 + 100 * seq, &[0x44; 100], *psh),
        ),
        Rx::Fragment { t, id, part } => {
            // The inner datagram: 48 bytes, in three fragments of 16.
            let inner = udp(9, &[0x55; 20]);
            assert_eq!(inner.len(), 48);
            let at = usize::from(*part) * 16;
            let mut ip =
                etherparse::Ipv4Header::new(16, 64, IpNumber(4), remote(*t), LOCAL).unwrap();
            ip.identification = *id;
            ip.more_fragments = *part < 2;
            ip.fragment_offset = etherparse::IpFragOffset::try_new((at / 8) as u16).unwrap();
            ip.header_checksum = ip.calc_header_checksum();
            let mut out = Vec::new();
            etherparse::Ethernet2Header {
                source: [2, 0, 0, 0, 0, 58],
                destination: [2, 0, 0, 0, 0, 8],
                ether_type: etherparse::EtherType::IPV4,
            }
            .write(&mut out)
            .unwrap();
            ip.write(&mut out).unwrap();
            out.extend_from_slice(&inner[at..at + 16]);
            out
        }
        Rx::Garbage(b) => b.clone(),
    }
}

fn device_read(r: &Read) -> Vec<u8> {
    let mut v = vec![0u8; VNET_HDR_LEN];
    match r {
        Read::Udp { len } => v.extend(udp(4000, &vec![0x66; *len])),
        Read::Tso { segs } => {
            let pkt = tcp(2000, 1, &vec![0x77; 100 * *segs as usize], false);
            // virtio_net_hdr: no checksum to finish, GSO TCPv4, header
            // length 40, segment size 100 (little-endian).
            v[1] = 1;
            v[2..4].copy_from_slice(&40u16.to_le_bytes());
            v[4..6].copy_from_slice(&100u16.to_le_bytes());
            v.extend(pkt);
        }
        Read::Garbage(b) => v.extend_from_slice(b),
    }
    v
}

impl Harness {
    /// Inbound packets in device writes not yet reaped, and replies.
    fn writes_held(&self) -> (u64, u64) {
        let d = self.dev.state.lock().unwrap();
        let mut inbound = 0;
        let mut replies = 0;
        let mut count = |tag: u16, packets: u16, peer: Option<usize>| {
            if peer.is_some() {
            } else if tag & (REPLY | REPLY_ICMP) != 0 {
                replies += u64::from(packets);
            } else {
                inbound += u64::from(packets);
            }
        };
        for w in d.queued.iter().chain(&d.in_flight) {
            count(w.tag, w.packets, w.peer);
        }
        for c in &d.done {
            if c.op == Op::Write {
                count(c.tag, c.packets, c.peer);
            }
        }
        (inbound, replies)
    }

    /// Both ways add up: every packet taken from the RX ring, and every
    /// packet read from a device, is delivered, sent, held or counted.
    fn check_counts(&self) {
        let (inbound, replies) = self.writes_held();
        let l = &self.run.st.local;
        let rx_drops: u64 = DropReason::ALL
            .iter()
            .filter(|r| !r.is_tx())
            .map(|&r| l.drops[r as usize])
            .sum();
        let tx_drops: u64 = DropReason::ALL
            .iter()
            .filter(|r| r.is_tx())
            .map(|&r| l.drops[r as usize])
            .sum();
        let coalescing: u64 = self
            .run
            .st
            .gro
            .iter()
            .map(|r| 1 + r.rest.len() as u64)
            .sum();
        assert_eq!(
            l.rx_frames,
            l.delivered
                + l.keepalives
                + l.path_mtu_updates
                + l.fragments_merged
                + l.fragments_pending
                + rx_drops
                + inbound
                + coalescing,
            "every packet received is delivered, held or counted: {l:?}"
        );
        assert_eq!(
            l.tx_read,
            l.tx_sent + l.tx_replies + tx_drops + replies + self.run.st.from_device.len() as u64,
            "every packet read is sent, answered or counted: {l:?}"
        );
    }

    fn apply(&mut self, e: &Ev, next_list: &mut dyn FnMut() -> Tunnels) {
        match e {
            Ev::Receive(r) => {
                self.sock.receive_packet(&packet(r));
            }
            Ev::Step => {
                assert!(self.step(), "not stopped");
            }
            Ev::Finish(n, r) => {
                self.dev.finish_writes(usize::from(*n), *r);
            }
            Ev::Short(n) => {
                // Short by one byte.
                let mut d = self.dev.state.lock().unwrap();
                for _ in 0..*n {
                    let Some(w) = d.in_flight.pop_front() else {
                        break;
                    };
                    let total = w.len + w.rest.iter().map(|p| p.len).sum::<usize>();
                    d.done.push_back(w.into_completed(Some(total as i32 - 1)));
                }
            }
            Ev::Send(n) => {
                self.sock.send(usize::from(*n));
            }
            Ev::DeviceRead(t, r) => {
                self.dev.device_sends(u32::from(*t), &device_read(r));
            }
            Ev::Reload => {
                let (done_tx, done_rx) = crossbeam::channel::bounded(1);
                self.control
                    .send(Reconfig {
                        tunnels: next_list(),
                        devices: vec![DeviceQueue::Keep(0), DeviceQueue::Keep(1)],
                        counters_from: vec![Some(0), Some(1)],
                        done: done_tx,
                    })
                    .unwrap();
                for _ in 0..1000 {
                    if !done_rx.is_empty() {
                        break;
                    }
                    // The kernel goes on meanwhile.
                    self.dev.finish_writes(usize::MAX, None);
                    self.sock.send(usize::MAX);
                    assert!(self.step());
                }
                assert_eq!(done_rx.try_recv().expect("reload answered"), Ok(()));
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn every_frame_is_in_exactly_one_place_after_any_sequence_of_events(
        events in proptest::collection::vec(ev(), 1..200)
    ) {
        let mut h = Harness::new(Setup { frames: 48, ring: 16, batch: 8, sq: 24, ..Setup::default() });
        let mut next_list = two_tunnels;
        for e in &events {
            h.apply(e, &mut next_list);
            h.check_ledger();
            h.check_counts();
        }
        // The stop: whatever is in flight finishes, every frame comes home.
        h.stop.store(true, Ordering::Relaxed);
        while h.step() {}
        let total = h.ids.len() as u64;
        let (sock, stats) = (h.sock.clone(), h.stats.clone());
        h.run.finish().expect("finish");
        let f = published_frames(&stats);
        prop_assert_eq!(f.in_flight, 0, "{:?}", f);
        prop_assert_eq!(f.at_peers, 0, "{:?}", f);
        prop_assert_eq!(f.free + f.in_kernel + f.in_tx, total, "{:?}", f);
        prop_assert_eq!(sock.ids().len() as u64, f.in_kernel + f.in_tx);
    }
}
