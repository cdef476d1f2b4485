//! The XDP program's own cost: its run time per packet as the kernel
//! measures it (BPF run-time statistics), for the gateway's steering
//! program and, in the same run, for its ceiling: the program libxdp
//! attaches by default, which redirects every packet to the AF_XDP socket
//! of its queue and does nothing else (`bench_redirect_all`).
//!
//! The same small GRE (or IPIP) decapsulation traffic at the same fixed
//! rate goes (a) into the running gateway's program, then (b), the gateway
//! stopped, into the redirect-all program on the same interface, with an
//! AF_XDP socket of the bench's own draining it; three such rounds, the
//! gateway started again for each. The figure is the delta of
//! `run_time_ns` over the delta of `run_cnt` of each program, its median
//! over the rounds, and the median of the rounds' ratios (the issue's
//! target: at most 1.3x). With the statistics on, every
//! run also pays for the two clock reads that time it, both programs
//! alike.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use serde_json::{json, Value};

use crate::gen::{Capture, Generator, Template, Trial};
use crate::harness::{say, Bench, GatewayProc, GW_CORE};
use crate::ns::NetNs;

/// The rate when no decapsulation no-drop rate is known (`--xdp-only`),
/// or the search found none: modest, well under what the gateway takes.
const FIXED_RATE_PPS: f64 = 100_000.0;

/// The ratio the issue sets as the target.
const TARGET_RATIO: f64 = 1.3;

/// The kernel's figures of one loaded program.
#[derive(Clone, Copy, Debug)]
struct ProgStats {
    run_cnt: u64,
    run_time_ns: u64,
    verified_insns: Option<u32>,
    xlated_bytes: Option<u32>,
    jited_bytes: u32,
}

/// The figures of program `id` (every program on the host is listed; the
/// one with this id is taken).
fn prog_stats(id: u32) -> Result<ProgStats> {
    let mut last_error = None;
    for p in aya::programs::loaded_programs() {
        // A program unloaded while the list is read fails alone: skip it.
        let p = match p {
            Ok(p) => p,
            Err(e) => {
                last_error = Some(e);
                continue;
            }
        };
        if p.id() == id {
            return Ok(ProgStats {
                run_cnt: p.run_count(),
                run_time_ns: u64::try_from(p.run_time().as_nanos()).unwrap_or(u64::MAX),
                verified_insns: p.verified_instruction_count(),
                xlated_bytes: p.size_translated(),
                jited_bytes: p.size_jitted(),
            });
        }
    }
    match last_error {
        Some(e) => Err(anyhow!("no BPF program with id {id} (listing them: {e})")),
        None => Err(anyhow!("no BPF program with id {id}")),
    }
}

/// Turns BPF run-time statistics on while the returned descriptor is held
/// (the kernel counts its holders: another tool's own stays valid).
fn enable_run_time_stats() -> Result<OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(|e| {
        anyhow!("enabling BPF run-time statistics (BPF_ENABLE_STATS) failed: {e}; it needs root (CAP_SYS_ADMIN) and Linux 5.8 or later")
    })
}

/// One trial of `udp` at `rate` while program `id` runs on the gateway's
/// interface: its runs and run time over the trial.
fn measure(bench: &Bench, what: &str, id: u32, udp: &Template, rate: f64) -> Result<Value> {
    let before = prog_stats(id)?;
    let out = bench.run(udp, Some(rate))?;
    let after = prog_stats(id)?;
    let runs = after.run_cnt.saturating_sub(before.run_cnt);
    let run_time_ns = after.run_time_ns.saturating_sub(before.run_time_ns);
    let ns_per_run = run_time_ns as f64 / runs.max(1) as f64;
    say(&format!(
        "  {what} (program {id}): {runs} runs for {} packets sent, {ns_per_run:.1} ns per run",
        out.sent
    ));
    Ok(json!({
        "program_id": id,
        "packets_sent": out.sent,
        "offered_pps": out.sent as f64 / out.elapsed.as_secs_f64().max(1e-9),
        "runs": runs,
        "run_time_ns": run_time_ns,
        "ns_per_run": ns_per_run,
        "verified_insns": after.verified_insns,
        "xlated_insns": after.xlated_bytes.map(|b| b / 8),
        "jited_bytes": after.jited_bytes,
    }))
}

/// Rounds of the two measurements, alternating: one trial of each program
/// is too noisy here (run to run, 1.2x to 1.6x for the same binaries).
const ROUNDS: usize = 3;

/// The middle value (of an even count, when a round could not run, the
/// mean of the two middle ones).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The section: [`ROUNDS`] rounds, each the gateway's program at a fixed
/// rate (50% of the decapsulation no-drop rate `decap_ndr`, or a fixed
/// modest rate without one), then the gateway stopped and the
/// redirect-all program at the same rate; the gateway (`gw`, consumed)
/// started again for the next round. The figures are the medians over
/// the rounds, each round's beside them. Leaves `ens0` in `gw_ns` with no
/// program.
pub(crate) fn section(
    bench: &Bench,
    gw: GatewayProc,
    gw_ns: &NetNs,
    udp: &Template,
    decap_ndr: Option<f64>,
    out_dir: &Path,
) -> Result<Value> {
    let (rate, rate_from) = match decap_ndr {
        Some(ndr) if ndr > 0.0 => (ndr / 2.0, "50% of the decapsulation no-drop rate"),
        _ => (FIXED_RATE_PPS, "fixed"),
    };
    say(&format!(
        "XDP run time per packet: the gateway's program, then redirect-all, at {rate:.0} pps ({rate_from}), {ROUNDS} rounds"
    ));
    let _stats = enable_run_time_stats()?;
    let mut rounds = Vec::with_capacity(ROUNDS);
    let mut gw = Some(gw);
    for round in 0..ROUNDS {
        let g = match gw.take() {
            Some(g) => g,
            None => {
                // Its own config and log: the first gateway's stay. A
                // gateway that does not start again ends the rounds; the
                // ones done stand.
                let name = format!("gateway-xdp-round{}", round + 1);
                let started = crate::harness::start_gateway_polling(
                    bench,
                    gw_ns,
                    out_dir,
                    &bench.args.poll,
                    &name,
                )
                .and_then(|g| crate::harness::wait_next_hop(&g).map(|()| g));
                match started {
                    Ok(g) => g,
                    Err(e) => {
                        say(&format!(
                            "  round {}: the gateway did not start again ({e:#}); {round} round(s) measured",
                            round + 1
                        ));
                        break;
                    }
                }
            }
        };
        let steering = measure(bench, "gateway", gw_ns.xdp_prog_id("ens0")?, udp, rate)?;
        // The gateway's program detaches as it stops.
        drop(g);
        bench.check()?;
        let ceiling = redirect_all(bench, gw_ns, udp, rate)?;
        let per = |v: &Value| v["ns_per_run"].as_f64().unwrap_or(0.0);
        let ratio = per(&steering) / per(&ceiling).max(1e-9);
        say(&format!(
            "  round {}: gateway / redirect-all {ratio:.2}x",
            round + 1
        ));
        rounds.push(json!({
            "steering": steering,
            "redirect_all": ceiling,
            "ratio": ratio,
            "ns_above_redirect_all": per(&steering) - per(&ceiling),
        }));
    }
    let by_round = |f: &dyn Fn(&Value) -> f64| -> Vec<f64> { rounds.iter().map(f).collect() };
    let ratios = by_round(&|r| r["ratio"].as_f64().unwrap_or(0.0));
    let ratio = median(ratios.clone());
    let above = by_round(&|r| r["ns_above_redirect_all"].as_f64().unwrap_or(0.0));
    // Per program: the median run time, and each round's figures.
    let summary_of = |prog: &str| {
        let ns = by_round(&|r| r[prog]["ns_per_run"].as_f64().unwrap_or(0.0));
        json!({
            "ns_per_run": median(ns.clone()),
            "ns_per_run_by_round": ns,
            "runs_by_round": rounds.iter().map(|r| r[prog]["runs"].clone()).collect::<Vec<_>>(),
            "program_id_by_round": rounds.iter().map(|r| r[prog]["program_id"].clone()).collect::<Vec<_>>(),
            "verified_insns": rounds.first().map_or(Value::Null, |r| r[prog]["verified_insns"].clone()),
            "xlated_insns": rounds.first().map_or(Value::Null, |r| r[prog]["xlated_insns"].clone()),
            "jited_bytes": rounds.first().map_or(Value::Null, |r| r[prog]["jited_bytes"].clone()),
        })
    };
    let (steering, ceiling) = (summary_of("steering"), summary_of("redirect_all"));
    say(&format!(
        "  gateway / redirect-all: {ratio:.2}x, the median of {} rounds ({:.2}x to {:.2}x; target at most {TARGET_RATIO}x)",
        rounds.len(),
        ratios.iter().copied().fold(f64::INFINITY, f64::min),
        ratios.iter().copied().fold(0.0, f64::max),
    ));
    Ok(json!({
        "rate_pps": rate,
        "rate_from": rate_from,
        "rounds": rounds,
        "steering": steering,
        "redirect_all": ceiling,
        "ratio_steering_to_redirect_all": ratio,
        "ratio_by_round": ratios,
        "target_ratio": TARGET_RATIO,
        "ns_above_redirect_all": median(above),
        "method": "BPF_ENABLE_STATS run time: delta run_time_ns / delta run_cnt per program over one trial each, in alternating rounds (the gateway restarted for each); ns_per_run is the median over the rounds of each program's, the ratio and ns_above_redirect_all the medians of the rounds' own; both programs' runs include the two clock reads that time every run, which bring the ratio toward 1: read ns_above_redirect_all beside it",
    }))
}

/// One trial of the redirect-all program on `ens0` in `gw_ns` (no gateway
/// there), an AF_XDP socket of the bench's own draining it.
fn redirect_all(bench: &Bench, gw_ns: &NetNs, udp: &Template, rate: f64) -> Result<Value> {
    let sink = Generator::start(Some(gw_ns), "ens0", GW_CORE, Capture::All)
        .context("the redirect-all program and its socket on the gateway's interface")?;
    let id = gw_ns.xdp_prog_id("ens0")?;
    // The sink drains its socket during a trial of its own that sends
    // nothing, a little longer than the generator's at both ends.
    let sink_trial = Trial {
        template: udp.clone(),
        rate: Some(0.0),
        duration: bench.trial + Duration::from_millis(400),
        flows: 1,
    };
    let draining = std::thread::spawn(move || {
        let r = sink.run(sink_trial);
        drop(sink);
        r
    });
    std::thread::sleep(Duration::from_millis(100));
    let ceiling = measure(bench, "redirect-all", id, udp, rate);
    let drained = draining
        .join()
        .map_err(|_| anyhow!("the redirect-all socket's thread panicked"))?;
    let ceiling = ceiling?;
    drained.context("the redirect-all socket")?;
    Ok(ceiling)
}

/// The section's line in the printed summary.
pub(crate) fn summary(x: &Value) {
    let per = |k: &str| x[k]["ns_per_run"].as_f64().unwrap_or(0.0);
    println!(
        "XDP run time per packet at {:.0} pps (medians of {} rounds): gateway {:.1} ns, redirect-all {:.1} ns ({:.1} ns more): {:.2}x (target at most {}x)",
        x["rate_pps"].as_f64().unwrap_or(0.0),
        x["rounds"].as_array().map_or(0, |r| r.len()),
        per("steering"),
        per("redirect_all"),
        x["ns_above_redirect_all"].as_f64().unwrap_or(0.0),
        x["ratio_steering_to_redirect_all"].as_f64().unwrap_or(0.0),
        TARGET_RATIO,
    );
}

/// `--xdp-only`: a gateway started for it, the section at the fixed rate,
/// its results in `results.json` and its summary line.
pub(crate) fn only(bench: &Bench, gw_ns: &NetNs, udp: &Template, out_dir: &Path) -> Result<()> {
    let gw = crate::harness::start_gateway(bench, gw_ns, out_dir)?;
    crate::harness::wait_next_hop(&gw)?;
    let x = section(bench, gw, gw_ns, udp, None, out_dir)?;
    std::fs::write(
        out_dir.join("results.json"),
        serde_json::to_string_pretty(&json!({ "xdp_cost": x }))?,
    )?;
    println!();
    summary(&x);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![1.41, 1.31, 1.35]), 1.35);
        assert_eq!(median(vec![1.5, 1.25]), 1.375);
        assert_eq!(median(vec![]), 0.0);
    }
}
