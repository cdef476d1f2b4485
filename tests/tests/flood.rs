//! Hostile input at full rate: a flood of spoofed, truncated, malformed
//! and oversized tunnel packets from the wire, as fast as one sender can
//! make them, while a legitimate tunnel carries traffic. The gateway must
//! neither crash nor stop carrying the legitimate tunnel, count every
//! packet it received (delivered, or dropped under the reason each kind of
//! garbage deserves), and keep every UMEM frame accounted for.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway_tests::stats::{assert_accounting, drops, total_drops, tunnel_rx, u64_at, worker_sum};
use gateway_tests::{pkt, require_root, Gateway, RawSocket, Wire};

const LOCAL: [u8; 4] = [192, 168, 0, 8];
const REMOTE: [u8; 4] = [192, 168, 0, 58];

/// tun100 (GRE, into a tap) takes the flood; tun200 (IPIP, into a tun)
/// carries only legitimate traffic.
const CONFIG: &str = r#"
[gateway]
poll = "busy"

[[tunnel]]
name = "tun100"
mode = "gre"
local = "192.168.0.8"
remote = "192.168.0.58"
mtu = 1400
device = "tap1"
address = "10.1.1.1"
peer = "10.1.1.2"

[[tunnel]]
name = "tun200"
mode = "ipip"
local = "192.168.0.8"
remote = "192.168.0.58"
mtu = 1400
device = "tun2"
device_kind = "tun"
address = "20.1.1.1"
peer = "20.1.1.2"
"#;

/// One kind of garbage and the drop reason it must be counted under.
struct Garbage {
    reason: &'static str,
    frame: Vec<u8>,
}

fn garbage(gw_mac: [u8; 6]) -> Vec<Garbage> {
    let udp = |src: [u8; 4], len: usize| pkt::udp(src, [10, 1, 1, 1], 9, 9, &vec![0x5a; len]);
    let gre = |inner: &[u8]| pkt::gre(0, 0x0800, 0, 0, inner);
    let frame = |proto: u8, payload: &[u8]| pkt::outer(gw_mac, REMOTE, LOCAL, proto, payload);
    let mut out = vec![
        // Spoofed: the right outer addresses, an inner source that is not
        // the tunnel's peer.
        Garbage {
            reason: "inner_source_not_peer",
            frame: frame(47, &gre(&udp([6, 6, 6, 6], 18))),
        },
        // Spoofed: a key the keyless tunnel does not have.
        Garbage {
            reason: "key_mismatch",
            frame: frame(
                47,
                &pkt::gre(0x2000, 0x0800, 77, 0, &udp([10, 1, 1, 2], 18)),
            ),
        },
        // Truncated: a GRE header cut short.
        Garbage {
            reason: "gre_truncated",
            frame: frame(47, &[0x20, 0x00]),
        },
        // Malformed: GRE version 1 (PPTP).
        Garbage {
            reason: "gre_version",
            frame: frame(47, &pkt::gre(0x0001, 0x0800, 0, 0, &udp([10, 1, 1, 2], 18))),
        },
        // Malformed inner packet: an IPv4 header length of 3 words.
        Garbage {
            reason: "inner_malformed",
            frame: {
                let mut inner = udp([10, 1, 1, 2], 18);
                inner[0] = 0x43;
                frame(47, &gre(&inner))
            },
        },
        // Oversized: an inner packet larger than the tunnel MTU (1400).
        Garbage {
            reason: "inner_too_big",
            frame: frame(47, &gre(&udp([10, 1, 1, 2], 1420))),
        },
        // Truncated IPIP: the inner header cut after 8 bytes.
        Garbage {
            reason: "inner_malformed",
            frame: frame(4, &udp([20, 1, 1, 2], 18)[..8]),
        },
    ];
    // A corrupted outer header checksum.
    let mut bad = frame(47, &gre(&udp([10, 1, 1, 2], 18)));
    bad[24] ^= 0xff;
    out.push(Garbage {
        reason: "outer_checksum",
        frame: bad,
    });
    out
}

#[test]
fn a_full_rate_flood_of_garbage_is_counted_and_the_tunnels_keep_working() {
    if !require_root("a_full_rate_flood_of_garbage_is_counted_and_the_tunnels_keep_working") {
        return;
    }
    let wire = Wire::new("fl", &[]);
    let gw = Gateway::start(&wire.gw, CONFIG);
    let gw_mac = wire.gw.mac("ens0");
    let kinds = garbage(gw_mac);
    let frames: Vec<Vec<u8>> = kinds.iter().map(|g| g.frame.clone()).collect();

    // The flood: as fast as sendmmsg goes, for 3 s.
    let stop = Arc::new(AtomicBool::new(false));
    let flood_sent = Arc::new(AtomicU64::new(0));
    let flood = {
        let sock = RawSocket::open(&wire.peer, "ens0", 1 << 20);
        let (stop, sent) = (stop.clone(), flood_sent.clone());
        let batch: Vec<Vec<u8>> = frames.iter().cycle().take(64).cloned().collect();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                sent.fetch_add(sock.send_batch(&batch) as u64, Ordering::Relaxed);
            }
        })
    };
    // The way out at full rate too: UDP into both tunnels from the
    // gateway's side, as fast as the sockets take it.
    let outbound = {
        let stop = stop.clone();
        wire.gw.spawn(move || {
            let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for dst in ["10.1.1.2:7000", "20.1.1.2:7000"] {
                    sent += u64::from(s.send_to(&[0u8; 64], dst).is_ok());
                }
            }
            sent
        })
    };
    // Legitimate traffic on tun200 at 2000 packets/s meanwhile.
    let legit = RawSocket::open(&wire.peer, "ens0", 1 << 20);
    let start = Instant::now();
    let mut legit_sent = 0u32;
    while start.elapsed() < Duration::from_secs(3) {
        let inner = pkt::udp(
            [20, 1, 1, 2],
            [20, 1, 1, 1],
            5000,
            6000,
            &legit_sent.to_be_bytes(),
        );
        if legit
            .try_send(&pkt::outer(gw_mac, REMOTE, LOCAL, 4, &inner))
            .is_ok()
        {
            legit_sent += 1;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    stop.store(true, Ordering::Relaxed);
    flood.join().unwrap();
    let out_sent = outbound.join().unwrap();
    let flooded = flood_sent.load(Ordering::Relaxed);

    let s = gw.settled_stats();
    eprintln!(
        "flood: {flooded} garbage frames sent in 3 s ({} per second), {legit_sent} legitimate",
        flooded / 3
    );
    eprintln!("{s}");

    // Alive, and everything it received is delivered or counted.
    assert_accounting(&s);
    let rx = worker_sum(&s, "rx_frames");
    let mut lost_in_kernel = 0;
    for w in s["workers"].as_array().unwrap() {
        lost_in_kernel += u64_at(w, &["xsk", "rx_dropped"]) + u64_at(w, &["xsk", "rx_ring_full"]);
    }
    assert_eq!(
        u64_at(&s, &["xdp", "redirected"]),
        rx + lost_in_kernel,
        "steered = received + dropped by the socket for want of room: {s}"
    );
    // Each kind of garbage under its own reason, and nothing else dropped.
    let mut expected: Vec<&str> = kinds.iter().map(|g| g.reason).collect();
    expected.sort();
    expected.dedup();
    let mut counted = 0;
    for r in &expected {
        assert!(drops(&s, r) > 0, "no {r} drops: {s}");
        counted += drops(&s, r);
    }
    assert_eq!(counted, total_drops(&s), "drops under other reasons: {s}");
    // Nothing the flood sent was delivered: tun100 got none of it.
    assert_eq!(tunnel_rx(&s, "tun100"), 0, "{s}");
    // The legitimate tunnel carried traffic throughout.
    let legit_rx = tunnel_rx(&s, "tun200");
    eprintln!(
        "legitimate: {legit_rx} of {legit_sent} delivered during the flood ({lost_in_kernel} frames of all kinds dropped by the full socket)"
    );
    assert!(legit_rx > 0, "the legitimate tunnel carried nothing: {s}");
    // A fair share: the way out, flooded too, must not take every frame
    // from the way in. (Before the way out was capped at half the frames,
    // its TX backlog held them all, the fill ring ran dry and 36 of 5,014
    // legitimate packets arrived; with the cap about two thirds do. Both
    // sides slow down together on a slower machine, so the ratio holds.)
    assert!(
        legit_rx * 10 >= u64::from(legit_sent),
        "the way in starved during the flood: {legit_rx} of {legit_sent} legitimate packets delivered: {s}"
    );
    if lost_in_kernel == 0 {
        assert_eq!(legit_rx, u64::from(legit_sent), "{s}");
    }

    // The way out carried both tunnels while the flood came in.
    let tx = |name: &str| {
        s["tunnels"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .map(|t| t["tx_packets"].as_u64().unwrap())
            .unwrap()
    };
    eprintln!(
        "way out: {out_sent} datagrams sent, {} and {} encapsulated",
        tx("tun100"),
        tx("tun200")
    );
    assert!(tx("tun100") > 0 && tx("tun200") > 0, "{s}");

    // And afterwards both tunnels work as before: every packet arrives,
    // each once, at the application. (Counted by sockets, not by a capture
    // on the devices: two datagrams of the flow that reach one RX batch
    // are coalesced into one UDP GSO packet, which a capture sees as one
    // frame and the kernel delivers as two datagrams.)
    let listen = |addr: &'static str| {
        wire.gw.run(move || {
            let s = std::net::UdpSocket::bind(addr).expect("bind");
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            s
        })
    };
    let (on_tap, on_tun) = (listen("10.1.1.1:6100"), listen("20.1.1.1:6100"));
    let sock = RawSocket::open(&wire.peer, "ens0", 1 << 20);
    for i in 0..200u32 {
        let a = pkt::udp([10, 1, 1, 2], [10, 1, 1, 1], 5000, 6100, &i.to_be_bytes());
        sock.send(&pkt::outer(
            gw_mac,
            REMOTE,
            LOCAL,
            47,
            &pkt::gre(0, 0x0800, 0, 0, &a),
        ));
        let b = pkt::udp([20, 1, 1, 2], [20, 1, 1, 1], 5000, 6100, &i.to_be_bytes());
        sock.send(&pkt::outer(gw_mac, REMOTE, LOCAL, 4, &b));
        std::thread::sleep(Duration::from_micros(200));
    }
    // Each of 0..200 once on each socket; waits until 200 came or nothing
    // came for 2 s.
    let received = |s: &std::net::UdpSocket| {
        let mut seen = Vec::new();
        let mut quiet_since = Instant::now();
        let mut buf = [0u8; 64];
        while seen.len() < 200 && quiet_since.elapsed() < Duration::from_secs(2) {
            if let Ok(4) = s.recv(&mut buf) {
                seen.push(u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]));
                quiet_since = Instant::now();
            }
        }
        seen.sort_unstable();
        seen
    };
    let all: Vec<u32> = (0..200).collect();
    let (got_tap, got_tun) = (received(&on_tap), received(&on_tun));
    let after = gw.settled_stats();
    assert_eq!(got_tap, all, "through tun100 (tap): {after}");
    assert_eq!(got_tun, all, "through tun200 (tun): {after}");
    assert_accounting(&after);
    assert_eq!(tunnel_rx(&after, "tun100"), 200);
    assert_eq!(tunnel_rx(&after, "tun200"), legit_rx + 200);
}
