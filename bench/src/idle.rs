//! The idle-cost section: what a gateway costs with no traffic, polling
//! each way.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::harness::{say, start_gateway_polling, Bench};
use crate::ns::NetNs;

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
pub(crate) fn cost(bench: &Bench, ns: &NetNs, out_dir: &Path) -> Result<Vec<(String, f64)>> {
    say("idle cost: the gateway with no traffic");
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
