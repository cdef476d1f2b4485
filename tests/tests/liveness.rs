//! Tunnel liveness between two real gateways: host1's tun100 sends GRE
//! keepalives (Cisco's kind: GRE to the peer carrying an empty GRE back to
//! us), host2's gateway reflects them as a router (or the kernel) would,
//! and host1 counts the replies and keeps the tunnel up. With host2's
//! gateway gone, host1's tunnel goes down within interval x misses and
//! the device's carrier goes with it; with host2 back, both come back.

use std::time::Duration;

use gateway_tests::{require_root, wait_until, Gateway, Lab};
use serde_json::Value;

const HOST1: &str = include_str!("../../configs/lab-host1.toml");
const HOST2: &str = include_str!("../../configs/lab-host2.toml");

/// tun100's entry in host1's stats.
fn tun100(gw: &Gateway) -> Value {
    let s = gw.stats();
    s["tunnels"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["name"] == "tun100").cloned())
        .unwrap_or_else(|| panic!("no tun100 in {s}"))
}

fn carrier(lab: &Lab, dev: &str) -> String {
    let (_, out) = lab
        .host1
        .exec(&["cat", &format!("/sys/class/net/{dev}/carrier")]);
    out.trim().to_string()
}

#[test]
fn keepalives_keep_a_tunnel_up_and_its_absence_takes_it_down_with_the_carrier() {
    if !require_root("keepalives_keep_a_tunnel_up_and_its_absence_takes_it_down_with_the_carrier") {
        return;
    }
    let lab = Lab::new("lv");
    // host1's tun100 with keepalives every second, down after 3 misses.
    let host1 = HOST1.replacen(
        "peer = \"10.1.1.2\"",
        "peer = \"10.1.1.2\"\nkeepalive = [1, 3]\ncarrier_follows = true",
        1,
    );
    assert_ne!(host1, HOST1);
    let gw1 = Gateway::start(&lab.host1, &host1);
    let mut gw2 = Some(Gateway::start(&lab.host2, HOST2));

    // Replies come back; the tunnel is up, the carrier on; tun200 (no
    // keepalives) has no state.
    wait_until(
        "keepalive replies on tun100",
        Duration::from_secs(30),
        || {
            let t = tun100(&gw1);
            if t["keepalive_replies"].as_u64().unwrap_or(0) >= 3 {
                Ok(())
            } else {
                Err(t.to_string())
            }
        },
    );
    let t = tun100(&gw1);
    assert_eq!(t["state"], "up", "{t}");
    assert!(t["keepalives_sent"].as_u64().unwrap() >= 3, "{t}");
    assert_eq!(carrier(&lab, "tap1"), "1");
    let s = gw1.stats();
    assert_eq!(s["tunnels"][1]["state"], Value::Null, "{s}");
    // host2 reflected them (counted as keepalives answered), nothing went
    // into its device.
    let s2 = gw2.as_ref().unwrap().stats();
    let answered: u64 = s2["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["keepalives"].as_u64().unwrap())
        .sum();
    assert!(answered >= 3, "{s2}");
    assert_eq!(s2["tunnels"][0]["rx_packets"], 0, "{s2}");

    // host2's gateway stops: no more replies; down within 3 s (waited for
    // with room to spare), the carrier off, logged and counted.
    gw2.take();
    wait_until("tun100 to go down", Duration::from_secs(30), || {
        let t = tun100(&gw1);
        if t["state"] == "down" {
            Ok(())
        } else {
            Err(t.to_string())
        }
    });
    wait_until(
        "tap1's carrier off",
        Duration::from_secs(10),
        || match carrier(&lab, "tap1").as_str() {
            "0" => Ok(()),
            c => Err(c.to_string()),
        },
    );
    let s = gw1.stats();
    assert_eq!(s["gateway"]["events"]["tunnel_down"], 1, "{s}");
    assert!(gw1.log().contains("tunnel down"), "{}", gw1.log());
    let metrics = {
        let bin = gateway_tests::gateway_bin();
        let (ok, out) = lab.host1.exec(&[
            bin.to_str().unwrap(),
            "stats",
            "--iface",
            "ens0",
            "--format",
            "prometheus",
        ]);
        assert!(ok, "{out}");
        out
    };
    assert!(
        metrics.contains("gateway_tunnel_up{tunnel=\"tun100\"} 0"),
        "{metrics}"
    );

    // A reload that drops carrier_follows while the tunnel is down: the
    // carrier the gateway turned off comes back on (the state stays).
    gw1.write_config(&host1.replacen("\ncarrier_follows = true", "", 1));
    let (ok, out) = gw1.reload(&lab.host1);
    assert!(ok, "{out}");
    wait_until(
        "tap1's carrier back on after the reload",
        Duration::from_secs(10),
        || match carrier(&lab, "tap1").as_str() {
            "1" => Ok(()),
            c => Err(c.to_string()),
        },
    );
    assert_eq!(tun100(&gw1)["state"], "down");

    // host2 back: up again, carrier on.
    let _gw2 = Gateway::start(&lab.host2, HOST2);
    wait_until("tun100 up again", Duration::from_secs(30), || {
        let t = tun100(&gw1);
        if t["state"] == "up" {
            Ok(())
        } else {
            Err(t.to_string())
        }
    });
    wait_until(
        "tap1's carrier on",
        Duration::from_secs(10),
        || match carrier(&lab, "tap1").as_str() {
            "1" => Ok(()),
            c => Err(c.to_string()),
        },
    );
    let s = gw1.stats();
    assert_eq!(s["gateway"]["events"]["tunnel_up"], 1, "{s}");
    gateway_tests::stats::assert_accounting(&gw1.settled_stats());
}
