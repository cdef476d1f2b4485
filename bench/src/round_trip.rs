//! The round-trip section: ICMP echo through the tunnel, answered by the
//! gateway host's kernel behind the tap; maximum offered load, the no-drop
//! rate, and latency at 10, 50 and 90% of it, with how long the gateway's
//! workers and the generator were kept off their cores meanwhile.

use anyhow::Result;
use serde_json::{json, Value};

use crate::gen::{self, Template};
use crate::harness::{say, Bench};

/// The round-trip phase: maximum load, the no-drop rate, latency at 10,
/// 50 and 90% of it.
pub(crate) struct RoundTrip {
    pub(crate) max_offered: f64,
    pub(crate) max_answered: f64,
    pub(crate) ndr: f64,
    pub(crate) levels: Vec<(u32, f64, gen::Outcome)>,
    /// Per level: how long the gateway's workers and the generator were
    /// kept off their cores while runnable.
    pub(crate) waits: Vec<Value>,
}

/// Time the threads of `pid` whose names start with `prefix` spent
/// runnable but not running (preempted by another task, or waiting for
/// their core), and how many times they were put on a core, from the
/// kernel's schedstat.
pub(crate) fn core_wait(pid: u32, prefix: &str) -> (u64, u64) {
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

/// The round trip: maximum offered load, the no-drop rate, latency at
/// 10, 50 and 90% of it; `gateway`: the gateway's pid, for its workers'
/// time off their cores.
pub(crate) fn run(bench: &Bench, echo: &Template, gateway: Option<u32>) -> Result<RoundTrip> {
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
