//! Running it for real: live reload, devices deleted from under the
//! gateway, the underlay going down and up, another XDP program taking the
//! interface, a worker that panics, a kernel without AF_XDP. Each test
//! keeps traffic flowing while it does its damage, then checks the state
//! the gateway (or the host) is left in and that the counters add up.

use std::time::{Duration, Instant};

use gateway_tests::stats::{
    assert_accounting, drops, total_drops, total_tx_drops, tunnel_rx, worker_sum,
};
use gateway_tests::{pkt, require_root, Gateway, NetNs, RawSocket, Wire, ONE_GRE_TUNNEL};
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
    let sock = RawSocket::open(&wire.peer, "ens0", 1 << 20);
    std::thread::spawn(move || {
        let start = Instant::now();
        let mut sent = 0;
        for i in 0..n {
            let due = start + Duration::from_secs_f64(f64::from(i) / f64::from(pps));
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            sent += u32::from(sock.try_send(&frame(i)).is_ok());
        }
        sent
    })
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
    frames
        .iter()
        .filter(|f| {
            f.len() >= skip + 24
                && f[skip] >> 4 == 4
                && f[skip + 9] == 17
                && u16::from_be_bytes([f[skip + 22], f[skip + 23]]) == dport
        })
        .count()
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
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
    let t0 = Instant::now();
    let inbound = stream(&wire, N, 4000, move |i| gre_udp(gw_mac, 6000, i));
    let outbound = udp_stream(&wire.gw, "10.1.1.2", 7000, N, 4000);
    let captured_tap = std::thread::spawn(move || tap.receive(usize::MAX, Duration::from_secs(2)));
    let captured_wire =
        std::thread::spawn(move || on_wire.receive(usize::MAX, Duration::from_secs(2)));

    std::thread::sleep(Duration::from_millis(500));
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
    let changed_at = t0.elapsed();
    assert!(ok, "{out}");
    assert!(
        out.contains("changed tun100") && out.contains("1 unchanged"),
        "{out}"
    );
    assert!(wire.gw.ip(&["link", "show", "tap1"]).contains("mtu 1380"));

    // 4. Remove tun200: its device goes, its packets go to the kernel.
    gw.write_config(&ONE_GRE_TUNNEL.replace("ttl = 64\nmtu = 1400", "ttl = 32\nmtu = 1380"));
    let (ok, out) = gw.reload(&wire.gw);
    assert!(ok && out.contains("removed tun200"), "{out}");
    assert!(
        !wire.gw.exec(&["ip", "link", "show", "tun2"]).0,
        "tun2 still there"
    );

    assert_eq!(inbound.join().unwrap(), N);
    outbound.join().unwrap();
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
    assert_eq!(
        count_udp(&gre_out, 14 + 20 + 4, 7000),
        N as usize,
        "outbound through tun100"
    );
    // The outer TTL followed the change.
    let mut ttls = std::collections::BTreeMap::<u8, usize>::new();
    for f in &gre_out {
        *ttls.entry(f[22]).or_default() += 1;
    }
    assert!(
        ttls.contains_key(&32) && ttls.contains_key(&64),
        "outer TTLs {ttls:?}; the change was applied {changed_at:?} after the start"
    );
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
    std::thread::sleep(Duration::from_millis(700));
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
    let tap = RawSocket::open(&wire.gw, "tap1", 8 << 20);
    let on_wire = RawSocket::open(&wire.peer, "ens0", 8 << 20);
    let sent = stream(&wire, 300, 3000, move |i| gre_udp(gw_mac, 6002, i));
    assert_eq!(sent.join().unwrap(), 300);
    assert_eq!(
        count_udp(
            &tap.receive(usize::MAX, Duration::from_millis(500)),
            14,
            6002
        ),
        300
    );
    udp_stream(&wire.gw, "10.1.1.2", 7002, 300, 3000)
        .join()
        .unwrap();
    let out: Vec<_> = on_wire
        .receive(usize::MAX, Duration::from_millis(500))
        .into_iter()
        .filter(|f| f.len() > 38 && f[23] == 47)
        .collect();
    assert_eq!(count_udp(&out, 38, 7002), 300);
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
    let inbound = stream(&wire, N, 3000, move |i| gre_udp(gw_mac, 6000, i));
    std::thread::sleep(Duration::from_millis(500));
    wire.gw.ip(&["link", "set", "ens0", "down"]);
    wait_until(
        "the gateway to see the link down",
        Duration::from_secs(5),
        || gw.stats()["gateway"]["underlay_up"] == false,
    );
    std::thread::sleep(Duration::from_millis(500));
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

    // After the flap both directions work again: a fresh burst in, and a
    // burst out (the next hop is resolved again after the kernel flushed
    // its neighbour table).
    let tap = RawSocket::open(&wire.gw, "tap1", 8 << 20);
    let on_wire = RawSocket::open(&wire.peer, "ens0", 8 << 20);
    let rx0 = worker_sum(&s, "rx_frames");
    let sent = stream(&wire, 300, 3000, move |i| gre_udp(gw_mac, 6003, i));
    assert_eq!(sent.join().unwrap(), 300);
    assert_eq!(
        count_udp(
            &tap.receive(usize::MAX, Duration::from_millis(500)),
            14,
            6003
        ),
        300
    );
    wait_until(
        "the next hop to be resolved again",
        Duration::from_secs(5),
        || gw.stats()["tunnels"][0]["next_hop"].is_string(),
    );
    udp_stream(&wire.gw, "10.1.1.2", 7003, 300, 3000)
        .join()
        .unwrap();
    let out: Vec<_> = on_wire
        .receive(usize::MAX, Duration::from_millis(500))
        .into_iter()
        .filter(|f| f.len() > 38 && f[23] == 47)
        .collect();
    assert_eq!(count_udp(&out, 38, 7003), 300);
    let s = gw.settled_stats();
    assert_eq!(worker_sum(&s, "rx_frames"), rx0 + 300);
    assert_accounting(&s);
}
