//! A person's view of the counters.

use serde_json::Value;

/// Renders a stats snapshot (see [`crate::telemetry::snapshot::snapshot`]) as a few aligned
/// lines; zero drop counters are left out.
pub fn render(s: &Value) -> String {
    let mut out = String::new();
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let g = &s["gateway"];
    if g.is_object() {
        let events = nonzero(&g["events"]);
        out.push_str(&format!(
            "underlay {} {}; xdp {}; events: {}\n",
            g["underlay"].as_str().unwrap_or("?"),
            if g["underlay_up"].as_bool() == Some(true) {
                "up"
            } else {
                "DOWN"
            },
            if g["xdp_attached"].as_bool() == Some(true) {
                "attached"
            } else {
                "NOT ATTACHED (see the log)"
            },
            if events.is_empty() {
                "none".into()
            } else {
                events.join(" ")
            },
        ));
    }
    out.push_str(
        "tunnel        rx_packets        rx_bytes  tx_packets        tx_bytes  state   idle\n",
    );
    for t in s["tunnels"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<12} {:>11} {:>15} {:>11} {:>15}  {:<6} {:>5}\n",
            t["name"].as_str().unwrap_or("?"),
            n(&t["rx_packets"]),
            n(&t["rx_bytes"]),
            n(&t["tx_packets"]),
            n(&t["tx_bytes"]),
            t["state"].as_str().unwrap_or("-"),
            t["idle_seconds"]
                .as_u64()
                .map_or("-".to_string(), |s| format!("{s}s")),
        ));
    }
    let drops = nonzero(&s["drops"]);
    out.push_str(&format!(
        "drops: {}\n",
        if drops.is_empty() {
            "none".into()
        } else {
            drops.join(" ")
        }
    ));
    let xdp = nonzero(&s["xdp"]);
    out.push_str(&format!("xdp: {}\n", xdp.join(" ")));
    for w in s["workers"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "worker queue {} core {}: rx_frames {} delivered {} keepalives {} batches {}; tx_read {} tx_sent {} tx_replies {}; frames total {} free {} in_kernel {} in_flight {} in_tx {}; xsk rx_dropped {} rx_ring_full {} fill_ring_empty {}\n",
            w["queue"], w["core"], w["rx_frames"], w["delivered"], w["keepalives"], w["batches"],
            w["tx_read"], w["tx_sent"], w["tx_replies"],
            w["frames"]["total"], w["frames"]["free"], w["frames"]["in_kernel"], w["frames"]["in_flight"], w["frames"]["in_tx"],
            w["xsk"]["rx_dropped"], w["xsk"]["rx_ring_full"], w["xsk"]["fill_ring_empty"],
        ));
    }
    out
}

/// `name=value` for each counter of an object that is not zero.
fn nonzero(counters: &Value) -> Vec<String> {
    counters
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, v)| v.as_u64() != Some(0))
        .map(|(k, v)| format!("{k}={v}"))
        .collect()
}
