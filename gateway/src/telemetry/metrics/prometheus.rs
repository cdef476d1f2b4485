//! Prometheus' text exposition format, rendered from a snapshot.

use std::fmt::Write as _;

use serde_json::Value;

/// Renders a snapshot in Prometheus' text exposition format.
pub fn prometheus(s: &Value) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, u64)>| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, v) in samples {
            if labels.is_empty() {
                let _ = writeln!(out, "{name} {v}");
            } else {
                let _ = writeln!(out, "{name}{{{labels}}} {v}");
            }
        }
    };
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let tunnels = s["tunnels"].as_array().cloned().unwrap_or_default();
    let workers = s["workers"].as_array().cloned().unwrap_or_default();
    let mut packets = Vec::new();
    let mut bytes = Vec::new();
    let mut resolved = Vec::new();
    let mut up = Vec::new();
    let mut keepalives = Vec::new();
    let mut idle = Vec::new();
    for t in &tunnels {
        let name = t["name"].as_str().unwrap_or("?");
        for dir in ["rx", "tx"] {
            let l = format!("tunnel=\"{name}\",direction=\"{dir}\"");
            packets.push((l.clone(), n(&t[format!("{dir}_packets")])));
            bytes.push((l, n(&t[format!("{dir}_bytes")])));
        }
        resolved.push((
            format!("tunnel=\"{name}\""),
            u64::from(t["next_hop"].is_string()),
        ));
        if let Some(state) = t["state"].as_str() {
            up.push((format!("tunnel=\"{name}\""), u64::from(state == "up")));
            keepalives.push((
                format!("tunnel=\"{name}\",direction=\"sent\""),
                n(&t["keepalives_sent"]),
            ));
            keepalives.push((
                format!("tunnel=\"{name}\",direction=\"replies\""),
                n(&t["keepalive_replies"]),
            ));
        }
        if let Some(s) = t["idle_seconds"].as_u64() {
            idle.push((format!("tunnel=\"{name}\""), s));
        }
    }
    family(
        "gateway_tunnel_packets_total",
        "counter",
        "Packets per tunnel: rx delivered into its device, tx sent on the wire.",
        packets,
    );
    family(
        "gateway_tunnel_bytes_total",
        "counter",
        "Bytes per tunnel: rx written into its device, tx sent on the wire.",
        bytes,
    );
    family(
        "gateway_tunnel_next_hop_resolved",
        "gauge",
        "1 when the outer next hop's MAC is known.",
        resolved,
    );
    family(
        "gateway_tunnel_up",
        "gauge",
        "Tunnels with keepalives: 1 while their keepalives are answered, 0 once interval x misses seconds pass without a reply.",
        up,
    );
    family(
        "gateway_tunnel_keepalives_total",
        "counter",
        "Tunnels with keepalives: keepalives sent, and replies received.",
        keepalives,
    );
    family(
        "gateway_tunnel_idle_seconds",
        "gauge",
        "Seconds since anything (a packet, a keepalive reply) last arrived on the tunnel.",
        idle,
    );
    let drops = s["drops"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (format!("reason=\"{k}\""), n(v)))
                .collect()
        })
        .unwrap_or_default();
    family(
        "gateway_drops_total",
        "counter",
        "Packets dropped, by reason.",
        drops,
    );
    let xdp = s["xdp"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (format!("counter=\"{k}\""), n(v)))
                .collect()
        })
        .unwrap_or_default();
    family(
        "gateway_xdp_packets_total",
        "counter",
        "The XDP program's counters: seen, redirected, and why others went to the kernel.",
        xdp,
    );
    let g = &s["gateway"];
    if g.is_object() {
        let b = |v: &Value| u64::from(v.as_bool().unwrap_or(false));
        family(
            "gateway_underlay_up",
            "gauge",
            "1 while the underlay interface is up.",
            vec![(String::new(), b(&g["underlay_up"]))],
        );
        family(
            "gateway_xdp_attached",
            "gauge",
            "1 while the gateway's XDP program is the one attached to the underlay.",
            vec![(String::new(), b(&g["xdp_attached"]))],
        );
        family(
            "gateway_draining",
            "gauge",
            "1 while the gateway drains (gateway drain, SIGUSR2): it stops once traffic has moved.",
            vec![(String::new(), u64::from(!g["draining"].is_null()))],
        );
        let a = &g["anycast"];
        if a.is_object() {
            let addresses = a["addresses"]
                .as_array()
                .map(|l| {
                    l.iter()
                        .map(|x| {
                            (
                                format!("address=\"{}\"", x.as_str().unwrap_or("")),
                                b(&a["announced"]),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            family(
                "gateway_anycast_announced",
                "gauge",
                "1 while the shared endpoint address is on the gateway's device (announced by the routing daemon).",
                addresses,
            );
        }
        let events = g["events"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (format!("event=\"{k}\""), n(v)))
                    .collect()
            })
            .unwrap_or_default();
        family(
            "gateway_events_total",
            "counter",
            "Reloads (and refused ones), devices re-created after deletion, underlay down events, XDP program lost.",
            events,
        );
    }

    let per_worker = |path: &[&str]| -> Vec<(String, u64)> {
        workers
            .iter()
            .map(|w| {
                let mut v = w;
                for p in path {
                    v = &v[*p];
                }
                (format!("queue=\"{}\"", w["queue"]), n(v))
            })
            .collect()
    };
    for (name, path, help) in [
        (
            "gateway_worker_rx_frames_total",
            &["rx_frames"][..],
            "Frames taken from the AF_XDP RX ring.",
        ),
        (
            "gateway_worker_delivered_total",
            &["delivered"][..],
            "Packets written into tunnel devices.",
        ),
        (
            "gateway_worker_keepalives_total",
            &["keepalives"][..],
            "GRE keepalives answered (sent back on the underlay).",
        ),
        (
            "gateway_worker_coalesced_total",
            &["coalesced"][..],
            "Delivered TCP segments written in another segment's write (coalesced into one GSO packet).",
        ),
        (
            "gateway_worker_tx_gso_packets_total",
            &["tx_gso_packets"][..],
            "Large (TSO/USO) packets read from the devices and cut into tunnel-MTU segments.",
        ),
        (
            "gateway_worker_coalesced_writes_total",
            &["coalesced_writes"][..],
            "Device writes carrying coalesced TCP segments.",
        ),
        (
            "gateway_worker_spread_out_total",
            &["spread_out"][..],
            "Packets handed to another worker to write into the device (spread_writes).",
        ),
        (
            "gateway_worker_spread_in_total",
            &["spread_in"][..],
            "Packets written into a device for another worker (spread_writes).",
        ),
        (
            "gateway_worker_spread_bounced_total",
            &["spread_bounced"][..],
            "Packets handed to another worker that came back unwritten during a reload and were written by this one.",
        ),
        (
            "gateway_worker_path_mtu_updates_total",
            &["path_mtu_updates"][..],
            "ICMP fragmentation-needed messages about tunnel packets taken (path MTU lowered).",
        ),
        (
            "gateway_worker_fragments_merged_total",
            &["fragments_merged"][..],
            "Outer fragments merged into a reassembled datagram.",
        ),
        (
            "gateway_worker_batches_total",
            &["batches"][..],
            "RX batches (rx_frames / batches is the mean batch size).",
        ),
        (
            "gateway_worker_tx_read_total",
            &["tx_read"][..],
            "Packets read from tunnel devices.",
        ),
        (
            "gateway_worker_tx_sent_total",
            &["tx_sent"][..],
            "Packets handed to the AF_XDP TX ring.",
        ),
        (
            "gateway_worker_tx_replies_total",
            &["tx_replies"][..],
            "ARP and neighbour answers written back into devices.",
        ),
        (
            "gateway_worker_busy_nanoseconds_total",
            &["polls", "busy_ns"][..],
            "Time spent in loop iterations that moved packets.",
        ),
        (
            "gateway_worker_idle_nanoseconds_total",
            &["polls", "idle_ns"][..],
            "Time spent waiting for packets (spinning or asleep).",
        ),
        (
            "gateway_xsk_rx_dropped_total",
            &["xsk", "rx_dropped"][..],
            "The kernel's AF_XDP socket: packets dropped.",
        ),
        (
            "gateway_xsk_rx_ring_full_total",
            &["xsk", "rx_ring_full"][..],
            "The kernel's AF_XDP socket: RX ring full.",
        ),
        (
            "gateway_xsk_fill_ring_empty_total",
            &["xsk", "fill_ring_empty"][..],
            "The kernel's AF_XDP socket: fill ring empty (shortfall).",
        ),
        (
            "gateway_xsk_rx_invalid_descs_total",
            &["xsk", "rx_invalid_descs"][..],
            "The kernel's AF_XDP socket: invalid RX descriptors.",
        ),
    ] {
        family(name, "counter", help, per_worker(path));
    }
    family(
        "gateway_worker_fragments_pending",
        "gauge",
        "Outer fragments held for reassembly now.",
        per_worker(&["fragments_pending"]),
    );
    let mut frames = Vec::new();
    for w in &workers {
        for place in [
            "total",
            "free",
            "in_kernel",
            "in_flight",
            "in_tx",
            "at_peers",
        ] {
            frames.push((
                format!("queue=\"{}\",place=\"{place}\"", w["queue"]),
                n(&w["frames"][place]),
            ));
        }
    }
    family(
        "gateway_worker_frames",
        "gauge",
        "Where each worker's UMEM frames are (ring occupancy).",
        frames,
    );
    out
}
