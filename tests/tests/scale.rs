//! Thousands of tunnels on one gateway: half keyed between the same two
//! hosts, half from distinct remotes. A packet on the last keyed tunnel
//! and one from the last remote reach their own devices; a key no tunnel
//! has is dropped as `key_mismatch`; a reload that adds a tunnel while
//! packets flow on others loses none of them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use gateway_tests::pkt::{gre, icmp_echo, outer};
use gateway_tests::stats::{drops, total_drops, worker_sum};
use gateway_tests::{parse_mac, require_root, Gateway, RawSocket, Wire};

/// Keyed tunnels, and as many from distinct remotes.
const HALF: usize = 1500;
const KEY_BASE: u32 = 1000;

fn remote(i: usize) -> [u8; 4] {
    [10, 200, (i >> 8) as u8, (i & 255) as u8]
}

fn config(extra: bool) -> String {
    let mut s = String::from("[gateway]\npoll = \"adaptive\"\n");
    for i in 0..HALF {
        s.push_str(&format!(
            "[[tunnel]]\nname = \"k{i}\"\nmode = \"gre\"\nlocal = \"192.168.0.8\"\nremote = \"192.168.0.58\"\nkey = {}\nmtu = 1400\ndevice = \"kd{i}\"\ndevice_kind = \"{}\"\n",
            KEY_BASE + i as u32,
            if i % 2 == 0 { "tap" } else { "tun" }
        ));
    }
    for i in 0..HALF {
        let [a, b, c, d] = remote(i);
        s.push_str(&format!(
            "[[tunnel]]\nname = \"r{i}\"\nmode = \"gre\"\nlocal = \"192.168.0.8\"\nremote = \"{a}.{b}.{c}.{d}\"\nmtu = 1400\ndevice = \"rd{i}\"\ndevice_kind = \"{}\"\n",
            if i % 2 == 0 { "tap" } else { "tun" }
        ));
    }
    if extra {
        s.push_str("[[tunnel]]\nname = \"added\"\nmode = \"gre\"\nlocal = \"192.168.0.8\"\nremote = \"10.201.0.1\"\nmtu = 1400\ndevice = \"added\"\ndevice_kind = \"tun\"\n");
    }
    s
}

/// A GRE packet from `src` (with `key`, if any) carrying an ICMP echo
/// whose payload is `tag`.
fn frame(gw_mac: [u8; 6], src: [u8; 4], key: Option<u32>, tag: &[u8]) -> Vec<u8> {
    let inner = icmp_echo([10, 1, 1, 2], [10, 1, 1, 1], 1, tag);
    let g = match key {
        Some(k) => gre(0x2000, 0x0800, k, 0, &inner),
        None => gre(0, 0x0800, 0, 0, &inner),
    };
    outer(gw_mac, src, [192, 168, 0, 8], 47, &g)
}

/// Whether a frame read from a device carries `tag`.
fn carries(frames: &[Vec<u8>], tag: &[u8]) -> bool {
    frames
        .iter()
        .any(|f| f.windows(tag.len()).any(|w| w == tag))
}

#[test]
fn thousands_of_tunnels_each_packet_to_its_own_device_and_a_reload_loses_nothing() {
    if !require_root(
        "thousands_of_tunnels_each_packet_to_its_own_device_and_a_reload_loses_nothing",
    ) {
        return;
    }
    let wire = Wire::new("scl", &[]);
    // The distinct remotes are routed through the peer.
    wire.gw
        .ip(&["route", "add", "10.200.0.0/15", "via", "192.168.0.58"]);
    let gw = Gateway::start_patient(&wire.gw, &config(false), Duration::from_secs(50));
    let gw_mac = parse_mac(
        wire.gw
            .ip(&["-br", "link", "show", "ens0"])
            .split_whitespace()
            .nth(2)
            .expect("MAC"),
    );
    let tx = RawSocket::open(&wire.peer, "ens0", 1 << 20);
    let last = HALF - 1;

    // The last keyed tunnel (tun) and the last remote (tun) each get their
    // packet, and no other device does.
    let keyed_dev = RawSocket::open(&wire.gw, &format!("kd{last}"), 1 << 20);
    let remote_dev = RawSocket::open(&wire.gw, &format!("rd{last}"), 1 << 20);
    let other_dev = RawSocket::open(&wire.gw, "kd1", 1 << 20);
    tx.send(&frame(
        gw_mac,
        [192, 168, 0, 58],
        Some(KEY_BASE + last as u32),
        b"scale-last-keyed",
    ));
    tx.send(&frame(gw_mac, remote(last), None, b"scale-last-remote"));
    // (`receive` returns once nothing more came for this long: generous,
    // so a slow machine still delivers in time.)
    let got = keyed_dev.receive(8, Duration::from_secs(2));
    assert!(
        carries(&got, b"scale-last-keyed"),
        "the packet with key {} did not reach kd{last}: {got:?}",
        KEY_BASE + last as u32
    );
    assert!(!carries(&got, b"scale-last-remote"), "{got:?}");
    let got = remote_dev.receive(8, Duration::from_secs(2));
    assert!(
        carries(&got, b"scale-last-remote"),
        "the packet from {:?} did not reach rd{last}: {got:?}",
        remote(last)
    );
    let got = other_dev.receive(8, Duration::from_millis(200));
    assert!(
        !carries(&got, b"scale-last-keyed") && !carries(&got, b"scale-last-remote"),
        "kd1 got another tunnel's packet: {got:?}"
    );

    // A key no tunnel has, between the two hosts: key_mismatch.
    let before = gw.settled_stats();
    tx.send(&frame(
        gw_mac,
        [192, 168, 0, 58],
        Some(999_999),
        b"scale-no-key",
    ));
    let after = gw.settled_stats_after(&before);
    assert_eq!(
        drops(&after, "key_mismatch") - drops(&before, "key_mismatch"),
        1,
        "{after}"
    );

    // A reload that adds a tunnel while packets flow on 10 keyed tunnels
    // and 10 remotes (about 10,000 packets a second): every one delivered.
    // (The devices that stay keep their reads armed; only the new one is
    // registered, so the worker's pause does not grow with the devices.)
    let before = gw.settled_stats();
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let stop = stop.clone();
        let frames: Vec<Vec<u8>> = (0..10)
            .flat_map(|i| {
                [
                    frame(
                        gw_mac,
                        [192, 168, 0, 58],
                        Some(KEY_BASE + 97 * i),
                        b"scale-flow",
                    ),
                    frame(gw_mac, remote(97 * i as usize), None, b"scale-flow"),
                ]
            })
            .collect();
        let tx = RawSocket::open(&wire.peer, "ens0", 1 << 20);
        std::thread::spawn(move || {
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) || sent < 2000 {
                for f in &frames {
                    tx.send(f);
                    sent += 1;
                }
                // A steady trickle, not a flood: the loss looked for is the
                // reload's, not a full ring's.
                std::thread::sleep(Duration::from_millis(2));
            }
            sent
        })
    };
    gw.write_config(&config(true));
    let (ok, said) = gw.reload(&wire.gw);
    assert!(ok && said.contains("added added"), "{said}");
    stop.store(true, Ordering::Relaxed);
    let sent = sender.join().expect("sender");
    let after = gw.settled_stats_after(&before);
    let delivered = worker_sum(&after, "delivered") - worker_sum(&before, "delivered");
    assert_eq!(
        total_drops(&after) - total_drops(&before),
        0,
        "drops during the reload: {after}"
    );
    assert_eq!(
        delivered, sent,
        "{sent} packets sent on 20 tunnels across the reload, {delivered} delivered: {after}"
    );
    assert_eq!(
        after["tunnels"].as_array().map(Vec::len),
        Some(2 * HALF + 1)
    );
}
