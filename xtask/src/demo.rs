//! `cargo xtask demo`: the lab of shared/seed-lab.md with two gateways in
//! place of the kernel's tunnels. Namespaces host1 and host2 are joined
//! through a bridge in a third namespace (the "wire", where tshark listens,
//! since the gateways' XDP programs take tunnel packets before any capture
//! on the hosts' own interfaces could see them).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

const HOSTS: [&str; 2] = ["host1", "host2"];
const WIRE: &str = "gw-wire";

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn exists(ns: &str) -> bool {
    Path::new("/var/run/netns").join(ns).exists()
}

/// Removes what the demo creates; runs on every exit path.
struct Cleanup {
    children: Vec<Child>,
    tmp: Option<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &mut self.children {
            // SIGTERM first so the gateways detach and tidy up.
            if let Ok(None) = c.try_wait() {
                let _ = Command::new("kill")
                    .args(["-TERM", &c.id().to_string()])
                    .stderr(Stdio::null())
                    .status();
            }
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        for c in &mut self.children {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in HOSTS.iter().chain([&WIRE]) {
            if exists(ns) {
                let _ = Command::new("ip").args(["netns", "del", ns]).status();
            }
        }
        if let Some(t) = &self.tmp {
            let _ = std::fs::remove_dir_all(t);
        }
        eprintln!("[demo] removed namespaces host1, host2, {WIRE} and the demo's files");
    }
}

fn topology() -> Result<()> {
    for ns in HOSTS.iter().chain([&WIRE]) {
        ip(&["netns", "add", ns])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
    }
    ip(&["-n", WIRE, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", WIRE, "link", "set", "br0", "up"])?;
    for (i, (host, addr)) in HOSTS
        .iter()
        .zip(["192.168.0.8/24", "192.168.0.58/24"])
        .enumerate()
    {
        let port = format!("port{}", i + 1);
        ip(&[
            "link", "add", "ens0", "netns", host, "type", "veth", "peer", "name", &port, "netns",
            WIRE,
        ])?;
        ip(&["-n", WIRE, "link", "set", &port, "master", "br0"])?;
        ip(&["-n", WIRE, "link", "set", &port, "up"])?;
        ip(&["-n", host, "addr", "add", addr, "dev", "ens0"])?;
        ip(&["-n", host, "link", "set", "ens0", "up"])?;
    }
    Ok(())
}

fn start_gateway(bin: &Path, host: &str, config: &Path, log: &Path) -> Result<Child> {
    let err = std::fs::File::create(log)?;
    let out = std::fs::File::create(log.with_extension("json"))?;
    let child = Command::new("ip")
        .args(["netns", "exec", host])
        .arg(bin)
        .arg("--config")
        .arg(config)
        .env("NO_COLOR", "1")
        .stdout(out)
        .stderr(err)
        // Its own process group: Ctrl-C reaches the demo, which then stops
        // the gateways in order (SIGTERM in `Cleanup`).
        .process_group(0)
        .spawn()
        .context("starting the gateway")?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains("gateway running") {
            return Ok(child);
        }
        if text.contains("error:") || Instant::now() > deadline {
            bail!("the gateway in {host} did not start:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn run_in(ns: &str, args: &[&str]) -> (bool, String) {
    match Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
    {
        Ok(o) => (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        ),
        Err(e) => (false, e.to_string()),
    }
}

fn show(title: &str) {
    println!("\n== {title}");
}

fn rtt_line(out: &str) -> String {
    out.lines()
        .find(|l| l.starts_with("rtt"))
        .or_else(|| out.lines().find(|l| l.contains("packet loss")))
        .map(|l| l.trim().to_string())
        .unwrap_or_default()
}

/// Asks a gateway for its counters (SIGUSR1): the summary it prints on
/// stderr, and the value of one drop counter from the JSON on stdout.
fn counters(child: &Child, log: &Path, drop_reason: &str) -> (String, Option<u64>) {
    let before = std::fs::read_to_string(log).unwrap_or_default().len();
    let _ = Command::new("kill")
        .args(["-USR1", &child.id().to_string()])
        .status();
    std::thread::sleep(Duration::from_millis(400));
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let summary = text.get(before..).unwrap_or("").trim_end().to_string();
    let json = std::fs::read_to_string(log.with_extension("json")).unwrap_or_default();
    let key = format!("\"{drop_reason}\":");
    let value = json.lines().rev().find_map(|l| {
        let at = l.find(&key)? + key.len();
        l[at..].split([',', '}']).next()?.trim().parse().ok()
    });
    (summary, value)
}

/// Stops the demo when it was interrupted or a gateway has died.
fn step(interrupted: &AtomicBool, cleanup: &mut Cleanup, logs: &[PathBuf]) -> Result<()> {
    if interrupted.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    for (i, c) in cleanup.children.iter_mut().take(HOSTS.len()).enumerate() {
        if let Ok(Some(status)) = c.try_wait() {
            let log = std::fs::read_to_string(&logs[i]).unwrap_or_default();
            let mut tail: Vec<&str> = log.lines().rev().take(5).collect();
            tail.reverse();
            bail!(
                "the gateway in {} exited ({status}); its last lines:\n{}",
                HOSTS[i],
                tail.join("\n")
            );
        }
    }
    Ok(())
}

pub fn demo(root: &Path, bin: &Path, interrupted: Arc<AtomicBool>) -> Result<()> {
    for ns in HOSTS.iter().chain([&WIRE]) {
        if exists(ns) {
            bail!("network namespace {ns} already exists (a demo still running, or left over?); remove it with `ip netns del {ns}`");
        }
    }
    let tmp = std::env::temp_dir().join(format!("gateway-demo-{}", std::process::id()));
    let mut cleanup = Cleanup {
        children: Vec::new(),
        tmp: Some(tmp.clone()),
    };
    topology()?;
    println!("host1 ens0 192.168.0.8/24 --- [{WIRE}: br0] --- host2 ens0 192.168.0.58/24");
    std::fs::create_dir_all(&tmp)?;
    let logs: Vec<PathBuf> = HOSTS.iter().map(|h| tmp.join(format!("{h}.log"))).collect();
    for (i, host) in HOSTS.iter().enumerate() {
        let cfg = root.join(format!("configs/lab-host{}.toml", i + 1));
        let child = start_gateway(bin, host, &cfg, &logs[i])?;
        println!(
            "{host}: gateway running ({})",
            cfg.strip_prefix(root).unwrap_or(&cfg).display()
        );
        cleanup.children.push(child);
    }
    step(&interrupted, &mut cleanup, &logs)?;

    // Capture tunnel packets on the wire while the pings run.
    let pcap = tmp.join("wire.pcap");
    let tshark = Command::new("ip")
        .args([
            "netns",
            "exec",
            WIRE,
            "tshark",
            "-q",
            "-i",
            "br0",
            "-f",
            "ip proto 47 or ip proto 4",
            "-a",
            "duration:8",
            "-w",
        ])
        .arg(&pcap)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting tshark (apt-get install tshark, or cargo xtask setup)")?;
    cleanup.children.push(tshark);
    std::thread::sleep(Duration::from_millis(1500));

    println!("(tun100 and tun200 are the tunnels' names; their devices are tap1 and tap2)");
    show("ping through tun100 (GRE, device tap1): host1 -> 10.1.1.2");
    let (ok1, out) = run_in("host1", &["ping", "-c", "5", "-i", "0.2", "10.1.1.2"]);
    step(&interrupted, &mut cleanup, &logs)?;
    print!("{out}");
    show("ping through tun200 (IPIP, device tap2): host1 -> 20.1.1.2");
    let (ok2, out) = run_in("host1", &["ping", "-c", "5", "-i", "0.2", "20.1.1.2"]);
    step(&interrupted, &mut cleanup, &logs)?;
    print!("{out}");
    show("bare underlay for comparison: host1 -> 192.168.0.58");
    let (_, bare) = run_in("host1", &["ping", "-c", "5", "-i", "0.2", "192.168.0.58"]);
    step(&interrupted, &mut cleanup, &logs)?;
    println!("{}", rtt_line(&bare));
    show("nothing else crosses: from 10.1.1.1 to 20.1.1.2 (must fail)");
    let (_, before) = counters(&cleanup.children[1], &logs[1], "inner_source_not_peer");
    let (crossed, out) = run_in(
        "host1",
        &[
            "ping", "-c", "2", "-i", "0.3", "-W", "1", "-I", "10.1.1.1", "20.1.1.2",
        ],
    );
    step(&interrupted, &mut cleanup, &logs)?;
    let (_, after) = counters(&cleanup.children[1], &logs[1], "inner_source_not_peer");
    println!("{}", rtt_line(&out));
    let refused = after.unwrap_or(0).saturating_sub(before.unwrap_or(0));
    let blocked = !crossed && refused > 0;
    if crossed {
        println!("UNEXPECTED: 10.1.1.1 reached 20.1.1.2");
    } else if blocked {
        println!("blocked: host2's gateway refused {refused} packet(s) whose inner source is not tun200's peer (drops.inner_source_not_peer)");
    } else {
        println!("NOT confirmed: the ping failed, but host2's gateway counted no refusal");
    }
    // Let tshark finish its capture (it stops by itself after 8 s).
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(t) = cleanup.children.get_mut(2) {
            if let Ok(Some(_)) = t.try_wait() {
                break;
            }
        }
        step(&interrupted, &mut cleanup, &logs)?;
        std::thread::sleep(Duration::from_millis(100));
    }

    show("on the wire (decoded by tshark)");
    for (proto, name) in [("47", "tun100 GRE"), ("4", "tun200 IPIP")] {
        let out = Command::new("tshark")
            .args(["-r"])
            .arg(&pcap)
            .args([
                "-Y",
                &format!("ip.proto == {proto}"),
                "-o",
                "ip.check_checksum:TRUE",
                "-T",
                "fields",
                "-E",
                "separator=|",
                "-e",
                "ip.src",
                "-e",
                "ip.dst",
                "-e",
                "ip.proto",
                "-e",
                "ip.ttl",
                "-e",
                "ip.checksum.status",
                "-e",
                "gre.proto",
                "-e",
                "icmp.type",
            ])
            .output()
            .context("running tshark -r")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().next().unwrap_or("");
        let f: Vec<&str> = line.trim().split('|').collect();
        let list = |i: usize| -> Vec<&str> {
            f.get(i).map(|s| s.split(',').collect()).unwrap_or_default()
        };
        let (src, dst, proto_l, ttl, sum) = (list(0), list(1), list(2), list(3), list(4));
        if src.len() < 2 || dst.len() < 2 {
            println!("{name}: no packet captured");
            continue;
        }
        println!("{name}:");
        println!(
            "  outer IPv4 {} -> {}  protocol {}  ttl {}  header checksum {}",
            src[0],
            dst[0],
            proto_l.first().unwrap_or(&"?"),
            ttl.first().unwrap_or(&"?"),
            if sum.first() == Some(&"1") {
                "good"
            } else {
                "not verified"
            }
        );
        if proto == "47" {
            println!("  GRE header, protocol type {}", f.get(5).unwrap_or(&"?"));
        } else {
            println!("  (no GRE header: the inner packet follows the outer header directly)");
        }
        println!(
            "  inner IPv4 {} -> {}  protocol {}  ttl {}",
            src[1],
            dst[1],
            proto_l.get(1).unwrap_or(&"?"),
            ttl.get(1).unwrap_or(&"?")
        );
    }

    for (i, host) in HOSTS.iter().enumerate() {
        show(&format!("{host} gateway counters"));
        println!(
            "{}",
            counters(&cleanup.children[i], &logs[i], "inner_source_not_peer").0
        );
    }
    if !(ok1 && ok2 && blocked) {
        bail!("the demo did not behave as the lab requires (see above)");
    }
    println!("\nthe lab works: both tunnels ping, nothing else crosses. Cleaning up.");
    Ok(())
}
