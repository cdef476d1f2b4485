//! gretap between two gateways: each host bridges its gretap tap with a
//! veth into a namespace that knows nothing of tunnels. The two namespaces
//! share one Ethernet segment through the tunnel: ARP crosses, and so does
//! ping.

use std::time::Duration;

use gateway_tests::{require_root, sh, wait_until, Gateway, Lab, NetNs};

fn config(mode: &str, local: &str, remote: &str) -> String {
    format!(
        r#"
[gateway]
poll = "adaptive"

[[tunnel]]
name = "l2"
mode = "{mode}"
local = "{local}"
remote = "{remote}"
key = 7
mtu = 1400
device = "gtap"
"#
    )
}

/// A namespace with one veth, `eth0` at `addr`, whose other end is bridged
/// with the gretap tap in `host`.
fn client(tag: &str, host: &NetNs, addr: &str) -> NetNs {
    let c = NetNs::new(tag);
    sh(&[
        "ip", "link", "add", "eth0", "netns", &c.name, "type", "veth", "peer", "name", "cport",
        "netns", &host.name,
    ]);
    host.ip(&["link", "add", "br9", "type", "bridge"]);
    host.ip(&["link", "set", "gtap", "master", "br9"]);
    host.ip(&["link", "set", "cport", "master", "br9"]);
    for dev in ["br9", "cport"] {
        host.ip(&["link", "set", dev, "up"]);
    }
    c.ip(&["addr", "add", addr, "dev", "eth0"]);
    c.ip(&["link", "set", "eth0", "up"]);
    c
}

#[test]
fn two_bridged_taps_share_a_segment_through_gretap() {
    if !require_root("two_bridged_taps_share_a_segment_through_gretap") {
        return;
    }
    share_a_segment("gretap", "192.168.0.8", "192.168.0.58");
}

#[test]
fn two_bridged_taps_share_a_segment_through_ip6gretap() {
    if !require_root("two_bridged_taps_share_a_segment_through_ip6gretap") {
        return;
    }
    share_a_segment("ip6gretap", "2001:db8::8", "2001:db8::58");
}

fn share_a_segment(mode: &str, a: &str, b: &str) {
    let lab = Lab::new(&mode[..3]);
    if a.contains(':') {
        lab.host1.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{a}/64"),
            "dev",
            "ens0",
            "nodad",
        ]);
        lab.host2.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{b}/64"),
            "dev",
            "ens0",
            "nodad",
        ]);
    }
    let gw1 = Gateway::start(&lab.host1, &config(mode, a, b));
    let gw2 = Gateway::start(&lab.host2, &config(mode, b, a));
    let c1 = client("gc1", &lab.host1, "10.9.9.1/24");
    let c2 = client("gc2", &lab.host2, "10.9.9.2/24");

    // The first ping waits for both gateways' next hops and for ARP.
    wait_until("10.9.9.2 to answer", Duration::from_secs(10), || {
        c1.exec(&["ping", "-c", "1", "-W", "1", "10.9.9.2"]).0
    });
    let (ok, out) = c1.exec(&["ping", "-c", "5", "-i", "0.2", "-W", "2", "10.9.9.2"]);
    assert!(ok && out.contains(" 0% packet loss"), "{out}");
    // ARP went through: c1 knows c2's own MAC.
    let c2_mac = c2.ip(&["-br", "link", "show", "eth0"]);
    let c2_mac = c2_mac.split_whitespace().nth(2).unwrap().to_string();
    let neigh = c1.ip(&["neigh", "show", "10.9.9.2"]);
    assert!(neigh.contains(&c2_mac), "c1 has {neigh}, c2 is {c2_mac}");
    // And both gateways carried it, each frame counted.
    for gw in [&gw1, &gw2] {
        let s = gw.settled_stats();
        let t = &s["tunnels"][0];
        assert!(t["rx_packets"].as_u64().unwrap() >= 6, "{s}");
        assert!(t["tx_packets"].as_u64().unwrap() >= 6, "{s}");
        gateway_tests::stats::assert_accounting(&s);
    }
    drop(c1);
    drop(c2);
}
