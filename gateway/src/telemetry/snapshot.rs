//! The snapshot: everything the workers and the XDP program counted, as one
//! JSON object. The one source of every figure the gateway shows (the
//! control socket, `/metrics`, the stats printed on a signal or at exit).

use std::sync::Arc;

use gateway_common::XdpCounter;
use serde_json::{json, Map, Value};

use crate::datapath::drop_reason::DropReason;
use crate::datapath::next_hop::NextHops;
use crate::datapath::tunnel::TunnelTable;
use crate::io::xdp::Steering;
use crate::telemetry::stats::WorkerStats;

/// Everything counted, as one JSON object.
pub fn snapshot(
    table: &TunnelTable,
    steering: &Steering,
    workers: &[Arc<WorkerStats>],
    next_hops: &NextHops,
) -> Value {
    use std::sync::atomic::Ordering::Relaxed;
    let mut tunnels = Vec::new();
    let counters: Vec<_> = workers.iter().map(|w| w.tunnels()).collect();
    let sum = |f: &dyn Fn(
        &crate::telemetry::stats::TunnelCounters,
    ) -> &Vec<std::sync::atomic::AtomicU64>,
               i: usize| {
        counters
            .iter()
            .map(|c| f(c).get(i).map_or(0, |a| a.load(Relaxed)))
            .sum::<u64>()
    };
    for (i, t) in table.iter().enumerate() {
        let packets = sum(&|c| &c.rx_packets, i);
        let bytes = sum(&|c| &c.rx_bytes, i);
        let tx_packets = sum(&|c| &c.tx_packets, i);
        let tx_bytes = sum(&|c| &c.tx_bytes, i);
        tunnels.push(json!({
            "name": t.name,
            "mode": t.mode.kernel_name(t.local.is_ipv6()),
            "local": t.local.to_string(),
            "remote": t.remote.to_string(),
            "device_kind": t.device_kind,
            "rx_packets": packets,
            "rx_bytes": bytes,
            "tx_packets": tx_packets,
            "tx_bytes": tx_bytes,
            "next_hop": next_hops.get(i).map(|m| crate::datapath::next_hop::format_mac(&m)),
            "keepalives_sent": sum(&|c| &c.keepalives_sent, i),
            "keepalive_replies": sum(&|c| &c.keepalive_replies, i),
        }));
    }
    let mut drops = Map::new();
    for r in DropReason::ALL {
        let n: u64 = workers
            .iter()
            .map(|w| w.drops[r as usize].load(Relaxed))
            .sum();
        drops.insert(r.name().into(), json!(n));
    }
    let xdp_values = steering.counters();
    let mut xdp = Map::new();
    for c in XdpCounter::ALL {
        xdp.insert(c.name().into(), json!(xdp_values[c as usize]));
    }
    json!({
        "tunnels": tunnels,
        "drops": drops,
        "xdp": xdp,
        "workers": workers.iter().map(|w| w.to_json()).collect::<Vec<_>>(),
    })
}

/// Prints a snapshot: one JSON line on stdout, a readable summary on stderr.
pub fn print_stats(snap: &Value, event: &str) {
    let mut snap = snap.clone();
    snap["event"] = json!(event);
    // One JSON line on stdout for programs; a readable summary on stderr.
    println!("{snap}");
    eprintln!("{}", crate::telemetry::human::render(&snap));
}
