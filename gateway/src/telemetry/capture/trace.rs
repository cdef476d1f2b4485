//! One packet's path for `gateway trace`: the stages it went through and
//! the decision at each. A worker builds a [`TraceBuf`] only for a packet
//! a trace session picked; every other packet goes through [`decap`]
//! with the notes that cost nothing.
//!
//! [`decap`]: crate::datapath::decap::decap

use std::net::IpAddr;
use std::sync::Arc;

use serde_json::{json, Value};

use crate::datapath::decap::{Note, Notes};
use crate::datapath::drop_reason::DropReason;

/// A stage and what was decided there.
#[derive(Debug, Clone)]
pub struct Step {
    pub stage: &'static str,
    /// For a person.
    pub text: String,
    /// For a program: a JSON object of the figures behind the text.
    pub fields: Value,
}

/// A finished trace, as the session's queue holds it.
#[derive(Debug)]
pub struct Trace {
    pub queue: u16,
    /// Since the Unix epoch, when the packet was picked.
    pub time: std::time::Duration,
    /// `in` (from the wire) or `out` (from a device).
    pub direction: &'static str,
    pub steps: Vec<Step>,
}

impl Trace {
    pub fn to_json(&self) -> Value {
        let stages: Vec<Value> = self
            .steps
            .iter()
            .map(|s| {
                let mut o = json!({ "stage": s.stage, "decision": s.text });
                if let (Some(o), Value::Object(f)) = (o.as_object_mut(), &s.fields) {
                    for (k, v) in f {
                        o.insert(k.clone(), v.clone());
                    }
                }
                o
            })
            .collect();
        json!({
            "queue": self.queue,
            "time": self.time.as_secs_f64(),
            "direction": self.direction,
            "stages": stages,
        })
    }
}

/// A trace being built, in the worker that handles the packet.
#[derive(Debug)]
pub struct TraceBuf {
    pub(super) trace: Trace,
    /// The tunnel names of the list in force, to name what a lookup chose.
    names: Arc<Vec<Arc<str>>>,
    /// The tunnel the packet belongs to, once known.
    pub(super) tunnel: Option<String>,
    tunnel_id: Option<u16>,
}

impl TraceBuf {
    pub(super) fn new(queue: u16, direction: &'static str, names: Arc<Vec<Arc<str>>>) -> Self {
        TraceBuf {
            trace: Trace {
                queue,
                time: super::tap::now(),
                direction,
                steps: Vec::with_capacity(8),
            },
            names,
            tunnel: None,
            tunnel_id: None,
        }
    }

    /// Adds a stage.
    pub fn step(&mut self, stage: &'static str, text: impl Into<String>, fields: Value) {
        self.trace.steps.push(Step {
            stage,
            text: text.into(),
            fields,
        });
    }

    /// The name of tunnel `t` in the list the packet met; it is the
    /// packet's tunnel from now on.
    pub fn tunnel(&mut self, t: usize) -> String {
        let name = self
            .names
            .get(t)
            .map_or_else(|| format!("#{t}"), |n| n.to_string());
        self.tunnel = Some(name.clone());
        self.tunnel_id = u16::try_from(t).ok();
        name
    }

    /// The index of the packet's tunnel, once known.
    pub fn tunnel_id(&self) -> Option<u16> {
        self.tunnel_id
    }

    /// The packet was dropped for `reason`.
    pub fn dropped(&mut self, reason: DropReason) {
        self.step(
            "verdict",
            format!("dropped: {}", reason.name()),
            json!({ "verdict": "drop", "reason": reason.name() }),
        );
    }
}

fn proto_name(p: u8) -> String {
    match p {
        4 => "IPIP".into(),
        41 => "IPv6-in-IP".into(),
        47 => "GRE".into(),
        p => format!("protocol {p}"),
    }
}

fn ecn_name(e: u8) -> &'static str {
    match e & 3 {
        0 => "Not-ECT",
        1 => "ECT(1)",
        2 => "ECT(0)",
        _ => "CE",
    }
}

impl Notes for TraceBuf {
    fn note(&mut self, note: Note) {
        match note {
            Note::Outer {
                src,
                dst,
                proto,
                ecn,
            } => {
                let v = if matches!(src, IpAddr::V4(_)) {
                    "IPv4 (header checksum good)"
                } else {
                    "IPv6"
                };
                self.step(
                    "outer",
                    format!("{v} {src} > {dst}, {}, {}", proto_name(proto), ecn_name(ecn)),
                    json!({ "src": src.to_string(), "dst": dst.to_string(), "protocol": proto, "ecn": ecn }),
                )
            }
            Note::Gre {
                key,
                checksum,
                seq,
                protocol,
            } => {
                let k = key.map_or("no key".to_string(), |k| format!("key {k}"));
                let c = if checksum {
                    "checksum present and good"
                } else {
                    "no checksum"
                };
                let s = seq.map_or("no sequence number".to_string(), |s| {
                    format!("sequence {s}")
                });
                self.step(
                    "gre",
                    format!("version 0, {k}, {c}, {s}, protocol 0x{protocol:04x}"),
                    json!({ "key": key, "checksum": checksum, "sequence": seq, "protocol": protocol }),
                )
            }
            Note::Tunnel { id } => {
                let name = self.tunnel(usize::from(id));
                self.step(
                    "lookup",
                    format!("tunnel {name}: chosen by the outer addresses and protocol (and the GRE key, if any)"),
                    json!({ "tunnel": name }),
                )
            }
            Note::Sequence { seq, expected } => self.step(
                "sequence",
                if expected == 0 {
                    format!("{seq}: first number seen (any is taken), taken")
                } else {
                    format!("{seq}: not older than {expected}, the next expected; taken")
                },
                json!({ "sequence": seq, "expected": expected, "verdict": "taken" }),
            ),
            Note::InnerSource { src } => self.step(
                "source",
                format!("inner source {src}: the tunnel accepts it"),
                json!({ "inner_src": src.to_string() }),
            ),
            Note::Ecn { outer, inner } => self.step(
                "ecn",
                format!(
                    "outer {}, inner {}: inner {} (RFC 6040)",
                    ecn_name(outer),
                    ecn_name(inner),
                    if outer & 3 == 3 && inner & 3 != 0 {
                        "set to CE"
                    } else {
                        "kept"
                    }
                ),
                json!({ "outer_ecn": outer, "inner_ecn": inner }),
            ),
        }
    }
}
