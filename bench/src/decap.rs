//! The decapsulation section: the generator's tunnel packets into the
//! gateway, counted as the gateway delivers them into its tap; maximum
//! offered load, the no-drop rate, and the worker's time per packet, at
//! `--flows` flows and at 1, 16 and 256 (the fewer the flows, the more
//! packets of one batch go into the tap in one coalesced write).

use std::time::Duration;

use anyhow::Result;
use serde_json::{json, Value};

use crate::gen::Template;
use crate::harness::{say, workers, Bench, GatewayProc};

/// One decapsulation trial: offered, delivered into the tap, worker time.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DecapTrial {
    pub(crate) offered_pps: f64,
    pub(crate) delivered_pps: f64,
    pub(crate) sent: u64,
    pub(crate) delivered: u64,
    /// Delivered packets that went into the tap in another one's write.
    pub(crate) coalesced: u64,
    pub(crate) busy_ns: u64,
}

impl DecapTrial {
    /// The worker's busy time per delivered packet, in ns.
    pub(crate) fn ns_per_packet(&self) -> f64 {
        self.busy_ns as f64 / self.delivered.max(1) as f64
    }
}

impl Bench {
    pub(crate) fn decap_trial(
        &self,
        gw: &GatewayProc,
        t: &Template,
        rate: Option<f64>,
    ) -> Result<DecapTrial> {
        self.decap_trial_flows(gw, t, rate, self.args.flows)
    }

    /// As [`Bench::decap_trial`], with `flows` flows instead of `--flows`.
    pub(crate) fn decap_trial_flows(
        &self,
        gw: &GatewayProc,
        t: &Template,
        rate: Option<f64>,
        flows: u16,
    ) -> Result<DecapTrial> {
        let before = gw.stats()?;
        let out = self.run_flows(t, rate, flows)?;
        std::thread::sleep(Duration::from_millis(200));
        let after = gw.stats()?;
        let delta = |path: &[&str]| workers(&after, path) - workers(&before, path);
        let delivered = delta(&["delivered"]);
        let secs = out.elapsed.as_secs_f64();
        Ok(DecapTrial {
            offered_pps: out.sent as f64 / secs,
            delivered_pps: delivered as f64 / secs,
            sent: out.sent,
            delivered,
            coalesced: delta(&["coalesced"]),
            busy_ns: delta(&["polls", "busy_ns"]),
        })
    }
}

/// The flows of the worker-cost trials, and the target for each:
/// the worker's time per packet at most this many times one write(2).
const COST_FLOWS: [(u16, Option<f64>); 3] = [(1, None), (16, Some(0.6)), (256, Some(1.0))];

/// What the decapsulation section found: the trial at maximum offered
/// load, the no-drop rate, a trial at that rate to check it, and a trial
/// at maximum offered load for each of [`COST_FLOWS`].
pub(crate) struct Decap {
    pub(crate) max: DecapTrial,
    pub(crate) ndr: f64,
    pub(crate) ndr_check: DecapTrial,
    pub(crate) by_flows: Vec<(u16, DecapTrial)>,
}

/// Decapsulation only: maximum offered load, then the no-drop rate by
/// binary search, then one trial at it; then maximum offered load at 1,
/// 16 and 256 flows for the worker's cost per packet.
pub(crate) fn section(bench: &Bench, gw: &GatewayProc, udp: &Template) -> Result<Decap> {
    say("decapsulation only: maximum offered load");
    let dmax = bench.decap_trial(gw, udp, None)?;
    say(&format!(
        "  offered {:.0} pps, delivered {:.0} pps ({:.2}% loss); worker {:.0} ns per packet",
        dmax.offered_pps,
        dmax.delivered_pps,
        100.0 * (1.0 - dmax.delivered as f64 / dmax.sent.max(1) as f64),
        dmax.ns_per_packet()
    ));
    let decap_ndr = bench.search("decap no-drop rate", dmax.offered_pps, |r| {
        let t = bench.decap_trial(gw, udp, Some(r))?;
        Ok(t.delivered >= t.sent)
    })?;
    let dndr = bench.decap_trial(gw, udp, Some(decap_ndr))?;
    say("decapsulation only: the worker's cost per packet at maximum offered load by flows");
    let mut by_flows = Vec::new();
    for (flows, _) in COST_FLOWS {
        let t = bench.decap_trial_flows(gw, udp, None, flows)?;
        say(&format!(
            "  {flows} flow(s): offered {:.0} pps, delivered {:.0} pps; worker {:.0} ns per packet; {:.1}% of packets in another's write",
            t.offered_pps,
            t.delivered_pps,
            t.ns_per_packet(),
            100.0 * t.coalesced as f64 / t.delivered.max(1) as f64
        ));
        by_flows.push((flows, t));
    }
    Ok(Decap {
        max: dmax,
        ndr: decap_ndr,
        ndr_check: dndr,
        by_flows,
    })
}

/// The worker-cost trials by flows for `results.json`, each beside one
/// write(2) of the device ceiling (`write_ns`).
pub(crate) fn by_flows_json(d: &Decap, write_ns: f64) -> Value {
    let rows: Vec<Value> = d
        .by_flows
        .iter()
        .map(|(flows, t)| {
            let target = COST_FLOWS
                .iter()
                .find(|(f, _)| f == flows)
                .and_then(|c| c.1);
            let ratio = t.ns_per_packet() / write_ns.max(1e-9);
            json!({
                "flows": flows,
                "offered_pps": t.offered_pps,
                "delivered_pps": t.delivered_pps,
                "loss_ratio": 1.0 - t.delivered as f64 / t.sent.max(1) as f64,
                "coalesced_ratio": t.coalesced as f64 / t.delivered.max(1) as f64,
                "worker_ns_per_packet": t.ns_per_packet(),
                "tap_write_ns": write_ns,
                "ratio_worker_cost_to_one_write": ratio,
                "target_ratio_at_most": target,
                "within_target": target.map(|m| ratio <= m),
            })
        })
        .collect();
    json!(rows)
}

/// The summary's lines for the worker-cost trials by flows, in the
/// summary table's columns (ns in the figure column).
pub(crate) fn by_flows_summary(d: &Decap, write_ns: f64) {
    for (flows, t) in &d.by_flows {
        let target = COST_FLOWS
            .iter()
            .find(|(f, _)| f == flows)
            .and_then(|c| c.1)
            .map_or(String::new(), |m| format!(" (target ≤ {m}x)"));
        println!(
            "{:<44} {:>14.0} {:>11.2}x{target}",
            format!("worker ns/packet at max, {flows} flow(s)"),
            t.ns_per_packet(),
            t.ns_per_packet() / write_ns.max(1e-9)
        );
    }
}
