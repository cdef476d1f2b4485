//! The worker's decisions, run on fakes of the socket and the devices
//! (see [`fake`]), without root: where a coalescing run ends, that a
//! hand-over brings its frames back, that a reload drains before it
//! switches, and, over random sequences of events, that every frame is in
//! exactly one place and every packet is delivered or counted. Packets
//! are built by etherparse.

mod fake;
mod props;

use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use etherparse::{IpNumber, PacketBuilder};

use super::*;
use crate::datapath::tunnel::{Mode, Tos, Ttl, TunnelRx};
use fake::{Event, FakeDevices, FakeFrame, FakeSocket};

pub(super) const LOCAL: [u8; 4] = [192, 168, 0, 8];
pub(super) const REMOTE: [u8; 4] = [192, 168, 0, 58];
const GW_MAC: [u8; 6] = [2, 0, 0, 0, 0, 8];
const HOP_MAC: [u8; 6] = [2, 0, 0, 0, 0, 58];

/// An IPIP tunnel into a tun device, between LOCAL and `remote`.
fn ipip(name: &str, remote: [u8; 4]) -> (TunnelRx, TunnelTx) {
    let (local, remote) = (Ipv4Addr::from(LOCAL).into(), Ipv4Addr::from(remote).into());
    let rx = TunnelRx {
        name: name.into(),
        mode: Mode::Ipip,
        local,
        remote,
        ikey: None,
        icsum: false,
        iseq: false,
        device_kind: DeviceKind::Tun,
        device_mac: [0; 6],
        peer_mac: [0; 6],
        mtu: 1400,
        allowed_sources: Vec::new(),
    };
    let tx = TunnelTx {
        mode: Mode::Ipip,
        local,
        remote,
        encap_limit: None,
        path_mtu: Default::default(),
        ident: Default::default(),
        okey: None,
        ocsum: false,
        oseq: None,
        ttl: Ttl::Fixed(64),
        tos: Tos::Fixed(0),
        pmtudisc: true,
        ignore_df: false,
        mtu: 1400,
        device_kind: DeviceKind::Tun,
        device_mac: [0; 6],
        peer_mac: [0; 6],
        address: None,
        peer: None,
    };
    (rx, tx)
}

/// Tunnels "a" (to REMOTE) and "b" (to .59), IPIP into tun devices.
fn two_tunnels() -> Tunnels {
    tunnels(vec![ipip("a", REMOTE), ipip("b", [192, 168, 0, 59])])
}

static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn tunnels(list: Vec<(TunnelRx, TunnelTx)>) -> Tunnels {
    let n = list.len();
    let hops = NextHops::new(n);
    hops.set_local(GW_MAC);
    for i in 0..n {
        hops.set(i, Some(HOP_MAC));
    }
    let (rx, tx): (Vec<_>, Vec<_>) = list.into_iter().unzip();
    Tunnels {
        rx: Arc::new(TunnelTable::new(rx)),
        tx: Arc::new(tx),
        next_hops: Arc::new(hops),
        generation: GENERATION.fetch_add(1, Ordering::Relaxed),
    }
}

/// A queue fd that stands for a device's (the fakes never use it).
fn device_fd() -> OwnedFd {
    std::fs::File::open("/dev/null").unwrap().into()
}

/// One worker on fakes, and the test's handles on them.
pub(super) struct Harness {
    pub run: Running<FakeSocket, FakeDevices>,
    pub sock: FakeSocket,
    pub dev: FakeDevices,
    pub stats: Arc<WorkerStats>,
    pub stop: Arc<AtomicBool>,
    pub control: Sender<Reconfig>,
    /// The frame numbers this worker's UMEM has.
    pub ids: std::ops::Range<u32>,
}

pub(super) struct Setup {
    pub frames: u32,
    pub ring: usize,
    pub batch: usize,
    pub sq: usize,
    pub read_bufs: u16,
    pub tunnels: Tunnels,
    pub first_frame: u32,
    pub queue: u32,
    pub spread: Option<Link<FakeFrame>>,
}

impl Default for Setup {
    fn default() -> Setup {
        Setup {
            frames: 64,
            ring: 32,
            batch: 16,
            sq: 64,
            read_bufs: 8,
            tunnels: two_tunnels(),
            first_frame: 0,
            queue: 0,
            spread: None,
        }
    }
}

impl Harness {
    pub fn new(s: Setup) -> Harness {
        let (sock, frames) = FakeSocket::new(s.first_frame, s.frames, s.ring);
        let dev = FakeDevices::new(s.sq, s.read_bufs);
        let ntun = s.tunnels.rx.len();
        let stop = Arc::new(AtomicBool::new(false));
        let (control, control_rx) = crossbeam::channel::bounded(1);
        let stats = Arc::new(WorkerStats::new(s.queue, None, ntun));
        let mut w = Worker::new(
            Settings {
                queue: s.queue,
                core: None,
                batch: s.batch,
                poll: PollMode::Busy,
                busy_poll: false,
                coalesce_udp: false,
                faults: Faults::NONE,
            },
            sock.clone(),
            frames,
            (0..ntun).map(|_| device_fd()).collect(),
            Shared {
                tunnels: s.tunnels,
                stop: stop.clone(),
                control: control_rx,
            },
            stats.clone(),
        );
        if let Some(link) = s.spread {
            w.set_spread(link);
        }
        let d = dev.clone();
        let run = w.start(move |_, _| Ok(d)).expect("start");
        Harness {
            run,
            sock,
            dev,
            stats,
            stop,
            control,
            ids: s.first_frame..s.first_frame + s.frames,
        }
    }

    pub fn step(&mut self) -> bool {
        self.run.step().expect("step")
    }

    /// Steps until nothing moves for a few iterations.
    pub fn settle(&mut self) {
        for _ in 0..8 {
            self.step();
        }
    }

    /// Every frame this worker holds itself, by number.
    pub fn own_ids(&self) -> Vec<u32> {
        let (w, st) = (&self.run.w, &self.run.st);
        let mut v: Vec<u32> = w.free.iter().map(|f| f.id).collect();
        v.extend(st.tx_pending.iter().map(|f| f.id));
        v.extend(st.from_device.iter().map(|(f, _)| f.id));
        for r in &st.gro {
            v.push(r.first.id);
            v.extend(r.rest.iter().map(|p| p.frame.id));
        }
        for q in &st.jobs_in {
            for j in q {
                v.push(j.frame.id);
                v.extend(j.rest.iter().map(|p| p.frame.id));
            }
        }
        v.extend(self.run.rx.iter().map(|f| f.id));
        v
    }

    /// The ledger holds: each of this worker's frames is in exactly one
    /// place, and the worker's counts say where.
    pub fn check_ledger(&self) {
        let mut all = self.own_ids();
        all.extend(self.sock.ids());
        all.extend(self.dev.ids());
        all.sort_unstable();
        let want: Vec<u32> = self.ids.clone().collect();
        assert_eq!(all, want, "every frame in exactly one place");
        let f = &self.run.st.frames;
        assert!(f.balanced(), "{f:?}");
        assert_eq!(f.in_kernel, self.sock.in_kernel() as u64, "in_kernel {f:?}");
        assert_eq!(f.in_tx, self.sock.in_tx() as u64, "in_tx {f:?}");
        assert_eq!(f.at_peers, 0, "{f:?}");
    }

    /// Every packet taken from the RX ring is delivered, held or counted
    /// (the identity the README states), once the writes are reaped.
    pub fn check_accounting(&self) {
        let l = &self.run.st.local;
        let rx_drops: u64 = DropReason::ALL
            .iter()
            .filter(|r| !r.is_tx())
            .map(|&r| l.drops[r as usize])
            .sum();
        let held = self.run.st.writes_in_flight as u64
            + self
                .run
                .st
                .gro
                .iter()
                .map(|r| 1 + r.rest.len() as u64)
                .sum::<u64>();
        assert_eq!(
            l.rx_frames,
            l.delivered
                + l.keepalives
                + l.path_mtu_updates
                + l.fragments_merged
                + l.fragments_pending
                + rx_drops
                + held,
            "rx_frames = delivered + ... + drops (+ writes in flight)"
        );
    }
}

/// An outer IPv4 packet from REMOTE to LOCAL carrying `inner` with IP
/// protocol `proto`, in an Ethernet frame to the gateway.
pub(super) fn outer(remote: [u8; 4], proto: u8, inner: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(HOP_MAC, GW_MAC)
        .ipv4(remote, LOCAL, 64)
        .write(&mut out, IpNumber(proto), inner)
        .unwrap();
    out
}

/// A TCP segment (ACK set) of flow `sport` -> 80, 10.0.0.1 -> 10.0.0.2.
pub(super) fn tcp(sport: u16, seq: u32, payload: &[u8], psh: bool) -> Vec<u8> {
    let b = PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
        .tcp(sport, 80, seq, 1000)
        .ack(1);
    let b = if psh { b.psh() } else { b };
    let mut out = Vec::new();
    b.write(&mut out, payload).unwrap();
    out
}

/// A UDP datagram 10.0.0.1 -> 10.0.0.2.
pub(super) fn udp(sport: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
        .udp(sport, 53)
        .write(&mut out, payload)
        .unwrap();
    out
}

/// What each device write carried: its file, its packets, the virtio-net
/// header's GSO size, and the packet after the header.
fn written(dev: &FakeDevices) -> Vec<(u32, u16, u16, Vec<u8>)> {
    let d = dev.state.lock().unwrap();
    d.written
        .iter()
        .map(|(file, packets, bytes)| {
            let gso_size = u16::from_le_bytes([bytes[4], bytes[5]]);
            (*file, *packets, gso_size, bytes[VNET_HDR_LEN..].to_vec())
        })
        .collect()
}

/// A write: its packets, its GSO size, and its TCP port, sequence number
/// and payload length.
type Summary = (u16, u16, Option<(u16, u32, usize)>);

/// Source port, sequence number and payload length of a TCP packet, as
/// etherparse reads it; `None` if not TCP.
fn tcp_of(pkt: &[u8]) -> Option<(u16, u32, usize)> {
    let h = etherparse::PacketHeaders::from_ip_slice(pkt).expect("an IP packet");
    let Some(etherparse::TransportHeader::Tcp(t)) = &h.transport else {
        return None;
    };
    Some((t.source_port, t.sequence_number, h.payload.slice().len()))
}
#[test]
fn a_coalescing_run_ends_where_it_must() {
    let mut h = Harness::new(Setup::default());
    let p = [0x5a; 100];
    // Flow 1000: three in order, a gap, then one that closes its run with
    // PSH; flow 2000 interleaved, two in order; a UDP datagram (not
    // coalesced here); all in one batch.
    let batch = [
        tcp(1000, 1, &p, false),
        tcp(2000, 7, &p, false),
        tcp(1000, 101, &p, false),
        tcp(1000, 201, &p, false),
        tcp(2000, 107, &p, false),
        tcp(1000, 401, &p, false), // gap: 301 is missing
        tcp(1000, 501, &p, true),  // PSH ends the run
        udp(3000, &p),
    ];
    for inner in &batch {
        assert!(h.sock.receive_packet(&outer(REMOTE, 4, inner)));
    }
    h.step();
    h.check_ledger();
    h.dev.finish_writes(usize::MAX, None);
    h.settle();
    h.check_ledger();

    let w = written(&h.dev);
    let summary: Vec<Summary> = w
        .iter()
        .map(|(_, packets, gso, pkt)| (*packets, *gso, tcp_of(pkt)))
        .collect();
    // The gap ends flow 1000's first run (written as it meets the gap);
    // 401 and 501 make a run that PSH closes; flow 2000's run and the
    // datagram are written whole at the end of the batch.
    assert!(
        summary.contains(&(3, 100, Some((1000, 1, 300)))),
        "1, 101, 201 as one: {summary:?}"
    );
    assert!(
        summary.contains(&(2, 100, Some((1000, 401, 200)))),
        "401 and 501 (PSH) as one: {summary:?}"
    );
    assert!(
        summary.contains(&(2, 100, Some((2000, 7, 200)))),
        "flow 2000 as one: {summary:?}"
    );
    assert_eq!(summary.len(), 4, "and the datagram alone: {summary:?}");
    let order: Vec<u32> = summary
        .iter()
        .filter_map(|s| s.2.filter(|t| t.0 == 1000).map(|t| t.1))
        .collect();
    assert_eq!(order, vec![1, 401], "flow 1000 in order");
    let l = &h.run.st.local;
    assert_eq!(l.delivered, 8);
    assert_eq!(l.coalesced_writes, 3);
    assert_eq!(l.coalesced, 4, "7 segments in 3 writes");
    h.check_accounting();
}

#[test]
fn a_run_of_one_tunnel_never_takes_another_tunnel_s_segment() {
    let mut h = Harness::new(Setup::default());
    let p = [7u8; 80];
    // The same inner flow, in order, alternating between two tunnels.
    for (i, remote) in [REMOTE, [192, 168, 0, 59], REMOTE, [192, 168, 0, 59]]
        .iter()
        .enumerate()
    {
        let seq = 1 + 80 * (i as u32 / 2);
        assert!(h
            .sock
            .receive_packet(&outer(*remote, 4, &tcp(1000, seq, &p, false))));
    }
    h.step();
    h.dev.finish_writes(usize::MAX, None);
    h.settle();
    h.check_ledger();
    let w = written(&h.dev);
    let mut per_file: Vec<(u32, u16)> = w.iter().map(|(f, n, _, _)| (*f, *n)).collect();
    per_file.sort_unstable();
    assert_eq!(per_file, vec![(0, 2), (1, 2)], "two runs, one per tunnel");
}

#[test]
fn the_write_of_a_run_that_fails_counts_every_packet_of_it() {
    let mut h = Harness::new(Setup::default());
    let p = [1u8; 60];
    for i in 0..4u32 {
        assert!(h
            .sock
            .receive_packet(&outer(REMOTE, 4, &tcp(1000, 1 + 60 * i, &p, false))));
    }
    h.step();
    assert_eq!(
        h.dev.finish_writes(usize::MAX, Some(-libc::EIO)),
        1,
        "one write"
    );
    h.settle();
    h.check_ledger();
    let l = &h.run.st.local;
    assert_eq!(
        l.drops[DropReason::DeviceDown as usize],
        4,
        "EIO: the device is down"
    );
    assert_eq!(l.delivered, 0);
    h.check_accounting();
}

/// The frame counts a worker published last.
pub(super) fn published_frames(s: &WorkerStats) -> FrameCounts {
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    FrameCounts {
        total: get(&s.frames_total),
        free: get(&s.frames_free),
        in_kernel: get(&s.frames_in_kernel),
        in_flight: get(&s.frames_in_flight),
        in_tx: get(&s.frames_in_tx),
        at_peers: get(&s.frames_at_peers),
    }
}

/// Two workers on fakes, joined by a hand-over mesh.
fn pair() -> (Harness, Harness) {
    let mut links = crate::engine::handover::mesh::<FakeFrame>(2)
        .unwrap()
        .into_iter();
    // One tunnel list for both, as the control thread hands out.
    let list = two_tunnels();
    let a = Harness::new(Setup {
        spread: links.next(),
        tunnels: list.clone(),
        ..Setup::default()
    });
    let b = Harness::new(Setup {
        spread: links.next(),
        tunnels: list,
        first_frame: 1000,
        queue: 1,
        ..Setup::default()
    });
    (a, b)
}

#[test]
fn a_hand_over_brings_its_frames_back() {
    let (mut a, mut b) = pair();
    // Thirty flows, all received by worker a: the ones that hash to b are
    // handed over, written by b, and their frames come back to a.
    let n = 30u16;
    for sport in 0..n {
        assert!(a
            .sock
            .receive_packet(&outer(REMOTE, 4, &udp(5000 + sport, &[3; 40]))));
    }
    for _ in 0..20 {
        a.step();
        b.step();
        a.dev.finish_writes(usize::MAX, None);
        b.dev.finish_writes(usize::MAX, None);
    }
    let (la, lb) = (&a.run.st.local, &b.run.st.local);
    assert!(la.spread_out > 0, "some flows hash to b");
    assert!(la.spread_out < u64::from(n), "some stay with a");
    assert_eq!(la.spread_out, lb.spread_in, "what a hands over, b writes");
    assert_eq!(
        la.delivered,
        u64::from(n),
        "a counts every delivery, handed over or not"
    );
    assert_eq!(
        a.dev.packets_written() + b.dev.packets_written(),
        u64::from(n),
        "each written once"
    );
    assert!(
        b.dev
            .state
            .lock()
            .unwrap()
            .written
            .iter()
            .all(|(_, packets, _)| *packets == 1),
        "datagrams are not coalesced here"
    );
    assert_eq!(
        a.run.st.frames.at_peers, 0,
        "every frame back: {:?}",
        a.run.st.frames
    );
    a.check_ledger();
    b.check_ledger();
    a.check_accounting();
}

#[test]
fn the_stop_waits_for_frames_handed_over() {
    let (mut a, b) = pair();
    for sport in 0..20u16 {
        assert!(a
            .sock
            .receive_packet(&outer(REMOTE, 4, &udp(6000 + sport, &[3; 40]))));
    }
    a.step();
    assert!(a.run.st.frames.at_peers > 0, "handed over, not yet written");
    // Both stop, each on its own thread, while this one plays the kernel
    // and finishes whatever either writes.
    a.stop.store(true, Ordering::Relaxed);
    b.stop.store(true, Ordering::Relaxed);
    let (dev_a, dev_b, stats_a, sock_a) = (
        a.dev.clone(),
        b.dev.clone(),
        a.stats.clone(),
        a.sock.clone(),
    );
    let total = a.ids.len() as u64;
    let run = |mut r: Running<FakeSocket, FakeDevices>| {
        std::thread::spawn(move || {
            while r.step().unwrap() {}
            r.finish().unwrap();
        })
    };
    let (ta, tb) = (run(a.run), run(b.run));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !(ta.is_finished() && tb.is_finished()) {
        assert!(std::time::Instant::now() < deadline, "the workers stop");
        dev_a.finish_writes(usize::MAX, None);
        dev_b.finish_writes(usize::MAX, None);
        std::thread::yield_now();
    }
    ta.join().unwrap();
    tb.join().unwrap();
    let f = published_frames(&stats_a);
    assert_eq!(f.at_peers, 0, "every frame handed over came back: {f:?}");
    assert_eq!(f.in_flight, 0, "{f:?}");
    assert_eq!(f.free + f.in_kernel + f.in_tx, total, "{f:?}");
    assert_eq!(sock_a.ids().len() as u64, f.in_kernel + f.in_tx);
    assert_eq!(
        dev_a.packets_written() + dev_b.packets_written(),
        20,
        "every datagram written once"
    );
}

#[test]
fn a_reload_drains_before_it_switches() {
    let mut h = Harness::new(Setup::default());
    // Writes in flight on the old devices.
    for sport in 0..5u16 {
        assert!(h
            .sock
            .receive_packet(&outer(REMOTE, 4, &udp(7000 + sport, &[9; 30]))));
    }
    h.step();
    assert_eq!(h.dev.state.lock().unwrap().in_flight.len(), 5);
    // A read of tunnel 0's device that finishes with a packet as the
    // reads are cancelled: sent with the old list, before the switch.
    h.dev.state.lock().unwrap().read_at_cancel = Some((0, {
        let mut v = vec![0u8; VNET_HDR_LEN];
        v.extend(udp(8000, &[4; 20]));
        v
    }));
    // The new list: tunnel 0 keeps its device and goes to another remote.
    let (done_tx, done_rx) = crossbeam::channel::bounded(1);
    h.control
        .send(Reconfig {
            tunnels: tunnels(vec![ipip("a", [192, 168, 0, 77])]),
            devices: vec![DeviceQueue::Keep(0)],
            counters_from: vec![Some(0)],
            done: done_tx,
        })
        .unwrap();
    for _ in 0..200 {
        h.step();
        if !done_rx.is_empty() {
            break;
        }
    }
    assert_eq!(done_rx.try_recv().expect("answered"), Ok(()), "switched");
    let events = h.dev.state.lock().unwrap().events.clone();
    let switch = events
        .iter()
        .position(|e| *e == Event::FilesUpdated)
        .expect("files replaced");
    let writes_before = events[..switch]
        .iter()
        .filter(|e| matches!(e, Event::WriteDone(..)))
        .count();
    assert_eq!(
        writes_before, 5,
        "every old write finished first: {events:?}"
    );
    assert_eq!(h.run.st.local.delivered, 5);
    // The read taken at the cancel left with the old tunnel's remote.
    h.settle();
    h.sock.send(usize::MAX);
    let sent = h.sock.state.lock().unwrap().sent.clone();
    assert_eq!(sent.len(), 1, "the read was sent");
    let s = etherparse::SlicedPacket::from_ethernet(&sent[0]).unwrap();
    let Some(etherparse::NetSlice::Ipv4(ip)) = s.net else {
        panic!("IPv4")
    };
    assert_eq!(ip.header().destination(), REMOTE, "the old list's remote");
    // And a packet from the new remote is taken on the new list.
    assert!(h
        .sock
        .receive_packet(&outer([192, 168, 0, 77], 4, &udp(1, &[1; 10]))));
    h.settle();
    h.dev.finish_writes(usize::MAX, None);
    h.settle();
    assert_eq!(h.run.st.local.delivered, 6);
    h.check_ledger();
    h.check_accounting();
}

#[test]
fn a_device_read_is_encapsulated_and_sent_to_the_next_hop() {
    let mut h = Harness::new(Setup::default());
    h.step(); // reads armed
    let mut read = vec![0u8; VNET_HDR_LEN];
    read.extend(udp(4444, &[8; 50]));
    assert!(h.dev.device_sends(1, &read));
    h.settle();
    h.sock.send(usize::MAX);
    let sent = h.sock.state.lock().unwrap().sent.clone();
    assert_eq!(sent.len(), 1);
    let s = etherparse::SlicedPacket::from_ethernet(&sent[0]).unwrap();
    let Some(etherparse::LinkSlice::Ethernet2(eth)) = s.link else {
        panic!("Ethernet")
    };
    assert_eq!((eth.source(), eth.destination()), (GW_MAC, HOP_MAC));
    let Some(etherparse::NetSlice::Ipv4(ip)) = s.net else {
        panic!("IPv4")
    };
    assert_eq!(ip.header().protocol(), IpNumber(4));
    assert_eq!(
        ip.header().destination(),
        [192, 168, 0, 59],
        "tunnel b's remote"
    );
    assert_eq!(
        ip.payload().payload,
        &read[VNET_HDR_LEN..],
        "the inner packet as read"
    );
    h.settle();
    h.check_ledger();
    let l = &h.run.st.local;
    assert_eq!((l.tx_read, l.tx_sent), (1, 1));
}

#[test]
fn a_completion_of_an_unknown_read_file_is_not_a_panic() {
    // A read completion for a device slot past the list (a stale one after
    // a reload shrank it) is dropped as malformed, not indexed blindly.
    let mut h = Harness::new(Setup::default());
    h.step();
    h.dev.state.lock().unwrap().armed.insert(9);
    let mut read = vec![0u8; VNET_HDR_LEN];
    read.extend(udp(1, &[1; 10]));
    assert!(h.dev.device_sends(9, &read));
    h.settle();
    h.check_ledger();
    assert_eq!(h.run.st.local.drops[DropReason::TxMalformed as usize], 1);
    assert_eq!(h.dev.state.lock().unwrap().pool.len(), 8, "its buffer back");
}
