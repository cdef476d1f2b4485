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
//!
//! One module per section, run in this order by `main`: `ceiling` (the
//! wire, the device, and later the bare veth's round trip), `decap`,
//! `capture` (the cost of a capture attached), `round_trip`, `breakdown`
//! (the round trip stage by stage), `xdp_cost` (the XDP program's run
//! time beside libxdp's default program's), `idle`, `tcp`,
//! `app` (application-to-application latency), `spread`, `scale` (ten
//! thousand tunnels), then `report` (results, plot,
//! summary); `soak` and `two_hosts` are modes of their own. `harness` has
//! what they share (the gateway process, trials, the no-drop search).

#![deny(unsafe_code)]

mod app;
mod breakdown;
mod capture;
mod ceiling;
mod decap;
mod gen;
mod harness;
mod idle;
mod ns;
mod report;
mod round_trip;
mod scale;
mod soak;
mod spread;
mod tcp;
mod templates;
mod two_hosts;
mod xdp_cost;

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Parser;

use crate::gen::{Capture, Generator};
use crate::harness::{say, start_gateway, wait_next_hop, Bench, GEN_CORE};
use crate::ns::topology;
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
    /// started by hand on another host (see docs/performance.md).
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
    /// Only the application-to-application section: a UDP ping-pong
    /// between two hosts through two gateways, beside the bare veth.
    #[arg(long)]
    app_only: bool,
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
    /// Only the breakdown: the round trip at a low rate, stage by stage,
    /// from the kernel's tracepoints (perf).
    #[arg(long)]
    breakdown_only: bool,
    /// Only the scale section: a gateway with --scale-tunnels tunnels
    /// (check, start, memory, lookup, reloads, stats), beside one.
    #[arg(long)]
    scale_only: bool,
    /// Tunnels of the scale section (half keyed between one pair of
    /// hosts, half from distinct remotes; 10,000 by default, 1,000 with
    /// --quick); 0 leaves the section out.
    #[arg(long)]
    scale_tunnels: Option<usize>,
    /// Only the XDP run-time section: the gateway's XDP program and the
    /// redirect-all program, run time per packet at a fixed rate.
    #[arg(long)]
    xdp_only: bool,
}

impl Args {
    /// The scale section's tunnel count.
    fn scale_tunnels(&self) -> usize {
        self.scale_tunnels
            .unwrap_or(if self.quick { 1_000 } else { 10_000 })
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
        return ceiling::device_only(&args);
    }
    let out_dir = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("bench-results").join(report::timestamp()));
    std::fs::create_dir_all(&out_dir)?;
    if let Some(iface) = args.iface.clone() {
        return two_hosts::run(args, &iface, &out_dir, interrupted);
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
        return tcp::only(&args, tcp_secs, &out_dir);
    }
    if args.app_only {
        return app::only(&args, &out_dir, &interrupted);
    }

    if args.spread_only {
        return spread::only(&args, &out_dir);
    }

    if args.scale_only {
        if args.scale_tunnels() == 0 {
            bail!("--scale-only with --scale-tunnels 0 measures nothing; give a number of tunnels");
        }
        return scale::only(&args, &out_dir);
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

    if bench.args.breakdown_only {
        let gw = start_gateway(&bench, &gw_ns, out_dir.as_path())?;
        wait_next_hop(&gw)?;
        let b = breakdown::section(&bench, &gw_ns, &gen_ns, gw.child.id(), &echo, &out_dir)?;
        std::fs::write(
            out_dir.join("results.json"),
            serde_json::to_string_pretty(&serde_json::json!({ "breakdown": b }))?,
        )?;
        return Ok(());
    }

    if let Some(secs) = bench.args.soak {
        let gw = start_gateway(&bench, &gw_ns, out_dir.as_path())?;
        std::thread::sleep(Duration::from_millis(1000));
        soak::run(&bench, &gw, &echo, secs, out_dir.as_path())?;
        drop(gw);
        drop(gen_ns);
        drop(gw_ns);
        return Ok(());
    }

    if bench.args.xdp_only {
        xdp_cost::only(&bench, &gw_ns, &udp, &out_dir)?;
        drop(bench);
        drop(gen_ns);
        drop(gw_ns);
        return Ok(());
    }

    // Ceiling (a): the wire.
    let wire_pps = ceiling::wire_section(&bench, &gw_ns, &udp)?;
    bench.check()?;

    // Ceiling (b): the device.
    let dev = ceiling::device_section(&bench, &gw_ns)?;
    bench.check()?;

    // The gateway.
    let gw = start_gateway(&bench, &gw_ns, out_dir.as_path())?;
    // Its next hop resolved before measuring.
    wait_next_hop(&gw)?;

    let decap = decap::section(&bench, &gw, &udp)?;
    let capture_cost = capture::section(&bench, &gw, &gw_ns, &udp)?;
    let rt = round_trip::run(&bench, &echo, Some(gw.child.id()))?;
    // A breakdown that cannot be had (no perf, no tracepoints, nothing
    // traced) is said, not fatal: the other sections stand without it.
    let breakdown = breakdown::section(&bench, &gw_ns, &gen_ns, gw.child.id(), &echo, &out_dir)
        .unwrap_or_else(|e| {
            say(&format!("breakdown: not measured: {e:#}"));
            serde_json::json!({ "error": format!("{e:#}") })
        });
    let gw_final = gw.stats()?;
    // Stops the gateway half way: its ceiling runs without it.
    let xdp_cost = xdp_cost::section(&bench, gw, &gw_ns, &udp, Some(decap.ndr), &out_dir)?;

    // Ceiling (c): the bare veth's round trip at the same rates.
    let bare = ceiling::bare_round_trip(&bench, &bare, &rt.levels)?;

    let idle = idle::cost(&bench, &gw_ns, &out_dir)?;
    let tcp = tcp::section(
        &bench.args.gateway,
        &bench.args.poll,
        tcp_secs,
        &out_dir,
        bench.args.tcp_queues,
    )?;
    let app = app::section(&bench.args, &out_dir, &bench.interrupted)?;
    // Its own namespaces and generator: the others go first.
    let gen_final = bench.gen;
    drop(gen_final);
    let spread = spread::section(&bench.args, bench.trial, &out_dir)?;
    let scale = if bench.args.scale_tunnels() > 0 {
        scale::section(&bench.args, &out_dir)?
    } else {
        serde_json::Value::Null
    };

    // Files.
    report::write(&report::Run {
        args: &bench.args,
        trial: bench.trial,
        steps: bench.steps,
        out_dir: &out_dir,
        started,
        wire_pps,
        dev,
        decap,
        capture_cost,
        rt,
        bare,
        idle,
        tcp,
        app,
        spread,
        scale,
        breakdown,
        xdp_cost,
        gw_final,
    })?;
    say(&format!("done in {:.0} s", started.elapsed().as_secs_f64()));
    drop(gen_ns);
    drop(gw_ns);
    Ok(())
}
