//! Loading the XDP steering program, filling its maps, attaching it, and
//! reading its counters. The program detaches when [`Steering`] is dropped
//! or the process dies (aya attaches through a bpf_link).
#![deny(unsafe_code)]

use std::os::fd::RawFd;

use aya::maps::{Array, HashMap, PerCpuArray, XskMap};
use aya::programs::{Xdp, XdpMode};
use aya::Ebpf;
use gateway_common::{
    maps, EndpointKey, EndpointMapKey, Settings, XdpCounter, XdpCounters, PROGRAM_NAME,
    XDP_COUNTER_COUNT,
};

/// The object built from `ebpf/` by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gateway-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    #[error("this gateway binary was built without its XDP program (AYA_BUILD_SKIP); rebuild it with `cargo build` after `cargo xtask setup`")]
    NoObject,
    #[error("loading the XDP program failed: {0}")]
    Load(String),
    #[error("XDP map {0}: {1}")]
    Map(&'static str, String),
    #[error("attaching XDP to {iface} failed ({reason}); if another XDP program is attached, detach it first (ip link set dev {iface} xdp off)")]
    Attach { iface: String, reason: String },
}

pub struct Steering {
    ebpf: Ebpf,
    program: &'static str,
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A load failure in one line. The verifier's log is long; when the cause
/// is a missing privilege, say which instead of printing it.
fn load_error(e: aya::programs::ProgramError) -> XdpError {
    let text = chain(&e);
    if text.contains("Permission denied") || text.contains("Operation not permitted") {
        let why = if text.contains("prohibited for !root") {
            "the verifier needs CAP_PERFMON for the program's pointer arithmetic"
        } else {
            "permission denied"
        };
        return XdpError::Load(format!(
            "{why}; give the gateway CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (see gateway/dist/gateway.service)"
        ));
    }
    // The program reads headers at unaligned offsets (ebpf/build.rs), which
    // the verifier refuses on architectures without efficient unaligned
    // access.
    if text.contains("misaligned") {
        return XdpError::Load(format!(
            "the kernel's verifier refuses the program's unaligned packet reads ({}): it is built for architectures with efficient unaligned access (x86-64, arm64); rebuild without +allows-misaligned-mem-access in ebpf/build.rs",
            text.lines().find(|l| l.contains("misaligned")).unwrap_or("").trim()
        ));
    }
    // Anything else: the verifier says why in the lines before its
    // summary ("processed N insns"), at the end of a long log.
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let end = all
        .iter()
        .rposition(|l| l.starts_with("processed "))
        .unwrap_or(all.len());
    let mut lines: Vec<&str> = Vec::new();
    if let Some(first) = all.first() {
        lines.push(first);
    }
    if end > 1 {
        lines.push("...");
        lines.extend(&all[end.saturating_sub(2).max(1)..end]);
    }
    XdpError::Load(format!(
        "{}; run as root (or with CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN) on a kernel with BPF",
        lines.join(" | ")
    ))
}

impl Steering {
    /// Loads the steering program and its maps into the kernel, not yet
    /// attached.
    pub fn load() -> Result<Steering, XdpError> {
        Self::load_program(PROGRAM_NAME)
    }

    /// Loads another program of the object (the bench harness's
    /// `gateway_common::bench_programs`), with the same maps.
    pub fn load_program(program: &'static str) -> Result<Steering, XdpError> {
        if OBJECT.is_empty() {
            return Err(XdpError::NoObject);
        }
        let mut ebpf = Ebpf::load(OBJECT).map_err(|e| {
            XdpError::Load(format!(
                "{}; run as root (or with CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN) on a kernel with BPF",
                chain(&e)
            ))
        })?;
        let prog: &mut Xdp = ebpf
            .program_mut(program)
            .ok_or_else(|| XdpError::Load(format!("no program {program} in the object")))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| XdpError::Load(chain(&e)))?;
        prog.load().map_err(load_error)?;
        Ok(Steering { ebpf, program })
    }

    /// Lets packets with this outer (local, remote, protocol) through to the
    /// AF_XDP sockets: into the program's table of the key's family.
    pub fn add_endpoint(&mut self, key: &EndpointKey) -> Result<(), XdpError> {
        let r = match key.map_key() {
            EndpointMapKey::V4(k) => self.endpoints(maps::ENDPOINTS_V4)?.insert(k, 1, 0),
            EndpointMapKey::V6(k) => self.endpoints(maps::ENDPOINTS_V6)?.insert(k, 1, 0),
        };
        r.map_err(|e| XdpError::Map(map_of(key), chain(&e)))
    }

    /// Stops steering packets with this outer (local, remote, protocol).
    pub fn remove_endpoint(&mut self, key: &EndpointKey) -> Result<(), XdpError> {
        let r = match key.map_key() {
            EndpointMapKey::V4(k) => self.endpoints(maps::ENDPOINTS_V4)?.remove(&k),
            EndpointMapKey::V6(k) => self.endpoints(maps::ENDPOINTS_V6)?.remove(&k),
        };
        match r {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(XdpError::Map(map_of(key), chain(&e))),
        }
    }

    /// The endpoint table `name`, with keys of type `K`.
    fn endpoints<K: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<HashMap<&mut aya::maps::MapData, K, u32>, XdpError> {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(XdpError::Map(name, "missing".into()))?;
        HashMap::try_from(map).map_err(|e| XdpError::Map(name, chain(&e)))
    }

    /// The kernel's id of the loaded program (what `ip link` shows as
    /// `prog/xdp id N` once attached).
    pub fn program_id(&self) -> Option<u32> {
        let prog: &Xdp = self.ebpf.program(self.program)?.try_into().ok()?;
        prog.info().ok().map(|i| i.id())
    }

    /// Tells the program the interface's MAC, so frames unicast to other
    /// hosts are left to the kernel.
    pub fn set_mac(&mut self, mac: [u8; 6]) -> Result<(), XdpError> {
        let map = self
            .ebpf
            .map_mut(maps::SETTINGS)
            .ok_or(XdpError::Map(maps::SETTINGS, "missing".into()))?;
        let mut arr: Array<_, Settings> =
            Array::try_from(map).map_err(|e| XdpError::Map(maps::SETTINGS, chain(&e)))?;
        let s = Settings {
            mac,
            mac_set: 1,
            pad: 0,
        };
        arr.set(0, s, 0)
            .map_err(|e| XdpError::Map(maps::SETTINGS, chain(&e)))
    }

    /// Puts the AF_XDP socket of RX queue `queue` into the XSKMAP.
    pub fn set_socket(&mut self, queue: u32, fd: RawFd) -> Result<(), XdpError> {
        let map = self
            .ebpf
            .map_mut(maps::XSKS)
            .ok_or(XdpError::Map(maps::XSKS, "missing".into()))?;
        let mut xsks = XskMap::try_from(map).map_err(|e| XdpError::Map(maps::XSKS, chain(&e)))?;
        xsks.set(queue, fd, 0)
            .map_err(|e| XdpError::Map(maps::XSKS, chain(&e)))
    }

    /// Attaches to `iface`. Returns the mode used ("native" or "generic").
    pub fn attach(&mut self, iface: &str, how: XdpAttach) -> Result<&'static str, XdpError> {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(self.program)
            .expect("loaded above")
            .try_into()
            .expect("an XDP program");
        let attempt = |prog: &mut Xdp, mode: XdpMode| {
            prog.attach(iface, mode).map_err(|e| XdpError::Attach {
                iface: iface.into(),
                reason: chain(&e),
            })
        };
        let mode = match how {
            XdpAttach::Native => attempt(prog, XdpMode::Driver).map(|_| "native")?,
            XdpAttach::Generic => attempt(prog, XdpMode::Skb).map(|_| "generic")?,
            XdpAttach::Auto => match attempt(prog, XdpMode::Driver) {
                Ok(_) => "native",
                Err(e) => {
                    tracing::warn!("native XDP not available ({e}); falling back to generic mode, which is much slower");
                    attempt(prog, XdpMode::Skb).map(|_| "generic")?
                }
            },
        };
        Ok(mode)
    }

    /// The program's counters, summed over CPUs, indexed by [`XdpCounter`].
    /// The program counts each packet once, under its verdict; `Seen` is
    /// the sum of every counter (see [`XdpCounter`]).
    pub fn counters(&self) -> XdpCounters {
        let mut out = [0u64; XDP_COUNTER_COUNT as usize];
        let Some(map) = self.ebpf.map(maps::COUNTERS) else {
            return out;
        };
        let Ok(arr) = PerCpuArray::<_, XdpCounters>::try_from(map) else {
            return out;
        };
        if let Ok(per_cpu) = arr.get(&0, 0) {
            out = sum_counters(per_cpu.iter());
        }
        out
    }
}

/// The name of the table `key` goes into.
fn map_of(key: &EndpointKey) -> &'static str {
    match key.map_key() {
        EndpointMapKey::V4(_) => maps::ENDPOINTS_V4,
        EndpointMapKey::V6(_) => maps::ENDPOINTS_V6,
    }
}

/// The counters of every CPU added up, with `Seen` the sum of them all:
/// the program counts each packet once, under its verdict (or, in the
/// bench's counting program, under `Seen` alone).
fn sum_counters<'a>(per_cpu: impl Iterator<Item = &'a XdpCounters>) -> XdpCounters {
    let mut out = [0u64; XDP_COUNTER_COUNT as usize];
    for cpu in per_cpu {
        for (o, n) in out.iter_mut().zip(cpu) {
            *o = o.wrapping_add(*n);
        }
    }
    out[XdpCounter::Seen as usize] = out.iter().fold(0u64, |a, n| a.wrapping_add(*n));
    out
}

/// How the XDP program is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpAttach {
    /// Native (driver) mode, falling back to generic with a warning.
    Auto,
    Native,
    Generic,
}

impl std::fmt::Display for XdpAttach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            XdpAttach::Auto => "auto",
            XdpAttach::Native => "native",
            XdpAttach::Generic => "generic",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_is_the_sum_of_every_verdict_over_every_cpu() {
        let mut a = [0u64; XDP_COUNTER_COUNT as usize];
        let mut b = [0u64; XDP_COUNTER_COUNT as usize];
        a[XdpCounter::Redirected as usize] = 5;
        a[XdpCounter::PassNotIp as usize] = 2;
        b[XdpCounter::Redirected as usize] = 3;
        b[XdpCounter::PassOtherHost as usize] = 1;
        let sum = sum_counters([a, b].iter());
        assert_eq!(sum[XdpCounter::Redirected as usize], 8);
        assert_eq!(sum[XdpCounter::PassNotIp as usize], 2);
        assert_eq!(sum[XdpCounter::PassOtherHost as usize], 1);
        assert_eq!(sum[XdpCounter::Seen as usize], 11);
    }

    #[test]
    fn the_bench_programs_seen_slot_is_added_too() {
        let mut a = [0u64; XDP_COUNTER_COUNT as usize];
        a[XdpCounter::Seen as usize] = 7;
        assert_eq!(sum_counters([a].iter())[XdpCounter::Seen as usize], 7);
    }

    #[test]
    fn each_family_goes_to_its_own_table() {
        let v4 = EndpointKey::v4([192, 0, 2, 8], [192, 0, 2, 58], 47);
        match v4.map_key() {
            EndpointMapKey::V4(k) => {
                assert_eq!(k.local, [192, 0, 2, 8]);
                assert_eq!(k.remote, [192, 0, 2, 58]);
                assert_eq!((k.proto, k.pad), (47, [0; 3]));
            }
            EndpointMapKey::V6(_) => panic!("an IPv4 key in the IPv6 table"),
        }
        assert_eq!(map_of(&v4), maps::ENDPOINTS_V4);
        let mut l = [0u8; 16];
        l[15] = 1;
        let v6 = EndpointKey::v6(l, [0xfe; 16], 4);
        match v6.map_key() {
            EndpointMapKey::V6(k) => {
                assert_eq!(
                    (k.local, k.remote, k.proto, k.pad),
                    (l, [0xfe; 16], 4, [0; 3])
                );
            }
            EndpointMapKey::V4(_) => panic!("an IPv6 key in the IPv4 table"),
        }
        assert_eq!(map_of(&v6), maps::ENDPOINTS_V6);
    }
}
