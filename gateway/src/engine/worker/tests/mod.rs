//! The worker's decisions, run on fakes of the socket and the devices
//! (see [`fake`]), without root: where a coalescing run ends, that a
//! hand-over brings its frames back, that a reload drains before it
//! switches, and, over random sequences of events, that every frame is in
//! exactly one place and every packet is delivered or counted. Packets
//! are built by etherparse.

mod decisions;
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
        keepalive: None,
    };
    (rx, tx)
}

/// The MAC of the gretap tunnel's tap, and the MAC the far side stands
/// behind.
pub(super) const TAP_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x7a];
pub(super) const PEER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x7b];

/// An IPIP tunnel into a tap device (the gateway plays the far side on
/// the tap's segment), between LOCAL and `remote`, with the tap's address
/// 10.9.0.1 and the peer 10.9.0.2 (whose MAC the gateway answers ARP for).
fn ipip_tap(name: &str, remote: [u8; 4]) -> (TunnelRx, TunnelTx) {
    let (mut rx, mut tx) = ipip(name, remote);
    rx.device_kind = DeviceKind::Tap;
    tx.device_kind = DeviceKind::Tap;
    rx.device_mac = TAP_MAC;
    tx.device_mac = TAP_MAC;
    rx.peer_mac = PEER_MAC;
    tx.peer_mac = PEER_MAC;
    tx.address = Some(Ipv4Addr::new(10, 9, 0, 1).into());
    tx.peer = Some(Ipv4Addr::new(10, 9, 0, 2).into());
    (rx, tx)
}

/// A gretap tunnel (Ethernet frames both ways) into a tap device.
fn gretap(name: &str, remote: [u8; 4]) -> (TunnelRx, TunnelTx) {
    let (mut rx, mut tx) = ipip_tap(name, remote);
    rx.mode = Mode::Gretap;
    tx.mode = Mode::Gretap;
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
        names: Arc::new(
            (0..n)
                .map(|i| Arc::from(format!("t{i}").as_str()))
                .collect(),
        ),
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
    /// Each worker's frame numbers, by worker (with `spread`).
    pub peers: Vec<std::ops::Range<u32>>,
    pub multishot: bool,
    pub coalesce_udp: bool,
    /// This worker sends the tunnels' keepalives.
    pub keepalives: bool,
    /// The captures and traces this worker serves.
    pub taps: Arc<Taps>,
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
            peers: Vec::new(),
            multishot: true,
            coalesce_udp: false,
            keepalives: false,
            taps: Arc::new(Taps::new(1)),
        }
    }
}

impl Harness {
    pub fn new(s: Setup) -> Harness {
        let (sock, frames) = FakeSocket::new(s.first_frame, s.frames, s.ring);
        let dev = FakeDevices::new(s.sq, s.read_bufs, s.first_frame..s.first_frame + s.frames);
        {
            let mut d = dev.state.lock().unwrap();
            d.multishot = s.multishot;
            d.peers = s.peers.clone();
        }
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
                coalesce_udp: s.coalesce_udp,
                keepalives: s.keepalives,
                flow_seed: 0,
                faults: Faults::NONE,
            },
            sock.clone(),
            frames,
            (0..ntun).map(|_| device_fd()).collect(),
            Shared {
                tunnels: s.tunnels,
                stop: stop.clone(),
                control: control_rx,
                taps: s.taps.clone(),
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
        v.extend(st.tx_control.iter().map(|f| f.id));
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
                + l.keepalive_replies
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

    /// The ledger holds: each of this worker's frames is in exactly one
    /// place, and the worker's counts say where.
    pub fn check_ledger(&self) {
        let mut all = self.own_ids();
        all.extend(self.sock.ids());
        all.extend(self.dev.ids());
        all.sort_unstable();
        let want: Vec<u32> = self.ids.clone().collect();
        assert_eq!(all, want, "every frame in exactly one place");
        assert_eq!(
            self.dev.state.lock().unwrap().refused,
            0,
            "a write the real ring would refuse"
        );
        let f = &self.run.st.frames;
        assert!(f.balanced(), "{f:?}");
        assert_eq!(f.in_kernel, self.sock.in_kernel() as u64, "in_kernel {f:?}");
        assert_eq!(f.in_tx, self.sock.in_tx() as u64, "in_tx {f:?}");
        assert_eq!(f.at_peers, 0, "{f:?}");
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
            let gso_size = u16::from_ne_bytes([bytes[4], bytes[5]]);
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
    let peers = vec![0..64, 1000..1064];
    let a = Harness::new(Setup {
        spread: links.next(),
        tunnels: list.clone(),
        peers: peers.clone(),
        ..Setup::default()
    });
    let b = Harness::new(Setup {
        spread: links.next(),
        tunnels: list,
        peers,
        first_frame: 1000,
        queue: 1,
        ..Setup::default()
    });
    (a, b)
}

/// Stops two workers of a mesh, each on its own thread (a worker's stop
/// waits for the frames it handed over), while this thread plays the
/// kernel and finishes whatever either writes.
pub(super) fn stop_both(a: Harness, b: Harness) {
    a.stop.store(true, Ordering::Relaxed);
    b.stop.store(true, Ordering::Relaxed);
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
        a.dev.finish_writes(usize::MAX, None);
        b.dev.finish_writes(usize::MAX, None);
        // (Not a wait for a time: the loop plays the kernel, and leaves
        // the cores to the two workers most of the while.)
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    ta.join().unwrap();
    tb.join().unwrap();
}
