//! Tunnel liveness against the kernel: the gateway's tun100 sends GRE
//! keepalives (`keepalive = [1, 3]`, `carrier_follows = true`) to the
//! kernel's own GRE tunnel in the guest, made with the seed's command. The
//! kernel reflects them when its host forwards IPv4 and takes its own
//! address as a source on the tunnel (`accept_local`): the tunnel stays up.
//! The kernel's tunnel deleted, the gateway's goes down within interval x
//! misses (3 s; waited for with a generous deadline, the time it took is
//! reported, not asserted) and the tap's carrier with it; the kernel's
//! tunnel made again, both come back.
//!
//! `cargo xtask vm liveness` runs it; the JSON goes to
//! `target/vm/liveness.json` (`--json FILE`).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::lab::Lab;
use crate::vm::{self, Console, GatewayProc, Stop};

/// The kernel's side: the seed's tun100, and what lets it reflect
/// keepalives.
const KERNEL_UP: &[&str] = &[
    "ip tunnel add tun100 mode gre remote 192.168.0.8 local 192.168.0.58 ttl 64",
    "ip link set tun100 up mtu 1400",
    "ip addr add 10.1.1.2 peer 10.1.1.1 dev tun100",
    "sysctl -qw net.ipv4.ip_forward=1",
    "sysctl -qw net.ipv4.conf.tun100.accept_local=1",
];

/// The seed lab's host1 (tun100 GRE, tun200 IPIP), tun100 with keepalives
/// every second, down after 3 misses, the carrier following.
fn gateway_config() -> String {
    include_str!("../../../configs/lab-host1.toml").replacen(
        "peer = \"10.1.1.2\"",
        "peer = \"10.1.1.2\"\nkeepalive = [1, 3]\ncarrier_follows = true",
        1,
    )
}

/// How long a state change may take at emulated speed (it should take
/// about 3 s).
const CHANGE_LIMIT: Duration = Duration::from_secs(120);

/// Boots the lab, runs the scenario, and returns its report (JSON).
pub fn run(cache: &std::path::Path, gateway_bin: &std::path::Path, stop: &Stop) -> Result<Value> {
    let prefix = format!("gwlv{}", std::process::id());
    let mut lab = Lab::up(cache, gateway_bin, &prefix, Console::Log, stop)?;
    lab.guest
        .exec(&format!("set -e\n{}\n", KERNEL_UP.join("\n")))?;
    let mut gw = GatewayProc::start(
        gateway_bin,
        &lab.topo.gw,
        &gateway_config(),
        &lab.dir.join("gateway"),
        stop,
    )?;
    let bin = gateway_bin.display().to_string();
    let stats = |lab: &Lab| -> Result<Value> {
        let (ok, out) = lab.host_shell(&format!("{bin} stats --iface ens0 --format json"));
        if !ok {
            bail!("gateway stats failed: {out}");
        }
        serde_json::from_str(out.trim()).context("gateway stats: not JSON")
    };
    let carrier = |lab: &Lab| -> String {
        lab.host_shell("cat /sys/class/net/tap1/carrier")
            .1
            .trim()
            .to_string()
    };
    // Waits until tun100's state is `want` (and the carrier `carrier`),
    // and says how long it took.
    let wait_state = |lab: &Lab, want: &str, carrier_want: &str| -> Result<(f64, Value)> {
        let start = Instant::now();
        let mut last = Value::Null;
        let t = vm::wait_for(
            &format!("tun100 to be {want} with carrier {carrier_want}"),
            CHANGE_LIMIT,
            stop,
            || {
                let s = stats(lab)?;
                last = s["tunnels"][0].clone();
                Ok((last["state"] == want && carrier(lab) == carrier_want).then(|| last.clone()))
            },
        )
        .with_context(|| format!("last seen: {last}"))?;
        Ok((start.elapsed().as_secs_f64(), t))
    };

    vm::say("liveness: the kernel reflects the gateway's keepalives");
    // (A tunnel starts up: what shows the kernel answers is the replies.)
    vm::wait_for("three keepalive replies", CHANGE_LIMIT, stop, || {
        let s = stats(&lab)?;
        Ok((s["tunnels"][0]["keepalive_replies"].as_u64().unwrap_or(0) >= 3).then_some(()))
    })?;
    let (_, up) = wait_state(&lab, "up", "1")?;
    let replies_up = stats(&lab)?["tunnels"][0].clone();
    let carrier_up = carrier(&lab);
    let ping = lab.host_shell("ping -c 1 -W 10 10.1.1.2");

    vm::say("liveness: the kernel's tunnel deleted");
    lab.guest.exec("ip tunnel del tun100")?;
    let (down_after, down) = wait_state(&lab, "down", "0")?;
    let carrier_down = carrier(&lab);

    vm::say("liveness: the kernel's tunnel made again");
    lab.guest
        .exec(&format!("set -e\n{}\n", KERNEL_UP.join("\n")))?;
    let (up_after, up_again) = wait_state(&lab, "up", "1")?;
    let carrier_up_again = carrier(&lab);
    let events = stats(&lab)?["gateway"]["events"].clone();
    let log = std::fs::read_to_string(&gw.log).unwrap_or_default();
    let _ = gw.stats(stop);
    gw.stop()?;
    Ok(json!({
        "kernel": lab.guest.release,
        "accel": match lab.guest.accel { vm::Accel::Kvm => "kvm", vm::Accel::Tcg => "tcg" },
        "kernel_commands": KERNEL_UP,
        "up": up,
        "up_with_replies": replies_up,
        "carrier": [carrier_up, carrier_down, carrier_up_again],
        "ping_through": ping.0,
        "down": down,
        "down_seconds_after_delete": down_after,
        "up_again": up_again,
        "up_seconds_after_readd": up_after,
        "events": events,
        "logged_down": log.contains("tunnel down"),
        "logged_up": log.contains("tunnel up"),
    }))
}
