//! The report section: a whole run's results (`results.json`), its
//! latency histograms and plot, and the summary table on stdout.
//!
//! Output files: HdrHistogram's percentile-distribution text (`.hgrm`) and
//! an SVG plot. The SVG is written directly: two simple charts do not need
//! a plotting stack (plotters' text layout wants system fonts, which these
//! machines do not have).

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Result;
use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::ceiling::{BareRoundTrip, DeviceCeiling};
use crate::decap::Decap;
use crate::harness::{GEN_CORE, GW_CORE};
use crate::round_trip::RoundTrip;
use crate::Args;

/// The `.hgrm` text of a histogram recorded in nanoseconds, values in
/// microseconds, as HdrHistogram's `outputPercentileDistribution` writes it.
pub fn hgrm(h: &Histogram<u64>) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    let mut total = 0u64;
    for v in h.iter_quantiles(5) {
        total += v.count_since_last_iteration();
        let q = v.quantile_iterated_to();
        let value = v.value_iterated_to() as f64 / 1000.0;
        if q < 1.0 {
            let _ = writeln!(
                s,
                "{value:12.3} {q:14.12} {total:10} {:14.2}",
                1.0 / (1.0 - q)
            );
        } else {
            let _ = writeln!(s, "{value:12.3} {q:14.12} {total:10}");
        }
    }
    let _ = writeln!(
        s,
        "#[Mean    = {:12.3}, StdDeviation   = {:12.3}]",
        h.mean() / 1000.0,
        h.stdev() / 1000.0
    );
    let _ = writeln!(
        s,
        "#[Max     = {:12.3}, Total count    = {:12}]",
        h.max() as f64 / 1000.0,
        h.len()
    );
    let _ = writeln!(
        s,
        "#[Buckets = {:12}, SubBuckets     = {:12}]",
        h.buckets(),
        h.distinct_values()
    );
    s
}

/// One latency curve: a label, a colour, dashed or not, and the histogram.
pub struct Curve<'a> {
    pub label: String,
    pub colour: &'static str,
    pub dashed: bool,
    pub hist: &'a Histogram<u64>,
}

/// One bar of the throughput chart (packets per second).
pub struct Bar {
    pub label: String,
    pub pps: f64,
    pub colour: &'static str,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Latency against percentile (log scale of 1/(1-p), as HdrHistogram plots
/// it), one curve per load level, and beside it the throughput bars.
pub fn svg(title: &str, curves: &[Curve], bars: &[Bar]) -> String {
    let (w, h) = (1100.0, 480.0);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="20" y="24" font-size="16">{}</text>"#,
        esc(title)
    );

    // Left: latency by percentile.
    let (x0, y0, pw, ph) = (70.0, 60.0, 560.0, 340.0);
    let max_exp = 5.0; // up to 99.999%
                       // Log scale of latency: from 1 µs to the next power of ten above the
                       // largest value shown.
    let ymax = curves
        .iter()
        .map(|c| c.hist.value_at_quantile(0.99999) as f64 / 1000.0)
        .fold(10.0, f64::max);
    let decades = ymax.log10().ceil().max(1.0);
    let ypos = |us: f64| y0 + ph - ph * (us.max(1.0).log10() / decades).min(1.0);
    let _ = writeln!(
        s,
        r#"<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    );
    for e in 0..=5 {
        let x = x0 + pw * f64::from(e) / max_exp;
        let label = ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"][e as usize];
        let _ = writeln!(
            s,
            r##"<line x1="{x}" y1="{y0}" x2="{x}" y2="{}" stroke="#ddd"/><text x="{x}" y="{}" text-anchor="middle">{label}</text>"##,
            y0 + ph,
            y0 + ph + 16.0
        );
    }
    for d in 0..=(decades as i32) {
        let v = 10f64.powi(d);
        let y = ypos(v);
        let _ = writeln!(
            s,
            r##"<line x1="{x0}" y1="{y}" x2="{}" y2="{y}" stroke="#eee"/><text x="{}" y="{}" text-anchor="end">{v}</text>"##,
            x0 + pw,
            x0 - 6.0,
            y + 4.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">percentile</text>"#,
        x0 + pw / 2.0,
        y0 + ph + 34.0
    );
    let _ = writeln!(
        s,
        r#"<text x="18" y="{}" transform="rotate(-90 18 {})" text-anchor="middle">round trip (µs, log scale)</text>"#,
        y0 + ph / 2.0,
        y0 + ph / 2.0
    );
    for (i, c) in curves.iter().enumerate() {
        if c.hist.is_empty() {
            continue;
        }
        let mut pts = String::new();
        for k in 0..=200 {
            let e = max_exp * f64::from(k) / 200.0;
            let q = 1.0 - 10f64.powf(-e);
            let v = c.hist.value_at_quantile(q.min(1.0)) as f64 / 1000.0;
            let x = x0 + pw * e / max_exp;
            let y = ypos(v);
            let _ = write!(pts, "{x:.1},{y:.1} ");
        }
        let dash = if c.dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        let _ = writeln!(
            s,
            r#"<polyline points="{pts}" fill="none" stroke="{}" stroke-width="2"{dash}/>"#,
            c.colour
        );
        let ly = y0 + 14.0 + 16.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="{}" stroke-width="2"{dash}/><text x="{}" y="{}">{}</text>"#,
            x0 + 10.0,
            ly - 4.0,
            x0 + 34.0,
            ly - 4.0,
            c.colour,
            x0 + 40.0,
            ly,
            esc(&c.label)
        );
    }

    // Right: throughput against the ceilings.
    let (bx0, by0, bw, bh) = (720.0, 60.0, 340.0, 340.0);
    let bmax = nice(bars.iter().map(|b| b.pps).fold(1.0, f64::max));
    let _ = writeln!(
        s,
        r#"<text x="{bx0}" y="{}">packets per second (thousands)</text>"#,
        by0 - 8.0
    );
    let slot = bh / bars.len().max(1) as f64;
    for (i, b) in bars.iter().enumerate() {
        let y = by0 + slot * i as f64 + 4.0;
        let len = bw * (b.pps / bmax);
        let _ = writeln!(
            s,
            r#"<rect x="{bx0}" y="{y:.1}" width="{len:.1}" height="{:.1}" fill="{}"/>"#,
            slot * 0.55,
            b.colour
        );
        let _ = writeln!(
            s,
            r#"<text x="{bx0}" y="{:.1}">{} — {:.0}k</text>"#,
            y + slot * 0.55 + 13.0,
            esc(&b.label),
            b.pps / 1000.0
        );
    }
    let _ = writeln!(s, "</svg>");
    s
}

/// A round upper bound for an axis.
fn nice(v: f64) -> f64 {
    let p = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if v <= m * p {
            return m * p;
        }
    }
    10.0 * p
}

/// The machine the bench ran on: kernel, CPU model, cores.
pub(crate) fn machine() -> Value {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("")
        .trim()
        .to_string();
    json!({
        "kernel": kernel.trim(),
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
    })
}

/// Latency percentiles of a histogram recorded in nanoseconds, in µs.
pub(crate) fn percentiles(h: &Histogram<u64>) -> Value {
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    json!({
        "count": h.len(),
        "p50_us": us(0.50),
        "p90_us": us(0.90),
        "p99_us": us(0.99),
        "p99_9_us": us(0.999),
        "p99_99_us": us(0.9999),
        "max_us": h.max() as f64 / 1000.0,
    })
}

/// Everything a whole run measured, section by section, for its report.
pub(crate) struct Run<'a> {
    pub(crate) args: &'a Args,
    pub(crate) trial: Duration,
    pub(crate) steps: u32,
    pub(crate) out_dir: &'a Path,
    pub(crate) started: Instant,
    pub(crate) wire_pps: f64,
    pub(crate) dev: DeviceCeiling,
    pub(crate) decap: Decap,
    pub(crate) capture_cost: Value,
    pub(crate) rt: RoundTrip,
    pub(crate) bare: BareRoundTrip,
    pub(crate) idle: Vec<(String, f64)>,
    pub(crate) tcp: Value,
    pub(crate) app: Value,
    pub(crate) spread: Value,
    pub(crate) scale: Value,
    pub(crate) breakdown: Value,
    pub(crate) xdp_cost: Value,
    pub(crate) gw_final: Value,
}

/// The report of a whole run: the latency histograms (`.hgrm`), the
/// results JSON, the plot, and the summary table on stdout.
pub(crate) fn write(run: &Run) -> Result<()> {
    let (args, out_dir) = (run.args, run.out_dir);
    let (wire_pps, dev) = (run.wire_pps, run.dev);
    let (dmax, decap_ndr, dndr) = (run.decap.max, run.decap.ndr, run.decap.ndr_check);
    let rt = &run.rt;
    let rt_ndr = rt.ndr;
    let (tunnel_lat, tunnel_waits) = (&rt.levels, &rt.waits);
    let (bare_lat, bare_waits) = (&run.bare.levels, &run.bare.waits);
    let (tcp, spread, idle, gw_final) = (&run.tcp, &run.spread, &run.idle, &run.gw_final);
    let mut lat_json = Vec::new();
    for (((pct, rate, t), (_, _, b)), (waits, bare_wait)) in tunnel_lat
        .iter()
        .zip(bare_lat)
        .zip(tunnel_waits.iter().zip(bare_waits))
    {
        let tf = format!("latency-tunnel-{pct}pct.hgrm");
        let bf = format!("latency-bare-{pct}pct.hgrm");
        std::fs::write(out_dir.join(&tf), hgrm(&t.rtt))?;
        std::fs::write(out_dir.join(&bf), hgrm(&b.rtt))?;
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
            "mode": args.mode,
            "payload_bytes": args.payload,
            "flows": args.flows,
            "poll": args.poll,
            "busy_poll_budget": args.busy_poll_budget,
            "quick": args.quick,
            "trial_s": run.trial.as_secs_f64(),
            "search_steps": run.steps,
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
            "worker_cost_by_flows": crate::decap::by_flows_json(&run.decap, write_ns),
        },
        "capture_cost": run.capture_cost,
        "round_trip": {
            "max_offered_pps": rt.max_offered,
            "max_answered_pps": rt.max_answered,
            "ndr_pps": rt_ndr,
            "latency": lat_json,
        },
        "tcp": tcp,
        "app": run.app,
        "spread": spread,
        "scale": run.scale,
        "breakdown": run.breakdown,
        "xdp_cost": run.xdp_cost,
        "idle_cpu_pct_of_core": idle.iter().map(|(p, v)| (p.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "gateway_final_stats": gw_final,
        "elapsed_s": run.started.elapsed().as_secs_f64(),
    });
    std::fs::write(
        out_dir.join("results.json"),
        serde_json::to_string_pretty(&result)?,
    )?;
    plot(run, result["machine"]["kernel"].as_str().unwrap_or(""))?;
    summary(run, &lat_json, ns_per_pkt, write_ns);
    Ok(())
}

/// The plot: latency curves, tunnel and bare veth at each level, and the
/// packet rates as bars.
fn plot(run: &Run, kernel: &str) -> Result<()> {
    let (args, out_dir) = (run.args, run.out_dir);
    let (wire_pps, dev) = (run.wire_pps, run.dev);
    let (dmax, decap_ndr) = (run.decap.max, run.decap.ndr);
    let rt_ndr = run.rt.ndr;
    let (tunnel_lat, bare_lat) = (&run.rt.levels, &run.bare.levels);
    let colours = ["#1f77b4", "#2ca02c", "#d62728"];
    let mut curves = Vec::new();
    for (i, ((pct, _, t), (_, _, b))) in tunnel_lat.iter().zip(bare_lat).enumerate() {
        curves.push(Curve {
            label: format!("tunnel at {pct}% NDR"),
            colour: colours[i],
            dashed: false,
            hist: &t.rtt,
        });
        curves.push(Curve {
            label: "bare veth, same rate".to_string(),
            colour: colours[i],
            dashed: true,
            hist: &b.rtt,
        });
    }
    let bars = vec![
        Bar {
            label: "wire ceiling (XDP drop)".into(),
            pps: wire_pps,
            colour: "#999",
        },
        Bar {
            label: "tap ceiling, io_uring".into(),
            pps: dev.uring_pps,
            colour: "#bbb",
        },
        Bar {
            label: "tap ceiling, write(2)".into(),
            pps: dev.write_pps,
            colour: "#bbb",
        },
        Bar {
            label: "gateway decap, max delivered".into(),
            pps: dmax.delivered_pps,
            colour: "#1f77b4",
        },
        Bar {
            label: "gateway decap, no-drop rate".into(),
            pps: decap_ndr,
            colour: "#1f77b4",
        },
        Bar {
            label: "gateway round trip, no-drop rate".into(),
            pps: rt_ndr,
            colour: "#2ca02c",
        },
    ];
    let title = format!(
        "gateway bench: {} {} B payload, {} poll ({})",
        args.mode, args.payload, args.poll, kernel
    );
    std::fs::write(out_dir.join("plot.svg"), svg(&title, &curves, &bars))?;
    Ok(())
}

/// The summary table on stdout.
fn summary(run: &Run, lat_json: &[Value], ns_per_pkt: f64, write_ns: f64) {
    let out_dir = run.out_dir;
    let (wire_pps, dev) = (run.wire_pps, run.dev);
    let (dmax, decap_ndr) = (run.decap.max, run.decap.ndr);
    let rt_ndr = run.rt.ndr;
    let (idle, spread) = (&run.idle, &run.spread);
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
    for (name, label) in [
        ("all", "decap with a capture of everything (vs none)"),
        (
            "filter_matching_none",
            "decap with a capture filtering all out",
        ),
    ] {
        let m = &run.capture_cost["mean"][name];
        println!(
            "{:<44} {:>14.0} {:>11.2}x",
            label,
            m["delivered_pps"].as_f64().unwrap_or(0.0),
            m["ratio_delivered_to_none"].as_f64().unwrap_or(0.0)
        );
    }
    println!("{:<44} {:>14.0}", "round trip: no-drop rate", rt_ndr);
    println!(
        "{:<44} {:>14.0} {:>11.2}x",
        "worker ns/packet at max (vs one write(2))",
        ns_per_pkt,
        ns_per_pkt / write_ns
    );
    crate::decap::by_flows_summary(&run.decap, write_ns);
    println!();
    println!(
        "{:<12} {:>12} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9}",
        "latency", "rate pps", "p50 µs", "p99 µs", "bare p50", "bare p99", "p50 x", "p99 x"
    );
    for l in lat_json {
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
    for l in lat_json {
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
    for (poll, pct) in idle {
        println!("idle cost, poll {poll}: {pct:.1}% of a core");
    }
    crate::app::summary(&run.app);
    for t in spread["trials"].as_array().into_iter().flatten() {
        println!(
            "2 queues, all on one, spread_writes {}: delivered {:.0} of {:.0} pps offered; busy ns per received packet per worker {}",
            t["spread_writes"],
            t["delivered_pps"].as_f64().unwrap_or(0.0),
            t["offered_pps"].as_f64().unwrap_or(0.0),
            t["busy_ns_per_rx_packet_per_queue"]
        );
    }
    if !run.scale.is_null() {
        crate::scale::summary(&run.scale);
    }
    if !run.xdp_cost.is_null() {
        crate::xdp_cost::summary(&run.xdp_cost);
    }
    println!(
        "\nfiles: {}/results.json, plot.svg, latency-*.hgrm, gateway.log",
        out_dir.display()
    );
}

/// The name of a run's default results directory: the UTC time.
pub(crate) fn timestamp() -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hgrm_and_svg_are_well_formed() {
        let mut h = crate::gen::new_histogram();
        for v in [10_000u64, 20_000, 30_000, 1_000_000] {
            h.record(v).unwrap();
        }
        let text = hgrm(&h);
        assert!(text.starts_with("       Value     Percentile TotalCount 1/(1-Percentile)"));
        assert!(text.contains("#[Max     =     1000.447") || text.contains("#[Max     ="));
        assert!(text.contains("Total count    =            4"));
        let svg = svg(
            "t",
            &[Curve {
                label: "a".into(),
                colour: "red",
                dashed: false,
                hist: &h,
            }],
            &[Bar {
                label: "b".into(),
                pps: 1e5,
                colour: "blue",
            }],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(nice(0.7), 1.0);
        assert_eq!(nice(3.0), 5.0);
    }
}
