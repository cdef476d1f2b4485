//! The decapsulation section: the generator's tunnel packets into the
//! gateway, counted as the gateway delivers them into its tap; maximum
//! offered load, the no-drop rate, and the worker's time per packet.

use std::time::Duration;

use anyhow::Result;

use crate::gen::Template;
use crate::harness::{say, workers, Bench, GatewayProc};

/// One decapsulation trial: offered, delivered into the tap, worker time.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DecapTrial {
    pub(crate) offered_pps: f64,
    pub(crate) delivered_pps: f64,
    pub(crate) sent: u64,
    pub(crate) delivered: u64,
    pub(crate) busy_ns: u64,
}

impl Bench {
    pub(crate) fn decap_trial(
        &self,
        gw: &GatewayProc,
        t: &Template,
        rate: Option<f64>,
    ) -> Result<DecapTrial> {
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

/// What the decapsulation section found: the trial at maximum offered
/// load, the no-drop rate, and a trial at that rate to check it.
pub(crate) struct Decap {
    pub(crate) max: DecapTrial,
    pub(crate) ndr: f64,
    pub(crate) ndr_check: DecapTrial,
}

/// Decapsulation only: maximum offered load, then the no-drop rate by
/// binary search, then one trial at it.
pub(crate) fn section(bench: &Bench, gw: &GatewayProc, udp: &Template) -> Result<Decap> {
    say("decapsulation only: maximum offered load");
    let dmax = bench.decap_trial(gw, udp, None)?;
    say(&format!(
        "  offered {:.0} pps, delivered {:.0} pps ({:.2}% loss); worker {:.0} ns per packet",
        dmax.offered_pps,
        dmax.delivered_pps,
        100.0 * (1.0 - dmax.delivered as f64 / dmax.sent.max(1) as f64),
        dmax.busy_ns as f64 / dmax.delivered.max(1) as f64
    ));
    let decap_ndr = bench.search("decap no-drop rate", dmax.offered_pps, |r| {
        let t = bench.decap_trial(gw, udp, Some(r))?;
        Ok(t.delivered >= t.sent)
    })?;
    let dndr = bench.decap_trial(gw, udp, Some(decap_ndr))?;
    Ok(Decap {
        max: dmax,
        ndr: decap_ndr,
        ndr_check: dndr,
    })
}
