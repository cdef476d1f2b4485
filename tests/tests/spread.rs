//! Device writes spread over the workers by inner flow (`spread_writes`),
//! with real parts: a veth with two queues, the peer's XPS set so that every
//! tunnel packet lands on queue 0 (as a NIC that hashes the outer addresses
//! puts a whole tunnel on one queue), the gateway with a worker per queue.
//! The idle worker must take over part of the device writes, every packet
//! must arrive, and no flow may be reordered, through two reloads.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use gateway_tests::stats::{assert_accounting, u64_at, worker_sum};
use gateway_tests::{pkt, require_root, wait_until, Gateway, RawSocket, Wire};

const LOCAL: [u8; 4] = [192, 168, 0, 8];
const REMOTE: [u8; 4] = [192, 168, 0, 58];

const CONFIG: &str = r#"
[gateway]
poll = "adaptive"
xdp_mode = "native"
queues = "all"
spread_writes = true

[[tunnel]]
name = "gre-tap"
mode = "gre"
local = "192.168.0.8"
remote = "192.168.0.58"
mtu = 1400
device = "tap1"
address = "10.1.1.1"
peer = "10.1.1.2"

[[tunnel]]
name = "ipip-tun"
mode = "ipip"
local = "192.168.0.8"
remote = "192.168.0.58"
mtu = 1400
device = "tun2"
device_kind = "tun"
address = "20.1.1.1"
peer = "20.1.1.2"
"#;

/// A third tunnel, added and removed by the reloads during the traffic.
const EXTRA: &str = r#"
[[tunnel]]
name = "gre-extra"
mode = "gre"
key = 5
local = "192.168.0.8"
remote = "192.168.0.58"
device = "tun3"
device_kind = "tun"
address = "30.1.1.1"
peer = "30.1.1.2"
"#;

const GRE_FLOWS: u16 = 48;
const IPIP_FLOWS: u16 = 16;
const PER_FLOW: u32 = 500;
const RATE: f64 = 20_000.0;
const PAYLOAD: usize = 64;

/// The payload of packet `seq` of flow `flow`.
fn payload(flow: u16, seq: u32) -> Vec<u8> {
    let mut p = vec![0u8; PAYLOAD];
    p[..2].copy_from_slice(&flow.to_be_bytes());
    p[2..6].copy_from_slice(&seq.to_be_bytes());
    p
}

/// (flow, seq) of every datagram in captured packets that start with an IP
/// header at `l3`; a coalesced (UDP GSO) packet carries several payloads
/// back to back.
fn datagrams(frames: &[Vec<u8>], l3: usize) -> Vec<(u16, u32)> {
    let mut out = Vec::new();
    for f in frames {
        if f.len() < l3 + 28 || f[l3] >> 4 != 4 || f[l3 + 9] != 17 {
            continue;
        }
        let ihl = usize::from(f[l3] & 0x0f) * 4;
        for chunk in f[l3 + ihl + 8..].chunks(PAYLOAD) {
            if chunk.len() == PAYLOAD {
                let flow = u16::from_be_bytes([chunk[0], chunk[1]]);
                let seq = u32::from_be_bytes([chunk[2], chunk[3], chunk[4], chunk[5]]);
                out.push((flow, seq));
            }
        }
    }
    out
}

/// Sets which CPUs send by which TX queue of the peer's `ens0` (XPS:
/// queue, hexadecimal CPU mask), and so on which RX queue of the gateway's
/// end a packet arrives.
fn set_xps(wire: &Wire, map: &[(u32, &str)]) {
    for (q, cpus) in map {
        let (ok, out) = wire.peer.exec(&[
            "sh",
            "-c",
            &format!("echo {cpus} > /sys/class/net/ens0/queues/tx-{q}/xps_cpus"),
        ]);
        assert!(ok, "setting XPS: {out}");
    }
}

/// Every flow's datagrams arrived, each once, in the order sent; all of
/// them when `complete`, else (the kernel dropped some before the gateway
/// saw them) with gaps.
fn assert_in_order(what: &str, seen: &[(u16, u32)], flows: std::ops::Range<u16>, complete: bool) {
    let mut next: HashMap<u16, u32> = HashMap::new();
    for &(flow, seq) in seen {
        let n = next.entry(flow).or_insert(0);
        if complete {
            assert_eq!(
                seq, *n,
                "{what}: flow {flow} delivered packet {seq} where {n} was due"
            );
        } else {
            assert!(
                seq >= *n,
                "{what}: flow {flow} delivered packet {seq} after {} (reordered or twice)",
                *n - 1
            );
        }
        *n = seq + 1;
    }
    for flow in flows {
        if complete {
            assert_eq!(
                next.get(&flow).copied().unwrap_or(0),
                PER_FLOW,
                "{what}: flow {flow} incomplete"
            );
        } else {
            assert!(
                next.get(&flow).copied().unwrap_or(0) <= PER_FLOW,
                "{what}: flow {flow} has packets never sent"
            );
        }
    }
}

/// Frames the socket of `worker` dropped in the kernel for want of room
/// (ring full, no fill buffer): a worker falling behind the sender, which
/// a paced rate cannot rule out on a slower machine.
fn lost_in_kernel(worker: &serde_json::Value) -> u64 {
    u64_at(worker, &["xsk", "rx_dropped"]) + u64_at(worker, &["xsk", "rx_ring_full"])
}

/// Waits until the workers have delivered more than `since` packets, or
/// every sender is done; returns what they have delivered.
fn wait_for_progress(gw: &Gateway, since: u64, senders: &[std::thread::JoinHandle<()>]) -> u64 {
    let mut delivered = since;
    wait_until("traffic to be delivered", Duration::from_secs(20), || {
        let s = gw.stats();
        delivered = worker_sum(&s, "delivered");
        if delivered > since || senders.iter().all(|t| t.is_finished()) {
            Ok(())
        } else {
            Err(format!("{delivered} delivered: {s}"))
        }
    });
    delivered
}

#[test]
fn one_queue_s_writes_spread_over_both_workers_without_loss_or_reordering() {
    if !require_root("one_queue_s_writes_spread_over_both_workers_without_loss_or_reordering") {
        return;
    }
    let wire = Wire::with_queues("sp1", &[], 2);
    // Every packet the peer sends leaves by its TX queue 0 and so arrives on
    // the gateway's RX queue 0.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let all = format!("{:x}", (1u128 << cores.min(64)) - 1);
    set_xps(&wire, &[(0, all.as_str()), (1, "0")]);
    let gw = Gateway::start(&wire.gw, CONFIG);
    let gw_mac = wire.gw.mac("ens0");
    let tap = RawSocket::open(&wire.gw, "tap1", 64 << 20);
    let tun = RawSocket::open(&wire.gw, "tun2", 64 << 20);
    let quiet = Duration::from_secs(4);
    let tap_cap = std::thread::spawn(move || tap.receive(usize::MAX, quiet));
    let tun_cap = std::thread::spawn(move || tun.receive(usize::MAX, quiet));

    let tx = RawSocket::open(&wire.peer, "ens0", 1 << 20);
    let total = u64::from(GRE_FLOWS + IPIP_FLOWS) * u64::from(PER_FLOW);
    let senders = [send_flows(tx, gw_mac, 0..GRE_FLOWS + IPIP_FLOWS, RATE, 0)];
    // Two reloads while the traffic flows, with traffic before, between
    // and after them: each worker changes tunnel lists at its own moment,
    // so writes handed over cross a change.
    let delivered = wait_for_progress(&gw, 0, &senders);
    gw.write_config(&format!("{CONFIG}{EXTRA}"));
    let (ok, out) = gw.reload(&wire.gw);
    assert!(ok, "reload adding a tunnel: {out}\nlog:\n{}", gw.log());
    wait_for_progress(&gw, delivered, &senders);
    gw.write_config(CONFIG);
    let (ok, out) = gw.reload(&wire.gw);
    assert!(ok, "reload removing it: {out}\nlog:\n{}", gw.log());
    for s in senders {
        s.join().unwrap();
    }

    let tap_seen = datagrams(&tap_cap.join().unwrap(), 14);
    let tun_seen = datagrams(&tun_cap.join().unwrap(), 0);
    let s = gw.settled_stats();
    eprintln!("stats {s}");

    assert_eq!(u64_at(&s, &["xdp", "redirected"]), total, "{s}");
    let workers = s["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2, "a worker per queue: {s}");
    let (busy, idle) = if u64_at(&workers[0], &["queue"]) == 0 {
        (&workers[0], &workers[1])
    } else {
        (&workers[1], &workers[0])
    };
    let lost = lost_in_kernel(busy);
    let received = u64_at(busy, &["rx_frames"]);
    assert_eq!(
        received + lost,
        total,
        "all on queue 0, received or dropped by the socket for want of room: {s}"
    );
    assert_eq!(
        u64_at(idle, &["rx_frames"]) + lost_in_kernel(idle),
        0,
        "queue 1 got nothing: {s}"
    );
    // The idle worker wrote part of queue 0's packets into the devices.
    let handed = u64_at(busy, &["spread_out"]);
    assert!(
        handed > received / 4 && handed < received * 3 / 4,
        "about half of the flows go to the other worker: {handed} of {received}"
    );
    // Written by the other worker, or (during the reloads) bounced back
    // and written by the receiving one.
    let bounced = u64_at(busy, &["spread_bounced"]);
    assert_eq!(u64_at(idle, &["spread_in"]) + bounced, handed, "{s}");
    // Everything received was delivered, and arrived.
    assert_eq!(worker_sum(&s, "delivered"), received, "{s}");
    assert_accounting(&s);
    assert_eq!(
        (tap_seen.len() + tun_seen.len()) as u64,
        received,
        "datagrams seen on the devices: {s}"
    );
    if lost > 0 {
        eprintln!("{lost} frames dropped by the socket for want of room");
    }
    assert_in_order("tap1", &tap_seen, 0..GRE_FLOWS, lost == 0);
    assert_in_order(
        "tun2",
        &tun_seen,
        GRE_FLOWS..GRE_FLOWS + IPIP_FLOWS,
        lost == 0,
    );
    eprintln!(
        "{handed} of {total} packets handed to the other worker ({bounced} bounced back across the reloads); {} datagrams in {} coalesced writes",
        worker_sum(&s, "coalesced") + worker_sum(&s, "coalesced_writes"),
        worker_sum(&s, "coalesced_writes")
    );

    let (status, last) = gw.stop_with(libc::SIGTERM);
    assert!(status.success(), "exit status {status}");
    let last = last.expect("final stats");
    for w in last["workers"].as_array().unwrap() {
        assert_eq!(u64_at(w, &["frames", "at_peers"]), 0, "{w}");
        assert_eq!(
            u64_at(w, &["frames", "free"]) + u64_at(w, &["frames", "in_kernel"]),
            u64_at(w, &["frames", "total"]),
            "every frame home at the stop: {w}"
        );
    }
}

/// Sends PER_FLOW packets of each flow in `flows` (GRE below GRE_FLOWS,
/// IPIP from there on), round-robin over the flows, at `rate` per second,
/// from a thread pinned to `cpu`.
fn send_flows(
    tx: RawSocket,
    gw_mac: [u8; 6],
    flows: std::ops::Range<u16>,
    rate: f64,
    cpu: usize,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        // SAFETY: a zeroed cpu_set_t is a valid empty set; the calls only
        // read and write this set and this thread's affinity.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
        let start = Instant::now();
        let mut i = 0u64;
        for seq in 0..PER_FLOW {
            for flow in flows.clone() {
                let frame = if flow < GRE_FLOWS {
                    let inner = pkt::udp(
                        [10, 1, 1, 2],
                        [10, 1, 1, 1],
                        1000 + flow,
                        9,
                        &payload(flow, seq),
                    );
                    pkt::outer(
                        gw_mac,
                        REMOTE,
                        LOCAL,
                        47,
                        &pkt::gre(0, 0x0800, 0, 0, &inner),
                    )
                } else {
                    let inner = pkt::udp(
                        [20, 1, 1, 2],
                        [20, 1, 1, 1],
                        1000 + flow,
                        9,
                        &payload(flow, seq),
                    );
                    pkt::outer(gw_mac, REMOTE, LOCAL, 4, &inner)
                };
                tx.send(&frame);
                i += 1;
                if i.is_multiple_of(64) {
                    let due = Duration::from_secs_f64(i as f64 / rate);
                    if let Some(wait) = due.checked_sub(start.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
            }
        }
    })
}

/// Three workers, two of them receiving (the peer's XPS sends what CPU 0
/// sends by TX queue 0 and what CPU 1 sends by TX queue 1), so every worker
/// hands writes to the others while three reloads run; the first puts a
/// tunnel in front of the others, so a write made with a stale tunnel
/// index would land in the wrong device and show here.
#[test]
fn three_workers_hand_writes_to_each_other_through_reloads() {
    if !require_root("three_workers_hand_writes_to_each_other_through_reloads") {
        return;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores < 2 {
        eprintln!("skipped: needs 2 cores");
        return;
    }
    let wire = Wire::with_queues("sp3", &[], 3);
    set_xps(&wire, &[(0, "1"), (1, "2"), (2, "0")]);
    let config = CONFIG.replace("queues = \"all\"", "queues = \"all\"\ncores = [1, 0]");
    let gw = Gateway::start(&wire.gw, &config);
    let gw_mac = wire.gw.mac("ens0");
    let tap = RawSocket::open(&wire.gw, "tap1", 64 << 20);
    let tun = RawSocket::open(&wire.gw, "tun2", 64 << 20);
    let quiet = Duration::from_secs(4);
    let tap_cap = std::thread::spawn(move || tap.receive(usize::MAX, quiet));
    let tun_cap = std::thread::spawn(move || tun.receive(usize::MAX, quiet));

    let all = GRE_FLOWS + IPIP_FLOWS;
    let total = u64::from(all) * u64::from(PER_FLOW);
    // Each sender takes half the GRE and half the IPIP flows.
    let half_gre = GRE_FLOWS / 2;
    let half_ipip = GRE_FLOWS + IPIP_FLOWS / 2;
    let senders = [
        send_flows(
            RawSocket::open(&wire.peer, "ens0", 1 << 20),
            gw_mac,
            0..half_gre,
            RATE / 4.0,
            0,
        ),
        send_flows(
            RawSocket::open(&wire.peer, "ens0", 1 << 20),
            gw_mac,
            half_gre..GRE_FLOWS,
            RATE / 4.0,
            1,
        ),
        send_flows(
            RawSocket::open(&wire.peer, "ens0", 1 << 20),
            gw_mac,
            GRE_FLOWS..half_ipip,
            RATE / 4.0,
            0,
        ),
        send_flows(
            RawSocket::open(&wire.peer, "ens0", 1 << 20),
            gw_mac,
            half_ipip..all,
            RATE / 4.0,
            1,
        ),
    ];
    let extra_first = format!(
        "{}{EXTRA}{}",
        &CONFIG[..CONFIG.find("[[tunnel]]").unwrap()],
        &CONFIG[CONFIG.find("[[tunnel]]").unwrap()..]
    )
    .replace("queues = \"all\"", "queues = \"all\"\ncores = [1, 0]");
    // Each reload after more traffic has been delivered.
    let mut delivered = 0;
    for (i, c) in [&extra_first, &config, &extra_first]
        .into_iter()
        .enumerate()
    {
        delivered = wait_for_progress(&gw, delivered, &senders);
        gw.write_config(c);
        let (ok, out) = gw.reload(&wire.gw);
        assert!(ok, "reload {i}: {out}\nlog:\n{}", gw.log());
    }
    for s in senders {
        s.join().unwrap();
    }

    let tap_seen = datagrams(&tap_cap.join().unwrap(), 14);
    let tun_seen = datagrams(&tun_cap.join().unwrap(), 0);
    let s = gw.settled_stats();
    eprintln!("stats {s}");
    assert_eq!(u64_at(&s, &["xdp", "redirected"]), total, "{s}");
    let workers = s["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 3, "a worker per queue: {s}");
    let lost: u64 = workers.iter().map(lost_in_kernel).sum();
    let received = worker_sum(&s, "rx_frames");
    assert_eq!(
        received + lost,
        total,
        "received or dropped by the socket for want of room: {s}"
    );
    let receiving = workers
        .iter()
        .filter(|w| u64_at(w, &["rx_frames"]) > 0)
        .count();
    assert!(receiving >= 2, "two queues got traffic: {s}");
    for w in workers {
        assert!(
            u64_at(w, &["spread_in"]) > 0,
            "every worker wrote for another: {w}"
        );
    }
    assert_eq!(
        worker_sum(&s, "spread_in") + worker_sum(&s, "spread_bounced"),
        worker_sum(&s, "spread_out"),
        "{s}"
    );
    // Everything received was delivered, and arrived.
    assert_eq!(worker_sum(&s, "delivered"), received, "{s}");
    assert_accounting(&s);
    assert_eq!(
        (tap_seen.len() + tun_seen.len()) as u64,
        received,
        "datagrams seen on the devices: {s}"
    );
    if lost > 0 {
        eprintln!("{lost} frames dropped by the socket for want of room");
    }
    assert_in_order("tap1", &tap_seen, 0..GRE_FLOWS, lost == 0);
    assert_in_order("tun2", &tun_seen, GRE_FLOWS..all, lost == 0);
    eprintln!(
        "handed over {}, bounced back {}, per worker received {:?}",
        worker_sum(&s, "spread_out"),
        worker_sum(&s, "spread_bounced"),
        workers
            .iter()
            .map(|w| u64_at(w, &["rx_frames"]))
            .collect::<Vec<_>>()
    );
    let (status, _) = gw.stop_with(libc::SIGTERM);
    assert!(status.success(), "exit status {status}");
}

/// A frame of one worker's UMEM that reaches another worker's socket (a
/// bug, injected here: the writing worker keeps a frame it was handed) never
/// reaches that socket's rings: the worker stops with the reason, the
/// gateway exits with an error, and it leaves nothing behind.
#[test]
fn a_frame_of_another_umem_never_reaches_a_socket() {
    if !require_root("a_frame_of_another_umem_never_reaches_a_socket") {
        return;
    }
    let wire = Wire::with_queues("spf", &[], 2);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let all = format!("{:x}", (1u128 << cores.min(64)) - 1);
    set_xps(&wire, &[(0, all.as_str()), (1, "0")]);
    let mut gw = Gateway::start_wrapped(
        &wire.gw,
        CONFIG,
        &["env", "GATEWAY_FAULT_KEEP_FOREIGN_FRAME=1"],
        &[],
    );
    let gw_mac = wire.gw.mac("ens0");
    let tx = RawSocket::open(&wire.peer, "ens0", 1 << 20);
    // Many flows: some hash to the other worker, which gets their frames.
    send_flows(tx, gw_mac, 0..GRE_FLOWS, RATE, 0)
        .join()
        .unwrap();
    let status = gw
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("still running with a foreign frame:\n{}", gw.log()));
    assert!(!status.success(), "exit status {status:?}");
    let log = gw.log();
    assert!(
        log.contains("frames never cross workers"),
        "the worker did not stop on the foreign frame: {log}"
    );
    assert!(!wire.gw.has_xdp("ens0"), "XDP program left attached");
}
