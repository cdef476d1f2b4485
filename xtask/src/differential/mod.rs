//! Differential conformance: every case is sent, as the same bytes, to the
//! kernel's tunnels (Debian's 6.1 in the VM lab) and to the gateway's, and
//! what each did is recorded: what its devices received (dissected by
//! scapy), what it sent back on the wire, which counters moved (the
//! kernel's device statistics and /proc/net/snmp, snmp6, netstat; the
//! gateway's drops by reason). Two outcomes agree when the same packets were
//! delivered, as the same inner packets, and the same came back; a case
//! whose two outcomes differ passes only if it names the difference as kept
//! on purpose, with the reason.
//!
//! The parts: `diff.py` (the cases as scapy templates, the sending, the
//! fences and the dissection; it runs on the host in the wire namespace)
//! and `agent.py` (on each side: records what the devices receive, answers
//! counter requests). This file sets the lab up (the kernel's tunnels made
//! with iproute2 as a user would, the gateway with the same tunnels seen from
//! its end), runs `diff.py`, and reports: a table, JSON, and
//! `docs/conformance.md`.
//!
//! The wire: the tap and the gateway's veth are taken off the lab's bridge,
//! so that what one side sends back never reaches the other; each side's
//! replies are captured where `diff.py` injects (QEMU's tap, the veth end),
//! and each side knows the other's MAC by a permanent neighbour entry.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::interop::Lab;
use crate::vm::{self, Console, GatewayProc, Stop, Topology, GUEST_MAC};

const DIFF_PY: &str = include_str!("diff.py");
const AGENT_PY: &str = include_str!("agent.py");

/// The kernel's tunnels, as a user makes them (the guest is 192.168.0.58 and
/// 2001:db8::58; `GWMAC` is filled in). The sysctls: forwarding and
/// `accept_local` on `plain`, so that a keepalive's inner packet (whose
/// source is the guest's own address) is routed back out, as the gateway
/// does (without `accept_local` the kernel drops it as a martian); no ICMP rate limit, so that
/// what is answered does not depend on speed; no IPv6 link-local addresses
/// or router solicitations on the tunnels (chatter); a permanent neighbour
/// for the gateway's side, which is not on a bridge with it any more.
pub const KERNEL_SETUP: &[&str] = &[
    "sysctl -qw net.ipv4.ip_forward=1 net.ipv4.icmp_ratelimit=0 net.ipv6.icmp.ratelimit=0",
    "sysctl -qw net.ipv6.conf.default.addr_gen_mode=1 net.ipv6.conf.default.accept_ra=0 net.ipv6.conf.default.router_solicitations=0",
    "ip neigh replace 192.168.0.8 lladdr GWMAC dev eth0 nud permanent",
    "ip -6 neigh replace 2001:db8::8 lladdr GWMAC dev eth0 nud permanent",
    "ip tunnel add plain mode gre remote 192.168.0.8 local 192.168.0.58",
    "ip link set plain up mtu 1400",
    "ip addr add 10.1.1.2 peer 10.1.1.1 dev plain",
    "sysctl -qw net.ipv4.conf.plain.accept_local=1",
    "ip tunnel add keyed mode gre remote 192.168.0.8 local 192.168.0.58 key 42 csum seq",
    "ip link set keyed up mtu 1400",
    "ip addr add 30.1.1.2 peer 30.1.1.1 dev keyed",
    "ip tunnel add ipip mode ipip remote 192.168.0.8 local 192.168.0.58 tos inherit nopmtudisc",
    "ip link set ipip up mtu 1400",
    "ip addr add 20.1.1.2 peer 20.1.1.1 dev ipip",
    "ip tunnel add sit1 mode sit remote 192.168.0.8 local 192.168.0.58",
    "ip link set sit1 up mtu 1400",
    "ip -6 addr add fd00:5::2 peer fd00:5::1 dev sit1 nodad",
    "ip -6 tunnel add g6 mode ip6gre remote 2001:db8::8 local 2001:db8::58",
    "ip link set g6 up mtu 1400",
    "ip addr add 40.1.1.2 peer 40.1.1.1 dev g6",
    "ip -6 tunnel add t66 mode ip6ip6 remote 2001:db8::8 local 2001:db8::58",
    "ip link set t66 up mtu 1400",
    "ip -6 addr add fd00:66::2 peer fd00:66::1 dev t66 nodad",
];

/// The gateway's side: the same tunnels seen from its end.
const GATEWAY_CONFIG: &str = r#"[gateway]
iface = "ens0"
poll = "adaptive"

[[tunnel]]
name = "plain"
mode = "gre"
local = "192.168.0.8"
remote = "192.168.0.58"
mtu = 1400
device = "tap1"
address = "10.1.1.1"
peer = "10.1.1.2"

[[tunnel]]
name = "keyed"
mode = "gre"
local = "192.168.0.8"
remote = "192.168.0.58"
key = 42
csum = true
seq = true
mtu = 1400
device = "tun3"
device_kind = "tun"
address = "30.1.1.1"
peer = "30.1.1.2"

[[tunnel]]
name = "ipip"
mode = "ipip"
local = "192.168.0.8"
remote = "192.168.0.58"
tos = "inherit"
pmtudisc = false
mtu = 1400
device = "tun2"
device_kind = "tun"
address = "20.1.1.1"
peer = "20.1.1.2"

[[tunnel]]
name = "sit"
mode = "sit"
local = "192.168.0.8"
remote = "192.168.0.58"
mtu = 1400
device = "tun5"
device_kind = "tun"
address = "fd00:5::1"
peer = "fd00:5::2"

[[tunnel]]
name = "ip6gre"
mode = "ip6gre"
local = "2001:db8::8"
remote = "2001:db8::58"
mtu = 1400
device = "tun6"
device_kind = "tun"
address = "40.1.1.1"
peer = "40.1.1.2"

[[tunnel]]
name = "ip6ip6"
mode = "ip6ip6"
local = "2001:db8::8"
remote = "2001:db8::58"
mtu = 1400
device = "tun7"
device_kind = "tun"
address = "fd00:66::1"
peer = "fd00:66::2"
"#;

/// How long the whole of `diff.py` may take (TCG is slow; nothing depends
/// on it but a hung run).
const DRIVER_LIMIT: Duration = Duration::from_secs(3600);

/// A child killed (by its pid) on drop.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What the run came to: `diff.py`'s JSON with the run's facts added.
pub struct Report {
    pub json: Value,
}

fn sh_ok(ns: &str, script: &str) -> Result<String> {
    let (ok, out) = Topology::exec(ns, &["sh", "-c", script]);
    if !ok {
        bail!("in {ns}, `{script}` failed:\n{}", out.trim());
    }
    Ok(out)
}

fn wait_file(what: &str, path: &Path, stop: &Stop) -> Result<()> {
    vm::wait_for(what, vm::COMMAND_LIMIT, stop, || {
        Ok(path.exists().then_some(()))
    })
}

/// Boots the lab, sets both sides up, runs the cases (`only`: names; all
/// when empty).
pub fn run(cache: &Path, gateway_bin: &Path, only: &[String], stop: &Stop) -> Result<Report> {
    let started = Instant::now();
    let prefix = format!("gwdf{}", std::process::id());
    let mut lab = Lab::up(cache, gateway_bin, &prefix, Console::Log, stop)?;
    let gw_ns = lab.topo.gw.clone();
    let wire_ns = lab.topo.wire.clone();
    let gw_mac = sh_ok(&gw_ns, "cat /sys/class/net/ens0/address")?
        .trim()
        .to_string();

    // The gateway's namespace: the same sysctls, and the guest's MAC.
    sh_ok(
        &gw_ns,
        &format!(
            "sysctl -qw net.ipv4.icmp_ratelimit=0 net.ipv6.icmp.ratelimit=0 \
             net.ipv6.conf.default.addr_gen_mode=1 net.ipv6.conf.default.accept_ra=0 \
             net.ipv6.conf.default.router_solicitations=0 && \
             ip neigh replace {g4} lladdr {GUEST_MAC} dev ens0 nud permanent && \
             ip -6 neigh replace {g6} lladdr {GUEST_MAC} dev ens0 nud permanent",
            g4 = vm::GUEST_V4,
            g6 = vm::GUEST_V6
        ),
    )?;
    // The two ends off the bridge: each side's replies stay on its link;
    // and no IPv6 of their own (router solicitations, MLD), which would
    // reach the sides as noise.
    sh_ok(
        &wire_ns,
        &format!(
            "ip link set {tap} nomaster && ip link set port1 nomaster && \
             sysctl -qw net.ipv6.conf.{tap}.disable_ipv6=1 net.ipv6.conf.port1.disable_ipv6=1",
            tap = lab.topo.tap
        ),
    )?;

    // The kernel's side, in one batch.
    let setup = KERNEL_SETUP
        .iter()
        .map(|c| c.replace("GWMAC", &gw_mac))
        .collect::<Vec<_>>()
        .join("\n");
    lab.guest.exec(&format!("set -e\n{setup}\n"))?;
    let job = lab.guest.job.clone();
    fs::create_dir_all(job.join("dk/req"))?;
    fs::write(job.join("agent.py"), AGENT_PY)?;
    lab.guest.exec(
        "nohup /usr/bin/python3 /mnt/agent.py /mnt/dk/log /mnt/dk/req eth0,lo > /mnt/dk/agent.out 2>&1 &",
    )?;

    // The gateway and its agent.
    let gw_dir = lab.dir.join("gateway");
    let gw = GatewayProc::start(gateway_bin, &gw_ns, GATEWAY_CONFIG, &gw_dir, stop)?;
    let gk = lab.dir.join("gk");
    fs::create_dir_all(gk.join("req"))?;
    fs::write(lab.dir.join("agent.py"), AGENT_PY)?;
    let _gw_agent = KillOnDrop(
        Command::new("ip")
            .args(["netns", "exec", &gw_ns, "/usr/bin/python3"])
            .arg(lab.dir.join("agent.py"))
            .arg(gk.join("log"))
            .arg(gk.join("req"))
            .arg("ens0,lo")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(gk.join("agent.out"))?)
            .spawn()
            .context("starting the gateway side's agent")?,
    );
    wait_file(
        "the guest's agent to start",
        &job.join("dk/log.ready"),
        stop,
    )?;
    wait_file(
        "the gateway side's agent to start",
        &gk.join("log.ready"),
        stop,
    )?;

    // The driver.
    let out = lab.dir.join("differential.json");
    let cfg = json!({
        "kernel": {
            "iface": lab.topo.tap, "mac": GUEST_MAC, "peer_mac": gw_mac,
            "log": job.join("dk/log"), "req": job.join("dk/req"),
        },
        "gateway": {
            "iface": "port1", "mac": gw_mac, "peer_mac": GUEST_MAC,
            "log": gk.join("log"), "req": gk.join("req"),
            "ns": gw_ns, "bin": gateway_bin,
        },
        "only": only,
        "out": out,
    });
    let cfg_path = lab.dir.join("differential-config.json");
    fs::write(&cfg_path, serde_json::to_string_pretty(&cfg)?)?;
    fs::write(lab.dir.join("diff.py"), DIFF_PY)?;
    vm::say("running the cases (progress below)");
    let mut driver = KillOnDrop(
        Command::new("ip")
            .args(["netns", "exec", &wire_ns, "/usr/bin/python3"])
            .arg(lab.dir.join("diff.py"))
            .arg(&cfg_path)
            .stdin(Stdio::null())
            .spawn()
            .context("starting diff.py")?,
    );
    let status = vm::wait_for("the cases to run", DRIVER_LIMIT, stop, || {
        lab.guest.alive()?;
        Ok(driver.0.try_wait()?)
    })?;
    if !status.success() {
        let log = fs::read_to_string(&gw.log).unwrap_or_default();
        bail!(
            "diff.py failed ({status}); the guest agent said: {}\nthe gateway's log ends:\n{}",
            fs::read_to_string(job.join("dk/agent.out")).unwrap_or_default(),
            log.lines().rev().take(10).collect::<Vec<_>>().join("\n")
        );
    }
    let text = fs::read_to_string(&out).context("diff.py wrote no results")?;
    let mut json: Value = serde_json::from_str(&text)?;
    gw.stop()?;
    let release = lab.guest.release.clone();
    let accel = match lab.guest.accel {
        vm::Accel::Kvm => "kvm",
        vm::Accel::Tcg => "tcg",
    };
    drop(lab);
    json["kernel_release"] = json!(release);
    json["accel"] = json!(accel);
    json["seconds"] = json!(started.elapsed().as_secs());
    json["date"] = json!(vm::run(Command::new("date").args(["-u", "+%Y-%m-%d"]))?.trim());
    json["kernel_setup"] = json!(KERNEL_SETUP);
    json["gateway_config"] = json!(GATEWAY_CONFIG);
    Ok(Report { json })
}

fn list(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// A list with runs of one entry written once, as `N× entry`.
fn runs(v: &Value) -> Vec<String> {
    let mut out: Vec<(usize, String)> = Vec::new();
    for s in list(v) {
        match out.last_mut() {
            Some((n, last)) if *last == s => *n += 1,
            _ => out.push((1, s)),
        }
    }
    out.into_iter()
        .map(|(n, s)| if n == 1 { s } else { format!("{n}× {s}") })
        .collect()
}

/// One side's outcome in words: delivered what, sent back what, counted
/// where.
pub fn outcome_text(o: &Value) -> String {
    let mut parts = Vec::new();
    let delivered = runs(&o["delivered"]);
    if delivered.is_empty() {
        parts.push("nothing delivered".to_string());
    } else {
        parts.push(format!("delivered {}", delivered.join("; ")));
    }
    let through = runs(&o["through"]);
    if !through.is_empty() {
        parts.push(format!(
            "passed through the device, not taken by the stack: {}",
            through.join("; ")
        ));
    }
    let answers = runs(&o["answers"]);
    if !answers.is_empty() {
        parts.push(format!("answered its own host: {}", answers.join("; ")));
    }
    let back = runs(&o["back"]);
    if !back.is_empty() {
        parts.push(format!("sent back {}", back.join("; ")));
    }
    if let Some(a) = o["after"].as_str().filter(|a| !a.is_empty()) {
        parts.push(format!("then {a}"));
    }
    if let Some(c) = o["counters"].as_object().filter(|c| !c.is_empty()) {
        let mut cs: Vec<String> = c
            .iter()
            .map(|(k, v)| format!("{k} {v:+}", v = v.as_i64().unwrap_or(0)))
            .collect();
        cs.sort();
        parts.push(format!("counted: {}", cs.join(", ")));
    }
    parts.join("; ")
}

impl Report {
    pub fn cases(&self) -> Vec<Value> {
        self.json["cases"].as_array().cloned().unwrap_or_default()
    }

    fn count(&self, verdict: &str) -> usize {
        self.cases()
            .iter()
            .filter(|c| c["verdict"] == verdict)
            .count()
    }

    /// The cases whose outcomes differ with no reason given, or in a field
    /// their reason does not cover (the verdict `differs`).
    pub fn unexplained(&self) -> Vec<String> {
        self.cases()
            .iter()
            .filter(|c| c["verdict"] != "same" && c["verdict"] != "kept")
            .map(|c| c["name"].as_str().unwrap_or("?").to_string())
            .collect()
    }

    pub fn table(&self) -> String {
        let mut s = String::new();
        for c in self.cases() {
            let _ = writeln!(
                s,
                "{:<8} {}\n         kernel:  {}\n         gateway: {}{}",
                c["verdict"].as_str().unwrap_or("?"),
                c["name"].as_str().unwrap_or("?"),
                outcome_text(&c["kernel"]),
                outcome_text(&c["gateway"]),
                c["reason"]
                    .as_str()
                    .map(|r| format!("\n         kept: {r}"))
                    .unwrap_or_default()
            );
        }
        let n = self.cases().len();
        let same = self
            .cases()
            .iter()
            .filter(|c| c["verdict"] == "same")
            .count();
        let kept = self
            .cases()
            .iter()
            .filter(|c| c["verdict"] == "kept")
            .count();
        let _ = writeln!(
            s,
            "{n} cases: {same} the same, {kept} different on purpose, {} different without a reason given; {} s",
            self.unexplained().len(),
            self.json["seconds"]
        );
        s
    }

    /// The cases that differ, as a list for the top of the document.
    fn differences(&self) -> String {
        let mut s = String::new();
        for c in self.cases().iter().filter(|c| c["verdict"] != "same") {
            let _ = writeln!(
                s,
                "- {}: {}",
                c["name"].as_str().unwrap_or("?"),
                match (c["verdict"].as_str(), c["reason"].as_str()) {
                    (Some("kept"), Some(r)) => format!("kept on purpose: {r}"),
                    (_, Some(r)) => format!("**not explained**: differs beyond its reason ({r})"),
                    _ => "**not explained**".to_string(),
                }
            );
        }
        if !s.is_empty() {
            s.push('\n');
        }
        s
    }

    /// `docs/conformance.md`.
    pub fn markdown(&self) -> String {
        let cell = |t: &str| t.replace('|', "\\|").replace('\n', " ");
        let j = &self.json;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# Conformance with the kernel, measured\n\n\
             <!-- Generated by `cargo xtask vm differential --write-docs`: do not edit by hand. -->\n\n\
             Generated by `cargo xtask vm differential --write-docs` on {date}: Debian's Linux {rel} \
             under QEMU ({accel}) as the kernel, the gateway built from this tree; the run took {secs} s.\n\n\
             Every case is sent, as the same bytes (addresses swapped, checksums recomputed), to the \
             kernel's tunnels in the guest and to the gateway's; each column is what that side did, \
             measured: what its devices received (dissected by scapy), what it sent back on the wire, and \
             the counters that moved (the kernel's device statistics and `/proc/net/snmp`, `snmp6`, \
             `netstat`; the gateway's drops by reason). Addresses are written by role: LOCAL and REMOTE \
             are the receiving side's outer addresses, ME(tunnel) and PEER(tunnel) its inner ones. The \
             verdict compares what was delivered and what came back (not the counters, whose names \
             differ); a difference kept on purpose says why. The code: `xtask/src/differential/`.\n\n\
             The packets are scapy expressions (`xtask/src/differential/diff.py`) filled in for each \
             side: `O4(...)` is `IP(src=REMOTE, dst=LOCAL, ...)`, `O6(...)` the same in IPv6, \
             `I4(t, ...)` and `I6(t, ...)` are `IP(src=PEER(t), dst=ME(t), ...)`, `U()` is \
             `UDP(sport=1234, dport=9)/Raw(b'differential')` (a socket on port 9 takes it on both \
             sides), `K(n)` a packet of the `keyed` tunnel (key 42, a right checksum) with sequence number n, \
             `SEQ` a sequence number newer than any sent before; every case is followed by a \
             fence (an echo request through `plain`, whose reply is awaited on both sides), so no \
             result depends on speed. A GSO packet the gateway wrote (it coalesces as GRO would) is \
             cut back into its datagrams before it is compared. \"Passed through the device, not \
             taken\" is a packet a device received that its stack then refused (a protocol it has no \
             handler for, IPv4 on sit) or routed on (a keepalive's inner packet); \"answered its own \
             host\" is an ICMP error about a packet the side's own host sent into the tunnel, which \
             the gateway writes into the device and the kernel makes inside. Neither is compared: \
             what is compared is what the stack took, what came back on the wire, and what the \
             side's next packet met (\"then\").\n\n\
             {n} cases: {same} behave the same, {kept} differ on purpose (the reason is in the \
             table), {bad} differ with no reason given.\n\n\
             {differences}\
             The kernel's tunnels, made in the guest as a user would (GWMAC is the gateway's \
             `ens0`):\n\n```sh",
            differences = self.differences(),
            n = self.cases().len(),
            same = self.count("same"),
            kept = self.count("kept"),
            bad = self.unexplained().len(),
            date = j["date"].as_str().unwrap_or("?"),
            rel = j["kernel_release"].as_str().unwrap_or("?"),
            accel = j["accel"].as_str().unwrap_or("?"),
            secs = j["seconds"],
        );
        for c in list(&j["kernel_setup"]) {
            let _ = writeln!(s, "{c}");
        }
        let _ = writeln!(
            s,
            "```\n\nThe gateway's configuration: the same tunnels seen from its end (`plain` on tap1, \
             `keyed` key 42 csum seq, `ipip` tos inherit nopmtudisc, `sit`, `ip6gre`, `ip6ip6`; \
             `xtask/src/differential/mod.rs`).\n"
        );
        let mut group = String::new();
        for c in self.cases() {
            let g = c["group"].as_str().unwrap_or("").to_string();
            if g != group {
                let _ = writeln!(
                    s,
                    "\n## {g}\n\n| case | packet | the kernel (measured) | this gateway (measured) | verdict |\n|---|---|---|---|---|"
                );
                group = g;
            }
            let verdict = match c["verdict"].as_str() {
                Some("same") => "same".to_string(),
                Some("kept") => {
                    format!("**differs, kept**: {}", c["reason"].as_str().unwrap_or(""))
                }
                _ => "**differs, not explained**".to_string(),
            };
            let _ = writeln!(
                s,
                "| {} | `{}` | {} | {} | {} |",
                cell(c["name"].as_str().unwrap_or("")),
                cell(c["packet"].as_str().unwrap_or("")),
                cell(&outcome_text(&c["kernel"])),
                cell(&outcome_text(&c["gateway"])),
                cell(&verdict)
            );
        }
        s
    }
}

/// `cargo xtask vm differential`.
pub fn main(
    root: &Path,
    cache: &Path,
    gateway_bin: &Path,
    only: &[String],
    json: Option<PathBuf>,
    write_docs: bool,
    stop: &Stop,
) -> Result<()> {
    let report = run(cache, gateway_bin, only, stop)?;
    let path = json.unwrap_or_else(|| cache.join("differential.json"));
    fs::write(&path, serde_json::to_string_pretty(&report.json)?)?;
    println!("{}", report.table());
    println!("(JSON: {})", path.display());
    if write_docs {
        if !only.is_empty() {
            bail!("--write-docs needs every case: leave out --only");
        }
        let doc = root.join("docs/conformance.md");
        fs::write(&doc, report.markdown())?;
        println!("(wrote {})", doc.display());
    }
    let bad = report.unexplained();
    if !bad.is_empty() {
        bail!(
            "{} case(s) differ from the kernel with no reason given: {bad:?}",
            bad.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_written_with_runs_counted() {
        let o = json!({
            "delivered": ["plain: a", "plain: a", "plain: b"],
            "through": [],
            "answers": [],
            "back": ["ICMP 3/3"],
            "after": "",
            "counters": {"drops.key_mismatch": 1, "a.rx_errors": 2},
        });
        assert_eq!(
            outcome_text(&o),
            "delivered 2× plain: a; plain: b; sent back ICMP 3/3; counted: a.rx_errors +2, drops.key_mismatch +1"
        );
        let none = json!({"delivered": [], "back": [], "after": "", "counters": {}});
        assert_eq!(outcome_text(&none), "nothing delivered");
    }

    #[test]
    fn only_a_difference_without_a_reason_fails() {
        let r = Report {
            json: json!({"cases": [
                {"name": "a", "verdict": "same", "reason": null},
                {"name": "b", "verdict": "kept", "reason": "by design"},
                {"name": "c", "verdict": "differs", "reason": null},
                {"name": "d", "verdict": "differs", "reason": "back only", "differs_in": ["back"]},
            ]}),
        };
        // d has a reason, but differs beyond what it covers.
        assert_eq!(r.unexplained(), vec!["c".to_string(), "d".to_string()]);
        let md = r.markdown();
        assert!(md.contains("- b: kept on purpose: by design"), "{md}");
        assert!(md.contains("- c: **not explained**"), "{md}");
    }
}
