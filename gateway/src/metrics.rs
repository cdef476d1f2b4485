//! What the gateway shows of itself while it runs: Prometheus text on
//! `--metrics ADDR` (`GET /metrics`), and a control socket that `gateway
//! stats` reads. Both ask the control thread for a snapshot over a channel;
//! the snapshot (see [`crate::run::snapshot`]) is the one source of every
//! figure, so the JSON, the summary and the metrics always agree.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::mpsc::{channel, Sender};

use serde_json::Value;

/// What a request wants back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Prometheus,
    Human,
    Json,
}

/// A request answered by the control thread.
pub enum Request {
    /// The counters, rendered.
    Stats {
        format: Format,
        reply: Sender<String>,
    },
    /// Read the configuration file again and apply it; the answer is one
    /// line, starting with `error:` when nothing changed.
    Reload { reply: Sender<String> },
}

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

/// Serves `GET /metrics` on `addr` until the process ends.
pub fn serve_http(addr: &str, requests: Sender<Request>) -> anyhow::Result<()> {
    let server = tiny_http::Server::http(addr).map_err(|e| {
        anyhow::anyhow!(
            "--metrics {addr}: cannot listen ({e}); give a free ADDR:PORT such as 127.0.0.1:9464"
        )
    })?;
    std::thread::Builder::new()
        .name("gw-metrics".into())
        .spawn(move || {
            for req in server.incoming_requests() {
                let (status, body) = if req.url() == "/metrics" {
                    match ask(&requests, Format::Prometheus) {
                        Some(b) => (200, b),
                        None => (503, "gateway stopping\n".into()),
                    }
                } else {
                    (404, "try /metrics\n".into())
                };
                let header = tiny_http::Header::from_bytes(
                    &b"Content-Type"[..],
                    &b"text/plain; version=0.0.4"[..],
                )
                .expect("static header");
                let _ = req.respond(
                    tiny_http::Response::from_string(body)
                        .with_status_code(status)
                        .with_header(header),
                );
            }
        })?;
    Ok(())
}

fn ask(requests: &Sender<Request>, format: Format) -> Option<String> {
    let (tx, rx) = channel();
    requests.send(Request::Stats { format, reply: tx }).ok()?;
    rx.recv_timeout(std::time::Duration::from_secs(5)).ok()
}

/// The control socket's name: abstract, so each network namespace has its
/// own and nothing is left in the file system.
pub fn control_name(iface: &str) -> String {
    format!("gateway-{iface}")
}

/// Answers `gateway stats` on the abstract unix socket for `iface`. A
/// client writes one word (`human`, `json` or `prometheus`) and reads the
/// answer until the socket closes.
pub fn serve_control(iface: &str, requests: Sender<Request>) -> anyhow::Result<()> {
    let addr = SocketAddr::from_abstract_name(control_name(iface).as_bytes())?;
    let listener = UnixListener::bind_addr(&addr).map_err(|e| {
        anyhow::anyhow!("control socket @{}: {e}; is another gateway running on {iface} in this network namespace?", control_name(iface))
    })?;
    std::thread::Builder::new()
        .name("gw-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let mut word = [0u8; 16];
                let n = conn.read(&mut word).unwrap_or(0);
                let format = match std::str::from_utf8(&word[..n]).unwrap_or("").trim() {
                    "reload" => None,
                    "json" => Some(Format::Json),
                    "prometheus" => Some(Format::Prometheus),
                    _ => Some(Format::Human),
                };
                let body = match format {
                    Some(f) => ask(&requests, f),
                    None if !may_reload(&conn) => Some(
                        "error: reload refused: only root or the gateway's own user may ask for one\n"
                            .into(),
                    ),
                    None => {
                        let (tx, rx) = channel();
                        requests.send(Request::Reload { reply: tx }).ok();
                        rx.recv_timeout(std::time::Duration::from_secs(30)).ok()
                    }
                };
                if let Some(body) = body {
                    let _ = conn.write_all(body.as_bytes());
                }
            }
        })?;
    Ok(())
}

/// Whether the peer of `conn` may make the gateway reload: root, or the
/// user the gateway runs as. (Anyone in the network namespace can reach
/// the abstract socket; reading counters is harmless, a reload is not.)
fn may_reload(conn: &UnixStream) -> bool {
    use std::os::fd::AsFd;
    crate::sys::peer_is_root_or_self(conn.as_fd())
}

/// `gateway stats` and `gateway reload`: asks the gateway running on
/// `iface` in this network namespace (`format` is `human`, `json`,
/// `prometheus` or `reload`).
pub fn query(iface: &str, format: &str) -> anyhow::Result<String> {
    let addr = SocketAddr::from_abstract_name(control_name(iface).as_bytes())?;
    let mut s = UnixStream::connect_addr(&addr).map_err(|e| {
        anyhow::anyhow!("no gateway answers for {iface} in this network namespace ({e}); is it running (gateway --iface {iface})?")
    })?;
    s.write_all(format.as_bytes())?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn prometheus_text_has_every_family_with_labels() {
        let snap = json!({
            "tunnels": [{"name": "tun100", "rx_packets": 5, "rx_bytes": 490, "tx_packets": 4, "tx_bytes": 500, "next_hop": "02:00:00:00:00:01"}],
            "drops": {"key_mismatch": 3},
            "xdp": {"seen": 10, "redirected": 8},
            "workers": [{"queue": 0, "rx_frames": 8, "delivered": 5, "batches": 2, "tx_read": 4, "tx_sent": 4, "tx_replies": 0,
                "polls": {"busy_ns": 100, "idle_ns": 900},
                "xsk": {"rx_dropped": 0, "rx_ring_full": 0, "fill_ring_empty": 0, "rx_invalid_descs": 0},
                "frames": {"total": 4096, "free": 1, "in_kernel": 2048, "in_flight": 64, "in_tx": 0}}],
        });
        let text = prometheus(&snap);
        assert!(text.contains("gateway_tunnel_packets_total{tunnel=\"tun100\",direction=\"rx\"} 5"));
        assert!(text.contains("gateway_tunnel_next_hop_resolved{tunnel=\"tun100\"} 1"));
        assert!(text.contains("gateway_drops_total{reason=\"key_mismatch\"} 3"));
        assert!(text.contains("gateway_xdp_packets_total{counter=\"redirected\"} 8"));
        assert!(text.contains("gateway_worker_frames{queue=\"0\",place=\"in_kernel\"} 2048"));
        assert!(text.contains("# TYPE gateway_worker_busy_nanoseconds_total counter"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<u64>().is_ok(), "{line}");
            assert!(name.starts_with("gateway_"), "{line}");
        }
    }
}
