//! The wire between the gateway and the kernel, captured by tshark on the
//! bridge both sides hang from, and dissected: the outer headers the
//! gateway sent compared field by field with those the kernel sent (TTL or
//! hop limit, DF, TOS/ECN or traffic class, flow label, IP ID behaviour, GRE
//! flags, key, checksum, sequence numbers, encapsulation limit).

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::vm::{self, Stop};

/// A tshark capture on `br0` of a namespace; stopped (SIGINT, then killed)
/// on drop.
pub struct Capture {
    child: Option<Child>,
    pub pcap: PathBuf,
    err: PathBuf,
}

impl Capture {
    /// Starts capturing and waits until tshark says it is.
    pub fn start(ns: &str, pcap: &Path, stop: &Stop) -> Result<Capture> {
        let err = pcap.with_extension("tshark.log");
        let _ = fs::remove_file(pcap);
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "tshark", "-n", "-q", "-i", "br0"])
            .args(["-f", "ip or ip6", "-w"])
            .arg(pcap)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&err)?)
            .spawn()
            .context("starting tshark")?;
        let started = vm::wait_for(
            "tshark to start capturing",
            Duration::from_secs(60),
            stop,
            || {
                let text = fs::read_to_string(&err).unwrap_or_default();
                if text.contains("Capturing on") {
                    return Ok(Some(()));
                }
                if let Ok(Some(s)) = child.try_wait() {
                    bail!("tshark exited ({s}): {text}");
                }
                Ok(None)
            },
        );
        let cap = Capture {
            child: Some(child),
            pcap: pcap.to_path_buf(),
            err,
        };
        started?;
        Ok(cap)
    }

    /// Stops the capture (SIGINT: tshark writes what it holds) and waits
    /// for tshark to exit.
    pub fn finish(mut self) -> Result<PathBuf> {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status();
        let exited = vm::wait_for(
            "tshark to finish",
            Duration::from_secs(60),
            &Stop::default(),
            || Ok(child.try_wait()?.map(|_| ())),
        );
        if exited.is_err() {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "tshark did not stop: {}",
                fs::read_to_string(&self.err).unwrap_or_default()
            );
        }
        Ok(self.pcap.clone())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGINT first: tshark then stops its dumpcap, which a SIGKILL
            // would leave running until the namespace goes.
            let _ = std::process::Command::new("kill")
                .args(["-INT", &c.id().to_string()])
                .status();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The outer fields compared, as tshark names them, per underlay family.
const V4_FIELDS: &[&str] = &[
    "ip.ttl",
    "ip.flags.df",
    "ip.dsfield",
    "ip.proto",
    "gre.flags_and_version",
    "gre.proto",
    "gre.key",
    "gre.checksum.status",
];
const V6_FIELDS: &[&str] = &[
    "ipv6.hlim",
    "ipv6.tclass",
    "ipv6.flow",
    "ipv6.nxt",
    "ipv6.opt.tel",
    "gre.flags_and_version",
    "gre.proto",
    "gre.key",
    "gre.checksum.status",
];

/// What one side put on the wire: the distinct values of each field over
/// its tunnel packets, and how its IP IDs and GRE sequence numbers went.
#[derive(Clone, Debug, Default)]
pub struct Side {
    pub packets: usize,
    pub fields: Vec<(String, String)>,
}

impl Side {
    pub fn get(&self, field: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(f, _)| f == field)
            .map(|(_, v)| v.as_str())
    }
}

/// A field whose values differ between the two sides.
#[derive(Clone, Debug)]
pub struct Difference {
    pub field: String,
    pub gateway: String,
    pub kernel: String,
}

/// How a sequence of numbers went, as `kind: detail`; the kind is what
/// is compared: `zero`, `constant` (one value), `increasing` (every step
/// forward, modulo `modulo`, and no larger than other packets between two
/// of these, 4096, and the kernel's idle perturbation allow:
/// `ip_idents_reserve` adds up to one per jiffy (HZ 250 in Debian's
/// kernel) since the counter was last used, so the bound grows with the
/// time `times` says passed; TCG's pauses must not turn a counter into
/// "varies") or `varies`. The start is not compared.
fn behaviour(values: &[u64], times: &[f64], modulo: u64) -> String {
    if values.is_empty() {
        return "-".into();
    }
    if values.iter().all(|v| *v == 0) {
        return format!("zero: {} packets", values.len());
    }
    if values.len() == 1 {
        return format!("one packet: {}", values[0]);
    }
    if values.iter().all(|v| *v == values[0]) {
        return format!("constant: {}", values[0]);
    }
    let steps: Vec<u64> = values
        .windows(2)
        .map(|w| (w[1] + modulo - w[0]) % modulo)
        .collect();
    let ones = steps.iter().filter(|d| **d == 1).count();
    let within = steps.iter().enumerate().all(|(i, d)| {
        let dt = match (times.get(i), times.get(i + 1)) {
            (Some(a), Some(b)) if b >= a => b - a,
            _ => 0.0,
        };
        // (Capped: past half the ID space a step is no longer a sign of
        // one counter.)
        *d >= 1 && *d < 4096 + ((250.0 * dt).ceil() as u64).min(28_672)
    });
    let kind = if within { "increasing" } else { "varies" };
    format!(
        "{kind}: from {}, +1 on {ones} of {} steps",
        values[0],
        steps.len()
    )
}

fn parse_num(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// What the two sides both send, so that like is compared with like: the
/// echo requests and replies and the TCP transfers (not the kernel's IPv6
/// link-local chatter, which the gateway keeps out of its tunnels).
const INNER: &str = "(icmp.type == 0 || icmp.type == 8 || icmpv6.type == 128 || icmpv6.type == 129 || tcp.port == 5001 || tcp.port == 5002)";

/// The tunnel packets from `src` to `dst` in `pcap` that carry [`INNER`]
/// traffic, summarised.
pub fn side(pcap: &Path, src: &str, dst: &str) -> Result<Side> {
    let v6 = src.contains(':');
    let (filter, fields, extra) = if v6 {
        (
            format!(
                "ipv6.src == {src} && ipv6.dst == {dst} && (gre || ipv6.nxt == 4 || ipv6.nxt == 41 || ipv6.dstopts.nxt == 4 || ipv6.dstopts.nxt == 41) && {INNER}"
            ),
            V6_FIELDS,
            vec![],
        )
    } else {
        (
            format!("ip.src == {src} && ip.dst == {dst} && (ip.proto == 4 || ip.proto == 41 || ip.proto == 47) && {INNER}"),
            V4_FIELDS,
            vec!["ip.id"],
        )
    };
    let mut all: Vec<&str> = fields.to_vec();
    all.extend(&extra);
    all.push("gre.sequence_number");
    all.push("frame.time_relative");
    let mut cmd = Command::new("tshark");
    cmd.arg("-r").arg(pcap).args(["-n", "-Y", &filter]).args([
        "-T",
        "fields",
        "-E",
        "separator=|",
        "-E",
        "occurrence=f",
    ]);
    for f in &all {
        cmd.args(["-e", f]);
    }
    let out = vm::run(&mut cmd)?;
    let rows: Vec<Vec<&str>> = out
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| l.split('|').collect())
        .collect();
    let col = |name: &str| -> Vec<&str> {
        let i = all.iter().position(|f| *f == name).expect("a listed field");
        rows.iter()
            .map(|r| r.get(i).copied().unwrap_or(""))
            .collect()
    };
    let mut s = Side {
        packets: rows.len(),
        fields: Vec::new(),
    };
    for f in fields {
        let values: BTreeSet<&str> = col(f)
            .into_iter()
            .map(|v| if v.is_empty() { "absent" } else { v })
            .collect();
        let shown = if *f == "ipv6.flow" && values.iter().any(|v| parse_num(v) != Some(0)) {
            // A hash of the inner flow: how many, not which.
            format!("set: {} distinct values", values.len())
        } else {
            values.into_iter().collect::<Vec<_>>().join(",")
        };
        s.fields.push((f.to_string(), shown));
    }
    for (f, modulo) in [("ip.id", 1u64 << 16), ("gre.sequence_number", 1 << 32)] {
        if !all.contains(&f) {
            continue;
        }
        let (values, times): (Vec<u64>, Vec<f64>) = col(f)
            .into_iter()
            .zip(col("frame.time_relative"))
            .filter_map(|(v, t)| Some((parse_num(v)?, t.parse().unwrap_or(0.0))))
            .unzip();
        s.fields
            .push((f.to_string(), behaviour(&values, &times, modulo)));
    }
    Ok(s)
}

/// The fields whose values differ. The IP ID and sequence numbers are
/// compared by behaviour (constant, +1 per packet, other), not by start.
pub fn compare(gateway: &Side, kernel: &Side) -> Vec<Difference> {
    let shape = |v: &str| -> String { v.split(':').next().unwrap_or(v).to_string() };
    gateway
        .fields
        .iter()
        .filter_map(|(f, g)| {
            let k = kernel.get(f).unwrap_or("-");
            let (a, b) = if f == "ip.id" || f == "gre.sequence_number" || f == "ipv6.flow" {
                (shape(g), shape(k))
            } else {
                (g.clone(), k.to_string())
            };
            (a != b).then(|| Difference {
                field: f.clone(),
                gateway: g.clone(),
                kernel: k.to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_are_described_by_how_they_go() {
        let t = [0.0, 0.1, 0.2];
        assert_eq!(behaviour(&[0, 0, 0], &t, 1 << 16), "zero: 3 packets");
        assert_eq!(behaviour(&[7, 7], &t, 1 << 16), "constant: 7");
        assert_eq!(
            behaviour(&[65535, 0, 1], &t, 1 << 16),
            "increasing: from 65535, +1 on 2 of 2 steps"
        );
        assert_eq!(
            behaviour(&[5, 9, 10], &t, 1 << 16),
            "increasing: from 5, +1 on 1 of 2 steps"
        );
        assert_eq!(
            behaviour(&[5, 30000, 10], &t, 1 << 16),
            "varies: from 5, +1 on 0 of 2 steps"
        );
        assert_eq!(behaviour(&[], &[], 1 << 16), "-");
        // The kernel's idle perturbation: 20 s without a packet allows a
        // step of up to 4096 + 5000.
        assert_eq!(
            behaviour(&[5, 8000, 8001], &[0.0, 20.0, 20.1], 1 << 16),
            "increasing: from 5, +1 on 1 of 2 steps"
        );
    }

    #[test]
    fn only_differences_are_listed_and_starts_do_not_count() {
        let g = Side {
            packets: 3,
            fields: vec![
                ("ip.ttl".into(), "64".into()),
                (
                    "ip.id".into(),
                    "increasing: from 7, +1 on 3 of 3 steps".into(),
                ),
                ("ip.flags.df".into(), "1".into()),
            ],
        };
        let k = Side {
            packets: 3,
            fields: vec![
                ("ip.ttl".into(), "64".into()),
                (
                    "ip.id".into(),
                    "increasing: from 30000, +1 on 1 of 3 steps".into(),
                ),
                ("ip.flags.df".into(), "0".into()),
            ],
        };
        let d = compare(&g, &k);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].field, "ip.flags.df");
    }
}
