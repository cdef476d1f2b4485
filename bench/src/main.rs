//! `gateway-bench` (run by `cargo xtask bench`): how fast the gateway is,
//! and how close it comes to what the machine allows, in one run.
//!
//! Topology (network namespaces on this machine): the generator's namespace
//! `gwb-gen` (192.168.0.58 on `gen0`) and the gateway's `gwb-gw`
//! (192.168.0.8 on `ens0`) joined by a veth. The generator is an AF_XDP
//! socket on `gen0`; the gateway runs as a separate process with its
//! configuration in the bench's output directory; the inner endpoint that
//! answers is the gateway host's own kernel (ICMP echo behind the tap).
//!
//! Method (as CSIT measures): find the no-drop rate by binary search
//! (highest offered rate with zero loss over a trial), measure latency at
//! 10%, 50% and 90% of it, and throughput and loss at maximum offered load;
//! for decapsulation only and for the round trip. Ceilings in the same
//! run: the wire (XDP drop on the gateway's veth), the device (one core
//! writing the same frames into a tap with write(2) and with io_uring), and
//! the bare veth's round trip for latency.

#![deny(unsafe_code)]

mod ceiling;
mod gen;
mod harness;
mod ns;
mod report;
mod tcp;
mod templates;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use serde_json::{json, Value};

use crate::gen::{Capture, Generator, Template, Trial};
use crate::harness::{
    gateway_config, say, start_gateway, start_gateway_polling, workers, Bench, GatewayProc,
    GEN_CORE, GW_CORE,
};
use crate::ns::{topology, NetNs};
use crate::report::{machine, percentiles};
use crate::templates::Addrs;

#[derive(Parser, Debug)]
#[command(
    name = "gateway-bench",
    about = "Throughput, latency and ceilings of the gateway in one run"
)]
struct Args {
    /// A smoke run under a minute: short trials, few search steps.
    #[arg(long)]
    quick: bool,
    /// Where the results go (default: bench-results/<UTC time>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// The gateway binary.
    #[arg(long, default_value = "target/release/gateway")]
    gateway: PathBuf,
    /// Inner UDP/ICMP payload in bytes (64 by default; 1372 fills a 1400 MTU).
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Flows (ICMP ids / UDP source ports) the generator cycles through.
    #[arg(long, default_value_t = 16)]
    flows: u16,
    /// Tunnel mode under test.
    #[arg(long, default_value = "gre", value_parser = ["gre", "ipip"])]
    mode: String,
    /// How the gateway worker waits: "busy" (the product's default) or "adaptive".
    #[arg(long, default_value = "busy", value_parser = ["busy", "adaptive"])]
    poll: String,
    /// Two hosts: run the generator on this host's IFACE against a gateway
    /// started by hand on another host (see the README).
    #[arg(long, value_name = "IFACE")]
    iface: Option<String>,
    /// Two hosts: the gateway host's underlay IPv4 address.
    #[arg(long, value_name = "IP")]
    gateway_ip: Option<std::net::Ipv4Addr>,
    /// Two hosts: the gateway host's MAC (default: from the neighbour table).
    #[arg(long, value_name = "MAC")]
    gateway_mac: Option<String>,
    /// Two hosts: the gateway side's inner address, which answers ping.
    #[arg(long, default_value = "10.1.1.1")]
    inner_gateway: std::net::Ipv4Addr,
    /// Two hosts: this side's inner address (the gateway's peer).
    #[arg(long, default_value = "10.1.1.2")]
    inner_local: std::net::Ipv4Addr,
    /// Only measure this host's device ceiling (tap write(2) and io_uring),
    /// e.g. on the gateway host of a two-host run.
    #[arg(long)]
    device_ceiling: bool,
    /// Soak: the round trip at 50% of its no-drop rate for SECONDS (600 if
    /// no value), reporting memory, frames and latency over time.
    #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "600")]
    soak: Option<u64>,
    /// Only the TCP section: iperf3 through the tunnel between two
    /// gateways, beside the bare veth with and without offloads.
    #[arg(long)]
    tcp_only: bool,
    /// The gateway's `busy_poll_budget` (kernel busy polling of the NIC
    /// queue, 0 = off).
    #[arg(long, default_value_t = 0)]
    busy_poll_budget: u16,
    /// Queues of the TCP section's veth (a gateway worker per queue, and
    /// as many iperf3 streams).
    #[arg(long, default_value_t = 1)]
    tcp_queues: usize,
    /// Only the spreading section: decapsulation with all packets on one
    /// queue of two, the device writes spread over both workers or not.
    #[arg(long)]
    spread_only: bool,
}

/// One decapsulation trial: offered, delivered into the tap, worker time.
#[derive(Debug, Clone, Copy)]
struct DecapTrial {
    offered_pps: f64,
    delivered_pps: f64,
    sent: u64,
    delivered: u64,
    busy_ns: u64,
}

impl Bench {
    fn decap_trial(&self, gw: &GatewayProc, t: &Template, rate: Option<f64>) -> Result<DecapTrial> {
        let before = gw.stats()?;
        let out = self.run(t, rate)?;
        std::thread::sleep(Duration::from_millis(200));
        let after = gw.stats()?;
        let delivered = workers(&after, &["delivered"]) - workers(&before, &["delivered"]);
        let busy_ns =
            workers(&after, &["polls", "busy_ns"]) - workers(&before, &["polls", "busy_ns"]);
        let secs = out.elapsed.as_secs_f64();
        Ok(DecapTrial {
            offered_pps: out.sent as f64 / secs,
            delivered_pps: delivered as f64 / secs,
            sent: out.sent,
            delivered,
            busy_ns,
        })
    }
}

/// CPU time of a process so far (user + system), in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime and
    // stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // In USER_HZ: 100 per second on Linux.
    (ticks(11) + ticks(12)) / 100.0
}

/// What a gateway costs with no traffic, in percent of one core, polling
/// each way.
fn idle_cost(bench: &Bench, ns: &NetNs, out_dir: &Path) -> Result<Vec<(String, f64)>> {
    let mut out = Vec::new();
    for poll in ["busy", "adaptive"] {
        let gw = start_gateway_polling(bench, ns, out_dir, poll, &format!("idle-{poll}"))?;
        std::thread::sleep(Duration::from_millis(500));
        let pid = gw.child.id();
        let (c0, t0) = (cpu_seconds(pid), Instant::now());
        std::thread::sleep(bench.trial);
        let pct = 100.0 * (cpu_seconds(pid) - c0) / t0.elapsed().as_secs_f64();
        say(&format!("  idle, poll {poll}: {pct:.1}% of a core"));
        out.push((poll.to_string(), pct));
    }
    Ok(out)
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The soak: round trip at 50% of its no-drop rate for `secs`, in chunks,
/// recording the gateway's memory, where its frames are, and latency and
/// loss per chunk, to show drift.
fn soak(bench: &Bench, gw: &GatewayProc, echo: &Template, secs: u64, out_dir: &Path) -> Result<()> {
    let ndr = bench.search(
        "round-trip no-drop rate",
        bench
            .run(echo, None)
            .map(|o| o.sent as f64 / o.elapsed.as_secs_f64())?,
        |r| {
            let o = bench.run(echo, Some(r))?;
            Ok(o.received >= o.sent)
        },
    )?;
    let rate = (ndr / 2.0).max(100.0);
    let chunk = Duration::from_secs(10.min(secs.max(1)));
    let chunks = secs.div_ceil(chunk.as_secs()).max(1);
    say(&format!("soak: {secs} s at {rate:.0} pps (50% of the round-trip no-drop rate {ndr:.0}), {chunks} chunks of {chunk:?}"));
    let started = Instant::now();
    let mut series = Vec::new();
    let mut all = gen::new_histogram();
    for i in 0..chunks {
        bench.check()?;
        let o = bench.gen.run(Trial {
            template: echo.clone(),
            rate: Some(rate),
            duration: chunk,
            flows: bench.args.flows,
        })?;
        let s = gw.stats()?;
        let rss = rss_kib(gw.child.id());
        let f = &s["workers"][0]["frames"];
        let lost = o.sent.saturating_sub(o.received);
        let _ = all.add(&o.rtt);
        say(&format!(
            "  chunk {}/{chunks}: rss {rss} KiB, frames free {} in_kernel {} in_flight {} in_tx {}, p50 {:.1} µs p99 {:.1} µs, lost {lost}",
            i + 1, f["free"], f["in_kernel"], f["in_flight"], f["in_tx"],
            o.rtt.value_at_quantile(0.5) as f64 / 1000.0,
            o.rtt.value_at_quantile(0.99) as f64 / 1000.0,
        ));
        series.push(json!({
            "t_s": started.elapsed().as_secs_f64(),
            "rss_kib": rss,
            "frames": f,
            "sent": o.sent,
            "received": o.received,
            "lost": lost,
            "latency": percentiles(&o.rtt),
        }));
    }
    let rss: Vec<u64> = series
        .iter()
        .map(|c| c["rss_kib"].as_u64().unwrap_or(0))
        .collect();
    let result = json!({
        "settings": {"seconds": secs, "rate_pps": rate, "round_trip_ndr_pps": ndr, "chunk_s": chunk.as_secs(), "poll": bench.args.poll, "mode": bench.args.mode},
        "machine": machine(),
        "rss_kib": {"first": rss.first(), "last": rss.last(), "min": rss.iter().min(), "max": rss.iter().max()},
        "lost_total": series.iter().map(|c| c["lost"].as_u64().unwrap_or(0)).sum::<u64>(),
        "latency_all": percentiles(&all),
        "series": series,
    });
    std::fs::write(
        out_dir.join("soak.json"),
        serde_json::to_string_pretty(&result)?,
    )?;
    std::fs::write(out_dir.join("soak-latency.hgrm"), report::hgrm(&all))?;
    println!(
        "soak: {secs} s at {rate:.0} pps; gateway RSS first {} KiB, last {} KiB, max {} KiB; lost {}; p50 {:.1} µs p99 {:.1} µs overall",
        rss.first().unwrap_or(&0), rss.last().unwrap_or(&0), rss.iter().max().unwrap_or(&0),
        result["lost_total"], all.value_at_quantile(0.5) as f64 / 1000.0, all.value_at_quantile(0.99) as f64 / 1000.0
    );
    println!("files: {}/soak.json, soak-latency.hgrm", out_dir.display());
    Ok(())
}

/// The round-trip phase: maximum load, the no-drop rate, latency at 10,
/// 50 and 90% of it.
struct RoundTrip {
    max_offered: f64,
    max_answered: f64,
    ndr: f64,
    levels: Vec<(u32, f64, gen::Outcome)>,
    /// Per level: how long the gateway's workers and the generator were
    /// kept off their cores while runnable.
    waits: Vec<Value>,
}

/// Time the threads of `pid` whose names start with `prefix` spent
/// runnable but not running (preempted by another task, or waiting for
/// their core), and how many times they were put on a core, from the
/// kernel's schedstat.
fn core_wait(pid: u32, prefix: &str) -> (u64, u64) {
    let mut total = (0, 0);
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return total;
    };
    for task in dir.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with(prefix) {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        let f: Vec<u64> = stat
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        if let [_, wait, slices] = f[..] {
            total.0 += wait;
            total.1 += slices;
        }
    }
    total
}

fn round_trip(bench: &Bench, echo: &Template, gateway: Option<u32>) -> Result<RoundTrip> {
    say("round trip: maximum offered load");
    let rmax = bench.run(echo, None)?;
    let secs = rmax.elapsed.as_secs_f64();
    let (max_offered, max_answered) = (rmax.sent as f64 / secs, rmax.received as f64 / secs);
    say(&format!(
        "  offered {max_offered:.0} pps, answered {max_answered:.0} pps"
    ));
    let ndr = bench.search("round-trip no-drop rate", max_offered, |r| {
        let o = bench.run(echo, Some(r))?;
        Ok(o.received >= o.sent)
    })?;
    let mut levels = Vec::new();
    let mut waits = Vec::new();
    let me = std::process::id();
    for pct in [10u32, 50, 90] {
        let rate = (ndr * f64::from(pct) / 100.0).max(100.0);
        let gw0 = gateway.map(|p| core_wait(p, "gw-q"));
        let gen0 = core_wait(me, "bench-gen");
        let o = bench.run(echo, Some(rate))?;
        let gw1 = gateway.map(|p| core_wait(p, "gw-q"));
        let gen1 = core_wait(me, "bench-gen");
        let gw_wait = gw0.zip(gw1).map(|(a, b)| b.0.saturating_sub(a.0));
        let gen_wait = gen1.0.saturating_sub(gen0.0);
        say(&format!(
            "  latency at {pct}% of the no-drop rate ({rate:.0} pps): p50 {:.1} µs p99 {:.1} µs ({} samples, {} lost); kept off their cores while runnable: gateway workers {}, generator {:.1} ms",
            o.rtt.value_at_quantile(0.5) as f64 / 1000.0,
            o.rtt.value_at_quantile(0.99) as f64 / 1000.0,
            o.rtt.len(),
            o.sent.saturating_sub(o.received),
            gw_wait.map_or("-".to_string(), |w| format!("{:.1} ms", w as f64 / 1e6)),
            gen_wait as f64 / 1e6,
        ));
        waits.push(json!({
            "gateway_workers_runnable_off_core_ms": gw_wait.map(|w| w as f64 / 1e6),
            "generator_runnable_off_core_ms": gen_wait as f64 / 1e6,
            "trial_ms": o.elapsed.as_secs_f64() * 1e3,
        }));
        levels.push((pct, rate, o));
    }
    Ok(RoundTrip {
        max_offered,
        max_answered,
        ndr,
        levels,
        waits,
    })
}

fn timestamp() -> String {
    let out = Command::new("date")
        .args(["-u", "+%Y%m%dT%H%M%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    if out.is_empty() {
        "run".into()
    } else {
        out
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
    {
        bail!("the bench needs root (network namespaces, XDP, AF_XDP)");
    }
    let interrupted = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, interrupted.clone())?;
    }
    if args.device_ceiling {
        let trial = if args.quick {
            Duration::from_millis(700)
        } else {
            Duration::from_secs(3)
        };
        let core = std::thread::available_parallelism().map_or(1, |n| n.get()) - 1;
        let d = ceiling::device(None, core, args.payload, trial)?;
        println!(
            "{}",
            json!({
                "tap_write_pps": d.write_pps,
                "tap_io_uring_pps": d.uring_pps,
                "tap_io_uring_batch": d.batch,
                "payload_bytes": args.payload,
                "core": core,
                "machine": machine(),
            })
        );
        return Ok(());
    }
    let out_dir = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("bench-results").join(timestamp()));
    std::fs::create_dir_all(&out_dir)?;
    if let Some(iface) = args.iface.clone() {
        return two_hosts(args, &iface, &out_dir, interrupted);
    }
    if !args.gateway.exists() {
        bail!(
            "no gateway binary at {}; build it with `cargo build --release -p gateway` (cargo xtask bench does)",
            args.gateway.display()
        );
    }
    let started = Instant::now();
    let tcp_secs = if args.quick { 2 } else { 5 };
    if args.tcp_only {
        let t = tcp_section(
            &args.gateway,
            &args.poll,
            tcp_secs,
            &out_dir,
            args.tcp_queues,
        )?;
        std::fs::write(
            out_dir.join("results.json"),
            serde_json::to_string_pretty(&json!({ "tcp": t }))?,
        )?;
        return Ok(());
    }

    if args.spread_only {
        let trial = if args.quick {
            Duration::from_millis(700)
        } else {
            Duration::from_secs(3)
        };
        let sp = spread_section(&args, trial, &out_dir)?;
        std::fs::write(
            out_dir.join("results.json"),
            serde_json::to_string_pretty(&json!({ "spread": sp }))?,
        )?;
        return Ok(());
    }

    // Topology.
    let (gen_ns, gw_ns, gen_mac, gw_mac) = topology("gwb-gen", "gwb-gw", 1)?;

    let gre = args.mode == "gre";
    let a = Addrs::LAB;
    let udp = templates::tunnel_udp(&a, gw_mac, gen_mac, gre, args.payload);
    let echo = templates::tunnel_echo(&a, gw_mac, gen_mac, gre, args.payload);
    let bare = templates::bare_echo(&a, gw_mac, gen_mac, args.payload);

    let gen = Generator::start(Some(&gen_ns), "gen0", GEN_CORE, Capture::All)?;
    let bench = Bench {
        trial: if args.quick {
            Duration::from_millis(700)
        } else {
            Duration::from_secs(3)
        },
        steps: if args.quick { 3 } else { 7 },
        gen,
        interrupted: interrupted.clone(),
        args,
    };
    let a = &bench.args;
    say(&format!(
        "mode {} payload {} B flows {} poll {}; trials of {:?}, {} search steps; results in {}",
        a.mode,
        a.payload,
        a.flows,
        a.poll,
        bench.trial,
        bench.steps,
        out_dir.display()
    ));

    if let Some(secs) = bench.args.soak {
        let gw = start_gateway(&bench, &gw_ns, out_dir.as_path())?;
        std::thread::sleep(Duration::from_millis(1000));
        soak(&bench, &gw, &echo, secs, out_dir.as_path())?;
        drop(gw);
        drop(gen_ns);
        drop(gw_ns);
        return Ok(());
    }

    // Ceiling (a): the wire.
    say("ceiling: the wire (generator into the gateway's veth, XDP drop, no gateway)");
    let wire_pps = {
        let probe = ceiling::DropProbe::attach(&gw_ns, "ens0")?;
        let s0 = probe.seen()?;
        let out = bench.run(&udp, None)?;
        let s1 = probe.seen()?;
        let pps = (s1 - s0) as f64 / out.elapsed.as_secs_f64();
        say(&format!(
            "  wire: {:.0} pps (generator offered {:.0})",
            pps,
            out.sent as f64 / out.elapsed.as_secs_f64()
        ));
        pps
    };
    bench.check()?;

    // Ceiling (b): the device.
    say("ceiling: one core writing the same inner frames into a tap");
    let dev = ceiling::device(Some(&gw_ns), GW_CORE, bench.args.payload, bench.trial)?;
    say(&format!(
        "  tap write(2): {:.0} pps; io_uring batches of {}: {:.0} pps",
        dev.write_pps, dev.batch, dev.uring_pps
    ));
    bench.check()?;

    // The gateway.
    let gw = start_gateway(&bench, &gw_ns, out_dir.as_path())?;
    // Let the gateway resolve its next hop before measuring.
    std::thread::sleep(Duration::from_millis(1000));

    say("decapsulation only: maximum offered load");
    let dmax = bench.decap_trial(&gw, &udp, None)?;
    say(&format!(
        "  offered {:.0} pps, delivered {:.0} pps ({:.2}% loss); worker {:.0} ns per packet",
        dmax.offered_pps,
        dmax.delivered_pps,
        100.0 * (1.0 - dmax.delivered as f64 / dmax.sent.max(1) as f64),
        dmax.busy_ns as f64 / dmax.delivered.max(1) as f64
    ));
    let decap_ndr = bench.search("decap no-drop rate", dmax.offered_pps, |r| {
        let t = bench.decap_trial(&gw, &udp, Some(r))?;
        Ok(t.delivered >= t.sent)
    })?;
    let dndr = bench.decap_trial(&gw, &udp, Some(decap_ndr))?;

    let rt = round_trip(&bench, &echo, Some(gw.child.id()))?;
    let rt_ndr = rt.ndr;
    let tunnel_lat = rt.levels;
    let tunnel_waits = rt.waits;
    let gw_final = gw.stats()?;
    drop(gw);

    // Ceiling (c): the bare veth's round trip at the same rates.
    say("ceiling: bare veth round trip (the gateway host's kernel answers ping), same rates");
    let mut bare_lat = Vec::new();
    let mut bare_waits = Vec::new();
    for (pct, rate, _) in &tunnel_lat {
        let gen0 = core_wait(std::process::id(), "bench-gen");
        let o = bench.run(&bare, Some(*rate))?;
        let gen_wait = core_wait(std::process::id(), "bench-gen")
            .0
            .saturating_sub(gen0.0);
        bare_waits.push(gen_wait as f64 / 1e6);
        say(&format!(
            "  bare at {rate:.0} pps: p50 {:.1} µs p99 {:.1} µs; generator kept off its core while runnable {:.1} ms",
            o.rtt.value_at_quantile(0.5) as f64 / 1000.0,
            o.rtt.value_at_quantile(0.99) as f64 / 1000.0,
            gen_wait as f64 / 1e6
        ));
        bare_lat.push((*pct, *rate, o));
    }

    say("idle cost: the gateway with no traffic");
    let idle = idle_cost(&bench, &gw_ns, &out_dir)?;
    let tcp = tcp_section(
        &bench.args.gateway,
        &bench.args.poll,
        tcp_secs,
        &out_dir,
        bench.args.tcp_queues,
    )?;
    // Its own namespaces and generator: the others go first.
    let gen_final = bench.gen;
    drop(gen_final);
    let spread = spread_section(&bench.args, bench.trial, &out_dir)?;

    // Files.
    let mut lat_json = Vec::new();
    for (((pct, rate, t), (_, _, b)), (waits, bare_wait)) in tunnel_lat
        .iter()
        .zip(&bare_lat)
        .zip(tunnel_waits.iter().zip(&bare_waits))
    {
        let tf = format!("latency-tunnel-{pct}pct.hgrm");
        let bf = format!("latency-bare-{pct}pct.hgrm");
        std::fs::write(out_dir.join(&tf), report::hgrm(&t.rtt))?;
        std::fs::write(out_dir.join(&bf), report::hgrm(&b.rtt))?;
        let tp = percentiles(&t.rtt);
        let bp = percentiles(&b.rtt);
        lat_json.push(json!({
            "load_pct_of_ndr": pct,
            "rate_pps": rate,
            "tunnel": tp, "tunnel_lost": t.sent.saturating_sub(t.received), "tunnel_hgrm": tf,
            "bare": bp, "bare_lost": b.sent.saturating_sub(b.received), "bare_hgrm": bf,
            "ratio_p50": tp["p50_us"].as_f64().unwrap_or(0.0) / bp["p50_us"].as_f64().unwrap_or(1.0).max(1e-9),
            "ratio_p99": tp["p99_us"].as_f64().unwrap_or(0.0) / bp["p99_us"].as_f64().unwrap_or(1.0).max(1e-9),
            "tunnel_off_core": waits,
            "bare_generator_runnable_off_core_ms": bare_wait,
        }));
    }
    let ns_per_pkt = dmax.busy_ns as f64 / dmax.delivered.max(1) as f64;
    let write_ns = 1e9 / dev.write_pps.max(1.0);
    let result = json!({
        "settings": {
            "hosts": "one (namespaces)",
            "mode": bench.args.mode,
            "payload_bytes": bench.args.payload,
            "flows": bench.args.flows,
            "poll": bench.args.poll,
            "busy_poll_budget": bench.args.busy_poll_budget,
            "quick": bench.args.quick,
            "trial_s": bench.trial.as_secs_f64(),
            "search_steps": bench.steps,
            "generator_core": GEN_CORE,
            "gateway_core": GW_CORE,
            "topology": "namespaces: AF_XDP generator on gen0 <-veth-> ens0 with the gateway; the gateway host's kernel answers behind tap1",
        },
        "machine": machine(),
        "ceilings": {
            "wire_xdp_drop_pps": wire_pps,
            "tap_write_pps": dev.write_pps,
            "tap_io_uring_pps": dev.uring_pps,
            "tap_io_uring_batch": dev.batch,
        },
        "decap": {
            "max_offered_pps": dmax.offered_pps,
            "max_delivered_pps": dmax.delivered_pps,
            "max_loss_ratio": 1.0 - dmax.delivered as f64 / dmax.sent.max(1) as f64,
            "ndr_pps": decap_ndr,
            "ndr_check_delivered_pps": dndr.delivered_pps,
            "worker_ns_per_packet_at_max": ns_per_pkt,
            "worker_capacity_pps": 1e9 / ns_per_pkt.max(1e-9),
            "ratio_ndr_to_wire": decap_ndr / wire_pps.max(1.0),
            "ratio_max_delivered_to_tap_write": dmax.delivered_pps / dev.write_pps.max(1.0),
            "ratio_max_delivered_to_tap_io_uring": dmax.delivered_pps / dev.uring_pps.max(1.0),
            "ratio_worker_cost_to_one_write": ns_per_pkt / write_ns,
        },
        "round_trip": {
            "max_offered_pps": rt.max_offered,
            "max_answered_pps": rt.max_answered,
            "ndr_pps": rt_ndr,
            "latency": lat_json,
        },
        "tcp": tcp,
        "spread": spread,
        "idle_cpu_pct_of_core": idle.iter().map(|(p, v)| (p.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "gateway_final_stats": gw_final,
        "elapsed_s": started.elapsed().as_secs_f64(),
    });
    std::fs::write(
        out_dir.join("results.json"),
        serde_json::to_string_pretty(&result)?,
    )?;

    let colours = ["#1f77b4", "#2ca02c", "#d62728"];
    let mut curves = Vec::new();
    for (i, ((pct, _, t), (_, _, b))) in tunnel_lat.iter().zip(&bare_lat).enumerate() {
        curves.push(report::Curve {
            label: format!("tunnel at {pct}% NDR"),
            colour: colours[i],
            dashed: false,
            hist: &t.rtt,
        });
        curves.push(report::Curve {
            label: "bare veth, same rate".to_string(),
            colour: colours[i],
            dashed: true,
            hist: &b.rtt,
        });
    }
    let bars = vec![
        report::Bar {
            label: "wire ceiling (XDP drop)".into(),
            pps: wire_pps,
            colour: "#999",
        },
        report::Bar {
            label: "tap ceiling, io_uring".into(),
            pps: dev.uring_pps,
            colour: "#bbb",
        },
        report::Bar {
            label: "tap ceiling, write(2)".into(),
            pps: dev.write_pps,
            colour: "#bbb",
        },
        report::Bar {
            label: "gateway decap, max delivered".into(),
            pps: dmax.delivered_pps,
            colour: "#1f77b4",
        },
        report::Bar {
            label: "gateway decap, no-drop rate".into(),
            pps: decap_ndr,
            colour: "#1f77b4",
        },
        report::Bar {
            label: "gateway round trip, no-drop rate".into(),
            pps: rt_ndr,
            colour: "#2ca02c",
        },
    ];
    let title = format!(
        "gateway bench: {} {} B payload, {} poll ({})",
        bench.args.mode,
        bench.args.payload,
        bench.args.poll,
        result["machine"]["kernel"].as_str().unwrap_or("")
    );
    std::fs::write(
        out_dir.join("plot.svg"),
        report::svg(&title, &curves, &bars),
    )?;

    // The summary table.
    println!();
    println!("{:<44} {:>14} {:>12}", "", "packets/s", "ratio");
    println!("{:<44} {:>14.0}", "wire ceiling (XDP drop)", wire_pps);
    println!(
        "{:<44} {:>14.0}",
        "tap ceiling: write(2), one core", dev.write_pps
    );
    println!(
        "{:<44} {:>14.0}",
        "tap ceiling: io_uring batches, one core", dev.uring_pps
    );
    println!(
        "{:<44} {:>14.0} {:>11.2}x",
        "decap: max delivered (vs tap write(2))",
        dmax.delivered_pps,
        dmax.delivered_pps / dev.write_pps.max(1.0)
    );
    println!(
        "{:<44} {:>14.0} {:>11.2}x",
        "decap: no-drop rate (vs wire)",
        decap_ndr,
        decap_ndr / wire_pps.max(1.0)
    );
    println!("{:<44} {:>14.0}", "round trip: no-drop rate", rt_ndr);
    println!(
        "{:<44} {:>14.0} {:>11.2}x",
        "worker ns/packet at max (vs one write(2))",
        ns_per_pkt,
        ns_per_pkt / write_ns
    );
    println!();
    println!(
        "{:<12} {:>12} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9}",
        "latency", "rate pps", "p50 µs", "p99 µs", "bare p50", "bare p99", "p50 x", "p99 x"
    );
    for l in &lat_json {
        println!(
            "{:<12} {:>12.0} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>9.2} {:>9.2}",
            format!("{}% NDR", l["load_pct_of_ndr"]),
            l["rate_pps"].as_f64().unwrap_or(0.0),
            l["tunnel"]["p50_us"].as_f64().unwrap_or(0.0),
            l["tunnel"]["p99_us"].as_f64().unwrap_or(0.0),
            l["bare"]["p50_us"].as_f64().unwrap_or(0.0),
            l["bare"]["p99_us"].as_f64().unwrap_or(0.0),
            l["ratio_p50"].as_f64().unwrap_or(0.0),
            l["ratio_p99"].as_f64().unwrap_or(0.0),
        );
    }
    for l in &lat_json {
        println!(
            "{}% NDR: kept off their cores while runnable: gateway workers {:.1} ms, generator {:.1} ms (bare run: generator {:.1} ms)",
            l["load_pct_of_ndr"],
            l["tunnel_off_core"]["gateway_workers_runnable_off_core_ms"]
                .as_f64()
                .unwrap_or(0.0),
            l["tunnel_off_core"]["generator_runnable_off_core_ms"]
                .as_f64()
                .unwrap_or(0.0),
            l["bare_generator_runnable_off_core_ms"]
                .as_f64()
                .unwrap_or(0.0),
        );
    }
    for (poll, pct) in &idle {
        println!("idle cost, poll {poll}: {pct:.1}% of a core");
    }
    for t in spread["trials"].as_array().into_iter().flatten() {
        println!(
            "2 queues, all on one, spread_writes {}: delivered {:.0} of {:.0} pps offered; busy ns per received packet per worker {}",
            t["spread_writes"],
            t["delivered_pps"].as_f64().unwrap_or(0.0),
            t["offered_pps"].as_f64().unwrap_or(0.0),
            t["busy_ns_per_rx_packet_per_queue"]
        );
    }
    println!(
        "\nfiles: {}/results.json, plot.svg, latency-*.hgrm, gateway.log",
        out_dir.display()
    );
    say(&format!("done in {:.0} s", started.elapsed().as_secs_f64()));
    drop(gen_ns);
    drop(gw_ns);
    Ok(())
}

/// Spreading device writes: a veth of two queues, every packet on queue 0
/// (the generator sends from its queue 0, as a NIC that hashes the outer
/// addresses puts a whole tunnel on one queue), a gateway worker per queue
/// (cores 1 and 0, the generator's core too), decapsulation at maximum
/// offered load with `spread_writes` off and on, side by side.
fn spread_section(args: &Args, trial: Duration, out_dir: &Path) -> Result<Value> {
    say(
        "spreading: 2 queues, all packets on queue 0, a worker per queue; spread_writes off and on",
    );
    let (gen_ns, gw_ns, gen_mac, gw_mac) = topology("gwb-sgen", "gwb-sgw", 2)?;
    let udp = templates::tunnel_udp(
        &Addrs::LAB,
        gw_mac,
        gen_mac,
        args.mode == "gre",
        args.payload,
    );
    let gen = Generator::start(Some(&gen_ns), "gen0", GEN_CORE, Capture::All)?;
    let addrs = ["192.168.0.8", "192.168.0.58", "10.1.1.1", "10.1.1.2"];
    let cores = format!("{GW_CORE}, {GEN_CORE}");
    let mut rows = Vec::new();
    for spread in [false, true] {
        let name = format!("gateway-spread-{}", if spread { "on" } else { "off" });
        let config = out_dir.join(format!("{name}.toml"));
        let extra = format!("queues = \"all\"\nspread_writes = {spread}\n");
        std::fs::write(
            &config,
            gateway_config(&args.poll, &cores, &extra, &args.mode, addrs),
        )?;
        let gw = GatewayProc::start(
            &gw_ns,
            &args.gateway,
            &config,
            &out_dir.join(format!("{name}.log")),
        )?;
        std::thread::sleep(Duration::from_millis(1000));
        let before = gw.stats()?;
        let out = gen.run(Trial {
            template: udp.clone(),
            rate: None,
            duration: trial,
            flows: args.flows,
        })?;
        std::thread::sleep(Duration::from_millis(200));
        let after = gw.stats()?;
        let mut row = spread_trial(&before, &after, &out);
        row["spread_writes"] = json!(spread);
        say(&format!(
            "  spread_writes {spread}: offered {:.0} pps, delivered {:.0} pps ({:.2}% loss); received per queue {}; written for the other worker per queue {}; busy ns per received packet per worker {}",
            row["offered_pps"].as_f64().unwrap_or(0.0),
            row["delivered_pps"].as_f64().unwrap_or(0.0),
            100.0 * row["loss_ratio"].as_f64().unwrap_or(0.0),
            row["rx_frames_per_queue"],
            row["spread_in_per_queue"],
            row["busy_ns_per_rx_packet_per_queue"],
        ));
        rows.push(row);
        drop(gw);
    }
    drop(gen);
    drop(gen_ns);
    drop(gw_ns);
    let delivered = |i: usize| rows[i]["delivered_pps"].as_f64().unwrap_or(0.0);
    let ratio = delivered(1) / delivered(0).max(1.0);
    say(&format!(
        "  delivered at maximum load, spread on / off: {ratio:.2}x"
    ));
    Ok(json!({
        "trials": rows,
        "ratio_delivered_on_to_off": ratio,
    }))
}

/// One trial of the spreading section, from the counters before and after.
fn spread_trial(before: &Value, after: &Value, out: &gen::Outcome) -> Value {
    let per_queue = |path: &[&str]| -> Vec<u64> {
        let a = after["workers"].as_array().cloned().unwrap_or_default();
        let b = before["workers"].as_array().cloned().unwrap_or_default();
        let get = |w: &Value| {
            let mut v = w;
            for p in path {
                v = &v[*p];
            }
            v.as_u64().unwrap_or(0)
        };
        a.iter().zip(&b).map(|(x, y)| get(x) - get(y)).collect()
    };
    let secs = out.elapsed.as_secs_f64();
    let delivered = workers(after, &["delivered"]) - workers(before, &["delivered"]);
    let rx = per_queue(&["rx_frames"]);
    let received: u64 = rx.iter().sum();
    let busy = per_queue(&["polls", "busy_ns"]);
    json!({
        "offered_pps": out.sent as f64 / secs,
        "delivered_pps": delivered as f64 / secs,
        "loss_ratio": 1.0 - delivered as f64 / out.sent.max(1) as f64,
        "rx_frames_per_queue": rx,
        "spread_in_per_queue": per_queue(&["spread_in"]),
        "busy_ns_per_queue": busy,
        "busy_ns_per_rx_packet_per_queue": busy
            .iter()
            .map(|b| (*b as f64 / received.max(1) as f64).round())
            .collect::<Vec<_>>(),
    })
}

/// iperf3 through the tunnel and over the bare veth; prints its lines and
/// returns them as JSON.
fn tcp_section(
    gateway: &Path,
    poll: &str,
    secs: u64,
    out_dir: &Path,
    queues: usize,
) -> Result<Value> {
    say(&format!(
        "TCP: iperf3, {queues} stream(s), two gateways (GRE, MTU 1400, {queues} queue(s)) beside the bare veth (MTU 1400)"
    ));
    let t = tcp::run(gateway, poll, secs, out_dir, queues)?;
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

/// The first IPv4 address of `iface`.
fn iface_ipv4(iface: &str) -> Result<[u8; 4]> {
    let out = ns::sh(&["ip", "-4", "-o", "addr", "show", "dev", iface])?;
    let a = out
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|c| c.split('/').next())
        .ok_or_else(|| anyhow!("{iface} has no IPv4 address"))?;
    Ok(a.parse::<std::net::Ipv4Addr>()?.octets())
}

fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let v: Vec<u8> = s
        .trim()
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("bad MAC {s}"))?;
    v.try_into().map_err(|_| anyhow!("bad MAC {s}"))
}

/// Two hosts: the generator here on `iface`, the gateway on another host,
/// started there by hand with a tunnel whose remote is this host. Measures
/// the round trip (maximum, no-drop rate, latency); the gateway host's own
/// ceilings come from `gateway-bench --device-ceiling` run there.
fn two_hosts(args: Args, iface: &str, out_dir: &Path, interrupted: Arc<AtomicBool>) -> Result<()> {
    let started = Instant::now();
    let gw_ip = args.gateway_ip.ok_or_else(|| {
        anyhow!("--iface needs --gateway-ip (the gateway host's underlay address)")
    })?;
    let my_ip = iface_ipv4(iface)?;
    let my_mac = parse_mac(&std::fs::read_to_string(format!(
        "/sys/class/net/{iface}/address"
    ))?)?;
    let gw_mac = match &args.gateway_mac {
        Some(m) => parse_mac(m)?,
        None => {
            let _ = Command::new("ping")
                .args(["-c", "1", "-W", "1", &gw_ip.to_string()])
                .output();
            let out = ns::sh(&["ip", "neigh", "show", &gw_ip.to_string(), "dev", iface])?;
            let m = out
                .split_whitespace()
                .skip_while(|w| *w != "lladdr")
                .nth(1)
                .ok_or_else(|| {
                    anyhow!("no neighbour entry for {gw_ip} on {iface}; give --gateway-mac")
                })?;
            parse_mac(m)?
        }
    };
    let a = Addrs {
        gen: my_ip,
        gw: gw_ip.octets(),
        inner_gen: args.inner_local.octets(),
        inner_gw: args.inner_gateway.octets(),
    };
    let gre = args.mode == "gre";
    let echo = templates::tunnel_echo(&a, gw_mac, my_mac, gre, args.payload);
    let core = std::thread::available_parallelism().map_or(1, |n| n.get()) - 1;
    let gen = Generator::start(
        None,
        iface,
        core,
        Capture::Tunnel {
            local: my_ip,
            remote: gw_ip.octets(),
            proto: if gre { 47 } else { 4 },
            mac: my_mac,
        },
    )?;
    let bench = Bench {
        trial: if args.quick {
            Duration::from_millis(700)
        } else {
            Duration::from_secs(3)
        },
        steps: if args.quick { 3 } else { 7 },
        gen,
        interrupted,
        args,
    };
    say(&format!(
        "two hosts: generator on {iface} ({}), gateway at {gw_ip}; {} {} B payload; results in {}",
        std::net::Ipv4Addr::from(my_ip),
        bench.args.mode,
        bench.args.payload,
        out_dir.display()
    ));
    // One answer first: the gateway resolves us, the path is warm.
    let probe = bench.gen.run(Trial {
        template: echo.clone(),
        rate: Some(100.0),
        duration: Duration::from_millis(500),
        flows: 1,
    })?;
    if probe.received == 0 {
        bail!("no answer through the tunnel from {gw_ip}: is the gateway running there with remote = \"{}\", address {} and peer {}?",
            std::net::Ipv4Addr::from(my_ip), bench.args.inner_gateway, bench.args.inner_local);
    }
    let rt = round_trip(&bench, &echo, None)?;
    let mut lat_json = Vec::new();
    for (pct, rate, o) in &rt.levels {
        let f = format!("latency-tunnel-{pct}pct.hgrm");
        std::fs::write(out_dir.join(&f), report::hgrm(&o.rtt))?;
        lat_json.push(json!({
            "load_pct_of_ndr": pct,
            "rate_pps": rate,
            "tunnel": percentiles(&o.rtt),
            "tunnel_lost": o.sent.saturating_sub(o.received),
            "tunnel_hgrm": f,
        }));
    }
    let result = json!({
        "settings": {
            "hosts": "two",
            "iface": iface,
            "gateway_ip": gw_ip.to_string(),
            "mode": bench.args.mode,
            "payload_bytes": bench.args.payload,
            "flows": bench.args.flows,
            "quick": bench.args.quick,
            "trial_s": bench.trial.as_secs_f64(),
            "search_steps": bench.steps,
            "generator_core": core,
        },
        "machine": machine(),
        "ceilings": {
            "note": "run `gateway-bench --device-ceiling` on the gateway host for its tap ceilings",
        },
        "decap": null,
        "round_trip": {
            "max_offered_pps": rt.max_offered,
            "max_answered_pps": rt.max_answered,
            "ndr_pps": rt.ndr,
            "latency": lat_json,
        },
        "elapsed_s": started.elapsed().as_secs_f64(),
    });
    std::fs::write(
        out_dir.join("results.json"),
        serde_json::to_string_pretty(&result)?,
    )?;
    let colours = ["#1f77b4", "#2ca02c", "#d62728"];
    let curves: Vec<_> = rt
        .levels
        .iter()
        .enumerate()
        .map(|(i, (pct, _, o))| report::Curve {
            label: format!("tunnel at {pct}% NDR"),
            colour: colours[i],
            dashed: false,
            hist: &o.rtt,
        })
        .collect();
    let bars = vec![
        report::Bar {
            label: "round trip, max answered".into(),
            pps: rt.max_answered,
            colour: "#2ca02c",
        },
        report::Bar {
            label: "round trip, no-drop rate".into(),
            pps: rt.ndr,
            colour: "#2ca02c",
        },
    ];
    std::fs::write(
        out_dir.join("plot.svg"),
        report::svg(
            &format!(
                "gateway bench, two hosts: {} {} B",
                bench.args.mode, bench.args.payload
            ),
            &curves,
            &bars,
        ),
    )?;
    println!(
        "\nround trip: max answered {:.0} pps, no-drop rate {:.0} pps",
        rt.max_answered, rt.ndr
    );
    for l in &lat_json {
        println!(
            "{:>3}% NDR {:>10.0} pps  p50 {:>8.1} µs  p99 {:>8.1} µs",
            l["load_pct_of_ndr"],
            l["rate_pps"].as_f64().unwrap_or(0.0),
            l["tunnel"]["p50_us"].as_f64().unwrap_or(0.0),
            l["tunnel"]["p99_us"].as_f64().unwrap_or(0.0)
        );
    }
    println!(
        "files: {}/results.json, plot.svg, latency-*.hgrm",
        out_dir.display()
    );
    Ok(())
}
