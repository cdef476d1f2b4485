//! The frame ledger and the packet accounting over random sequences of
//! events: packets received (tunnel traffic into tun and tap devices,
//! bursts of a flow's segments, outer fragments, garbage), loop iterations,
//! writes finishing (whole, failed, short, the device gone), the TX ring
//! sent, device reads (plain, TSO, ARP, floods of them, garbage) and
//! reloads that add, drop and re-create devices; with small and large
//! submission queues, multishot and one-shot reads, drains that let writes
//! finish or cancel them. After every event each frame is in exactly one
//! place and the counters add up; after the stop every frame is home. And
//! the same for two workers handing writes to each other.

use proptest::prelude::*;

use super::*;

/// The tunnels a list can hold: "a" and "b" (IPIP into tuns), "c" (IPIP
/// into a tap) and "d" (gretap into a tap).
const REMOTES: [[u8; 4]; 4] = [
    REMOTE,
    [192, 168, 0, 59],
    [192, 168, 0, 60],
    [192, 168, 0, 61],
];
const BASE: usize = REMOTES.len();

fn base_tunnel(k: usize) -> (TunnelRx, TunnelTx) {
    match k {
        0 => ipip("a", REMOTES[0]),
        1 => ipip("b", REMOTES[1]),
        2 => ipip_tap("c", REMOTES[2]),
        _ => gretap("d", REMOTES[3]),
    }
}

/// A packet the NIC receives; `k` names a base tunnel (4: an unknown
/// remote).
#[derive(Debug, Clone)]
enum Rx {
    Udp {
        k: u8,
        sport: u16,
        len: usize,
    },
    /// A TCP segment of one of a few flows, in or out of order.
    Tcp {
        k: u8,
        flow: u16,
        seq: u32,
        psh: bool,
    },
    /// `n` segments of a flow in order, each after the last one sent.
    Burst {
        k: u8,
        flow: u16,
        n: u8,
    },
    /// A third of an outer-fragmented IPIP datagram.
    Fragment {
        k: u8,
        id: u16,
        part: u8,
    },
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
    /// An ARP request for the tap's peer (answered into the tap).
    Arp,
    Garbage(Vec<u8>),
}

#[derive(Debug, Clone)]
enum Ev {
    Receive(Rx),
    Step,
    /// The kernel finishes up to n writes: whole, or with an errno.
    Finish(u8, Option<i32>),
    /// Up to n writes end one byte short.
    Short(u8),
    /// The NIC sends up to n frames of the TX ring.
    Send(u8),
    /// A device (by position in the list in force) hands its read a packet.
    DeviceRead(u8, Read),
    /// n datagrams from one device at once.
    ReadFlood(u8, u8),
    /// A new list of the base tunnels in `mask` (bit k: tunnel k).
    Reload(u8),
}

/// How a case's worker is set up.
#[derive(Debug, Clone)]
struct Shape {
    sq: usize,
    read_bufs: u16,
    multishot: bool,
    coalesce_udp: bool,
    drain_cancels_writes: bool,
}

fn rx() -> impl Strategy<Value = Rx> {
    prop_oneof![
        (0u8..5, 0u16..6, 0usize..300).prop_map(|(k, sport, len)| Rx::Udp { k, sport, len }),
        (0u8..4, 0u16..3, 0u32..6, any::<bool>()).prop_map(|(k, flow, seq, psh)| Rx::Tcp {
            k,
            flow,
            seq,
            psh
        }),
        (0u8..4, 0u16..3, 1u8..20).prop_map(|(k, flow, n)| Rx::Burst { k, flow, n }),
        (0u8..2, 0u16..3, 0u8..3).prop_map(|(k, id, part)| Rx::Fragment { k, id, part }),
        proptest::collection::vec(any::<u8>(), 0..80).prop_map(Rx::Garbage),
    ]
}

fn read() -> impl Strategy<Value = Read> {
    prop_oneof![
        (0usize..1500).prop_map(|len| Read::Udp { len }),
        (1u32..5).prop_map(|segs| Read::Tso { segs }),
        Just(Read::Arp),
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(Read::Garbage),
    ]
}

fn ev() -> impl Strategy<Value = Ev> {
    prop_oneof![
        8 => rx().prop_map(Ev::Receive),
        8 => Just(Ev::Step),
        3 => (1u8..8, prop_oneof![
            8 => Just(None),
            1 => Just(Some(-libc::EIO)),
            1 => Just(Some(-libc::ENOSPC)),
        ]).prop_map(|(n, r)| Ev::Finish(n, r)),
        1 => (1u8..2).prop_map(|n| Ev::Finish(n, Some(-libc::EBADFD))),
        1 => (1u8..4).prop_map(Ev::Short),
        2 => (1u8..16).prop_map(Ev::Send),
        3 => (0u8..4, read()).prop_map(|(t, r)| Ev::DeviceRead(t, r)),
        1 => (0u8..4, 1u8..40).prop_map(|(t, n)| Ev::ReadFlood(t, n)),
        1 => (1u8..16).prop_map(Ev::Reload),
    ]
}

fn shape() -> impl Strategy<Value = Shape> {
    (
        prop_oneof![Just(4usize), Just(24)],
        prop_oneof![Just(2u16), Just(8)],
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(sq, read_bufs, multishot, coalesce_udp, drain_cancels_writes)| Shape {
                sq,
                read_bufs,
                multishot,
                coalesce_udp,
                drain_cancels_writes,
            },
        )
}

/// The inner packet of base tunnel `k` (an Ethernet frame for gretap).
fn inner_of(k: u8, ip: Vec<u8>) -> (u8, Vec<u8>) {
    if k == 3 {
        // gretap: a GRE header (no flags, protocol 0x6558), then Ethernet.
        let mut v = vec![0, 0, 0x65, 0x58];
        let mut eth = Vec::new();
        etherparse::Ethernet2Header {
            source: PEER_MAC,
            destination: TAP_MAC,
            ether_type: etherparse::EtherType::IPV4,
        }
        .write(&mut eth)
        .unwrap();
        v.extend(eth);
        v.extend(ip);
        (47, v)
    } else {
        (4, ip)
    }
}

/// Next sequence number per (tunnel, flow), for bursts.
type Seqs = std::collections::HashMap<(u8, u16), u32>;

fn packets(r: &Rx, seqs: &mut Seqs) -> Vec<Vec<u8>> {
    let remote = |k: u8| {
        REMOTES
            .get(usize::from(k))
            .copied()
            .unwrap_or([192, 168, 0, 99])
    };
    let wrap = |k: u8, ip: Vec<u8>| {
        let (proto, inner) = inner_of(k, ip);
        outer(remote(k), proto, &inner)
    };
    match r {
        Rx::Udp { k, sport, len } => vec![wrap(*k, udp(*sport, &vec![0x33; *len]))],
        Rx::Tcp { k, flow, seq, psh } => {
            vec![wrap(
                *k,
                tcp(1000 + flow, 1 + 100 * seq, &[0x44; 100], *psh),
            )]
        }
        Rx::Burst { k, flow, n } => {
            let next = seqs.entry((*k, *flow)).or_insert(1);
            (0..*n)
                .map(|_| {
                    let p = wrap(*k, tcp(2000 + flow, *next, &[0x45; 200], false));
                    *next = next.wrapping_add(200);
                    p
                })
                .collect()
        }
        Rx::Fragment { k, id, part } => {
            // The inner datagram: 48 bytes, in three fragments of 16.
            let inner = udp(9, &[0x55; 20]);
            assert_eq!(inner.len(), 48);
            let at = usize::from(*part) * 16;
            let mut ip =
                etherparse::Ipv4Header::new(16, 64, IpNumber(4), remote(*k), LOCAL).unwrap();
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
            vec![out]
        }
        Rx::Garbage(b) => vec![b.clone()],
    }
}

/// What a read of a device of this kind returns: a virtio-net header and
/// the packet.
fn device_read(r: &Read, kind: DeviceKind) -> Vec<u8> {
    let mut v = vec![0u8; VNET_HDR_LEN];
    let l2 = |ip: Vec<u8>| -> Vec<u8> {
        if kind == DeviceKind::Tun {
            return ip;
        }
        let mut f = Vec::new();
        etherparse::Ethernet2Header {
            source: TAP_MAC,
            destination: PEER_MAC,
            ether_type: etherparse::EtherType::IPV4,
        }
        .write(&mut f)
        .unwrap();
        f.extend(ip);
        f
    };
    match r {
        Read::Udp { len } => v.extend(l2(udp(4000, &vec![0x66; *len]))),
        Read::Tso { segs } => {
            let pkt = l2(tcp(2000, 1, &vec![0x77; 100 * *segs as usize], false));
            let hdr = if kind == DeviceKind::Tun { 40u16 } else { 54 };
            // virtio_net_hdr: no checksum to finish, GSO TCPv4, the
            // headers' length, segment size 100 (the host's byte order).
            v[1] = 1;
            v[2..4].copy_from_slice(&hdr.to_ne_bytes());
            v[4..6].copy_from_slice(&100u16.to_ne_bytes());
            v.extend(pkt);
        }
        Read::Arp => {
            let arp = etherparse::ArpPacket::new(
                etherparse::ArpHardwareId::ETHERNET,
                etherparse::EtherType::IPV4,
                etherparse::ArpOperation::REQUEST,
                &TAP_MAC,
                &[10, 9, 0, 1],
                &[0; 6],
                &[10, 9, 0, 2],
            )
            .unwrap();
            let b = PacketBuilder::ethernet2(TAP_MAC, [0xff; 6]).arp(arp);
            let mut f = Vec::new();
            b.write(&mut f).unwrap();
            v.extend(f);
        }
        Read::Garbage(b) => v.extend_from_slice(b),
    }
    v
}

impl Harness {
    /// The device kind of the tunnel at position `t` of the list in force.
    fn kind_of(&self, t: usize) -> Option<DeviceKind> {
        self.run.w.shared.tunnels.tx.get(t).map(|x| x.device_kind)
    }

    fn apply(&mut self, e: &Ev, list: &mut Vec<usize>, seqs: &mut Seqs) {
        match e {
            Ev::Receive(r) => {
                for p in packets(r, seqs) {
                    self.sock.receive_packet(&p);
                }
            }
            Ev::Step => {
                assert!(self.step(), "not stopped");
            }
            Ev::Finish(n, r) => {
                self.dev.finish_writes(usize::from(*n), *r);
            }
            Ev::Short(n) => {
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
                if let Some(kind) = self.kind_of(usize::from(*t)) {
                    self.dev.device_sends(u32::from(*t), &device_read(r, kind));
                }
            }
            Ev::ReadFlood(t, n) => {
                if let Some(kind) = self.kind_of(usize::from(*t)) {
                    for i in 0..*n {
                        let r = Read::Udp {
                            len: 100 + usize::from(i),
                        };
                        self.dev.device_sends(u32::from(*t), &device_read(&r, kind));
                    }
                }
            }
            Ev::Reload(mask) => {
                // The base tunnels in `mask`, in order: a device kept where
                // the tunnel was in the old list and its queue still works,
                // a new one otherwise (as the control thread re-creates a
                // deleted device).
                let new: Vec<usize> = (0..BASE).filter(|k| mask & (1 << k) != 0).collect();
                let gone = self.run.st.gone.clone();
                let old = std::mem::replace(list, new.clone());
                let mut devices = Vec::new();
                let mut counters_from = Vec::new();
                for k in &new {
                    let was = old.iter().position(|o| o == k);
                    counters_from.push(was);
                    devices.push(match was {
                        Some(i) if !gone[i] => DeviceQueue::Keep(i),
                        _ => DeviceQueue::New(device_fd()),
                    });
                }
                let (done_tx, done_rx) = crossbeam::channel::bounded(1);
                self.control
                    .send(Reconfig {
                        tunnels: tunnels(new.iter().map(|&k| base_tunnel(k)).collect()),
                        devices,
                        counters_from,
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

fn harness(s: &Shape) -> Harness {
    let h = Harness::new(Setup {
        frames: 48,
        ring: 16,
        batch: 8,
        sq: s.sq,
        read_bufs: s.read_bufs,
        multishot: s.multishot,
        coalesce_udp: s.coalesce_udp,
        tunnels: tunnels((0..BASE).map(base_tunnel).collect()),
        ..Setup::default()
    });
    h.dev.state.lock().unwrap().drain_cancels_writes = s.drain_cancels_writes;
    h
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn every_frame_is_in_exactly_one_place_after_any_sequence_of_events(
        s in shape(),
        events in proptest::collection::vec(ev(), 1..200),
    ) {
        let mut h = harness(&s);
        let mut list: Vec<usize> = (0..BASE).collect();
        let mut seqs = Seqs::new();
        for e in &events {
            h.apply(e, &mut list, &mut seqs);
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

/// An event for one of two workers.
fn ev2() -> impl Strategy<Value = (bool, Ev)> {
    (
        any::<bool>(),
        prop_oneof![
            4 => rx().prop_map(Ev::Receive),
            6 => Just(Ev::Step),
            3 => (1u8..8).prop_map(|n| Ev::Finish(n, None)),
            1 => (1u8..4).prop_map(|n| Ev::Finish(n, Some(-libc::EIO))),
            2 => (1u8..16).prop_map(Ev::Send),
            2 => (0u8..3, read()).prop_map(|(t, r)| Ev::DeviceRead(t, r)),
        ],
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn two_workers_handing_writes_over_lose_no_frame(
        events in proptest::collection::vec(ev2(), 1..150),
    ) {
        let (mut a, mut b) = pair();
        let (mut la, mut lb) = (vec![0, 1], vec![0, 1]);
        let mut seqs = Seqs::new();
        for (to_a, e) in &events {
            if *to_a {
                a.apply(e, &mut la, &mut seqs);
            } else {
                b.apply(e, &mut lb, &mut seqs);
            }
            // No frame in two places, whichever worker holds it.
            let mut seen: Vec<u32> = a.own_ids();
            seen.extend(b.own_ids());
            seen.extend(a.sock.ids());
            seen.extend(b.sock.ids());
            seen.extend(a.dev.ids());
            seen.extend(b.dev.ids());
            let n = seen.len();
            seen.sort_unstable();
            seen.dedup();
            prop_assert_eq!(seen.len(), n, "a frame in two places");
            prop_assert_eq!(a.dev.state.lock().unwrap().refused, 0);
            prop_assert_eq!(b.dev.state.lock().unwrap().refused, 0);
        }
        // Both stop, each on its own thread, while this one plays the
        // kernel; then every frame of each is home.
        let (dev_a, dev_b) = (a.dev.clone(), b.dev.clone());
        let (socks, stats) = ([a.sock.clone(), b.sock.clone()], [a.stats.clone(), b.stats.clone()]);
        stop_both(a, b);
        for (h, stats) in socks.iter().zip(&stats) {
            let f = published_frames(stats);
            prop_assert_eq!(f.in_flight, 0, "{:?}", f);
            prop_assert_eq!(f.at_peers, 0, "{:?}", f);
            prop_assert_eq!(f.free + f.in_kernel + f.in_tx, 64, "{:?}", f);
            prop_assert_eq!(h.ids().len() as u64, f.in_kernel + f.in_tx);
        }
        prop_assert_eq!(dev_a.state.lock().unwrap().refused + dev_b.state.lock().unwrap().refused, 0);
    }
}

/// Captures and traces attached to a worker (see [`Session`]).
#[derive(Debug, Clone)]
struct Watch {
    points: u8,
    filter: Option<&'static str>,
    snaplen: usize,
    tunnel: Option<&'static str>,
    reason: Option<DropReason>,
    traces: Option<u64>,
}

fn watch() -> impl Strategy<Value = Watch> {
    (
        1u8..32,
        prop_oneof![
            Just(None),
            Just(Some("udp")),
            Just(Some("tcp port 2000")),
            Just(Some("ip proto 47"))
        ],
        prop_oneof![Just(1usize), Just(60), Just(262_144)],
        prop_oneof![Just(None), Just(Some("t0")), Just(Some("t3"))],
        prop_oneof![
            Just(None),
            Just(Some(DropReason::UnknownEndpoint)),
            Just(Some(DropReason::TxMalformed))
        ],
        prop_oneof![Just(None), Just(Some(1u64)), Just(Some(5))],
    )
        .prop_map(|(points, filter, snaplen, tunnel, reason, traces)| Watch {
            points,
            filter,
            snaplen,
            tunnel,
            reason,
            traces,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// The same events with a capture and a trace attached: the frames
    /// and the counters add up as before, nothing panics on any packet at
    /// any point, every copy keeps to its snap length and says its point,
    /// and a trace takes no more packets than asked.
    #[test]
    fn captures_and_traces_attached_change_no_frame_and_no_count(
        s in shape(),
        w in watch(),
        events in proptest::collection::vec(ev(), 1..150),
    ) {
        use crate::telemetry::capture::{Item, Kind, Point, Session};
        let taps = Arc::new(Taps::new(1));
        let capture = Arc::new(
            Session::new(
                Kind::Capture { points: w.points },
                w.filter,
                1,
                w.tunnel.map(str::to_string),
                w.reason,
                None,
                w.snaplen,
            )
            .unwrap(),
        );
        taps.attach(capture.clone()).unwrap();
        let trace = w.traces.map(|n| {
            Arc::new(Session::new(Kind::Trace, w.filter, 1, None, None, Some(n), 64).unwrap())
        });
        if let Some(t) = &trace {
            taps.attach(t.clone()).unwrap();
        }
        let mut h = Harness::new(Setup {
            frames: 48,
            ring: 16,
            batch: 8,
            sq: s.sq,
            read_bufs: s.read_bufs,
            multishot: s.multishot,
            coalesce_udp: s.coalesce_udp,
            tunnels: tunnels((0..BASE).map(base_tunnel).collect()),
            taps: taps.clone(),
            ..Setup::default()
        });
        h.dev.state.lock().unwrap().drain_cancels_writes = s.drain_cancels_writes;
        let mut list: Vec<usize> = (0..BASE).collect();
        let mut seqs = Seqs::new();
        for e in &events {
            h.apply(e, &mut list, &mut seqs);
            h.check_ledger();
            h.check_counts();
        }
        h.stop.store(true, Ordering::Relaxed);
        while h.step() {}
        h.run.finish().expect("finish");
        prop_assert!(capture.settled());
        let mut copies = 0u64;
        while let Some(item) = capture.pop() {
            let Item::Packet(r) = item else {
                prop_assert!(false, "a trace in a capture");
                unreachable!()
            };
            copies += 1;
            prop_assert!(capture.wants(r.point), "{:?}", r.point);
            prop_assert!(r.data.len() <= w.snaplen);
            prop_assert!(r.data.len() <= r.len as usize);
            prop_assert_eq!(r.reason.is_some(), r.point == Point::Drop);
            if let Some(want) = w.reason {
                prop_assert_eq!(r.reason, Some(want));
            }
            if let Some(t) = w.tunnel {
                prop_assert_eq!(r.tunnel.as_deref(), Some(t));
            }
        }
        prop_assert_eq!(copies, capture.taken.load(Ordering::Relaxed));
        // Something was copied when everything received is wanted and a
        // loop iteration followed a packet.
        let received_then_stepped = events
            .iter()
            .position(|e| matches!(e, Ev::Receive(_)))
            .is_some_and(|i| events[i..].iter().any(|e| matches!(e, Ev::Step)));
        if w.points & Point::WireIn.bit() != 0
            && w.filter.is_none()
            && w.tunnel.is_none()
            && w.reason.is_none()
            && received_then_stepped
        {
            prop_assert!(copies + capture.lost.load(Ordering::Relaxed) > 0);
        }
        if let (Some(t), Some(n)) = (&trace, w.traces) {
            prop_assert!(t.settled());
            let mut traces = 0;
            while let Some(item) = t.pop() {
                let Item::Trace(tr) = item else {
                    prop_assert!(false, "a copy in a trace");
                    unreachable!()
                };
                traces += 1;
                let first = tr.steps.first().map(|s| s.stage);
                prop_assert!(first == Some("wire-in") || first == Some("device-in"), "{:?}", tr);
            }
            prop_assert!(traces <= n);
        }
    }
}
