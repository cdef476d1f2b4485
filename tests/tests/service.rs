//! The systemd unit's promise: the gateway runs as an unprivileged user
//! with only the capabilities the unit grants. The capability list is read
//! from `gateway/dist/gateway.service` itself and applied with setpriv.

use std::time::Duration;

use gateway_tests::{pkt, require_root, wait_until, Gateway, RawSocket, Wire};

const UNIT: &str = include_str!("../../gateway/dist/gateway.service");

const CONFIG: &str = gateway_tests::ONE_GRE_TUNNEL;

/// /dev/net/tun opened to a group for the test's duration.
struct TunAccess {
    mode: u32,
    gid: u32,
}

impl TunAccess {
    fn grant(group: &str) -> TunAccess {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata("/dev/net/tun").expect("/dev/net/tun");
        let rule = include_str!("../../gateway/dist/60-gateway-tun.rules");
        assert!(rule.contains("MODE=\"0660\""), "the rule this emulates");
        gateway_tests::sh(&["chgrp", group, "/dev/net/tun"]);
        gateway_tests::sh(&["chmod", "0660", "/dev/net/tun"]);
        TunAccess {
            mode: m.mode() & 0o7777,
            gid: m.gid(),
        }
    }
}

impl Drop for TunAccess {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chgrp")
            .args([self.gid.to_string().as_str(), "/dev/net/tun"])
            .status();
        let _ = std::process::Command::new("chmod")
            .args([format!("{:o}", self.mode).as_str(), "/dev/net/tun"])
            .status();
    }
}

#[test]
fn runs_as_nobody_with_only_the_units_capabilities() {
    if !require_root("runs_as_nobody_with_only_the_units_capabilities") {
        return;
    }
    let caps: Vec<String> = UNIT
        .lines()
        .find_map(|l| l.strip_prefix("AmbientCapabilities="))
        .expect("the unit grants ambient capabilities")
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_lowercase())
        .collect();
    assert!(!caps.is_empty());
    let plus: String = caps
        .iter()
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(",");
    let inh = format!("--inh-caps=-all,{plus}");
    let amb = format!("--ambient-caps={plus}");
    let bounding = format!("--bounding-set=-all,{plus}");
    // What the shipped udev rule does for the gateway's group, here for
    // nobody's group, put back afterwards.
    let _tun = TunAccess::grant("nogroup");
    let wire = Wire::new("svc", &[]);
    let gw = Gateway::start_wrapped(
        &wire.gw,
        CONFIG,
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            &inh,
            &amb,
            &bounding,
            "--",
        ],
        &[],
    );
    assert!(wire.gw.has_xdp("ens0"));
    let tx = RawSocket::open(&wire.peer, "ens0", 1 << 20);
    let inner = pkt::udp([10, 1, 1, 2], [10, 1, 1, 1], 4000, 9, b"unprivileged");
    tx.send(&pkt::outer(
        wire.gw.mac("ens0"),
        [192, 168, 0, 58],
        [192, 168, 0, 8],
        47,
        &pkt::gre(0, 0x0800, 0, 0, &inner),
    ));
    wait_until("the packet through tun100", Duration::from_secs(20), || {
        let s = gw.stats();
        if s["tunnels"][0]["rx_packets"].as_u64() > Some(0) {
            Ok(())
        } else {
            Err(s.to_string())
        }
    });
    let s = gw.settled_stats();
    assert_eq!(s["tunnels"][0]["rx_packets"], 1, "{s}");
    let (status, _) = gw.stop_with(libc::SIGTERM);
    assert!(status.success(), "clean exit: {status:?}");
    assert!(
        !wire.gw.has_xdp("ens0"),
        "XDP detached by the unprivileged gateway"
    );
    assert!(
        !wire.gw.exec(&["ip", "link", "show", "tap1"]).0,
        "its tap deleted on the way out"
    );
}
