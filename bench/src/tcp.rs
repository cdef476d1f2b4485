//! TCP through one tunnel: iperf3, one stream, between two gateways in two
//! namespaces, beside the bare veth with and without its offloads, in the
//! same run.
//!
//! Two namespaces joined by a veth (the underlay, MTU 1500); in each, a
//! gateway with tunnel tun100 (GRE, MTU 1400) into tap1, 10.1.1.1 on one
//! side and 10.1.1.2 on the other. iperf3's client runs on one side and
//! its server on the other.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::harness::{say, start_gateway_pair};
use crate::ns::{self, NetNs};
use crate::Args;

/// What one iperf3 run carried.
#[derive(Debug, Clone, Copy)]
pub struct Throughput {
    /// Received by the server, bits per second.
    pub bps: f64,
    pub retransmits: u64,
}

pub struct TcpResults {
    pub bare_offloads: Throughput,
    pub bare_no_offloads: Throughput,
    pub tunnel: Throughput,
    pub gateway_a: Value,
    pub gateway_b: Value,
}

/// Runs iperf3 `secs` seconds from namespace `client` to `server_ip` in
/// namespace `server`.
fn iperf(
    client: &NetNs,
    server: &NetNs,
    server_ip: &str,
    secs: u64,
    streams: usize,
) -> Result<Throughput> {
    let mut srv = Command::new("ip")
        .args(["netns", "exec", &server.name, "iperf3", "-s", "-1", "-B"])
        .arg(server_ip)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting iperf3 -s (apt-get install iperf3)")?;
    std::thread::sleep(Duration::from_millis(300));
    let mut cli = Command::new("ip")
        .args([
            "netns",
            "exec",
            &client.name,
            "iperf3",
            "-J",
            "--connect-timeout",
            "3000",
            "-c",
        ])
        .arg(server_ip)
        .args(["-t", &secs.to_string(), "-P", &streams.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running iperf3 -c")?;
    // A stalled connection would keep iperf3 waiting for the server's
    // report for ever.
    let deadline = std::time::Instant::now() + Duration::from_secs(secs + 20);
    while cli.try_wait()?.is_none() {
        if std::time::Instant::now() > deadline {
            let _ = cli.kill();
            let _ = srv.kill();
            let _ = srv.wait();
            let _ = cli.wait();
            bail!(
                "iperf3 to {server_ip} did not finish within {} s",
                secs + 20
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = cli.wait_with_output()?;
    let _ = srv.kill();
    let _ = srv.wait();
    let v: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 said: {}", String::from_utf8_lossy(&out.stderr)))?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    Ok(Throughput {
        bps: v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .context("no sum_received in iperf3's output")?,
        retransmits: v["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
    })
}

/// veth's default offloads (TSO and GSO on, GRO off), or none.
fn offloads(ns: &NetNs, dev: &str, on: bool) -> Result<()> {
    let v = if on { "on" } else { "off" };
    ns::sh(&[
        "ip", "netns", "exec", &ns.name, "ethtool", "-K", dev, "tso", v, "gso", v, "gro", "off",
    ])
    .context("ethtool (apt-get install ethtool)")?;
    Ok(())
}

/// Runs the three measurements; `secs` per iperf3 run. With `queues` > 1
/// the veth has that many queues, each gateway a worker per queue (on
/// cores 0 and 1 in turn), and iperf3 runs as many streams.
pub fn run(
    gateway: &Path,
    poll: &str,
    secs: u64,
    out_dir: &Path,
    queues: usize,
) -> Result<TcpResults> {
    let (a, b) = ns::underlay_pair("gwb-tcp-a", "gwb-tcp-b", queues)?;

    // The bare veth at the tunnel's MTU, with the offloads veth has by
    // default (TSO, GSO), then with none.
    for n in [&a, &b] {
        n.ip(&["link", "set", "ens0", "mtu", "1400"])?;
        offloads(n, "ens0", true)?;
    }
    let bare_offloads = iperf(&a, &b, ns::PAIR_B, secs, queues)?;
    for n in [&a, &b] {
        offloads(n, "ens0", false)?;
    }
    let bare_no_offloads = iperf(&a, &b, ns::PAIR_B, secs, queues)?;
    // The underlay as a host has it: MTU 1500, default offloads.
    for n in [&a, &b] {
        n.ip(&["link", "set", "ens0", "mtu", "1500"])?;
        offloads(n, "ens0", true)?;
    }

    let cores = if queues > 1 {
        ["0, 1", "1, 0"]
    } else {
        ["0", "1"]
    };
    let (ga, gb) = start_gateway_pair((&a, &b), gateway, poll, cores, out_dir, "tcp")?;
    let tunnel = iperf(&a, &b, "10.1.1.2", secs, queues)?;
    let gateway_a = ga.stats()?;
    let gateway_b = gb.stats()?;
    Ok(TcpResults {
        bare_offloads,
        bare_no_offloads,
        tunnel,
        gateway_a,
        gateway_b,
    })
}

/// iperf3 through the tunnel and over the bare veth; prints its lines and
/// returns them as JSON.
pub(crate) fn section(
    gateway: &Path,
    poll: &str,
    secs: u64,
    out_dir: &Path,
    queues: usize,
) -> Result<Value> {
    say(&format!(
        "TCP: iperf3, {queues} stream(s), two gateways (GRE, MTU 1400, {queues} queue(s)) beside the bare veth (MTU 1400)"
    ));
    let t = run(gateway, poll, secs, out_dir, queues)?;
    let g = |x: f64| x / 1e9;
    let lines = [
        ("bare veth, offloads on", t.bare_offloads),
        ("bare veth, offloads off", t.bare_no_offloads),
        ("through the tunnel", t.tunnel),
    ];
    for (what, v) in lines {
        say(&format!(
            "  {what}: {:.2} Gbit/s ({} retransmits)",
            g(v.bps),
            v.retransmits
        ));
    }
    let v = json!({
        "seconds": secs,
        "queues_and_streams": queues,
        "bare_offloads_gbps": g(t.bare_offloads.bps),
        "bare_no_offloads_gbps": g(t.bare_no_offloads.bps),
        "tunnel_gbps": g(t.tunnel.bps),
        "tunnel_retransmits": t.tunnel.retransmits,
        "ratio_tunnel_to_bare_offloads": t.tunnel.bps / t.bare_offloads.bps.max(1.0),
        "ratio_tunnel_to_bare_no_offloads": t.tunnel.bps / t.bare_no_offloads.bps.max(1.0),
        "gateway_sender_stats": t.gateway_a,
        "gateway_receiver_stats": t.gateway_b,
    });
    println!(
        "TCP, {queues} stream(s): tunnel {:.2} Gbit/s; bare veth {:.2} with offloads ({:.2}x), {:.2} without ({:.2}x)",
        g(t.tunnel.bps),
        g(t.bare_offloads.bps),
        v["ratio_tunnel_to_bare_offloads"].as_f64().unwrap_or(0.0),
        g(t.bare_no_offloads.bps),
        v["ratio_tunnel_to_bare_no_offloads"].as_f64().unwrap_or(0.0),
    );
    Ok(v)
}

/// `--tcp-only`: the TCP section alone, `secs` per iperf3 run, its results
/// in `results.json`.
pub(crate) fn only(args: &Args, secs: u64, out_dir: &Path) -> Result<()> {
    let t = section(&args.gateway, &args.poll, secs, out_dir, args.tcp_queues)?;
    std::fs::write(
        out_dir.join("results.json"),
        serde_json::to_string_pretty(&json!({ "tcp": t }))?,
    )?;
    Ok(())
}
