//! `cargo xtask vm`: the kernel as a peer, by hand or automated.
//!
//! - `cargo xtask vm`: the seed lab with the kernel on one side (the
//!   guest, tun100 GRE and tun200 IPIP made with `ip tunnel add`) and the
//!   gateway on the other (namespace `vm-gw`, `configs/lab-host1.toml`); the
//!   guest's shell on this terminal, the gateway's through `ip netns exec`.
//! - `cargo xtask vm interop`: every mode and option against the kernel's
//!   own, ping both ways; a table, and JSON in `target/vm/interop.json`.
//! - `cargo xtask vm guest`: the gateway inside the guest (Linux 6.1,
//!   virtio-net with 2 queue pairs, native XDP, one worker per queue)
//!   against a second gateway on the host side; JSON in
//!   `target/vm/guest.json` (see `guestlab`).
//! - `cargo xtask vm differential`: every inbound case sent to the kernel's
//!   tunnels and the gateway's, outcomes compared (`crate::differential`).
//! - `cargo xtask vm run SCRIPT`: boots the guest, runs the shell script in
//!   it and prints what it printed (its exit status is this command's).
//!
//! Environment: `GATEWAY_VM_ACCEL=kvm|tcg` skips the KVM probe boot (here
//! KVM hangs after the kernel's decompression, so the probe gives up after
//! 20 s and TCG runs); `GATEWAY_VM_KERNEL=6.1.0-57-amd64` picks a kernel
//! instead of the newest `apt-cache search` lists; `GATEWAY_VM_TCP_BYTES`
//! (default 1 MiB, 0 for none) sets the TCP transfers of `vm interop`.
//! The kernel package, its initramfs, the last results
//! (`interop.json`) and each case's capture (`pcaps/`) stay in `target/vm`.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Result};
use clap::Subcommand;

use crate::interop::{self, Lab};
use crate::vm::{self, Console, GatewayProc, Stop};

#[derive(Subcommand)]
pub enum VmCmd {
    /// Every tunnel mode and option against the kernel's own: ping both
    /// ways; prints a table and writes JSON.
    Interop {
        /// Only these cases (by name, e.g. --only gre --only ipip).
        #[arg(long)]
        only: Vec<String>,
        /// Where the JSON goes (default target/vm/interop.json).
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Tunnel liveness with the kernel's GRE as the peer: the gateway's
    /// keepalives reflected, the tunnel down (and its carrier) when the
    /// kernel's tunnel goes, up when it returns; writes JSON.
    Liveness {
        /// Where the JSON goes (default target/vm/liveness.json).
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Every conformance case sent, as the same bytes, to the kernel's
    /// tunnels and to the gateway's; both outcomes measured and compared
    /// (`xtask/src/differential/`).
    Differential {
        /// Only these cases (by name).
        #[arg(long)]
        only: Vec<String>,
        /// Where the JSON goes (default target/vm/differential.json).
        #[arg(long)]
        json: Option<PathBuf>,
        /// Regenerate docs/conformance.md from this run.
        #[arg(long)]
        write_docs: bool,
    },
    /// Boots the guest, runs a shell script in it (on the host's root,
    /// read-only; /tmp is its own), prints its output.
    Run { script: PathBuf },
    /// The gateway inside the guest (Linux 6.1, virtio-net with 2 queue
    /// pairs, native XDP, 2 workers) against a second gateway on the host
    /// side: pings, TCP, both workers' counts, SIGTERM and SIGKILL.
    Guest {
        /// Where the JSON goes (default target/vm/guest.json).
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

fn stop_on_signals() -> Result<Stop> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, flag.clone())?;
    }
    Ok(Stop(flag))
}

pub fn main(root: &Path, gateway_bin: &Path, cmd: Option<VmCmd>) -> Result<()> {
    let cache = root.join("target/vm");
    let stop = stop_on_signals()?;
    match cmd {
        None => by_hand(root, &cache, gateway_bin, &stop),
        Some(VmCmd::Interop { only, json }) => {
            let report = interop::run(&cache, gateway_bin, &only, &stop)?;
            let path = json.unwrap_or_else(|| cache.join("interop.json"));
            std::fs::write(&path, report.to_json())?;
            println!("{}", report.table());
            println!("(JSON: {})", path.display());
            if report
                .results
                .iter()
                .all(|r| r.passes() && r.unexpected_differences().is_empty())
            {
                Ok(())
            } else {
                bail!("some cases failed, or their outer headers differ from the kernel's (see above)")
            }
        }
        Some(VmCmd::Liveness { json }) => {
            let report = interop::liveness::run(&cache, gateway_bin, &stop)?;
            let path = json.unwrap_or_else(|| cache.join("liveness.json"));
            let text = serde_json::to_string_pretty(&report)?;
            std::fs::write(&path, &text)?;
            println!("{text}\n(JSON: {})", path.display());
            Ok(())
        }
        Some(VmCmd::Guest { json }) => {
            let report = crate::guestlab::run(&cache, gateway_bin, &stop)?;
            let path = json.unwrap_or_else(|| cache.join("guest.json"));
            std::fs::write(&path, report.to_json())?;
            println!("{}", report.table());
            println!("(JSON: {})", path.display());
            if !report.passes() {
                bail!("the gateway in the guest did not pass (see above)");
            }
            Ok(())
        }
        Some(VmCmd::Differential {
            only,
            json,
            write_docs,
        }) => crate::differential::main(root, &cache, gateway_bin, &only, json, write_docs, &stop),
        Some(VmCmd::Run { script }) => {
            let text = std::fs::read_to_string(&script)?;
            let prefix = format!("gwvm{}", std::process::id());
            let mut lab = Lab::up(&cache, gateway_bin, &prefix, Console::Log, &stop)?;
            let (rc, out) = lab.guest.exec_status(&text, vm::BOOT_LIMIT)?;
            print!("{out}");
            drop(lab);
            if rc != 0 {
                bail!("the script exited with {rc} in the guest");
            }
            Ok(())
        }
    }
}

/// The seed lab's kernel commands on host2 (the guest).
const SEED_HOST2: &[&str] = &[
    "ip tunnel add tun100 mode gre remote 192.168.0.8 local 192.168.0.58 ttl 64",
    "ip link set tun100 up mtu 1400",
    "ip addr add 10.1.1.2 peer 10.1.1.1 dev tun100",
    "ip tunnel add tun200 mode ipip remote 192.168.0.8 local 192.168.0.58",
    "ip link set tun200 up mtu 1400",
    "ip addr add 20.1.1.2 peer 20.1.1.1 dev tun200",
];

fn by_hand(root: &Path, cache: &Path, gateway_bin: &Path, stop: &Stop) -> Result<()> {
    let mut lab = Lab::up(cache, gateway_bin, "vm", Console::Interactive, stop)?;
    lab.guest
        .exec(&format!("set -e\n{}\n", SEED_HOST2.join("\n")))?;
    let config = root.join("configs/lab-host1.toml");
    let config_text = std::fs::read_to_string(&config)?;
    let gw = GatewayProc::start(
        gateway_bin,
        &lab.topo.gw,
        &config_text,
        &lab.dir.join("gateway"),
        stop,
    )?;
    let banner = format!(
        "\r
==== the kernel as a peer: Linux {release} in this VM ({accel}) ====\r
This shell is the kernel's side (host2 of the seed lab, eth0 {guest}),\r
with these tunnels, made as a user would:\r
{cmds}\r
The gateway (host1, {gwaddr}) runs on the other side of the wire with\r
{config}: pid {pid}, log {log}.\r
\r
From another terminal on the host:\r
  ip netns exec {gwns} bash                      the gateway's side\r
  ip netns exec {gwns} {bin} stats --iface ens0\r
  ip netns exec {wire} tshark -i br0 -f 'ip proto 47 or ip proto 4'\r
Here: ping 10.1.1.1 (GRE), ping 20.1.1.1 (IPIP), ip -d tunnel show.\r
Leave with `exit` (the VM powers off, everything is removed),\r
or Ctrl-A x (QEMU quits).\r
\r
",
        release = lab.guest.release,
        accel = match lab.guest.accel {
            vm::Accel::Kvm => "KVM",
            vm::Accel::Tcg => "TCG",
        },
        guest = vm::GUEST_V4,
        cmds = SEED_HOST2
            .iter()
            .map(|c| format!("  {c}"))
            .collect::<Vec<_>>()
            .join("\r\n"),
        gwaddr = vm::GW_V4,
        config = config.strip_prefix(root).unwrap_or(&config).display(),
        pid = gw.pid(),
        log = gw.log.display(),
        gwns = lab.topo.gw,
        wire = lab.topo.wire,
        bin = gateway_bin.display(),
    );
    std::fs::write(lab.guest.job.join("banner"), banner)?;
    lab.guest.wait()?;
    drop(gw);
    drop(lab);
    eprintln!("[vm] the lab is closed");
    Ok(())
}
