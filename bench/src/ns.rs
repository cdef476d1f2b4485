//! Network namespaces for the bench, removed on drop (also on Ctrl-C, via
//! the caller's signal flag and normal unwinding), and running closures on
//! threads that live inside a namespace; and the bench's own topologies:
//! the generator's namespace and the gateway's joined by a veth, and two
//! hosts' namespaces joined by one (the underlay of two gateways).

use std::os::fd::AsRawFd;
use std::process::Command;

use anyhow::{bail, Context, Result};

pub fn sh(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {args:?}"))?;
    if !out.status.success() {
        bail!("{args:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(name: &str) -> Result<NetNs> {
        if std::path::Path::new("/var/run/netns").join(name).exists() {
            bail!("network namespace {name} already exists (another bench running, or left over?); remove it with `ip netns del {name}`");
        }
        sh(&["ip", "netns", "add", name])?;
        let ns = NetNs { name: name.into() };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut v = vec!["ip", "-n", &self.name];
        v.extend_from_slice(args);
        sh(&v)
    }

    /// The id of the XDP program attached to `dev` here (iproute2's JSON:
    /// one program, or the first of several attached).
    pub fn xdp_prog_id(&self, dev: &str) -> Result<u32> {
        let out = self.ip(&["-j", "-d", "link", "show", "dev", dev])?;
        let v: serde_json::Value = serde_json::from_str(out.trim())
            .with_context(|| format!("ip -j -d link show {dev} said:\n{out}"))?;
        let xdp = &v[0]["xdp"];
        xdp["prog"]["id"]
            .as_u64()
            .or_else(|| xdp["attached"][0]["prog"]["id"].as_u64())
            .and_then(|id| u32::try_from(id).ok())
            .with_context(|| format!("no XDP program on {dev} in {}", self.name))
    }

    pub fn mac(&self, dev: &str) -> Result<[u8; 6]> {
        let out = self.ip(&["-br", "link", "show", dev])?;
        let s = out.split_whitespace().nth(2).context("no MAC")?;
        let v: Vec<u8> = s
            .split(':')
            .map(|b| u8::from_str_radix(b, 16))
            .collect::<Result<_, _>>()?;
        v.try_into().map_err(|_| anyhow::anyhow!("bad MAC {s}"))
    }

    /// Spawns a thread that enters this namespace and runs `f` there.
    pub fn spawn<T: Send + 'static>(
        &self,
        name: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                enter(&path);
                f()
            })
            .expect("spawn")
    }
}

/// Moves the calling thread into the namespace at `path`.
fn enter(path: &str) {
    let file = std::fs::File::open(path).expect("open netns");
    // SAFETY: setns(2) on the calling thread with a namespace fd.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Ok(o) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A veth pair: `a_dev` in `a`, `b_dev` in `b`, with `queues` RX and TX
/// queues on each end.
pub fn veth(a: &NetNs, a_dev: &str, b: &NetNs, b_dev: &str, queues: usize) -> Result<()> {
    let q = queues.to_string();
    sh(&[
        "ip",
        "link",
        "add",
        a_dev,
        "netns",
        &a.name,
        "numrxqueues",
        &q,
        "numtxqueues",
        &q,
        "type",
        "veth",
        "peer",
        "name",
        b_dev,
        "netns",
        &b.name,
        "numrxqueues",
        &q,
        "numtxqueues",
        &q,
    ])?;
    Ok(())
}

pub fn pin(core: usize) {
    core_affinity::set_for_current(core_affinity::CoreId { id: core });
}

/// The generator's namespace (`gen0`, 192.168.0.58) and the gateway's
/// (`ens0`, 192.168.0.8) joined by a veth of `queues` queues each way;
/// returns them with the MACs of `gen0` and `ens0`.
pub(crate) fn topology(
    gen: &str,
    gw: &str,
    queues: usize,
) -> Result<(NetNs, NetNs, [u8; 6], [u8; 6])> {
    let gen_ns = NetNs::new(gen)?;
    let gw_ns = NetNs::new(gw)?;
    veth(&gen_ns, "gen0", &gw_ns, "ens0", queues)?;
    gen_ns.ip(&["addr", "add", "192.168.0.58/24", "dev", "gen0"])?;
    gw_ns.ip(&["addr", "add", "192.168.0.8/24", "dev", "ens0"])?;
    gen_ns.ip(&["link", "set", "gen0", "up"])?;
    gw_ns.ip(&["link", "set", "ens0", "up"])?;
    let gen_mac = gen_ns.mac("gen0")?;
    let gw_mac = gw_ns.mac("ens0")?;
    // Everything reaching gen0 goes to the generator's socket, so its kernel
    // never answers ARP: give the gateway side a permanent entry.
    let mac_s = gen_mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    gw_ns.ip(&[
        "neigh",
        "replace",
        "192.168.0.58",
        "lladdr",
        &mac_s,
        "dev",
        "ens0",
        "nud",
        "permanent",
    ])?;
    Ok((gen_ns, gw_ns, gen_mac, gw_mac))
}

/// Host A's underlay address in [`underlay_pair`] (its gateway's `local`).
pub(crate) const PAIR_A: &str = "192.168.0.8";
/// Host B's underlay address in [`underlay_pair`].
pub(crate) const PAIR_B: &str = "192.168.0.58";

/// Two hosts' namespaces `a` and `b` joined by a veth of `queues` queues
/// each way, `ens0` at each end ([`PAIR_A`] and [`PAIR_B`], /24), up, MTU
/// 1500 and veth's default offloads: the underlay of two gateways.
pub(crate) fn underlay_pair(a: &str, b: &str, queues: usize) -> Result<(NetNs, NetNs)> {
    let a = NetNs::new(a)?;
    let b = NetNs::new(b)?;
    veth(&a, "ens0", &b, "ens0", queues)?;
    a.ip(&["addr", "add", &format!("{PAIR_A}/24"), "dev", "ens0"])?;
    b.ip(&["addr", "add", &format!("{PAIR_B}/24"), "dev", "ens0"])?;
    a.ip(&["link", "set", "ens0", "up"])?;
    b.ip(&["link", "set", "ens0", "up"])?;
    Ok((a, b))
}
