//! Two hosts (`--iface`): the round-trip section with the generator on
//! this host's interface and the gateway on another host, started there by
//! hand; its own results, plot and summary.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;

use crate::gen::{Capture, Generator, Trial};
use crate::harness::{say, Bench};
use crate::ns;
use crate::report::{self, machine, percentiles};
use crate::round_trip;
use crate::templates::{self, Addrs};
use crate::Args;

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
pub(crate) fn run(
    args: Args,
    iface: &str,
    out_dir: &Path,
    interrupted: Arc<AtomicBool>,
) -> Result<()> {
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
    let rt = round_trip::run(&bench, &echo, None)?;
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
