//! The real kernel as a peer: Debian's distribution kernel (which has every
//! tunnel module this machine's kernel lacks) booted under QEMU, its root
//! file system the host's own, read-only over 9p.
//!
//! What this module does, in order:
//! - installs the Debian packages it needs when they are missing
//!   ([`ensure_packages`]);
//! - downloads the newest `linux-image-6.1.*-amd64-unsigned` that
//!   `apt-cache search` lists into `target/vm/`, unpacks it with `dpkg -x`
//!   and runs `depmod` ([`prepare`]);
//! - builds a tiny initramfs: busybox and the modules that mount 9p, in the
//!   order `modules.dep` gives;
//! - boots the guest (KVM when a probe boot shows it works, TCG otherwise,
//!   and says which), whose `/init` mounts the host's root, the unpacked
//!   modules and the job folder and runs `/mnt/guest.sh` from the job
//!   folder: it brings up the NIC and then serves commands the host writes
//!   into that folder (`cmd/N.sh`, answered in `out/N.log` and `out/N.rc`);
//! - joins the guest's NIC (a tap in a namespace, bridged) to a veth whose
//!   other end, `ens0` in a second namespace, is where the gateway runs.
//!
//! Everything it creates is removed in `Drop`, on success, failure or
//! Ctrl-C: QEMU and the gateway are killed by their pid when they do not
//! stop on their own, then the namespaces (with the tap, bridge and veth in
//! them) are deleted and the job folder removed. No wait here is a fixed
//! sleep for correctness: each waits for a condition with a generous
//! deadline, since TCG is slow and its speed must not decide a result.
//!
//! The parts: `kernel` finds, downloads and unpacks the kernel and builds
//! its initramfs; `qemu` boots it (the KVM probe, the 9p exports, the
//! command files); `net` makes the namespaces, the tap and the bridge;
//! `gateway` runs the gateway binary. This file holds what they share: the
//! addresses, the deadlines, running commands, waiting, stopping children.

mod gateway;
mod kernel;
mod net;
mod qemu;

pub use gateway::GatewayProc;
pub use kernel::prepare;
pub use net::Topology;
pub use qemu::{choose_accel, Accel, Console, Guest, Machine};

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Debian packages the lab needs on the host (and, through the shared root
/// file system, in the guest).
pub const VM_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "kmod",
    "iproute2",
    "iputils-ping",
    "ethtool",
    "tshark",
    "python3",
];

/// Generous deadlines: TCG is slow, and no result may depend on its speed.
pub const BOOT_LIMIT: Duration = Duration::from_secs(300);
pub const COMMAND_LIMIT: Duration = Duration::from_secs(180);

/// The guest's and the gateway's underlay addresses (the seed lab's: the
/// guest is host2, the kernel peer; the gateway is host1).
pub const GUEST_V4: &str = "192.168.0.58";
pub const GW_V4: &str = "192.168.0.8";
pub const GUEST_V6: &str = "2001:db8::58";
pub const GW_V6: &str = "2001:db8::8";
/// The guest NIC's MAC (QEMU's default range).
pub const GUEST_MAC: &str = "52:54:00:00:00:58";

/// Says what the lab does, on stderr. Never panics: when whoever read
/// stderr is gone (a test killed by Ctrl-C), a write error must not stop
/// the cleanup that is under way.
pub fn say(msg: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "[vm] {msg}");
}

/// Runs a command, failing with its output when it fails.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip ARGS...`
pub fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Installs [`VM_PACKAGES`] that are missing (says which).
pub fn ensure_packages() -> Result<()> {
    let missing: Vec<&str> = VM_PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        say("Debian packages for the VM lab: all present");
        return Ok(());
    }
    say(&format!("installing Debian packages {missing:?}"));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    Ok(())
}

/// Whether the process was asked to stop (Ctrl-C); waits give up when set.
#[derive(Clone, Default)]
pub struct Stop(pub Arc<AtomicBool>);

impl Stop {
    pub fn check(&self) -> Result<()> {
        if self.0.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        Ok(())
    }
}

/// Polls `f` every 50 ms until it gives `Some`; fails naming `what` (and
/// what `f` last saw, from `seen`) after `limit`.
pub fn wait_for<T>(
    what: &str,
    limit: Duration,
    stop: &Stop,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        stop.check()?;
        if start.elapsed() >= limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn kill(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([sig, &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// Stops a child: `sig` first, SIGKILL by its pid after `grace`.
fn stop_child(child: &mut Child, sig: &str, grace: Duration) {
    if let Ok(None) = child.try_wait() {
        kill(child.id(), sig);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
    }
    let _ = child.wait();
}

fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A folder removed on drop.
pub struct RemoveDir(pub PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
