//! Interop with the real kernel: for each tunnel mode and option, the
//! kernel side is configured in the guest with iproute2's own commands, as a
//! user types them, and the gateway (the real binary) runs on the host side
//! of the wire with the matching configuration; then ping both ways. One
//! boot serves every case; each case starts its own gateway and removes its
//! kernel devices after.
//!
//! `cargo xtask vm interop` runs it and prints a table; the results are
//! also written as JSON (`target/vm/interop.json`).
//! `tests/tests/vm_interop.rs` runs that command (with `GATEWAY_VM=1`) and
//! checks its exit status and its JSON.
//!
//! The parts: `cases` is the table of modes and options, each with the
//! kernel's iproute2 commands and the gateway's configuration; `lab` boots
//! the guest and runs a case on it (pings, ARP, TCP, the capture);
//! `report` holds what each case came to, as a table and as JSON; `wire`
//! dissects the capture. This file holds what is measured and [`run`].

mod cases;
mod lab;
pub mod liveness;
mod report;
mod wire;

pub use lab::Lab;
pub(crate) use report::Pings;

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};

use self::cases::{cases, Case};
use self::report::Report;
use crate::vm::{self, Console, Stop};

/// How long the first packet through a fresh tunnel may take (next-hop
/// resolution on both sides, ARP through gretap), polled, never slept.
const FIRST_PING_LIMIT: Duration = Duration::from_secs(90);
/// Echo requests per direction once the first has come back.
const PINGS: u32 = 5;
/// The measured pings' TTL (hop limit): not the default 64, so that the
/// outer header shows whether it was inherited.
const PING_TTL: u32 = 33;
/// The measured pings' TOS byte: a DSCP (AF11) and ECT(0), so the outer
/// header shows what each side copies.
const PING_TOS: &str = "0x2a";
/// Bytes sent each way over TCP (`GATEWAY_VM_TCP_BYTES` to change).
const TCP_BYTES: u64 = 1 << 20;
/// How long a TCP transfer may take at emulated speed.
const TCP_LIMIT: Duration = Duration::from_secs(600);

/// Boots the lab and runs `only` (names; all when empty).
pub fn run(cache: &Path, gateway_bin: &Path, only: &[String], stop: &Stop) -> Result<Report> {
    let all = cases();
    let chosen: Vec<Case> = all
        .iter()
        .filter(|c| only.is_empty() || only.contains(&c.name))
        .cloned()
        .collect();
    if chosen.is_empty() {
        let names: Vec<&str> = all.iter().map(|c| c.name.as_str()).collect();
        bail!("no case named {only:?}; the cases: {names:?}");
    }
    let prefix = format!("gwvm{}", std::process::id());
    let mut lab = Lab::up(cache, gateway_bin, &prefix, Console::Log, stop)?;
    let mut results = Vec::new();
    for case in &chosen {
        results.push(lab.run_case(case)?);
    }
    Ok(Report {
        kernel: lab.guest.release.clone(),
        accel: match lab.guest.accel {
            vm::Accel::Kvm => "kvm".into(),
            vm::Accel::Tcg => "tcg".into(),
        },
        results,
    })
}
