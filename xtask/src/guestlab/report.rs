//! What `vm guest` came to: JSON for the test, a short table for people.

pub(crate) use crate::interop::Pings;
use serde_json::{json, Value};

fn pings_json(p: &Option<Pings>) -> Value {
    match p {
        Some(p) => json!({"sent": p.sent, "received": p.received}),
        None => Value::Null,
    }
}

fn pings_show(p: &Option<Pings>) -> String {
    p.map(|p| format!("{}/{}", p.received, p.sent))
        .unwrap_or_else(|| "-".into())
}

/// The byte count of a transfer's "COUNT SHA256" line.
fn count(line: &Option<String>) -> Option<u64> {
    line.as_deref()?.split_whitespace().next()?.parse().ok()
}

/// The SHA-256 of a transfer's "COUNT SHA256" line.
fn digest(line: &Option<String>) -> Option<String> {
    Some(line.as_deref()?.split_whitespace().nth(1)?.to_string())
}

/// One tunnel's results.
#[derive(Clone, Debug, Default)]
pub struct TunnelResult {
    pub name: String,
    pub mode: String,
    /// `host underlay -> guest underlay` (and the key).
    pub outer: String,
    pub host_to_guest: Option<Pings>,
    pub guest_to_host: Option<Pings>,
    /// "host -> guest" or "guest -> host".
    pub tcp_direction: String,
    pub tcp_bytes: u64,
    /// "COUNT SHA256" of what the sender sent and of what the receiver read.
    pub tcp_sent: Option<String>,
    pub tcp_received: Option<String>,
}

impl TunnelResult {
    pub fn tcp_pass(&self) -> bool {
        digest(&self.tcp_sent).is_some()
            && self.tcp_sent == self.tcp_received
            && count(&self.tcp_sent) == Some(self.tcp_bytes)
    }

    pub fn passes(&self) -> bool {
        self.host_to_guest.is_some_and(|p| p.all())
            && self.guest_to_host.is_some_and(|p| p.all())
            && self.tcp_pass()
    }
}

/// One worker of the guest's gateway, from `gateway stats --format json`.
#[derive(Clone, Debug, Default)]
pub struct WorkerCount {
    pub queue: u64,
    pub core: Value,
    pub rx_frames: u64,
    pub delivered: u64,
}

/// A stop of the guest's gateway by a signal and what it left.
#[derive(Clone, Debug, Default)]
pub struct SignalCheck {
    pub signal: String,
    /// The gateway's exit status as its shell saw it (143/137: killed by
    /// SIGTERM/SIGKILL without handling it).
    pub exit_status: Option<i32>,
    /// The XDP program's id on eth0 while it ran, from `ip -d link`.
    pub xdp_prog_id_before: Option<u64>,
    /// Whether `ip -j -d link show eth0` shows no XDP program afterwards.
    pub no_xdp_after: bool,
    /// The same from `bpftool net show dev eth0` (None: no bpftool).
    pub bpftool_no_xdp_after: Option<bool>,
    /// Whether the program (by its id) is gone from the kernel.
    pub prog_gone: Option<bool>,
    pub ip_link_after: String,
    /// The gateway's tunnel devices (it created them) still there
    /// afterwards: none, as they go with it.
    pub devices_left: Vec<String>,
}

impl SignalCheck {
    pub fn passes(&self) -> bool {
        let status_ok = match self.signal.as_str() {
            "SIGTERM" => self.exit_status == Some(0),
            _ => self.exit_status.is_some(),
        };
        status_ok
            && self.no_xdp_after
            && self.bpftool_no_xdp_after != Some(false)
            && self.devices_left.is_empty()
    }

    fn json(&self) -> Value {
        json!({
            "signal": self.signal,
            "exit_status": self.exit_status,
            "xdp_prog_id_before": self.xdp_prog_id_before,
            "no_xdp_after": self.no_xdp_after,
            "bpftool_no_xdp_after": self.bpftool_no_xdp_after,
            "prog_gone": self.prog_gone,
            "ip_link_after": self.ip_link_after,
            "devices_left": self.devices_left,
            "pass": self.passes(),
        })
    }
}

/// The whole run.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub kernel: String,
    pub accel: String,
    pub vcpus: u32,
    pub queues: u32,
    pub gateway_bin: String,
    /// `ethtool -i eth0`'s driver and version lines.
    pub driver: String,
    pub driver_version: String,
    /// `ethtool -l eth0`'s current combined channels.
    pub combined_channels: Option<u32>,
    /// From `ip -d link show eth0` while the gateway ran: "driver" (native),
    /// "generic", ...
    pub xdp_mode: String,
    /// `gateway.xdp_attached` in the gateway's stats.
    pub xdp_attached: Option<bool>,
    /// The first guest gateway's log, from its start to its SIGTERM (what
    /// it said about the attach and the kernel's features).
    pub gateway_log: Vec<String>,
    pub tunnels: Vec<TunnelResult>,
    pub workers: Vec<WorkerCount>,
    /// Short TCP connection attempts added for the NIC's hash to reach both
    /// queues (0 when the tunnels' own traffic did).
    pub extra_flows: u32,
    pub signals: Vec<SignalCheck>,
    /// A third start after SIGKILL: pings through the first tunnel.
    pub restart_pings: Option<(Option<Pings>, Option<Pings>)>,
    pub seconds: f64,
    pub error: Option<String>,
}

impl Report {
    pub fn both_workers_received(&self) -> bool {
        self.workers.len() >= 2 && self.workers.iter().all(|w| w.rx_frames > 0)
    }

    pub fn passes(&self) -> bool {
        self.error.is_none()
            && self.xdp_mode == "driver"
            && self.xdp_attached == Some(true)
            && !self.tunnels.is_empty()
            && self.tunnels.iter().all(|t| t.passes())
            && self.both_workers_received()
            && self.signals.len() == 2
            && self.signals.iter().all(|s| s.passes())
            && self
                .restart_pings
                .is_some_and(|(a, b)| a.is_some_and(|p| p.all()) && b.is_some_and(|p| p.all()))
    }

    pub fn to_json(&self) -> String {
        let v = json!({
            "kernel": self.kernel,
            "accel": self.accel,
            "vcpus": self.vcpus,
            "nic_queue_pairs": self.queues,
            "gateway_bin": self.gateway_bin,
            "driver": self.driver,
            "driver_version": self.driver_version,
            "combined_channels": self.combined_channels,
            "xdp_mode": self.xdp_mode,
            "xdp_attached": self.xdp_attached,
            "gateway_log": self.gateway_log,
            "tunnels": self.tunnels.iter().map(|t| json!({
                "name": t.name,
                "mode": t.mode,
                "outer": t.outer,
                "host_to_guest": pings_json(&t.host_to_guest),
                "guest_to_host": pings_json(&t.guest_to_host),
                "tcp": {
                    "direction": t.tcp_direction,
                    "bytes": t.tcp_bytes,
                    "sent_bytes": count(&t.tcp_sent),
                    "sent_sha256": digest(&t.tcp_sent),
                    "received_bytes": count(&t.tcp_received),
                    "received_sha256": digest(&t.tcp_received),
                },
                "pass": t.passes(),
            })).collect::<Vec<_>>(),
            "workers": self.workers.iter().map(|w| json!({
                "queue": w.queue,
                "core": w.core,
                "rx_frames": w.rx_frames,
                "delivered": w.delivered,
            })).collect::<Vec<_>>(),
            "both_workers_received": self.both_workers_received(),
            "extra_flows": self.extra_flows,
            "signals": self.signals.iter().map(SignalCheck::json).collect::<Vec<_>>(),
            "restart_pings": self.restart_pings.map(|(a, b)| json!({
                "host_to_guest": pings_json(&a),
                "guest_to_host": pings_json(&b),
            })),
            "seconds": (self.seconds * 10.0).round() / 10.0,
            "error": self.error,
            "pass": self.passes(),
        });
        serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"
    }

    pub fn table(&self) -> String {
        let mut s = format!(
            "the gateway in the guest: Linux {} ({}), {} on eth0, {} vCPU, {} queue pair(s) \
             (combined {}), XDP mode {}\n",
            self.kernel,
            self.accel,
            if self.driver.is_empty() {
                "?"
            } else {
                &self.driver
            },
            self.vcpus,
            self.queues,
            self.combined_channels
                .map(|c| c.to_string())
                .unwrap_or_else(|| "?".into()),
            if self.xdp_mode.is_empty() {
                "?"
            } else {
                &self.xdp_mode
            },
        );
        s += &format!(
            "{:<5} {:<6} {:<34} {:>9} {:>9}  {:<14} {}\n",
            "tunnel", "mode", "outer (host -> guest)", "h->g ping", "g->h ping", "tcp", "sha256"
        );
        for t in &self.tunnels {
            let tcp = match (&t.tcp_sent, &t.tcp_received) {
                (Some(a), Some(_)) if t.tcp_pass() => {
                    let d = digest(&Some(a.clone())).unwrap_or_default();
                    format!("equal {}…", &d[..d.len().min(12)])
                }
                (Some(_), Some(_)) => "DIFFERENT".into(),
                _ => "-".into(),
            };
            s += &format!(
                "{:<5} {:<6} {:<34} {:>9} {:>9}  {:<14} {}\n",
                t.name,
                t.mode,
                t.outer,
                pings_show(&t.host_to_guest),
                pings_show(&t.guest_to_host),
                format!("{} {} KiB", t.tcp_direction, t.tcp_bytes / 1024),
                tcp
            );
        }
        for w in &self.workers {
            s += &format!(
                "worker queue {} (core {}): rx_frames {}, delivered {}\n",
                w.queue, w.core, w.rx_frames, w.delivered
            );
        }
        if self.extra_flows > 0 {
            s += &format!(
                "({} short TCP connection attempts were added for both queues to receive)\n",
                self.extra_flows
            );
        }
        for c in &self.signals {
            s += &format!(
                "{}: exit status {}, XDP program on eth0 afterwards: {}{}, devices left: {}\n",
                c.signal,
                c.exit_status
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "?".into()),
                if c.no_xdp_after {
                    "none"
                } else {
                    "STILL THERE"
                },
                match c.bpftool_no_xdp_after {
                    Some(true) => " (bpftool: none)",
                    Some(false) => " (bpftool: STILL THERE)",
                    None => "",
                },
                if c.devices_left.is_empty() {
                    "none".to_string()
                } else {
                    c.devices_left.join(" ")
                }
            );
        }
        if let Some((a, b)) = &self.restart_pings {
            s += &format!(
                "third start: ping host->guest {}, guest->host {}\n",
                pings_show(a),
                pings_show(b)
            );
        }
        s += &format!(
            "{} in {:.0} s{}\n",
            if self.passes() { "PASS" } else { "FAIL" },
            self.seconds,
            self.error
                .as_ref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_summaries_are_read() {
        let p = Pings::parse("3 packets transmitted, 2 received, 33% packet loss, time 2003ms")
            .unwrap();
        assert_eq!((p.sent, p.received), (3, 2));
        assert!(!p.all());
        assert!(Pings::parse("nothing").is_none());
    }

    #[test]
    fn an_empty_report_fails_and_is_json() {
        let r = Report::default();
        assert!(!r.passes());
        let v: Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["pass"], false);
    }
}
