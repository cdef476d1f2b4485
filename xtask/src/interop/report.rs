//! What the cases came to: pings, ARP, TCP, the gateway's counters and the
//! outer headers of each case, shown as a table and written as JSON.

use std::fmt::Write as _;

use super::wire::{Difference, Side};
use super::PINGS;

/// Echo replies seen out of requests sent, from ping's summary line.
#[derive(Clone, Copy, Debug, Default)]
pub struct Pings {
    pub sent: u32,
    pub received: u32,
}

impl Pings {
    pub(crate) fn parse(out: &str) -> Option<Pings> {
        let line = out.lines().find(|l| l.contains("packets transmitted"))?;
        let mut words = line.split_whitespace();
        let sent = words.next()?.parse().ok()?;
        let received = line
            .split(", ")
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        Some(Pings { sent, received })
    }

    pub fn all(&self) -> bool {
        self.sent > 0 && self.received == self.sent
    }

    fn show(p: Option<Pings>) -> String {
        p.map(|p| format!("{}/{}", p.received, p.sent))
            .unwrap_or_else(|| "-".into())
    }
}

/// What one case came to.
#[derive(Clone, Debug, Default)]
pub struct CaseResult {
    pub name: String,
    pub kernel_commands: Vec<String>,
    pub gateway_to_kernel: Option<Pings>,
    pub kernel_to_gateway: Option<Pings>,
    /// Bridged cases: whether each side's neighbour table shows the other
    /// bridge's MAC.
    pub arp: Option<bool>,
    /// The kernel's own view of its device (`ip -d link show`).
    pub kernel_device: String,
    /// The gateway's counters after the pings (its JSON).
    pub gateway_stats: Option<String>,
    /// The tunnel's packets received and sent, by the gateway's count.
    pub tunnel_packets: Option<(u64, u64)>,
    /// TCP from the gateway's side to the kernel's, then back.
    pub tcp: Vec<Transfer>,
    /// The outer headers each side sent (from the capture), and where
    /// they differ.
    pub wire: Option<(Side, Side)>,
    pub differences: Vec<Difference>,
    /// The fields of `differences` that differ by construction.
    pub by_construction: Vec<String>,
    pub error: Option<String>,
}

impl CaseResult {
    /// The differences in the outer headers not made by the case itself.
    pub fn unexpected_differences(&self) -> Vec<&Difference> {
        self.differences
            .iter()
            .filter(|d| !self.by_construction.contains(&d.field))
            .collect()
    }

    /// Both TCP transfers arrived whole (same byte count and SHA-256).
    pub fn tcp_pass(&self) -> bool {
        self.error.is_none() && self.tcp.len() == 2 && self.tcp.iter().all(Transfer::intact)
    }

    /// The case passed: pings both ways, TCP intact both ways when it
    /// ran (`GATEWAY_VM_TCP_BYTES=0` runs none), and each side's tunnel
    /// packets captured (at least the counted pings), so that the outer
    /// headers were compared on something.
    pub fn passes(&self) -> bool {
        self.pings_pass() && (self.tcp.is_empty() || self.tcp_pass()) && self.wire_seen()
    }

    /// Both sides' tunnel packets were captured: the counted echo requests
    /// and replies at least.
    pub fn wire_seen(&self) -> bool {
        self.wire.as_ref().is_some_and(|(g, k)| {
            g.packets >= 2 * PINGS as usize && k.packets >= 2 * PINGS as usize
        })
    }

    pub fn pings_pass(&self) -> bool {
        self.error.is_none()
            && self.gateway_to_kernel.is_some_and(|p| p.all())
            && self.kernel_to_gateway.is_some_and(|p| p.all())
            && self.arp != Some(false)
            // Both directions' echo requests and replies went through
            // the gateway's tunnel, not around it.
            && self
                .tunnel_packets
                .is_some_and(|(rx, tx)| rx >= 2 * PINGS as u64 && tx >= 2 * PINGS as u64)
    }
}

/// One TCP transfer: what was sent and what arrived.
#[derive(Clone, Debug, Default)]
pub struct Transfer {
    pub direction: String,
    pub sent: String,
    pub received: String,
}

impl Transfer {
    pub fn intact(&self) -> bool {
        !self.sent.is_empty() && self.sent == self.received
    }
}

/// The whole run.
pub struct Report {
    pub kernel: String,
    pub accel: String,
    pub results: Vec<CaseResult>,
}

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\t' => o.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn json_pings(p: Option<Pings>) -> String {
    match p {
        Some(p) => format!("{{\"sent\": {}, \"received\": {}}}", p.sent, p.received),
        None => "null".into(),
    }
}

impl Report {
    pub fn to_json(&self) -> String {
        let mut o = format!(
            "{{\n  \"kernel\": {},\n  \"accel\": {},\n  \"modes\": [\n",
            json_str(&self.kernel),
            json_str(&self.accel)
        );
        let side = |s: &Side| -> String {
            let f: Vec<String> = s
                .fields
                .iter()
                .map(|(k, v)| format!("{}: {}", json_str(k), json_str(v)))
                .collect();
            format!("{{\"packets\": {}, {}}}", s.packets, f.join(", "))
        };
        for (i, r) in self.results.iter().enumerate() {
            let cmds: Vec<String> = r.kernel_commands.iter().map(|c| json_str(c)).collect();
            let tcp: Vec<String> = r
                .tcp
                .iter()
                .map(|t| {
                    format!(
                        "{{\"direction\": {}, \"sent\": {}, \"received\": {}, \"intact\": {}}}",
                        json_str(&t.direction),
                        json_str(&t.sent),
                        json_str(&t.received),
                        t.intact()
                    )
                })
                .collect();
            let diffs: Vec<String> = r
                .differences
                .iter()
                .map(|d| {
                    format!(
                        "{{\"field\": {}, \"gateway\": {}, \"kernel\": {}}}",
                        json_str(&d.field),
                        json_str(&d.gateway),
                        json_str(&d.kernel)
                    )
                })
                .collect();
            let wire = r
                .wire
                .as_ref()
                .map(|(g, k)| format!("{{\"gateway\": {}, \"kernel\": {}}}", side(g), side(k)))
                .unwrap_or_else(|| "null".into());
            let _ = write!(
                o,
                "    {{\"mode\": {}, \"passes\": {}, \"pings_pass\": {}, \"tcp_pass\": {}, \"gateway_to_kernel\": {}, \"kernel_to_gateway\": {}, \"arp\": {}, \"tunnel_packets\": {}, \"error\": {},\n     \"kernel_commands\": [{}],\n     \"tcp\": [{}],\n     \"wire\": {},\n     \"differences\": [{}],\n     \"differences_by_construction\": [{}],\n     \"unexpected_differences\": [{}],\n     \"kernel_device\": {},\n     \"gateway_stats\": {}}}{}\n",
                json_str(&r.name),
                r.passes(),
                r.pings_pass(),
                r.tcp_pass(),
                json_pings(r.gateway_to_kernel),
                json_pings(r.kernel_to_gateway),
                r.arp.map(|a| a.to_string()).unwrap_or_else(|| "null".into()),
                r.tunnel_packets
                    .map(|(rx, tx)| format!("{{\"rx\": {rx}, \"tx\": {tx}}}"))
                    .unwrap_or_else(|| "null".into()),
                r.error.as_deref().map(json_str).unwrap_or_else(|| "null".into()),
                cmds.join(", "),
                tcp.join(", "),
                wire,
                diffs.join(", "),
                r.by_construction
                    .iter()
                    .map(|f| json_str(f))
                    .collect::<Vec<_>>()
                    .join(", "),
                r.unexpected_differences()
                    .iter()
                    .map(|d| json_str(&d.field))
                    .collect::<Vec<_>>()
                    .join(", "),
                json_str(&r.kernel_device),
                // The gateway's own JSON line, as it printed it.
                r.gateway_stats.as_deref().unwrap_or("null"),
                if i + 1 < self.results.len() { "," } else { "" }
            );
        }
        o.push_str("  ]\n}\n");
        o
    }

    pub fn table(&self) -> String {
        let mut o = format!(
            "kernel {} under {}\n{:<24} {:>10} {:>10} {:>4} {:>11} {:>5} {:>5}  pings\n",
            self.kernel,
            self.accel,
            "mode",
            "gw->kernel",
            "kernel->gw",
            "ARP",
            "gw rx/tx",
            "TCP",
            "diffs"
        );
        for r in &self.results {
            let _ = writeln!(
                o,
                "{:<24} {:>10} {:>10} {:>4} {:>11} {:>5} {:>5}  {}",
                r.name,
                Pings::show(r.gateway_to_kernel),
                Pings::show(r.kernel_to_gateway),
                match r.arp {
                    Some(true) => "yes",
                    Some(false) => "NO",
                    None => "",
                },
                r.tunnel_packets
                    .map(|(rx, tx)| format!("{rx}/{tx}"))
                    .unwrap_or_else(|| "-".into()),
                if r.tcp.is_empty() {
                    "-"
                } else if r.tcp_pass() {
                    "ok"
                } else {
                    "BAD"
                },
                if r.wire.is_some() {
                    r.unexpected_differences().len().to_string()
                } else {
                    "-".into()
                },
                if r.pings_pass() { "pass" } else { "FAIL" }
            );
        }
        let with_diffs: Vec<&CaseResult> = self
            .results
            .iter()
            .filter(|r| !r.differences.is_empty())
            .collect();
        if !with_diffs.is_empty() {
            o.push_str("\nouter headers, where the gateway's differ from the kernel's (tshark; \"diffs\" above counts those not made by the case):\n");
        }
        for r in with_diffs {
            for d in &r.differences {
                let _ = writeln!(
                    o,
                    "  {:<22} {:<22} gateway {:<28} kernel {}{}",
                    r.name,
                    d.field,
                    d.gateway,
                    d.kernel,
                    if r.by_construction.contains(&d.field) {
                        "  (by construction)"
                    } else {
                        ""
                    }
                );
            }
        }
        for r in &self.results {
            for t in r.tcp.iter().filter(|t| !t.intact()) {
                let _ = writeln!(
                    o,
                    "\n{}: TCP {}: sent {}, received {}",
                    r.name, t.direction, t.sent, t.received
                );
            }
        }
        for r in self.results.iter().filter(|r| r.error.is_some()) {
            let _ = writeln!(
                o,
                "\n{}: {}",
                r.name,
                r.error.as_deref().unwrap_or_default()
            );
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_summaries_are_read() {
        let p = Pings::parse(
            "--- 10.1.1.2 ping statistics ---\n5 packets transmitted, 4 received, 20% packet loss, time 804ms\n",
        )
        .unwrap();
        assert_eq!((p.sent, p.received), (5, 4));
        let p = Pings::parse("1 packets transmitted, 0 received, +1 errors, 100% packet loss\n")
            .unwrap();
        assert!(!p.all());
    }
}
