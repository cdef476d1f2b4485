//! What a capture costs the data path: decapsulation at maximum offered
//! load with no capture attached, with `gateway capture` taking every
//! packet at every point (into /dev/null), and with a capture whose filter
//! matches nothing (the filter still runs on every packet at every
//! point). Each case twice, interleaved, so drift shows as spread (the
//! range of each beside its mean). The capture's client and the thread
//! that serves it run on the same two cores as the generator and the
//! worker: their cost is part of what "all" measures on such a machine.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::gen::Template;
use crate::harness::{say, Bench, GatewayProc};
use crate::ns::NetNs;

/// A `gateway capture` client, attached.
struct Client {
    child: Child,
    stderr: Receiver<String>,
}

impl Client {
    fn start(bench: &Bench, ns: &NetNs, filter: &[&str]) -> Result<Client> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(&bench.args.gateway)
            .args(["capture", "--iface", "ens0", "-w", "/dev/null"])
            .args(filter)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting gateway capture")?;
        let err = child.stderr.take().context("capture stderr")?;
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(l) if l.starts_with("capturing on") => break,
                Ok(l) if l.starts_with("error") => bail!("gateway capture: {l}"),
                _ if Instant::now() > deadline => bail!("gateway capture did not attach in 20 s"),
                _ => {}
            }
        }
        Ok(Client { child, stderr: rx })
    }

    /// Ctrl-C; what it said at the end (copies taken, lost).
    fn stop(mut self) -> String {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        let mut said = Vec::new();
        while let Ok(l) = self.stderr.recv_timeout(Duration::from_secs(5)) {
            said.push(l);
        }
        said.join(" ")
    }
}

/// The cost section: see the module's comment. Returns its results.
pub(crate) fn section(
    bench: &Bench,
    gw: &GatewayProc,
    ns: &NetNs,
    udp: &Template,
) -> Result<Value> {
    say("capture cost: decapsulation at maximum load, with and without a capture attached");
    let cases: [(&str, Option<&[&str]>); 3] = [
        ("none", None),
        ("all", Some(&[])),
        ("filter_matching_none", Some(&["host 203.0.113.1"])),
    ];
    let mut trials: Vec<Value> = Vec::new();
    for round in 0..2 {
        for (name, filter) in cases {
            let client = match filter.map(|f| Client::start(bench, ns, f)).transpose() {
                Ok(c) => c,
                // A gateway from before `gateway capture` (measured with
                // --gateway) has no captures to cost.
                Err(e) => {
                    say(&format!("  no capture cost: {e:#}"));
                    return Ok(json!({ "error": format!("{e:#}") }));
                }
            };
            let t = bench.decap_trial(gw, udp, None)?;
            let said = client.map(Client::stop).unwrap_or_default();
            let ns_per = t.busy_ns as f64 / t.delivered.max(1) as f64;
            say(&format!(
                "  capture {name} (round {}): offered {:.0} pps, delivered {:.0} pps; worker {:.0} ns per packet{}",
                round + 1,
                t.offered_pps,
                t.delivered_pps,
                ns_per,
                if said.is_empty() { String::new() } else { format!("; capture: {said}") }
            ));
            // "N packets taken, M lost (...)": what the capture kept.
            let figure = |word: &str| -> Option<u64> {
                let words: Vec<&str> = said.split_whitespace().collect();
                words
                    .windows(2)
                    .find(|w| w[1].trim_end_matches(',') == word)
                    .and_then(|w| w[0].parse().ok())
            };
            trials.push(json!({
                "capture": name,
                "round": round + 1,
                "offered_pps": t.offered_pps,
                "delivered_pps": t.delivered_pps,
                "worker_ns_per_packet": ns_per,
                "copies_taken": figure("packets").or(filter.map(|_| 0)),
                "copies_lost": figure("lost").unwrap_or(0),
                "client_said": said,
            }));
            bench.check()?;
        }
    }
    let values = |name: &str, field: &str| -> Vec<f64> {
        trials
            .iter()
            .filter(|t| t["capture"] == name)
            .filter_map(|t| t[field].as_f64())
            .collect()
    };
    let mean = |name: &str, field: &str| -> f64 {
        let v = values(name, field);
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let range = |name: &str, field: &str| -> [f64; 2] {
        let v = values(name, field);
        [
            v.iter().copied().fold(f64::INFINITY, f64::min),
            v.iter().copied().fold(0.0, f64::max),
        ]
    };
    let base_pps = mean("none", "delivered_pps").max(1.0);
    let base_ns = mean("none", "worker_ns_per_packet").max(1e-9);
    let mut summary = serde_json::Map::new();
    for (name, _) in cases {
        summary.insert(
            name.into(),
            json!({
                "delivered_pps": mean(name, "delivered_pps"),
                "delivered_pps_range": range(name, "delivered_pps"),
                "worker_ns_per_packet": mean(name, "worker_ns_per_packet"),
                "worker_ns_per_packet_range": range(name, "worker_ns_per_packet"),
                "copies_taken": mean(name, "copies_taken"),
                "copies_lost": mean(name, "copies_lost"),
                "ratio_delivered_to_none": mean(name, "delivered_pps") / base_pps,
                "ratio_worker_cost_to_none": mean(name, "worker_ns_per_packet") / base_ns,
            }),
        );
    }
    Ok(json!({ "trials": trials, "mean": summary }))
}
