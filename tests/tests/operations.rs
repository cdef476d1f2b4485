//! Running it for real: live reload, devices deleted from under the
//! gateway, the underlay going down and up, another XDP program taking the
//! interface, a worker that panics, a kernel without AF_XDP. Each test
//! keeps traffic flowing while it does its damage, then checks the state
//! the gateway (or the host) is left in and that the counters add up.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway_tests::stats::{
    assert_accounting, drops, total_drops, total_tx_drops, tunnel_rx, u64_at, worker_sum,
};
use gateway_tests::{
    pkt, require_root, sh, wait_until, Gateway, NetNs, RawSocket, Wire, ONE_GRE_TUNNEL,
};
use serde_json::Value;

const LOCAL: [u8; 4] = [192, 168, 0, 8];
const REMOTE: [u8; 4] = [192, 168, 0, 58];

/// tun100 of ONE_GRE_TUNNEL, plus tun200 (IPIP into the tun device tun2).
const TWO_TUNNELS: &str = r#"
[gateway]
poll = "adaptive"

[[tunnel]]
name = "tun100"
mode = "gre"
local = "192.168.0.8"
remote = "192.168.0.58"
ttl = 64
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

/// A GRE packet for tun100 carrying UDP to port `dport`, numbered `seq`.
fn gre_udp(gw_mac: [u8; 6], dport: u16, seq: u32) -> Vec<u8> {
    let inner = pkt::udp(
        [10, 1, 1, 2],
        [10, 1, 1, 1],
        5000,
        dport,
        &seq.to_be_bytes(),
    );
    pkt::outer(
        gw_mac,
        REMOTE,
        LOCAL,
        47,
        &pkt::gre(0, 0x0800, 0, 0, &inner),
    )
}

/// An IPIP packet for tun200 carrying UDP to port `dport`.
fn ipip_udp(gw_mac: [u8; 6], dport: u16, seq: u32) -> Vec<u8> {
    let inner = pkt::udp(
        [20, 1, 1, 2],
        [20, 1, 1, 1],
        5000,
        dport,
        &seq.to_be_bytes(),
    );
    pkt::outer(gw_mac, REMOTE, LOCAL, 4, &inner)
}

/// Sends `n` frames made by `frame(i)` from the peer's ens0 at `pps`, on a
/// thread; the thread returns how many the kernel took (all of them,
/// unless the link was down).
fn stream(
    wire: &Wire,
    n: u32,
    pps: u32,
    frame: impl Fn(u32) -> Vec<u8> + Send + 'static,
) -> std::thread::JoinHandle<u32> {
    stream_counting_failures(wire, n, pps, frame).0
}

/// [`stream`], with a count of the sends that failed so far.
fn stream_counting_failures(
    wire: &Wire,
    n: u32,
    pps: u32,
    frame: impl Fn(u32) -> Vec<u8> + Send + 'static,
) -> (std::thread::JoinHandle<u32>, Arc<AtomicU32>) {
    let sock = RawSocket::open(&wire.peer, "ens0", 1 << 20);
    let failed = Arc::new(AtomicU32::new(0));
    let failures = failed.clone();
    let sender = std::thread::spawn(move || {
        let start = Instant::now();
        let mut sent = 0;
        for i in 0..n {
            let due = start + Duration::from_secs_f64(f64::from(i) / f64::from(pps));
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if sock.try_send(&frame(i)).is_ok() {
                sent += 1;
            } else {
                failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        sent
    });
    (sender, failed)
}

/// Sends `n` UDP datagrams to `dst`:`port` from inside `ns` at `pps`, on a
/// thread: the way out, through the tunnel device the route points at.
fn udp_stream(
    ns: &NetNs,
    dst: &'static str,
    port: u16,
    n: u32,
    pps: u32,
) -> std::thread::JoinHandle<()> {
    ns.spawn(move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let start = Instant::now();
        for i in 0..n {
            let due = start + Duration::from_secs_f64(f64::from(i) / f64::from(pps));
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            // A send can fail for a moment (no route while a device is
            // re-created); the test counts what arrives.
            let _ = s.send_to(&i.to_be_bytes(), (dst, port));
        }
    })
}

/// UDP datagrams to `dport` among captured frames, inner IPv4 after
/// `skip` bytes of link header (14 on a tap, 0 on a tun), or inside GRE
/// on the wire (`skip` = 14 + 20 + 4).
fn count_udp(frames: &[Vec<u8>], skip: usize, dport: u16) -> usize {
    // Every datagram these tests send carries a 4-byte sequence number; the
    // gateway writes a run of them as one UDP GSO packet, which a capture
    // on the device sees whole, its UDP length covering them all.
    frames
        .iter()
        .filter(|f| {
            f.len() >= skip + 28
                && f[skip] >> 4 == 4
                && f[skip + 9] == 17
                && u16::from_be_bytes([f[skip + 22], f[skip + 23]]) == dport
        })
        .map(|f| (usize::from(u16::from_be_bytes([f[skip + 24], f[skip + 25]])) - 8).max(4) / 4)
        .sum()
}

/// Starts the gateway and waits until tun100's next hop is resolved, so the
/// way out drops nothing for want of it.
fn start(wire: &Wire, config: &str) -> Gateway {
    let gw = Gateway::start(&wire.gw, config);
    wait_until("the next hop", Duration::from_secs(5), || {
        gw.stats()["tunnels"][0]["next_hop"].is_string()
    });
    gw
}

/// 300 packets in through tun100 to UDP port `port`, all on tap1; then,
/// once the next hop is known, 300 out to port `port + 1000`, all on the
/// wire inside GRE.
fn assert_both_ways(wire: &Wire, gw: &Gateway, port: u16) {
    let gw_mac = wire.gw.mac("ens0");
    let tap = RawSocket::open(&wire.gw, "tap1", 8 << 20);
    let on_wire = RawSocket::open(&wire.peer, "ens0", 8 << 20);
    let sent = stream(wire, 300, 3000, move |i| gre_udp(gw_mac, port, i));
    assert_eq!(sent.join().unwrap(), 300);
    let inbound = tap.receive(usize::MAX, Duration::from_millis(500));
    assert_eq!(count_udp(&inbound, 14, port), 300, "in through tap1");
    wait_until("the next hop", Duration::from_secs(5), || {
        gw.stats()["tunnels"][0]["next_hop"].is_string()
    });
    udp_stream(&wire.gw, "10.1.1.2", port + 1000, 300, 3000)
        .join()
        .unwrap();
    let out: Vec<_> = on_wire
        .receive(usize::MAX, Duration::from_millis(500))
        .into_iter()
        .filter(|f| f.len() > 38 && f[23] == 47)
        .collect();
    assert_eq!(count_udp(&out, 38, port + 1000), 300, "out through GRE");
}

/// Ok when tun100 has carried packets both ways; otherwise its counters.
fn tun100_both_ways(stats: &Value) -> Result<(), String> {
    let t = stats["tunnels"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["name"] == "tun100"))
        .ok_or_else(|| format!("no tun100 in {stats}"))?;
    if t["rx_packets"].as_u64() > Some(0) && t["tx_packets"].as_u64() > Some(0) {
        Ok(())
    } else {
        Err(t.to_string())
    }
}

fn event(stats: &Value, name: &str) -> u64 {
    stats["gateway"]["events"][name].as_u64().unwrap_or(0)
}

fn tunnel_names(stats: &Value) -> Vec<String> {
    stats["tunnels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn reload_adds_changes_and_removes_tunnels_while_traffic_flows_and_refuses_bad_configs() {
    if !require_root(
        "reload_adds_changes_and_removes_tunnels_while_traffic_flows_and_refuses_bad_configs",
    ) {
        return;
    }
    let wire = Wire::new("rl", &[]);
    let gw = start(&wire, ONE_GRE_TUNNEL);
    let gw_mac = wire.gw.mac("ens0");
    let tap = RawSocket::open(&wire.gw, "tap1", 32 << 20);
    let on_wire = RawSocket::open(&wire.peer, "ens0", 32 << 20);

    // Both directions of tun100 carry a steady stream for the whole test:
    // 4 s at 4000 packets/s each way.
    const N: u32 = 16_000;
    let inbound = stream(&wire, N, 4000, move |i| gre_udp(gw_mac, 6000, i));
    // The way out: half before the change of tun100 (port 7000), half
    // after it (port 7001), so the TTL each half must carry is known.
    let outbound = udp_stream(&wire.gw, "10.1.1.2", 7000, N / 2, 4000);
    let captured_tap = std::thread::spawn(move || tap.receive(usize::MAX, Duration::from_secs(2)));
    let captured_wire =
        std::thread::spawn(move || on_wire.receive(usize::MAX, Duration::from_secs(2)));

    // The reloads happen while traffic flows, and some of the way out goes
    // before any of them (with the first TTL).
    wait_until(
        "traffic both ways through tun100",
        Duration::from_secs(20),
        || tun100_both_ways(&gw.stats()),
    );
    // 1. Add tun200 (a new device), with SIGHUP.
    gw.write_config(TWO_TUNNELS);
    gw.signal(libc::SIGHUP);
    wait_until("tun2 to appear", Duration::from_secs(5), || {
        wire.gw.exec(&["ip", "link", "show", "tun2"]).0
    });
    let tun2 = RawSocket::open(&wire.gw, "tun2", 8 << 20);
    let ipip = stream(&wire, 500, 2000, move |i| ipip_udp(gw_mac, 6001, i));
    assert_eq!(ipip.join().unwrap(), 500);
    let via_tun2 = tun2.receive(usize::MAX, Duration::from_millis(500));
    assert_eq!(
        count_udp(&via_tun2, 0, 6001),
        500,
        "IPIP through the added tunnel"
    );

    // 2. A config that does not parse is refused whole, in one line.
    gw.write_config("[[tunnel]]\nname = 5\n");
    let (ok, out) = gw.reload(&wire.gw);
    assert!(!ok, "a broken config was accepted: {out}");
    assert_eq!(out.trim().lines().count(), 1, "not one line: {out}");
    assert!(out.contains("refused") && out.contains("line 2"), "{out}");
    // So is a change that needs a restart.
    gw.write_config(&TWO_TUNNELS.replace(
        "poll = \"adaptive\"",
        "poll = \"adaptive\"\nbatch_size = 32",
    ));
    let (ok, out) = gw.reload(&wire.gw);
    assert!(!ok && out.contains("gateway.batch_size"), "{out}");
    assert_eq!(
        tunnel_names(&gw.stats()),
        ["tun100", "tun200"],
        "the running config changed"
    );

    // 3. Change tun100 (its TTL and MTU) with `gateway reload`.
    gw.write_config(&TWO_TUNNELS.replacen("ttl = 64\nmtu = 1400", "ttl = 32\nmtu = 1380", 1));
    let (ok, out) = gw.reload(&wire.gw);
    assert!(ok, "{out}");
    assert!(
        out.contains("changed tun100") && out.contains("1 unchanged"),
        "{out}"
    );
    assert!(wire.gw.ip(&["link", "show", "tap1"]).contains("mtu 1380"));
    let outbound_after = udp_stream(&wire.gw, "10.1.1.2", 7001, N / 2, 4000);

    // 4. Remove tun200: its device goes, its packets go to the kernel.
    gw.write_config(&ONE_GRE_TUNNEL.replace("ttl = 64\nmtu = 1400", "ttl = 32\nmtu = 1380"));
    let (ok, out) = gw.reload(&wire.gw);
    assert!(ok && out.contains("removed tun200"), "{out}");
    assert!(
        !wire.gw.exec(&["ip", "link", "show", "tun2"]).0,
        "tun2 still there"
    );
    // And its endpoint left the XDP program's table: IPIP from the same
    // remote now passes to the kernel, while tun100's GRE still flows.
    let before = gw.stats();
    let ipip_after = stream(&wire, 50, 2000, move |i| ipip_udp(gw_mac, 6002, i));
    assert_eq!(ipip_after.join().unwrap(), 50);
    let passed = |s: &Value| u64_at(s, &["xdp", "pass_no_endpoint"]);
    wait_until(
        "the IPIP packets to pass to the kernel",
        Duration::from_secs(10),
        || match passed(&gw.stats()) - passed(&before) {
            50 => Ok(()),
            n => Err(format!("{n} of 50 passed")),
        },
    );

    assert_eq!(inbound.join().unwrap(), N);
    outbound.join().unwrap();
    outbound_after.join().unwrap();
    let on_tap = captured_tap.join().unwrap();
    let sent_out = captured_wire.join().unwrap();
    let s = gw.settled_stats();
    // Not one packet of tun100 lost, either way, across four reloads.
    assert_eq!(
        count_udp(&on_tap, 14, 6000),
        N as usize,
        "inbound through tun100"
    );
    assert_eq!(
        tunnel_rx(&s, "tun100"),
        u64::from(N),
        "tun100 counters: {s}"
    );
    let gre_out: Vec<_> = sent_out
        .iter()
        .filter(|f| f.len() > 38 && f[23] == 47)
        .cloned()
        .collect();
    for port in [7000, 7001] {
        assert_eq!(
            count_udp(&gre_out, 14 + 20 + 4, port),
            (N / 2) as usize,
            "outbound through tun100 to port {port}"
        );
    }
    // The outer TTL followed the change: 64 before it (the first packets
    // went out before any reload), 32 for everything sent after it.
    let ttls = |port: u16| -> std::collections::BTreeSet<u8> {
        gre_out
            .iter()
            .filter(|f| count_udp(std::slice::from_ref(f), 38, port) == 1)
            .map(|f| f[22])
            .collect()
    };
    assert!(
        ttls(7000).contains(&64),
        "before the change: {:?}",
        ttls(7000)
    );
    assert_eq!(ttls(7001), [32].into(), "after the change");
    assert_eq!(total_drops(&s), 0, "drops: {s}");
    // On the way out only the kernel's own chatter (IPv6 router
    // solicitations of the new devices) is dropped.
    assert_eq!(
        total_tx_drops(&s),
        drops(&s, "tx_chatter"),
        "drops on the way out: {s}"
    );
    assert_eq!(event(&s, "reloads"), 3, "{s}");
    assert_eq!(event(&s, "reload_failures"), 2, "{s}");
    assert_accounting(&s);
    assert!(gw.log().contains("reload refused"));
}

#[test]
fn a_deleted_device_is_counted_and_re_created() {
    if !require_root("a_deleted_device_is_counted_and_re_created") {
        return;
    }
    let wire = Wire::new("dd", &[]);
    let gw = start(&wire, ONE_GRE_TUNNEL);
    let gw_mac = wire.gw.mac("ens0");
    let before = wire.gw.ip(&["-o", "link", "show", "tap1"]);

    const N: u32 = 8000;
    let inbound = stream(&wire, N, 4000, move |i| gre_udp(gw_mac, 6000, i));
    // The device goes while traffic flows into it.
    wait_until("packets through tun100", Duration::from_secs(20), || {
        let s = gw.stats();
        if tunnel_rx(&s, "tun100") > 0 {
            Ok(())
        } else {
            Err(s.to_string())
        }
    });
    wire.gw.ip(&["link", "del", "tap1"]);
    wait_until("tap1 to come back", Duration::from_secs(5), || {
        wire.gw.exec(&["ip", "link", "show", "tap1"]).0
    });
    assert_eq!(inbound.join().unwrap(), N);

    let after = wire.gw.ip(&["-o", "link", "show", "tap1"]);
    assert_ne!(
        before.split(':').next(),
        after.split(':').next(),
        "same ifindex: not re-created"
    );
    assert!(
        after.contains("UP") && after.contains("mtu 1400"),
        "{after}"
    );
    let addr = wire.gw.ip(&["-o", "addr", "show", "dev", "tap1"]);
    assert!(addr.contains("10.1.1.1 peer 10.1.1.2"), "{addr}");

    // Everything received is delivered or counted; what arrived while the
    // device was gone is `device_gone`.
    let s = gw.settled_stats();
    assert_eq!(worker_sum(&s, "rx_frames"), u64::from(N), "{s}");
    assert_eq!(
        tunnel_rx(&s, "tun100") + drops(&s, "device_gone") + drops(&s, "device_down"),
        u64::from(N),
        "{s}"
    );
    assert!(
        drops(&s, "device_gone") + drops(&s, "device_down") > 0,
        "{s}"
    );
    assert_eq!(event(&s, "devices_recreated"), 1, "{s}");
    assert_accounting(&s);

    // And the new device carries traffic both ways.
    assert_both_ways(&wire, &gw, 6002);
}

#[test]
fn the_underlay_going_down_and_up_is_followed() {
    if !require_root("the_underlay_going_down_and_up_is_followed") {
        return;
    }
    let wire = Wire::new("lf", &[]);
    let gw = start(&wire, ONE_GRE_TUNNEL);
    let gw_mac = wire.gw.mac("ens0");

    const N: u32 = 6000;
    let (inbound, failed) =
        stream_counting_failures(&wire, N, 3000, move |i| gre_udp(gw_mac, 6000, i));
    // The link goes down while traffic flows, and stays down until the
    // sender has found it down.
    wait_until("packets through tun100", Duration::from_secs(20), || {
        let s = gw.stats();
        if worker_sum(&s, "rx_frames") > 0 {
            Ok(())
        } else {
            Err(s.to_string())
        }
    });
    wire.gw.ip(&["link", "set", "ens0", "down"]);
    wait_until(
        "the gateway to see the link down",
        Duration::from_secs(5),
        || gw.stats()["gateway"]["underlay_up"] == false,
    );
    wait_until(
        "a send to fail with the link down",
        Duration::from_secs(20),
        || failed.load(Ordering::Relaxed) > 0,
    );
    wire.gw.ip(&["link", "set", "ens0", "up"]);
    wait_until(
        "the gateway to see the link up",
        Duration::from_secs(5),
        || gw.stats()["gateway"]["underlay_up"] == true,
    );
    let sent = inbound.join().unwrap();
    let s = gw.settled_stats();
    assert!(sent < N, "every send worked with the link down");
    assert!(worker_sum(&s, "rx_frames") <= u64::from(sent), "{s}");
    assert_eq!(event(&s, "underlay_down"), 1, "{s}");
    assert_accounting(&s);
    assert!(gw.log().contains("went down") && gw.log().contains("up again"));

    // After the flap both directions work again (the next hop is resolved
    // again after the kernel flushed its neighbour table).
    let rx0 = worker_sum(&s, "rx_frames");
    assert_both_ways(&wire, &gw, 6003);
    let s = gw.settled_stats();
    assert_eq!(worker_sum(&s, "rx_frames"), rx0 + 300);
    assert_accounting(&s);
}

#[test]
fn another_xdp_program_in_our_place_is_noticed_and_left_alone() {
    if !require_root("another_xdp_program_in_our_place_is_noticed_and_left_alone") {
        return;
    }
    let wire = Wire::new("xr", &[]);
    let gw = start(&wire, ONE_GRE_TUNNEL);
    let gw_mac = wire.gw.mac("ens0");
    let ours = gw.stats()["gateway"]["xdp_program_id"].as_u64().unwrap();

    // Detach the gateway's link the way an operator's tool would.
    let links: Value = serde_json::from_str(&sh(&["bpftool", "-j", "link", "show"])).unwrap();
    let link = links
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["prog_id"].as_u64() == Some(ours))
        .unwrap_or_else(|| panic!("no bpf link for program {ours}: {links}"));
    sh(&["bpftool", "link", "detach", "id", &link["id"].to_string()]);
    wait_until("the detach to be noticed", Duration::from_secs(5), || {
        gw.stats()["gateway"]["xdp_attached"] == false
    });
    assert!(gw.log().contains("was detached from ens0"), "{}", gw.log());

    // Another program takes the interface.
    let dir = std::env::temp_dir().join(format!("gwt-xdp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("pass.c");
    std::fs::write(
        &src,
        "__attribute__((section(\"xdp\"), used)) int pass_all(void *ctx) { return 2; }\n\
         char _license[] __attribute__((section(\"license\"), used)) = \"GPL\";\n",
    )
    .unwrap();
    let obj = dir.join("pass.o");
    sh(&[
        "clang-22",
        "-O2",
        "-target",
        "bpf",
        "-c",
        src.to_str().unwrap(),
        "-o",
        obj.to_str().unwrap(),
    ]);
    wire.gw.ip(&[
        "link",
        "set",
        "dev",
        "ens0",
        "xdpdrv",
        "obj",
        obj.to_str().unwrap(),
        "sec",
        "xdp",
    ]);
    let shown = wire.gw.ip(&["link", "show", "ens0"]);
    let other: u64 = shown
        .split("prog/xdp id ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no XDP program id in {shown}"));
    assert_ne!(other, ours);
    wait_until(
        "the other program to be reported",
        Duration::from_secs(5),
        || {
            gw.log().contains(&format!(
                "another XDP program (id {other}) is attached to ens0"
            ))
        },
    );

    // Tunnel packets now go where that program sends them: not to us.
    let rx0 = worker_sum(&gw.stats(), "rx_frames");
    let sent = stream(&wire, 100, 2000, move |i| gre_udp(gw_mac, 6000, i));
    assert_eq!(sent.join().unwrap(), 100);
    let s = gw.settled_stats();
    assert_eq!(worker_sum(&s, "rx_frames"), rx0, "{s}");
    assert_eq!(event(&s, "xdp_lost"), 1, "{s}");
    let (_, metrics) = wire.gw.exec(&[
        gateway_tests::gateway_bin().to_str().unwrap(),
        "stats",
        "--iface",
        "ens0",
        "--format",
        "prometheus",
    ]);
    assert!(metrics.contains("gateway_xdp_attached 0"), "{metrics}");

    // The gateway stops cleanly and leaves the other program in place.
    let (status, _) = gw.stop_with(libc::SIGTERM);
    assert!(status.success(), "{status:?}");
    assert!(
        wire.gw
            .ip(&["link", "show", "ens0"])
            .contains(&format!("prog/xdp id {other}")),
        "the other program was removed"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_worker_panic_ends_the_process_with_an_error_and_leaves_the_host_clean() {
    if !require_root("a_worker_panic_ends_the_process_with_an_error_and_leaves_the_host_clean") {
        return;
    }
    let wire = Wire::new("wp", &[]);
    let mut gw = Gateway::start_wrapped(
        &wire.gw,
        ONE_GRE_TUNNEL,
        &["env", "GATEWAY_FAULT_PANIC_AFTER_RX=100"],
        &[],
    );
    let gw_mac = wire.gw.mac("ens0");
    assert!(wire.gw.has_xdp("ens0"));
    stream(&wire, 1000, 2000, move |i| gre_udp(gw_mac, 6000, i))
        .join()
        .unwrap();
    let status = gw
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("still running after a worker panicked:\n{}", gw.log()));
    assert!(!status.success(), "exit status {status:?}");
    let log = gw.log();
    assert!(log.contains("fault injection"), "{log}");
    assert!(
        log.lines().last().unwrap_or("").starts_with("error: "),
        "the last line is not the error: {log}"
    );
    // Nothing of the gateway is left: no XDP program, no device, and the
    // host still answers on the underlay.
    assert!(!wire.gw.has_xdp("ens0"), "XDP program left attached");
    assert!(
        !wire.gw.exec(&["ip", "link", "show", "tap1"]).0,
        "tap1 left behind"
    );
    let (ok, out) = wire
        .peer
        .exec(&["ping", "-c", "1", "-W", "2", "192.168.0.8"]);
    assert!(ok, "{out}");
}

/// Makes `socket(AF_XDP, ...)` fail with EAFNOSUPPORT in this process and
/// what it executes, as on a kernel built without CONFIG_XDP_SOCKETS.
fn deny_af_xdp() -> std::io::Result<()> {
    const AF_XDP: u32 = 44;
    #[cfg(target_arch = "x86_64")]
    const ARCH: u32 = 0xC000_003E;
    #[cfg(target_arch = "aarch64")]
    const ARCH: u32 = 0xC000_00B7;
    let stmt = |code: u16, k: u32| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let jeq = |k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    };
    let ld = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    let ret = (libc::BPF_RET | libc::BPF_K) as u16;
    let filter = [
        stmt(ld, 4), // seccomp_data.arch
        jeq(ARCH, 1, 0),
        stmt(ret, libc::SECCOMP_RET_ALLOW),
        stmt(ld, 0), // seccomp_data.nr
        jeq(libc::SYS_socket as u32, 0, 3),
        stmt(ld, 16), // seccomp_data.args[0], low half
        jeq(AF_XDP, 0, 1),
        stmt(ret, libc::SECCOMP_RET_ERRNO | libc::EAFNOSUPPORT as u32),
        stmt(ret, libc::SECCOMP_RET_ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut _,
    };
    // SAFETY: prctl with a filter program that outlives the call.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const libc::sock_fprog,
            ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[test]
fn no_af_xdp_or_no_interface_gets_one_clear_line_and_leaves_nothing_behind() {
    use std::os::unix::process::CommandExt;
    if !require_root("no_af_xdp_or_no_interface_gets_one_clear_line_and_leaves_nothing_behind") {
        return;
    }
    let wire = Wire::new("nx", &[]);
    let cfg = std::env::temp_dir().join(format!("gwt-nx-{}.toml", std::process::id()));
    std::fs::write(&cfg, ONE_GRE_TUNNEL).unwrap();
    let run = |iface: &str, deny: bool| {
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &wire.gw.name])
            .arg(gateway_tests::gateway_bin())
            .args(["--iface", iface, "--config"])
            .arg(&cfg)
            .env("NO_COLOR", "1");
        if deny {
            // SAFETY: deny_af_xdp only calls prctl, which is
            // async-signal-safe.
            unsafe { cmd.pre_exec(deny_af_xdp) };
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for (iface, deny, says) in [
        ("ens0", true, "this kernel offers no AF_XDP sockets"),
        ("nosuch0", false, "interface nosuch0 does not exist"),
    ] {
        let (ok, err) = run(iface, deny);
        assert!(!ok, "started anyway: {err}");
        let errors: Vec<&str> = err.lines().filter(|l| l.contains("error")).collect();
        assert_eq!(errors.len(), 1, "not one error line: {err}");
        assert!(
            errors[0].starts_with("error: ") && errors[0].contains(says),
            "{err}"
        );
        assert!(
            !err.contains("panicked") && !err.contains("backtrace"),
            "{err}"
        );
        assert!(!wire.gw.has_xdp("ens0"), "XDP program left attached");
        assert!(
            !wire.gw.exec(&["ip", "link", "show", "tap1"]).0,
            "tap1 left behind"
        );
    }
    let _ = std::fs::remove_file(&cfg);
}

/// What a gateway killed with SIGKILL can leave: its device, with a queue
/// still attached that no process holds (the kernel does not always release
/// a killed process's io_uring, and with it the queues registered there).
/// Here a queue of tap1 is held only by a message in flight on a unix
/// socket (SCM_RIGHTS; the sender closed its descriptor), which no process's
/// file table shows either. The gateway starting next deletes the device
/// and creates it afresh: otherwise the kernel would send part of the
/// device's flows to the dead queue, and they would be lost.
#[test]
fn a_device_left_with_a_queue_attached_is_re_created_and_carries_every_flow() {
    if !require_root("a_device_left_with_a_queue_attached_is_re_created_and_carries_every_flow") {
        return;
    }
    let wire = Wire::new("lq", &[]);
    // IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE, as the gateway
    // opens its queues; TUNSETIFF = 0x400454ca.
    let holder = "import fcntl, os, socket, struct, sys\n\
        fd = os.open('/dev/net/tun', os.O_RDWR)\n\
        fcntl.ioctl(fd, 0x400454ca, struct.pack('16sH', b'tap1', 0x0002 | 0x1000 | 0x4000 | 0x0100))\n\
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)\n\
        socket.send_fds(a, [b'q'], [fd])\n\
        os.close(fd)\n\
        print('held', flush=True)\n\
        sys.stdin.read()\n";
    let mut held = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &wire.gw.name,
            "/usr/bin/python3",
            "-c",
            holder,
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(held.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "held");
    let before = wire.gw.ip(&["-o", "link", "show", "tap1"]);

    let gw = start(&wire, ONE_GRE_TUNNEL);
    assert!(
        gw.log().contains("deleted, to be created afresh"),
        "{}",
        gw.log()
    );
    let after = wire.gw.ip(&["-o", "link", "show", "tap1"]);
    assert_ne!(
        before.split(':').next(),
        after.split(':').next(),
        "same ifindex: not re-created"
    );

    // The peer's MAC on tap1 first (the gateway answers ARP): the kernel
    // holds only so many packets while it resolves one.
    wait_until("10.1.1.2 resolved on tap1", Duration::from_secs(20), || {
        wire.gw.run(|| {
            let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            let _ = s.send_to(b"arp", ("10.1.1.2", 7001));
        });
        let n = wire.gw.ip(&["neigh", "show", "10.1.1.2", "dev", "tap1"]);
        if n.contains("lladdr") {
            Ok(())
        } else {
            Err(n)
        }
    });
    // 64 flows out through tap1 (the kernel spreads flows over a device's
    // queues by hash): every datagram reaches the wire.
    let on_wire = RawSocket::open(&wire.peer, "ens0", 8 << 20);
    wire.gw.run(|| {
        for _ in 0..64 {
            let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            for i in 0u32..5 {
                s.send_to(&i.to_be_bytes(), ("10.1.1.2", 7000)).unwrap();
            }
        }
    });
    let mut got = 0;
    wait_until("every flow on the wire", Duration::from_secs(20), || {
        let out: Vec<_> = on_wire
            .receive(usize::MAX, Duration::from_millis(200))
            .into_iter()
            .filter(|f| f.len() > 38 && f[23] == 47)
            .collect();
        got += count_udp(&out, 38, 7000);
        if got >= 320 {
            Ok(())
        } else {
            Err(format!("{got} of 320 datagrams; {}", gw.stats()))
        }
    });
    assert_eq!(got, 320);
    let _ = held.kill();
    let _ = held.wait();
}

/// A device a running program holds a queue of is not deleted at start:
/// the gateway attaches beside it, as it always did, and says so.
#[test]
fn a_device_a_running_program_holds_is_left_alone() {
    if !require_root("a_device_a_running_program_holds_is_left_alone") {
        return;
    }
    let wire = Wire::new("lh", &[]);
    let holder = "import fcntl, os, struct, sys\n\
        fd = os.open('/dev/net/tun', os.O_RDWR)\n\
        fcntl.ioctl(fd, 0x400454ca, struct.pack('16sH', b'tap1', 0x0002 | 0x1000 | 0x4000 | 0x0100))\n\
        print('held', flush=True)\n\
        sys.stdin.read()\n";
    let mut held = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &wire.gw.name,
            "/usr/bin/python3",
            "-c",
            holder,
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(held.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "held");
    let before = wire.gw.ip(&["-o", "link", "show", "tap1"]);
    let gw = start(&wire, ONE_GRE_TUNNEL);
    let log = gw.log();
    assert!(log.contains("held by a running process"), "{log}");
    assert!(!log.contains("created afresh"), "{log}");
    let after = wire.gw.ip(&["-o", "link", "show", "tap1"]);
    assert_eq!(
        before.split(':').next(),
        after.split(':').next(),
        "the running program's device was deleted"
    );
    drop(gw);
    let _ = held.kill();
    let _ = held.wait();
}

/// A process that may open 1024 files (a Linux 6.1 guest's default) starts
/// and carries traffic: io_uring refuses a table of registered files larger
/// than RLIMIT_NOFILE, so each worker's table is sized to the limit. A
/// reload past the limit is refused in one line that names it, and the
/// running tunnels go on.
#[test]
fn a_low_open_file_limit_sizes_the_file_tables_and_a_reload_past_them_is_refused() {
    if !require_root(
        "a_low_open_file_limit_sizes_the_file_tables_and_a_reload_past_them_is_refused",
    ) {
        return;
    }
    let wire = Wire::new("nofile", &[]);
    let gw = Gateway::start_wrapped(
        &wire.gw,
        TWO_TUNNELS,
        &["prlimit", "--nofile=1024:1024", "--"],
        &[],
    );
    wait_until("the next hop", Duration::from_secs(5), || {
        gw.stats()["tunnels"][0]["next_hop"].is_string()
    });
    assert_both_ways(&wire, &gw, 7300);

    let mut many = String::from(TWO_TUNNELS);
    for i in 0..1098 {
        many.push_str(&format!(
            "[[tunnel]]\nname = \"n{i}\"\nmode = \"gre\"\nlocal = \"192.168.0.8\"\nremote = \"10.210.{}.{}\"\nmtu = 1400\ndevice = \"nd{i}\"\n",
            i >> 8,
            i & 255
        ));
    }
    gw.write_config(&many);
    let (ok, out) = gw.reload(&wire.gw);
    assert!(!ok, "1100 tunnels accepted with 1024 files: {out}");
    assert_eq!(out.trim().lines().count(), 1, "not one line: {out}");
    assert!(
        out.contains("RLIMIT_NOFILE") && out.contains("LimitNOFILE"),
        "{out}"
    );
    assert_eq!(tunnel_names(&gw.stats()), ["tun100", "tun200"]);
    assert!(
        !wire.gw.exec(&["ip", "link", "show", "nd0"]).0,
        "a device of the refused reload is there"
    );
    assert_both_ways(&wire, &gw, 7400);
}
