//! The soak section (`--soak`): the round trip at 50% of its no-drop rate
//! for a long while, reporting the gateway's memory, where its frames are,
//! and latency and loss over time.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::json;

use crate::gen::{self, Template, Trial};
use crate::harness::{say, Bench, GatewayProc};
use crate::report::{self, machine, percentiles};

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
pub(crate) fn run(
    bench: &Bench,
    gw: &GatewayProc,
    echo: &Template,
    secs: u64,
    out_dir: &Path,
) -> Result<()> {
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
