//! The host side of the wire: the namespaces, QEMU's tap, the bridge and
//! the veth to the gateway's namespace, all deleted on drop.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Result};

use super::{ip, say, GW_V4, GW_V6};

/// The host side of the wire: namespace `<prefix>-wire` with a bridge,
/// QEMU's tap and one end of a veth; namespace `<prefix>-gw` with the
/// other end, `ens0`, at [`GW_V4`] and [`GW_V6`] (where the gateway runs).
/// Deleted on drop, with everything in them.
pub struct Topology {
    pub wire: String,
    pub gw: String,
    pub tap: String,
    /// The tap's queues (more than 1: a `multi_queue` tap).
    pub queues: u32,
}

impl Topology {
    pub fn new(prefix: &str) -> Result<Topology> {
        Topology::with_queues(prefix, 1)
    }

    /// [`Topology::new`] with a tap of `queues` queues for a multi-queue
    /// virtio-net (see [`super::Machine`]).
    pub fn with_queues(prefix: &str, queues: u32) -> Result<Topology> {
        sweep_stale();
        let t = Topology {
            wire: format!("{prefix}-wire"),
            gw: format!("{prefix}-gw"),
            tap: "vmtap0".into(),
            queues,
        };
        for ns in [&t.wire, &t.gw] {
            if Path::new("/var/run/netns").join(ns).exists() {
                bail!("network namespace {ns} already exists (a lab still running, or left over?); remove it with `ip netns del {ns}`");
            }
        }
        // From here on, Drop removes what exists.
        for ns in [&t.wire, &t.gw] {
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        let (w, g) = (t.wire.as_str(), t.gw.as_str());
        ip(&["-n", w, "link", "add", "br0", "type", "bridge"])?;
        let mut tuntap = vec!["-n", w, "tuntap", "add", "dev", &t.tap, "mode", "tap"];
        if queues > 1 {
            tuntap.push("multi_queue");
        }
        ip(&tuntap)?;
        ip(&[
            "link", "add", "ens0", "netns", g, "type", "veth", "peer", "name", "port1", "netns", w,
        ])?;
        for dev in [t.tap.as_str(), "port1"] {
            ip(&["-n", w, "link", "set", dev, "master", "br0"])?;
            ip(&["-n", w, "link", "set", dev, "up"])?;
        }
        ip(&["-n", w, "link", "set", "br0", "up"])?;
        ip(&[
            "-n",
            g,
            "addr",
            "add",
            &format!("{GW_V4}/24"),
            "dev",
            "ens0",
        ])?;
        ip(&[
            "-n",
            g,
            "-6",
            "addr",
            "add",
            &format!("{GW_V6}/64"),
            "dev",
            "ens0",
            "nodad",
        ])?;
        ip(&["-n", g, "link", "set", "ens0", "up"])?;
        Ok(t)
    }

    /// `ip netns exec NS ARGS...`: success and output (stdout and stderr).
    pub fn exec(ns: &str, args: &[&str]) -> (bool, String) {
        match Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .output()
        {
            Ok(o) => (
                o.status.success(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                ),
            ),
            Err(e) => (false, e.to_string()),
        }
    }
}

/// Deletes a namespace, killing what still runs in it first (QEMU, a
/// capture, a shell's child).
fn remove_ns(ns: &str) {
    if !Path::new("/var/run/netns").join(ns).exists() {
        return;
    }
    if let Ok(o) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-9", pid]).status();
        }
    }
    let _ = Command::new("ip").args(["netns", "del", ns]).status();
}

/// The labs' namespaces left by a run that was killed outright (SIGKILL,
/// a CI timeout: no Drop ran), QEMU in them: named `gwXX<pid>-wire` or
/// `-gw` after the run's pid, which is gone. Removed before a new lab is
/// made; a lab whose process still runs is left alone.
fn sweep_stale() {
    let Ok(list) = std::fs::read_dir("/var/run/netns") else {
        return;
    };
    for entry in list.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(stem) = name
            .strip_suffix("-wire")
            .or_else(|| name.strip_suffix("-gw"))
        else {
            continue;
        };
        let Some(rest) = stem.strip_prefix("gw") else {
            continue;
        };
        let digits = rest.trim_start_matches(|c: char| c.is_ascii_lowercase());
        if digits.len() == rest.len() || digits.is_empty() {
            continue;
        }
        let Ok(pid) = digits.parse::<u32>() else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            say(&format!("removing {name}, left by run {pid} (gone)"));
            remove_ns(&name);
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in [&self.gw, &self.wire] {
            remove_ns(ns);
        }
        say(&format!(
            "removed namespaces {} and {} (bridge, tap and veth with them)",
            self.wire, self.gw
        ));
    }
}
